"""The miniature's report (gridgen.mini.report): its interval and table."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from gridgen.mini.report import COLUMNS, dig, guider_words, interval, markdown_table, summarise


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
