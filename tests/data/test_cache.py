"""The latent/text cache writer: every tensor paired with its own sample, resumable per shard, refused for
another model, ranks that share the shards, source shards never unpickled."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
import webdataset as wds

from gridgen.data.cache import (
    CACHE_MANIFEST,
    CacheMismatchError,
    cache_fingerprint,
    cache_shards,
    layout_hash,
    load_encoders,
    verify_cache_folders,
)
from gridgen.data.datamodule import GridDataModule, SkipCounter, ToSample, resolve_shards
from gridgen.models.flux import encode_images, encode_prompts
from tests.helpers.cache import TINY, folder_bytes
from tests.helpers.shards import pickle_payloads, write_shard


@pytest.fixture(scope="module")
def pipe():
    return load_encoders(TINY)


def _source_samples(urls: list[str]) -> dict[str, dict]:
    skips = SkipCounter()
    to_sample = ToSample("png;jpg;jpeg", "txt", cached=False, skips=skips)
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False).decode("torchrgb8").map(to_sample)}


def test_cache_pairs_every_tensor_with_its_own_sample(raw, built, pipe):
    out, manifest = built
    assert manifest["status"] == "complete" and manifest["counts"] == {"train": 12, "val": 4}
    assert manifest["fingerprint"] == cache_fingerprint(TINY) and manifest["model"] == "flux_tiny"
    assert set(manifest["layouts"]) == {"4x4@128x128", "4x6@128x192"} and manifest["skipped"] == 0
    assert [p.name for p in sorted(out.glob("*.tar"))] == [*(f"train-{i:06d}.tar" for i in range(3)),
                                                          "val-000000.tar", "val-000001.tar"]
    source = _source_samples(resolve_shards(raw, "train") + resolve_shards(raw, "val"))
    cached = {s["__key__"]: s for s in wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False)}
    assert cached.keys() == source.keys()  # plain webdataset reads it; every sample, under its own key

    fingerprint = cache_fingerprint(TINY)
    latents_by_key = {}
    for key, sample in cached.items():
        tensors = safetensors.torch.load(sample["cache.safetensors"])
        src = source[key]
        layout = src["layout"]
        meta, caption = json.loads(sample["json"]), sample["txt"].decode()
        assert caption == src["caption"]
        assert (meta["rows"], meta["cols"], meta["cell_height"], meta["cell_width"]) == (
            layout.rows, layout.cols, layout.cell_height, layout.cell_width)
        assert meta["gridgen_cache"]["hash"] == layout_hash(fingerprint, layout)
        # the reference: this sample alone through the functions training uses
        own_latents = encode_images(pipe.vae, src["pixel_values"][None])[0]  # (N, 64)
        embeds, pooled, _ = encode_prompts(pipe, [caption], 32)
        assert tensors["latents"].shape == (layout.num_tokens, 64)
        torch.testing.assert_close(tensors["latents"], own_latents, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(tensors["prompt_embeds"], embeds[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(tensors["pooled_prompt_embeds"], pooled[0], rtol=1e-4, atol=1e-5)
        tokens = pipe.tokenizer_2(caption, max_length=32, truncation=True)["input_ids"]
        assert tensors["text_mask"].dtype == torch.uint8 and tensors["text_mask"].tolist() == (
            [1] * len(tokens) + [0] * (32 - len(tokens)))
        latents_by_key[key] = tensors["latents"]
    # samples differ, so a pairing by position would have failed the comparisons above
    video = sorted(k for k in latents_by_key if k.startswith("video-train"))
    assert (latents_by_key[video[0]] - latents_by_key[video[1]]).abs().max() > 0.1


def test_cache_resumes_and_refuses_another_model(raw, built, pipe, tmp_path):
    out, _ = built
    work = tmp_path / "cache"
    shards = {"train": resolve_shards(raw / "video", "train")}
    first = cache_shards(pipe, shards, work, TINY, batch_size=4)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in work.glob("*.tar")}
    assert cache_shards(pipe, shards, work, TINY, batch_size=4)["shards"] == first["shards"]
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in work.glob("*.tar")} == before  # kept

    # an interrupted run: the last shard missing, the manifest incomplete -> training refuses, a re-run finishes
    manifest = json.loads((work / CACHE_MANIFEST).read_text())
    manifest["status"] = "incomplete"
    del manifest["shards"]["train-000001.tar"]
    (work / CACHE_MANIFEST).write_text(json.dumps(manifest))
    (work / "train-000001.tar").unlink()
    with pytest.raises(CacheMismatchError, match="is incomplete .*again to finish it"):
        verify_cache_folders([str(work / "train-000000.tar")], TINY)
    cache_shards(pipe, shards, work, TINY, batch_size=4)
    assert {p.name: p.read_bytes() for p in work.glob("*.tar")} == {k: v[1] for k, v in before.items()}  # same bytes
    verify_cache_folders([str(work / "train-000000.tar")], TINY)

    with pytest.raises(CacheMismatchError, match=r"model.max_sequence_length=32, this run uses model.max_sequence_length=16.*cache.overwrite=true"):
        cache_shards(pipe, shards, work, {**TINY, "max_sequence_length": 16})


def test_ranks_share_the_shards_and_make_the_same_cache(raw, pipe, tmp_path):
    """2 ranks, each with its own shard list and no waiting on the other (here one after the other, the second
    first): the same shards and cache.json as one process; the manifest is written by the rank that ends last."""
    shards = {"train": resolve_shards(raw / "video", "train"), "val": resolve_shards(raw / "video", "val")}
    single = cache_shards(pipe, shards, tmp_path / "one", TINY, batch_size=4)
    dist = tmp_path / "two"
    partial = cache_shards(pipe, shards, dist, TINY, batch_size=4, rank=1, world_size=2)
    assert partial["status"] == "incomplete" and partial["missing"] == ["train-000000.tar", "val-000000.tar"]
    assert sorted(folder_bytes(dist)) == ["train-000001.tar"]  # rank 1's shard only
    with pytest.raises(CacheMismatchError, match="is incomplete"):  # training refuses it meanwhile
        verify_cache_folders([str(dist / "train-000001.tar")], TINY)
    merged = cache_shards(pipe, shards, dist, TINY, batch_size=4, rank=0, world_size=2)
    assert merged == single and merged["status"] == "complete"
    assert folder_bytes(dist) == folder_bytes(tmp_path / "one")
    assert json.loads((dist / CACHE_MANIFEST).read_text()) == json.loads((tmp_path / "one" / CACHE_MANIFEST).read_text())
    # resumable per shard: a rank run again finds its shards written and the cache complete
    before = {p.name: p.stat().st_mtime_ns for p in dist.glob("*.tar")}
    assert cache_shards(pipe, shards, dist, TINY, batch_size=4, rank=1, world_size=2)["status"] == "complete"
    assert {p.name: p.stat().st_mtime_ns for p in dist.glob("*.tar")} == before
    with pytest.raises(ValueError, match=r"cache.rank must be one of 0..1 \(cache.world_size=2\), got 2"):
        cache_shards(pipe, shards, dist, TINY, rank=2, world_size=2)


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
