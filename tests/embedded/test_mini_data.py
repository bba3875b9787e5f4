"""The miniature world's data (gridgen.embedded.mini_data): raw clips, frames and scenes through prepare."""


import json
import tarfile

from gridgen.embedded.world import (
    mini_combinations,
)


def _samples(shard):
    samples = {}
    with tarfile.open(shard) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples



def test_mini_data_goes_through_prepare_with_its_card(mini_data):
    from gridgen.data.cards import load_card

    out, manifest = mini_data
    card = load_card("mini")
    for kind, splits in manifest["kinds"].items():
        for split, count in splits.items():
            assert count == max(1, round(card["expected"][kind][split] * 0.01))
            assert json.loads((out / kind / "manifest.json").read_text())["splits"][split]["counts"]["samples"] == count
    clips = _samples(out / "clips" / "test-000000.tar")
    held_out = {f"{s} {c} {m.words}" for s, c, m in mini_combinations("test")}
    for sample in clips.values():
        caption = sample["txt"].decode()
        assert caption.startswith("A 16-frame sequence arranged in a 4x4 grid. ")  # c_layout + c_content
        meta = json.loads(sample["json"])
        assert (meta["rows"], meta["cols"], meta["cell_height"]) == (4, 4, card["preprocessing"]["clips"]["cell_height"])
        assert meta["frame_indices"] == list(range(16))  # the whole clip: the caption's motion over 16 frames
        labels = meta["metadata"]
        assert meta["c_content"] == f"a {labels['color']} {labels['shape']} moves {labels['motion']}"
        assert f"{labels['shape']} {labels['color']} {labels['motion']}" in held_out
    for sample in _samples(out / "scenes" / "train-000000.tar").values():  # text-to-image sets: no c_layout
        assert sample["txt"].decode().startswith(("a ", "an "))
    frames = [sample["txt"].decode() for sample in _samples(out / "frames" / "train-000000.tar").values()]
    assert frames and not any("grid" in caption for caption in frames)  # varied wordings (test_world), no layout


def test_fewer_clips_than_combinations_spread_over_all_of_them(tmp_path):
    """The val split has fewer clips (64) than seen combinations (290): they are spread over every shape and colour,
    not the first 64 combinations (circles only); a split with more clips holds every combination equally often."""
    import csv

    from gridgen.data.cards import load_card
    from gridgen.embedded.mini_data import write_raw
    from gridgen.embedded.world import MINI_COLORS, SHAPES

    raw = load_card("mini")["raw"]
    rows = list(csv.DictReader(write_raw(tmp_path / "val", "clips", "val", 18, 0, raw).open()))
    assert {row["shape"] for row in rows} == set(SHAPES)
    assert {row["color"] for row in rows} == set(MINI_COLORS)
    combos = mini_combinations("test")
    rows = list(csv.DictReader(write_raw(tmp_path / "test", "clips", "test", 2 * len(combos), 0, raw).open()))
    counts = {}
    for row in rows:
        counts[row["shape"], row["color"], row["motion"]] = counts.get((row["shape"], row["color"], row["motion"]), 0) + 1
    assert len(counts) == len(combos) and set(counts.values()) == {2}


def test_a_shape_has_one_size_in_px_in_grid_cells_frames_and_scenes(mini_data):
    """The base learns shapes from frames and scenes and the grid LoRA draws them in cells: all three at one scale,
    ``MINI_RADIUS`` of the card's frame cell, measured on the prepared shards (area of each detected shape)."""
    import math

    from gridgen.embedded.mini_data import cell_size
    from gridgen.embedded.mini_vae import read_cells
    from gridgen.embedded.world import MINI_RADIUS
    from gridgen.eval.shapes import area_factor, detect

    out, _ = mini_data
    radius = MINI_RADIUS * cell_size("frames")
    for kind in ("clips", "frames", "scenes"):
        cells = read_cells(sorted((out / kind).glob("train-*.tar")), cell_size(kind))
        found = [math.sqrt(blob.area / area_factor(blob.shape))
                 for cell in cells for blob in detect(cell, radius=radius) if blob.shape is not None]
        assert len(found) >= 10, kind
        assert abs(float(sorted(found)[len(found) // 2]) / radius - 1) < 0.1, (kind, sorted(found))
