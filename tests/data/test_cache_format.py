"""Reading a cache: batches carry the tensors, a stale or incomplete cache is refused in one line (per sample
where there is no cache.json), raw shards and corrupt caches fail in setup()."""

from __future__ import annotations

import pytest

from gridgen.data.cache import CacheMismatchError
from gridgen.data.datamodule import GridDataModule
from gridgen.embedded import ensure_tiny_flux
from gridgen.layout import GridLayout
from gridgen.train import train
from tests.helpers.cache import TINY
from tests.helpers.shards import cached_sample, setup_error, write_shard
from tests.helpers.train import make_cfg


def test_cached_batches_carry_tensors_and_remote_caches_are_checked_per_sample(built):
    out, _ = built
    url = f"pipe:cat {out / 'train-000000.tar'}"
    dm = GridDataModule(url, batch_size=2, samples_per_epoch=4, cached=True, cache_model=TINY, allow_pipe=True)
    batch = next(iter(dm.train_dataloader()))
    assert "pixel_values" not in batch
    tokens = GridLayout(**batch["layout"]).num_tokens
    assert batch["latents"].shape == (2, tokens, 64) and batch["prompt_embeds"].shape[:2] == (2, 32)
    assert batch["pooled_prompt_embeds"].shape[0] == 2 and batch["text_mask"].shape == (2, 32)

    stale = GridDataModule(url, batch_size=2, samples_per_epoch=4, cached=True,
                           cache_model={**TINY, "max_sequence_length": 16}, allow_pipe=True)
    stale.setup("fit")  # a pipe: has no folder to read cache.json from ...
    with pytest.raises(CacheMismatchError, match="was built with model.max_sequence_length=32, this run uses "
                                                 "model.max_sequence_length=16"):
        next(iter(stale.train_dataloader()))  # ... so every sample is checked, and a stale one stops the run
    assert stale.num_skipped == 0  # refused, not skipped


@pytest.mark.parametrize("override, message", [
    ("model.max_sequence_length=16", "was built with model.max_sequence_length=32, this run uses "
     "model.max_sequence_length=16; rebuild it with `make cache data=<name> model=flux_tiny "
     "model.max_sequence_length=16` or train with model.max_sequence_length=32"),
    ("model.pretrained=TINY_FOLDER", "was built for model.pretrained=embedded:tiny (model=flux_tiny), this run uses "
     "model.pretrained=TINY_FOLDER; rebuild it with `make cache data=<name> model=flux_tiny` or train on it with "
     "model=flux_tiny"),
])
def test_stale_cache_is_refused_in_one_line(built, tmp_path, override, message):
    out, _ = built
    folder = str(ensure_tiny_flux())  # the same weights under another id: still another model to the cache
    cfg = make_cfg(tmp_path, "data.cached=true", f"data.train_shards={out}", override.replace("TINY_FOLDER", folder))
    with pytest.raises(CacheMismatchError) as info:
        train(cfg)
    assert str(info.value) == f"cache '{out}' " + message.replace("TINY_FOLDER", folder)


def test_raw_shards_are_not_a_cache(raw):
    dm = GridDataModule(raw / "video", cached=True, cache_model=TINY)
    with pytest.raises(FileNotFoundError, match=r"holds no gridgen cache \(no cache.json\).*make cache data=<name>"):
        dm.setup("fit")


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
