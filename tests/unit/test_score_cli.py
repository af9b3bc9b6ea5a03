"""medgen-score: predicted masks of any segmenter scored against true masks, as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medgen.evaluation.bratsmets import MISSED_HD95_MM
from medgen.scripts.score import main

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _save(path: Path, mask: np.ndarray, zooms=(1.0, 1.0, 1.0), flip: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*zooms, 1.0]) if flip is None else flip @ np.diag([*zooms, 1.0])
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), str(path))


def _box(shape, *ranges) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[tuple(slice(a, b) for a, b in ranges)] = 1
    return m


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_hand_made_cases_score_as_worked_out(tmp_path, capsys):
    shape = (20, 12, 12)
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    # merged: two 2x2x2 boxes one voxel apart are one lesion; half of it predicted -> Dice 2/3, HD95 3 mm
    _save(truth / "merged" / "seg.nii.gz", _box(shape, (2, 4), (4, 6), (4, 6)) | _box(shape, (5, 7), (4, 6), (4, 6)))
    _save(pred / "merged.nii.gz", _box(shape, (2, 4), (4, 6), (4, 6)))
    # a found 3x3x3 lesion and a far false positive -> (1 + 0) / 2, HD95 (0 + 374) / 2
    lesion = _box(shape, (2, 5), (2, 5), (2, 5))
    _save(truth / "fp" / "seg.nii.gz", lesion)
    _save(pred / "fp.nii.gz", lesion | _box(shape, (14, 17), (7, 10), (7, 10)))
    # an empty pair -> 1 and 0
    _save(truth / "empty" / "seg.nii.gz", np.zeros(shape))
    _save(pred / "empty.nii.gz", np.zeros(shape))
    code, out, _ = _run(capsys, pred, truth, "--resamples", "100", "--quiet")
    assert code == 0
    result = json.loads((pred / "scores.json").read_text())
    cases = result["cases"]
    assert sorted(cases) == ["empty.nii.gz", "fp.nii.gz", "merged.nii.gz"]
    assert cases["merged.nii.gz"]["lesionwise_dice"] == pytest.approx(2 / 3)
    assert cases["merged.nii.gz"]["lesionwise_hd95"] == pytest.approx(3.0)
    assert {k: cases["fp.nii.gz"][k] for k in ("lesionwise_dice", "lesionwise_hd95", "num_tp", "num_fp", "num_fn")} == \
        {"lesionwise_dice": 0.5, "lesionwise_hd95": MISSED_HD95_MM / 2, "num_tp": 1, "num_fp": 1, "num_fn": 0}
    assert cases["fp.nii.gz"]["legacy_dice"] == pytest.approx(2 / 3)
    assert (cases["empty.nii.gz"]["lesionwise_dice"], cases["empty.nii.gz"]["lesionwise_hd95"]) == (1.0, 0.0)
    overall = result["overall"]["brats_mets"]
    assert overall["lesionwise_dice"]["value"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert (overall["num_tp"], overall["num_fp"], overall["num_fn"]) == (2, 1, 0)
    # medgen's own figures per RANO-BM bin (all lesions tiny, < 10 mm) merge nothing: the merged case's
    # two boxes are two lesions there, one missed, so 2 of 3 true lesions are found
    assert result["bins"] == ["tiny", "small", "medium", "large"]
    assert result["overall"]["medgen"]["bins"]["tiny"]["sensitivity"]["value"] == pytest.approx(2 / 3)
    assert cases["fp.nii.gz"]["medgen"]["tiny"] == {"lesions": 1, "found": 1, "lesion_dice": 1.0, "false_positives": 1}
    assert f"lesion-wise Dice {overall['lesionwise_dice']['value']:.3f}" in out and "tiny" in out


def test_slices_take_the_2d_rules_and_their_thickness(tmp_path, capsys):
    a = np.zeros((12, 12, 1), np.uint8)
    a[2:4, 2:4] = 1
    a[6:8, 2:4] = 1  # two squares 2 rows apart: their 3x3 dilations touch, one lesion in 2D
    dot = np.zeros((12, 12, 1), np.uint8)
    dot[5, 5] = 1  # 1 x 1 mm pixel, 3 mm thick: 3 mm³, kept (and missed)
    for name, mask in (("pair", a), ("dot", dot)):
        _save(tmp_path / "truth" / f"{name}.nii.gz", mask, (1.0, 1.0, 3.0))
    _save(tmp_path / "pred" / "pair.nii.gz", a, (1.0, 1.0, 3.0))
    _save(tmp_path / "pred" / "dot.nii.gz", np.zeros_like(dot), (1.0, 1.0, 3.0))
    code, _, _ = _run(capsys, tmp_path / "pred", tmp_path / "truth", "--out", tmp_path / "s.json", "--quiet")
    assert code == 0
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["cases"]["pair.nii.gz"]["num_tp"] == 1 and "2D analogues" in result["rules"]
    assert (result["cases"]["dot.nii.gz"]["num_fn"], result["cases"]["dot.nii.gz"]["dropped_lesions"]) == (1, 0)


def test_masks_in_other_orientations_are_compared_in_one(tmp_path, capsys):
    shape = (16, 16, 8)
    mask = _box(shape, (2, 6), (3, 7), (1, 4))
    _save(tmp_path / "truth" / "c.nii.gz", mask)  # RAS
    _save(tmp_path / "pred" / "c.nii.gz", mask[::-1, ::-1], flip=LPS)  # the same voxels, stored LPS
    code, _, _ = _run(capsys, tmp_path / "pred", tmp_path / "truth", "--quiet")
    assert code == 0
    assert json.loads((tmp_path / "pred" / "scores.json").read_text())["cases"]["c.nii.gz"]["legacy_dice"] == 1.0


def test_mismatches_are_one_line_naming_the_files(tmp_path, capsys):
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    _save(truth / "a.nii.gz", np.zeros((8, 8, 4)))
    _save(pred / "b.nii.gz", np.zeros((8, 8, 4)))
    code, _, err = _run(capsys, pred, truth)
    assert code == 1 and err.strip().splitlines()[-1] == f"medgen-score: {pred}: 1 case(s) without a match in {truth}: b.nii.gz"
    (pred / "b.nii.gz").rename(pred / "a.nii.gz")
    _save(pred / "a.nii.gz", np.zeros((8, 8, 5)))
    code, _, err = _run(capsys, pred, truth)
    assert code == 1 and err.strip().splitlines()[-1] == f"medgen-score: case a: {pred / 'a.nii.gz'} is [8, 8, 5] but {truth / 'a.nii.gz'} is [8, 8, 4]"
    _save(pred / "a.nii.gz", np.zeros((8, 8, 4)), (1.0, 1.0, 2.0))
    code, _, err = _run(capsys, pred, truth)
    assert code == 1 and err.strip().splitlines()[-1] == (f"medgen-score: case a: {pred / 'a.nii.gz'} has voxels of [1.0, 1.0, 2.0] mm but "
                                         f"{truth / 'a.nii.gz'} of [1.0, 1.0, 1.0] mm")
    (pred / "a.nii.gz").write_bytes(b"not a nifti")
    code, _, err = _run(capsys, pred, truth)
    last = err.strip().splitlines()[-1]  # progress bars come before it
    assert code == 1 and last.startswith(f"medgen-score: {pred / 'a.nii.gz'}: not a NIfTI file (")
    assert "Traceback" not in err
    code, _, err = _run(capsys, pred, truth, "--bins", "20,10")
    assert code == 2 and "--bins" in err and "increasing" in err
