"""generate(cfg): every task on any layout, bad input as clear errors, timing, and the warning for a LoRA
trained for the other kind of task."""

from __future__ import annotations

import json
import logging
import time

import pytest
import torch
from safetensors.torch import load_file

from gridgen.cameras import camera_circle
from gridgen.config import USER_ERRORS
from gridgen.generate import generate
from gridgen.inference import pipeline as inference_pipeline
from gridgen.models.lora import save_lora
from tests.helpers.generate import gen_cfg, gen_cfg_grid_only
from tests.helpers.lora import tiny_lora

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


@pytest.mark.parametrize("lora_task, task, warned", [
    ("multiview", "t2v", True), ("t2v", "t2mv", True), ("i2v", "t2v", False), ("multiview", "t2mv", False),
])
def test_generate_warns_when_the_lora_was_trained_for_the_other_kind(tmp_path, caplog, lora_task, task, warned):
    save_lora(tmp_path / "lora", tiny_lora(), {"gridgen_task": lora_task})
    with caplog.at_level(logging.WARNING, logger="gridgen.inference.pipeline"):
        manifest = generate(gen_cfg_grid_only(tmp_path, f"task={task}", "prompt=x", f"lora={tmp_path / 'lora'}"))
    assert manifest["lora"]["gridgen_task"] == lora_task and len(manifest["samples"]) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "gridgen.inference.pipeline"]
    if warned:
        assert len(warnings) == 1 and warnings[0].startswith(f"LoRA was trained for task {lora_task}, generating {task}: ")
        assert ("task=i2mv|t2mv" if lora_task == "multiview" else "task=edit|i2v|interpolate") in warnings[0]
    else:
        assert warnings == []
