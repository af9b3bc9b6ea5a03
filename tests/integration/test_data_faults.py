"""Bad data, one case each: what ``medgen-data check`` refuses, training refuses too, with the same
words, the file named, one clear message and no traceback; imports that cannot corrupt their
destination. Real ``medgen-data`` / ``medgen-train`` processes where the case is about a command."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from datagen import write_dataset
from medgen.core.fs import HOST, FolderLock
from medgen.data import slices
from medgen.data.nifti_dataset import DataError, load_volume, modality_path
from medgen.data.loading import build_data
from medgen.data.slices import SliceSpec, fingerprint, open_or_build_cache, source_files
from medgen.data.splits import split_folder_problem
from medgen.data.validate import check_patient, read_patient
from medgen.diffusion.config import load_config
from medgen.diffusion.modes import MODES
from medgen.scripts.data import main as data_main

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
KEYS = ("bravo", "seg")
#: the tiny training run of the issue ("$P"), one step
P = ["model.image_size=32", "model.channels=[32,64,64]", "model.num_head_channels=32", "training=cpu",
     "training.batch_size=4", "training.max_steps=1", "mode=bravo", "strategy=rflow"]


def _build_data(cfg, **kwargs):
    """``build_data`` as the trainer calls it: with the slice selection of the config's mode class."""
    return build_data(cfg, selection=MODES[cfg.mode.name].slice_selection, **kwargs)


def dataset(root: Path, n: int = 5, splits: tuple[str, ...] = ("train",)) -> list[Path]:
    return write_dataset(root, n_patients=n, shape=(32, 32, 8), splits=splits, keys=KEYS)


def digests(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def medgen_data(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medgen.scripts.data", *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=120)


def medgen_train(tmp_path: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medgen.scripts.train", *P, f"paths.data_dir={data}",
                           f"paths.cache_dir={tmp_path / 'cache'}", f"paths.model_dir={tmp_path / 'runs'}",
                           f"hydra.run.dir={tmp_path / 'run'}", *extra],
                          capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)


def config(tmp_path: Path, data: Path, *extra: str):
    return load_config([*P, f"paths.data_dir={data}", f"paths.cache_dir={tmp_path / 'cache'}", "data.num_workers=0",
                        *extra])


# ------------------------------------------------------------------ 4. an empty val/
def test_empty_val_is_refused_by_check_and_training_with_one_message(tmp_path):
    root = tmp_path / "data"
    dataset(root)
    (root / "val").mkdir()
    before = digests(root)
    message = f"{root / 'val'}: {split_folder_problem(root, 'val')}"
    assert "split folder holds no patient folders" in message and "absent" in message

    check = medgen_data("check", root, "--keys", "bravo,seg", "--workers", "0")
    assert check.returncode == 1 and f"ERROR {message}" in check.stdout.splitlines()

    out = medgen_train(tmp_path, root, "data.num_workers=0")
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("medgen-train:")]
    assert lines == [f"medgen-train: {message}"]
    assert not list(tmp_path.rglob("best.pt")) and not (tmp_path / "cache" / "slices").exists()
    assert digests(root) == before


def test_val_without_selected_slices_warns_instead_of_a_silent_nan(tmp_path, caplog):
    root = tmp_path / "data"
    dataset(root, n=4, splits=("train", "train", "train", "val"))
    seg = modality_path(root / "val" / "patient_003", "seg")
    _, affine = load_volume(seg)
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 8), np.uint8), affine), str(seg))  # no lesion: seg mode keeps nothing
    with caplog.at_level(logging.WARNING, logger="medgen"):
        bundle = _build_data(config(tmp_path, root, "mode=seg", "training.batch_size=2"), progress=False)
    assert len(bundle.val_cache) == 0
    warning = next(r.getMessage() for r in caplog.records if "no validation slices" in r.getMessage())
    assert f"0 selected from 1 patient(s) of {root / 'val'} for mode 'seg' (lesion selection)" in warning
    assert "best.pt is not written" in warning


# ------------------------------------------------------------------ 7. what training cannot slice
def test_2d_and_truncated_files_are_refused_naming_the_file_even_without_validation(tmp_path):
    root = tmp_path / "data"
    patients = dataset(root)
    flat = modality_path(patients[0], "bravo")
    data, affine = load_volume(flat)
    nib.save(nib.Nifti1Image(data[..., 4], affine), str(flat))  # a 2D image: used to pass check, then crash MONAI
    truncated = modality_path(patients[1], "seg")
    truncated.write_bytes(truncated.read_bytes()[:200])
    before = digests(root)

    check = medgen_data("check", root, "--workers", "0")
    assert check.returncode == 1 and "Traceback" not in check.stdout + check.stderr
    assert f"ERROR {flat}: volume is 2D (32, 32); expected a 3D volume [x, y, slices]" in check.stdout
    assert f"ERROR {truncated}: truncated file: its gzip stream ends early" in check.stdout

    out = medgen_train(tmp_path, root, "data.validate=false")  # the check's extras off; usability still checked
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "monai" not in out.stderr.lower()
    assert f"ERROR {flat}: volume is 2D (32, 32)" in out.stderr
    assert f"ERROR {truncated}: truncated file" in out.stderr
    assert len(out.stderr.strip().splitlines()) < 10
    assert digests(root) == before and not list(tmp_path.rglob("best.pt"))


@pytest.mark.parametrize(("data", "words"), [
    (np.ones((32, 32, 8, 3), np.float32), "3 volumes in one file"),
    (np.ones((32, 32, 8), np.complex64), "complex numbers"),
    (np.ones((32, 32), np.float32), "volume is 2D"),
])
def test_check_and_training_refuse_volumes_that_cannot_be_sliced(tmp_path, data, words):
    folder = dataset(tmp_path / "data", n=1)[0]
    path = modality_path(folder, "bravo")
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    for problems in (check_patient(folder, KEYS), read_patient(folder, KEYS, validate=False).problems):
        assert any(p.path == str(path) and p.severity == "error" and words in p.message for p in problems), problems


def test_an_error_while_preprocessing_names_the_patient_and_the_file(tmp_path, monkeypatch):
    patients = dataset(tmp_path / "data", n=2)

    def broken(volume, *args, **kwargs):
        raise RuntimeError("applying transform <SpatialPad>")

    monkeypatch.setattr(slices, "preprocess_image", broken)
    spec = SliceSpec(keys=KEYS, image_size=32, selection="brain")
    with pytest.raises(DataError) as info:
        open_or_build_cache(patients, spec, tmp_path / "cache", progress=False)
    bravo = modality_path(patients[0], "bravo")
    assert (f"ERROR {bravo}: patient patient_000: cannot preprocess for training "
            "(RuntimeError: applying transform <SpatialPad>)") in str(info.value)
    assert str(modality_path(patients[1], "bravo")) in str(info.value)


# ------------------------------------------------------------------ 9. .nii, a file for a folder, imports
def test_uncompressed_nii_is_read_and_fingerprinted(tmp_path):
    root = tmp_path / "data"
    patients = dataset(root)
    gz = modality_path(patients[0], "bravo")
    plain = gz.with_name("bravo.nii")
    nib.save(nib.load(str(gz)), str(plain))
    gz.unlink()

    check = medgen_data("check", root, "--workers", "0")
    assert check.returncode == 0, check.stdout
    assert "missing modality" not in check.stdout and "stray" not in check.stdout

    spec = SliceSpec(keys=KEYS, image_size=32, selection="brain")
    assert modality_path(patients[0], "bravo") == plain and plain in source_files(patients, KEYS)
    cache = open_or_build_cache(patients, spec, tmp_path / "cache", progress=False)
    assert 0 in set(cache.patient_index.tolist())
    old = fingerprint(patients, spec)
    os.utime(plain, ns=(plain.stat().st_atime_ns, plain.stat().st_mtime_ns + 10**9))
    assert fingerprint(patients, spec) != old  # the cache follows the file actually read

    nib.save(nib.load(str(plain)), str(gz))  # both: which one is meant?
    problems = check_patient(patients[0], KEYS)
    assert [(p.path, p.message) for p in problems] == [
        (str(patients[0]), "modality 'bravo' is there twice (bravo.nii.gz, bravo.nii); keep one")]


def test_a_file_given_as_the_data_folder_is_called_a_file(tmp_path, capsys):
    data = tmp_path / "data.nii.gz"
    data.write_bytes(b"not a folder")
    check = medgen_data("check", data)
    assert check.returncode == 1 and "Traceback" not in check.stderr
    assert f"ERROR {data}: is a file, not a dataset folder" in check.stdout and "does not exist" not in check.stdout

    assert data_main(["preview", str(data), "--out", str(tmp_path / "p.png")]) == 1
    assert f"medgen-data preview: {data}: is a file, not a dataset folder" in capsys.readouterr().err

    with pytest.raises(DataError, match=f"paths.data_dir {data} is a file, not a data folder; set paths.data_dir"):
        _build_data(config(tmp_path, data), progress=False)
    assert data.read_bytes() == b"not a folder"


def _nnunet_source(src: Path) -> None:
    rng = np.random.default_rng(0)
    for case in ("case_a", "case_b"):
        for folder, name, volume in (("imagesTr", f"{case}_0000.nii.gz", rng.uniform(0, 1, (8, 8, 4))),
                                     ("labelsTr", f"{case}.nii.gz", rng.uniform(0, 1, (8, 8, 4)) > 0.8)):
            (src / folder).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(volume.astype(np.float32), np.eye(4)), str(src / folder / name))


def test_an_import_locks_its_destination_and_removes_dead_imports_leftovers(tmp_path):
    src, dst = tmp_path / "nnunet", tmp_path / "dst"
    _nnunet_source(src)
    dst.mkdir()
    (dst / "README.txt").write_text("mine")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    leftover = dst / f".medgen-import.tmp-{HOST}-{gone.pid}-0a0b0c"
    (leftover / "train" / "case_a").mkdir(parents=True)
    command = ["import", "--format", "nnunet", src, dst, "--map", "0=bravo"]

    with FolderLock(dst, "import destination"):  # another import is writing into dst
        busy = medgen_data(*command)
    assert busy.returncode == 1 and "Traceback" not in busy.stderr
    assert busy.stderr.strip() == next(line for line in busy.stderr.splitlines() if line.strip())  # one line
    assert busy.stderr.startswith(f"medgen-data import: import destination {dst} is in use by process {os.getpid()} ")
    assert sorted(p.name for p in dst.iterdir() if p.name != ".medgen.lock") == [leftover.name, "README.txt"]

    done = medgen_data(*command)
    assert done.returncode == 0, done.stderr
    assert f"imported 2 patients into {dst}" in done.stdout
    assert f"WARNING removed {leftover}, left by an interrupted run" in done.stderr
    assert not leftover.exists() and (dst / "README.txt").read_text() == "mine"
    assert sorted(p.name for p in (dst / "train").iterdir()) == ["case_a", "case_b"]
    assert not list(dst.glob(".medgen-import*"))


def test_a_patient_without_seg_is_skipped_with_a_one_line_warning(tmp_path):
    src = tmp_path / "bms"
    for pid, folders in (("Mets_001", ("0", "seg")), ("Mets_002", ("0",))):
        for folder in folders:
            (src / pid / folder).mkdir(parents=True)
            for k in range(3):
                Image.fromarray(np.full((6, 5), 40 * k, np.uint8), mode="L").save(src / pid / folder / f"{k}.png")
    out = medgen_data("import", "--format", "brainmetshare-png", src, tmp_path / "dst", "--map", "0=bravo")
    assert out.returncode == 0, out.stderr
    warning = [line for line in out.stderr.splitlines() if "Mets_002" in line]
    assert warning == ["WARNING skipped 1 patient(s) without a seg/ folder (unusable for training): Mets_002"]
    assert "warn(" not in out.stderr and ".py" not in out.stderr and "Traceback" not in out.stderr
