"""Lesion-wise figures against hand-counted cases and the binomial closed form for the interval."""

from __future__ import annotations

import numpy as np
import pytest

from medgen.data.lesions import RANO_BM, SizeBins
from medgen.evaluation.lesionwise import match_lesions, summarize


def _slice(*boxes) -> np.ndarray:
    m = np.zeros((64, 64))
    for y0, y1, x0, x1 in boxes:
        m[y0:y1, x0:x1] = 1
    return m


def test_a_missed_a_half_found_and_a_false_lesion_by_hand():
    truth = _slice((2, 5, 2, 5), (20, 32, 20, 32))  # 3x3 px (4.2 mm: tiny), 12x12 px (17.0 mm: small)
    pred = _slice((20, 26, 20, 32), (50, 52, 50, 52))  # the upper half of the big one, and a 2x2 px false lesion
    m = match_lesions(truth, pred, (1.0, 1.0))
    assert m.diameters == pytest.approx([np.sqrt(18), np.sqrt(288)])
    assert m.found.tolist() == [False, True]
    assert m.dice == pytest.approx([0.0, 2 * 72 / (144 + 72)])
    assert m.false_positive_diameters == pytest.approx([np.sqrt(8)])


def test_a_prediction_bridging_two_lesions_and_one_split_in_two():
    truth = _slice((10, 14, 10, 14), (10, 14, 20, 24), (40, 50, 40, 50))
    pred = _slice((10, 12, 10, 24), (40, 50, 40, 44), (40, 50, 46, 50))  # a bridge over the first two; two pieces
    m = match_lesions(truth, pred, (1.0, 1.0))
    assert m.found.tolist() == [True, True, True] and len(m.false_positive_diameters) == 0
    # each bridged lesion: 8 of its 16 px overlapped, the bridge has 28 px
    assert m.dice[:2] == pytest.approx([2 * 8 / (16 + 28)] * 2)
    assert m.dice[2] == pytest.approx(2 * 80 / (100 + 80))  # both pieces count for the lesion they split
    empty = match_lesions(np.zeros((8, 8)), np.zeros((8, 8)), (1.0, 1.0))
    assert len(empty.diameters) == 0 and len(empty.false_positive_diameters) == 0


def test_the_summary_per_bin_by_hand():
    spacing = (1.0, 1.0)
    slices = [
        match_lesions(_slice((2, 5, 2, 5), (20, 32, 20, 32)), _slice((20, 32, 20, 32)), spacing),  # tiny missed
        match_lesions(_slice((2, 5, 2, 5)), _slice((2, 5, 2, 5), (40, 42, 40, 42)), spacing),  # tiny found, a tiny FP
        match_lesions(np.zeros((64, 64)), _slice((40, 42, 40, 42)), spacing),  # lesion-free slice, a tiny FP
    ]
    s = summarize(slices, RANO_BM, resamples=200)
    tiny, small = s["bins"]["tiny"], s["bins"]["small"]
    assert s["items"] == 3 and tiny["lesions"] == 2 and small["lesions"] == 1
    assert tiny["sensitivity"]["value"] == pytest.approx(0.5) and small["sensitivity"]["value"] == 1.0
    assert tiny["dice"]["value"] == pytest.approx(0.5) and small["dice"]["value"] == 1.0
    assert tiny["false_positives_per_item"]["value"] == pytest.approx(2 / 3)
    assert small["false_positives_per_item"]["value"] == 0.0
    for bin_ in ("medium", "large"):  # no true lesion: nothing to measure but false positives
        assert s["bins"][bin_]["sensitivity"] == {"value": None, "ci95": None}
        assert "cannot be measured" in s["bins"][bin_]["skipped"]
    assert s["all"]["lesions"] == 3 and s["all"]["sensitivity"]["value"] == pytest.approx(2 / 3)
    lo, hi = tiny["sensitivity"]["ci95"]
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0
    assert s["bins"]["small"]["sensitivity"]["ci95"] == [1.0, 1.0]  # every resample that has it finds it
    assert summarize(slices, RANO_BM, resamples=200) == s  # seeded
    with pytest.raises(ValueError, match="no slices"):
        summarize([], RANO_BM)


def test_the_interval_matches_the_binomial_closed_form():
    """400 slices with one lesion each, half found: the 95% interval is about p ± 1.96·√(p(1-p)/n)."""
    hit, miss = _slice((10, 13, 10, 13)), np.zeros((64, 64))
    found = match_lesions(hit, hit, (1.0, 1.0))
    missed = match_lesions(hit, miss, (1.0, 1.0))
    s = summarize([found, missed] * 200, SizeBins.from_edges([]), resamples=4000, seed=1)
    lo, hi = s["bins"]["any"]["sensitivity"]["ci95"]
    half_width = 1.96 * np.sqrt(0.25 / 400)
    assert lo == pytest.approx(0.5 - half_width, abs=0.006) and hi == pytest.approx(0.5 + half_width, abs=0.006)


def _summary(sens, dice, fp):
    entry = {"sensitivity": {"value": sens}, "dice": {"value": dice}, "false_positives_per_item": {"value": fp}}
    return {"bins": {"tiny": entry}, "all": entry}


def test_figures_over_seeds_and_the_yardstick_rule():
    from medgen.evaluation.lesionwise import over_seeds, yardstick

    seeds = over_seeds([_summary(0.4, 0.2, 1.0), _summary(0.6, 0.4, 0.0), _summary(None, None, 0.5)])
    assert seeds["mean"]["tiny"]["sensitivity"] == pytest.approx(0.5)
    assert seeds["std"]["tiny"]["sensitivity"] == pytest.approx(np.std([0.4, 0.6], ddof=1))  # seeds that measured it
    assert seeds["mean"]["all"]["false_positives_per_item"] == pytest.approx(0.5)
    assert over_seeds([_summary(None, None, 0.0)])["mean"]["all"]["sensitivity"] is None
    assert over_seeds([_summary(0.7, 0.5, 0.0)])["std"]["all"]["sensitivity"] == 0.0

    weak = yardstick(seeds, min_sensitivity=0.5, min_dice=0.5)
    assert not weak["ok"] and weak["warning"].startswith("the yardstick is too weak to judge: the segmenter trained "
                                                         "on real data finds 50% of the real test lesions with a "
                                                         "mean lesion Dice of 0.30")
    good = yardstick(seeds, min_sensitivity=0.5, min_dice=0.3)
    assert good["ok"] and "warning" not in good
    assert "has no lesion" in yardstick(over_seeds([_summary(None, None, 0.0)]), 0.5, 0.3)["warning"]


@pytest.mark.parametrize("bins,message", [
    ("rano", r"unknown binning 'rano'; use one of \['rano_bm'\] or a list of increasing diameters in mm"),
    ([10, 5], r"bin edges must be positive, finite and increasing, got \[10.0, 5.0\] mm"),
    (7, "must be a binning's name"),
])
def test_bad_bins_name_the_key(bins, message):
    from medgen.core.schema import ConfigError
    from medgen.evaluation.config import evaluate_config

    with pytest.raises(ConfigError, match=rf"config error at 'lesions.bins': {message}"):
        evaluate_config({"real_dir": "r", "synthetic_dir": "s", "lesions": {"bins": bins}})
    fine = evaluate_config({"real_dir": "r", "synthetic_dir": "s", "lesions": {"bins": [3, 6, 10]}})
    assert list(fine.lesions.bins) == [3, 6, 10]
