"""`python -m gridgen.mini` (gridgen.mini.__main__): its refusals, and the presets' before a build. The whole pipeline at a toy size runs in tests/e2e/test_mini.py (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gridgen.mini.steps import compose


def failed_build(*args):
    raise RuntimeError("build failed")


def runs_reached(*args):
    raise RuntimeError("runs reached")


def test_a_finished_report_is_never_overwritten(hydra_conf, tmp_path, monkeypatch):
    import gridgen.mini.__main__ as main_lib
    from gridgen.mini.__main__ import run
    from gridgen.mini.build import build_folder

    (tmp_path / "report.md").write_text("done\n")
    cfg = compose("mini", [f"out={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(ValueError, match="never overwritten; pass out=<new folder>"):
        run(cfg, cfg.build)
    assert (tmp_path / "report.md").read_text() == "done\n" and not (tmp_path / "cache").exists()
    monkeypatch.setattr(main_lib, "run_build", lambda *a: {"vae": {"psnr_db": 30.0},
                                                           "base_eval": {"right_fraction": 0.5}})
    built = main_lib.run(compose("mini", [f"out={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}",
                                          "stop_after=build"]), cfg.build)
    assert built == build_folder(cfg, cfg.build)
    assert (tmp_path / "report.md").read_text() == "done\n"  # only the build: the finished report is no obstacle
    with pytest.raises(ValueError, match="stop_after must be one of"):
        run(compose("mini", ["stop_after=all", f"out={tmp_path / 'new'}"]), cfg.build)


def test_a_continued_folder_with_other_run_settings_is_refused_before_the_build(hydra_conf, tmp_path, monkeypatch):
    """A killed `make mini` continues only with the settings its folder's finished runs were made with: a changed
    runs.* or eval.* is one line naming the key, before any build step, and settings.json stays as written; a failed
    build leaves no output folder."""
    import gridgen.mini.__main__ as main_lib
    import gridgen.mini.runs as runs_lib

    common = [f"out={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    cfg = compose("mini", common)
    monkeypatch.setattr(main_lib, "run_build", failed_build)
    with pytest.raises(RuntimeError, match="build failed"):
        main_lib.run(cfg, cfg.build)
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(main_lib, "run_build", lambda *a: {})
    monkeypatch.setattr(runs_lib, "run_variant", runs_reached)
    with pytest.raises(RuntimeError, match="runs reached"):  # no run finished yet: any settings, recorded
        main_lib.run(compose("mini", [*common, "eval.steps=8"]), cfg.build)
    with pytest.raises(RuntimeError, match="runs reached"):
        main_lib.run(cfg, cfg.build)
    recorded = (tmp_path / "out" / "settings.json").read_text()
    assert '"steps": 20' in recorded
    (tmp_path / "out" / "no_flow" / "seed0").mkdir(parents=True)  # one finished run
    (tmp_path / "out" / "no_flow" / "seed0" / "done.json").write_text("{}")
    monkeypatch.setattr(main_lib, "run_build", failed_build)
    with pytest.raises(RuntimeError, match="build failed"):  # the same settings continue (to the build)
        main_lib.run(compose("mini", common), cfg.build)
    for override, key in (('runs.train=["trainer.max_steps=50"]', "runs.train"), ("eval.true_cfg_scale=1.0",
                                                                               "eval.true_cfg_scale"),
                          ("runs.seeds=[0]", "runs.seeds"), ("build.vae.steps=10", "build"),
                          ("eval.guider={name:ClassifierFreeGuidance,stop:0.5}", "eval.guider")):
        with pytest.raises(ValueError, match=rf"holds runs made with {key}=.*pass out=<new folder>"):
            main_lib.run(compose("mini", [*common, override]), cfg.build)
    assert (tmp_path / "out" / "settings.json").read_text() == recorded
    # a folder recorded before eval.guider existed (no such key) continues with the default, null
    older = json.loads(recorded)
    del older["eval"]["guider"]
    (tmp_path / "out" / "settings.json").write_text(json.dumps(older))
    with pytest.raises(RuntimeError, match="build failed"):
        main_lib.run(compose("mini", common), cfg.build)


def test_a_continued_folder_whose_runs_another_preset_trained_is_refused_before_the_build(hydra_conf, tmp_path,
                                                                                         monkeypatch):
    """A finished run's recorded config.yaml is compared with what experiment=mini composes for it now: an edited
    preset (a pull between a killed `make mini` and its continuation) is one line naming the key, before the build;
    the folders where the run ran (another checkout, the cache folder given otherwise, the attention kernel `auto`
    resolved) are no change."""
    from omegaconf import OmegaConf

    import gridgen.mini.__main__ as main_lib
    import gridgen.mini.runs as runs_lib
    from gridgen.mini.build import build_folder

    common = [f"out={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    cfg = compose("mini", common)
    monkeypatch.setattr(main_lib, "run_build", lambda *a: {})
    monkeypatch.setattr(runs_lib, "run_variant", runs_reached)
    with pytest.raises(RuntimeError, match="runs reached"):  # settings.json recorded
        main_lib.run(cfg, cfg.build)
    folder = tmp_path / "out" / "filmstrip" / "seed1"
    overrides = runs_lib.lora_overrides(build_folder(cfg, cfg.build), list(cfg.runs.variants.filmstrip), 1, [])
    trained = compose("train", [*overrides, "paths.root_dir=/elsewhere/gridgen",  # made in another checkout,
                                f"paths.cache_dir={tmp_path / 'cache'}"],  # its cache given as make mini's was
                      output_dir=tmp_path / "out" / "filmstrip" / ".seed1.tmp" / "run")
    OmegaConf.set_struct(trained, False)  # the test edits it as other versions of the preset would have
    trained.model.attention_backend = "sdpa"  # as gridgen.train records `auto` on a CPU
    (folder / "run").mkdir(parents=True)
    (folder / "run" / "config.yaml").write_text(OmegaConf.to_yaml(trained, resolve=True))
    (folder / "done.json").write_text("{}")
    monkeypatch.setattr(main_lib, "run_build", failed_build)
    with pytest.raises(RuntimeError, match="build failed"):  # the same recipe continues (to the build)
        main_lib.run(cfg, cfg.build)
    assert trained.model.compile_options is None
    del trained.model["compile_options"]  # recorded before the key existed: its null default is no change
    (folder / "run" / "config.yaml").write_text(OmegaConf.to_yaml(trained, resolve=True))
    with pytest.raises(RuntimeError, match="build failed"):
        main_lib.run(cfg, cfg.build)
    trained.model.compile_options = {"mode": "max-autotune"}
    (folder / "run" / "config.yaml").write_text(OmegaConf.to_yaml(trained, resolve=True))
    with pytest.raises(ValueError, match=r'was trained with model.compile_options={"mode": "max-autotune"}, and the '
                                         r"config gives absent now"):
        main_lib.run(cfg, cfg.build)
    del trained.model["compile_options"]
    assert trained.optim.lr == 3e-3
    trained.optim.lr = 1e-3  # the preset at the time of the run
    (folder / "run" / "config.yaml").write_text(OmegaConf.to_yaml(trained, resolve=True))
    with pytest.raises(ValueError, match=r"filmstrip/seed1 was trained with optim\.lr=0\.001, and the config gives "
                                         r"0\.003 now .*delete .*filmstrip/seed1 to make it again"):
        main_lib.run(cfg, cfg.build)
    for damaged in ("model: [unclosed\n", "- a list\n"):  # one line, not a traceback
        (folder / "run" / "config.yaml").write_text(damaged)
        with pytest.raises(ValueError, match=r"config.yaml cannot be read as a config \(.+\): .*out=<new folder>"):
            main_lib.run(cfg, cfg.build)


def test_a_continued_folder_whose_cells_another_evaluation_made_is_refused_before_the_build(hydra_conf, tmp_path,
                                                                                          monkeypatch):
    """A finished cell's eval/config.yaml (what gridgen.evaluate composed for it) is compared with what the evaluation
    composes now: a changed default (a pull that changes sampling) is one line naming the key, for a LoRA run and for
    the base without LoRA alike; the folder moved since (a copied out folder, another checkout) is no change."""
    from omegaconf import OmegaConf

    import gridgen.mini.__main__ as main_lib
    import gridgen.mini.runs as runs_lib
    from gridgen.mini.build import build_folder

    common = [f"out={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    cfg = compose("mini", common)
    monkeypatch.setattr(main_lib, "run_build", lambda *a: {})
    monkeypatch.setattr(runs_lib, "run_variant", runs_reached)
    with pytest.raises(RuntimeError, match="runs reached"):  # settings.json recorded
        main_lib.run(cfg, cfg.build)
    build = build_folder(cfg, cfg.build)
    monkeypatch.setattr(main_lib, "run_build", failed_build)
    for name, lora in (("filmstrip", True), ("base_without_lora", False)):
        folder = tmp_path / "out" / name / "seed1"
        then = tmp_path / "elsewhere" / name / ".seed1.tmp"  # where the cell was written: the folder was copied since
        evaluated = compose("evaluate", [*runs_lib.eval_overrides(cfg, build, then, 1, then / "run" if lora else None),
                                         "paths.root_dir=/elsewhere/gridgen"], output_dir=then / "eval")
        (folder / "eval").mkdir(parents=True)
        (folder / "eval" / runs_lib.EVAL_CONFIG).write_text(OmegaConf.to_yaml(evaluated, resolve=True))
        (folder / "done.json").write_text("{}")
        with pytest.raises(RuntimeError, match="build failed"):  # the same evaluation continues (to the build)
            main_lib.run(cfg, cfg.build)
        assert evaluated.generate.guidance == 3.5
        evaluated.generate.guidance = 2.0  # the default of the time
        (folder / "eval" / runs_lib.EVAL_CONFIG).write_text(OmegaConf.to_yaml(evaluated, resolve=True))
        with pytest.raises(ValueError, match=rf"{name}/seed1 was evaluated with generate\.guidance=2\.0, and the "
                                             rf"config gives 3\.5 now .*out=<new folder>"):
            main_lib.run(cfg, cfg.build)
        (folder / "eval" / runs_lib.EVAL_CONFIG).write_text("eval: [unclosed\n")
        with pytest.raises(ValueError, match=r"eval/config.yaml cannot be read as a config \(.+\): the cell's record"):
            main_lib.run(cfg, cfg.build)
        (folder / "eval" / runs_lib.EVAL_CONFIG).unlink()  # made by older code: not checked


def test_mini_refuses_a_bad_guider_before_any_work(tmp_path, hydra_conf):
    """eval.guider is checked before the build and the runs (it acts only at their evaluations, hours later)."""
    import gridgen.mini.__main__ as main_lib

    cfg = compose("mini", [f"out={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / 'cache'}",
                           "eval.guider={name:ClassifierFreeGuidance,stpo:0.5}"])
    with pytest.raises(ValueError, match=r"^eval.guider: ClassifierFreeGuidance does not take \['stpo'\]"):
        main_lib.run(cfg, cfg.build)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_mini_refuses_a_bad_key_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gridgen.mini", "build.vae.stesp=3", f"out={tmp_path / 'out'}"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("gridgen.mini: error:") and "stesp" in err[-1], proc.stderr
    assert not any(line.startswith("Traceback") for line in err) and not (tmp_path / "out").exists()


def test_the_presets_refuse_a_missing_build_with_one_line(tmp_path):
    """experiment=mini trains on the base model `make mini` builds; before that it says how to build it."""
    env = {**os.environ, "GRIDGEN_CACHE": str(tmp_path / "cache"), "GRIDGEN_ROOT": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "gridgen.train", "experiment=mini"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "not built yet" in last and "make mini stop_after=build" in last
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "cache").exists()


def test_a_killed_cells_run_goes_on_only_when_it_can(hydra_conf, tmp_path, caplog):
    """resume_point: what a killed cell's leftover (``.seed<k>.tmp``) gives the next `make mini`: its run from its
    last checkpoint (all else removed), or its finished run to evaluate again (its last.ckpt may be older than its
    last step); a run trained with another config, a damaged checkpoint or a run that ended without its export
    starts again from nothing, with one log line why."""
    import logging

    import torch
    from omegaconf import OmegaConf

    from gridgen.mini.__main__ import composed_run, resume_point
    from gridgen.mini.build import build_folder
    from gridgen.models.lora import LORA_FILE

    cfg = compose("mini", [f"out={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / 'cache'}",
                           "runs.train=['trainer.max_steps=4']"])
    build = build_folder(cfg, cfg.build)
    tmp = tmp_path / "out" / "filmstrip" / ".seed1.tmp"
    run = tmp / "run"
    (run / "checkpoints").mkdir(parents=True)
    (tmp / "eval").mkdir()
    (tmp / "done.json").write_text("{}")  # a killed evaluation's files: never kept
    trained = composed_run(cfg, build, "filmstrip", 1, tmp)

    def leftover(step: int | None, config=trained):
        (run / "config.yaml").write_text(OmegaConf.to_yaml(config, resolve=True))
        if step is not None:
            torch.save({"state_dict": {}, "global_step": step}, run / "checkpoints" / "last.ckpt")
        with caplog.at_level(logging.INFO, logger="gridgen.mini"):
            caplog.clear()
            return resume_point(cfg, build, "filmstrip", 1, tmp)

    with caplog.at_level(logging.INFO, logger="gridgen.mini"):
        assert resume_point(cfg, build, "filmstrip", 1, tmp_path / "nothing") is None
    assert "starting this cell again (no checkpoint of its run)" in caplog.text
    other = OmegaConf.create(OmegaConf.to_container(trained))
    other.optim.lr = 1e-3
    assert leftover(2, other) is None
    assert "its run was trained with optim.lr=0.001, and the config gives 0.003" in caplog.text
    (run / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 half a zip")  # damaged on the disk
    assert leftover(None) is None and "cannot be read as a checkpoint" in caplog.text
    assert (tmp / "eval").is_dir()  # refused: nothing pruned (step_folder removes it all)
    assert leftover(4) is None  # at its last step, not exported: the export cannot be made from a resume
    assert "stopped at step 4 of 4 without its LoRA exported" in caplog.text
    (run / "FAILED").write_text("RuntimeError: the loss is not finite\nresume: ...\n")
    assert leftover(2) == (2, False) and "goes on from the checkpoint of step 2" in caplog.text
    assert "it had failed: RuntimeError: the loss is not finite" in caplog.text
    assert sorted(p.name for p in tmp.iterdir()) == ["run"]
    (run / "lora").mkdir()
    (run / "lora" / LORA_FILE).write_bytes(b"exported")
    assert leftover(2) is None and "ended without summary.json of 4, with its LoRA exported" in caplog.text
    (run / "summary.json").write_text(json.dumps({"global_step": 4}))
    assert leftover(2) is None and "marked FAILED" in caplog.text
    (run / "FAILED").unlink()
    assert leftover(2) == (4, True)  # last.ckpt of step 2: no checkpoint was saved at the end
    assert "finished training (step 4): it is evaluated again" in caplog.text
    (run / "summary.json").write_text(json.dumps({"global_step": 3}))
    assert leftover(3) is None and "ended at step 3 of 4" in caplog.text
