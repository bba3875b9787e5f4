"""The GRID LightningModule: frozen FLUX transformer + LoRA (or the transformer itself, ``adapter=full``), trained on
L_base + alpha * L_flow (eq. 3).

One training step (paper section 2.2-2.3):
    grid image --VAE--> normalised latents --pack--> x0 (B, N, 64)
    t ~ sampling,  eps ~ N(0, I)  keyed by (seed, step, sample key)     eq. (1)
    x_t = (1 - t) x0 + t eps,  target = eps - x0                        eq. (1)-(2)
    v = transformer(x_t, t, guidance, text, position ids)
    L = L_base(v, target) + alpha * L_flow(v, target, layout)          eq. (3)-(7)
Only the LoRA parameters train (``adapter=full``: the transformer's own weights, :mod:`gridgen.models.full`); the
VAE and text encoders run under no_grad (or are skipped when the batch carries cached latents / text embeddings).
"""

from __future__ import annotations

import logging
import math
import zlib
from typing import Any

import lightning as L
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from omegaconf import DictConfig, OmegaConf

from gridgen.layout import GridLayout
from gridgen.losses import FLOW_PAIRS, add_noise, base_loss, sample_timesteps, temporal_flow_loss
from gridgen.models.attention import apply_attention_backend
from gridgen.models.builder import TrainableFull, TrainableLora, build_flux, prepare_transformer
from gridgen.models.flux import encode_images, encode_prompts
from gridgen.models.full import check_adapter_settings
from gridgen.models.lora import build_lora_config, keep_lora_fp32
from gridgen.training.flops import training_flops_per_batch
from gridgen.training.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

NONFINITE_ACTIONS = ("stop", "skip")


class NonFiniteError(ValueError):
    """A loss term or the gradient norm went non-finite: the run stops with one line (exit code 2)."""


def _plain(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


class GridModule(L.LightningModule):
    """Holds the FLUX pipeline (frozen) and trains a LoRA on the transformer, or the transformer's own weights.

    Args (each a config group, see ``conf/``):
        model: ``pretrained``, ``transformer``, ``dtype``, ``revision``, ``variant``, ``max_sequence_length``,
            ``guidance_scale``, ``gradient_checkpointing``.
        lora: ``mode`` (``lora``: ``rank``, ``alpha``, ``dropout``, ``init``, ``target_modules``; ``full``:
            ``train_modules``), the ``adapter`` config group.
        optim: ``lr``, ``betas``, ``weight_decay``, ``eps``, ``scheduler`` (constant | cosine),
            ``warmup_steps``, ``min_lr_ratio``.
        loss: ``timestep_sampling`` (uniform | logit_normal | shifted), ``logit_mean``, ``logit_std``,
            ``timestep_shift`` (a number or ``auto`` = FLUX's resolution shift), ``alpha`` (initial alpha),
            ``flow_pairs`` (``filmstrip``: the paper's L_flow | ``within_row``: the official code's).
        init_lora: optional LoRA file to start from (fine stage starts from the coarse LoRA).
        run: what the run trains (``task``, ``layout``), kept in checkpoints so a resume can check it.
        seed: seeds the per-sample noise and times.
        nonfinite: ``action`` (``stop``: end the run at the first non-finite loss term or gradient norm with a
            one-line error; ``skip``: drop that step's update, up to ``max_skips`` steps, each counted and logged
            as ``train/nonfinite_skips``).
    """

    def __init__(self, model: Any, lora: Any, optim: Any, loss: Any, init_lora: str | None = None,
                 seed: int = 0, max_steps: int | None = None, nonfinite: Any = None,
                 run: dict[str, str] | None = None) -> None:
        super().__init__()
        self.model_cfg, self.lora_cfg = _plain(model), _plain(lora)
        self.optim_cfg, self.loss_cfg = _plain(optim), _plain(loss)
        # plain containers: checkpoints stay loadable with torch.load(weights_only=True)
        self.save_hyperparameters({"model": self.model_cfg, "lora": self.lora_cfg, "optim": self.optim_cfg,
                                   "loss": self.loss_cfg, "init_lora": init_lora, "seed": seed, "max_steps": max_steps,
                                   "run": dict(run or {})})
        self.init_lora, self.seed, self.max_steps = init_lora, int(seed), max_steps
        self.nonfinite = {"action": "stop", "max_skips": 0, **_plain(nonfinite or {})}
        if self.nonfinite["action"] not in NONFINITE_ACTIONS:
            raise ValueError(f"nonfinite.action must be one of {NONFINITE_ACTIONS}, got {self.nonfinite['action']!r}")
        self.nonfinite_skips = 0
        self._step_losses: dict[str, torch.Tensor] = {}
        self.attention_backend: str | None = None  # resolved in on_fit_start
        self.alpha = float(self.loss_cfg.get("alpha", 0.0))  # set every step by AlphaSchedule
        self.flow_pairs = str(self.loss_cfg.get("flow_pairs", "filmstrip"))
        self.caption_dropout = float(self.loss_cfg.get("caption_dropout", 0.0))
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"loss.caption_dropout must be in [0, 1) (the share of captions trained as the empty "
                             f"one, for true CFG; 0.1 is usual), got {self.caption_dropout}")
        self._null_text: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.flow_pairs not in FLOW_PAIRS:
            raise ValueError(f"loss.flow_pairs must be one of {FLOW_PAIRS}, got {self.flow_pairs!r}")
        self.pipe = None
        self.transformer: torch.nn.Module | None = None
        self.num_trainable = 0
        self.flops_per_batch: int | None = None  # read by ThroughputMonitor; None = no MFU figure
        self._flops_cache: dict[tuple[int, int, int], int] = {}
        self._restored: dict[str, torch.Tensor] | None = None
        # Checkpoints hold only the trained weights (LoRA, or the transformer); the frozen rest is rebuilt from
        # model.pretrained.
        self.strict_loading = False
        # Check the adapter settings and build the LoRA config now, so that a bad rank/target fails before any
        # weights load.
        self.mode = check_adapter_settings(self.lora_cfg, self.model_cfg, init_lora)
        self._lora_config = None if self.mode == "full" else build_lora_config(
            **{k: self.lora_cfg[k] for k in ("rank", "alpha", "dropout", "init", "target_modules")})

    # ---- model ----------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Load FLUX through ``from_pretrained`` and attach LoRA, or make the transformer trainable (idempotent;
        Lightning calls it under FSDP)."""
        if self.transformer is not None:
            return
        pipe, built = build_flux(self.model_cfg, lora=self._trainable(), device="cpu",
                                 load_encoders=not self.model_cfg.get("cached", False))
        self.transformer, self.num_trainable = pipe.transformer, built.num_trainable
        self._shard_if_fsdp2()
        # The frozen encoders stay outside the module's parameters (not in checkpoints, not wrapped by
        # DDP/FSDP); they follow the module's device in on_fit_start.
        self.pipe = pipe
        self.pipe.transformer = None

    def _empty_caption(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty caption's ``(prompt_embeds (1, L, D), pooled (1, D))``: what ``loss.caption_dropout`` trains
        in place of a caption and what true CFG samples as the negative prompt (``generate.negative_prompt=""``).
        Cached runs load the text encoders once for it and let them go."""
        from gridgen.data.cache import load_encoders

        loaded = self.pipe is not None and self.pipe.text_encoder is not None
        pipe = self.pipe if loaded else load_encoders(self.model_cfg)
        with torch.no_grad():
            embeds, pooled, _ = encode_prompts(pipe, [""], int(self.model_cfg["max_sequence_length"]),
                                               device=pipe.text_encoder.device)
        return embeds.cpu(), pooled.cpu()

    def _trainable(self) -> TrainableLora | TrainableFull:
        if self.mode == "full":
            patterns = self.lora_cfg.get("train_modules")
            return TrainableFull(None if patterns is None else tuple(patterns))
        return TrainableLora(self._lora_config, seed=self.seed, init=self.init_lora)

    def attached_trainer(self) -> L.Trainer | None:
        """The Trainer running this module, None outside ``fit`` (a notebook, a benchmark loop)."""
        try:
            return self.trainer
        except RuntimeError:  # Lightning's "not attached to a Trainer"
            return None

    def _shard_if_fsdp2(self) -> None:
        """Under ``strategy=fsdp`` (FSDP2) Lightning hands the module a device mesh: shard each FLUX block."""
        from gridgen.training.strategies import FluxFSDP2Strategy, shard_flux_transformer

        trainer = self.attached_trainer()
        strategy = trainer.strategy if trainer is not None else None
        if isinstance(strategy, FluxFSDP2Strategy):
            shard_flux_transformer(self.transformer, strategy.device_mesh["data_parallel"], strategy)

    def adopt_transformer(self, transformer: torch.nn.Module) -> None:
        """Quantize, attach the LoRA (or make its weights trainable) and compile a FLUX transformer built elsewhere
        (benchmarks, notebooks) as :func:`~gridgen.models.builder.build_flux` does, and make it this module's."""
        self.num_trainable = prepare_transformer(transformer, self.model_cfg, self._trainable()).num_trainable
        self.transformer = transformer

    def on_fit_start(self) -> None:
        # trainer.precision=bf16-true casts the whole module to bf16 after configure_model: the trained weights go
        # back to fp32 here (same Parameter objects, so the optimizer, whose state starts at the first step, keeps
        # them)
        if self.transformer is not None:
            keep_lora_fp32(self.transformer)
            if self._restored:  # resumed weights, exact (not rounded through that bf16 cast)
                params = dict(self.named_parameters())
                with torch.no_grad():
                    for name, tensor in self._restored.items():
                        if name in params:
                            params[name].copy_(tensor)
            self._restored = None
        # Every process (Lightning starts one per device) selects its attention kernel before the first step.
        self.attention_backend = apply_attention_backend(self.model_cfg.get("attention_backend"), self.device.type,
                                                         self.transformer)
        if self.pipe is None:  # transformer adopted directly; batches must carry cached latents and embeddings
            return
        for part in (self.pipe.vae, self.pipe.text_encoder, self.pipe.text_encoder_2):
            if part is not None:
                part.to(self.device)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ---- checkpoints: the trained weights only (LoRA, or the transformer) ------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["gridgen_nonfinite_skips"] = self.nonfinite_skips

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_skips = int(checkpoint.get("gridgen_nonfinite_skips", 0))
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        if "state_dict" not in checkpoint:  # FSDP2: the strategy has loaded the weights into the shards itself
            return
        self._restored = checkpoint["state_dict"]  # the trained tensors only; re-applied in on_fit_start
        missing = trainable - set(checkpoint["state_dict"])
        if trainable and missing:
            fix = "lora.train_modules (adapter=full)" if self.mode == "full" else "lora.rank and lora.target_modules"
            raise ValueError(
                f"checkpoint lacks {len(missing)} trained tensors (e.g. '{sorted(missing)[0]}'); it was saved with "
                f"another adapter config: resume with the same {fix}"
            )

    # ---- conditioning ---------------------------------------------------------------------------------
    def _text_conditioning(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if "prompt_embeds" in batch:  # cached by `make cache` (data issue): no text encoders needed
            embeds = batch["prompt_embeds"].to(self.device)
            text_ids = torch.zeros(embeds.shape[1], 3, device=self.device, dtype=embeds.dtype)
            return embeds, batch["pooled_prompt_embeds"].to(self.device), text_ids
        return encode_prompts(self.pipe, list(batch["caption"]), int(self.model_cfg["max_sequence_length"]),
                              device=self.device)

    def _latents(self, batch: dict[str, Any]) -> torch.Tensor:
        if "latents" in batch:  # cached, already normalised and packed (B, N, 64)
            return batch["latents"].to(self.device)
        return encode_images(self.pipe.vae, batch["pixel_values"].to(self.device))

    def _noise_and_times(self, keys: list[str], x0: torch.Tensor, layout: GridLayout, stream: str,
                         fixed_t: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and t per sample from a generator keyed by (seed, stream, sample key).

        Keying by sample (not by rank or batch position) makes a step independent of how samples are
        spread over processes, so 2 DDP ranks reproduce 1 process with the doubled batch, and a resumed run
        draws the same noise as an uninterrupted one. Training streams include the step; validation uses a
        fixed stream so held-out losses are comparable across steps, runs and ranks.
        """
        cfg = self.loss_cfg
        shift = cfg.get("timestep_shift", 3.0)
        if shift == "auto":  # FLUX's resolution-dependent shift exp(mu), from the grid's token count
            shift = float(torch.tensor(calculate_shift(layout.num_tokens)).exp())
        noises, times = [], []
        for key in keys:
            gen = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/{stream}/{key}".encode()))
            if fixed_t is None:
                times.append(sample_timesteps(1, cfg.get("timestep_sampling", "uniform"),
                                              logit_mean=cfg.get("logit_mean", 0.0),
                                              logit_std=cfg.get("logit_std", 1.0), shift=float(shift), generator=gen))
            else:
                times.append(torch.tensor([float(fixed_t)]))
            noises.append(torch.randn(x0.shape[1:], generator=gen))
        noise = torch.stack(noises).to(device=x0.device, dtype=x0.dtype)  # (B, N, 64)
        return noise, torch.cat(times).to(x0.device)

    def _drop_captions(self, keys: list[str], stream: str, prompt_embeds: torch.Tensor, pooled: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's caption replaced by the empty one with probability ``loss.caption_dropout``, drawn from a
        generator keyed by (seed, stream, sample key) like its noise: independent of ranks and exact on resume."""
        drop = torch.tensor([torch.rand(1, generator=torch.Generator().manual_seed(
            zlib.crc32(f"{self.seed}/{stream}/caption/{key}".encode()))).item() < self.caption_dropout
            for key in keys], device=prompt_embeds.device)  # (B,)
        if not drop.any():
            return prompt_embeds, pooled
        if self._null_text is None:
            self._null_text = self._empty_caption()
        null_embeds, null_pooled = (t.to(device=prompt_embeds.device, dtype=prompt_embeds.dtype) for t in self._null_text)
        prompt_embeds = torch.where(drop[:, None, None], null_embeds, prompt_embeds)  # (B, L, D)
        pooled = torch.where(drop[:, None], null_pooled.to(pooled.dtype), pooled)  # (B, D)
        return prompt_embeds, pooled

    # ---- step -----------------------------------------------------------------------------------------
    def compute_losses(self, batch: dict[str, Any], fixed_t: float | None = None,
                       flow_pairs: str | None = None) -> dict[str, Any]:
        """Eqs. (1)-(7) on one batch. ``fixed_t``: validation at a fixed time with fixed noise; ``flow_pairs``: the
        neighbour pairs of L_flow (default: the run's ``loss.flow_pairs``)."""
        layout = GridLayout(**{k: int(v) for k, v in batch["layout"].items()})
        x0 = self._latents(batch)  # (B, N, 64)
        batch_size = x0.shape[0]
        keys = list(batch.get("__key__") or [f"{self.global_step}-{i}" for i in range(batch_size)])
        stream = f"train/{self.global_step}" if fixed_t is None else "val"
        noise, t = self._noise_and_times(keys, x0, layout, stream, fixed_t)
        x_t, target = add_noise(x0, noise, t)  # eq. (1)-(2)
        prompt_embeds, pooled, text_ids = self._text_conditioning(batch)
        if fixed_t is None and self.caption_dropout > 0:  # training only; validation keeps every caption
            prompt_embeds, pooled = self._drop_captions(keys, stream, prompt_embeds, pooled)
        dtype = next(self.transformer.parameters()).dtype
        guidance = torch.full((batch_size,), float(self.model_cfg.get("guidance_scale", 1.0)), device=self.device)
        pred = self.transformer(
            hidden_states=x_t.to(dtype),
            timestep=t.to(dtype),  # FLUX multiplies t in [0, 1] by 1000 internally
            guidance=guidance.to(dtype),
            pooled_projections=pooled.to(dtype),
            encoder_hidden_states=prompt_embeds.to(dtype),
            txt_ids=text_ids.to(dtype),
            img_ids=layout.image_ids(self.device, dtype),
            return_dict=False,
        )[0]  # (B, N, 64)
        loss_base = base_loss(pred, target)  # eq. (4)
        loss_flow = temporal_flow_loss(pred, target, layout, flow_pairs or self.flow_pairs)  # eq. (5)-(7)
        return {"loss": loss_base + self.alpha * loss_flow, "loss_base": loss_base, "loss_flow": loss_flow,
                "batch_size": batch_size, "image_tokens": x0.shape[1], "text_tokens": prompt_embeds.shape[1]}

    def _training_flops(self, batch_size: int, image_tokens: int, text_tokens: int) -> int:
        """Model FLOPs of this step (:mod:`gridgen.training.flops`), read by the throughput monitor for TFLOP/s and
        MFU; counted once per batch shape (a walk over the transformer's linears). Gradient checkpointing's
        recomputation is not counted: MFU measures useful work, so checkpointing shows as a lower MFU."""
        key = (batch_size, image_tokens, text_tokens)
        if key not in self._flops_cache:
            self._flops_cache[key] = training_flops_per_batch(self.transformer, batch_size, image_tokens, text_tokens,
                                                              full=self.mode == "full")
        return self._flops_cache[key]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.compute_losses(batch)
        self.flops_per_batch = self._training_flops(out["batch_size"], out["image_tokens"], out["text_tokens"])
        self._step_losses = {k: out[k].detach() for k in ("loss_base", "loss_flow")}  # for the non-finite guard
        # Logged tensors stay on the device; Lightning reads them every trainer.log_every_n_steps (no prog_bar=True:
        # that converts to a Python float on every step; GridProgressBar reads the loss every refresh_rate steps).
        log_kw = {"on_step": True, "on_epoch": False, "batch_size": out["batch_size"]}
        self.log("train/loss", out["loss"], **log_kw)
        self.log("train/loss_base", out["loss_base"], **log_kw)
        self.log("train/loss_flow", out["loss_flow"], **log_kw)
        self.log("train/alpha", self.alpha, **log_kw)
        return out["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Held-out L_base and L_flow at fixed times with fixed noise: comparable across runs and ranks. L_flow here is
        always the paper's film-strip one (eq. 7), whatever ``loss.flow_pairs`` the run trains with, so that runs of
        either variant are compared on one measure."""
        times = [float(t) for t in self.loss_cfg.get("val_timesteps", (0.25, 0.5, 0.75))]
        base, flow = [], []
        for t in times:
            out = self.compute_losses(batch, fixed_t=t, flow_pairs="filmstrip")
            kw = {"on_step": False, "on_epoch": True, "sync_dist": True, "batch_size": out["batch_size"]}
            self.log(f"val/loss_base_t{t:g}", out["loss_base"], **kw)
            self.log(f"val/loss_flow_t{t:g}", out["loss_flow"], **kw)
            base.append(out["loss_base"])
            flow.append(out["loss_flow"])
        kw = {"on_step": False, "on_epoch": True, "sync_dist": True, "batch_size": out["batch_size"]}
        self.log("val/loss_base", torch.stack(base).mean(), prog_bar=True, **kw)
        self.log("val/loss_flow", torch.stack(flow).mean(), **kw)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return
        # One fused kernel over all trained tensors (before clipping); a DTensor (FSDP2) norm is reduced to the
        # unsharded norm by full_tensor().
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params])).float())
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        self._guard_nonfinite(norm, optimizer, params)

    def _guard_nonfinite(self, grad_norm: torch.Tensor, optimizer: torch.optim.Optimizer,
                         params: list[torch.nn.Parameter]) -> None:
        """Stop (or skip the update) before a non-finite loss or gradient can reach the trained weights.

        The one host sync per step that gridgen makes: a single bool over the loss terms and the gradient norm.
        Raising here happens before ``optimizer.step()``, so the weights, the last checkpoint and every export
        stay finite. Skipping sets the gradients to None, which AdamW (torch and 8-bit) treats as "no update"
        (no moment or weight-decay change either).
        """
        terms = {**self._step_losses, "grad_norm": grad_norm.detach()}
        values = torch.stack([v.float().reshape(()) for v in terms.values()])
        finite = bool(torch.isfinite(values).all())
        if (trainer := self.attached_trainer()) is not None:  # every rank takes the same decision: no hang
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return
        bad = [f"{name}={value:g}" for name, value in zip(terms, values.tolist(), strict=True)
               if not math.isfinite(value)] or ["values on another rank"]
        step = self.global_step
        if self.nonfinite["action"] == "skip" and self.nonfinite_skips < int(self.nonfinite["max_skips"]):
            self.nonfinite_skips += 1
            for param in params:
                param.grad = None
            log.warning("step %d: non-finite %s; update skipped (%d of nonfinite.max_skips=%d)", step,
                        ", ".join(bad), self.nonfinite_skips, int(self.nonfinite["max_skips"]))
            self.log("train/nonfinite_skips", float(self.nonfinite_skips), on_step=True, on_epoch=False)
            return
        skipped = f" after {self.nonfinite_skips} skipped steps" if self.nonfinite_skips else ""
        raise NonFiniteError(
            f"step {step}: non-finite {', '.join(bad)}{skipped}; the weights were not updated and checkpoints up to "
            f"the last saved step are intact. Try model.attention_backend=sdpa_math (or another kernel), "
            f"trainer.precision=32-true, a lower optim.lr, or nonfinite.action=skip nonfinite.max_skips=N"
        )

    # ---- optimiser ------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        params = self.trainable_parameters()
        if not params:
            raise RuntimeError("no trainable parameters: configure_model has not run")
        optimizer = build_optimizer(params, self.optim_cfg)  # optim.name: adamw | adamw8bit
        scheduler = build_scheduler(optimizer, self.optim_cfg, self.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
