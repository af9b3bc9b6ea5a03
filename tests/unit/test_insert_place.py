"""Insertion's geometry against brute force: where a region may go, how it is grown, how shapes are sized."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from medgen.data.lesions import RANO_BM, feret_diameters, parse_bins
from medgen.generation.insert_place import Shape, ShapeBank, bank_from_masks, place, region_of, resize_to_class


def _disc(shape, centre, radius):
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2


def _brute_force(region, brain, taken):
    """Every centre where ``region`` lies in ``brain`` and off ``taken``, by trying each one."""
    half = [n // 2 for n in region.shape]
    out = set()
    for c in itertools.product(*(range(h, n - h) for h, n in zip(half, brain.shape))):
        box = tuple(slice(ci - h, ci + h + 1) for ci, h in zip(c, half))
        if brain[box][region].all() and not taken[box][region].any():
            out.add(c)
    return out


@pytest.mark.parametrize("dims", [2, 3])
def test_placement_takes_exactly_the_positions_brute_force_allows_each_equally_often(dims):
    shape = (24, 20) if dims == 2 else (16, 14, 12)
    brain = _disc(shape, [n / 2 for n in shape], min(shape) * 0.45)
    taken = _disc(shape, [n * 0.4 for n in shape], 2.5)
    lesion = np.ones((2,) * dims, dtype=bool)
    region, placed_lesion = region_of(lesion, 1)
    allowed = _brute_force(region, brain, taken)
    assert allowed  # the case has room
    rng = np.random.default_rng(0)
    draws = [place(region, placed_lesion, brain, taken, rng).centre for _ in range(40 * len(allowed))]
    assert set(draws) == allowed
    counts = np.asarray([draws.count(c) for c in sorted(allowed)])
    expected = len(draws) / len(allowed)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < len(allowed) + 6 * np.sqrt(2 * len(allowed))  # uniform (far inside the 1e-8 tail)


def test_no_room_is_none():
    brain = _disc((16, 16), (8, 8), 3)
    region, lesion = region_of(np.ones((5, 5), dtype=bool), 2)
    assert place(region, lesion, brain, np.zeros_like(brain), np.random.default_rng(0)) is None


@pytest.mark.parametrize("margin", [1, 2, 3])
def test_the_region_is_the_lesion_grown_by_its_26_neighbours_then_a_ball(margin):
    from scipy import ndimage

    lesion = _disc((5, 7, 3), (2, 3, 1), 2)
    region, framed = region_of(lesion, margin)
    assert all(n % 2 == 1 for n in region.shape)
    assert framed.sum() == lesion.sum()
    expected = ndimage.binary_dilation(framed, np.ones((3, 3, 3), bool))
    if margin > 1:
        r = margin - 1
        ball = sum(g ** 2 for g in np.indices((2 * r + 1,) * 3) - r) <= r * r
        expected = ndimage.binary_dilation(expected, ball)
    assert np.array_equal(region, expected)
    # no voxel 26-adjacent to the lesion lies outside the region (so regions apart means lesions apart)
    assert not (ndimage.binary_dilation(framed, np.ones((3, 3, 3), bool)) & ~region).any()


@pytest.mark.parametrize("cls", [0, 1, 2, 3])
def test_a_shape_is_resized_into_any_size_class(cls):
    spacing = (1.0, 1.0)
    mask = _disc((21, 21), (10, 10), 6)
    bank = bank_from_masks(mask[None], ["real train/p/z0"], spacing)
    shape = resize_to_class(bank.shapes[0], RANO_BM, cls, spacing, np.random.default_rng(cls))
    assert shape is not None
    d = feret_diameters(shape.mask, spacing)
    assert len(d) == 1 and RANO_BM.index(d)[0] == cls and shape.diameter == pytest.approx(d[0])
    assert shape.source == "real train/p/z0#1"


def test_a_thin_shape_with_its_images_shrinks_to_a_tiny_lesion_with_images_around_it():
    """A lesion of 1 x 12 pixels at 4 mm zoomed into the tiny class (< 10 mm): its short axis would zoom to
    no pixel at all (it did, and the copy painter's images could not be cut)."""
    spacing, pad = (4.0, 4.0), 2
    mask = np.zeros((1 + 2 * pad, 12 + 2 * pad), bool)
    mask[pad, pad:-pad] = True
    images = np.random.default_rng(0).random((2, *mask.shape)).astype(np.float32)
    bank = bank_from_masks(mask[None], ["real train/p/z0"], spacing, images=images[None], pad=pad)
    for seed in range(5):
        shape = resize_to_class(bank.shapes[0], RANO_BM, 0, spacing, np.random.default_rng(seed))
        assert shape is not None and RANO_BM.index(feret_diameters(shape.mask, spacing))[0] == 0
        assert shape.images.shape == (2, *(n + 2 * pad for n in shape.mask.shape))
        assert images.min() <= shape.images.min() and shape.images.max() <= images.max()  # linear: no overshoot


def test_a_shape_of_the_class_is_taken_as_it_is_and_from_another_patient():
    spacing = (1.0, 1.0)
    masks = np.stack([_disc((30, 30), (15, 15), r) for r in (2, 6, 6)])
    bank = bank_from_masks(masks, ["a", "b", "c"], spacing, patients=["p0", "p1", "p2"])
    bins = parse_bins([8])
    rng = np.random.default_rng(0)
    assert {bank.pick(bins, 1, rng, avoid="p1").source for _ in range(20)} == {"c#1"}
    shape = bank.pick(bins, 0, rng)
    assert resize_to_class(shape, bins, 0, spacing, rng) is shape  # already in the class: not resized
    assert isinstance(ShapeBank([Shape(np.ones((1, 1), bool), "x", 1.0)]).diameters, np.ndarray)


def test_the_seam_is_one_where_nothing_changed_and_grows_with_a_step_at_the_border():
    from medgen.generation.insert_place import grow
    from medgen.generation.insert_seams import SeamTally, border_ring

    rng = np.random.default_rng(0)
    before = rng.uniform(0.4, 0.6, (32, 32))
    region = _disc((32, 32), (16, 16), 5)
    new = _disc((32, 32), (16, 16), 2)
    real = _disc((32, 32), (6, 6), 2)
    same = SeamTally()
    same.add(before, before.copy(), region, new, [grow(real, 2)], real)
    assert same.summary()["seam"] == 1.0
    stepped = before.copy()
    stepped[region] += 0.5  # a hard edge all along the region's border
    tally = SeamTally()
    tally.add(before, stepped, region, new, [grow(real, 2)], real)
    summary = tally.summary()
    ring = border_ring(region)
    grad = lambda im: np.sqrt(sum(g ** 2 for g in np.gradient(im)))  # noqa: E731
    assert summary["seam"] == pytest.approx(grad(stepped)[ring].mean() / grad(before)[ring].mean(), abs=1e-4)
    assert summary["seam"] > 2
    # the new lesions are exactly as bright as their rim: contrast 1 (the step lifts both)
    rim = region & ~np.asarray(__import__("scipy").ndimage.binary_erosion(region, np.ones((3, 3)), border_value=1))
    assert summary["lesion_contrast"] == pytest.approx(stepped[new].mean() / stepped[rim & ~new].mean(), abs=1e-4)
