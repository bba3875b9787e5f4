"""Omni inference on the embedded tiny FLUX: diffusers parity, masks, eq. 8/9 initialisation, LoRA, cameras, export, CLI."""

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from hydra import compose, initialize_config_dir
from PIL import Image
from safetensors.torch import load_file

from gridgen.cameras import camera_circle
from gridgen.config import CONF_DIR, USER_ERRORS
from gridgen.embedded import TINY_FLUX_CONFIG, ensure_tiny_flux
from gridgen.generate import generate
from gridgen.inference import (
    GridSampler,
    TaskSpec,
    export_sample,
    flux_schedule,
    initial_frames,
    initial_noise,
    keep_tokens,
    read_requests,
    reference_frames,
    resolve_layout,
)
from gridgen.inference import pipeline as inference_pipeline
from gridgen.inference.budget import LargeGenerationError, measure_grid_cost
from gridgen.inference.export import grid_frames
from gridgen.inference.sampler import noised
from gridgen.layout import GridLayout
from gridgen.models.loading import load_flux_pipeline
from gridgen.models.lora import LoraFileError, apply_lora, attach_lora, build_lora_config, save_lora

MAX_SEQ = 32  # conf/model/flux_tiny.yaml
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model is latency-bound; one thread keeps timings sane on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_pipe() -> FluxPipeline:
    pipe = load_flux_pipeline(ensure_tiny_flux())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen_cfg(tmp: Path, *overrides: str):
    """Compose conf/generate.yaml with the overrides a command line gives Hydra."""
    args = [f"paths.root_dir={tmp}", f"paths.output_dir={tmp}/run", f"generate.out={tmp}/out",
            "generate.progress=false", *overrides]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("generate", overrides=args)


def save_images(folder: Path, count: int, size: tuple[int, int], seed: int = 0, stem: str = "key") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(count):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{stem}_{k}.png")
    return folder


# ---- schedule --------------------------------------------------------------------------------------------
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


# ---- parity with diffusers ---------------------------------------------------------------------------
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


# ---- masks and initialisation -----------------------------------------------------------------------------
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


def test_interpolation_init_is_eq8_and_keyframes_are_kept(tmp_path):
    layout = GridLayout(3, 4, 16, 16)
    for count in (3, 4):  # one keyframe per row, or with the end keyframe
        keys = torch.rand(count, 3, 16, 16) * 2 - 1
        spec = TaskSpec("interpolate", init="interpolate", reference="keyframes", keep="reference")
        frames, keep = initial_frames(spec, layout, keys)
        n = layout.cols
        for i in range(layout.rows):  # eq. (8) written plainly: I_ij = (1 - j/n) I_i0 + (j/n) I_(i+1)0
            nxt = keys[i + 1] if i + 1 < count else keys[i]
            for j in range(n):
                expected = (1 - j / n) * keys[i] + (j / n) * nxt
                torch.testing.assert_close(frames[i * n + j], expected, rtol=0, atol=1e-6)
                assert keep[i * n + j].item() == (j == 0)
    # keyframes from a folder come in natural name order (key_10 after key_2), resized to the cell
    folder = tmp_path / "keys"
    save_images(folder, 11, (32, 32))
    frames = reference_frames(TaskSpec("interpolate", init="interpolate", reference="keyframes", keep="reference"),
                              GridLayout(10, 2, 16, 16), folder)
    key_10 = np.asarray(Image.open(folder / "key_10.png").resize((16, 16), Image.Resampling.BICUBIC), np.float32)
    torch.testing.assert_close(frames[10], torch.from_numpy(key_10).permute(2, 0, 1) / 127.5 - 1)


def test_expansion_sequence_and_keep_tokens():
    layout = GridLayout(2, 3, 32, 16)
    ref = torch.rand(1, 3, 32, 16)
    frames, keep = initial_frames(TaskSpec("i2v", init="expand", reference="image", keep="reference"), layout, ref)
    assert all(torch.equal(f, ref[0]) for f in frames) and keep.tolist() == [True] + [False] * 5
    seq = torch.rand(6, 3, 32, 16)
    frames, keep = initial_frames(TaskSpec("edit", init="sequence", reference="sequence"), layout, seq)
    assert torch.equal(frames, seq) and not keep.any()
    cells = torch.tensor([True, False, False, True, False, True])
    tokens = keep_tokens(layout, cells)  # (1, N, 1)
    per_cell = layout.tokens_to_cells(tokens.float())  # (1, F, cell_tokens, 1)
    assert per_cell.shape[2] == layout.cell_tokens
    assert torch.equal(per_cell.amin(dim=(2, 3))[0].bool(), cells) and torch.equal(per_cell.amax(dim=(2, 3))[0].bool(), cells)


# ---- LoRA ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A LoRA trained by gridgen.train (2 steps, large learning rate so that it moves)."""
    from gridgen.train import train

    tmp = tmp_path_factory.mktemp("lora_run")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.root_dir={tmp}", f"paths.output_dir={tmp}/run", "logger=csv",
                                          "trainer.enable_progress_bar=false", "trainer.max_steps=2",
                                          "optim.lr=1e-2", "lora.rank=4"])
    train(cfg)
    return tmp / "run"


def test_lora_changes_output_scale_zero_is_base_and_matches_diffusers(lora_run):
    layout = resolve_layout("4x4", 128)
    caption = layout.caption("a red circle moves from left to right")

    def run(lora=None, scale=1.0):
        pipe = tiny_pipe()
        info = apply_lora(pipe.transformer, lora, scale) if lora else None
        sampler = GridSampler(pipe, MAX_SEQ)
        return sampler.sample(layout, sampler.encode_text([caption]), [0], steps=6), info

    base, _ = run()
    tuned, info = run(lora_run)  # a run folder -> its lora/ export
    assert info["rank"] == 4 and info["gridgen_stage"] == "coarse" and info["path"].endswith("lora/pytorch_lora_weights.safetensors")
    assert (tuned - base).abs().max() > 1e-3  # the trained LoRA changes the output
    assert torch.equal(run(lora_run, scale=0.0)[0], base)  # lora_scale=0 is the base model
    from_ckpt, ckpt_info = run(lora_run / "checkpoints" / "last.ckpt")
    assert ckpt_info["path"].endswith(".ckpt") and torch.equal(from_ckpt, tuned)  # the checkpoint holds the same LoRA
    half, _ = run(lora_run / "lora" / "pytorch_lora_weights.safetensors", scale=0.5)
    assert 0 < (half - base).abs().max() < (tuned - base).abs().max()

    pipe = tiny_pipe()
    pipe.load_lora_weights(lora_run / "lora")  # diffusers' own loader on the same file
    theirs = pipe(caption, height=128, width=128, num_inference_steps=6, guidance_scale=3.5,
                  generator=torch.Generator().manual_seed(0), max_sequence_length=MAX_SEQ, output_type="latent").images
    torch.testing.assert_close(tuned, theirs, rtol=0, atol=1e-6)


def test_lora_for_another_model_names_the_key(tmp_path):
    other = FluxTransformer2DModel(**{**TINY_FLUX_CONFIG, "num_layers": 3})  # one more double block
    targets = ["attn.to_q", "attn.to_k"]
    attach_lora(other, build_lora_config(4, 4, 0.0, "gaussian", targets))
    save_lora(tmp_path / "other", other)
    with pytest.raises(LoraFileError, match=r"trained for another model: the model has no 'transformer_blocks\.2\.attn\.to_"):
        apply_lora(tiny_pipe().transformer, tmp_path / "other")
    wider = FluxTransformer2DModel(**{**TINY_FLUX_CONFIG, "num_attention_heads": 8})  # width 128, not 64
    attach_lora(wider, build_lora_config(4, 4, 0.0, "gaussian", targets))
    save_lora(tmp_path / "wider", wider)
    with pytest.raises(LoraFileError, match=r"'(single_)?transformer_blocks\.0\.attn\.to_[qk]\.lora_A\.weight' has shape \(4, 128\), this model's is \(4, 64\)"):
        apply_lora(tiny_pipe().transformer, tmp_path / "wider")


# ---- export ------------------------------------------------------------------------------------------------
def test_export_writes_frames_videos_and_cameras(tmp_path):
    layout = GridLayout(2, 3, 32, 48)
    grid = np.random.default_rng(0).integers(0, 256, (layout.height, layout.width, 3), dtype=np.uint8)
    files = export_sample(tmp_path / "s", grid, layout, kind="multiview", fps=6,
                          cameras=camera_circle(6))
    assert np.array_equal(np.asarray(Image.open(tmp_path / files["grid"])), grid)
    assert len(files["views"]) == 6
    for k, name in enumerate(files["views"]):  # film-strip order: view k = cell (k // cols, k % cols)
        row, col = divmod(k, layout.cols)
        cell = grid[row * 32:(row + 1) * 32, col * 48:(col + 1) * 48]
        assert np.array_equal(np.asarray(Image.open(tmp_path / name)), cell)
    with av.open(str(tmp_path / files["mp4"])) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert container.streams.video[0].average_rate == 6
    assert len(decoded) == 6 and decoded[0].shape == (32, 48, 3)
    with Image.open(tmp_path / files["gif"]) as gif:
        assert gif.n_frames == 6 and gif.size == (48, 32) and gif.info["duration"] == 170  # 1/6 s in GIF's centiseconds
    assert json.loads((tmp_path / files["cameras"]).read_text()) == camera_circle(6)
    assert np.array_equal(grid_frames(grid, layout)[4], grid[32:64, 48:96])


def test_readme_names_the_files_generate_writes(tmp_path):
    """Every file or folder export_sample writes, for video and multi-view, is named in the README's Output text."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("Output (`generate.out`")
    output = readme[start:readme.index("\n\n", start)]
    layout = GridLayout(2, 2, 16, 16)
    grid = np.zeros((32, 32, 3), np.uint8)
    for kind in ("video", "multiview"):
        files = export_sample(tmp_path / kind, grid, layout, kind=kind,
                              cameras=camera_circle(layout.num_cells) if kind == "multiview" else None)
        names = {Path(v[0]).parts[1] + "/" if isinstance(v, list) else Path(v).parts[1] for v in files.values()}
        assert names == ({"grid.png", "views/", "views.mp4", "views.gif", "cameras.json"} if kind == "multiview" else
                         {"grid.png", "frames/", "frames.mp4", "frames.gif"})
        missing = sorted(name for name in names if not re.search(rf"[`/]{re.escape(name)}`", output))
        assert not missing, f"README's Output paragraph does not name {missing} ({kind})"


# ---- requests ----------------------------------------------------------------------------------------------
def test_prompts_file_lines_json_lines_and_seeds(tmp_path):
    path = tmp_path / "p.txt"
    (tmp_path / "dog.png").touch()  # found next to the prompts file; default.png is read from the working directory
    path.write_text('# header\n\na cat walks\n{"prompt": "a dog runs", "ref": "dog.png", "seed": 42}\na bird, flying\n')
    requests = read_requests(None, str(path), "default.png", seed=10)
    assert [(r.prompt, r.seed, r.ref) for r in requests] == [
        ("a cat walks", 10, "default.png"), ("a dog runs", 42, str(tmp_path / "dog.png")), ("a bird, flying", 12, "default.png")]
    with pytest.raises(ValueError, match="no prompt"):
        read_requests(None, None, None, 0)
    path.write_text('{"prompt": 3}\n')
    with pytest.raises(ValueError, match=r"p.txt:1: a JSON line needs a \"prompt\" string"):
        read_requests(None, str(path), None, 0)


def test_old_spellings_are_refused_with_the_new_one():
    """Nothing rewrites the command line: a key spelled the old way (when `task`/`lora` were rewritten) stops with one
    line naming the new spelling, and the new spellings compose as typed."""
    from gridgen.config import refuse_renamed_keys

    for old, new in (("lora.scale=0", "write lora_scale=0"), ("lora.path=runs/x", "write lora=runs/x"),
                     ("generate_task@task=i2v", "write task=i2v"), ("eval_task=i2v", "write task=i2v"),
                     ("gen.lora=a,b", "write lora=a,b"), ("steps=2", "write generate.steps=2")):
        with pytest.raises(ValueError, match=re.escape(new)) as info:
            refuse_renamed_keys(["-m", "prompt=x", old])
        assert "\n" not in str(info.value) and str(info.value).startswith(f"'{old}'")
    refuse_renamed_keys(["task=i2v", "lora=runs/x", "lora_scale=0", "prompt='a, b'", "--cfg", "job"])  # no error
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("generate", overrides=["task=i2v", "lora=runs/x", "lora_scale=0",
                                              "prompt='a dog\\'s tail, running'", "ref=[a.png,b.png]"])
    assert (cfg.task.name, cfg.task.init, cfg.T, cfg.lora, cfg.lora_scale) == ("i2v", "expand", 0.9, "runs/x", 0)
    assert cfg.prompt == "a dog's tail, running" and list(cfg.ref) == ["a.png", "b.png"]


def test_task_rows_share_one_schema():
    """conf/task is one table: every row has the same keys; the tasks that generate, evaluate and train are the ones
    the README lists, and a row's evaluation and generation fields agree (frames = the layout's cells)."""
    from gridgen.config import task_table, tasks_with

    table = task_table()
    assert len({tuple(row) for row in table.values()}) == 1, {name: list(row) for name, row in table.items()}
    assert set(tasks_with("init")) == {"t2v", "t2v_64", "i2v", "interpolate", "t2mv", "i2mv", "edit", "style", "restore",
                                       "mini", "t2i"}
    assert set(tasks_with("metrics")) == {"t2v", "t2v_64", "i2v", "interpolate", "t2mv", "i2mv", "mini", "t2i"}
    for name, row in table.items():
        assert row.name == name and row.data_subset == row.kind
        if row.metrics is not None:
            rows, cols = (int(x) for x in str(row.layout).split("x"))
            assert row.frames == rows * cols, (name, row.frames, row.layout)


# ---- the generate() entry: every task, any layout ----------------------------------------------------------
@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("refs")
    save_images(tmp / "img", 1, (40, 40), stem="ref")
    save_images(tmp / "keys", 5, (32, 32), seed=1)
    save_images(tmp / "frames", 20, (48, 48), seed=2, stem="frame")
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(tmp / "grid.png")
    frames = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    from gridgen.inference.export import write_mp4
    write_mp4(tmp / "clip.mp4", frames, fps=8)
    Image.fromarray(rng.integers(0, 256, (32, 128, 3), dtype=np.uint8)).save(tmp / "panorama.png")
    return tmp


CASES = [  # task, extra overrides, frames, kept cells
    ("t2v", [], 16, 0),
    ("t2v", ["layout=4x8"], 32, 0),  # an untrained layout (A.7.2)
    ("i2v", ["ref={refs}/img/ref_0.png"], 16, 1),
    ("interpolate", ["ref={refs}/keys"], 16, 4),
    ("t2mv", [], 24, 0),
    ("i2mv", ["ref={refs}/img/ref_0.png", "mask.mode=clean"], 24, 1),
    ("edit", ["ref={refs}/frames"], 16, 0),
    ("style", ["ref={refs}/clip.mp4"], 16, 0),
    ("restore", ["ref={refs}/grid.png", "T=0.8"], 16, 0),
]


@pytest.mark.parametrize("task, extra, frames, kept", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_every_task_generates_and_exports(tmp_path, refs, task, extra, frames, kept):
    cfg = gen_cfg(tmp_path, f"task={task}", "prompt=a red circle", "generate.steps=2", "export.latents=true",
                  "export.gif=false", *[e.format(refs=refs) for e in extra])
    manifest = generate(cfg)
    sample = manifest["samples"][0]
    folder = tmp_path / "out" / sample["folder"]
    stem = "views" if task.endswith("mv") else "frames"
    assert len(sample["files"][stem]) == frames and (folder / f"{stem}.mp4").is_file()
    rows, cols = map(int, manifest["layout"]["name"].split("x"))
    assert sample["caption"].startswith(f"A {frames}-frame sequence arranged in a {rows}x{cols} grid.")
    assert manifest["T"] == cfg.T and manifest["steps"] == 2 and manifest["guidance"] == 3.5
    assert manifest["timing"]["per_frame_s"] > 0 and sample["seed"] == 0
    tensors = load_file(folder / "latents.safetensors")
    if kept:
        assert tensors["keep"].sum().item() == kept * 4  # 32 px cells: 2x2 tokens each
        keep = tensors["keep"].expand_as(tensors["latents"])
        assert torch.equal(tensors["latents"][keep], tensors["init"][keep])
    else:
        assert "keep" not in tensors and manifest["mask"] is None
    if task.endswith("mv"):
        cameras = json.loads((folder / "cameras.json").read_text())
        assert cameras == camera_circle(24)  # generate.yaml's defaults: Table 5, radius 2; view k = frame k
        assert "Each frame captures a 3D model of a red circle from a different angle" in sample["caption"]


@pytest.mark.parametrize("args, message", [
    (["T=1.5", "task=i2v", "ref={refs}/img/ref_0.png"], r"T must be in \(0, 1\]"),
    (["T=0", "task=edit", "ref={refs}/frames"], r"T must be in \(0, 1\]"),
    (["T=0.9"], "task t2v starts from pure noise, so T must be 1"),
    (["layout=5x5"], r"layout 5x5 needs a grid height divisible by 80 px .* got 128; set generate.height=160"),
    (["layout=4x4", "generate.height=100"], "layout 4x4 needs a grid height divisible by 64 px"),
    (["layout=4x6", "generate.width=1000"], "layout 4x6 needs a grid width divisible by 96 px"),
    (["layout=16x16"], "layout 16x16 needs a grid height divisible by 256 px"),
    (["layout=4by4"], "layout must look like '<rows>x<cols>'"),
    (["task=interpolate", "ref=[{refs}/keys/key_0.png,{refs}/keys/key_1.png]"], "too few keyframes for layout 4x4"),
    (["task=i2v", "ref={refs}/panorama.png"], r"a center crop would keep only 25% of it"),
    (["task=i2v", "ref={refs}/missing.png"], "reference '.*missing.png' does not exist"),
    (["task=i2v"], "this task needs a reference"),
    (["task=edit", "ref={refs}/keys"], "needs 16 frames"),
    (["mask.mode=soft", "task=i2v", "ref={refs}/img/ref_0.png"], "mask.mode must be one of"),
    (["lora={refs}"], "is not a LoRA file, a .ckpt or a training run folder"),
    (["model.pretrained=/nonexistent/flux"], "model folder '/nonexistent/flux' does not exist"),
])
def test_bad_input_is_a_clear_error(tmp_path, refs, args, message):
    cfg = gen_cfg(tmp_path, "prompt=a red circle", *[a.format(refs=refs) for a in args])
    with pytest.raises(USER_ERRORS, match=message):
        generate(cfg)


def test_flux_dev_config_gives_the_papers_grid_sizes(tmp_path):
    from omegaconf import OmegaConf

    for task, layout, cell in (("t2v", "4x4", 256), ("t2v", "8x8", 128), ("t2mv", "4x6", 256), ("i2v", "4x8", 256)):
        cfg = gen_cfg(tmp_path, "model=flux_dev", f"task={task}", f"layout={layout}")
        plain = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves without a data group
        assert plain["model"]["cached"] is False and plain["generate"]["max_sequence_length"] == 512
        grid = resolve_layout(cfg.layout, cfg.generate.grid_heights[cfg.model.name])
        assert (grid.cell_height, grid.cell_width, grid.height) == (cell, cell, 1024)


def test_wrong_aspect_reference_is_cropped_with_a_warning(tmp_path, refs, caplog):
    Image.new("RGB", (60, 40), (200, 10, 10)).save(tmp_path / "wide.png")
    manifest = generate(gen_cfg(tmp_path, "task=i2v", f"ref={tmp_path / 'wide.png'}", "prompt=x", "generate.steps=1",
                                "export.mp4=false", "export.gif=false", "export.frames=false"))
    assert "center-cropped to 67% of it" in caplog.text and len(manifest["samples"]) == 1


# ---- large grids and timing -------------------------------------------------------------------------------
def test_large_grid_is_refused_with_a_measured_estimate(tmp_path, monkeypatch):
    """Over generate.large: one line, nothing written, and an estimate that follows the measured step cost."""
    sample = GridSampler.sample

    def slow_sample(self, *args, **kwargs):  # each denoising step costs 0.2 s more than the tiny model's own
        time.sleep(0.2 * kwargs["steps"])
        return sample(self, *args, **kwargs)

    monkeypatch.setattr(GridSampler, "sample", slow_sample)
    cfg = gen_cfg(tmp_path, "prompt=a red circle", "layout=8x8", "generate.large.frames=32", "generate.steps=5")
    with pytest.raises(LargeGenerationError) as refused:
        generate(cfg)
    message = str(refused.value)
    assert isinstance(refused.value, USER_ERRORS) and "\n" not in message
    assert "64 frames per grid > generate.large.frames=32" in message and "set generate.allow_large=true" in message
    step_s = float(re.search(r"5 steps x ([\d.]+) s", message)[1])
    assert step_s >= 0.2 and re.search(r"would take about \d+ s", message) and " MB (" in message
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_large_grid_disk_estimate_matches_what_is_written(tmp_path):
    """The probe's bytes (32 of 64 frames exported, scaled) against the files a real run writes."""
    cfg = gen_cfg(tmp_path, "prompt=a red circle", "layout=8x8", "generate.large.frames=32", "generate.steps=2",
                  "generate.allow_large=true")
    manifest = generate(cfg)  # allowed: runs
    folder = tmp_path / "out" / manifest["samples"][0]["folder"]
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert len(files) == 64 + 3  # frames, grid.png, frames.mp4, frames.gif
    layout = resolve_layout("8x8", 128)
    sampler = GridSampler(tiny_pipe(), MAX_SEQ)
    cost = measure_grid_cost(sampler, layout, "a red circle", 0, 3.5, cfg.export, tmp_path)
    written = sum(p.stat().st_size for p in files)
    assert 0.7 * written < cost.bytes < 1.3 * written, (cost.bytes, written)
    on_disk = sum(-(-p.stat().st_size // cost.block) * cost.block for p in files)
    assert 0.7 * on_disk < cost.disk_bytes < 1.3 * on_disk, (cost.disk_bytes, on_disk)


def test_timing_names_sampling_and_writing_and_agrees_with_the_bar(tmp_path, monkeypatch):
    """sample_s (sampling + decoding) and export_s (files) per grid, total_s = what the progress bar measured."""
    export = inference_pipeline.export_sample

    def slow_export(*args, **kwargs):
        time.sleep(0.3)
        return export(*args, **kwargs)

    elapsed = []

    class RecordingBar(inference_pipeline.tqdm):
        def close(self):
            elapsed.append(self.format_dict["elapsed"])
            super().close()

    monkeypatch.setattr(inference_pipeline, "export_sample", slow_export)
    monkeypatch.setattr(inference_pipeline, "tqdm", RecordingBar)
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    manifest = generate(gen_cfg(tmp_path, f"prompts_file={tmp_path / 'prompts.txt'}", "generate.steps=2",
                                "generate.progress=true", "export.gif=false"))
    timing = manifest["timing"]
    for sample in manifest["samples"]:
        t = sample["timing"]
        assert t["export_s"] >= 0.3 and t["total_s"] == pytest.approx(t["sample_s"] + t["export_s"], abs=0.05)
    assert timing["per_grid_s"] == pytest.approx(timing["sampling_s"] / 2, abs=1e-3)
    assert timing["per_grid_export_s"] >= 0.3
    assert timing["per_grid_total_s"] == pytest.approx(timing["per_grid_s"] + timing["per_grid_export_s"], abs=0.05)
    assert timing["per_grid_total_s"] * 2 == pytest.approx(elapsed[0], abs=0.05)


# ---- the command line --------------------------------------------------------------------------------------
def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "GRIDGEN_ROOT": str(cwd), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "gridgen.generate", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=180)


def test_a_failed_generate_leaves_no_folder(tmp_path):
    """A mistake (a LoRA that does not exist) is one line, exit 2, and no outputs/generate/<date>/<time>_... folder
    of Hydra's files is left behind."""
    proc = run_cli("prompt=x", "lora=/no/such/lora", cwd=tmp_path)
    assert proc.returncode == 2 and "/no/such/lora" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "outputs").exists(), sorted(tmp_path.rglob("*"))


def test_cli_i2v_with_lora_and_literal_prompt(tmp_path, refs, lora_run):
    prompt = "a dog's tail, wagging [fast]"  # quoted for Hydra as the README shows: prompt="'a dog\\'s tail, ...'"
    proc = run_cli("task=i2v", "prompt='a dog\\'s tail, wagging [fast]'", f"ref={refs}/img/ref_0.png", f"lora={lora_run}",
                   "lora_scale=0.5",
                   "seed=5", "generate.steps=2", f"generate.out={tmp_path}/out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"output folder  {tmp_path}/out" in proc.stdout and "s per grid: sampling + decoding" in proc.stdout
    assert re.search(r"writing files [\d.]+ s", proc.stdout)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    sample = manifest["samples"][0]
    assert sample["prompt"] == prompt and sample["seed"] == 5 and manifest["task"] == "i2v" and manifest["T"] == 0.9
    assert manifest["lora"]["scale"] == 0.5 and manifest["lora"]["rank"] == 4
    assert (tmp_path / "out" / sample["files"]["mp4"]).is_file() and (tmp_path / "out" / sample["files"]["gif"]).is_file()


def test_cli_bad_input_is_one_line_and_nonzero_exit(tmp_path, refs):
    proc = run_cli("task=interpolate", "prompt=x", f"ref={refs}/img", f"generate.out={tmp_path}/out", cwd=tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("gridgen.generate: error:")]
    assert len(errors) == 1 and "too few keyframes for layout 4x4" in errors[0] and "Traceback" not in proc.stderr


def test_make_generate_echoes_the_values_it_passes():
    """`make generate` prints the command with the prompt's value (not `"prompt=$prompt"`), and that printed line,
    run by bash as make runs it, hands Hydra the typed values: prompt= and ref= quoted for Hydra by the Makefile."""
    prompt = 'a dog\'s tail, "wagging" [fast] & (more); 100% #1'
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE") and k != "ARGS"}
    dry = subprocess.run(["make", "-n", "generate", f"prompt={prompt}", "ref=dog.png", "seed=3", "layout=4x8",
                          "generate.steps=1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    recipe = re.sub(r"\\\n\s*", " ", dry.stdout)  # make echoes the recipe's continuation lines as written
    (line,) = [ln for ln in recipe.splitlines() if ln.startswith(".venv/bin/python -m gridgen.generate")]
    assert "$prompt" not in line and "prompt=" in line and "a dog" in line
    argv = subprocess.run(["bash", "+B", "-c", "printf '%s\\0' " + line.removeprefix(".venv/bin/python ")],
                          capture_output=True, text=True, timeout=60).stdout.split("\0")[:-1]
    from hydra.core.override_parser.overrides_parser import OverridesParser

    assert argv[:2] == ["-m", "gridgen.generate"] and argv[3:] == ["ref='dog.png'", "layout=4x8", "seed=3",
                                                                   "generate.steps=1"]
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(argv[2:])}
    assert parsed["prompt"] == prompt and parsed["ref"] == "dog.png"  # what Hydra reads is what was typed


@pytest.mark.slow
def test_cli_layout_hint_leads_to_the_large_refusal_not_a_run(tmp_path):
    """The issue's path: layout=100x100 is refused with `set generate.height=1600`; following that hint gives the
    large-grid refusal with its estimate (one line, exit 2, no output folder), not a 10,000-file run."""
    proc = run_cli("prompt=x", "layout=100x100", f"generate.out={tmp_path}/out", cwd=tmp_path)
    assert proc.returncode == 2 and "set generate.height=1600" in proc.stderr, proc.stderr[-2000:]
    proc = run_cli("prompt=x", "layout=100x100", "generate.height=1600", f"generate.out={tmp_path}/out", cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("gridgen.generate: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "10,000 frames per grid" in errors[0] and "would take about" in errors[0] and "MB" in errors[0]
    assert "set generate.allow_large=true" in errors[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_multirun_with_the_default_sweep_folder(tmp_path):
    """`generate -m` as the README prints it: no hydra.sweep.dir, no GRIDGEN_ROOT; outputs land under <cwd>/outputs."""
    env = {k: v for k, v in os.environ.items() if k != "GRIDGEN_ROOT"}
    proc = subprocess.run([sys.executable, "-m", "gridgen.generate", "-m", "seed=1,2", "prompt=x", "generate.steps=1"],
                          cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifests = sorted((tmp_path / "outputs" / "generate_sweeps").glob("*/*/manifest.json"))
    assert [m.parent.name for m in manifests] == ["0", "1"], proc.stdout[-2000:]
    seeds = [json.loads(m.read_text())["samples"][0]["seed"] for m in manifests]
    assert seeds == [1, 2] and all((m.parent / "000_x" / "grid.png").is_file() for m in manifests)


# ---- the benchmark ----------------------------------------------------------------------------------------
def test_bench_quick_and_results_section(tmp_path, capsys, monkeypatch):
    import importlib.util

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))  # its `import harness`, as `python bench/...`
    spec = importlib.util.spec_from_file_location("bench_generate", Path(__file__).parents[1] / "bench" / "bench_generate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = tmp_path / "RESULTS.md"
    results.write_text("# benchmarks\n\n<!-- bench:cpu-float32-b1 -->\ntraining numbers\n<!-- /bench:cpu-float32-b1 -->\n")
    for _ in range(2):  # a second run replaces its own block only
        assert bench.main(["--quick", "--layouts", "4x4", "--output", str(results)]) == 0
    out = capsys.readouterr().out
    ratio = float(re.search(r"\*\*ratio gridgen/diffusers \(worst layout\) = ([\d.]+)\*\*", out)[1])
    assert math.isfinite(ratio) and ratio > 0
    assert re.search(r"\| 4x4 \| 128x128 \| 64 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \([\d.]+-[\d.]+\) \| 0\.0e\+00 \|", out)
    text = results.read_text()
    assert text.startswith("# benchmarks\n\n<!-- bench:cpu-float32-b1 -->\ntraining numbers\n")
    assert text.count("<!-- bench:generate:start -->") == 1 and text.count("<!-- generate:tiny-cpu-float32 -->") == 1
    assert text.rstrip().endswith("<!-- bench:generate:end -->")
