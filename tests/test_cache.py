"""cache(cfg), the `make cache` entry: bad input before any work, the cache config for every data config."""

from __future__ import annotations

import pytest

from gridgen.cache import cache
from tests.helpers.cache import cache_cfg


def test_make_cache_bad_input(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no shards matching 'train-\\*.tar' in '.*empty'"):
        cache(cache_cfg(tmp_path, f"data.train_shards={tmp_path / 'empty'}", f"cache.out={tmp_path / 'c'}"))
    with pytest.raises(ValueError, match="drop data.cached=true here"):
        cache(cache_cfg(tmp_path, "data.cached=true", f"cache.out={tmp_path / 'c'}"))
    assert not (tmp_path / "c").exists()  # nothing written, no model loaded


def test_cache_config_composes_for_every_data_config(tmp_path):
    for data in ("sample", "shards", "webvid", "tiktok", "objaverse", "video_mix"):
        cfg = cache_cfg(tmp_path, f"data={data}", "model=flux_dev")
        assert cfg.data.cache_model.pretrained == cfg.model.pretrained
        assert cfg.data.cache_model.max_sequence_length == 512
