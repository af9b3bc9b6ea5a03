"""Round trips through medgen.data.importers for BrainMetShare PNG slices and nnU-Net folders."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medgen.data.importers import (
    ImportFormatError,
    import_brainmetshare_png,
    import_nnunet,
    png_slice_to_ras,
)
from medgen.data.nifti_dataset import list_patients, load_volume, modality_path
from medgen.data.splits import assign_splits
from medgen.data.validate import check_dataset
from medgen.scripts.data import main as data_main

ROWS, COLS, DEPTH = 12, 10, 12  # rows != cols catches transposes; 12 slices catch lexical "10.png" < "2.png"
CHANNELS = ("0", "1", "2", "3")


# --------------------------------------------------------------------------------------------
# BrainMetShare PNG
# --------------------------------------------------------------------------------------------


def _png_patient(seed: int, depth: int = DEPTH, seg_scale: int = 255) -> dict[str, np.ndarray]:
    """Known PNG stacks ``{folder: [D, rows, cols] uint8}``; seg in {0, seg_scale}."""
    rng = np.random.default_rng(seed)
    stacks = {c: rng.integers(0, 256, (depth, ROWS, COLS), dtype=np.uint8) for c in CHANNELS}
    seg = np.zeros((depth, ROWS, COLS), np.uint8)
    seg[depth // 2, 3:6, 2:5] = seg_scale
    stacks["seg"] = seg
    return stacks


def _write_png_patient(folder: Path, stacks: dict[str, np.ndarray]) -> None:
    for channel, stack in stacks.items():
        (folder / channel).mkdir(parents=True, exist_ok=True)
        for k, plane in enumerate(stack):
            Image.fromarray(plane, mode="L").save(folder / channel / f"{k}.png")


@pytest.fixture
def png_src(tmp_path: Path) -> tuple[Path, dict[str, dict[str, np.ndarray]]]:
    src = tmp_path / "bms"
    truth = {"Mets_001": _png_patient(1), "Mets_002": _png_patient(2, seg_scale=1)}
    for pid, stacks in truth.items():
        _write_png_patient(src / pid, stacks)
    return src, truth


def _expected_ras(stack: np.ndarray) -> np.ndarray:
    """The documented orientation, written out independently: voxel (i, j, k) is PNG pixel
    (row = rows-1-j, col = cols-1-i) of slice k."""
    d, rows, cols = stack.shape
    out = np.empty((cols, rows, d), np.float32)
    for i in range(cols):
        for j in range(rows):
            out[i, j, :] = stack[:, rows - 1 - j, cols - 1 - i]
    return out


def test_png_round_trip_values_orientation_spacing(png_src, tmp_path: Path) -> None:
    src, truth = png_src
    dst = tmp_path / "out"
    assert import_brainmetshare_png(src, dst, spacing=(0.5, 0.7, 2.0)) == 2
    assert [p.name for p in list_patients(dst / "train")] == ["Mets_001", "Mets_002"]
    for pid, stacks in truth.items():
        folder = dst / "train" / pid
        for channel, key in zip(CHANNELS, ("bravo", "t1_pre", "t1_gd", "flair")):
            volume, affine = load_volume(modality_path(folder, key))
            assert volume.shape == (COLS, ROWS, DEPTH)
            np.testing.assert_array_equal(volume, _expected_ras(stacks[channel]))
            np.testing.assert_allclose(affine, np.diag([0.5, 0.7, 2.0, 1.0]))
            assert nib.load(str(modality_path(folder, key))).header.get_zooms() == (0.5, 0.7, 2.0)
        seg, _ = load_volume(modality_path(folder, "seg"))
        assert set(np.unique(seg)) == {0.0, 1.0}
        np.testing.assert_array_equal(seg, _expected_ras(stacks["seg"] > 0))
    assert check_dataset(dst, progress=False).ok


def test_png_orientation_landmark(tmp_path: Path) -> None:
    """PNG (row 0, col 0) of slice 0 is anterior-right-inferior: the voxel with the largest x and
    y world coordinates and the smallest z."""
    stacks = _png_patient(3)
    stacks["0"][:] = 0
    stacks["0"][0, 0, 0] = 255
    _write_png_patient(tmp_path / "src" / "P1", stacks)
    import_brainmetshare_png(tmp_path / "src", tmp_path / "dst")
    volume, affine = load_volume(tmp_path / "dst" / "train" / "P1" / "bravo.nii.gz")
    i, j, k = np.argwhere(volume == 255)[0]
    assert (i, j, k) == (COLS - 1, ROWS - 1, 0)
    world = affine @ np.array([i, j, k, 1.0])
    corners = affine @ np.array([[0, 0, 0, 1.0], [COLS - 1, ROWS - 1, DEPTH - 1, 1.0]]).T
    assert world[0] == corners[0].max() and world[1] == corners[1].max() and world[2] == corners[2].min()
    np.testing.assert_array_equal(png_slice_to_ras(stacks["0"][0]), volume[..., 0])


def test_png_map_override(png_src, tmp_path: Path) -> None:
    src, truth = png_src
    dst = tmp_path / "out"
    import_brainmetshare_png(src, dst, mapping={"0": "t1_gd", "2": "bravo"})
    folder = dst / "train" / "Mets_001"
    assert sorted(p.name for p in folder.iterdir()) == ["bravo.nii.gz", "seg.nii.gz", "t1_gd.nii.gz"]
    np.testing.assert_array_equal(load_volume(folder / "t1_gd.nii.gz")[0], _expected_ras(truth["Mets_001"]["0"]))
    np.testing.assert_array_equal(load_volume(folder / "bravo.nii.gz")[0], _expected_ras(truth["Mets_001"]["2"]))


@pytest.mark.parametrize(
    ("mapping", "words"),
    [
        ({"0": "t2"}, "unknown modality 't2'"),
        ({"0": "bravo", "1": "bravo"}, "more than one channel"),
        ({"7": "bravo"}, "Mets_001: channel folder"),
        ({"0": "seg"}, "mask"),
        ({}, "empty"),
    ],
)
def test_png_bad_map(png_src, tmp_path: Path, mapping: dict[str, str], words: str) -> None:
    with pytest.raises(ImportFormatError, match=words):
        import_brainmetshare_png(png_src[0], tmp_path / "out", mapping=mapping)


def test_png_split_folders_and_patients_without_seg(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src, dst = tmp_path / "bms", tmp_path / "out"
    _write_png_patient(src / "train" / "Mets_010", _png_patient(10))
    _write_png_patient(src / "test" / "Mets_020", _png_patient(20))
    no_seg = _png_patient(30)
    del no_seg["seg"]
    _write_png_patient(src / "test" / "Mets_030", no_seg)
    with caplog.at_level("WARNING", logger="medgen"):
        assert import_brainmetshare_png(src, dst) == 2
    assert "test/Mets_030" in caplog.text
    assert [p.name for p in list_patients(dst / "train")] == ["Mets_010"]
    assert [p.name for p in list_patients(dst / "test")] == ["Mets_020"]


def test_png_all_without_seg(tmp_path: Path) -> None:
    stacks = _png_patient(1)
    del stacks["seg"]
    _write_png_patient(tmp_path / "src" / "Mets_001", stacks)
    with pytest.raises(ImportFormatError, match="Mets_001"):
        import_brainmetshare_png(tmp_path / "src", tmp_path / "dst")


def test_png_missing_channel_folder(png_src, tmp_path: Path) -> None:
    src, _ = png_src
    for f in (src / "Mets_002" / "2").iterdir():
        f.unlink()
    (src / "Mets_002" / "2").rmdir()
    with pytest.raises(ImportFormatError, match=r"patient Mets_002: channel folder .*Mets_002/2 is missing"):
        import_brainmetshare_png(src, tmp_path / "out")


def test_png_mismatched_slice_counts(png_src, tmp_path: Path) -> None:
    src, _ = png_src
    (src / "Mets_001" / "1" / "11.png").unlink()
    with pytest.raises(ImportFormatError, match=r"patient Mets_001: slice counts differ .*1/: 11"):
        import_brainmetshare_png(src, tmp_path / "out")


def test_png_mismatched_size_leaves_dst_untouched(png_src, tmp_path: Path) -> None:
    src, _ = png_src
    for k in range(DEPTH):  # a whole channel of another size: found while reading, after Mets_001 was written
        Image.fromarray(np.zeros((ROWS + 2, COLS), np.uint8)).save(src / "Mets_002" / "3" / f"{k}.png")
    dst = tmp_path / "out"
    with pytest.raises(ImportFormatError, match=r"patient Mets_002: PNG size in .*Mets_002/3"):
        import_brainmetshare_png(src, dst)
    assert not any(list_patients(dst / s) for s in ("train", "val", "test"))
    assert [p.name for p in dst.iterdir() if p.name != ".medgen.lock"] == []  # only the import's lock file
    Image.fromarray(np.zeros((ROWS + 2, COLS), np.uint8)).save(src / "Mets_001" / "3" / "4.png")
    with pytest.raises(ImportFormatError, match=r"patient Mets_001: PNG sizes differ within .*Mets_001/3"):
        import_brainmetshare_png(src, dst)


def test_png_size_blames_the_odd_channel_even_when_it_is_the_first(png_src, tmp_path: Path) -> None:
    src, _ = png_src
    for k in range(DEPTH):
        Image.fromarray(np.zeros((ROWS, COLS + 1), np.uint8)).save(src / "Mets_001" / "0" / f"{k}.png")
    with pytest.raises(ImportFormatError, match=r"patient Mets_001: PNG size in .*Mets_001/0 differs from that in "
                                                r".*Mets_001/1 \(RAS volumes \(11, 12, 12\) vs \(10, 12, 12\)\)"):
        import_brainmetshare_png(src, tmp_path / "out")


def test_refuses_non_empty_dst(png_src, tmp_path: Path) -> None:
    src, _ = png_src
    dst = tmp_path / "out"
    import_brainmetshare_png(src, dst)
    with pytest.raises(ImportFormatError, match="already holds patient folders"):
        import_brainmetshare_png(src, dst)


def test_bad_spacing_and_split(png_src, tmp_path: Path) -> None:
    with pytest.raises(ImportFormatError, match="spacing"):
        import_brainmetshare_png(png_src[0], tmp_path / "o", spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ImportFormatError, match="split"):
        import_brainmetshare_png(png_src[0], tmp_path / "o", split=(0.5, 0.1, 0.1))


def test_split_fractions_are_patient_level_and_deterministic(tmp_path: Path) -> None:
    ids = [f"P{i:02d}" for i in range(10)]
    a = assign_splits(ids, (0.6, 0.2, 0.2), seed=3)
    assert a == assign_splits(list(reversed(ids)), (0.6, 0.2, 0.2), seed=3)
    assert sorted(a.values()).count("train") == 6 and list(a.values()).count("test") == 2
    assert set(a) == set(ids)
    assert assign_splits(ids, (1.0, 0.0, 0.0)) == {i: "train" for i in ids}

    src = tmp_path / "bms"
    for i in range(4):
        _write_png_patient(src / "train" / f"Mets_{i}", _png_patient(i, depth=2))
    _write_png_patient(src / "test" / "Mets_9", _png_patient(9, depth=2))
    import_brainmetshare_png(src, tmp_path / "out", split=(0.5, 0.5, 0.0), seed=1)
    got = {s: [p.name for p in list_patients(tmp_path / "out" / s)] for s in ("train", "val", "test")}
    assert len(got["train"]) == 2 and len(got["val"]) == 2 and got["test"] == ["Mets_9"]
    expected = assign_splits([f"Mets_{i}" for i in range(4)], (0.5, 0.5, 0.0), seed=1)
    assert all(expected[pid] == s for s in ("train", "val") for pid in got[s])


def test_cli_png(png_src, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, _ = png_src
    dst = tmp_path / "out"
    assert data_main(["import", "--format", "brainmetshare-png", str(src), str(dst), "--map", "0=bravo,3=flair",
                      "--spacing", "0.9,0.9,1.5"]) == 0
    assert "imported 2 patients" in capsys.readouterr().out
    np.testing.assert_allclose(load_volume(dst / "train" / "Mets_001" / "flair.nii.gz")[1], np.diag([0.9, 0.9, 1.5, 1]))
    (src / "Mets_002" / "seg" / "0.png").unlink()
    assert data_main(["import", "--format", "brainmetshare-png", str(src), str(tmp_path / "out2")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("medgen-data import: patient Mets_002: slice counts differ")


# --------------------------------------------------------------------------------------------
# nnU-Net raw
# --------------------------------------------------------------------------------------------

#: an oblique-free but non-RAS (LPS-like) source affine with an origin, to check reorientation
NN_AFFINE = np.array([[-0.9, 0, 0, 90.0], [0, -0.8, 0, 100.0], [0, 0, 1.5, -60.0], [0, 0, 0, 1]])
NN_SHAPE = (9, 7, 5)


def _nn_case(root: Path, images: str, labels: str | None, case: str, seed: int, channels: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {f"{c:04d}": rng.normal(100, 20, NN_SHAPE).astype(np.float32) for c in range(channels)}
    for c, arr in arrays.items():
        (root / images).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(arr, NN_AFFINE), str(root / images / f"{case}_{c}.nii.gz"))
    label = np.zeros(NN_SHAPE, np.uint8)
    label[2:4, 2:4, 1:3] = 1
    label[5, 5, 3] = 2
    arrays["label"] = label
    if labels is not None:
        (root / labels).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(label, NN_AFFINE), str(root / labels / f"{case}.nii.gz"))
    return arrays


@pytest.fixture
def nn_src(tmp_path: Path) -> tuple[Path, dict[str, dict[str, np.ndarray]]]:
    src = tmp_path / "Dataset001_Mets"
    truth = {case: _nn_case(src, "imagesTr", "labelsTr", case, i) for i, case in enumerate(["mets_001", "mets_002"])}
    return src, truth


def _canonical(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    img = nib.as_closest_canonical(nib.Nifti1Image(array, NN_AFFINE))
    return np.asarray(img.dataobj, dtype=np.float32), img.affine


def test_nnunet_round_trip_with_dataset_json(nn_src, tmp_path: Path) -> None:
    src, truth = nn_src
    (src / "dataset.json").write_text(json.dumps({"channel_names": {"0": "BRAVO", "1": "t1_gd"},
                                                  "labels": {"background": 0, "met": 1, "edema": 2}}))
    dst = tmp_path / "out"
    assert import_nnunet(src, dst) == 2
    for case, arrays in truth.items():
        folder = dst / "train" / case
        assert sorted(p.name for p in folder.iterdir()) == ["bravo.nii.gz", "seg.nii.gz", "t1_gd.nii.gz"]
        for channel, key in (("0000", "bravo"), ("0001", "t1_gd")):
            volume, affine = load_volume(folder / f"{key}.nii.gz")
            want, want_affine = _canonical(arrays[channel])
            np.testing.assert_allclose(volume, want, rtol=1e-6)
            np.testing.assert_allclose(affine, want_affine, atol=1e-5)
            assert np.allclose(np.diag(affine)[:3], [0.9, 0.8, 1.5])  # RAS, spacing kept
        seg, seg_affine = load_volume(folder / "seg.nii.gz")
        np.testing.assert_array_equal(seg, _canonical((arrays["label"] > 0).astype(np.float32))[0])
        assert seg.sum() == 9 and set(np.unique(seg)) == {0.0, 1.0}
        np.testing.assert_allclose(seg_affine, want_affine, atol=1e-5)
        # the world position of a voxel is unchanged by the import
        src_img = nib.load(str(src / "imagesTr" / f"{case}_0000.nii.gz"))
        out_img = nib.load(str(folder / "bravo.nii.gz"))
        world = src_img.affine @ np.array([1, 2, 3, 1.0])
        idx = np.round(np.linalg.inv(out_img.affine) @ world).astype(int)[:3]
        assert out_img.get_fdata()[tuple(idx)] == pytest.approx(float(arrays["0000"][1, 2, 3]), rel=1e-6)
    assert check_dataset(dst, keys=("bravo", "t1_gd", "seg"), progress=False).ok


def test_nnunet_affine_mismatch_blames_the_odd_file(nn_src, tmp_path: Path) -> None:
    src, truth = nn_src
    moved = NN_AFFINE.copy()
    moved[0, 3] += 2.0
    nib.save(nib.Nifti1Image(truth["mets_002"]["0000"], moved), str(src / "imagesTr" / "mets_002_0000.nii.gz"))
    with pytest.raises(ImportFormatError, match=r"case mets_002: the affine of .*imagesTr/mets_002_0000.nii.gz differs "
                                                r"from that of .*imagesTr/mets_002_0001.nii.gz \(max difference 2 mm\)"):
        import_nnunet(src, tmp_path / "out", mapping={"0": "bravo", "1": "t1_gd"})
    assert not list_patients(tmp_path / "out" / "train")


def test_nnunet_map_override_and_test_set(nn_src, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src, truth = nn_src
    _nn_case(src, "imagesTs", "labelsTs", "mets_101", 101)
    _nn_case(src, "imagesTs", None, "mets_102", 102)
    dst = tmp_path / "out"
    with caplog.at_level("WARNING", logger="medgen"):
        assert import_nnunet(src, dst, mapping={"0001": "flair", "0": "t1_pre"}) == 3
    assert "mets_102" in caplog.text
    assert [p.name for p in list_patients(dst / "test")] == ["mets_101"]
    volume, _ = load_volume(dst / "train" / "mets_002" / "flair.nii.gz")
    np.testing.assert_allclose(volume, _canonical(truth["mets_002"]["0001"])[0], rtol=1e-6)
    assert (dst / "train" / "mets_002" / "t1_pre.nii.gz").is_file()


@pytest.mark.parametrize(
    ("dataset_json", "words"),
    [
        (None, "no dataset.json.*--map"),
        ({"channel_names": {"0": "T1", "1": "T2"}}, "not medgen modalities.*--map"),
        ({"channel_names": {"0": "bravo", "1": "BRAVO"}}, "more than one channel"),
    ],
)
def test_nnunet_needs_a_mapping(nn_src, tmp_path: Path, dataset_json: dict | None, words: str) -> None:
    src, _ = nn_src
    if dataset_json is not None:
        (src / "dataset.json").write_text(json.dumps(dataset_json))
    with pytest.raises(ImportFormatError, match=words):
        import_nnunet(src, tmp_path / "out")


def test_nnunet_bad_inputs(nn_src, tmp_path: Path) -> None:
    src, _ = nn_src
    with pytest.raises(ImportFormatError, match="channel 0007 does not exist"):
        import_nnunet(src, tmp_path / "out", mapping={"7": "bravo"})
    with pytest.raises(ImportFormatError, match="not an nnU-Net channel"):
        import_nnunet(src, tmp_path / "out", mapping={"t1": "bravo"})
    (src / "imagesTr" / "mets_002_0001.nii.gz").unlink()
    with pytest.raises(ImportFormatError, match=r"case mets_002: missing channel file .*mets_002_0001"):
        import_nnunet(src, tmp_path / "out", mapping={"0": "bravo", "1": "t1_gd"})
    nib.save(nib.Nifti1Image(np.zeros((9, 7, 6), np.uint8), NN_AFFINE), str(src / "labelsTr" / "mets_001.nii.gz"))
    with pytest.raises(ImportFormatError, match=r"case mets_001: .*mets_001.nii.gz has shape"):
        import_nnunet(src, tmp_path / "out", mapping={"0": "bravo"})
    assert not (tmp_path / "out" / "train").exists()
    (src / "labelsTr" / "mets_001.nii.gz").unlink()
    with pytest.raises(ImportFormatError, match="case mets_001: no label"):
        import_nnunet(src, tmp_path / "out", mapping={"0": "bravo"})


def test_cli_nnunet(nn_src, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, _ = nn_src
    dst = tmp_path / "out"
    assert data_main(["import", "--format", "nnunet", str(src), str(dst), "--map", "0000=bravo,0001=t1_gd",
                      "--split", "0.5,0.5,0"]) == 0
    assert "imported 2 patients" in capsys.readouterr().out
    assert len(list_patients(dst / "train")) == 1 and len(list_patients(dst / "val")) == 1
    assert data_main(["import", "--format", "nnunet", str(src), str(dst), "--map", "0=bravo"]) == 1
    assert "already holds patient folders" in capsys.readouterr().err
    assert data_main(["import", "--format", "nnunet", str(src), str(tmp_path / "o2")]) == 1
    assert "--map" in capsys.readouterr().err
