"""The volume cache (medgen.data.volumes): the head box by hand, the crop / pad / resample geometry
and the voxel spacing on a hand-built volume, and a cache of phantom heads built, reopened and
refingerprinted through the slice cache's machinery."""

from __future__ import annotations

import numpy as np
import pytest

from medgen.data.phantom import generate_dataset
from medgen.data.slices import cache_directory, open_or_build_cache
from medgen.data.volumes import VolumeSpec, head_box, preprocess_patient_volume

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_head_box_is_the_bounding_box_of_bright_voxels_plus_a_margin():
    image = np.zeros((20, 16, 10), np.float32)
    image[5:12, 3:9, 2:4] = 0.8
    image[14, 8, 7] = 0.05  # below the threshold: air
    assert head_box(image, 0.1, 2) == (slice(3, 14), slice(1, 11), slice(0, 6))  # clipped at the volume's edge
    assert head_box(np.zeros((4, 5, 6)), 0.1, 2) == (slice(0, 4), slice(0, 5), slice(0, 6))  # no head: everything


def test_a_volume_is_cropped_to_the_head_padded_square_and_resampled():
    image = np.zeros((40, 30, 20), np.float32)
    image[10:30, 8:22, 4:16] = 100.0  # the head: 20 x 14 x 12 voxels
    mask = np.zeros_like(image)
    mask[16:24, 12:18, 8:12] = 1  # a lesion in it
    affine = np.diag([1.0, 1.0, 2.0, 1.0])  # 1 x 1 x 2 mm voxels
    spec = VolumeSpec(keys=("bravo", "seg"), volume_shape=(12, 12, 8), margin=2)
    block, spacing = preprocess_patient_volume({"bravo": image, "seg": mask}, affine, spec)
    # box: x 8..32 (24), y 6..24 (18), z 2..18 (16); squared in-plane to 24 x 24; every axis shrinks: area
    assert block.shape == (1, 2, 12, 12, 8) and block.dtype == np.float16
    assert spacing == pytest.approx((24 / 12, 24 / 12, 2 * 16 / 8))
    head, lesion = block[0, 0].astype(np.float32), block[0, 1].astype(np.float32)
    # x: the head spans crop voxels 2..22 -> cells 1..10 of 2 voxels; y: (24 - 18) / 2 = 3 of padding,
    # then 2 of margin: 5..19 -> cells 2.5..9.5, half-covered at both ends; z: 2..14 -> cells 1..7
    assert np.all(head[1:11, 3:9, 1:7] == 1) and np.all(head[0] == 0) and np.all(head[11] == 0)
    assert np.all(head[:, 2, 1:7][1:11] == 0.5) and np.all(head[..., 0] == 0) and np.all(head[..., 7] == 0)
    assert set(np.unique(lesion).tolist()) == {0.0, 1.0}
    # the lesion (crop voxels x 8..16, y 9..15 after padding, z 6..10): nearest picks voxel 2i of each axis
    assert np.argwhere(lesion).min(0).tolist() == [4, 5, 3] and np.argwhere(lesion).max(0).tolist() == [7, 7, 4]


def test_a_smaller_volume_is_enlarged_and_a_bad_shape_is_refused():
    image = np.zeros((10, 10, 4), np.float32)
    image[2:8, 2:8, 1:3] = 1.0
    spec = VolumeSpec(keys=("bravo",), volume_shape=(20, 20, 8), margin=0)
    block, spacing = preprocess_patient_volume({"bravo": image}, np.eye(4), spec)
    assert block.shape == (1, 1, 20, 20, 8) and spacing == pytest.approx((6 / 20, 6 / 20, 2 / 8))
    assert block.max() == 1 and block[0, 0, 10, 10, 4] == 1  # trilinear: the head fills the volume
    with pytest.raises(ValueError, match=r"volume_shape must be three positive sizes \(X, Y, Z\), got \[32, 32\]"):
        VolumeSpec(keys=("bravo",), volume_shape=(32, 32))


def test_a_volume_cache_of_phantom_heads(tmp_path):
    data = tmp_path / "data"
    generate_dataset(data, subjects=3, size=48, slices=24, seed=3, split=(1.0, 0.0, 0.0), workers=1)
    patients = sorted(p for p in (data / "train").iterdir() if p.is_dir())
    spec = VolumeSpec(keys=("bravo", "seg", "brain"), volume_shape=(24, 24, 12))
    cache = open_or_build_cache(patients, spec, tmp_path / "cache", progress=False)
    assert cache.directory.parent.name == "volumes" and cache.keys == ("bravo", "seg", "brain")
    assert cache.data.shape == (3, 3, 24, 24, 12) and cache.patient_ids == [p.name for p in patients]
    volumes = cache.data.astype(np.float32)
    seg, brain = volumes[:, 1], volumes[:, 2]
    assert set(np.unique(seg).tolist()) <= {0.0, 1.0} and set(np.unique(brain).tolist()) <= {0.0, 1.0}
    assert cache.lesion_pixels.tolist() == seg.sum(axis=(1, 2, 3)).astype(int).tolist()
    assert np.all(seg <= brain)  # every lesion voxel lies in the brain channel
    # the head fills the box: image voxels reach each face of the volume, after at most the margin
    head = volumes[:, 0] > spec.head_intensity
    for axis in (1, 2, 3):
        profile = head.any(axis=tuple(a for a in (1, 2, 3) if a != axis))
        assert np.all(profile[:, 3:-3]), f"axis {axis}: the head does not span the volume"
    # spacing: the phantoms' head over the volume shape, recorded per axis; lesions measured in 3D
    assert len(cache.spacing) == 3 and all(s > 0 for s in cache.spacing)
    assert np.all((cache.largest_mm > 0) == (cache.lesion_pixels > 0))
    # reopened, not rebuilt; another shape is another cache
    again = open_or_build_cache(patients, spec, tmp_path / "cache", progress=False)
    assert again.directory == cache.directory and again.meta["created"] == cache.meta["created"]
    other = VolumeSpec(keys=spec.keys, volume_shape=(16, 16, 8))
    assert cache_directory(tmp_path / "cache", patients, other) != cache.directory
