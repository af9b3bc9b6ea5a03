"""The stage-1 quality gate on hand-built masks."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from medgen.data.space import SampleSpace
from medgen.generation.gate import failures, measure, passes, speck_pixels, with_defaults
from medgen.generation.requests import GateRules

GATE = GateRules(enabled=True, min_area=0.01, max_area=0.2, max_components=2, min_component_pixels=3, inside_brain=True,
                 max_attempts=None)


def _slices(*mm: float) -> SampleSpace:
    return SampleSpace((64, 64), (*mm, 1.0))


def _volumes(*mm: float) -> SampleSpace:
    return SampleSpace((32, 32, 16), mm)


def _mask(*boxes: tuple[int, int, int, int], size: int = 20) -> np.ndarray:
    m = np.zeros((size, size), dtype=np.uint8)
    for y0, y1, x0, x1 in boxes:
        m[y0:y1, x0:x1] = 1
    return m


def test_measure_counts_area_components_and_the_smallest_lesion():
    masks = np.stack([
        _mask((2, 6, 2, 6)),  # one 4x4 lesion: 16 px of 400
        _mask((2, 6, 2, 6), (10, 12, 10, 12), (15, 16, 15, 16)),  # 16 + 4 + 1 px, three lesions
        _mask((2, 4, 2, 4), (4, 6, 4, 6)),  # touching diagonally: one lesion with 8-connectivity
        _mask(),
    ])
    stats = measure(masks)
    np.testing.assert_allclose(stats.area, [16 / 400, 21 / 400, 8 / 400, 0])
    assert stats.components.tolist() == [1, 3, 1, 0]
    assert stats.smallest.tolist() == [16, 1, 8, 0]


def test_passes_rejects_what_it_should():
    masks = np.stack([
        _mask((2, 6, 2, 6)),  # ok
        _mask((0, 20, 0, 20)),  # area 1.0 > max_area
        _mask((2, 3, 2, 4)),  # 2 px: area 0.005 < min_area
        _mask((2, 6, 2, 6), (10, 14, 10, 14), (16, 19, 16, 19)),  # 3 lesions > max_components
        _mask((2, 6, 2, 6), (10, 11, 10, 12)),  # a 2-px speck < min_component_pixels
        _mask(),  # empty
    ])
    assert passes(measure(masks), GATE).tolist() == [True, False, False, False, False, False]
    off = replace(GATE, enabled=False)
    assert passes(measure(masks), off).all()
    # and the rule each one breaks, by the name the gate's failure message gives it
    broken = {name: rows.nonzero()[0].tolist() for name, rows in failures(measure(masks), GATE).items()}
    assert broken == {"no lesion": [5], "lesion area < gate.min_area=0.01": [2], "lesion area > gate.max_area=0.2": [1],
                      "lesions > gate.max_components=2": [3], "a lesion < gate.min_component_pixels=3": [2, 4],
                      "lesion outside the brain (gate.inside_brain)": []}


def test_a_lesion_pixel_outside_the_brain_drawn_with_it_rejects_the_mask():
    masks = np.stack([_mask((6, 10, 6, 10))] * 3)  # one 4x4 lesion, 16 px
    brains = np.stack([
        _mask((2, 18, 2, 18)),  # the lesion well inside
        _mask((2, 18, 2, 9)),  # one column of the lesion (4 px) outside
        _mask(),  # no brain drawn at all
    ])
    stats = measure(masks, brains)
    assert stats.outside.tolist() == [0, 4, 16]
    assert passes(stats, GATE).tolist() == [True, False, False]
    assert passes(stats, replace(GATE, inside_brain=False)).tolist() == [True, True, True]
    # a mask model that draws no brain: nothing is outside, the other rules decide
    assert measure(masks).outside.tolist() == [0, 0, 0] and passes(measure(masks), GATE).all()


def test_the_default_speck_is_4_pixels_of_a_slice_and_a_4_mm_ball_of_a_volume():
    default = replace(GATE, min_component_pixels=None)
    # slices: 4 pixels at any pixel size (what medgen did before volumes)
    assert speck_pixels(default, _slices(1.875, 1.875)) == speck_pixels(default, _slices(3.75, 3.75)) == 4
    # volumes: a ball 4 mm across is 4/3 pi 2^3 = 33.51 mm^3; the voxels it fills, rounded up, at least 1
    assert speck_pixels(default, _volumes(1.0, 1.0, 1.0)) == 34
    assert speck_pixels(default, _volumes(1.9, 1.9, 2.5)) == 4  # 9.025 mm^3 voxels: 3.71
    assert speck_pixels(default, _volumes(3.75, 3.75, 5.0)) == 1  # one voxel is 70 mm^3
    assert speck_pixels(default, _volumes(6.75, 6.75, 10.0)) == 1
    # a number given is kept, slices and volumes alike
    assert speck_pixels(GATE, _volumes(6.75, 6.75, 10.0)) == speck_pixels(GATE, _slices(1.0, 1.0)) == 3


def test_null_rules_are_set_per_kind_of_mask_and_the_rest_is_kept():
    default = replace(GATE, min_area=None, min_component_pixels=None)
    slices, volumes = with_defaults(default, _slices(1.875, 1.875)), with_defaults(default, _volumes(6.75, 6.75, 10.0))
    assert (slices.min_area, slices.min_component_pixels) == (0.0005, 4)
    assert (volumes.min_area, volumes.min_component_pixels) == (0.0, 1)  # whole lesions: the speck rule bounds them
    assert default.min_area is None  # a copy: the run's config is not changed
    assert with_defaults(GATE, _volumes(6.75, 6.75, 10.0)) == GATE
    # at the voxels of phantom volumes of 32 x 32 x 16, a real mask of a lesion of 2 voxels and one of 5
    mask = np.zeros((2, 32, 32, 16), np.uint8)
    mask[0, 10:12, 10, 8] = 1
    mask[1, 10:12, 10:12, 8] = 1
    mask[1, 20, 20, 4] = 1
    assert passes(measure(mask), volumes).all()
    assert not passes(measure(mask), replace(volumes, min_area=0.0005, min_component_pixels=4)).any()
