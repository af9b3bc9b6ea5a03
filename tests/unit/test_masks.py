"""The one mask binarisation and the lesion components, on hand-built masks."""

from __future__ import annotations

import numpy as np
import torch

from medgen.data.masks import binarize_mask, is_lesion, lesion_labels, lesion_sizes
from medgen.data.transforms import binarize_mask as binarize_from_transforms

VALUES = [0.0, 0.4999, 0.5, 0.5001, 1.0, -1.0, 2.0]
EXPECTED = [False, False, False, True, True, False, True]  # strictly greater than 0.5: 0.5 is background


def test_threshold_is_strictly_above_one_half_for_numpy_and_torch():
    assert is_lesion(np.array(VALUES)).tolist() == EXPECTED
    assert is_lesion(VALUES).dtype == np.bool_  # anything np.asarray takes
    t = is_lesion(torch.tensor(VALUES))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.bool and t.tolist() == EXPECTED
    assert is_lesion(np.array([0.5], np.float16)).tolist() == [False]


def test_binarize_mask_gives_float32_zeros_and_ones_of_the_input_kind():
    n = binarize_mask(np.array(VALUES, np.float64))
    assert isinstance(n, np.ndarray) and n.dtype == np.float32 and n.tolist() == [float(e) for e in EXPECTED]
    t = binarize_mask(torch.tensor(VALUES, dtype=torch.float64))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.tolist() == [float(e) for e in EXPECTED]
    assert binarize_from_transforms is binarize_mask  # training's import path reaches the same function


def test_lesions_are_eight_connected_components():
    mask = np.zeros((6, 7), np.float32)
    mask[0, 0] = mask[1, 1] = 1  # a diagonal pair: one lesion
    mask[0, 4:7] = 1  # a 3-pixel bar
    mask[4:6, 2:4] = 0.9  # a 2x2 block of values above the threshold
    mask[3, 6] = 0.5  # exactly 0.5: not lesion
    labels, count = lesion_labels(mask)
    assert count == 3
    assert labels[0, 0] == labels[1, 1] != 0 and labels[3, 6] == 0
    assert lesion_sizes(mask).tolist() == [2, 3, 4]  # in label (raster) order


def test_an_empty_mask_has_no_lesions():
    assert lesion_sizes(np.zeros((4, 4))).tolist() == []
    assert lesion_labels(np.full((4, 4), 0.5))[1] == 0
