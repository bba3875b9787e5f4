"""The sampler: FLUX's shifted schedule from T, parity with diffusers' FluxPipeline, the reference-cell mask
(eqs. 9-11)."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from PIL import Image
from safetensors.torch import load_file

from gridgen.generate import generate
from gridgen.inference import (
    GridSampler,
    TaskSpec,
    flux_schedule,
    initial_frames,
    initial_noise,
    keep_tokens,
    resolve_layout,
)
from gridgen.inference.pipeline import check_config
from gridgen.inference.sampler import GUIDERS, noised
from gridgen.layout import GridLayout
from tests.helpers.flux import MAX_SEQ, tiny_pipe
from tests.helpers.generate import gen_cfg


@pytest.mark.parametrize("num_tokens, steps", [(64, 20), (1024, 7), (4096, 3)])
def test_schedule_is_fluxs_shifted_schedule_from_T(num_tokens, steps):
    config = tiny_pipe().scheduler.config
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    mu = 0.5 + (num_tokens - 256) * (1.15 - 0.5) / (4096 - 256)  # FLUX's line through (256, 0.5), (4096, 1.15)
    sigmas, timesteps = flux_schedule(scheduler, num_tokens, steps, T=1.0)
    # written plainly: s_i = 1 - i/steps, sigma_i = e^mu / (e^mu + 1/s_i - 1), then 0
    expected = [math.exp(mu) / (math.exp(mu) + 1 / (1 - i / steps) - 1) for i in range(steps)] + [0.0]
    torch.testing.assert_close(sigmas, torch.tensor(expected), rtol=0, atol=1e-6)
    torch.testing.assert_close(timesteps, sigmas[:-1] * 1000)
    for T in (0.9, 0.5):
        sigmas_T, _ = flux_schedule(scheduler, num_tokens, steps, T=T)
        assert sigmas_T[0].item() == pytest.approx(T, abs=1e-6) and sigmas_T[-1] == 0
        assert (sigmas_T.diff() < 0).all()
        unshifted = 1 / (1 + math.exp(mu) * (1 / sigmas_T[:-1].double() - 1))  # inverse shift: equal steps
        torch.testing.assert_close(unshifted.diff(), torch.full((steps - 1,), -unshifted[0].item() / steps,
                                                                dtype=torch.float64), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"T must be in \(0, 1\]"):
        flux_schedule(scheduler, num_tokens, steps, T=1.5)


def test_t2v_equals_diffusers_flux_pipeline(tmp_path):
    """T = 1, no mask: gridgen's latents and images are diffusers FluxPipeline's, per-sample seeds, a batch."""
    layout = resolve_layout("4x4", 128)
    prompts = ["a red circle moves from left to right", "a blue square falls"]
    (tmp_path / "prompts.txt").write_text("# two samples\n" + "\n".join(prompts) + "\n")
    manifest = generate(gen_cfg(tmp_path, f"prompts_file={tmp_path / 'prompts.txt'}", "seed=7",
                                "generate.batch_size=2", "generate.steps=8", "export.latents=true",
                                "export.mp4=false", "export.gif=false"))
    captions = [s["caption"] for s in manifest["samples"]]
    assert captions == [layout.caption(p) for p in prompts] and [s["seed"] for s in manifest["samples"]] == [7, 8]
    ours = torch.stack([load_file(tmp_path / "out" / s["files"]["latents"])["latents"] for s in manifest["samples"]])

    pipe = tiny_pipe()
    kwargs = dict(height=128, width=128, num_inference_steps=8, guidance_scale=3.5, max_sequence_length=MAX_SEQ)
    theirs = pipe(captions, generator=[torch.Generator().manual_seed(s) for s in (7, 8)], output_type="latent",
                  **kwargs).images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    images = pipe(captions, generator=[torch.Generator().manual_seed(s) for s in (7, 8)], output_type="np",
                  **kwargs).images  # (B, H, W, 3) in [0, 1]
    for sample, image in zip(manifest["samples"], images, strict=True):
        png = np.asarray(Image.open(tmp_path / "out" / sample["files"]["grid"]))
        assert np.abs(png.astype(int) - (image * 255).round().astype(int)).max() == 0

    # the tolerance catches a wrong shift or a wrong step count by orders of magnitude
    sampler = GridSampler(pipe, MAX_SEQ)
    text = sampler.encode_text(captions)
    noise = initial_noise([7, 8], layout)
    wrong_shift = FlowMatchEulerDiscreteScheduler.from_config({**pipe.scheduler.config, "max_shift": 0.5})
    from gridgen.inference import sample_grid
    for scheduler, steps in ((wrong_shift, 8), (pipe.scheduler, 9)):
        other = sample_grid(pipe.transformer, scheduler, layout, text, noise, steps=steps)
        assert (other - theirs).abs().max() > 1e-3


def test_true_cfg_equals_flux_pipeline_true_cfg_scale(tmp_path):
    """generate.true_cfg_scale with the empty negative prompt = FluxPipeline(true_cfg_scale=, negative_prompt=""):
    gridgen batches both halves in one call, diffusers makes two; and the scale acts (1 = off, refused below)."""
    layout = resolve_layout("4x4", 128)
    args = ["prompt='a red circle moves from left to right'", "seed=5", "generate.steps=6", "export.latents=true",
            "export.mp4=false", "export.gif=false", "generate.true_cfg_scale=4.0"]
    manifest = generate(gen_cfg(tmp_path, *args))
    sample = manifest["samples"][0]
    assert manifest["true_cfg_scale"] == 4.0 and manifest["negative_prompt"] == ""
    ours = load_file(tmp_path / "out" / sample["files"]["latents"])["latents"][None]  # (1, N, 64)

    pipe = tiny_pipe()
    kwargs = dict(height=128, width=128, num_inference_steps=6, guidance_scale=3.5, max_sequence_length=MAX_SEQ,
                  output_type="latent")
    theirs = pipe(sample["caption"], negative_prompt="", true_cfg_scale=4.0,
                  generator=torch.Generator().manual_seed(5), **kwargs).images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    plain = pipe(sample["caption"], generator=torch.Generator().manual_seed(5), **kwargs).images
    assert (plain - theirs).abs().max() > 1e-2  # CFG changed the sample
    with pytest.raises(ValueError, match="true_cfg_scale must be >= 1"):
        generate(gen_cfg(tmp_path / "bad", *args[:-1], "generate.true_cfg_scale=0.5"))
    sampler = GridSampler(pipe, MAX_SEQ)
    from gridgen.inference import sample_grid
    with pytest.raises(ValueError, match="needs the negative prompt"):
        sample_grid(pipe.transformer, pipe.scheduler, layout, sampler.encode_text(["x"]), initial_noise([0], layout),
                    steps=2, true_cfg_scale=2.0)
    assert layout.num_tokens == ours.shape[1]


def test_time_shift_equals_flux_pipeline_with_a_fixed_shift_scheduler(tmp_path):
    """generate.time_shift=s samples on sigma = s u / (1 + (s - 1) u) (written plainly here), and its grid is
    FluxPipeline's with a scheduler configured use_dynamic_shifting=False, shift=s; bad values are refused."""
    steps, shift = 6, 12.0
    args = ["prompt='a red circle moves from left to right'", "seed=3", f"generate.steps={steps}",
            "export.latents=true", "export.mp4=false", "export.gif=false"]
    manifest = generate(gen_cfg(tmp_path, *args, f"generate.time_shift={shift}"))
    sample = manifest["samples"][0]
    assert manifest["time_shift"] == shift
    ours = load_file(tmp_path / "out" / sample["files"]["latents"])["latents"][None]  # (1, N, 64)

    pipe = tiny_pipe()
    fixed = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=False, shift=shift)
    sigmas, _ = flux_schedule(pipe.scheduler, ours.shape[1], steps, time_shift=shift)
    expected = [shift * u / (1 + (shift - 1) * u) for u in (1 - i / steps for i in range(steps))] + [0.0]
    torch.testing.assert_close(sigmas, torch.tensor(expected), rtol=0, atol=1e-6)
    kwargs = dict(height=128, width=128, num_inference_steps=steps, guidance_scale=3.5, max_sequence_length=MAX_SEQ,
                  output_type="latent", generator=torch.Generator().manual_seed(3))
    theirs = FluxPipeline(**{**pipe.components, "scheduler": fixed})(sample["caption"], **kwargs).images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    kwargs["generator"] = torch.Generator().manual_seed(3)
    assert (pipe(sample["caption"], **kwargs).images - theirs).abs().max() > 1e-3  # the shift acted
    for bad in ("0", "-2", "nan", "fast"):
        with pytest.raises(ValueError, match="generate.time_shift must be a number > 0"):
            generate(gen_cfg(tmp_path / f"bad{bad}", *args, f"generate.time_shift={bad}"))


def test_guider_interval_equals_a_plain_reference_loop(tmp_path):
    """generate.guider={name: ClassifierFreeGuidance, stop: 0.5}: true CFG on the first half of the steps, the prompt
    alone after (one transformer call of batch 1 there), as the plain Euler loop written here computes it; the guider
    without an interval is FluxPipeline's true CFG; APG starts every trajectory afresh; the manifest records it."""
    from gridgen.inference import sample_grid

    pipe, layout, steps, scale = tiny_pipe(), resolve_layout("4x4", 128), 4, 3.0
    sampler = GridSampler(pipe, MAX_SEQ)
    text, negative = sampler.encode_text([layout.caption("a red circle")]), sampler.encode_text([""])
    noise = initial_noise([2], layout)
    batches = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, kw, out: batches.append(kw["hidden_states"].shape[0]),
                                                  with_kwargs=True)
    ours = sample_grid(pipe.transformer, pipe.scheduler, layout, text, noise, steps=steps, true_cfg_scale=scale,
                       negative=negative, guider={"name": "ClassifierFreeGuidance", "stop": 0.5})
    hook.remove()
    assert batches == [2, 2, 1, 1]  # the negative half only where the guider guides

    sigmas, timesteps = flux_schedule(pipe.scheduler, layout.num_tokens, steps)
    guidance, ids = torch.full([1], 3.5), layout.image_ids("cpu", torch.float32)

    def velocity(x, t, cond):
        return pipe.transformer(hidden_states=x, timestep=t.expand(1) / 1000, guidance=guidance,
                                pooled_projections=cond.pooled, encoder_hidden_states=cond.prompt_embeds,
                                txt_ids=cond.text_ids, img_ids=ids, return_dict=False)[0]

    x = noise
    for i, t in enumerate(timesteps):
        v = velocity(x, t, text)
        if i < steps // 2:
            v_neg = velocity(x, t, negative)
            v = v_neg + scale * (v - v_neg)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-5)
    everywhere = sample_grid(pipe.transformer, pipe.scheduler, layout, text, noise, steps=steps, true_cfg_scale=scale,
                             negative=negative)
    assert (everywhere - ours).abs().max() > 1e-3  # the interval acted
    same = sample_grid(pipe.transformer, pipe.scheduler, layout, text, noise, steps=steps, true_cfg_scale=scale,
                       negative=negative, guider={"name": "ClassifierFreeGuidance"})
    torch.testing.assert_close(same, everywhere, rtol=0, atol=1e-6)
    apg = {"name": "AdaptiveProjectedGuidance", "eta": 0.0, "adaptive_projected_guidance_momentum": -0.5}
    first, second = (sample_grid(pipe.transformer, pipe.scheduler, layout, text, noise, steps=steps,
                                 true_cfg_scale=scale, negative=negative, guider=apg) for _ in range(2))
    assert torch.equal(first, second)  # a new guider per trajectory: the second does not start from the first's momentum

    manifest = generate(gen_cfg(tmp_path, "prompt='a red circle'", "generate.steps=2", "export.mp4=false",
                                "export.gif=false", "generate.true_cfg_scale=3.0",
                                "generate.guider={name:ClassifierFreeGuidance,stop:0.5}"))
    assert manifest["guider"] == {"name": "ClassifierFreeGuidance", "stop": 0.5}


@pytest.mark.parametrize("name", GUIDERS)
def test_every_allowed_guider_samples_packed_grids_with_an_interval(name):
    """Each guider gridgen allows works on packed latents (B, N, 64), with an interval (the conditional half alone on
    the unguided steps) and guidance_rescale, and gives finite grids unlike true CFG's; APG's momentum acts."""
    from gridgen.inference import sample_grid

    pipe, layout = tiny_pipe(), resolve_layout("4x4", 128)
    sampler = GridSampler(pipe, MAX_SEQ)
    text, negative = sampler.encode_text([layout.caption("a red circle")] * 2), sampler.encode_text([""])
    noise = initial_noise([2, 3], layout)
    batches = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, kw, out: batches.append(kw["hidden_states"].shape[0]),
                                                  with_kwargs=True)
    extra = {"zero_init_steps": 0} if name == "ClassifierFreeZeroStarGuidance" else {}
    out = sample_grid(pipe.transformer, pipe.scheduler, layout, text, noise, steps=4, true_cfg_scale=3.0,
                      negative=negative, guider={"name": name, "stop": 0.5, "guidance_rescale": 0.5, **extra})
    hook.remove()
    assert batches == [4, 4, 2, 2] and out.shape == noise.shape and torch.isfinite(out).all()
    plain = sample_grid(pipe.transformer, pipe.scheduler, layout, text, noise, steps=4, true_cfg_scale=3.0,
                        negative=negative)
    assert (out - plain).abs().max() > 1e-3
    if name == "AdaptiveProjectedGuidance":
        apg = {"name": name, "eta": 0.0}
        runs = [sample_grid(pipe.transformer, pipe.scheduler, layout, text, noise, steps=4, true_cfg_scale=3.0,
                            negative=negative, guider={**apg, **m}) for m in
                ({}, {"adaptive_projected_guidance_momentum": -0.5})]
        assert (runs[0] - runs[1]).abs().max() > 1e-4  # the momentum carries from step to step


def test_non_finite_samples_are_refused_not_written(tmp_path, monkeypatch):
    """A sample that comes out NaN (e.g. a guider's arithmetic) ends the command with one line; no grid is written."""
    real = GridSampler.sample
    monkeypatch.setattr(GridSampler, "sample", lambda self, *a, **kw: real(self, *a, **kw) * float("nan"))
    with pytest.raises(ValueError, match=r"non-finite latents \(NaN/inf\) for \['a red circle'\]"):
        generate(gen_cfg(tmp_path, "prompt='a red circle'", "generate.steps=1", "export.mp4=false",
                         "export.gif=false"))
    assert not list((tmp_path / "out").rglob("*.png"))


@pytest.mark.parametrize("overrides, message", [
    (["generate.guider={name:ClassifierFreeGuidance}"], "set generate.true_cfg_scale > 1"),
    (["generate.true_cfg_scale=3", "generate.guider={name:PerturbedAttentionGuidance}"],
     "generate.guider.name must be one of"),
    (["generate.true_cfg_scale=3", "generate.guider={name:ClassifierFreeGuidance,guidance_scale:5}"],
     "takes its scale from generate.true_cfg_scale"),
    (["generate.true_cfg_scale=3", "generate.guider={name:ClassifierFreeGuidance,stpo:0.5}"], r"does not take \['stpo'\]"),
    (["generate.true_cfg_scale=3", "generate.guider=cfg"], "generate.guider takes {name: <guider>"),
    (["generate.true_cfg_scale=3", "generate.guider={name:ClassifierFreeZeroStarGuidance,guidance_rescale:0.7}"],
     "set zero_init_steps: 0 or drop guidance_rescale"),
    (["generate.true_cfg_scale=3", "generate.guider={name:ClassifierFreeGuidance,stop:fast}"],
     "ClassifierFreeGuidance refused"),
])
def test_guider_refusals_name_the_value_before_loading(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        check_config(gen_cfg(tmp_path, "prompt=x", *overrides))


def i2v_start(sampler: GridSampler, layout: GridLayout, seed: int = 0):
    ref = torch.rand(1, 3, layout.cell_height, layout.cell_width, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    frames, keep = initial_frames(TaskSpec("i2v", init="expand", reference="image", keep="reference"), layout, ref)
    init = sampler.encode_grid(layout.tile(frames)[None])  # (1, N, 64)
    return init, keep_tokens(layout, keep)


@pytest.mark.parametrize("mode", ["noised", "clean"])
def test_mask_keeps_reference_cells_exactly(mode):
    pipe = tiny_pipe()
    sampler, layout = GridSampler(pipe, MAX_SEQ), resolve_layout("4x4", 128)
    init, keep = i2v_start(sampler, layout)
    assert keep.sum().item() == layout.cell_tokens  # one cell: the reference
    text = sampler.encode_text([layout.caption("a green circle bounces")])
    noise = initial_noise([3], layout)
    seen = []
    out = sampler.sample(layout, text, [3], steps=6, T=0.9, init=init, keep=keep, mask_mode=mode,
                         callback=lambda i, sigma, x: seen.append((sigma.item(), x.clone())))
    k = keep.expand_as(out)
    assert torch.equal(out[k], init[k])  # eq. (11): the reference cell ends as the encoded reference, exactly
    assert (out[~k] - init[~k]).abs().mean() > 1e-2  # the other cells were generated
    sigma0, x0 = seen[0]
    assert sigma0 == pytest.approx(0.9, abs=1e-6)
    # eq. (9): every token starts at (1 - T) init + T eps; kept tokens are the reference at sigma (noised) or clean
    torch.testing.assert_close(x0[~k], ((1 - sigma0) * init + sigma0 * noise)[~k], rtol=0, atol=1e-6)
    for sigma, x in seen:
        target = noised(init, noise, sigma) if mode == "noised" else init
        assert torch.equal(x[k], target[k])


def test_mask_modes_differ_and_unmasked_i2v_drifts():
    pipe = tiny_pipe()
    sampler, layout = GridSampler(pipe, MAX_SEQ), resolve_layout("4x4", 128)
    init, keep = i2v_start(sampler, layout)
    text = sampler.encode_text([layout.caption("a green circle bounces")])
    runs = {mode: sampler.sample(layout, text, [3], steps=4, T=0.9, init=init, keep=keep, mask_mode=mode)
            for mode in ("noised", "clean")}
    free = sampler.sample(layout, text, [3], steps=4, T=0.9, init=init)
    k = keep.expand_as(free)
    assert (runs["noised"] - runs["clean"]).abs().max() > 1e-3
    assert (free[k] - init[k]).abs().max() > 1e-3  # without the mask the reference cell is not kept
