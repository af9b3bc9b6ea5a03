"""The BraTS-METS 2023 lesion-wise rules (medgen.evaluation.bratsmets) on hand-made cases whose
figures are worked out by hand in the comments, and HD95 against MONAI's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance

from medgen.data.lesions import SizeBins
from medgen.evaluation.bratsmets import MISSED_HD95_MM, hd95, score_case, summarize_cases

SHAPE = (20, 12, 12)


def cube(x0: int, x1: int, lo: int = 4, hi: int = 6, shape=SHAPE) -> np.ndarray:
    """A box of lesion voxels x in [x0, x1), y and z in [lo, hi)."""
    m = np.zeros(shape, np.uint8)
    m[x0:x1, lo:hi, lo:hi] = 1
    return m


@pytest.mark.parametrize("gap,lesions", [(1, 1), (2, 1), (3, 2)])
def test_true_lesions_closer_than_their_dilations_merge(gap, lesions):
    # two 2x2x2 cubes; dilated by one voxel (18-connected element) they touch or overlap up to a gap of 2
    truth = cube(2, 4) | cube(4 + gap, 6 + gap)
    s = score_case(truth, truth, (1, 1, 1))
    assert (s.num_tp, s.num_fn, s.num_fp) == (lesions, 0, 0)
    assert s.lesionwise_dice == 1.0 and s.lesionwise_hd95 == 0.0


def test_a_merged_lesion_is_scored_as_one_against_the_prediction_of_half_of_it():
    truth = cube(2, 4) | cube(5, 7)  # gap 1: one lesion of 16 voxels
    s = score_case(truth, cube(2, 4), (1, 1, 1))
    # Dice 2*8 / (16 + 8); HD95: the lesion's surface voxels are at 0 (8), 2 (4) and 3 mm (4) from the
    # prediction's; the 95th percentile of those 16 is 3; the other direction is 0
    assert s.lesionwise_dice == pytest.approx(2 / 3) and s.lesionwise_hd95 == pytest.approx(3.0)
    assert (s.num_tp, s.num_fp, s.num_fn) == (1, 0, 0)
    assert s.legacy_dice == pytest.approx(2 / 3) and s.legacy_hd95 == pytest.approx(3.0)


@pytest.mark.parametrize("spacing,kept", [((1, 1, 1), False), ((1, 1, 2), False), ((1, 1, 2.5), True)])
def test_lesions_of_at_most_two_cubic_mm_are_left_out(spacing, kept):
    truth = cube(10, 13, 2, 5)  # 27 voxels, found exactly
    truth[2, 9, 9] = 1  # one voxel of 1, 2 or 2.5 mm³, missed
    s = score_case(truth, cube(10, 13, 2, 5), spacing)
    if kept:  # (1 + 0) / 2 lesions; HD95 (0 + 374) / 2
        assert (s.lesionwise_dice, s.lesionwise_hd95, s.num_fn, s.dropped) == (0.5, MISSED_HD95_MM / 2, 1, 0)
    else:
        assert (s.lesionwise_dice, s.lesionwise_hd95, s.num_fn, s.dropped) == (1.0, 0.0, 0, 1)
    assert s.legacy_dice == pytest.approx(2 * 27 / (28 + 27))  # the whole masks keep the small lesion


def test_a_prediction_reaching_only_a_dropped_lesion_is_no_false_positive():
    truth = np.zeros(SHAPE, np.uint8)
    truth[5, 5, 5] = 1
    pred = np.zeros(SHAPE, np.uint8)
    pred[5, 6, 6] = 1  # in the lesion's dilated region (18-neighbour), not on it
    s = score_case(truth, pred, (1, 1, 1))
    assert (s.num_tp, s.num_fp, s.num_fn, s.dropped) == (0, 0, 0, 1)
    assert (s.lesionwise_dice, s.lesionwise_hd95) == (1.0, 0.0)  # nothing left to score: 0/0 is a perfect case


def test_a_false_positive_joins_the_denominator():
    truth = cube(2, 5, 2, 5)
    pred = truth | cube(14, 17, 7, 10)  # a second box far from the lesion
    s = score_case(truth, pred, (1, 1, 1))
    assert (s.num_tp, s.num_fp, s.num_fn) == (1, 1, 0)
    assert (s.lesionwise_dice, s.lesionwise_hd95) == (0.5, MISSED_HD95_MM / 2)  # (1 + 0) / 2, (0 + 374) / 2
    assert s.legacy_dice == pytest.approx(2 / 3)  # 2*27 / (27 + 54)


def test_a_prediction_in_the_dilated_ring_counts_for_the_lesion_with_dice_zero():
    truth = cube(2, 5, 2, 5)
    pred = np.zeros(SHAPE, np.uint8)
    pred[5, 3, 3] = 1  # face neighbour of the box: inside its dilation, outside the lesion
    s = score_case(truth, pred, (1, 1, 1))
    assert (s.num_tp, s.num_fp, s.num_fn) == (1, 0, 0)
    assert s.lesionwise_dice == 0.0
    # surface voxels of the 3x3x3 box are its 26 outer voxels; their distances to (5, 3, 3)
    box = np.argwhere(truth)
    d = np.sqrt(((box - [5, 3, 3]) ** 2).sum(1))
    outer = np.any((box == 2) | (box == 4), axis=1)
    assert s.lesionwise_hd95 == pytest.approx(np.percentile(d[outer], 95))


def test_a_split_prediction_is_one_union():
    truth = cube(2, 6, 2, 6)  # 4x4x4 = 64 voxels
    pred = truth.copy()
    pred[4] = 0  # two pieces: x 2-3 (32 voxels) and x 5 (16 voxels), both on the lesion
    s = score_case(truth, pred, (1, 1, 1))
    assert (s.num_tp, s.num_fp, s.num_fn) == (1, 0, 0)
    assert s.lesionwise_dice == pytest.approx(2 * 48 / (64 + 48))


def test_a_missed_lesion_scores_zero_and_374():
    truth = cube(2, 5, 2, 5) | cube(14, 17, 7, 10)
    s = score_case(truth, cube(2, 5, 2, 5), (1, 1, 1))
    assert (s.num_tp, s.num_fp, s.num_fn) == (1, 0, 1)
    assert (s.lesionwise_dice, s.lesionwise_hd95) == (0.5, MISSED_HD95_MM / 2)


def test_empty_cases():
    empty = np.zeros(SHAPE, np.uint8)
    both = score_case(empty, empty, (1, 1, 1))
    assert (both.lesionwise_dice, both.lesionwise_hd95, both.legacy_dice, both.legacy_hd95) == (1.0, 0.0, 1.0, 0.0)
    fp = score_case(empty, cube(2, 4), (1, 1, 1))
    assert (fp.lesionwise_dice, fp.lesionwise_hd95, fp.num_fp) == (0.0, MISSED_HD95_MM, 1)
    assert (fp.legacy_dice, fp.legacy_hd95) == (0.0, MISSED_HD95_MM)
    missed = score_case(cube(2, 4), empty, (1, 1, 1))
    assert (missed.lesionwise_dice, missed.lesionwise_hd95, missed.num_fn) == (0.0, MISSED_HD95_MM, 1)


def test_slices_use_the_2d_analogues():
    a = np.zeros((12, 12), np.uint8)
    a[2:4, 2:4] = 1
    a[6:8, 2:4] = 1  # gap of 2 rows: the 3x3 dilations touch, one lesion
    assert score_case(a, a, (1, 1), voxel_mm3=3.0).num_tp == 1
    b = np.zeros((12, 12), np.uint8)
    b[2:4, 2:4] = 1
    b[7:9, 2:4] = 1  # gap of 3: two lesions
    assert score_case(b, b, (1, 1), voxel_mm3=3.0).num_tp == 2
    dot = np.zeros((12, 12), np.uint8)
    dot[5, 5] = 1  # one pixel of 0.5 x 0.5 mm: 0.25 mm² x 4 mm thick = 1 mm³ (left out); x 12 mm = 3 mm³ (kept)
    assert score_case(dot, np.zeros_like(dot), (0.5, 0.5), voxel_mm3=1.0).dropped == 1
    assert score_case(dot, np.zeros_like(dot), (0.5, 0.5), voxel_mm3=3.0).num_fn == 1


@pytest.mark.parametrize("seed", range(4))
def test_hd95_agrees_with_monai(seed):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    shape, spacing = (24, 20, 16), (0.8, 1.0, 2.5)
    a, b = (ndimage.binary_opening(ndimage.gaussian_filter(rng.random(shape), 2) > 0.52) for _ in range(2))
    assert a.any() and b.any()
    ref = compute_hausdorff_distance(torch.from_numpy(b)[None, None].float(), torch.from_numpy(a)[None, None].float(),
                                     include_background=True, percentile=95, spacing=list(spacing))
    assert hd95(a, b, spacing) == pytest.approx(float(ref), abs=1e-4)


def test_a_set_is_the_mean_over_cases_and_bins_apply_rule_six_per_bin():
    small, large = cube(2, 4, 2, 4), cube(10, 16, 4, 10)  # Feret diameters about 1.7 and 8.7 mm
    bins = SizeBins.from_edges([5.0])
    first = score_case(small | large, large, (1, 1, 1))  # small missed: (0 + 1) / 2
    second = score_case(large, large | cube(2, 3, 2, 3), (1, 1, 1))  # one-voxel false positive: 1 / 2
    third = score_case(np.zeros(SHAPE), np.zeros(SHAPE), (1, 1, 1))  # empty pair: 1
    out = summarize_cases([first, second, third], bins, resamples=200)
    assert out["cases"] == 3 and out["lesionwise_dice"]["value"] == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert (out["num_tp"], out["num_fp"], out["num_fn"]) == (2, 1, 1)
    lo, hi = out["lesionwise_dice"]["ci95"]
    assert 0.5 <= lo <= hi <= 1.0
    small_bin, large_bin = out["bins"]["<5mm"], out["bins"][">=5mm"]
    # small bin: case 1 has the missed lesion (0 / 1), case 2 the small false positive (0 / 1), case 3 nothing
    assert small_bin["cases"] == 2 and small_bin["lesionwise_dice"]["value"] == 0.0
    assert small_bin["lesionwise_hd95"]["value"] == MISSED_HD95_MM
    # large bin: both found exactly in cases 1 and 2
    assert large_bin["cases"] == 2 and large_bin["lesionwise_dice"]["value"] == 1.0
    assert (small_bin["num_fn"], small_bin["num_fp"], large_bin["num_tp"]) == (1, 1, 2)
