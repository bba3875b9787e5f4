"""The grid sampler: FLUX's shifted flow schedule from T to 0, Euler steps, guidance embedding, masks (eqs. 9-11).

A grid is one FLUX image, so sampling is FLUX sampling over ``N = token_rows * token_cols`` packed tokens:

    sigma_0 = T > sigma_1 > ... > sigma_S = 0      FLUX's exponential time shift, mu from N (calculate_shift),
                                                   or a fixed shift s (generate.time_shift)
    x_{sigma_0} = (1 - T) x_init + T eps           eq. (9); x_init = 0 terms vanish at T = 1 (pure noise)
    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v(x_i, sigma_i, text, guidance)          Euler on eq. (2)'s field
    x_{i+1} = (1 - M) * ref_{i+1} + M * x_{i+1}    eqs. (10)-(11); ref_{i+1} is the reference noised to
                                                   sigma_{i+1} with the same eps (default) or the clean one
    v = v_neg + s (v - v_neg)                      true CFG (FluxPipeline's true_cfg_scale), or a diffusers guider
                                                   (generate.guider: a guidance interval, APG, CFG-Zero*, ...)

With T = 1, no mask and the noise drawn as ``FluxPipeline.prepare_latents`` draws it, every operation is the
one diffusers' ``FluxPipeline.__call__`` performs, in the same order and dtype, so the two agree to the bit.
T < 1 keeps FLUX's schedule shape: ``steps`` points equally spaced in unshifted time from ``s_T`` down, with
``s_T`` the unshifted time that the shift maps to T, so that the first sigma is T itself.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.utils.torch_utils import randn_tensor

from gridgen.layout import GridLayout
from gridgen.models.flux import decode_tokens, encode_images, encode_prompts, pack_latents

if TYPE_CHECKING:
    from diffusers import FluxPipeline
    from diffusers.guiders import BaseGuidance

log = logging.getLogger(__name__)

MASK_MODES = ("noised", "clean")
LATENT_CHANNELS = 16  # FLUX VAE


# ---- schedule ------------------------------------------------------------------------------------------
def check_strength(T: float) -> float:
    T = float(T)
    if not 0.0 < T <= 1.0:
        raise ValueError(f"T must be in (0, 1] (eq. 9 noise level; paper: 0.8-1.0 with a reference), got {T}")
    return T


def check_true_cfg(scale: float) -> float:
    scale = float(scale)
    if not scale >= 1.0:  # also refuses nan
        raise ValueError(f"generate.true_cfg_scale must be >= 1 (1 = off; FluxPipeline's true_cfg_scale), got {scale}")
    return scale


# diffusers.guiders that combine the conditional and negative predictions alone (no model hooks, any tensor shape)
GUIDERS = ("ClassifierFreeGuidance", "AdaptiveProjectedGuidance", "ClassifierFreeZeroStarGuidance",
           "TangentialClassifierFreeGuidance", "MagnitudeAwareGuidance")


def make_guider(spec: Mapping[str, Any] | None, true_cfg_scale: float, section: str = "generate"
                ) -> BaseGuidance | None:
    """``generate.guider`` (``{name: <diffusers guider>, <its arguments>}``) -> a new diffusers guider whose scale is
    ``true_cfg_scale``, or None for FluxPipeline's true CFG. A new one per trajectory: APG's momentum is its state.
    ``section``: the config group the refusals name (``eval`` for `make mini`'s ``eval.guider``)."""
    if spec is None:
        return None
    key, scale_key = f"{section}.guider", f"{section}.true_cfg_scale"
    if not isinstance(spec, Mapping):
        raise ValueError(f"{key} takes {{name: <guider>, <its arguments>}}, e.g. "
                         f"'{key}={{name:ClassifierFreeGuidance,stop:0.5}}', got {spec!r}")
    kwargs = dict(spec)
    name = kwargs.pop("name", None)
    if name not in GUIDERS:
        raise ValueError(f"{key}.name must be one of {list(GUIDERS)} (diffusers.guiders), got {name!r}")
    if "guidance_scale" in kwargs:
        raise ValueError(f"{key} takes its scale from {scale_key}: remove {key}.guidance_scale="
                         f"{kwargs['guidance_scale']!r}")
    if (scale := check_true_cfg(true_cfg_scale)) <= 1.0:
        raise ValueError(f"{key}={name} guides with the negative prompt at {scale_key}, which is {scale:g} (off): "
                         f"set {scale_key} > 1, or {key}=null")
    if name == "ClassifierFreeZeroStarGuidance" and kwargs.get("guidance_rescale", 0) and \
            kwargs.get("zero_init_steps", 1) > 0:  # rescaling its zeroed first steps divides by their std, 0: NaN
        raise ValueError(f"{key}: ClassifierFreeZeroStarGuidance's zero_init_steps (default 1) output 0, which "
                         "guidance_rescale cannot rescale (NaN): set zero_init_steps: 0 or drop guidance_rescale")
    import diffusers
    import diffusers.guiders

    if not hasattr(diffusers.guiders, name):
        raise ValueError(f"{key}.name={name} is not in the installed diffusers {diffusers.__version__}")
    guider_class = getattr(diffusers.guiders, name)
    taken = set(inspect.signature(guider_class.__init__).parameters) - {"self", "guidance_scale"}
    if unknown := sorted(set(kwargs) - taken):
        raise ValueError(f"{key}: {name} does not take {unknown}; it takes {sorted(taken)} (diffusers.guiders.{name})")
    try:
        return guider_class(guidance_scale=scale, **kwargs)
    except (TypeError, ValueError) as err:  # a value of the wrong type or range
        raise ValueError(f"{key}: {name} refused {kwargs}: {err}") from None


def schedule_mu(scheduler: FlowMatchEulerDiscreteScheduler, num_tokens: int) -> float:
    """FLUX's resolution shift: mu grows linearly with the image's token count, exactly as FluxPipeline."""
    cfg = scheduler.config
    return calculate_shift(num_tokens, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                           cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))


def unshifted_time(scheduler: FlowMatchEulerDiscreteScheduler, mu: float, sigma: float) -> float:
    """The time ``s`` that the scheduler's shift maps to ``sigma`` (inverse of ``time_shift``); 1 for sigma = 1."""
    cfg = scheduler.config
    if sigma >= 1.0:
        return 1.0
    if cfg.use_dynamic_shifting:
        # exponential: sigma = e^mu / (e^mu + 1/s - 1);  linear: sigma = mu / (mu + 1/s - 1)
        scale = math.exp(mu) if cfg.get("time_shift_type", "exponential") == "exponential" else mu
        return 1.0 / (1.0 + scale * (1.0 / sigma - 1.0))
    shift = cfg.shift  # sigma = shift s / (1 + (shift - 1) s)
    return sigma / (shift - (shift - 1.0) * sigma)


def check_time_shift(shift: float | None) -> float | None:
    """``generate.time_shift``: None (FLUX's resolution shift) or a finite number > 0."""
    if shift is None:
        return None
    try:
        value = float(shift)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"generate.time_shift must be a number > 0 (the fixed shift s of sigma = s u / (1 + (s - 1) u),"
                         f" e.g. the loss.timestep_shift a LoRA trained with) or null (FLUX's resolution shift), "
                         f"got {shift!r}")
    return value


def flux_schedule(scheduler: FlowMatchEulerDiscreteScheduler, num_tokens: int, steps: int, T: float = 1.0,
                  device: torch.device | str | None = None, time_shift: float | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sigmas (steps + 1,), timesteps (steps,))`` from T down to 0, as FluxPipeline builds them for T = 1.

    ``time_shift``: None keeps the scheduler's shift (FLUX: exponential, mu from the token count); a number s
    samples with the fixed shift ``sigma = s u / (1 + (s - 1) u)`` instead, as a scheduler configured with
    ``use_dynamic_shifting=False, shift=s`` does (the shift ``loss.timestep_shift`` trains with). The scheduler
    passed in is not modified (a copy is configured).
    """
    T = check_strength(T)
    if int(steps) < 1:
        raise ValueError(f"generate.steps must be >= 1, got {steps}")
    steps = int(steps)
    if (time_shift := check_time_shift(time_shift)) is not None:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config, use_dynamic_shifting=False,
                                                                shift=time_shift)
    mu = schedule_mu(scheduler, num_tokens)  # unused by a fixed shift
    start = unshifted_time(scheduler, mu, T)
    sigmas = np.linspace(start, start / steps, steps)  # FluxPipeline: np.linspace(1.0, 1 / steps, steps)
    sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    sched.set_timesteps(sigmas=sigmas, mu=mu, device=device)
    return sched.sigmas, sched.timesteps


# ---- noise ---------------------------------------------------------------------------------------------
def initial_noise(seeds: Sequence[int], layout: GridLayout, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Packed noise ``(B, N, 64)``, one CPU generator per seed, drawn as ``FluxPipeline.prepare_latents`` does.

    diffusers draws ``(1, 16, H/8, W/8)`` per generator (``randn_tensor`` with a list of generators) and packs,
    so ``FluxPipeline(..., generator=[torch.Generator().manual_seed(s) for s in seeds])`` starts from the same
    noise. CPU generators make a seed give the same grid on any device.
    """
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    shape = (len(generators), LATENT_CHANNELS, layout.latent_height, layout.latent_width)
    latents = randn_tensor(shape, generator=generators, device=torch.device(device), dtype=dtype)
    return pack_latents(latents)  # (B, N, 64)


def noised(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """``(1 - sigma) x0 + sigma eps`` in float32, returned in ``noise``'s dtype (eq. 1 / eq. 9)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=noise.device)
    return ((1 - sigma) * x0.float() + sigma * noise.float()).to(noise.dtype)


# ---- the sampling loop --------------------------------------------------------------------------------
@dataclass
class TextConditioning:
    """FLUX text inputs: T5 ``prompt_embeds (B, L, D)``, CLIP ``pooled (B, D_clip)``, ``text_ids (L, 3)``."""

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    text_ids: torch.Tensor


@torch.no_grad()
def sample_grid(
    transformer: torch.nn.Module,
    scheduler: FlowMatchEulerDiscreteScheduler,
    layout: GridLayout,
    text: TextConditioning,
    noise: torch.Tensor,
    *,
    steps: int = 20,
    T: float = 1.0,
    guidance: float | None = 3.5,
    init: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    mask_mode: str = "noised",
    true_cfg_scale: float = 1.0,
    negative: TextConditioning | None = None,
    time_shift: float | None = None,
    guider: Mapping[str, Any] | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Sample packed grid latents ``(B, N, 64)``.

    Args:
        noise: ``(B, N, 64)`` eps, e.g. from :func:`initial_noise`; its dtype is the sampling dtype.
        T: start of the schedule (eq. 9). T < 1 needs ``init``.
        init: ``(B, N, 64)`` clean latents of the initialised grid (eq. 8 / the input sequence), or None.
        keep: ``(B, N, 1)`` bool, True on tokens of reference cells (``M = 0``, eq. 10); they are reset to
            ``init`` after every step (eq. 11), so they end exactly equal to it.
        mask_mode: ``noised`` resets to ``init`` noised to the new sigma with the same eps (what inpainting
            pipelines do); ``clean`` resets to ``init`` itself.
        true_cfg_scale, negative: classifier-free guidance as FluxPipeline's ``true_cfg_scale`` with a negative
            prompt: above 1, ``v = v_neg + s (v - v_neg)`` with ``v_neg`` from ``negative`` (the text conditioning of
            the negative prompt, e.g. the empty caption of a model trained with ``loss.caption_dropout``); both
            halves in one transformer call of batch 2B.
        time_shift: None (FLUX's resolution shift) or a fixed shift of the schedule (:func:`flux_schedule`).
        guider: None (true CFG as above) or ``{name: <diffusers guider>, <its arguments>}`` (:func:`make_guider`),
            which combines the two halves instead, with ``true_cfg_scale`` as its scale; on a step where it does not
            guide (outside its ``start``/``stop`` fraction of the steps) the transformer runs the conditional half only.
        callback: called as ``callback(step, sigma, x)`` with the latents entering each step.
    """
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask.mode must be one of {list(MASK_MODES)}, got {mask_mode!r}")
    T = check_strength(T)
    if init is None and (T < 1.0 or keep is not None):
        raise ValueError("T < 1 and masks need an initial grid (a reference): pass init latents")
    batch, num_tokens, _ = noise.shape
    do_cfg = check_true_cfg(true_cfg_scale) > 1.0
    if do_cfg and negative is None:
        raise ValueError(f"true_cfg_scale={true_cfg_scale} needs the negative prompt's text conditioning (negative=)")
    guide = make_guider(guider, true_cfg_scale)
    if num_tokens != layout.num_tokens:
        raise ValueError(f"noise has {num_tokens} tokens, layout {layout.name} has {layout.num_tokens}")
    device, dtype = noise.device, noise.dtype
    sigmas, timesteps = flux_schedule(scheduler, layout.num_tokens, steps, T, device=device, time_shift=time_shift)

    def reset(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:  # eq. (11)
        if keep is None:
            return x
        target = noised(init, noise, sigma) if mask_mode == "noised" else init.to(dtype)
        return torch.where(keep, target, x)

    x = noise if init is None else noised(init, noise, sigmas[0])  # eq. (9); exactly eps at T = 1
    x = reset(x, sigmas[0])
    guidance_vec = None
    if getattr(transformer.config, "guidance_embeds", False):
        guidance_vec = torch.full([1], float(guidance), device=device, dtype=torch.float32).expand(batch)
    img_ids = layout.image_ids(device, dtype)  # (N, 3)
    embeds, pooled = text.prompt_embeds, text.pooled
    if do_cfg:  # conditional and negative halves in one call: (2B, L, D), (2B, D_clip)
        if negative.prompt_embeds.shape[1:] != embeds.shape[1:]:
            raise ValueError(f"negative prompt embeddings {tuple(negative.prompt_embeds.shape[1:])} differ from the "
                             f"prompt's {tuple(embeds.shape[1:])}: encode both with the same max_sequence_length")
        embeds = torch.cat([embeds, negative.prompt_embeds.expand(batch, -1, -1)])
        pooled = torch.cat([pooled, negative.pooled.expand(batch, -1)])
        if guidance_vec is not None:
            guidance_vec = guidance_vec[:1].expand(2 * batch)
    for i, t in enumerate(timesteps):
        if callback is not None:
            callback(i, sigmas[i], x)
        both = do_cfg
        if guide is not None:  # the guider's own protocol: its state, then how many predictions it wants
            guide.set_state(i, len(timesteps), t)
            both = len(guide.prepare_inputs({})) == 2
        calls = 2 * batch if both else batch  # the conditional half first: embeds[:batch] is the prompt's
        velocity = transformer(
            hidden_states=torch.cat([x, x]) if both else x,
            timestep=t.expand(calls).to(dtype) / 1000,  # FLUX takes t in [0, 1]; as FluxPipeline rounds it
            guidance=None if guidance_vec is None else guidance_vec[:calls],
            pooled_projections=pooled[:calls],
            encoder_hidden_states=embeds[:calls],
            txt_ids=text.text_ids,
            img_ids=img_ids,
            joint_attention_kwargs={},
            return_dict=False,
        )[0]  # (B, N, 64), or (2B, N, 64) with both halves
        if guide is not None:
            cond, neg = velocity.chunk(2) if both else (velocity, None)
            velocity = guide.forward(cond, neg).pred
        elif do_cfg:  # FluxPipeline: neg + true_cfg_scale * (cond - neg)
            cond, neg = velocity.chunk(2)
            velocity = neg + true_cfg_scale * (cond - neg)
        # Euler step in float32, cast back to the model's dtype (FlowMatchEulerDiscreteScheduler.step)
        x = (x.to(torch.float32) + (sigmas[i + 1] - sigmas[i]) * velocity).to(velocity.dtype)
        x = reset(x, sigmas[i + 1])
    return x


# ---- the FLUX pipeline around the loop ------------------------------------------------------------------
class GridSampler:
    """A loaded FLUX pipeline's parts with grid-level encode / sample / decode.

    ``pipe`` is a diffusers ``FluxPipeline`` (``gridgen.models.builder.build_flux``); its transformer may carry
    a LoRA.
    """

    def __init__(self, pipe: FluxPipeline, max_sequence_length: int = 512) -> None:
        self.pipe = pipe
        self.max_sequence_length = int(max_sequence_length)

    @property
    def device(self) -> torch.device:
        return self.pipe.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.transformer.dtype

    def encode_text(self, captions: list[str]) -> TextConditioning:
        embeds, pooled, text_ids = encode_prompts(self.pipe, captions, self.max_sequence_length, device=self.device)
        return TextConditioning(embeds, pooled, text_ids)

    def encode_grid(self, pixels: torch.Tensor) -> torch.Tensor:
        """Grid images in [-1, 1] ``(B, 3, H, W)`` -> normalised packed latents ``(B, N, 64)``."""
        return encode_images(self.pipe.vae, pixels.to(self.pipe.vae.device))

    def decode(self, latents: torch.Tensor, layout: GridLayout) -> torch.Tensor:
        """Packed latents ``(B, N, 64)`` -> grid images in [-1, 1] ``(B, 3, H, W)``."""
        return decode_tokens(self.pipe.vae, latents.to(self.pipe.vae.device), layout)

    def sample(self, layout: GridLayout, text: TextConditioning, seeds: Sequence[int], **kwargs: Any) -> torch.Tensor:
        noise = initial_noise(seeds, layout, dtype=text.prompt_embeds.dtype, device=self.device)
        init = kwargs.pop("init", None)
        if init is not None:
            init = init.to(device=self.device)
        keep = kwargs.pop("keep", None)
        if keep is not None:
            keep = keep.to(device=self.device)
        return sample_grid(self.pipe.transformer, self.pipe.scheduler, layout, text, noise, init=init, keep=keep,
                           **kwargs)
