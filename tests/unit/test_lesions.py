"""Lesion diameters against closed forms and a brute force over every voxel corner; size bins."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import pdist

from medgen.data.lesions import RANO_BM, SizeBins, feret_diameters
from medgen.data.masks import lesion_labels


def _brute_force(mask: np.ndarray, spacing) -> list[float]:
    """Every corner of every voxel of each lesion, every pair: no hull, no boundary shortcut."""
    labels, count = lesion_labels(mask)
    offsets = np.array(list(itertools.product((-0.5, 0.5), repeat=mask.ndim)))
    out = []
    for k in range(1, count + 1):
        corners = (np.argwhere(labels == k)[:, None, :] + offsets).reshape(-1, mask.ndim) * np.asarray(spacing)
        out.append(pdist(corners).max() if len(corners) > 1 else 0.0)
    return out


def test_a_rectangle_measures_its_diagonal_in_mm():
    mask = np.zeros((20, 30))
    mask[3:8, 10:22] = 1  # 5 x 12 pixels
    assert feret_diameters(mask, (0.9, 1.2)) == pytest.approx([np.hypot(5 * 0.9, 12 * 1.2)])
    one = np.zeros((5, 5))
    one[2, 2] = 1
    assert feret_diameters(one, (1.0, 1.0)) == pytest.approx([np.sqrt(2)])  # one pixel: its diagonal
    box = np.zeros((10, 10, 6))
    box[2:5, 1:8, 2:4] = 1
    assert feret_diameters(box, (1.0, 0.5, 3.0)) == pytest.approx([np.sqrt(3 ** 2 + 3.5 ** 2 + 6 ** 2)])


def test_lesions_are_measured_in_label_order_and_diagonal_neighbours_join():
    mask = np.zeros((12, 12))
    mask[1, 1] = mask[2, 2] = 1  # one lesion: diagonal neighbours
    mask[8:11, 5:7] = 1
    mask[3, 9] = 1
    assert feret_diameters(mask, (1, 1)) == pytest.approx([np.hypot(2, 2), np.sqrt(2), np.hypot(3, 2)])
    assert feret_diameters(np.zeros((4, 4)), (1, 1)).tolist() == []
    assert feret_diameters(np.full((4, 4), 0.5), (1, 1)).tolist() == []  # 0.5 is background


@pytest.mark.parametrize("shape,spacing", [((40, 40), (0.7, 1.1)), ((12, 12, 8), (1.0, 1.0, 2.5))])
def test_random_lesions_equal_the_brute_force(shape, spacing):
    rng = np.random.default_rng(0)
    for _ in range(4):  # blobs large enough that their boundary takes the convex-hull path
        mask = ndimage.gaussian_filter(rng.random(shape), 2.0) > 0.52
        expected = _brute_force(mask, spacing)
        assert len(expected) >= 1
        np.testing.assert_allclose(feret_diameters(mask, spacing), expected, rtol=1e-12)


def test_a_disc_measures_about_its_diameter():
    yy, xx = np.mgrid[:101, :101]
    disc = (yy - 50) ** 2 + (xx - 50) ** 2 <= 20 ** 2  # radius 20 px at 0.5 mm: 20 mm across
    d = feret_diameters(disc, (0.5, 0.5))[0]
    assert 20.0 < d <= 20.5 + 0.5 * np.sqrt(2)


def test_spacing_must_fit_the_mask():
    with pytest.raises(ValueError, match=r"one positive size per mask axis \(2\), got \[1.0, 1.0, 1.0\]"):
        feret_diameters(np.ones((3, 3)), (1, 1, 1))
    with pytest.raises(ValueError, match="positive"):
        feret_diameters(np.ones((3, 3)), (1, 0))


def test_rano_bm_bins_are_half_open():
    d = [0.0, 1.4, 9.99, 10.0, 19.9, 20.0, 29.99, 30.0, 80.0]
    assert RANO_BM.index(d).tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3]
    assert [RANO_BM.name(x) for x in (5, 15, 25, 35)] == ["tiny", "small", "medium", "large"]
    assert RANO_BM.counts(d).tolist() == [3, 2, 2, 2]
    assert RANO_BM.counts([]).tolist() == [0, 0, 0, 0]


def test_finer_bins_from_edges():
    bins = SizeBins.from_edges([3, 6, 10, 15, 20, 30])
    assert bins.names == ("<3mm", "3-6mm", "6-10mm", "10-15mm", "15-20mm", "20-30mm", ">=30mm")
    assert bins.index([2.9, 3, 7.5, 31]).tolist() == [0, 1, 2, 6]
    assert SizeBins.from_edges([]).names == ("any",) and SizeBins.from_edges([]).index([1e3]).tolist() == [0]
    with pytest.raises(ValueError, match=r"increasing, got \[10.0, 5.0\] mm"):
        SizeBins.from_edges([10, 5])
    with pytest.raises(ValueError, match="positive"):
        SizeBins.from_edges([0, 5])
    with pytest.raises(ValueError, match="2 edges make 3 bins, got 2 names"):
        SizeBins((1.0, 2.0), ("a", "b"))
    with pytest.raises(ValueError, match="names must differ"):
        SizeBins((1.0,), ("a", "a"))


def test_the_census_of_a_dataset_by_hand(tmp_path):
    from medgen.data.lesions import census_line, lesion_census
    from medgen.data.nifti_dataset import save_volume

    seg = np.zeros((20, 20, 4), np.float32)
    seg[1:4, 1:4, 0] = 1  # 3x3 px of 2 mm on one slice: 8.5 mm (tiny); as a 3D lesion with 3 mm slices: 9.0 mm
    seg[10:18, 10:18, 1:3] = 1  # 8x8 px on two slices: 22.6 mm each (medium); in 3D: 23.4 mm (medium)
    (tmp_path / "p").mkdir()
    save_volume(tmp_path / "p" / "seg.nii.gz", seg, np.diag([2.0, 2.0, 3.0, 1.0]), is_mask=True)
    census = lesion_census([tmp_path / "p"])
    assert census["slice_lesions"] == {"tiny": 1, "small": 0, "medium": 2, "large": 0}
    assert census["volume_lesions"] == {"tiny": 1, "small": 0, "medium": 1, "large": 0}
    assert (census["slices"], census["lesion_items"], census["patients"]) == (4, 3, 1)
    assert census_line(census) == ("lesions by size (tiny/small/medium/large, Feret diameter): on axial slices tiny 1, "
                                   "small 0, medium 2, large 0 (3 of 4 slices hold a lesion); as 3D lesions tiny 1, "
                                   "small 0, medium 1, large 0")
