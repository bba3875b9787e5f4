"""prepare(cfg): raw videos -> grid shards with bad inputs skipped and counted, workers and resume that change
no byte, reruns with other settings refused, partitioned runs (prepare.parts) equal to one run."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from gridgen.data.captions import VLMCaptioner
from gridgen.data.prepare import prepare
from gridgen.data.sources import VideoSource
from tests.helpers.paths import DEMO_MULTIVIEW
from tests.helpers.prepare import compose_prepare, read_samples, sample_set, shard_bytes, write_webvid


def video_cfg(src: Path, out: Path, *extra: str):
    return compose_prepare("data=webvid", f"prepare.src={src}", f"prepare.out={out}", "data.cell_height=32",
                           "data.cell_width=32", "data.shards.maxcount=2", "prepare.progress=false", *extra)


def test_webvid_csv_to_shards_with_bad_inputs(tmp_path):
    csv_path = write_webvid(tmp_path / "raw", frames=40)  # 40 frames at 8 fps; the short one has 5
    entry = prepare(video_cfg(csv_path, tmp_path / "out", "data.sampling.fps=4"))  # every 2nd frame: 31 needed
    counts = entry["counts"]
    assert counts["samples"] == 4 and counts["inputs_done"] == 8 and counts["frames"] == 64
    assert counts["skipped"] == {"too_short": 1, "unreadable": 1, "missing_file": 1, "missing_caption": 1,
                                 "duplicate_id": 1}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["shards"]["train"] == ["train-000000.tar", "train-000001.tar"] and manifest["counts"] == {"train": 4}
    samples = read_samples(tmp_path / "out")
    assert [s["__key__"] for s in samples] == [f"webvid-{1000 + i}" for i in range(4)]
    for s in samples:
        meta = s["json"]
        assert s["jpg"].shape == (128, 128, 3)
        idx = meta["frame_indices"]
        assert len(idx) == 16 and all(b - a == 2 for a, b in zip(idx, idx[1:], strict=False)) and idx[-1] < 40
        assert meta["fps"] == 4.0 and meta["metadata"]["page_dir"] == "pd" and meta["source"] == "webvid"
        assert s["txt"] == f"A 16-frame sequence arranged in a 4x4 grid. {meta['c_content']}"
        assert meta["c_content"].startswith(("a ", "an "))  # the CSV's name column
    # re-running the finished job changes nothing
    before = shard_bytes(tmp_path / "out")
    prepare(video_cfg(csv_path, tmp_path / "out", "data.sampling.fps=4"))
    assert shard_bytes(tmp_path / "out") == before


def test_workers_resume_and_no_partial_shards(tmp_path, monkeypatch):
    csv_path = write_webvid(tmp_path / "raw", n_good=5, frames=40)
    opts = ("data.sampling.stride=1", "data.sampling.fps=null", "data.sampling.grids_per_clip=2")  # 2 grids per clip: shards end mid-clip
    ref = prepare(video_cfg(csv_path, tmp_path / "ref", *opts))
    reference = shard_bytes(tmp_path / "ref")
    assert ref["counts"]["samples"] == 10 and len(reference) == 5
    assert [s["end"] for s in ref["shards"]] == [[1, 0], [2, 0], [3, 0], [4, 0], [9, 0]]  # 9 inputs

    prepare(video_cfg(csv_path, tmp_path / "par", *opts, "prepare.workers=2"))
    assert shard_bytes(tmp_path / "par") == reference  # workers change nothing

    # an interrupt (Ctrl-C) while the 4th clip is processed: finished shards stay, no partial one appears
    load = VideoSource.load
    calls = []

    def interrupted(self, item, *args, **kwargs):
        calls.append(item.id)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return load(self, item, *args, **kwargs)

    monkeypatch.setattr(VideoSource, "load", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(video_cfg(csv_path, tmp_path / "out", *opts, "data.shards.maxcount=3"))
    monkeypatch.setattr(VideoSource, "load", load)
    out = tmp_path / "out"
    partial = json.loads((out / "manifest.json").read_text())["splits"]["train"]
    assert not partial["complete"] and [s["end"] for s in partial["shards"]] == [[1, 1]]  # ends inside clip 1
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".tar") == ["train-000000.tar"]
    assert not (out / ".tmp-train").exists()

    entry = prepare(video_cfg(csv_path, out, *opts, "data.shards.maxcount=3"))  # resume
    ref3 = prepare(video_cfg(csv_path, tmp_path / "ref3", *opts, "data.shards.maxcount=3"))
    assert shard_bytes(out) == shard_bytes(tmp_path / "ref3")  # nothing lost, nothing twice
    assert entry["counts"] == ref3["counts"]
    keys = [s["__key__"] for s in read_samples(out, decode=None)]
    assert len(keys) == len(set(keys)) == 10

    with pytest.raises(ValueError, match="another config.*prepare.overwrite=true"):
        prepare(video_cfg(csv_path, out, *opts, "data.shards.maxcount=3", "data.shards.quality=50"))


def test_bad_input_is_one_clear_line(tmp_path):
    src = write_webvid(tmp_path / "raw", n_good=1)
    with pytest.raises(FileNotFoundError, match=r"prepare.src '.*nowhere' does not exist"):
        prepare(video_cfg(tmp_path / "nowhere", tmp_path / "o"))
    src.write_text("videoid,contentUrl,duration,page_dir\n1000,x,PT1S,pd\n")
    with pytest.raises(ValueError, match=r"has no caption column 'name' \(columns: videoid, contentUrl, duration, "
                                         r"page_dir\); set data.source.caption_column=<column>"):
        prepare(video_cfg(src, tmp_path / "o"))
    with pytest.raises(ValueError, match=r"data.layout=4x4 with data.cell_height=100 .*multiple of 16 px.*pick e.g. 96"):
        prepare(video_cfg(src, tmp_path / "o", "data.cell_height=100"))
    if DEMO_MULTIVIEW.is_dir():
        with pytest.raises(ValueError, match="4x4 has 16 cells but objects have data.source.num_views=24"):
            prepare(compose_prepare("data=grid_demo_multiview", f"prepare.src={DEMO_MULTIVIEW}", f"prepare.out={tmp_path}/d",
                                    "data.layout=4x4"))
    with pytest.raises(FileNotFoundError, match="captioner weights '/no/such/vlm' are not on this machine"):
        VLMCaptioner("/no/such/vlm", prompt="describe")


def test_no_sample_messages_name_the_commonest_reason_and_its_key():
    from gridgen.data.prepare import SKIP_FIXES, no_samples_message

    counts = {"skipped": {"too_short": 1, "size_mismatch": 2}, "examples": {"size_mismatch": ["obj1: 002.png ..."]}}
    assert no_samples_message(counts, 3, "/raw") == (
        "no grid came out of 3 inputs of '/raw' (skipped: size_mismatch=2, too_short=1); most are size_mismatch "
        "(e.g. obj1: 002.png ...): set prepare.resize_mismatched=true to fit such frames to the cell anyway")
    # every key a fix names is a key of the prepare configs that raise the reason
    cfg = compose_prepare("data=objaverse", "prepare.src=x", "prepare.out=y")
    video = compose_prepare("data=webvid", "prepare.src=x", "prepare.out=y")
    for fix in SKIP_FIXES.values():
        for key in re.findall(r"\b((?:data|prepare)\.[a-z_.]+[a-z_])=", fix):
            assert any(OmegaConf.select(c, key, default="<none>") != "<none>" for c in (cfg, video)), key


def test_a_rerun_is_refused_only_where_shards_of_other_settings_exist(tmp_path, monkeypatch):
    csv_path = write_webvid(tmp_path / "raw", n_good=3)
    out = tmp_path / "out"
    load = VideoSource.load

    def interrupted(self, item, *args, **kwargs):
        raise KeyboardInterrupt  # stopped before its first shard: a manifest record without shards

    monkeypatch.setattr(VideoSource, "load", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(video_cfg(csv_path, out, "data.shards.quality=50"))
    monkeypatch.setattr(VideoSource, "load", load)
    record = json.loads((out / "manifest.json").read_text())["splits"]["train"]
    assert record["shards"] == [] and not record["complete"]
    entry = prepare(video_cfg(csv_path, out))  # other settings, but no shard of theirs here: goes ahead
    assert entry["counts"]["samples"] == 3
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match=r"already holds 2 train shards made with another config \(train-000000.tar"):
        prepare(video_cfg(csv_path, out, "data.shards.quality=50"))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # refused: untouched
    for shard in out.glob("train-*.tar"):  # shards deleted by hand: nothing left to protect
        shard.unlink()
    assert prepare(video_cfg(csv_path, out, "data.shards.quality=50"))["counts"]["samples"] == 3


def test_skipped_inputs_are_one_warning_per_run(tmp_path, caplog):
    csv_path = write_webvid(tmp_path / "raw", n_good=2)  # 5 bad rows: 5 different reasons, one of each
    with caplog.at_level(logging.DEBUG, logger="gridgen"):
        prepare(video_cfg(csv_path, tmp_path / "out", "prepare.workers=2"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        f"skipped 5 of 7 inputs: duplicate_id=1, missing_caption=1, missing_file=1, too_short=1, unreadable=1 "
        f"(examples under splits.train.counts.examples in {tmp_path / 'out' / 'manifest.json'})"]


def test_parts_make_the_same_samples_as_one_run_and_name_a_failed_part(tmp_path, monkeypatch):
    from gridgen.data.prepare import merge
    from gridgen.data.shardlists import resolve_shards
    from gridgen.data.shards import PartsIncompleteError, part_of

    csv_path = write_webvid(tmp_path / "raw", n_good=6)  # 6 good clips, 5 bad rows (one of each reason)
    one = prepare(video_cfg(csv_path, tmp_path / "one"))
    out = tmp_path / "parts"

    def part(i: int, *extra: str):
        return prepare(video_cfg(csv_path, out, "prepare.parts=3", f"prepare.part={i}", *extra),
                       rerun="python -m gridgen.prepare -m ... prepare.part={parts}")

    ids = [f"{1000 + i}" for i in range(6)] + ["2000", "2001", "2002", "2003"]
    assert sorted({part_of(i, 3) for i in ids}) == [0, 1, 2]  # every part has inputs here
    load = VideoSource.load
    victim = next(i for i in ids[:6] if part_of(i, 3) == 1)

    def crashing(self, item, *args, **kwargs):
        if item.id == victim:
            raise RuntimeError("node lost")
        return load(self, item, *args, **kwargs)

    assert "part" in part(2)  # parts in any order; a part alone writes no manifest
    assert not (out / "manifest.json").exists()
    monkeypatch.setattr(VideoSource, "load", crashing)
    with pytest.raises(RuntimeError, match="node lost"):
        part(1)
    monkeypatch.setattr(VideoSource, "load", load)
    with pytest.raises(PartsIncompleteError) as error:
        merge(video_cfg(csv_path, out, "prepare.parts=3", "prepare.merge=true"),
              rerun="python -m gridgen.prepare -m ... prepare.part={parts}")
    assert str(error.value) == (
        f"'{out}': 2 of 3 train parts are not done: part 0 never started; part 1 failed (RuntimeError: node lost); "
        "rerun only those: python -m gridgen.prepare -m ... prepare.part=0,1")
    assert not (out / "manifest.json").exists()

    part(0)
    merged = part(1)  # the rerun of the failed part finishes the set; the last part writes the manifest
    assert merged["parts"]["count"] == 3 and merged["complete"]
    assert sample_set(out) == sample_set(tmp_path / "one")  # keys and bytes
    for key in ("inputs_done", "samples", "frames", "skipped"):
        assert merged["counts"][key] == one["counts"][key], key
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 6}
    assert resolve_shards(out) == [str(out / name) for name in manifest["shards"]["train"]]  # what training reads
    assert merge(video_cfg(csv_path, out, "prepare.merge=true")) == merged  # an explicit merge agrees


def test_parts_are_checked_before_anything_runs(tmp_path):
    csv_path = write_webvid(tmp_path / "raw", n_good=2)
    with pytest.raises(ValueError, match=r"prepare.parts=3 needs the part this process writes: prepare.part=<0..2>"):
        prepare(video_cfg(csv_path, tmp_path / "o", "prepare.parts=3"))
    with pytest.raises(ValueError, match=r"prepare.part must be one of 0..2 \(prepare.parts=3\), got 3"):
        prepare(video_cfg(csv_path, tmp_path / "o", "prepare.parts=3", "prepare.part=3"))
    with pytest.raises(ValueError, match=r"prepare.parts must be a positive integer, got 0"):
        prepare(video_cfg(csv_path, tmp_path / "o", "prepare.parts=0", "prepare.part=0"))
    assert not (tmp_path / "o").exists()
    prepare(video_cfg(csv_path, tmp_path / "o"))  # a whole run here: a part would mix its shards with these
    with pytest.raises(ValueError, match=r"already holds train shards of another run \(train-000000.tar"):
        prepare(video_cfg(csv_path, tmp_path / "o", "prepare.parts=2", "prepare.part=0"))
