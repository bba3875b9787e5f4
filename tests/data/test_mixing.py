"""Weighted source mixing: the stream follows the weights (not the sizes), is seeded and reproducible, and bad
source configs are one-line errors."""

from __future__ import annotations

import random

import pytest
from hydra.utils import instantiate

from gridgen.data.datamodule import GridDataModule, parse_sources
from gridgen.layout import GridLayout
from tests.helpers.shards import KINDS, kind_of, train_batches
from tests.helpers.train import make_cfg


def test_mix_follows_the_weights_not_the_sizes(root):
    """multiview has a third of the samples but weight 3:1: three quarters of the stream must be multiview."""
    sources = {"video": {"shards": str(root / "video"), "weight": 1.0},
               "multiview": {"shards": str(root / "multiview"), "weight": 3.0}}
    dm = GridDataModule(sources=sources, batch_size=2, samples_per_epoch=240, shuffle_buffer=8, seed=0)
    random.seed(1234)
    state = random.getstate()
    batches = train_batches(dm)
    assert random.getstate() == state  # the mix draws from its own generator, not the caller's global one
    assert len(batches) == 120 == dm.batches_per_epoch
    counts = {"video": 0, "multiview": 0}
    for batch in batches:
        kinds = {kind_of(k) for k in batch["__key__"]}
        assert len(kinds) == 1  # a batch never mixes grid shapes
        kind = kinds.pop()
        layout = GridLayout(**batch["layout"])
        assert (layout.rows, layout.cols) == KINDS[kind]
        assert batch["pixel_values"].shape == (2, 3, layout.height, layout.width)
        counts[kind] += 2
    share = counts["multiview"] / 240
    # binomial sd 0.028 around 0.75; the unweighted concatenation would give 8 / 24 = 0.33
    assert 0.63 < share < 0.87, counts


def test_mix_is_reproducible_and_seeded(root):
    def keys(seed: int) -> list[list[str]]:
        sources = {"video": {"shards": str(root / "video"), "weight": 1},
                   "multiview": {"shards": str(root / "multiview"), "weight": 1}}
        dm = GridDataModule(sources=sources, batch_size=2, samples_per_epoch=24, shuffle_buffer=4, seed=seed)
        loader = dm.train_dataloader()
        return [b["__key__"] for b in loader] + [b["__key__"] for b in loader]  # two epochs

    run = keys(0)
    assert run == keys(0)
    assert run != keys(1)
    assert run[:6] != run[6:]  # the second epoch draws anew


def test_weights_list_and_zero_weight(root):
    """``train_shards: [a, b]`` + ``weights``: one source per entry; weight 0 drops a source."""
    only_multiview = GridDataModule([root / "video", root / "multiview"], weights=[0, 1], batch_size=2,
                                    samples_per_epoch=16, shuffle_buffer=1)
    assert [s.name for s in only_multiview.sources] == ["train_shards[1]"]
    keys = [k for b in train_batches(only_multiview) for k in b["__key__"]]
    assert len(keys) == 16 and {kind_of(k) for k in keys} == {"multiview"}

    both = parse_sources([root / "video", root / "multiview"], weights=[2, 1])
    assert [(s.name, s.weight) for s in both] == [("train_shards[0]", 2.0), ("train_shards[1]", 1.0)]
    assert len(parse_sources([root / "video", root / "multiview"])) == 1  # no weights: one concatenated source


def test_video_mix_config_streams_both_sources(root, tmp_path):
    """`stage=coarse task=t2v data=video_mix`: WebVid + TikTok from the config, with the config's weights."""
    cfg = make_cfg(tmp_path, "stage=coarse", "task=t2v", "data=video_mix", f"data.sources.webvid.shards={root / 'video'}",
                   f"data.sources.tiktok.shards={root / 'multiview'}", "data.num_workers=0", "data.samples_per_epoch=8")
    assert cfg.data.train_shards is None
    dm = instantiate(cfg.data)
    weights = {s.name: s.weight for s in dm.sources}
    assert weights == {"webvid": cfg.data.sources.webvid.weight, "tiktok": cfg.data.sources.tiktok.weight}
    assert weights["webvid"] > weights["tiktok"] > 0
    dm.setup("fit")
    assert dm.source_urls == {"webvid": [str(root / "video" / f"train-{i:06d}.tar") for i in range(4)],
                              "tiktok": [str(root / "multiview" / f"train-{i:06d}.tar") for i in range(2)]}
    assert len(train_batches(dm)) == 8 // cfg.data.batch_size


@pytest.mark.parametrize("kwargs, message", [
    (dict(train_shards=["a", "b"], weights=[1, 2, 3]),
     "data.weights has 3 value(s) for 2 data.train_shards entries; give one weight per shard spec, e.g. data.weights=[1,1]"),
    (dict(train_shards="a", sources={"webvid": {"shards": "b"}}), "data.train_shards and data.sources are both set"),
    (dict(sources={"webvid": {"shards": "a", "weight": 1}}, weights=[1]), "give each source its own weight"),
    (dict(sources={"tiktok": {"shards": "a", "weight": -1}}), "data.sources.tiktok.weight must be a number >= 0, got -1"),
    (dict(sources={"tiktok": {"shards": "a", "weight": "lots"}}), "data.sources.tiktok.weight must be a number"),
    (dict(train_shards=["a", "b"], weights=[0, 0]), "every training source has weight 0"),
    (dict(sources={"tiktok": {"shards": None, "weight": 1}}), "data.sources.tiktok.shards is not set"),
    (dict(sources={"tiktok": {"shard": "a"}}), "data.sources.tiktok has unknown keys ['shard']"),
    (dict(), "no training data: set data.train_shards"),
])
def test_bad_source_configs_are_one_line_errors(kwargs, message):
    dm = GridDataModule(**kwargs)  # Hydra's instantiate would wrap an error here: it comes in setup (trainer.fit)
    with pytest.raises(ValueError) as info:
        dm.setup("fit")
    assert message in str(info.value) and "\n" not in str(info.value)
