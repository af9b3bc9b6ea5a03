"""Phantoms (medgen.data.phantom): determinism, geometry, contrasts, lesions, dataset layout."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medgen.core.constants import IMAGE_MODALITIES, MASK_KEY, MODALITIES, SPLITS
from medgen.data import phantom
from medgen.data.splits import split_counts
from medgen.data.validate import check_dataset
from medgen.data.preview import render_phantom_figure

SMALL = dict(size=64, slices=32)


def _seed_with_lesion(min_diameter_mm: float) -> int:
    return next(s for s in range(1000) if any(les.diameter_mm >= min_diameter_mm for les in phantom.sample_lesions(s)))


@pytest.fixture(scope="module")
def subject() -> phantom.PhantomSubject:
    """A 96x96x48 subject with at least one lesion of 8 mm or more, with its tissue maps."""
    return phantom.make_subject(_seed_with_lesion(8.0), size=96, slices=48, return_tissue=True)


def test_same_seed_is_bit_identical_and_seeds_differ():
    a = phantom.make_subject(3, **SMALL)
    b = phantom.make_subject(3, **SMALL)
    c = phantom.make_subject(4, **SMALL)
    for key in MODALITIES:
        np.testing.assert_array_equal(a.volumes[key], b.volumes[key])
    assert a.lesions == b.lesions
    np.testing.assert_array_equal(a.affine, b.affine)
    assert all(not np.array_equal(a.volumes[k], c.volumes[k]) for k in IMAGE_MODALITIES)


def test_shapes_dtypes_affine_and_ranges():
    sub = phantom.make_subject(7, size=64, slices=24)
    assert set(sub.volumes) == set(MODALITIES)
    for key, volume in sub.volumes.items():
        assert volume.shape == (64, 64, 24) and volume.dtype == np.float32, key
    np.testing.assert_allclose(sub.spacing, np.asarray(phantom.FOV_MM) / (64, 64, 24))
    assert np.all(np.diag(sub.affine)[:3] > 0) and np.count_nonzero(sub.affine[:3, :3]) == 3  # RAS, axis-aligned
    np.testing.assert_allclose(sub.affine @ [31.5, 31.5, 11.5, 1.0], [0, 0, 0, 1], atol=1e-9)  # centred
    assert set(np.unique(sub.volumes[MASK_KEY])) <= {0.0, 1.0}
    for key in IMAGE_MODALITIES:
        volume = sub.volumes[key]
        assert np.isfinite(volume).all() and volume.min() >= 0.0 and np.percentile(volume, 99.9) < 2.0, key
        assert volume[:4, :4, :].mean() < 0.1 * np.percentile(volume, 99), f"{key}: background not dark"


def test_sample_lesions_matches_subject_and_stays_in_range(subject):
    drawn = phantom.sample_lesions(subject.seed)
    assert [les.diameter_mm for les in drawn] == [les.diameter_mm for les in subject.lesions]
    assert all(les.centre_mm is None for les in drawn)
    counts, diameters = [], []
    for seed in range(30):
        lesions = phantom.sample_lesions(seed)
        counts.append(len(lesions))
        diameters += [les.diameter_mm for les in lesions]
        assert all(les.ring == (les.diameter_mm > phantom.RING_DIAMETER_MM) for les in lesions)
    assert 0 <= min(counts) and max(counts) <= phantom.MAX_LESIONS and len(set(counts)) > 1
    assert 2.0 <= min(diameters) and max(diameters) <= 30.0 and np.ptp(diameters) > 5.0


def test_lesions_are_where_seg_says(subject):
    vol, tissue = subject.volumes, subject.tissue
    seg = vol[MASK_KEY] > 0.5
    # seg holds every voxel that is mostly lesion (enhancing rim and necrotic core) and no other
    assert seg[tissue["lesion"] >= 0.5].all() and (tissue["lesion"][seg] > 0).all()
    inv = np.linalg.inv(subject.affine)
    for les in subject.lesions:
        assert seg[tuple(np.rint(inv[:3, :3] @ les.centre_mm + inv[:3, 3]).astype(int))]
    # contrast enhancement: inside seg clearly above the surrounding parenchyma
    parenchyma = (tissue["gm"] + tissue["wm"]) > 0.5
    shell = ndimage.binary_dilation(seg, iterations=3) & ~ndimage.binary_dilation(seg, iterations=1) & parenchyma
    for key in ("t1_gd", "bravo"):
        inside, around = vol[key][seg].mean(), vol[key][shell].mean()
        assert inside > 1.2 * around, f"{key}: lesion {inside:.3f} vs surroundings {around:.3f}"
    # peritumoral oedema: FLAIR around the lesions brighter than distant white matter
    far = ~ndimage.binary_dilation(seg, iterations=20)
    around, distant_wm = vol["flair"][shell].mean(), vol["flair"][(tissue["wm"] > 0.9) & far].mean()
    assert around > 1.15 * distant_wm, f"FLAIR shell {around:.3f} vs distant WM {distant_wm:.3f}"


def test_ring_enhancement_has_dark_core():
    seed = _seed_with_lesion(16.0)
    sub = phantom.make_subject(seed, size=96, slices=48, return_tissue=True)
    core = sub.tissue["core"] > 0.9
    rim = (sub.volumes[MASK_KEY] > 0.5) & (sub.tissue["core"] < 0.1) & (sub.tissue["lesion"] > 0.9)
    assert core.any() and rim.any()
    assert sub.volumes["t1_gd"][core].mean() < 0.6 * sub.volumes["t1_gd"][rim].mean()


def test_tissue_contrasts(subject):
    vol, tissue = subject.volumes, subject.tissue
    mean = {k: {t: vol[k][tissue[t] > 0.7].mean() for t in ("wm", "gm", "csf")} for k in IMAGE_MODALITIES}
    assert mean["t1_pre"]["wm"] > mean["t1_pre"]["gm"] > mean["t1_pre"]["csf"]
    assert mean["bravo"]["wm"] > mean["bravo"]["gm"] > mean["bravo"]["csf"]
    assert mean["flair"]["gm"] > mean["flair"]["wm"] > mean["flair"]["csf"]
    # BRAVO (IR-prepared gradient echo) has the stronger GM/WM contrast and the darker CSF
    ratio = {k: mean[k]["wm"] / mean[k]["gm"] for k in ("bravo", "t1_gd")}
    assert ratio["bravo"] > ratio["t1_gd"] * 1.1
    assert mean["bravo"]["csf"] / mean["bravo"]["wm"] < mean["t1_gd"]["csf"] / mean["t1_gd"]["wm"]


def test_invalid_arguments():
    with pytest.raises(ValueError, match="seed"):
        phantom.make_subject(-1, **SMALL)
    with pytest.raises(ValueError, match="split"):
        split_counts(4, (0.5, 0.2, 0.2))


@pytest.mark.parametrize("n, split, expected", [
    (4, (0.7, 0.15, 0.15), (3, 1, 0)),
    (10, (0.7, 0.15, 0.15), (7, 2, 1)),
    (20, (0.7, 0.15, 0.15), (14, 3, 3)),
    (5, (1.0, 0.0, 0.0), (5, 0, 0)),
    (3, (0.0, 0.5, 0.5), (0, 2, 1)),
])
def test_split_counts(n, split, expected):
    assert split_counts(n, split) == expected
    assert sum(split_counts(n, split)) == n


def test_generate_dataset_layout_and_refuses_rerun(tmp_path):
    out = tmp_path / "ds"
    patients = phantom.generate_dataset(out, subjects=4, size=32, slices=12, seed=5)
    assert [p.name for p in patients] == [f"phantom_{i:04d}" for i in range(4)]
    per_split = {name: sorted(p.name for p in (out / name).iterdir()) if (out / name).is_dir() else []
                 for name in SPLITS}  # a split without subjects has no folder
    assert tuple(len(per_split[name]) for name in SPLITS) == split_counts(4, (0.7, 0.15, 0.15))
    for patient in patients:
        assert patient.parent.name in SPLITS
        images = {key: nib.load(patient / f"{key}.nii.gz") for key in MODALITIES}
        for key, img in images.items():
            assert img.shape == (32, 32, 12), key
            np.testing.assert_allclose(img.affine, images["bravo"].affine)
        assert images[MASK_KEY].get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(images[MASK_KEY].dataobj))) <= {0, 1}
    # the same subject as make_subject with the documented seed
    first = phantom.make_subject(phantom.subject_seed(5, 0), size=32, slices=12)
    np.testing.assert_array_equal(np.asarray(nib.load(patients[0] / "t1_gd.nii.gz").dataobj), first.volumes["t1_gd"])
    with pytest.raises(ValueError, match=r"ds[/\\](train|val|test)"):
        phantom.generate_dataset(out, subjects=2, size=32, slices=12, seed=6)


def test_generate_dataset_empty_splits_and_workers(tmp_path):
    serial = phantom.generate_dataset(tmp_path / "a", subjects=2, size=24, slices=8, seed=1, split=(1.0, 0.0, 0.0))
    assert all(p.parent.name == "train" for p in serial)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["train"]  # no empty val/ or test/
    assert check_dataset(tmp_path / "a", progress=False).ok
    pooled = phantom.generate_dataset(tmp_path / "b", subjects=2, size=24, slices=8, seed=1,
                                      split=(1.0, 0.0, 0.0), workers=2)
    for a, b in zip(serial, pooled):
        for key in MODALITIES:
            np.testing.assert_array_equal(np.asarray(nib.load(a / f"{key}.nii.gz").dataobj),
                                          np.asarray(nib.load(b / f"{key}.nii.gz").dataobj))


def test_cli_phantom(tmp_path, capsys):
    from medgen.scripts.data import main

    d = tmp_path / "cli"
    assert main(["phantom", "--out", str(d), "--subjects", "3", "--size", "64", "--slices", "16"]) == 0
    files = sorted(d.glob("*/phantom_*/*.nii.gz"))
    assert len(files) == 3 * len(MODALITIES)
    assert "lesions by size (tiny/small/medium/large, Feret diameter): on axial slices tiny " in capsys.readouterr().out
    assert main(["phantom", "--out", str(tmp_path / "x"), "--subjects", "1", "--lesion-sizes", "huge"]) == 2
    assert "--lesion-sizes must be one of clinical, cover, got 'huge'" in capsys.readouterr().err
    assert main(["phantom", "--out", str(tmp_path / "x"), "--subjects", "1", "--max-lesions", "0"]) == 2
    assert not (tmp_path / "x").exists()


def test_cover_draws_every_size_class_alike():
    from medgen.data.lesions import RANO_BM
    from medgen.data.phantom_lesions import COVER_RANGES_MM

    drawn = [phantom.sample_lesions(seed, "cover", max_lesions=4) for seed in range(2000)]
    counts = np.asarray([len(d) for d in drawn])
    assert counts.min() == 1 and counts.max() == 4 and abs(counts.mean() - 2.5) < 0.1  # uniform 1..4 (sd of the mean 0.025)
    diameters = np.asarray([les.diameter_mm for d in drawn for les in d])
    assert COVER_RANGES_MM[0][0] <= diameters.min() and diameters.max() <= COVER_RANGES_MM[-1][1]
    share = RANO_BM.counts(diameters) / len(diameters)
    np.testing.assert_allclose(share, 0.25, atol=0.03)  # each class a quarter (5000 lesions: sd 0.006)
    assert all(les.ring == (les.diameter_mm > phantom.RING_DIAMETER_MM) for d in drawn for les in d)
    # the default is the clinical distribution, drawn exactly as before the option existed
    assert phantom.sample_lesions(5) == phantom.sample_lesions(5, "clinical", phantom.MAX_LESIONS)
    with pytest.raises(ValueError, match="unknown lesion sizes 'big'; choose one of clinical, cover"):
        phantom.sample_lesions(0, "big")


def test_a_cover_subject_holds_large_lesions_inside_its_brain():
    seed = next(s for s in range(100) if any(les.diameter_mm >= 30 for les in phantom.sample_lesions(s, "cover", 6)))
    s = phantom.make_subject(seed, size=64, slices=32, lesion_sizes="cover", max_lesions=6, return_tissue=True)
    assert max(les.diameter_mm for les in s.lesions) >= 30 and s.volumes[MASK_KEY].any()
    brain = (s.tissue["gm"] + s.tissue["wm"] + s.tissue["csf"]) > 0.5
    inside = brain[s.volumes[MASK_KEY] > 0.5].mean()
    assert inside > 0.95, inside


def test_render_figure(tmp_path):
    png = render_phantom_figure(tmp_path / "fig.png", n_subjects=1, size=48, slices=16)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
