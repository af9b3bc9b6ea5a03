"""medgen.data.brain: the brain mask derived from an image, against hand-built heads and the
phantoms' true brain."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medgen.data.brain import brain_mask, brain_source, inside_counts, inside_fraction, otsu_threshold


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(int(a.sum() + b.sum()), 1)


def test_otsu_threshold_maximises_the_between_class_variance():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.2, 0.03, 3000), rng.normal(0.7, 0.05, 1000)])

    def between(t: float) -> float:  # computed directly on the values, no histogram
        lo, hi = values[values <= t], values[values > t]
        return lo.size * hi.size * (lo.mean() - hi.mean()) ** 2

    candidates = np.linspace(0.3, 0.6, 301)
    best = candidates[np.argmax([between(t) for t in candidates])]
    assert abs(otsu_threshold(values) - best) < 0.01
    assert otsu_threshold(np.full(10, 0.4)) == pytest.approx(0.4)  # one level: nothing to split


def _head(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """An axial slice of a hand-built head: a brain ellipse (0.8) with a dark ventricle, a dark CSF +
    skull ring, a bright scalp ring (0.7) and air; and the true brain."""
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    r = np.sqrt((yy / 1.15) ** 2 + xx**2)
    brain = r < 0.34 * size
    image = np.zeros((size, size), np.float32)
    image[r < 0.46 * size] = 0.7  # scalp
    image[r < 0.40 * size] = 0.05  # skull and CSF
    image[brain] = 0.8
    image[(np.abs(yy) < 4) & (np.abs(xx) < 2)] = 0.1  # a ventricle inside the brain
    return image, brain


def test_a_hand_built_head_gives_its_brain_without_the_scalp():
    image, truth = _head()
    found = brain_mask(image)
    assert found.dtype == bool and found.shape == image.shape
    assert _dice(found, truth) > 0.97
    assert not found[image == 0.7].any()  # no scalp pixel
    assert found[32, 32]  # the ventricle is filled
    # a stack of slices is done slice by slice; an empty slice has no brain
    stack = brain_mask(np.stack([image, np.zeros_like(image)]))
    assert np.array_equal(stack[0], found) and not stack[1].any()


def test_two_separate_pieces_of_brain_are_both_kept():
    image, truth = _head()
    image[:, 31:34] = np.where(truth[:, 31:34], 0.05, image[:, 31:34])  # a dark fissure cuts the brain in two
    found = brain_mask(image)
    assert found[32, 20] and found[32, 44]


def test_the_phantoms_true_brain_is_found():
    from medgen.data.phantom import make_subject
    from medgen.data.transforms import preprocess_image, preprocess_mask

    subject = make_subject(5, size=96, slices=32, return_tissue=True)
    tissue = subject.tissue
    truth = preprocess_mask((tissue["gm"] + tissue["wm"] + tissue["csf"] > 0.5).astype(np.float32), 64) > 0
    image = preprocess_image(subject.volumes["bravo"], 64)
    found = np.moveaxis(brain_mask(np.moveaxis(image, -1, 0)), 0, -1)
    slices = [z for z in range(image.shape[-1]) if truth[..., z].mean() > 0.1]
    dice = [_dice(found[..., z], truth[..., z]) for z in slices]
    assert len(slices) >= 10 and np.mean(dice) >= 0.88, dice
    lesion = preprocess_mask(subject.volumes["seg"], 64) > 0
    assert inside_fraction(lesion, found) >= 0.9


def test_inside_counts_by_hand():
    mask = np.zeros((4, 4), np.uint8)
    mask[0, :3] = 1  # 3 lesion pixels
    brain = np.zeros((4, 4), bool)
    brain[0, 1:] = True  # 2 of them inside
    assert inside_counts(mask, brain) == (2, 3)
    assert inside_fraction(mask, brain) == pytest.approx(2 / 3)
    assert math.isnan(inside_fraction(np.zeros((4, 4)), brain))


def test_the_brain_of_a_sample_comes_from_the_image_the_training_data_used():
    assert brain_source(("bravo",), "bravo") == "bravo"
    assert brain_source(("t1_pre", "t1_gd"), "t1_gd") == "t1_gd"
    assert brain_source(("t1_pre", "t1_gd"), "bravo") == "t1_pre"  # not generated: the first image


def test_the_convex_hull_of_a_mask_by_hand():
    from medgen.data.brain import convex_hull

    ell = np.zeros((4, 4), np.uint8)
    ell[0:3, 0] = 1
    ell[2, 0:3] = 1  # an L of 5 pixels
    hull = convex_hull(ell)
    expected = np.zeros((4, 4), bool)
    expected[0:3, 0:3] = True
    expected[0, 2] = False  # its centre lies outside the hull of the L's squares; (0, 1) and (1, 2) lie on its edge
    assert np.array_equal(hull, expected)
    square = np.zeros((4, 4), bool)
    square[1:3, 1:4] = True
    assert not convex_hull(np.zeros((4, 4))).any() and np.array_equal(convex_hull(square), square)
