"""`make mini` end to end at a toy size (slow: a few minutes on 2 cores, `make mini` run six times): the world's
shards, a VAE, a base model trained in full, a grid LoRA per variant and the base without one, all evaluated, one
report; the build is cached and reused, a finished report is never overwritten, a killed folder continues unless a
finished run was trained or evaluated with another config."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOY = ["build.data_scale=0.03", "build.vae.steps=3", "build.base_eval_frames=1", "runs.seeds=[0]", "eval.steps=2"]
# Lists of overrides hold quotes that make's own command-line variables would drop: they go through ARGS, which the
# recipe hands to the shell as written (as the README shows for `make mini`)
TOY_TRAIN = ("trainer.max_steps=2", "trainer.val_check_interval=2")


def make_mini(tmp_path: Path, *args: str, extra_args: str = "", train: tuple[str, ...] = TOY_TRAIN
              ) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE") and k != "ARGS"}
    toy = ("'build.base=[\"trainer.max_steps=2\",\"trainer.val_check_interval=2\"]' "
           "'runs.train=[" + ",".join(f'\"{override}\"' for override in train) + "]'")
    env.update(GRIDGEN_CACHE=str(tmp_path / "cache"), GRIDGEN_ROOT=str(tmp_path), WANDB_MODE="offline",
               ARGS=f"{toy} {extra_args}")
    return subprocess.run(["make", "-s", "-C", str(ROOT), "mini", *args], capture_output=True, text=True, env=env,
                          timeout=900)


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(tmp_path: Path, folder: Path, *args: str) -> str:
    """`make mini` refuses: exit 2, one error line (returned), every file under ``folder`` as it was."""
    before = digest(folder)
    result = make_mini(tmp_path, *args)
    errors = [line for line in result.stderr.splitlines() if line.startswith("gridgen.mini: error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert digest(folder) == before
    return errors[0]


@pytest.mark.slow
def test_make_mini_builds_once_trains_every_variant_and_writes_one_report(tmp_path):
    from PIL import Image

    from gridgen.embedded.mini_data import clips_layout
    from gridgen.embedded.mini_model import DEFAULT_BUILD

    first = make_mini(tmp_path, *TOY)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = tmp_path / "outputs" / "mini"
    report = (out / "report.md").read_text()
    assert "of its reconstructions as the same shape and colour" in report  # the VAE's kept identity
    for variant in ("no_flow", "filmstrip", "within_row", "base_without_lora"):
        assert f"| {variant} |" in report
        grids = sorted((out / variant / "seed0" / "grids").glob("*.png"))
        assert grids and all(g.with_suffix(".json").is_file() for g in grids)
        assert Image.open(grids[0]).size == (clips_layout().width, clips_layout().height)  # the test clips' size
        labels = json.loads(grids[0].with_suffix(".json").read_text())
        assert {"prompt", "shape", "color", "motion", "scores"} <= set(labels)
        assert labels["prompt"] == f"a {labels['color']} {labels['shape']} moves {labels['motion']}"
    assert (out / "report.png").is_file() and (out / "grids.png").is_file()
    assert "## Paired by seed (exploratory)" in report and "| paired difference | filmstrip - no_flow |" in report
    assert "[mini 1/12" in first.stdout and "eta" in first.stdout  # progress with an ETA
    (build,) = (tmp_path / "cache").glob(f"{DEFAULT_BUILD}-*")
    vae = json.loads((build / "build.json").read_text())["vae"]
    assert vae["steps"] == 3 and 0 <= vae["kept_identity"]["all"] <= 1 and vae["kept_identity"]["cells"] > 0
    assert (build / "base" / "model_index.json").is_file()

    # a finished report is never overwritten: one line, exit 2, every file as it was
    assert "never overwritten" in refused(tmp_path, out, *TOY)

    # a killed `make mini` continues: the cells it finished were made with the configs the code composes now
    cells = list(out.glob("*/seed*"))
    assert len(cells) == 4 and all((folder / "eval" / "config.yaml").is_file() for folder in cells)
    killed = tmp_path / "killed"
    shutil.copytree(out, killed)
    (killed / "report.md").unlink()
    shutil.rmtree(killed / "within_row")
    continued = make_mini(tmp_path, *TOY, f"out={killed}")
    assert continued.returncode == 0, continued.stdout[-3000:] + continued.stderr[-3000:]
    assert "train + evaluate within_row seed 0" in continued.stdout and "no_flow seed 0" not in continued.stdout
    assert (killed / "report.md").is_file()
    # ... and refuses to, in one line and touching nothing, when a finished run was trained with another preset
    (killed / "report.md").unlink()
    shutil.rmtree(killed / "within_row")
    config = killed / "no_flow" / "seed0" / "run" / "config.yaml"
    assert "  lr: 0.003\n" in config.read_text()
    config.write_text(config.read_text().replace("  lr: 0.003\n", "  lr: 0.001\n"))
    assert ("no_flow/seed0 was trained with optim.lr=0.001, and the config gives 0.003"
            in refused(tmp_path, killed, *TOY, f"out={killed}"))
    # ... or was evaluated with another sampling default
    config.write_text(config.read_text().replace("  lr: 0.001\n", "  lr: 0.003\n"))
    config = killed / "base_without_lora" / "seed0" / "eval" / "config.yaml"
    assert "  guidance: 3.5\n" in config.read_text()
    config.write_text(config.read_text().replace("  guidance: 3.5\n", "  guidance: 2.0\n"))
    assert ("base_without_lora/seed0 was evaluated with generate.guidance=2.0, and the config gives 3.5"
            in refused(tmp_path, killed, *TOY, f"out={killed}"))

    # another output folder reuses the cached build: no build step runs again
    second = make_mini(tmp_path, *TOY, "runs.base_without_lora=false", f"out={tmp_path / 'second'}",
                       extra_args="~runs.variants.no_flow ~runs.variants.within_row")  # filmstrip only
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "build " not in second.stdout and "[mini 1/1 " in second.stdout
    assert (tmp_path / "second" / "report.md").is_file()


@pytest.mark.slow
def test_a_killed_make_mini_goes_on_from_the_last_checkpoint_to_the_uninterrupted_result(tmp_path):
    """A cell that a killed `make mini` left half made (``.seed0.tmp``) goes on from its run's last checkpoint and
    ends with the LoRA and the figures of the uninterrupted cell; one killed during its evaluation is evaluated
    again without training. (The killed folders are made from a finished one as a kill leaves them: the run's
    checkpoint of step 2 as last.ckpt and no export, or the run finished and no evaluation. 5 steps, checkpoints
    every 2: the finished run's last.ckpt is of step 4.)"""
    import torch

    from gridgen.models.lora import LORA_FILE, read_lora_file

    train = ("trainer.max_steps=5", "trainer.val_check_interval=2", "callbacks.checkpoint.every_n_train_steps=2")
    args = (*TOY, "runs.base_without_lora=false")
    filmstrip = "~runs.variants.no_flow ~runs.variants.within_row"
    straight = make_mini(tmp_path, *args, f"out={tmp_path / 'straight'}", extra_args=filmstrip, train=train)
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    done = tmp_path / "straight" / "filmstrip" / "seed0"
    record = json.loads((done / "done.json").read_text())
    assert record["train"]["train/alpha"] > 0 and "resumed_from_step" not in record

    def killed(name: str, during_training: bool) -> Path:
        out = tmp_path / name
        shutil.copytree(tmp_path / "straight", out)
        (out / "report.md").unlink()
        cell = (out / "filmstrip" / "seed0").rename(out / "filmstrip" / ".seed0.tmp")
        (cell / "done.json").unlink()
        shutil.rmtree(cell / "grids")
        if during_training:  # after the checkpoint of step 2, before the export
            shutil.rmtree(cell / "eval")
            shutil.rmtree(cell / "run" / "lora")
            (cell / "run" / "summary.json").unlink()
            (cell / "run" / "checkpoints" / "step000004.ckpt").unlink()
            shutil.copy(cell / "run" / "checkpoints" / "step000002.ckpt", cell / "run" / "checkpoints" / "last.ckpt")
        return out

    for name, during_training, said in (("killed_training", True, "goes on from the checkpoint of step 2"),
                                        ("killed_eval", False, "finished training (step 5): it is evaluated again")):
        out = killed(name, during_training)
        continued = make_mini(tmp_path, *args, f"out={out}", extra_args=filmstrip, train=train)
        assert continued.returncode == 0, continued.stdout[-3000:] + continued.stderr[-3000:]
        assert said in continued.stdout and "build " not in continued.stdout
        cell = out / "filmstrip" / "seed0"
        again = json.loads((cell / "done.json").read_text())
        assert again["resumed_from_step"] == (2 if during_training else 5)
        resumes = sorted(p.name for p in (cell / "run").glob("config.resume-*.yaml"))  # gridgen.train's, in place
        assert resumes == (["config.resume-step2.yaml"] if during_training else [])
        if not during_training:  # the export is the one the killed command made
            exported = [folder / "run" / "lora" / LORA_FILE for folder in (cell, done)]
            assert exported[0].stat().st_mtime == exported[1].stat().st_mtime
        resumed, _ = read_lora_file(cell / "run" / "lora")
        uninterrupted, _ = read_lora_file(done / "run" / "lora")
        assert resumed.keys() == uninterrupted.keys()
        for key in uninterrupted:
            torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=1e-6, msg=key)
        assert again["held_out"] == pytest.approx(record["held_out"], rel=1e-4)
        assert again["train"] == pytest.approx(record["train"], rel=1e-4)
        # the held-out curve: each validation once, as the uninterrupted run logged it (the resumed process adds
        # only its own first step's data and time row)
        curves = [[(row["step"], row["val/loss_flow"]) for row in csv.DictReader(path.open()) if row["val/loss_flow"]]
                  for path in (cell / "run" / "metrics" / "metrics.csv", done / "run" / "metrics" / "metrics.csv")]
        assert len(curves[0]) == 2 and curves[0] == curves[1]
        for key in ("world_identity_all", "world_motion_all", "grids"):
            assert again["metrics"][key] == record["metrics"][key], key
        assert again["metrics"]["fvd"] == pytest.approx(record["metrics"]["fvd"], rel=1e-3)
        report = (out / "report.md").read_text()
        assert "1 of the 1 runs were made or begun by an earlier, stopped `make mini`" in report
        assert f"(steps after {2 if during_training else 5} only)" in report
        assert not list(out.glob("*/.*.tmp"))
