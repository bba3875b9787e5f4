"""Reading a cache: batches carry the tensors, a stale or incomplete cache is refused in one line (per sample
where there is no cache.json), raw shards and corrupt caches fail in setup()."""

from __future__ import annotations

from gridgen.data.datamodule import GridDataModule
from tests.helpers.shards import cached_sample, setup_error, write_shard


def test_corrupt_cache_fails_in_setup(video_samples, tmp_path):
    samples = [dict(cached_sample(s, i), **{"cache.safetensors": b"\x00garbage"}) for i, s in enumerate(video_samples)]
    write_shard(tmp_path / "train-000000.tar", samples)
    message = setup_error(GridDataModule(tmp_path, cached=True))
    assert "none of its first 4 samples can be trained on" in message
    assert "member 'cache.safetensors' cannot be decoded" in message
    assert "rebuild the cache with `make cache data=<name> model=<name>`" in message

    # a damaged manifest is named as such
    write_shard(tmp_path / "c" / "train-000000.tar", [cached_sample(s, i) for i, s in enumerate(video_samples)])
    (tmp_path / "c" / "cache.json").write_text('{"format": "gridgen-cache/1", ')
    model = {"name": "flux_tiny", "pretrained": "embedded:tiny", "max_sequence_length": 8}
    message = setup_error(GridDataModule(tmp_path / "c", cached=True, cache_model=model))
    assert message.startswith(f"cache manifest '{tmp_path / 'c' / 'cache.json'}' is unreadable")
