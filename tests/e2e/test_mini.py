"""`make mini` end to end at a toy size (slow: a few minutes on 2 cores, `make mini` run six times): the world's
shards, a VAE, a base model trained in full, a grid LoRA per variant and the base without one, all evaluated, one
report; the build is cached and reused, a finished report is never overwritten, a killed folder continues unless a
finished run was trained or evaluated with another config."""

from __future__ import annotations

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
TOY_ARGS = ("'build.base=[\"trainer.max_steps=2\",\"trainer.val_check_interval=2\"]' "
            "'runs.train=[\"trainer.max_steps=2\",\"trainer.val_check_interval=2\"]'")


def make_mini(tmp_path: Path, *args: str, extra_args: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE") and k != "ARGS"}
    env.update(GRIDGEN_CACHE=str(tmp_path / "cache"), GRIDGEN_ROOT=str(tmp_path), WANDB_MODE="offline",
               ARGS=f"{TOY_ARGS} {extra_args}")
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
