"""The single homes of the data layer: split fractions and assignment (medgen.data.splits) and
the shape/affine agreement of one patient's volumes (medgen.data.nifti_dataset.geometry_mismatches)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from datagen import make_patient, write_dataset
from medgen.core.constants import AFFINE_ATOL, DEFAULT_SPLIT, SPLITS
from medgen.data import phantom
from medgen.data.importers import ImportFormatError, import_brainmetshare_png
from medgen.data.nifti_dataset import DataError, NiFTIDataset, geometry_mismatches, modality_path, save_volume
from medgen.data.splits import assign_splits, parse_split, split_counts, split_indices
from medgen.data.validate import check_patient
from medgen.scripts.data import main as data_main

# --------------------------------------------------------------------------------------------
# split fractions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0.7,0.15,0.15", " 0.7, 0.15 ,0.15", (0.7, 0.15, 0.15), [0.7, 0.15, 0.15],
                                   np.array([0.7, 0.15, 0.15])])
def test_parse_split_accepts_text_and_sequences(value) -> None:
    assert parse_split(value) == (0.7, 0.15, 0.15)
    assert parse_split("1,0,0") == (1.0, 0.0, 0.0)
    assert parse_split((0.3333334, 0.3333333, 0.3333333)) == (0.3333334, 0.3333333, 0.3333333)  # within 1e-6


@pytest.mark.parametrize("value, words", [
    ("0.5,0.5", ["three fractions", "'0.5,0.5'", "2 value(s)"]),
    ("0.5,0.3,0.1,0.1", ["three fractions", "4 value(s)"]),
    ("0.7,x,0.3", ["the val fraction 'x' is not a number", "'0.7,x,0.3'"]),
    ("-0.1,0.6,0.5", ["the train fraction '-0.1' is not a non-negative number"]),
    ("0.5,nan,0.5", ["the val fraction 'nan'"]),
    ("0.5,0.5,inf", ["the test fraction 'inf'"]),
    ((0.5, 0.1, 0.1), ["summing to 1", "(0.5, 0.1, 0.1)", "sum 0.7"]),
    (0.5, ["three fractions", "got 0.5"]),
])
def test_parse_split_errors_name_the_bad_value(value, words) -> None:
    with pytest.raises(ValueError) as info:
        parse_split(value, "--split")
    message = str(info.value)
    assert message.startswith("--split ")
    for w in words:
        assert w in message, message


def test_split_counts_and_default() -> None:
    assert DEFAULT_SPLIT == (0.7, 0.15, 0.15)
    assert split_counts(20) == split_counts(20, DEFAULT_SPLIT) == (14, 3, 3)
    assert split_counts(0, (0.2, 0.3, 0.5)) == (0, 0, 0)
    assert split_counts(2, (0.5, 0.25, 0.25)) == (1, 1, 0)  # a tie goes to the earlier split
    for n in range(30):
        assert sum(split_counts(n, (0.6, 0.3, 0.1))) == n
        assert split_counts(n, (0.0, 1.0, 0.0)) == (0, n, 0)
    with pytest.raises(ValueError, match="must be >= 0"):
        split_counts(-1)
    with pytest.raises(ValueError, match="summing to 1"):
        split_counts(4, (0.5, 0.2, 0.2))


def test_assignment_is_unchanged() -> None:
    """The patients of a given seed land where they landed before splits had one home."""
    ids = [f"P{i:02d}" for i in range(10)]
    got = assign_splits(ids, (0.6, 0.2, 0.2), seed=3)
    assert {s: sorted(k for k, v in got.items() if v == s) for s in SPLITS} == {
        "train": ["P00", "P01", "P02", "P04", "P06", "P09"], "val": ["P05", "P07"], "test": ["P03", "P08"]}
    got = assign_splits([f"case{i}" for i in range(7)], DEFAULT_SPLIT, seed=0)
    assert [k for k, v in got.items() if v != "train"] == ["case0", "case1"] and got["case1"] == "test"
    # the phantom generator's stream: SeedSequence([seed, subjects, 0x5EED])
    for seed, subjects, split, expected in [
        (5, 4, DEFAULT_SPLIT, [0, 1, 0, 0]),
        (0, 20, DEFAULT_SPLIT, [0, 1, 0, 0, 0, 2, 2, 0, 0, 0, 0, 0, 2, 1, 0, 0, 0, 0, 1, 0]),
        (3, 11, (0.5, 0.3, 0.2), [0, 0, 1, 1, 2, 0, 2, 1, 0, 0, 0]),
    ]:
        stream = np.random.SeedSequence([seed, subjects, phantom._SPLIT_STREAM])
        assert split_indices(subjects, split, stream).tolist() == expected


def test_assign_splits_is_split_indices_of_the_sorted_ids() -> None:
    ids = [f"id{i}" for i in (3, 1, 2, 0, 5, 4)]
    got = assign_splits(ids, "0.5,0.25,0.25", seed=7)
    idx = split_indices(len(ids), (0.5, 0.25, 0.25), seed=7)
    assert got == {pid: SPLITS[i] for pid, i in zip(sorted(ids), idx)}
    assert assign_splits(ids + ids, (0.5, 0.25, 0.25), seed=7) == got  # duplicates count once


def test_phantom_and_cli_use_the_same_fractions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match=r"split wants three non-negative fractions summing to 1, got \(0.5, 0.2, 0.2\)"):
        phantom.generate_dataset(tmp_path / "p", subjects=2, split=(0.5, 0.2, 0.2))
    assert not (tmp_path / "p").exists()  # refused before anything is written
    with pytest.raises(SystemExit):
        data_main(["phantom", "--out", str(tmp_path / "c"), "--subjects", "2", "--split", "0.5,0.x,0.5"])
    err = capsys.readouterr().err
    assert "--split wants three fractions" in err and "'0.5,0.x,0.5'" in err and "val fraction '0.x'" in err
    with pytest.raises(SystemExit):
        data_main(["import", "--format", "nnunet", str(tmp_path), str(tmp_path / "o"), "--split", "0.5,0.5"])
    assert "2 value(s)" in capsys.readouterr().err
    with pytest.raises(ImportFormatError, match=r"split wants .* got \(0.5, -0.5, 1.0\): the val fraction -0.5"):
        import_brainmetshare_png(tmp_path, tmp_path / "o", split=(0.5, -0.5, 1.0))


# --------------------------------------------------------------------------------------------
# shape / affine agreement
# --------------------------------------------------------------------------------------------

EYE = np.eye(4)


def test_geometry_blames_the_odd_one_out() -> None:
    shifted = EYE.copy()
    shifted[0, 3] = 0.5
    assert geometry_mismatches([]) == [] and geometry_mismatches([("a", (4, 4, 2), EYE)]) == []
    assert geometry_mismatches([("a", (4, 4, 2), EYE), ("b", (4, 4, 2), EYE + AFFINE_ATOL / 2)]) == []

    # the first file is the odd one: blamed, not the two that agree
    (m,) = geometry_mismatches([("x/bravo.nii.gz", (4, 4, 3), EYE), ("x/flair.nii.gz", (4, 4, 2), EYE),
                                ("x/seg.nii.gz", (4, 4, 2), EYE)])
    assert (m.path, m.reference, m.kind) == ("x/bravo.nii.gz", "x/flair.nii.gz", "shape")
    assert m.message == "shape (4, 4, 3) differs from flair.nii.gz (4, 4, 2)"

    # affines are compared among the files of the reference shape; the most common affine wins
    (m,) = geometry_mismatches([("x/bravo.nii.gz", (4, 4, 2), shifted), ("x/flair.nii.gz", (4, 4, 2), EYE),
                                ("x/seg.nii.gz", (4, 4, 2), EYE)])
    assert (m.path, m.kind, m.max_difference) == ("x/bravo.nii.gz", "affine", 0.5)
    assert m.message == "affine differs from flair.nii.gz's (max difference 0.5)"

    # a tie goes to the earlier file; shape problems come before affine problems
    got = geometry_mismatches([("a", (4, 4, 2), EYE), ("b", (4, 4, 2), shifted), ("c", (5, 4, 2), EYE)])
    assert [(m.path, m.kind, m.reference) for m in got] == [("c", "shape", "a"), ("b", "affine", "a")]


def test_check_training_and_import_blame_the_same_file(tmp_path: Path) -> None:
    (folder,) = write_dataset(tmp_path / "d", n_patients=1, shape=(16, 16, 6), keys=("bravo", "t1_gd", "seg"))
    odd = modality_path(folder, "bravo")  # the first file is the odd one out
    save_volume(odd, make_patient(shape=(16, 16, 7), keys=("bravo",))["bravo"], np.diag([1.0, 1.0, 2.0, 1.0]))
    (problem,) = check_patient(folder, ("bravo", "t1_gd", "seg"))
    assert problem.path == str(odd) and problem.message == "shape (16, 16, 7) differs from t1_gd.nii.gz (16, 16, 6)"
    with pytest.raises(DataError) as info:
        NiFTIDataset([folder], ["bravo", "t1_gd", "seg"])[0]
    assert str(info.value) == f"{problem.path}: {problem.message}"
