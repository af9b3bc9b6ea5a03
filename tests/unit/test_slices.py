"""Slice extraction, the memory-mapped slice cache, patient-level splits and loaders."""

from __future__ import annotations

import dataclasses
import gzip
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from datagen import make_patient, write_dataset

from medgen.data import slices as slices_mod
from medgen.data.loading import ResumableSampler, build_data
from medgen.data.nifti_dataset import DataError, load_volume, modality_path, save_volume
from medgen.data.slices import SliceSpec, fingerprint, open_or_build_cache, select_slices
from medgen.data.splits import split_patients
from medgen.data.transforms import preprocess_image, preprocess_mask
from medgen.data.validate import check_patients
from medgen.diffusion.config import load_config
from medgen.diffusion.modes import MODES


def _build_data(cfg, **kwargs):
    """``build_data`` as the trainer calls it: with the slice selection of the config's mode class."""
    return build_data(cfg, selection=MODES[cfg.mode.name].slice_selection, **kwargs)


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
    seg = _build_data(_cfg(tmp_path, tmp_path / "d", "mode=seg"), progress=False)
    assert len(seg.train_cache) > 0 and (seg.train_cache.lesion_pixels >= 1).all()
    assert set(np.unique(np.asarray(seg.train_cache.data))) == {0.0, 1.0}
    bravo = _build_data(_cfg(tmp_path, tmp_path / "d", "mode=bravo"), progress=False)
    # the ellipsoid brain is absent from the outermost slices: they are dropped, lesion-free brain slices kept
    zs = set(bravo.train_cache.slice_index.tolist())
    assert 0 not in zs and 11 not in zs and len(zs) >= 6
    assert (bravo.train_cache.lesion_pixels == 0).any()
    batch = next(iter(bravo.train))
    assert set(batch) == {"bravo", "seg", "brain"} and batch["bravo"].shape == (2, 1, 16, 16)
    # the brain is derived from bravo, holds every lesion pixel and lies within the head
    for cache in (seg.train_cache, bravo.train_cache):
        data = np.asarray(cache.data, dtype=np.float32)
        lesion, brain = data[:, cache.keys.index("seg")] > 0.5, data[:, cache.keys.index("brain")] > 0.5
        assert brain.any() and not (lesion & ~brain).any()
    image = np.asarray(bravo.train_cache.data[:, 0], dtype=np.float32)
    assert not (brain & (image <= 0.1)).any()
    assert batch["bravo"].dtype == torch.float32 and 0 <= batch["bravo"].min() and batch["bravo"].max() <= 1


def test_cache_reused_then_rebuilt_when_a_source_changes(tmp_path, monkeypatch):
    patients = write_dataset(tmp_path / "d", n_patients=2, keys=("bravo", "seg"))
    spec = SliceSpec(keys=("bravo", "seg"), image_size=16, selection="brain")
    first = open_or_build_cache(patients, spec, tmp_path / "c", progress=False)
    reference = np.asarray(first.data).copy()

    def no_reading(*a, **k):
        raise AssertionError("a warm cache must not read NIfTI files")

    monkeypatch.setattr(nib, "load", no_reading)
    monkeypatch.setattr(gzip, "decompress", no_reading)
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
        _build_data(_cfg(tmp_path, tmp_path / "d", "mode=bravo"), progress=False)
    assert str(patients[1] / "bravo.nii.gz") in str(info.value) and "NaN" in str(info.value)
    assert not list((tmp_path / "cache").glob("slices/*/meta.json"))  # nothing half-built left behind


def test_no_selected_slice_says_what_selects_one(tmp_path):
    patients = write_dataset(tmp_path / "d", n_patients=2, keys=("bravo", "seg"))  # 1 train, 1 val patient
    with pytest.raises(DataError) as info:
        _build_data(_cfg(tmp_path, tmp_path / "d", "mode=bravo", "data.min_brain_fraction=1.0"), progress=False)
    assert str(info.value) == (
        f"no training slices selected from 1 patient(s) of {tmp_path / 'd' / 'train'} for mode 'bravo': 'brain' "
        "selection keeps slices where at least 100% of the pixels of every image exceed 0.1 after normalisation "
        "to [0, 1] (data.min_brain_fraction, data.brain_intensity)")
    for p in patients:  # NaN images, unchecked: nothing is selected, and the message says where to look
        save_volume(p / "bravo.nii.gz", np.full((32, 32, 8), np.nan, np.float32), np.diag([1.0, 1.0, 2.0, 1.0]))
    with pytest.raises(DataError, match=r"'brain' selection .*; data.validate=false, so unreadable or non-finite "
                                         rf"\(NaN\) voxels were not reported: medgen-data check {tmp_path / 'd'}$"):
        _build_data(_cfg(tmp_path, tmp_path / "d", "mode=bravo", "data.validate=false"), progress=False)


def test_missing_data_folder_says_how_to_make_one(tmp_path):
    with pytest.raises(DataError, match="medgen-data phantom"):
        _build_data(_cfg(tmp_path, tmp_path / "nowhere", "mode=bravo"), progress=False)


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
        _build_data(_cfg(tmp_path, tmp_path / "d", "mode=seg", "training.batch_size=64"), progress=False)


# --- the one-read cold build: same bytes as before, every file read once, refusals like `check` ---


def _reference_image(volume: np.ndarray, image_size: int, lower: float = 0.5, upper: float = 99.5) -> np.ndarray:
    """The image preprocessing as it was first written: MONAI's Compose on a C-ordered copy."""
    from monai.transforms import Compose, Resize, ScaleIntensityRangePercentiles, SpatialPad

    side = max(volume.shape[:2])
    mode = "area" if image_size <= side else "bilinear"
    pipe = Compose([
        ScaleIntensityRangePercentiles(lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True, relative=False),
        SpatialPad(spatial_size=(side, side, -1), mode="constant"),
        Resize(spatial_size=(image_size, image_size, -1), mode=mode, **({} if mode == "area" else {"align_corners": False})),
    ])
    out = pipe(torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None])
    return np.asarray(out[0], dtype=np.float32).clip(0.0, 1.0)


def _reference_mask(volume: np.ndarray, image_size: int) -> np.ndarray:
    from monai.transforms import Compose, Resize, SpatialPad

    side = max(volume.shape[:2])
    pipe = Compose([SpatialPad(spatial_size=(side, side, -1), mode="constant"),
                    Resize(spatial_size=(image_size, image_size, -1), mode="nearest")])
    out = pipe(torch.from_numpy(np.ascontiguousarray((volume > 0.5).astype(np.float32)))[None])
    return (np.asarray(out[0]) > 0.5).astype(np.float32)


def _reference_patient(folder: Path, spec: SliceSpec) -> tuple[np.ndarray, np.ndarray]:
    """One patient's cache rows the way they were first computed: nibabel's reader, the MONAI
    pipelines above, then the slice selection; (float16 rows [k, C, S, S], z indices)."""
    channels = []
    for key in spec.keys:
        img = nib.as_closest_canonical(nib.load(str(modality_path(folder, key))))
        volume = np.asarray(img.dataobj, dtype=np.float32)
        channels.append(_reference_mask(volume, spec.image_size) if key == "seg" else
                        _reference_image(volume, spec.image_size, spec.lower_percentile, spec.upper_percentile))
    stacked = np.stack(channels)
    keep = select_slices(stacked, spec)
    return np.moveaxis(stacked[..., keep], -1, 0).astype(slices_mod.CACHE_DTYPE), keep


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


@pytest.mark.parametrize("shape, image_size", [((40, 36, 10), 16), ((40, 36, 10), 48), ((130, 120, 70), 64)])
def test_cache_bytes_equal_the_reference_pipeline(tmp_path, shape, image_size):
    """Volumes under and over MONAI's 1e6-voxel percentile switch, non-square (padding), down-
    and upsampling, and one patient stored in LPS (reoriented on reading: a flipped view)."""
    keys = ("bravo", "t1_gd", "seg")
    patients = write_dataset(tmp_path / "d", n_patients=2, shape=shape, keys=keys)
    lps = np.diag([-1.0, -1.0, 2.0, 1.0])
    for key, volume in make_patient(shape, seed=11, keys=keys).items():
        save_volume(modality_path(patients[1], key), volume, lps, is_mask=key == "seg")
    spec = SliceSpec(keys=keys, image_size=image_size, selection="all")
    cache = open_or_build_cache(patients, spec, tmp_path / "c", progress=False)
    rows, zs = zip(*[_reference_patient(p, spec) for p in patients])
    np.testing.assert_array_equal(_bits(np.asarray(cache.data)), _bits(np.concatenate(rows)))
    np.testing.assert_array_equal(cache.slice_index, np.concatenate(zs))
    for p in patients:  # and the public functions on the loaded volumes
        for key in keys:
            volume, _ = load_volume(modality_path(p, key))
            new = preprocess_mask(volume, image_size) if key == "seg" else preprocess_image(volume, image_size)
            old = _reference_mask(volume, image_size) if key == "seg" else _reference_image(volume, image_size)
            np.testing.assert_array_equal(_bits(new), _bits(old))


@pytest.mark.filterwarnings("ignore:Divide by zero")  # MONAI's, for the constant image
def test_preprocessing_equals_the_reference_pipeline_on_odd_inputs():
    rng = np.random.default_rng(3)
    for _ in range(12):
        shape = tuple(int(n) for n in rng.integers(3, 60, 2)) + (int(rng.integers(1, 6)),)
        size = int(rng.integers(4, 80))
        image = rng.gamma(2.0, 50.0, shape).astype(np.float32)
        image[0, 0, 0] = -0.0
        mask = (rng.random(shape) * 1.5).astype(np.float32)
        for layout in (lambda a: a, np.asfortranarray, lambda a: a[::-1, :, ::-1]):
            np.testing.assert_array_equal(_bits(preprocess_image(layout(image), size)), _bits(_reference_image(layout(image), size)))
            np.testing.assert_array_equal(_bits(preprocess_mask(layout(mask), size)), _bits(_reference_mask(layout(mask), size)))
    constant = np.full((9, 7, 3), 5.0, np.float32)  # MONAI's divide-by-zero branch
    np.testing.assert_array_equal(_bits(preprocess_image(constant, 8)), _bits(_reference_image(constant, 8)))


@pytest.mark.filterwarnings("ignore:invalid value")  # numpy's interpolation between two infinities
def test_percentiles_equal_monai_on_hard_inputs():
    """Above MONAI's 1e6-voxel switch the percentiles come from the tails of the data: exact for
    ties, sorted data, infinities, the extreme percentiles, and data whose strided sample misses
    the tails (the margins widen, then everything is partitioned); NaN goes to MONAI."""
    from monai.transforms.utils_pytorch_numpy_unification import percentile

    from medgen.data.transforms import _percentiles

    rng = np.random.default_rng(5)
    n = 1_000_003
    hidden = (rng.random(n) + 10).astype(np.float32)
    hidden[::64] = -rng.random(hidden[::64].size)  # the stride-64 sample holds the smallest values: too few
    cases = {
        "normal": rng.normal(100, 30, n).astype(np.float32),
        "ties": rng.integers(0, 4, n).astype(np.float32),
        "sorted": np.sort(rng.gamma(2.0, 50.0, n).astype(np.float32)),
        "reversed": np.sort(rng.normal(size=n).astype(np.float32))[::-1].copy(),
        "hidden tails": hidden,
        "hidden tails, negated": -hidden,
        "infinities": np.concatenate([[np.inf, -np.inf, np.inf], rng.standard_cauchy(n - 3)]).astype(np.float32),
        "nan": np.concatenate([[np.nan], rng.normal(size=n - 1)]).astype(np.float32),
    }
    for name, x in cases.items():
        for lower, upper in ((0.5, 99.5), (0.0, 100.0), (0.01, 99.99), (2.0, 98.0)):
            want = percentile(torch.from_numpy(x), [lower, upper])
            got = _percentiles(x, lower, upper)
            assert got.dtype == want.dtype == torch.float32, name
            np.testing.assert_array_equal(_bits(got.numpy()), _bits(want.numpy()), err_msg=f"{name} {lower} {upper}")


def _count_decompressions(monkeypatch) -> list[int]:
    calls = [0]
    real = gzip.decompress

    def counting(data, *a, **k):
        calls[0] += 1
        return real(data, *a, **k)

    monkeypatch.setattr(gzip, "decompress", counting)
    return calls


@pytest.mark.parametrize("validate", [True, False])
def test_cold_build_reads_every_file_once(tmp_path, monkeypatch, validate):
    patients = write_dataset(tmp_path / "d", n_patients=3, keys=("bravo", "flair", "seg"))
    calls = _count_decompressions(monkeypatch)
    cache = open_or_build_cache(patients, SliceSpec(("bravo", "flair", "seg"), 16, "brain"), tmp_path / "c",
                                validate=validate, progress=False)
    assert len(cache) > 0 and calls[0] == 3 * 3


def test_unvalidated_build_skips_the_checks_but_not_unusable_files(tmp_path):
    patients = write_dataset(tmp_path / "d", n_patients=2, keys=("bravo", "seg"))
    bad = make_patient(seed=1, keys=("bravo",))["bravo"]
    bad[0, 0, 0] = np.nan
    save_volume(patients[1] / "bravo.nii.gz", bad, np.diag([1.0, 1.0, 2.0, 1.0]))
    spec = SliceSpec(("bravo", "seg"), 16, "all")
    with pytest.raises(DataError, match="NaN"):
        open_or_build_cache(patients, spec, tmp_path / "c", progress=False)
    assert len(open_or_build_cache(patients, spec, tmp_path / "c", validate=False, progress=False)) == 2 * 8
    (patients[0] / "seg.nii.gz").unlink()
    with pytest.raises(DataError, match=r"seg.nii.gz: missing modality 'seg'"):
        open_or_build_cache(patients, spec, tmp_path / "c2", validate=False, progress=False)
    assert not any((tmp_path / "c2" / "slices").iterdir())


def test_a_bad_file_in_val_refuses_with_the_check_report_and_leaves_nothing(tmp_path):
    patients = write_dataset(tmp_path / "d", n_patients=5, keys=("bravo", "seg"), splits=("train", "val"))
    train, val = patients[0::2], patients[1::2]
    bad = make_patient(seed=9, keys=("bravo",))["bravo"]
    bad[2, 3, 4] = np.inf
    save_volume(val[1] / "bravo.nii.gz", bad, np.diag([1.0, 1.0, 2.0, 1.0]))
    save_volume(train[0] / "seg.nii.gz", np.zeros((32, 32, 8), np.float32), np.diag([1.0, 1.0, 2.0, 1.0]), is_mask=True)
    expected = check_patients(train + val, ("bravo", "seg"), progress=False)
    assert [p.severity for p in expected.problems] == ["warning", "error"]  # empty mask in train, Inf in val

    for workers in (0, 2):
        with pytest.raises(DataError) as info:
            _build_data(_cfg(tmp_path, tmp_path / "d", "mode=bravo", f"data.num_workers={workers}"), progress=False)
        assert str(info.value) == "the dataset has problems; fix them and run again:\n" + expected.format()
        assert f"ERROR {val[1] / 'bravo.nii.gz'}: 1 Inf voxel(s) of 8192" in str(info.value)
        assert list((tmp_path / "cache" / "slices").iterdir()) == []  # no temporary folder, no train cache

    os.remove(val[1] / "bravo.nii.gz")  # fixed (the patient's bravo rewritten): both caches build
    save_volume(val[1] / "bravo.nii.gz", make_patient(seed=9, keys=("bravo",))["bravo"], np.diag([1.0, 1.0, 2.0, 1.0]))
    bundle = _build_data(_cfg(tmp_path, tmp_path / "d", "mode=bravo"), progress=False)
    assert bundle.val_cache is not None and bundle.val_cache.patient_ids == [p.name for p in val]
    assert sorted(p.name for p in (tmp_path / "cache" / "slices").iterdir()) == sorted(
        [bundle.train_cache.directory.name, bundle.val_cache.directory.name])


def test_the_brain_channel_is_read_from_brain_from_and_other_caches_keep_their_fingerprint(tmp_path):
    patients = write_dataset(tmp_path / "d", n_patients=2, keys=("bravo", "t1_pre", "seg"))
    plain = SliceSpec(keys=("seg",), image_size=16, selection="lesion")
    assert fingerprint(patients, plain) == fingerprint(patients, dataclasses.replace(plain, brain_from="t1_pre"))
    spec = SliceSpec(keys=("seg", "brain"), image_size=16, selection="lesion", brain_from="t1_pre")
    assert spec.file_keys == ("seg", "t1_pre") and spec.image_keys == ()
    assert fingerprint(patients, spec) != fingerprint(patients, dataclasses.replace(spec, brain_from="bravo"))
    (patients[0] / "t1_pre.nii.gz").unlink()
    with pytest.raises(DataError, match="t1_pre"):
        open_or_build_cache(patients, spec, tmp_path / "c", progress=False)


def test_each_slice_records_its_largest_lesion_in_mm_and_its_lesion_count():
    from medgen.data.item_cache import ItemCache

    class Cache:  # what ItemCache's lesion measures read of an opened cache
        def __init__(self, keys, data, lesion_pixels):
            self.keys, self.data, self.lesion_pixels, self.spacing = keys, data, lesion_pixels, [2.0, 1.0, 3.0]
            self.shape = data.shape

        def __len__(self):
            return len(self.data)

    data = np.zeros((3, 2, 8, 8), dtype=np.float16)  # channels: bravo, seg
    data[0, 1, 0:3, 0:2] = 1  # 3 x 2 pixels of 2 x 1 mm: opposite corners lie sqrt(6^2 + 2^2) mm apart
    data[0, 1, 6, 6] = 1  # a smaller second lesion
    data[2, 1, 4:6, 4:6] = 1
    pixels = np.array([7, 0, 4])
    data[2, 1, 7, 0] = 1  # a second, one-pixel lesion
    data[2, 1, 6, 3] = 1  # touching the 2 x 2 lesion at a corner only: 8-connected, so the same lesion
    measure = ItemCache._lesion_measures.func
    largest, count = measure(Cache(("bravo", "seg"), data, pixels))
    assert largest.tolist() == pytest.approx([np.sqrt(40), 0.0, np.sqrt(6**2 + 3**2)])  # rows 4-6, cols 3-5
    assert count.tolist() == [2, 0, 2] and count.dtype == np.int64
    assert [m.tolist() for m in measure(Cache(("bravo", "t1_gd"), data, pixels))] == [[0.0] * 3, [0] * 3]
