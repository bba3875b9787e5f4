#!/usr/bin/env python
"""Training-step benchmark: Lightning overhead, the cost of L_flow, memory, LoRA size, and speed-up variants.

    python bench/bench_train.py [--model tiny|small-random|dev-random] [--steps 12] [--warmup 2] [--repeats 3]
                                [--batch-size 1] [--device cpu|cuda] [--dtype float32|bfloat16]
                                [--compile] [--quantization SCHEME] [--optim adamw|adamw8bit]
                                [--gradient-checkpointing] [--sections ...] [--quick] [--no-write]

Models (random weights, LoRA attached by ``GridModule.adopt_transformer`` as a run attaches it, conf/adapter/lora.yaml;
batches carry cached latents and random text embeddings, so the VAE and text encoders are in no timing):

- ``tiny``: 4 double + 4 single blocks, 4 heads x 64 = width 256, on a 4x4 grid of 128 px cells = 512x512 px =
  1024 tokens, 32 text tokens (``--quick``: the embedded tiny transformer on a 2x2 grid of 64 px = 64 tokens);
- ``dev-random``: FLUX.1-dev's transformer (19 double + 38 single blocks, 24 heads x 128), bf16, on a 4x4 grid
  of 256 px cells = 1024x1024 px = 4096 image tokens + 512 text tokens (a GPU run, ~24 GB of weights);
- ``small-random``: the dev-random code path on a 2 + 2 block transformer (a CPU check of it);
- ``mini``: the miniature's transformer (``MINI_TRANSFORMER_CONFIG``: 2 double + 4 single blocks, 4 heads x 32) with
  ``experiment=mini``'s LoRA, loss and alpha, on its 4x4 grid of 64 px cells = 256 tokens, 20 text tokens (what a
  `make mini` run steps; pass ``--batch-size 8``, the preset's batch).

Sections (``--sections``; default all for tiny, ``variants`` for the others):

1. framework: a ``lightning.Trainer`` (conf/trainer + conf/strategy with the run's per-step callbacks
   StepTimer, AlphaSchedule, GridThroughput, RunSummary; no logger, no checkpoints) fitting GridModule on a loader that
   repeats the batch, timed between consecutive ``on_train_batch_start`` (data fetch, hooks, logging, clipping,
   optimiser and scheduler all in), against a bare loop ``compute_losses -> backward -> clip -> optimiser step
   -> zero_grad -> scheduler step`` on the same module: A. in blocks of ``--steps`` (order alternating per
   repeat), B. step by step in one fit (a bare step after every Lightning step, subtracted from its interval).
2. flow: bare steps with alpha > 0, alpha = 0 (L_flow computed, weighted 0, as GridModule does) and L_flow
   skipped, interleaved step by step in rotating order; and the two losses alone on (B, N, 64) tensors.
3. memory: peak memory of one step of each (CPU: peak RSS, VmHWM reset per step; CUDA: allocator peak), and
   the LoRA file (``save_lora``) against the frozen parameters.
4. hot: GridModule's work outside the transformer (noise draws, position ids, grad-norm logging), alone.
5. variants: the bare step of the baseline and of each requested variant (``--compile``: regional compilation
   of the repeated blocks, ``--quantization``: frozen base quantized, ``--optim adamw8bit``,
   ``--gradient-checkpointing``), each a module built as a run builds it: all stepped in turn, one step each
   in rotating order (dev-random: one variant in memory at a time): step time, ratio to the baseline,
   TFLOP/s and MFU from ``gridgen.training.flops`` (model FLOPs: recomputation not counted; peak from
   ``peak_flops`` of the device) and the memory the variant adds (weights, optimiser state, activations).
   A variant that cannot run here reports ``skipped: <reason>``.
6. malloc (CPU): the baseline's bare step in child processes of this script, with glibc's malloc tuned as
   gridgen's CPU runs tune it (``gridgen.runtime.tune_malloc``) and with glibc's defaults (``--no-malloc-tune``),
   the two alternating, ``--repeats`` pairs in alternating order: median step of each, ratio = median over the
   pairs of (defaults / tuned).

Ratios of variants run step by step are medians of per-pair ratios of neighbouring steps (robust to a drifting
load); those of blocks, medians over repeats of ratios of median step times. Results go to the ``train``
section of bench/RESULTS.md, one block per model / device / dtype / batch size.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import harness as h  # first: sets the offline environment before diffusers is imported
import lightning as L  # noqa: N812
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

import gridgen.training.module as module_lib
from gridgen.config import CONF_DIR, register_resolvers
from gridgen.embedded import TINY_FLUX_CONFIG
from gridgen.embedded.mini_model import MINI_TRANSFORMER_CONFIG
from gridgen.layout import GridLayout
from gridgen.losses import base_loss, temporal_flow_loss
from gridgen.models.lora import LORA_FILE, save_lora
from gridgen.models.quantization import SCHEMES
from gridgen.training.flops import peak_flops, training_flops_per_batch
from gridgen.training.module import GridModule

MODELS: dict[str, dict[str, Any]] = {  # flux config, layout, text tokens (full run, then --quick)
    "tiny": {"config": {**TINY_FLUX_CONFIG, "num_layers": 4, "num_single_layers": 4, "attention_head_dim": 64,
                        "joint_attention_dim": 64, "pooled_projection_dim": 64, "axes_dims_rope": (16, 24, 24)},
             "quick_config": TINY_FLUX_CONFIG, "layout": GridLayout(4, 4, 128, 128),
             "quick_layout": GridLayout(2, 2, 64, 64), "text": 32, "quick_text": 32},
    "small-random": {"config": h.SMALL_FLUX_CONFIG, "quick_config": h.SMALL_FLUX_CONFIG,
                     "layout": GridLayout(4, 4, 128, 128), "quick_layout": GridLayout(2, 2, 64, 64),
                     "text": 512, "quick_text": 32},
    "dev-random": {"config": h.DEV_FLUX_CONFIG, "quick_config": h.SMALL_FLUX_CONFIG,
                   "layout": GridLayout(4, 4, 256, 256), "quick_layout": GridLayout(2, 2, 64, 64),
                   "text": 512, "quick_text": 32},
    "mini": {"config": MINI_TRANSFORMER_CONFIG, "quick_config": TINY_FLUX_CONFIG, "layout": GridLayout(4, 4, 64, 64),
             "quick_layout": GridLayout(2, 2, 64, 64), "text": 20, "quick_text": 32, "overrides": ["experiment=mini"]},
}
SECTIONS = ("framework", "flow", "memory", "hot", "variants", "malloc")
RUN_CALLBACKS = ("step_timer", "alpha", "throughput", "summary")  # conf/callbacks acting on every step (no checkpoints)
TARGET_FRAMEWORK = 1.05
TARGET_FLOW = 1.03

log = logging.getLogger("bench")


# ---------------------------------------------------------------------------------------------- setup
@dataclass
class Bench:
    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    cfg: Any  # the composed train config
    flux_config: dict[str, Any]
    layout: GridLayout
    batch: dict[str, Any]
    tmp: Path
    module: GridModule | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def precision(self) -> str:
        return "32-true" if self.dtype == torch.float32 else "bf16-mixed"

    @property
    def clip(self) -> float | None:
        value = self.cfg.trainer.get("gradient_clip_val")
        return float(value) if value else None

    @property
    def alpha(self) -> float:
        return float(self.cfg.callbacks.alpha.alpha_max)

    def sync(self) -> None:
        h.sync(self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16-mixed":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def build_module(self, model: dict[str, Any] | None = None, optim: dict[str, Any] | None = None) -> GridModule:
        """GridModule as a run builds it, with ``configure_model`` replaced by adopting a random transformer
        (frozen base in the benchmark's dtype, LoRA with its seeded init, adapters in fp32)."""
        cfg = self.cfg
        module = GridModule(model=OmegaConf.merge(cfg.model, model or {}), lora=cfg.lora,
                            optim=OmegaConf.merge(cfg.optim, optim or {}), loss=cfg.loss, seed=cfg.seed,
                            max_steps=cfg.trainer.max_steps)
        module.adopt_transformer(h.random_transformer(self.flux_config, self.device, self.dtype, self.args.seed))
        module.alpha = self.alpha
        return module.to(self.device)


def build_bench(args: argparse.Namespace, tmp: Path) -> Bench:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    spec = MODELS[args.model]
    flux_config = spec["quick_config" if args.quick else "config"]
    layout = spec["quick_layout" if args.quick else "layout"]
    text_tokens = spec["quick_text" if args.quick else "text"]
    register_resolvers()  # the real configs, as gridgen.train composes them; the weights are built here
    overrides = [*spec.get("overrides", ["model=flux_tiny"]), f"paths.root_dir={tmp}", f"paths.output_dir={tmp}/run",
                 "logger=none",
                 f"strategy={'gpu' if device.type == 'cuda' else 'cpu'}", "trainer.enable_progress_bar=false",
                 f"trainer.max_steps={args.warmup + args.steps + 1}", f"model.max_sequence_length={text_tokens}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    gen = torch.Generator().manual_seed(args.seed)
    b = args.batch_size
    batch = {
        "__key__": [f"bench-{i:04d}" for i in range(b)],
        "caption": [layout.caption("a red ball moves right") for _ in range(b)],  # the datamodule always has it
        "layout": layout.to_dict(),
        "latents": torch.randn(b, layout.num_tokens, flux_config["in_channels"], generator=gen),  # (B, N, 64)
        "prompt_embeds": torch.randn(b, text_tokens, flux_config["joint_attention_dim"], generator=gen),
        "pooled_prompt_embeds": torch.randn(b, flux_config["pooled_projection_dim"], generator=gen),
    }
    return Bench(args, device, dtype, cfg, flux_config, layout, batch, tmp)


# ---------------------------------------------------------------------------------------------- the two loops
class BareLoop:
    """zero_grad -> compute_losses -> backward -> clip -> optimiser step -> zero_grad -> LR scheduler step, on a
    module, with the optimiser and schedule of its configure_optimizers()."""

    def __init__(self, bench: Bench, module: GridModule | None = None) -> None:
        self.bench, self.module = bench, module or bench.module
        self.module.to(bench.device).train()  # Lightning's teardown leaves the module on the CPU
        optim = self.module.configure_optimizers()  # the same optimiser (and LR schedule) that Lightning gets
        self.optimizer, self.scheduler = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
        self.params = self.module.trainable_parameters()

    def step(self) -> float:
        return h.timed(self._step, self.bench.device)

    def _step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)  # no-op here; inside a fit it drops Lightning's gradients
        with self.bench.autocast():
            out = self.module.compute_losses(self.bench.batch)
        out["loss"].backward()
        if self.bench.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.bench.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()


def bare_block(bench: Bench, warmup: int, steps: int, probe: h.MemoryProbe | None = None) -> list[float]:
    loop = BareLoop(bench)
    for _ in range(warmup):
        loop.step()
    times = []
    for _ in range(steps):
        if probe:
            probe.start()
        times.append(loop.step())
        if probe:
            probe.stop()
    return times


class RepeatBatch(torch.utils.data.IterableDataset):
    def __init__(self, batch: dict[str, Any]) -> None:
        self.batch = batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield self.batch


class StepClock(L.Callback):
    """Records ``perf_counter`` at every ``on_train_batch_start`` (first in the callback list)."""

    def __init__(self, sync: Callable[[], None], probe: h.MemoryProbe | None = None, probe_steps: tuple = ()) -> None:
        self.sync, self.probe, self.probe_steps = sync, probe, probe_steps
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.sync()
        self.starts.append(time.perf_counter())
        if self.probe is not None and batch_idx in self.probe_steps:
            self.probe.start()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.probe is not None and batch_idx in self.probe_steps:
            self.probe.stop()


def lightning_block(bench: Bench, warmup: int, steps: int, probe: h.MemoryProbe | None = None,
                    extra: tuple[L.Callback, ...] = ()) -> list[float]:
    """``trainer.fit`` for warmup + steps + 1 steps; returns the ``steps`` timed start-to-start intervals."""
    clock = StepClock(bench.sync, probe, tuple(range(warmup, warmup + steps)) if probe else ())
    callbacks = [clock, *(instantiate(bench.cfg.callbacks[name]) for name in RUN_CALLBACKS), *extra]
    trainer: L.Trainer = instantiate(
        bench.cfg.trainer, callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, max_steps=warmup + steps + 1, precision=bench.precision,
        default_root_dir=str(bench.tmp / "run"))
    loader = torch.utils.data.DataLoader(RepeatBatch(bench.batch), batch_size=None, num_workers=0)
    trainer.fit(bench.module, train_dataloaders=loader)
    intervals = [b - a for a, b in zip(clock.starts, clock.starts[1:], strict=False)]
    return intervals[warmup:warmup + steps]


@contextlib.contextmanager
def flow_variant(bench: Bench, alpha: float, skip_flow: bool) -> Iterator[None]:
    """compute_losses at ``alpha``; ``skip_flow``: L_flow not computed at all (what skipping it would cost)."""
    original = module_lib.temporal_flow_loss
    bench.module.alpha = alpha
    if skip_flow:
        module_lib.temporal_flow_loss = lambda pred, target, layout, pairs="filmstrip": pred.new_zeros(
            (), dtype=torch.float32)
    try:
        yield
    finally:
        module_lib.temporal_flow_loss = original
        bench.module.alpha = bench.alpha


def flow_variants(bench: Bench) -> dict[str, Callable[[], contextlib.AbstractContextManager]]:
    return {f"alpha={bench.alpha:g} (L_base + alpha L_flow)": lambda: flow_variant(bench, bench.alpha, False),
            "alpha=0 as implemented (L_flow computed, weighted 0)": lambda: flow_variant(bench, 0.0, False),
            "L_base only (L_flow not computed)": lambda: flow_variant(bench, 0.0, True)}


# ---------------------------------------------------------------------------------------------- 1. framework
class PairedBareStep(L.Callback):
    """One bare-loop step (its own optimiser, same module) after every Lightning step: A B A B step by step."""

    def __init__(self, bench: Bench) -> None:
        self.bench, self.loop, self.times = bench, None, []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.loop = BareLoop(self.bench)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        with torch.enable_grad():
            self.times.append(self.loop.step())


def measure_framework(bench: Bench) -> dict[str, Any]:
    a = bench.args
    paired_cb, n = PairedBareStep(bench), a.repeats * a.steps
    intervals = lightning_block(bench, a.warmup, n, extra=(paired_cb,))
    bare = paired_cb.times[a.warmup:a.warmup + n]
    light = [t - b for t, b in zip(intervals, bare, strict=True)]  # the interval holds the bare step too
    ratios = h.pair_ratios(light, bare)
    paired = {"lightning": light, "bare": bare, "ratio": h.median(ratios),
              "overhead": h.median(t - b for t, b in zip(light, bare, strict=True)),
              "ratios": [h.median(ratios[i:i + a.steps]) for i in range(0, n, a.steps)]}
    blocks: dict[str, list[float]] = {"lightning": [], "bare": []}
    block_ratios = []
    for rep in range(a.repeats):
        medians = {}
        for name in h.rotation(["lightning", "bare"], rep):
            times = (lightning_block if name == "lightning" else bare_block)(bench, a.warmup, a.steps)
            blocks[name] += times
            medians[name] = h.median(times)
            log.info("framework repeat %d %-9s median %s ms", rep, name, h.ms(medians[name]))
        block_ratios.append(h.ratio(medians["lightning"], medians["bare"]))
    return {**blocks, "ratios": block_ratios, "ratio": h.median(block_ratios), "paired": paired,
            "overhead": paired["overhead"]}


# ---------------------------------------------------------------------------------------------- 2. L_flow
def measure_flow(bench: Bench) -> dict[str, Any]:
    a = bench.args
    variants = flow_variants(bench)
    loop = BareLoop(bench)

    def step_in(name: str) -> Callable[[], None]:
        def run() -> None:
            with variants[name]():
                loop._step()
        return run

    rounds = h.interleaved({name: step_in(name) for name in variants}, a.warmup + a.repeats * a.steps,
                           device=bench.device)
    times = {name: [r[0] for r in v[a.warmup:]] for name, v in rounds.items()}
    flow, alpha0, base = list(variants)

    def per_repeat(x: str, y: str) -> list[float]:
        ratios = h.pair_ratios(times[x], times[y])
        return [h.median(ratios[i:i + a.steps]) for i in range(0, len(ratios), a.steps)]

    return {"names": list(variants), "times": times, "ratios_flow_vs_base": per_repeat(flow, base),
            "ratio_flow_vs_base": h.median(h.pair_ratios(times[flow], times[base])),
            "ratio_flow_vs_alpha0": h.median(h.pair_ratios(times[flow], times[alpha0])),
            "ratio_alpha0_vs_base": h.median(h.pair_ratios(times[alpha0], times[base]))}


def measure_losses(bench: Bench) -> dict[str, float]:
    """L_base vs L_base + alpha L_flow, forward + backward, on (B, N, 64) tensors like the transformer's output."""
    gen = torch.Generator().manual_seed(bench.args.seed + 1)
    shape = (bench.args.batch_size, bench.layout.num_tokens, bench.flux_config["in_channels"])  # (B, N, 64)
    pred = torch.randn(shape, generator=gen).to(bench.device, bench.dtype).requires_grad_(True)
    target = torch.randn(shape, generator=gen).to(bench.device)

    def only_base() -> None:
        pred.grad = None
        base_loss(pred, target).backward()

    def with_flow() -> None:
        pred.grad = None
        (base_loss(pred, target) + bench.alpha * temporal_flow_loss(pred, target, bench.layout)).backward()

    rounds, inner = (5, 5) if bench.args.quick else (15, 20)
    res = h.best_and_median({"base": only_base, "flow": with_flow}, rounds, inner, bench.device)
    (base_med, base_best), (flow_med, flow_best) = res["base"], res["flow"]
    return {"base": base_med, "flow": flow_med, "base_best": base_best, "flow_best": flow_best,
            "ratio": h.ratio(flow_best, base_best), "ratio_median": h.ratio(flow_med, base_med),
            "extra": flow_best - base_best, "extra_median": flow_med - base_med, "rounds": rounds}


# ---------------------------------------------------------------------------------------------- 3. memory
def measure_memory(bench: Bench) -> dict[str, Any]:
    """One measured step (after one warm step) per variant; the probe resets the peak at the step's start."""
    probe = h.MemoryProbe(bench.device)
    lightning_block(bench, 1, 1, probe)
    out: dict[str, Any] = {"gridgen Lightning step": (probe.peaks[-1], probe.deltas[-1])}
    bare_block(bench, 1, 1, probe)
    out["bare loop step"] = (probe.peaks[-1], probe.deltas[-1])
    loop = BareLoop(bench)
    for name, ctx in flow_variants(bench).items():
        with ctx():
            loop.step()
            probe.start()
            loop.step()
            probe.stop()
        out[f"bare, {name}"] = (probe.peaks[-1], probe.deltas[-1])
    transformer = bench.module.transformer
    params = list(transformer.parameters())
    path = save_lora(bench.tmp / "lora", transformer, {"gridgen_bench": "1"})
    checkpoint = {"file": float(path.stat().st_size),
                  "base": float(sum(p.numel() * p.element_size() for p in params if not p.requires_grad)),
                  "lora_params": float(sum(p.numel() * p.element_size() for p in params if p.requires_grad)),
                  "lora_numel": sum(p.numel() for p in params if p.requires_grad)}
    return {"steps": out, "kind": probe.kind, "checkpoint": checkpoint}


# ---------------------------------------------------------------------------------------------- 4. hot path
class LogCost(L.Callback):
    """Times ``LightningModule.log`` (on_step, a 0-d tensor) inside a fit (training_step calls it 4 times a step,
    on_before_optimizer_step once)."""

    def __init__(self, warmup: int, calls: int) -> None:
        self.warmup, self.calls, self.per_call = warmup, calls, []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if batch_idx < self.warmup:
            return
        value = torch.zeros((), device=pl_module.device)
        start = time.perf_counter()
        for _ in range(self.calls):
            pl_module.log("bench/log_cost", value, on_step=True, on_epoch=False, batch_size=1)
        self.per_call.append((time.perf_counter() - start) / self.calls)


def measure_hot_path(bench: Bench) -> dict[str, Any]:
    """Pieces of GridModule's step outside the transformer, each timed on its own (median and best per call)."""
    module, batch, layout, device = bench.module, bench.batch, bench.layout, bench.device
    x0 = batch["latents"].to(device)
    x8 = torch.randn(8, *x0.shape[1:], device=device)
    keys, keys8 = list(batch["__key__"]), [f"bench-{i:04d}" for i in range(8)]
    # GridModule._noise_and_times(keys, x0, layout[, stream]) as compute_losses calls it for a training step
    stream = {"stream": "train/0"} if "stream" in inspect.signature(module._noise_and_times).parameters else {}

    def batched_noise(x: torch.Tensor) -> Callable[[], Any]:
        def fn() -> Any:  # one generator, one randn for the whole batch: the floor for drawing the noise
            gen = torch.Generator(device=x.device).manual_seed(0)
            return torch.randn(x.shape, generator=gen, device=x.device), torch.rand(x.shape[0], generator=gen,
                                                                                     device=x.device)
        return fn

    loop = BareLoop(bench)  # gradients for the grad-norm pieces
    with bench.autocast():
        module.compute_losses(batch)["loss"].backward()

    def grad_norm_log() -> Any:  # the expression in GridModule.on_before_optimizer_step
        norms = [p.grad.detach().float().norm() for p in module.trainable_parameters() if p.grad is not None]
        return torch.stack(norms).norm()

    b, n = bench.args.batch_size, len(loop.params)
    pieces = {  # label -> the piece, as GridModule runs it
        f"_noise_and_times, B={b} (one torch.Generator + crc32 per sample, CPU then .to(device))":
            lambda: module._noise_and_times(keys, x0, layout, **stream),
        f"  floor: one generator, one batched randn + rand, B={b}": batched_noise(x0),
        "_noise_and_times, B=8": lambda: module._noise_and_times(keys8, x8, layout, **stream),
        "  floor: batched, B=8": batched_noise(x8),
        "layout.image_ids (rebuilt every step)": lambda: layout.image_ids(device, bench.dtype),
        "trainable_parameters() (walks all parameters)": module.trainable_parameters,
        f"grad-norm logging in on_before_optimizer_step ({n} tensors, includes trainable_parameters())": grad_norm_log,
        "  the same norm as computed again by gradient clipping":
            lambda: torch.nn.utils.clip_grad_norm_(loop.params, float("inf")),
    }
    rounds, inner = (3, 3) if bench.args.quick else (9, 10)
    res = h.best_and_median(pieces, rounds, inner, device)
    loop.optimizer.zero_grad(set_to_none=True)
    log_cost = LogCost(warmup=1, calls=20 if bench.args.quick else 50)
    lightning_block(bench, 1, 2, extra=(log_cost,))
    res["one LightningModule.log call (5 per step: 4 in training_step, 1 in on_before_optimizer_step)"] = (
        h.median(log_cost.per_call), min(log_cost.per_call))
    return {"times": res, "rounds": rounds}


# ---------------------------------------------------------------------------------------------- 5. variants
def requested_variants(args: argparse.Namespace) -> dict[str, dict[str, dict[str, Any]]]:
    """name -> GridModule config overrides, as a run sets them (model.compile, model.quantization, optim.name,
    model.gradient_checkpointing). The baseline has every requested setting off, whatever the model's preset
    composes (``experiment=mini`` compiles: without this its baseline would be the compile variant itself),
    and each variant differs from it in its one setting."""
    changes: dict[str, tuple[str, str, Any, Any]] = {}  # name -> (group, key, off, on)
    if args.compile:
        changes["compile (regional, repeated blocks)"] = ("model", "compile", False, True)
    if args.quantization:
        changes[f"quantization {args.quantization}"] = ("model", "quantization", None, args.quantization)
    if args.optim != "adamw":
        changes[f"optim {args.optim}"] = ("optim", "name", "adamw", args.optim)
    if args.gradient_checkpointing:
        changes["gradient checkpointing"] = ("model", "gradient_checkpointing", False, True)
    baseline: dict[str, dict[str, Any]] = {}
    for group, key, off, _ in changes.values():
        baseline.setdefault(group, {})[key] = off
    variants = {"baseline": baseline}
    for name, (group, key, _, on) in changes.items():
        variant = {g: dict(values) for g, values in baseline.items()}
        variant[group][key] = on
        variants[name] = variant
    return variants


def measure_variants(bench: Bench) -> dict[str, Any]:
    """Each variant built once and warmed up (the memory it adds measured meanwhile), then all stepped in turn,
    one step each in rotating order; FLUX.1-dev-sized variants (~24 GB each) one after another instead."""
    a = bench.args
    together = a.model != "dev-random"
    variants = requested_variants(a)
    probe, loops, times = h.MemoryProbe(bench.device), {}, {}
    memory: dict[str, float] = {}
    skipped: dict[str, str] = {}
    flops: dict[str, tuple[int, int]] = {}
    bench.module = None
    for name, overrides in variants.items():
        gc.collect()
        if bench.device.type == "cuda":
            torch.cuda.empty_cache()
        probe.start()
        try:
            loop = BareLoop(bench, bench.build_module(**overrides))
            for _ in range(max(1, a.warmup)):  # compilation happens here
                loop.step()
        except Exception as e:  # noqa: BLE001 - a variant this machine cannot run is reported, not fatal
            skipped[name] = h.skip_reason(e)
            log.info("variant %s: skipped: %s", name, skipped[name])
            continue
        probe.stop()
        memory[name] = probe.deltas[-1]  # weights, optimiser state and a step's activations
        counts = (a.batch_size, bench.layout.num_tokens, bench.batch["prompt_embeds"].shape[1])
        checkpointing = bool(overrides.get("model", {}).get("gradient_checkpointing", False))
        flops[name] = (training_flops_per_batch(loop.module.transformer, *counts),
                       training_flops_per_batch(loop.module.transformer, *counts, gradient_checkpointing=checkpointing))
        if together:
            loops[name] = loop
        else:
            times[name] = [loop.step() for _ in range(a.repeats * a.steps)]
            del loop
    if together:
        rounds = h.interleaved({name: loop._step for name, loop in loops.items()}, a.repeats * a.steps,
                               device=bench.device)
        times = {name: [r[0] for r in v] for name, v in rounds.items()}
    ratios = {}
    for name in times:
        if "baseline" not in times:
            ratios[name] = float("nan")
        elif together:  # neighbouring steps share the machine's load
            ratios[name] = h.median(h.pair_ratios(times[name], times["baseline"]))
        else:
            ratios[name] = h.ratio(h.median(times[name]), h.median(times["baseline"]))
    dtype = "tfloat32" if bench.dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest" \
        else bench.dtype
    peak = peak_flops(h.device_name(bench.device), dtype) if bench.device.type == "cuda" else None
    return {"variants": list(variants), "times": times, "ratios": ratios, "memory": memory, "skipped": skipped,
            "flops": flops, "peak_flops": peak, "together": together, "memory_kind": probe.kind}


def child_steps(a: argparse.Namespace, tuned: bool) -> list[float]:
    """The baseline's bare-step seconds in a new process of this script (``--child-malloc``), with or without
    glibc's malloc tuned; the environment's own MALLOC_* settings removed, so that the defaults are glibc's."""
    argv = [sys.executable, __file__, "--child-malloc", "--model", a.model, "--batch-size", str(a.batch_size),
            "--dtype", a.dtype, "--steps", str(a.steps), "--warmup", str(a.warmup), "--repeats", "1",
            "--seed", str(a.seed), *(["--threads", str(a.threads)] if a.threads else []),
            *(["--quick"] if a.quick else []), *([] if tuned else ["--no-malloc-tune"])]
    env = {k: v for k, v in os.environ.items() if k not in h.MALLOC_ENV}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"bench child {' '.join(argv[2:])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["baseline"]


def measure_malloc(bench: Bench) -> dict[str, Any]:
    """Pairs of child processes, tuned and glibc's defaults, the order alternating from pair to pair."""
    a = bench.args
    if bench.device.type != "cpu":
        return {"skipped": "glibc's malloc serves the CPU's tensors; on CUDA the caching allocator does"}
    medians: dict[str, list[float]] = {"tuned": [], "defaults": []}
    for r in range(a.repeats):
        for name in h.rotation(["tuned", "defaults"], r):
            medians[name].append(h.median(child_steps(a, tuned=name == "tuned")))
    ratios = h.pair_ratios(medians["defaults"], medians["tuned"])
    return {"medians": medians, "ratio": h.median(ratios), "ratios": ratios}


# ---------------------------------------------------------------------------------------------- report
def render(bench: Bench, results: dict[str, Any], phases: dict[str, float], load_before: str) -> tuple[str, str]:
    a, fc, layout = bench.args, bench.flux_config, bench.layout
    key = f"{a.model}-{bench.device.type}-{a.dtype}-b{a.batch_size}".removeprefix("tiny-") + ("-quick" if a.quick else "")
    if set(a.sections) != set(SECTIONS):  # a partial run gets its own block, next to the full one
        key += "-" + "+".join(a.sections)
    lines = [
        f"### {'' if a.model == 'tiny' else a.model + ' / '}{bench.device.type} / {a.dtype} / batch {a.batch_size}"
        + (" (quick)" if a.quick else "") + ("" if set(a.sections) == set(SECTIONS) else f" ({', '.join(a.sections)})"),
        "",
        *h.environment_lines(bench.device, ("lightning", "diffusers", "peft"), load_before),
        f"- wall time {sum(phases.values()):.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items())
        + f"); glibc malloc tuned: {'yes' if a.malloc_tuned else 'no'}",
        f"- model: {h.describe_flux(fc)}, guidance_embeds={fc['guidance_embeds']}; frozen base {a.dtype}, "
        f"LoRA rank {bench.cfg.lora.rank} (fp32); text {bench.batch['prompt_embeds'].shape[1]} tokens",
        f"- grid: layout {layout.name} of {layout.cell_height} px cells = {layout.height}x{layout.width} px = "
        f"{layout.token_rows}x{layout.token_cols} = {layout.num_tokens} tokens x {fc['in_channels']} channels; "
        f"precision {bench.precision}, gradient_clip_val {bench.clip}, lr {bench.cfg.optim.lr}",
        f"- timing: {a.repeats} repeats x {a.steps} steps per variant after {a.warmup} warm-up steps; medians. "
        "Ratios: variants interleaved step by step (1 B, 2): median of the per-pair ratios of neighbouring steps; "
        "in blocks (1 A, 5): median over repeats of (median A / median B)",
    ]
    targets: list[list[str]] = []
    if "framework" in results:
        lines += render_framework(results["framework"], a, targets)
    if "flow" in results:
        lines += render_flow(results["flow"], results["losses"], targets)
    if "memory" in results:
        lines += render_memory(results["memory"], a)
    if "hot" in results:  # against the framework section's bare step and Lightning overhead
        fw = results.get("framework", {"bare": [], "overhead": float("nan")})
        lines += render_hot(results["hot"], h.median(fw["bare"]), fw["overhead"])
    if "variants" in results:
        lines += render_variants(results["variants"], bench)
    if "malloc" in results:
        lines += render_malloc(results["malloc"], a)
    if targets:
        lines += ["", "#### Targets", "", *h.table(["check", "measured", "target", "result"], targets, "lrrl")]
    if bench.notes:
        lines += ["", "Notes:", *[f"- {n}" for n in bench.notes]]
    return key, "\n".join(lines)


def render_framework(fw: dict[str, Any], a: argparse.Namespace, targets: list[list[str]]) -> list[str]:
    paired, per = fw["paired"], a.steps

    def row(name: str, xs: list[float]) -> list[Any]:
        reps = ", ".join(h.ms(h.median(xs[i:i + per])) for i in range(0, len(xs), per))
        return [name, h.ms(h.median(xs)), h.spread_ms(xs), len(xs), reps]

    targets += [h.target_row("gridgen step / bare step (A, blocks)", fw["ratio"], TARGET_FRAMEWORK),
                h.target_row("gridgen step / bare step (B, step by step)", paired["ratio"], TARGET_FRAMEWORK)]
    return ["", "#### 1. Framework overhead: gridgen (Lightning) step vs bare PyTorch loop", "",
            *h.table(["variant", "median step (ms)", "p25-p75 (ms)", "steps", "per-repeat medians (ms)"], [
                row("A. blocks: bare loop (zero_grad, compute_losses, backward, clip, AdamW, zero_grad, LR step)",
                    fw["bare"]),
                row("A. blocks: gridgen, Trainer.fit + AlphaSchedule, GridThroughput, RunSummary", fw["lightning"]),
                row("B. one fit, step by step: bare step run after each Lightning step", paired["bare"]),
                row("B. one fit, step by step: gridgen step (interval minus that bare step)", paired["lightning"]),
            ], "lrrrl"), "",
            f"A: separate fits and bare loops in blocks, order alternating per repeat; per-repeat ratios "
            f"{', '.join(f'{r:.3f}' for r in fw['ratios'])}; Lightning adds "
            f"{h.ms(h.median(fw['lightning']) - h.median(fw['bare']))} ms per step (difference of medians).",
            f"B: per-repeat medians of the per-pair ratios {', '.join(f'{r:.3f}' for r in paired['ratios'])}; "
            f"Lightning adds {h.ms(fw['overhead'])} ms per step (median of per-pair differences).", "",
            f"**ratio gridgen/bare (A, blocks) = {fw['ratio']:.3f}**", "",
            f"**ratio gridgen/bare (B, step by step) = {paired['ratio']:.3f}**"]


def render_flow(flow: dict[str, Any], losses: dict[str, float], targets: list[list[str]]) -> list[str]:
    base_step = h.median(flow["times"][flow["names"][2]])
    estimate = h.ratio(base_step + losses["extra"], base_step)
    targets += [
        h.target_row("step alpha>0 / alpha=0 (as implemented)", flow["ratio_flow_vs_alpha0"], TARGET_FLOW),
        h.target_row("step alpha>0 / L_base only (true L_flow cost)", flow["ratio_flow_vs_base"], TARGET_FLOW),
        h.target_row("same, from the losses alone: (step + L_flow's extra) / step", estimate, TARGET_FLOW, digits=4)]
    return ["", "#### 2. L_flow cost", "",
            *h.table(["variant (bare loop, interleaved step by step)", "median step (ms)", "p25-p75 (ms)", "steps"],
                     [[n, h.ms(h.median(flow["times"][n])), h.spread_ms(flow["times"][n]), len(flow["times"][n])]
                      for n in flow["names"]], "lrrr"), "",
            "Per-repeat medians of the per-cycle ratios alpha>0 / L_base only: "
            f"{', '.join(f'{r:.3f}' for r in flow['ratios_flow_vs_base'])}; alpha=0 as implemented / L_base only: "
            f"{flow['ratio_alpha0_vs_base']:.3f}.", "",
            *h.table(["losses alone, forward + backward on (B, N, 64)", f"best of {losses['rounds']} (us)",
                      "median (us)"],
                     [["L_base", h.us(losses["base_best"]), h.us(losses["base"])],
                      ["L_base + alpha L_flow", h.us(losses["flow_best"]), h.us(losses["flow"])]], "lrr"), "",
            f"L_flow adds {h.us(losses['extra'])} us per step (median {h.us(losses['extra_median'])} us) = "
            f"{100 * h.ratio(losses['extra'], base_step):.2f} % of a {h.ms(base_step)} ms step.", "",
            f"**ratio step alpha>0 / L_base only = {flow['ratio_flow_vs_base']:.3f}**", "",
            f"**ratio step alpha>0 / alpha=0 = {flow['ratio_flow_vs_alpha0']:.3f}**", "",
            f"**ratio losses alone (L_base + L_flow) / L_base = {losses['ratio']:.3f}** (best of rounds; medians "
            f"{losses['ratio_median']:.3f})"]


def render_memory(mem: dict[str, Any], a: argparse.Namespace) -> list[str]:
    steps, ckpt = mem["steps"], mem["checkpoint"]
    light, bare = steps["gridgen Lightning step"], steps["bare loop step"]
    flow_names = [n for n in steps if n.startswith("bare, ")]
    flow, base = steps[flow_names[0]], steps[flow_names[2]]

    def size(name: str, value: float) -> list[str]:
        return [name, f"{int(value):,}", h.mib(value)]

    return ["", "#### 3. Memory and LoRA checkpoint", "",
            f"Memory: {mem['kind']}; delta = peak minus the level at the step's start (weights, optimiser state "
            "and batch are already there).", "",
            *h.table(["step", "peak (MiB)", "delta over step start (MiB)"],
                     [[n, h.mib(p), h.mib(d)] for n, (p, d) in steps.items()], "lrr"), "",
            *h.table(["weights", "bytes", "MiB"], [
                size(f"transformer parameters (frozen base, {a.dtype})", ckpt["base"]),
                size(f"LoRA parameters (fp32, in memory; {ckpt['lora_numel']:,} params)", ckpt["lora_params"]),
                size(f"LoRA file `{LORA_FILE}` (save_lora)", ckpt["file"])], "lrr"), "",
            f"**ratio peak gridgen/bare = {h.ratio(light[0], bare[0]):.3f}** (step delta "
            f"{h.ratio(light[1], bare[1]):.3f})", "",
            f"**ratio peak alpha>0 / L_base only = {h.ratio(flow[0], base[0]):.3f}** (step delta "
            f"{h.ratio(flow[1], base[1]):.3f})", "",
            f"**ratio LoRA file / transformer parameters = {h.ratio(ckpt['file'], ckpt['base']):.4f}**"]


def render_hot(hot: dict[str, Any], bare_med: float, overhead: float) -> list[str]:
    body = [[name, h.us(best), h.us(med), f"{100 * h.ratio(best, bare_med):.2f}"]
            for name, (med, best) in hot["times"].items()]
    body.append(["all Lightning overhead (section 1 B: median gridgen minus bare step)", "", h.us(overhead),
                 f"{100 * h.ratio(overhead, bare_med):.2f}"])
    return ["", "#### 4. GridModule hot path (outside the transformer)", "",
            f"Each piece timed alone, per call: best of {hot['rounds']} rounds and median; % of the bare step "
            f"({h.ms(bare_med)} ms), from the best.", "",
            *h.table(["piece", "best (us)", "median (us)", "% of step"], body, "lrrr")]


def render_variants(res: dict[str, Any], bench: Bench) -> list[str]:
    rows = []
    for name in res["variants"]:
        if name in res["skipped"]:
            rows.append([name, f"skipped: {res['skipped'][name]}", "", "", "", ""])
            continue
        step = h.median(res["times"][name])
        model_flops, executed = res["flops"][name]
        mfu = f"{100 * model_flops / step / res['peak_flops']:.1f} %" if res["peak_flops"] else "n/a"
        rows.append([name, h.ms(step), f"{res['ratios'][name]:.3f}", f"{executed / step / 1e12:.3f}", mfu,
                     h.mib(res["memory"][name])])
    a = bench.args
    how = ("all built first, then stepped in turn, one step each in rotating order; ratio = median of the "
           "per-pair ratios of neighbouring steps" if res["together"] else
           "one after another (one in memory at a time); ratio of the median steps")
    peak = f"{res['peak_flops'] / 1e12:.1f} TFLOP/s dense {a.dtype}" if res["peak_flops"] else \
        "unknown for this device (MFU n/a)"
    return ["", "#### 5. Variants: step time, MFU, memory", "",
            f"Bare-loop steps of one module per variant, built as a run builds it (the baseline with every "
            f"requested setting off, whatever the preset sets; each variant with its one setting on) and "
            f"warmed up for "
            f"{max(1, a.warmup)} step(s), which hold any compilation; {a.repeats * a.steps} timed steps each, {how}. "
            f"FLOPs per step from `gridgen.training.flops` "
            f"({res['flops'].get('baseline', (0, 0))[0] / 1e9:.3f} GFLOP without recomputation): TFLOP/s counts "
            f"what runs (with checkpointing one more forward of the blocks), MFU the model FLOPs against the "
            f"device's peak: {peak}. Memory ({res['memory_kind']}): what building the variant and its warm-up "
            "steps added (weights, optimiser state, a step's activations).", "",
            *h.table(["variant", "median step (ms)", "ratio to baseline", "TFLOP/s", "MFU", "memory added (MiB)"],
                     rows, "lrrrrr")]


def render_malloc(res: dict[str, Any], a: argparse.Namespace) -> list[str]:
    head = ["", "#### 6. glibc's malloc: tuned (gridgen's CPU runs) against glibc's defaults", ""]
    if "skipped" in res:
        return [*head, f"skipped: {res['skipped']}"]
    rows = [[name, h.ms(h.median(medians)), ", ".join(h.ms(m) for m in medians)] for name, medians in res["medians"].items()]
    return [*head, f"The baseline's bare step ({a.steps} timed after {a.warmup} warm-up steps) in new processes of "
            f"this script, {a.repeats} pairs of one tuned (mmap threshold {h.MALLOC_MMAP_THRESHOLD >> 20} MiB, no "
            "auto-trim: `gridgen.runtime.tune_malloc`) and one with glibc's defaults (`--no-malloc-tune`, the "
            "environment's MALLOC_* removed), in alternating order. "
            f"**ratio defaults / tuned = {res['ratio']:.3f}** (median over the pairs: "
            + ", ".join(f"{r:.3f}" for r in res["ratios"]) + ")", "",
            *h.table(["malloc", "median step (ms)", "each process's median (ms)"], rows, "lrl")]


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=tuple(MODELS), default="tiny")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant and repeat (default 12; quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps at the start of each block (default 2; quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3; quick 2)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="frozen base weights (default float32; dev-random bfloat16); bfloat16 trains with "
                        "Lightning's bf16-mixed (autocast) like strategy=gpu")
    p.add_argument("--sections", default=None, help=f"comma-separated subset of {','.join(SECTIONS)} "
                                                    "(default: all for --model tiny, variants otherwise)")
    p.add_argument("--compile", action="store_true", help="variant: model.compile=true (regional compilation)")
    p.add_argument("--quantization", choices=SCHEMES, default=None,
                   help="variant: model.quantization=<scheme>, frozen base quantized")
    p.add_argument("--optim", choices=("adamw", "adamw8bit"), default="adamw", help="variant: optim.name=adamw8bit")
    p.add_argument("--gradient-checkpointing", action="store_true", help="variant: model.gradient_checkpointing=true")
    h.add_output_args(p, "small model and grid, few steps: a smoke run in seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's choice; --quick: 1, which keeps the smoke run "
                        "fast when other processes hold the cores)")
    p.add_argument("--no-malloc-tune", action="store_true", help="leave glibc's malloc thresholds alone")
    p.add_argument("--child-malloc", action="store_true", help=argparse.SUPPRESS)  # section 6's child: baseline steps
    args = p.parse_args(argv)
    for name, default in zip(("steps", "warmup", "repeats"), (3, 1, 2) if args.quick else (12, 2, 3), strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    args.dtype = args.dtype or ("bfloat16" if args.model == "dev-random" else "float32")
    if args.quick and args.threads is None:
        args.threads = 1
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0 or args.batch_size < 1:
        p.error("--steps, --repeats and --batch-size must be >= 1, --warmup >= 0")
    sections = (args.sections or ("all" if args.model == "tiny" else "variants")).split(",")
    args.sections = list(SECTIONS) if sections == ["all"] else sections
    if unknown := sorted(set(args.sections) - set(SECTIONS)):
        p.error(f"--sections: unknown {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def quiet() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in (".*does not have many workers.*", ".*flops_per_batch.*", ".*LightningModule.*trainer.*",
                    ".*LeafSpec.*", ".*TF32.*", ".*validation_step.*val_dataloader.*"):
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # "modules that should be kept in float32: []" on .to(dtype)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    quiet()
    notes = []
    if args.device == "cuda" and not torch.cuda.is_available():
        log.warning("--device cuda: CUDA is not available, measuring on the CPU")
        args.device = "cpu"
        notes.append("--device cuda was asked for but CUDA was not available: measured on the CPU")
    args.malloc_tuned = not args.no_malloc_tune and args.device == "cpu" and h.tune_malloc()
    if args.malloc_tuned:
        notes.append(f"glibc malloc tuned for the run (mmap threshold {h.MALLOC_MMAP_THRESHOLD >> 20} MiB, no "
                     "auto-trim; gridgen.runtime.tune_malloc, as gridgen's CPU runs): without it the first steps of a "
                     "process are many times slower (section 6 measures the later ones)")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = h.load_average()
    phases: dict[str, float] = {}
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gridgen-bench-") as tmp:
        start = time.perf_counter()
        bench = build_bench(args, Path(tmp))
        bench.notes += notes
        if args.child_malloc:  # one process of section 6: the baseline's bare steps, as one JSON line
            args.gradient_checkpointing, args.compile, args.quantization, args.optim = False, False, None, "adamw"
            print(json.dumps({"baseline": measure_variants(bench)["times"]["baseline"]}))
            return 0
        measures: list[tuple[str, str, Callable[[Bench], Any]]] = [
            ("framework", "framework", measure_framework), ("flow", "flow", measure_flow),
            ("flow", "losses", measure_losses), ("hot", "hot", measure_hot_path),
            ("memory", "memory", measure_memory), ("variants", "variants", measure_variants),
            ("malloc", "malloc", measure_malloc)]
        if set(args.sections) - {"variants", "malloc"}:
            bench.module = bench.build_module()
            bare_block(bench, max(1, args.warmup), 0)  # the process's first steps, before any timed block
        phases["setup"] = time.perf_counter() - start
        for section, name, measure in measures:
            if section in args.sections:
                log.info("%s ...", name)
                t0 = time.perf_counter()
                results[name] = measure(bench)
                phases[name] = time.perf_counter() - t0
    if note := h.shared_machine_note(load_before):
        bench.notes.append(note)
    key, block = render(bench, results, phases, load_before)
    if args.quick and args.output == h.RESULTS and not args.no_write:
        print(block)
        log.info("--quick: not writing %s (smoke-run figures); pass --output to write them elsewhere", args.output)
        return 0
    h.finish(args, "train", block, key, intro=SECTION_INTRO)
    return 0


SECTION_INTRO = """## Training step: Lightning overhead, L_flow cost, memory, LoRA size, variants

Written by `bench/bench_train.py` (`make bench`), one block per model / device / dtype / batch size; what is
measured and how is in the script's docstring. Ratios compare variants measured in the same process and
interleaved, so they hold on a shared machine where absolute times do not."""


if __name__ == "__main__":
    sys.exit(main())
