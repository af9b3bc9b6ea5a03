"""nibabel's own odd NIfTI files through medgen's readers, ``medgen-data check`` and the nnU-Net
importer: each gets a one-line verdict that is true for it (docs/data.md, Odd files).

The corpus is walked in the installed nibabel (``nibabel/**``), not copied: a file that appears
in a new nibabel without an entry in :data:`VERDICTS` fails :func:`test_every_corpus_file_has_a_verdict`.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medgen.data.importers import ImportFormatError, import_nnunet
from medgen.data.nifti_dataset import PatientReader, load_volume, modality_path, read_volume
from medgen.scripts.data import main as data_main

NIBABEL = Path(nib.__file__).parent
#: what counts as NIfTI-like: single files, both halves of a pair, compressed pairs, NIfTI-1 ``.nia``
SUFFIXES = (".nii", ".nii.gz", ".hdr", ".img", ".hdr.gz", ".img.gz", ".nia")

#: corpus file -> (verdict, detail). ``read``: a usable volume of shape ``detail``; ``values``: read,
#: but ``medgen-data check`` refuses its voxels with ``detail``; ``refused``: the reader refuses it,
#: the one-line reason containing ``detail``.
VERDICTS: dict[str, tuple[str, object]] = {
    # Analyze 7.5 (SPM2) header, dim (91, 109, 91, 1), shipped without its .img
    "tests/data/analyze.hdr": ("refused", "the Analyze 7.5 header of a .hdr/.img pair whose voxel file analyze.img "
                                          "is missing"),
    # big-endian int16, 3D
    "tests/data/anatomical.nii": ("read", (33, 41, 25)),
    # gzipped NIfTI-1, two volumes
    "tests/data/example4d.nii.gz": ("refused", "volume has shape (128, 96, 24, 2): 2 volumes in one file"),
    # gzipped NIfTI-2, two volumes (a 3D NIfTI-2 is read: test_a_3d_nifti2_is_read)
    "tests/data/example_nifti2.nii.gz": ("refused", "volume has shape (32, 20, 12, 2): 2 volumes in one file"),
    # NIfTI-1 time series of 20 volumes
    "tests/data/functional.nii": ("refused", "volume has shape (17, 21, 3, 20): 20 volumes in one file"),
    # NIfTI-1 pair header (magic ni1) without its .img
    "tests/data/nifti1.hdr": ("refused", "the NIfTI-1 header of a .hdr/.img pair whose voxel file nifti1.img is missing"),
    # NIfTI-2 pair header (magic ni2) without its .img
    "tests/data/nifti2.hdr": ("refused", "the NIfTI-2 header of a .hdr/.img pair whose voxel file nifti2.img is missing"),
    # big-endian float32, 3D
    "tests/data/reoriented_anat_moved.nii": ("read", (21, 26, 22)),
    # big-endian float32, 3D, 153 of its 1071 voxels NaN (outside the resampled field of view)
    "tests/data/resampled_anat_moved.nii": ("values", "153 NaN voxel(s) of 1071"),
    # CIFTI-2 dense connectome (NIfTI-2 container, intent 3001)
    "tests/data/row_major.dconn.nii": ("refused", "a CIFTI-2 file (surface/grayordinate data, intent ConnDense), "
                                                  "not a volume"),
    # gzipped uint8 3D, 4 x 5 x 7
    "tests/data/standard.nii.gz": ("read", (4, 5, 7)),
}


def corpus() -> list[str]:
    """Every NIfTI-like file shipped inside the installed nibabel, relative to its package folder."""
    return sorted(p.relative_to(NIBABEL).as_posix() for p in NIBABEL.rglob("*")
                  if p.is_file() and p.name.endswith(SUFFIXES))


def _suffix(name: str) -> str:
    return next(s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s))


SINGLE_FILES = [n for n in sorted(VERDICTS) if _suffix(n) in (".nii", ".nii.gz")]


def test_every_corpus_file_has_a_verdict() -> None:
    found = corpus()
    assert found, f"no NIfTI-like files under {NIBABEL}: the corpus walk is broken"
    new = sorted(set(found) - set(VERDICTS))
    gone = sorted(set(VERDICTS) - set(found))
    assert not new, f"corpus files without a verdict in VERDICTS (add one after reading their headers): {new}"
    assert not gone, f"VERDICTS names files the installed nibabel no longer ships: {gone}"


@pytest.mark.parametrize("name", sorted(VERDICTS))
def test_the_reader_gives_the_true_verdict(name: str) -> None:
    path = NIBABEL / name
    verdict, detail = VERDICTS[name]
    read = PatientReader().read(path)
    if verdict == "refused":
        assert read.problem is not None and detail in read.problem, read.problem
        assert "\n" not in read.problem and "Traceback" not in read.problem
        assert not {"AttributeError", "unreadable"} & set(read.problem.replace("(", " ").split())
        return
    assert read.problem is None and read.note is None, (read.problem, read.note)
    expected = np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj, dtype=np.float32)
    np.testing.assert_array_equal(read.data, expected)  # byte order, scaling and RAS as nibabel reads it
    if verdict == "read":
        assert read.data.shape == detail


def _dataset_of(root: Path, names: list[str]) -> dict[str, Path]:
    """One patient per corpus file, the file as its ``bravo`` (a pair header as ``bravo.hdr``)."""
    paths = {}
    for i, name in enumerate(names):
        folder = root / "train" / f"p{i:02d}"
        folder.mkdir(parents=True)
        paths[name] = folder / f"bravo{_suffix(name)}"
        shutil.copyfile(NIBABEL / name, paths[name])
    return paths


def test_check_gives_each_file_one_true_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = _dataset_of(tmp_path / "data", sorted(VERDICTS))
    assert data_main(["check", str(tmp_path / "data"), "--keys", "bravo", "--workers", "0"]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and err == ""
    lines = out.strip().splitlines()
    assert lines[-1].startswith(f"FAILED: checked {len(VERDICTS)} patient(s)")
    assert all(line.startswith(("ERROR ", "WARNING ")) for line in lines[:-1]), out
    for name, path in paths.items():
        verdict, detail = VERDICTS[name]
        errors = [line for line in lines if line.startswith("ERROR ") and f"/{path.parent.name}/" in line]
        if verdict == "read":
            assert errors == [], errors
        elif _suffix(name) == ".hdr":  # the layout reads single files: the pair is named, not read
            assert errors == [f"ERROR {path.with_suffix('.nii.gz')}: missing modality 'bravo' (no bravo.nii.gz or "
                              "bravo.nii): bravo.hdr is an Analyze/NIfTI .hdr/.img pair, which is not read; "
                              "convert it to bravo.nii.gz"]
        else:
            assert errors == [f"ERROR {path}: {errors[0].split(': ', 1)[1]}"] and detail in errors[0], errors


@pytest.mark.parametrize("name", SINGLE_FILES)
def test_nnunet_import_takes_or_refuses_each_file_for_the_same_reason(name: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    suffix = _suffix(name)
    for sub, stem in (("imagesTr", "case_0000"), ("labelsTr", "case")):
        (src / sub).mkdir(parents=True)
        shutil.copyfile(NIBABEL / name, src / sub / f"{stem}{suffix}")
    verdict, detail = VERDICTS[name]
    if verdict == "refused":
        with pytest.raises(ImportFormatError) as info:
            import_nnunet(src, tmp_path / "dst", mapping={"0000": "bravo"})
        message = str(info.value)
        assert message.startswith(f"case case: {src / 'imagesTr'}") and detail in message and "\n" not in message
        return
    # read and values: imported as it reads (NaN voxels too: medgen-data check refuses them afterwards)
    assert import_nnunet(src, tmp_path / "dst", mapping={"0000": "bravo"}) == 1
    imported, _ = load_volume(modality_path(tmp_path / "dst" / "train" / "case", "bravo"))
    np.testing.assert_array_equal(imported, load_volume(NIBABEL / name)[0])


def _pair_with_voxels(tmp_path: Path, header: str, dtype: str) -> tuple[Path, np.ndarray]:
    """A corpus pair header beside an ``.img`` of distinct values, as the header describes them."""
    hdr = tmp_path / Path(header).name
    shutil.copyfile(NIBABEL / header, hdr)
    shape = nib.load(hdr).shape
    values = (np.arange(int(np.prod(shape))) % 251).astype(dtype)
    hdr.with_suffix(".img").write_bytes(values.reshape(shape, order="F").tobytes(order="F"))
    return hdr, values


def test_a_pair_with_its_img_is_read_and_a_trailing_singleton_dropped_with_a_note(tmp_path: Path) -> None:
    hdr, values = _pair_with_voxels(tmp_path, "tests/data/analyze.hdr", ">u1")  # dim (91, 109, 91, 1)
    data, _, note = read_volume(hdr)
    scaled = np.asarray(nib.as_closest_canonical(nib.load(hdr)).dataobj, dtype=np.float32)  # SPM's scale factor
    assert data.shape == (91, 109, 91) and np.array_equal(data, scaled[..., 0]) and np.unique(data).size == 251
    assert note == "shape (91, 109, 91, 1) has 1 trailing singleton dimension(s): read as the 3D volume (91, 109, 91)"
    hdr, values = _pair_with_voxels(tmp_path, "tests/data/nifti1.hdr", "<i2")  # dim (91, 109, 91)
    read = PatientReader().read(hdr)
    assert read.problem is None and read.note is None and read.data.shape == (91, 109, 91)
    assert np.array_equal(np.sort(read.data.ravel()), np.sort(values.astype(np.float32)))


@pytest.mark.parametrize(("shape", "words"), [
    ((6, 5, 4, 1), "WARNING {path}: shape (6, 5, 4, 1) has 1 trailing singleton dimension(s): read as the 3D volume"),
    ((6, 5, 4, 1, 1), "WARNING {path}: shape (6, 5, 4, 1, 1) has 2 trailing singleton dimension(s)"),
    ((6, 5, 1, 3), "ERROR {path}: volume has shape (6, 5, 1, 3): 3 volumes in one file"),
    ((6, 5, 4), None),
])
def test_check_squeezes_trailing_singletons_with_a_warning(shape, words, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "data" / "train" / "p0" / "bravo.nii.gz"
    path.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.arange(np.prod(shape), dtype=np.float32).reshape(shape), np.eye(4)), str(path))
    code = data_main(["check", str(tmp_path / "data"), "--keys", "bravo", "--workers", "0"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == (1 if words and words.startswith("ERROR") else 0)
    if words is None:
        assert len(lines) == 1 and lines[0].startswith("OK: checked 1 patient(s)"), lines
    else:
        assert len(lines) == 2 and lines[0].startswith(words.format(path=path)), lines


def test_a_3d_nifti2_is_read(tmp_path: Path) -> None:
    source = nib.load(NIBABEL / "tests/data/example_nifti2.nii.gz")
    first = np.asarray(source.dataobj)[..., 0]
    for name in ("one.nii.gz", "one.nii"):
        nib.save(nib.Nifti2Image(first, source.affine), str(tmp_path / name))
        read = PatientReader().read(tmp_path / name)
        assert read.problem is None and read.data.shape == (32, 20, 12)
        np.testing.assert_array_equal(read.data, np.asarray(nib.as_closest_canonical(
            nib.Nifti2Image(first, source.affine)).dataobj, dtype=np.float32))


@pytest.mark.parametrize(("name", "cut", "words"), [
    ("tests/data/anatomical.nii", 30000, "truncated file: its header promises 67650 bytes of voxels, the file holds 29648"),
    ("tests/data/example4d.nii.gz", 200000, "truncated file: its gzip stream ends early"),
    ("tests/data/anatomical.nii", 0, "empty file (0 bytes)"),
    ("tests/data/nifti1.hdr", None, "a NIfTI-1 .hdr header (magic 'ni1') saved as a single file"),
    ("tests/data/analyze.hdr", None, "an Analyze 7.5 header, not a NIfTI file"),
])
def test_damaged_and_misnamed_corpus_files_are_named_by_their_cause(name, cut, words, tmp_path: Path) -> None:
    path = tmp_path / ("bravo.nii.gz" if name.endswith(".gz") else "bravo.nii")
    path.write_bytes((NIBABEL / name).read_bytes()[:cut])
    read = PatientReader().read(path)
    assert read.data is None and read.problem is not None and read.problem.startswith(words), read.problem


@pytest.mark.parametrize(("name", "words"), [
    ("tests/data/row_major.dconn.nii", "a CIFTI-2 file (surface/grayordinate data, intent ConnDense), not a volume"),
    ("tests/data/nifti2.hdr", "a NIfTI-2 .hdr header (magic 'ni2') saved as a single file: its voxels are in a "
                              "separate .img file; convert the pair to one .nii.gz"),
    ("tests/data/anatomical.nii", None),
])
def test_gzipping_a_corpus_file_keeps_its_verdict(name, words, tmp_path: Path) -> None:
    """A gzipped single file takes the in-memory path of :func:`open_image`, not ``nib.load``."""
    path = tmp_path / "bravo.nii.gz"
    path.write_bytes(gzip.compress((NIBABEL / name).read_bytes()))
    read = PatientReader().read(path)
    assert read.problem == words
    if words is None:
        np.testing.assert_array_equal(read.data, load_volume(NIBABEL / name)[0])
