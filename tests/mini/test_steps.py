"""What the miniature's stages share (gridgen.mini.steps): step folders, the progress line."""

from __future__ import annotations

import logging

import pytest

from gridgen.mini.steps import Progress, is_done, step_folder, write_done


def test_a_step_folder_appears_only_when_its_step_succeeds(tmp_path):
    target = tmp_path / "vae"
    with pytest.raises(RuntimeError), step_folder(target) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed")
    assert not target.exists() and not list(tmp_path.iterdir())
    (tmp_path / ".vae.tmp").mkdir()  # a killed process's leftover
    (tmp_path / ".vae.tmp" / "stale").write_text("x")
    with step_folder(target) as tmp:
        assert not list(tmp.iterdir())
        write_done(tmp, {"psnr_db": 30.0})
    assert is_done(target) and sorted(p.name for p in tmp_path.iterdir()) == ["vae"]


def test_progress_names_the_step_and_estimates_from_measured_ones(caplog):
    progress = Progress({"a": 1.0, "b": 2.0, "c": 1.0})
    progress.skip("c")
    with caplog.at_level(logging.INFO, logger="gridgen.mini"):
        progress.start("a", "build a")
        progress.finish(seconds=60.0)
        progress.start("b", "build b")
    first, second = (r.getMessage() for r in caplog.records)
    assert first.startswith("[mini 1/2 |") and "eta after the first step" in first
    assert second.startswith("[mini 2/2 |") and "eta 2 min] build b" in second  # 60 s per unit x 2 units left


def test_a_step_folder_spares_work_to_continue_and_keeps_what_the_caller_continues(tmp_path):
    """``spare(tmp)``: a failed block's folder stays as a kill would leave it; ``keep``: the next entry keeps it."""
    target = tmp_path / "seed0"

    def spare(tmp):
        return (tmp / "run.ckpt").is_file()

    with pytest.raises(KeyboardInterrupt), step_folder(target, spare=spare) as tmp:
        (tmp / "eval").write_text("half")
        raise KeyboardInterrupt  # before a checkpoint: nothing spared
    assert not list(tmp_path.iterdir())
    with pytest.raises(KeyboardInterrupt), step_folder(target, spare=spare) as tmp:
        (tmp / "run.ckpt").write_text("step 2")
        raise KeyboardInterrupt
    assert (tmp / "run.ckpt").read_text() == "step 2" and not target.exists()
    with step_folder(target, keep=True) as again:  # the next command goes on from it
        assert again == tmp and (again / "run.ckpt").read_text() == "step 2"
        write_done(again, {})
    assert is_done(target) and sorted(p.name for p in tmp_path.iterdir()) == ["seed0"]
    (tmp_path / ".seed1.tmp").mkdir()
    (tmp_path / ".seed1.tmp" / "run.ckpt").write_text("another config")
    with step_folder(tmp_path / "seed1") as fresh:  # not kept: removed first
        assert not list(fresh.iterdir())
