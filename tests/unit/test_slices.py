"""Slice extraction, the memory-mapped slice cache, patient-level splits and loaders."""

from __future__ import annotations

import os
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from datagen import make_patient, write_dataset

from medgen.core.config import load_config
from medgen.data import slices as slices_mod
from medgen.data.nifti_dataset import DataError, NiFTIDataset, load_volume, save_volume, split_patients
from medgen.data.slices import ResumableSampler, SliceSpec, build_data, open_or_build_cache
from medgen.data.transforms import preprocess_image, preprocess_mask


def _cfg(tmp_path, data, *overrides):
    return load_config([f"paths.data_dir={data}", f"paths.cache_dir={tmp_path / 'cache'}", "data.num_workers=0",
                        "model.image_size=16", "model.channels=[32,32]", "model.attention_levels=[false,false]",
                        "training.batch_size=2", *overrides])


def test_masks_stay_binary_through_resize():
    rng = np.random.default_rng(0)
    mask = (rng.random((37, 53, 5)) > 0.7).astype(np.float32) * rng.uniform(0.6, 3.0)  # non-unit "on" values
    for size in (16, 32, 100):
        out = preprocess_mask(mask, size)
        assert out.shape == (size, size, 5)
        assert set(np.unique(out)) <= {0.0, 1.0}
    img = preprocess_image(rng.normal(100, 30, (37, 53, 5)).astype(np.float32), 32)
    assert img.min() >= 0 and img.max() <= 1 and img.max() > 0.5


def test_load_volume_reorients_to_ras(tmp_path):
    data = np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)
    las = np.diag([-2.0, 2.0, 3.0, 1.0])  # x axis points left
    nib.save(nib.Nifti1Image(data, las), str(tmp_path / "v.nii.gz"))
    out, affine = load_volume(tmp_path / "v.nii.gz")
    np.testing.assert_array_equal(out, data[::-1])
    assert affine[0, 0] == 2.0 and np.allclose(np.diag(affine)[:3], [2, 2, 3])


def test_no_patient_in_two_splits(tmp_path):
    write_dataset(tmp_path / "d", n_patients=20, keys=("bravo", "seg"))
    train = split_patients(tmp_path / "d", "train", 0.15)
    val = split_patients(tmp_path / "d", "val", 0.15)
    assert set(train).isdisjoint(val) and len(train) + len(val) == 20 and 1 <= len(val) <= 8
    assert split_patients(tmp_path / "d", "val", 0.15) == val  # deterministic
    # adding a patient does not move the others
    write_dataset(tmp_path / "e", n_patients=21, keys=("bravo", "seg"))
    val2 = {p.name for p in split_patients(tmp_path / "e", "val", 0.15)}
    assert {p.name for p in val} <= val2
    # an explicit val/ folder wins
    write_dataset(tmp_path / "f", n_patients=4, splits=("train", "val"), keys=("bravo", "seg"))
    assert [p.parent.name for p in split_patients(tmp_path / "f", "val")] == ["val", "val"]


def test_seg_mode_keeps_tumour_positive_slices_and_bravo_keeps_brain(tmp_path):
    write_dataset(tmp_path / "d", n_patients=3, shape=(32, 32, 12), keys=("bravo", "seg"))
    seg = build_data(_cfg(tmp_path, tmp_path / "d", "mode=seg"), progress=False)
    assert len(seg.train_cache) > 0 and (seg.train_cache.lesion_pixels >= 1).all()
    assert set(np.unique(np.asarray(seg.train_cache.data))) == {0.0, 1.0}
    bravo = build_data(_cfg(tmp_path, tmp_path / "d", "mode=bravo"), progress=False)
    # the ellipsoid brain is absent from the outermost slices: they are dropped, lesion-free brain slices kept
    zs = set(bravo.train_cache.slice_index.tolist())
    assert 0 not in zs and 11 not in zs and len(zs) >= 6
    assert (bravo.train_cache.lesion_pixels == 0).any()
    batch = next(iter(bravo.train))
    assert set(batch) == {"bravo", "seg"} and batch["bravo"].shape == (2, 1, 16, 16)
    assert batch["bravo"].dtype == torch.float32 and 0 <= batch["bravo"].min() and batch["bravo"].max() <= 1


def test_cache_reused_then_rebuilt_when_a_source_changes(tmp_path, monkeypatch):
    patients = write_dataset(tmp_path / "d", n_patients=2, keys=("bravo", "seg"))
    spec = SliceSpec(keys=("bravo", "seg"), image_size=16, selection="brain")
    first = open_or_build_cache(patients, spec, tmp_path / "c", progress=False)
    reference = np.asarray(first.data).copy()

    def no_reading(*a, **k):
        raise AssertionError("a warm cache must not read NIfTI files")

    monkeypatch.setattr(NiFTIDataset, "__getitem__", no_reading)
    t0 = time.perf_counter()
    again = open_or_build_cache(patients, spec, tmp_path / "c", progress=False)
    assert time.perf_counter() - t0 < 1.0
    assert again.directory == first.directory
    np.testing.assert_array_equal(np.asarray(again.data), reference)
    monkeypatch.undo()

    # change one source file: new fingerprint, new cache with the new content
    vols = make_patient(seed=99, keys=("bravo",))
    path = patients[0] / "bravo.nii.gz"
    save_volume(path, vols["bravo"] * 0.5 + 7.0, np.diag([1.0, 1.0, 2.0, 1.0]))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    rebuilt = open_or_build_cache(patients, spec, tmp_path / "c", progress=False)
    assert rebuilt.directory != first.directory
    assert not np.array_equal(np.asarray(rebuilt.data), reference)
    # a different image size is a different cache too
    other = open_or_build_cache(patients, SliceSpec(keys=("bravo", "seg"), image_size=32, selection="brain"),
                                tmp_path / "c", progress=False)
    assert other.shape[-1] == 32


def test_training_refuses_bad_data_with_the_check_messages(tmp_path):
    patients = write_dataset(tmp_path / "d", n_patients=3, keys=("bravo", "seg"))
    bad = make_patient(seed=5, keys=("bravo",))["bravo"]
    bad[3, 3, 3] = np.nan
    save_volume(patients[1] / "bravo.nii.gz", bad, np.diag([1.0, 1.0, 2.0, 1.0]))
    with pytest.raises(DataError) as info:
        build_data(_cfg(tmp_path, tmp_path / "d", "mode=bravo"), progress=False)
    assert str(patients[1] / "bravo.nii.gz") in str(info.value) and "NaN" in str(info.value)
    assert not list((tmp_path / "cache").glob("slices/*/meta.json"))  # nothing half-built left behind


def test_missing_data_folder_says_how_to_make_one(tmp_path):
    with pytest.raises(DataError, match="medgen-data phantom"):
        build_data(_cfg(tmp_path, tmp_path / "nowhere", "mode=bravo"), progress=False)


def test_resumable_sampler_skips_into_the_same_epoch_order():
    data = list(range(50))
    s = ResumableSampler(data, shuffle=True, seed=3)
    s.set_epoch(4)
    full = list(s)
    s.set_epoch(4, skip=20)
    assert list(s) == full[20:] and len(s) == 30
    s.set_epoch(5)
    assert list(s) != full
    two = [ResumableSampler(data, num_replicas=2, rank=r, seed=3) for r in (0, 1)]
    for x in two:
        x.set_epoch(1)
    assert set(two[0]).isdisjoint(set(two[1]))


def test_cache_file_is_memory_mapped(tmp_path):
    patients = write_dataset(tmp_path / "d", n_patients=2, keys=("bravo", "seg"))
    cache = open_or_build_cache(patients, SliceSpec(("bravo", "seg"), 16, "brain"), tmp_path / "c", progress=False)
    assert isinstance(cache.data, np.memmap) and cache.data.dtype == slices_mod.CACHE_DTYPE


def test_parallel_build_and_check_equal_serial(tmp_path):
    from medgen.data.validate import check_patients

    patients = write_dataset(tmp_path / "d", n_patients=4, keys=("bravo", "seg"))
    bad = make_patient(seed=7, keys=("bravo",))["bravo"]
    bad[0, 0, 0] = np.inf
    save_volume(patients[2] / "bravo.nii.gz", bad, np.diag([1.0, 1.0, 2.0, 1.0]))
    serial = check_patients(patients, ("bravo", "seg"), progress=False)
    parallel = check_patients(patients, ("bravo", "seg"), progress=False, workers=2)
    assert serial.problems == parallel.problems and not parallel.ok

    spec = SliceSpec(("bravo", "seg"), 16, "brain")
    one = open_or_build_cache(patients, spec, tmp_path / "c1", validate=False, progress=False, workers=0)
    two = open_or_build_cache(patients, spec, tmp_path / "c2", validate=False, progress=False, workers=2)
    np.testing.assert_array_equal(np.asarray(one.data), np.asarray(two.data))
    np.testing.assert_array_equal(one.patient_index, two.patient_index)
    np.testing.assert_array_equal(one.slice_index, two.slice_index)


def test_fewer_slices_than_one_batch_is_refused(tmp_path):
    write_dataset(tmp_path / "d", n_patients=3, keys=("bravo", "seg"))
    with pytest.raises(DataError, match="fewer than one batch"):
        build_data(_cfg(tmp_path, tmp_path / "d", "mode=seg", "training.batch_size=64"), progress=False)
