"""gridgen.files: atomic replacement, natural sort order, config hash."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from gridgen.files import atomic_path, config_hash, natural_key, write_text_atomic


def test_write_text_atomic_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("old")
    write_text_atomic(path, "new\n")
    assert path.read_bytes() == b"new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and str(os.getpid()) in tmp.name
        tmp.write_bytes(b"half")
        raise RuntimeError("crash mid-write")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.safetensors"]


def test_natural_key_orders_numbers_by_value():
    names = ["frame10.png", "Frame2.png", "frame1.png", "frame2a.png", "a/x.png"]
    assert sorted(names, key=natural_key) == ["a/x.png", "frame1.png", "Frame2.png", "frame2a.png", "frame10.png"]
    # files of one folder sort by name, as a Path or as a string
    paths = [Path("/runs/run12") / f"v{i}.mp4" for i in (10, 9, 100)]
    assert [p.name for p in sorted(paths, key=natural_key)] == ["v9.mp4", "v10.mp4", "v100.mp4"]


def test_config_hash_is_the_sha256_of_canonical_json():
    obj = {"b": 1, "a": [1, 2, {"path": Path("x")}]}
    canonical = '{"a": [1, 2, {"path": "x"}], "b": 1}'
    assert config_hash(obj) == hashlib.sha256(canonical.encode()).hexdigest()[:16]
    assert json.dumps(obj, sort_keys=True, default=str) == canonical
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1}) != config_hash({"a": 1, "b": 3})
