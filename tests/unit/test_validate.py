"""Data fault matrix for medgen.data.validate and ``medgen-data check``: one case per fault."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest

from datagen import write_dataset
from medgen.core.constants import MODALITIES
from medgen.data.nifti_dataset import load_volume, modality_path, save_volume
from medgen.data.validate import Problem, Report, check_dataset, check_patient, check_patients
from medgen.scripts.data import main as data_main


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_dataset(root, n_patients=3, shape=(16, 16, 6), splits=("train", "train", "val"))
    return root


def _patient(root: Path, i: int) -> Path:
    return next(p for split in ("train", "val") for p in (root / split).glob(f"patient_{i:03d}"))


# --- faults: each mutates a valid dataset and returns the file the problem must name ---


def _missing_modality(root: Path) -> str:
    path = modality_path(_patient(root, 1), "t1_gd")
    path.unlink()
    return str(path)


def _truncated_gzip(root: Path) -> str:
    path = modality_path(_patient(root, 0), "flair")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return str(path)


def _mismatched_shape(root: Path) -> str:
    path = modality_path(_patient(root, 1), "bravo")
    noise = np.random.default_rng(0).uniform(0, 1000, (16, 16, 7))
    save_volume(path, noise, np.diag([1.0, 1.0, 2.0, 1.0]))
    return str(path)


def _mismatched_affine(root: Path) -> str:
    path = modality_path(_patient(root, 2), "t1_pre")
    data, _ = load_volume(path)
    save_volume(path, data, np.diag([1.0, 1.0, 3.0, 1.0]))
    return str(path)


def _nan_voxels(root: Path) -> str:
    path = modality_path(_patient(root, 0), "bravo")
    data, affine = load_volume(path)
    data[0, 0, :3] = np.nan
    save_volume(path, data, affine)
    return str(path)


def _non_binary_mask(root: Path) -> str:
    path = modality_path(_patient(root, 2), "seg")
    data, affine = load_volume(path)
    data[0, 0, 0] = 0.5
    data[1, 1, 1] = 2.0
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(path))  # bypass save_volume's binarisation
    return str(path)


def _extra_file(root: Path) -> str:
    path = _patient(root, 1) / "notes.txt"
    path.write_text("hello")
    return "notes.txt"


def _empty_mask(root: Path) -> str:
    path = modality_path(_patient(root, 0), "seg")
    _, affine = load_volume(path)
    save_volume(path, np.zeros((16, 16, 6), np.float32), affine, is_mask=True)
    return str(path)


FAULTS: dict[str, tuple[Callable[[Path], str], str, str]] = {
    # name: (mutation, expected severity, expected words in the message)
    "missing_modality": (_missing_modality, "error", "missing modality"),
    "truncated_gzip": (_truncated_gzip, "error", "truncated"),
    "mismatched_shape": (_mismatched_shape, "error", "shape"),
    "mismatched_affine": (_mismatched_affine, "error", "affine"),
    "nan_voxels": (_nan_voxels, "error", "3 NaN"),
    "non_binary_mask": (_non_binary_mask, "error", "not binary"),
    "extra_file": (_extra_file, "warning", "stray"),
    "empty_mask": (_empty_mask, "warning", "empty mask"),
}


def test_valid_dataset_is_ok(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = check_dataset(dataset)
    assert report.ok and report.problems == [] and report.patients_checked == 3
    assert data_main(["check", str(dataset)]) == 0
    assert "OK: checked 3 patient(s)" in capsys.readouterr().out


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_fault_matrix(fault: str, dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mutate, severity, words = FAULTS[fault]
    named = mutate(dataset)

    report = check_dataset(dataset)
    assert len(report.problems) == 1, report.format()
    problem = report.problems[0]
    assert problem.severity == severity
    assert words in problem.message
    assert named in f"{problem.path}: {problem.message}"
    assert report.ok is (severity == "warning")

    code = data_main(["check", str(dataset)])
    out = capsys.readouterr().out
    assert code == (0 if severity == "warning" else 1)
    assert f"{severity.upper()} " in out and named in out and words in out
    assert "Traceback" not in out


def test_empty_folder_has_no_patients(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    report = check_dataset(root)
    assert not report.ok and "no split folders" in report.problems[0].message
    assert data_main(["check", str(root)]) == 1
    assert str(root) in capsys.readouterr().out

    (root / "train").mkdir()
    report = check_dataset(root)
    messages = [p.message for p in report.errors]
    assert any("no patient folders" in m for m in messages) and any("no patients" in m for m in messages)


def test_patient_folder_without_files_and_split_level_stray(dataset: Path) -> None:
    (dataset / "train" / "patient_009").mkdir()
    (dataset / "train" / "readme.md").write_text("x")
    report = check_dataset(dataset)
    by_path = {p.path: p for p in report.problems}
    assert by_path[str(dataset / "train" / "patient_009")].message.startswith("patient folder is empty")
    assert by_path[str(dataset / "train")].severity == "warning"
    assert "readme.md" in by_path[str(dataset / "train")].message
    assert not report.ok


def test_two_problems_are_both_reported(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = _missing_modality(dataset)
    nan = _nan_voxels(dataset)
    report = check_dataset(dataset)
    assert {p.path for p in report.errors} == {missing, nan}
    assert data_main(["check", str(dataset)]) == 1
    out = capsys.readouterr().out
    assert missing in out and nan in out and "2 error(s)" in out


def test_every_problem_of_one_patient(dataset: Path) -> None:
    """Several faults in one patient folder are all listed, not only the first."""
    folder = _patient(dataset, 0)
    _truncated_gzip(dataset)
    _nan_voxels(dataset)
    _empty_mask(dataset)
    (folder / "extra.nii.gz").write_bytes(b"")
    problems = check_patient(folder)
    kinds = sorted((p.severity, Path(p.path).name) for p in problems)
    assert kinds == [("error", "bravo.nii.gz"), ("error", "flair.nii.gz"),
                     ("warning", "patient_000"), ("warning", "seg.nii.gz")]


def test_json_output_parses(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    named = _missing_modality(dataset)
    _empty_mask(dataset)
    assert data_main(["check", str(dataset), "--json"]) == 1
    payload = json.loads(capsys.readouterr().out)
    assert payload["ok"] is False and payload["errors"] == 1 and payload["warnings"] == 1
    assert payload["patients_checked"] == 3
    assert {"path": named, "message": "missing modality 't1_gd' (no t1_gd.nii.gz or t1_gd.nii)", "severity": "error"} in payload["problems"]


def test_check_patients_only_reads_requested_keys(dataset: Path) -> None:
    _missing_modality(dataset)  # t1_gd of patient_001
    folders = [_patient(dataset, i) for i in range(3)]
    assert check_patients(folders, keys=("bravo", "seg"), progress=False).ok
    report = check_patients(folders, keys=MODALITIES, progress=False)
    assert not report.ok and report.patients_checked == 3
    assert not check_patients([], keys=("seg",)).ok
    with pytest.raises(ValueError, match="unknown modality"):
        check_patient(folders[0], keys=("t2",))


def test_report_format_and_dict() -> None:
    report = Report([Problem("a/b.nii.gz", "bad", "error"), Problem("a", "odd", "warning")], patients_checked=1)
    lines = report.format().splitlines()
    assert lines == ["ERROR a/b.nii.gz: bad", "WARNING a: odd",
                     "FAILED: checked 1 patient(s): 1 error(s), 1 warning(s)"]
    assert json.loads(json.dumps(report.to_dict()))["problems"][1]["severity"] == "warning"
