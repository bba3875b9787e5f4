"""Data cards are complete and the configs read them: conf/prepare/data/<name>.yaml takes its layout from the
card, conf/data/<name>.yaml streams the folder the card's prepare command writes."""

from __future__ import annotations

import pytest

from gridgen.config import CONF_DIR
from gridgen.data.cards import REQUIRED_KEYS, available_cards, card_value, load_card, read_card
from gridgen.layout import GridLayout
from tests.helpers.prepare import compose_prepare
from tests.helpers.train import make_cfg

DATA_CONFIGS = sorted(p.stem for p in (CONF_DIR / "prepare" / "data").glob("*.yaml"))


def test_cards_are_complete_and_configs_read_them():
    assert set(available_cards()) >= {"webvid", "tiktok", "objaverse", "sample", "grid_demo_multiview"}
    for name in available_cards():
        card = read_card(name)
        assert set(REQUIRED_KEYS) <= set(card) and card["name"] == name and card["body"].strip()
        # one sentence each: an unquoted "a: b" item would parse as a mapping
        assert all(isinstance(issue, str) for issue in card["known_issues"]), (name, card["known_issues"])
    for name in DATA_CONFIGS:
        cfg = compose_prepare(f"data={name}", "prepare.src=/raw", "prepare.out=/out")
        data = cfg.data  # every interpolation resolves
        GridLayout.parse(data.layout, data.cell_height, data.cell_width)
        if "card" in data:  # the card is the single source of truth
            card = load_card(data.card)
            assert data.layout == card["preprocessing"]["layout"]
            assert (data.cell_height, data.cell_width) == (card["preprocessing"]["cell_height"],
                                                           card["preprocessing"]["cell_width"])
            assert data.source.kind == card["source"] and data.shards.maxcount == card["shards"]["maxcount"]
            assert f"data={name} " in card["prepare_command"]
    # an override wins over the card
    assert compose_prepare("data=webvid", "data.layout=8x8", "prepare.src=a", "prepare.out=b").data.layout == "8x8"
    assert card_value("objaverse", "preprocessing.layout") == "4x6"
    with pytest.raises(KeyError, match="no key 'preprocessing.nope'"):
        card_value("webvid", "preprocessing.nope")


def test_data_configs_stream_where_the_cards_prepare(tmp_path, monkeypatch):
    """conf/data/<name>.yaml reads the folder that data_cards/<name>.md's prepare command writes."""
    import re

    from gridgen.data.cards import load_card

    monkeypatch.delenv("GRIDGEN_DATA", raising=False)

    def prepare_out(card: str) -> str:
        return re.search(r"prepare\.out=(\S+)", load_card(card)["prepare_command"])[1]

    for name in ("webvid", "tiktok", "objaverse"):
        assert make_cfg(tmp_path, f"data={name}").data.train_shards == prepare_out(name)
    mix = make_cfg(tmp_path, "data=video_mix").data
    assert {k: v.shards for k, v in mix.sources.items()} == {"webvid": prepare_out("webvid"),
                                                            "tiktok": prepare_out("tiktok")}
    monkeypatch.setenv("GRIDGEN_DATA", "/mnt/shards")
    assert make_cfg(tmp_path, "data=tiktok").data.train_shards == "/mnt/shards/tiktok-4x4"
