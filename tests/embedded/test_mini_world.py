"""The miniature world (gridgen.embedded.world): its held-out split, its motions, its captions, and the data and
models made from it (mini_data, mini_vae, mini_model) at a toy size."""

from __future__ import annotations

import json
import math
import tarfile

import numpy as np
import pytest
import torch

from gridgen.embedded.world import (
    CIRCLES,
    DIRECTIONS,
    FAMILIES,
    MINI_COLORS,
    MINI_RADIUS,
    MOTIONS,
    SHAPES,
    SPEEDS,
    held_out_family,
    mini_caption,
    mini_clip,
    mini_combinations,
    mini_scene,
    trajectory,
)


def test_the_test_split_holds_out_whole_combinations_and_training_keeps_every_word():
    train, test = mini_combinations("train"), mini_combinations("test")
    assert len(MOTIONS) == 18 and len(train) + len(test) == len(SHAPES) * len(MINI_COLORS) * len(MOTIONS)
    assert not {(s, c, m.family) for s, c, m in train} & {(s, c, m.family) for s, c, m in test}
    assert mini_combinations("val") == train
    # every (shape, family), (colour, family) and (shape, colour) pair is still seen in training
    assert {(s, m.family) for s, _, m in train} == {(s, f) for s in SHAPES for f in FAMILIES}
    assert {(c, m.family) for _, c, m in train} == {(c, f) for c in MINI_COLORS for f in FAMILIES}
    assert {(s, c) for s, c, _ in train} == {(s, c) for s in SHAPES for c in MINI_COLORS}
    # one family per (shape, colour) pair; each family is held out for one or two pairs
    counts = {f: sum(held_out_family(s, c) == f for s in SHAPES for c in MINI_COLORS) for f in FAMILIES}
    assert set(counts.values()) <= {1, 2}
    with pytest.raises(ValueError, match="split must be"):
        mini_combinations("dev")


@pytest.mark.parametrize("motion", MOTIONS, ids=lambda m: m.words)
def test_trajectories_follow_their_caption_and_stay_inside(motion):
    rng = np.random.default_rng(3)
    for _ in range(20):
        path = trajectory(motion, rng, 16)  # (16, 2) in frame sides
        assert path.min() >= MINI_RADIUS - 1e-9 and path.max() <= 1 - MINI_RADIUS + 1e-9
        steps = np.diff(path, axis=0)
        if motion.circular:
            centre = path.mean(axis=0)
            radii = np.linalg.norm(path - centre, axis=1)
            np.testing.assert_allclose(radii, radii[0], rtol=1e-6)
            rel = path - centre
            cross = rel[:-1, 0] * rel[1:, 1] - rel[:-1, 1] * rel[1:, 0]  # y down: > 0 turns clockwise on screen
            assert np.sign(cross).tolist() == [CIRCLES[motion.family]] * 15
        else:
            np.testing.assert_allclose(steps, np.broadcast_to(steps[0], steps.shape), atol=1e-12)  # constant velocity
            np.testing.assert_allclose(path[-1] - path[0], np.asarray(DIRECTIONS[motion.family]) * SPEEDS[motion.speed],
                                       atol=1e-12)


def test_clips_draw_one_shape_of_the_caption_colour_where_the_trajectory_says():
    shape, color, motion = "square", "blue", MOTIONS[0]
    frames, centres = mini_clip(np.random.default_rng(0), shape, color, motion, 16, 64)
    assert frames.shape == (16, 64, 64, 3) and frames.dtype == np.uint8
    for frame, (x, y) in zip(frames, centres, strict=True):
        mask = np.abs(frame.astype(int) - np.asarray(MINI_COLORS[color])).sum(-1) < 30
        ys, xs = np.nonzero(mask)
        assert abs(xs.mean() + 0.5 - x) < 0.6 and abs(ys.mean() + 0.5 - y) < 0.6  # pixel centres
    assert mini_caption(shape, color, motion) == "a blue square moves slowly to the right"


def test_scenes_name_their_shapes_left_to_right_without_overlap():
    for seed in range(10):
        image, caption, placed = mini_scene(np.random.default_rng(seed), 128, 32)
        assert image.shape == (128, 128, 3)
        assert [x for _, _, x, _ in placed] == sorted(x for _, _, x, _ in placed)
        assert caption.count(" a ") + caption.startswith(("a ", "an ")) == len(placed)
        for i, (_, _, x1, y1) in enumerate(placed):
            for _, _, x2, y2 in placed[i + 1:]:
                assert math.hypot(x1 - x2, y1 - y2) > 2 * MINI_RADIUS * 32


# ---- data, VAE and pipeline made from the world (toy sizes) -------------------------------------------------

@pytest.fixture(scope="module")
def mini_data(tmp_path_factory):
    from gridgen.embedded.mini_data import write_mini_data

    out = tmp_path_factory.mktemp("mini") / "data"
    return out, write_mini_data(out, scale=0.01)


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
        assert (meta["rows"], meta["cols"], meta["cell_height"]) == (4, 4, 32)
        assert meta["frame_indices"] == list(range(16))  # the whole clip: the caption's motion over 16 frames
        labels = meta["metadata"]
        assert meta["c_content"] == f"a {labels['color']} {labels['shape']} moves {labels['motion']}"
        assert f"{labels['shape']} {labels['color']} {labels['motion']}" in held_out
    for kind in ("frames", "scenes"):  # text-to-image sets: no c_layout
        for sample in _samples(out / kind / "train-000000.tar").values():
            assert sample["txt"].decode().startswith(("a ", "an "))


def test_mini_vae_trains_and_normalises_from_its_data(mini_data):
    from diffusers import AutoencoderKL

    from gridgen.embedded.mini_vae import MINI_VAE_CONFIG, psnr, read_cells, to_tensor, train_vae

    out, _ = mini_data
    cells = read_cells(sorted((out / "clips").glob("train-*.tar")), 32)
    assert cells.shape[1:] == (32, 32, 3) and len(cells) == 16 * len(_samples(out / "clips" / "train-000000.tar"))
    vae, figures = train_vae(cells[:64], cells[64:96], steps=2, batch_size=4)
    assert isinstance(vae, AutoencoderKL) and vae.config.latent_channels == 16
    with torch.no_grad():
        z = vae.encode(to_tensor(cells[:96])).latent_dist.mode()
        recon = vae.decode(vae.encode(to_tensor(cells[64:96])).latent_dist.mode()).sample.clamp(-1, 1)
    assert z.shape[1:] == (16, 4, 4)  # FLUX's factor 8
    normalised = (z[:64] - vae.config.shift_factor) * vae.config.scaling_factor
    assert abs(float(normalised.mean())) < 0.05 and abs(float(normalised.std()) - 1) < 0.05
    mse = float((((recon + 1) / 2 - (to_tensor(cells[64:96]) + 1) / 2) ** 2).mean())
    assert figures["psnr_db"] == pytest.approx(10 * math.log10(1 / mse), abs=1e-3)
    assert psnr(vae, cells[64:96]) == pytest.approx(figures["psnr_db"], abs=1e-6)
    assert MINI_VAE_CONFIG["use_quant_conv"] is False


def test_mini_pipeline_is_a_flux_pipeline_whose_tokenizers_know_the_world(tmp_path):
    from diffusers import AutoencoderKL, FluxPipeline

    from gridgen.embedded.mini_model import MINI_TRANSFORMER_CONFIG, build_mini_pipeline
    from gridgen.embedded.mini_vae import MINI_VAE_CONFIG

    folder = build_mini_pipeline(AutoencoderKL(**MINI_VAE_CONFIG), tmp_path / "init")
    assert not list(tmp_path.glob(".init.tmp-*"))
    pipe = FluxPipeline.from_pretrained(folder)
    assert pipe.transformer.config.num_single_layers == MINI_TRANSFORMER_CONFIG["num_single_layers"]
    tokens = pipe.tokenizer_2.tokenize("A 16-frame sequence arranged in a 4x4 grid. a purple triangle moves quickly "
                                       "to the upper left")
    assert "▁triangle" in tokens and "▁upper" in tokens and len(tokens) + 1 <= 20  # + </s>: model.max_sequence_length=20
    clip_tokens = pipe.tokenizer.tokenize("a cyan square moves in a counterclockwise circle")
    assert len(clip_tokens) < 12
