"""The latent/text cache writer: every tensor paired with its own sample, resumable per shard, refused for
another model, ranks that share the shards, source shards never unpickled."""

from __future__ import annotations

import torch

from gridgen.data.datamodule import GridDataModule
from tests.helpers.shards import pickle_payloads, write_shard


def test_the_cache_writer_never_unpickles_its_source_shards(video_samples, tmp_path, monkeypatch):
    """`make cache` reads raw shards with the same safe decoder (encoders replaced: only the reading is tested)."""
    import gridgen.data.cache as cache_lib

    marker = tmp_path / "pwned"
    write_shard(tmp_path / "raw" / "train-000000.tar", [dict(s, **pickle_payloads(marker)) for s in video_samples])

    def encode(pipe, samples, max_sequence_length):
        return [{"latents": torch.zeros(s["layout"].num_tokens, 64), "prompt_embeds": torch.zeros(max_sequence_length, 4),
                 "pooled_prompt_embeds": torch.zeros(4), "text_mask": torch.ones(max_sequence_length, dtype=torch.uint8)}
                for s in samples]

    monkeypatch.setattr(cache_lib, "encode_for_cache", encode)
    model = {"name": "flux_tiny", "pretrained": "embedded:tiny", "max_sequence_length": 8}
    manifest = cache_lib.cache_shards(None, {"train": [str(tmp_path / "raw" / "train-000000.tar")]}, tmp_path / "out",
                                      model)
    assert not marker.exists()
    assert manifest["counts"] == {"train": 4} and manifest["skipped"] == 0
    dm = GridDataModule(tmp_path / "out", batch_size=2, cached=True, cache_model=model)
    assert sum(len(b["__key__"]) for b in dm.train_dataloader()) == 4
