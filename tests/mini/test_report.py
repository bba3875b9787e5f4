"""The miniature's report (gridgen.mini.report): its interval, its table and its differences paired by seed."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from gridgen.mini.report import (
    COLUMNS,
    dig,
    guider_words,
    interval,
    markdown_table,
    paired,
    paired_markdown,
    summarise,
)


def test_interval_is_students_t_over_seeds():
    values = [0.8, 0.9, 0.7]
    mean, half = interval(values)
    ref = stats.t.interval(0.95, 2, loc=np.mean(values), scale=stats.sem(values))
    assert mean == pytest.approx(0.8) and (mean - half, mean + half) == pytest.approx(ref)
    assert math.isnan(interval([0.5])[1])


def test_summarise_reads_dotted_keys_and_scales_percentages():
    runs = [{"metrics": {"world_identity_all": v, "world_identity_cells": v / 10, "fvd": 100.0 + 10 * k},
             "held_out": {"val/loss_base": 0.5}} for k, v in enumerate([0.5, 1.0])]
    assert dig(runs[0], "held_out.val/loss_base") == 0.5 and dig(runs[0], "metrics.missing") is None
    table = summarise({"filmstrip": runs})
    mean, half, n = table["filmstrip"]["metrics.world_identity_all"]
    assert table["filmstrip"]["metrics.world_identity_cells"][0] == pytest.approx(7.5)  # fraction of cells -> %
    assert (mean, n) == (75.0, 2) and half == pytest.approx(stats.t.ppf(0.975, 1) * np.std([50, 100], ddof=1) / 2 ** 0.5)
    text = markdown_table(table)
    assert text.count("\n") == 2 and "| filmstrip | 75 ± " in text
    assert len(text.splitlines()[0].split("|")) == len(COLUMNS) + 3


def test_the_report_names_the_guider_it_sampled_with():
    """The report's sampling sentence says nothing more for true CFG on every step, and names an eval.guider."""
    assert guider_words({"true_cfg_scale": 4.0, "guider": None}) == ""
    words = guider_words({"guider": {"name": "ClassifierFreeGuidance", "stop": 0.5}})
    assert words == " through diffusers' ClassifierFreeGuidance (stop=0.5)"
    assert guider_words({"guider": {"name": "AdaptiveProjectedGuidance"}}) == " through diffusers' AdaptiveProjectedGuidance"


def test_differences_are_paired_by_seed_not_by_position():
    """Each later variant minus each earlier one over the seeds both have, matched by seed number whatever the order
    of the records; the base (no LoRA, no seed pairing) is left out; the interval is scipy's paired t interval."""
    def run(seed, smooth, identity=None):
        return {"seed": seed, "metrics": {"world_smoothness_px": smooth,
                                          **({} if identity is None else {"world_identity_all": identity})}}

    records = {"no_flow": [run(0, 4.0, 0.2), run(1, 5.0, 0.3), run(2, 4.5, 0.1)],
               "filmstrip": [run(2, 4.1, 0.2), run(0, 3.5, 0.2), run(1, 4.7, 0.4)],   # other order
               "within_row": [run(0, 3.9), run(1, 4.6)],                              # seed 2 missing
               "base_without_lora": [run(0, 9.0), run(1, 9.0), run(2, 9.0)]}
    differences = paired(records)
    assert list(differences) == [("filmstrip", "no_flow"), ("within_row", "no_flow"), ("within_row", "filmstrip")]
    mean, half, diffs = differences[("filmstrip", "no_flow")]["metrics.world_smoothness_px"]
    assert diffs == pytest.approx([-0.5, -0.3, -0.4])  # seeds 0, 1, 2
    low, high = stats.t.interval(0.95, 2, loc=np.mean(diffs), scale=stats.sem(diffs))
    assert (mean - half, mean + half) == pytest.approx((low, high))
    assert differences[("filmstrip", "no_flow")]["metrics.world_identity_all"][2] == pytest.approx([0, 10, 10])  # %
    assert differences[("within_row", "filmstrip")]["metrics.world_smoothness_px"][2] == pytest.approx([0.4, -0.1])
    assert "metrics.world_identity_all" not in differences[("within_row", "no_flow")]
    text = paired_markdown(differences)
    rows = {line.split(" | ")[0]: line for line in text.splitlines()[2:]}
    smooth = rows["| smoothness residual (px) (lower)"]
    assert "**-0.40 ± 0.25** (-0.50, -0.30, -0.40)" in smooth  # excludes 0: bold
    assert "+0.15 ± " in smooth and "**+0.15" not in smooth      # [0.4, -0.1]: reaches 0
    assert text.splitlines()[0].count(" - ") == 3 and paired_markdown(paired({"no_flow": records["no_flow"]})) == ""
