"""Data cards are complete and the configs read them: conf/prepare/data/<name>.yaml takes its layout from the
card, conf/data/<name>.yaml streams the folder the card's prepare command writes."""

from __future__ import annotations

from tests.helpers.train import make_cfg


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
