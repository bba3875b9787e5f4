"""eval.generate=true: one sample per real video, generated in-process by the library's generate."""

import json
from pathlib import Path

import numpy as np
import pytest

from gridgen.eval.pipeline import evaluate
from tests.helpers.evaluate import clip_video, make_cfg, save_frames


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
