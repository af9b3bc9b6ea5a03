"""nnU-Net v2 as the downstream segmenter (``segmenter=nnunet``): the field's usual network in place
of medgen's small DynUNet, scored by the same code.

nnU-Net runs from an environment of its own (``nnunet.python``: ``make nnunet-venv`` builds
``.nnunet-venv``; a cluster points it at its own env), one subprocess per training set and seed
running :mod:`medgen.evaluation.nnunet_driver`. Under ``<out_dir>/nnunet/``: ``nnUNet_raw/`` (each
training set in nnU-Net's raw format, slices as ``[S, S, 1]`` cases of the ``2d`` configuration,
volumes whole for ``3d_fullres``), ``nnUNet_preprocessed/``, ``nnUNet_results/seed<k>/``,
``test_images/`` (the real test split, one case per item), ``predictions/<set>_seed<k>/`` and
``logs/<set>_seed<k>.log`` (nnU-Net's output). The predictions are read back as arrays in the test
split's order for :func:`medgen.evaluation.downstream.downstream` to score.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from medgen.core.constants import NIFTI_SUFFIX
from medgen.core.paths import resolve_path
from medgen.data.nifti_dataset import save_volume
from medgen.data.space import SampleSpace
from medgen.evaluation import EvaluationError
from medgen.evaluation.downstream import ItemSet
from medgen.evaluation.requests import NnunetRequest
from medgen.generation.writer import nnunet_dataset_json, slice_affine

log = logging.getLogger("medgen.evaluate")

DRIVER = Path(__file__).with_name("nnunet_driver.py")
#: nnU-Net's dataset id of each downstream training set (each evaluation has nnU-Net folders of its own)
DATASETS = {"real": (1, "real"), "real+synthetic": (2, "real_synthetic"), "synthetic": (3, "synthetic")}
TRAINER = "nnUNetTrainer_medgen"
VERSION = "import importlib.metadata as m; print(m.version('nnunetv2'))"
HOW = ("run `make nnunet-venv` in the medgen checkout (it builds .nnunet-venv), or set "
       "nnunet.python=<an nnU-Net v2 environment>/bin/python (or MEDGEN_NNUNET_PYTHON)")


def default_pythons() -> list[Path]:
    """Where ``make nnunet-venv`` puts nnU-Net's interpreter: the working folder's ``.nnunet-venv``,
    then the medgen checkout's."""
    import medgen

    return [Path.cwd() / ".nnunet-venv" / "bin" / "python",
            Path(medgen.__file__).resolve().parents[2] / ".nnunet-venv" / "bin" / "python"]


def find_python(setting: str | None) -> Path:
    """The interpreter of nnU-Net's environment: ``setting`` (``nnunet.python``), else
    ``.nnunet-venv/bin/python`` in the working folder or in the medgen checkout; an
    :class:`~medgen.evaluation.EvaluationError` saying how to make one when there is none."""
    if setting:
        python = resolve_path(setting)
        if not python.is_file():
            raise EvaluationError(f"nnunet.python={setting}: {python} does not exist; {HOW}")
        return python
    candidates = default_pythons()
    for python in candidates:
        if python.is_file():
            return python
    raise EvaluationError(f"segmenter=nnunet runs nnU-Net v2 from its own environment and none was found "
                          f"({', '.join(str(p) for p in dict.fromkeys(candidates))}): {HOW}")


def _env(root: Path, seed: int | None = None) -> dict[str, str]:
    """nnU-Net's folders under ``root``, and no trace of medgen's environment."""
    env = {**os.environ, "nnUNet_raw": str(root / "nnUNet_raw"), "nnUNet_preprocessed": str(root / "nnUNet_preprocessed"),
           "nnUNet_results": str(root / "nnUNet_results" / f"seed{seed if seed is not None else 0}")}
    env.pop("PYTHONPATH", None)
    return env


def nnunet_version(python: Path, root: Path) -> str:
    """The nnunetv2 version installed for ``python``; an error naming the interpreter when it has none."""
    try:
        run = subprocess.run([str(python), "-c", VERSION], capture_output=True, text=True, timeout=120, env=_env(root))
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EvaluationError(f"nnunet.python={python} does not run ({exc}); {HOW}") from None
    if run.returncode != 0:
        last = (run.stderr.strip().splitlines() or ["no output"])[-1]
        raise EvaluationError(f"nnunet.python={python} has no nnU-Net v2 ({last}); {HOW}")
    return run.stdout.strip()


def _write_case(folder: Path, case: str, images: np.ndarray, mask: np.ndarray | None, space: SampleSpace) -> None:
    """One case: ``<case>_<c>.nii.gz`` per channel of ``images [C, ...]`` (a slice as ``[S, S, 1]``)
    and, with ``mask``, ``labels/<case>.nii.gz`` beside ``folder``."""
    affine = slice_affine(space.spacing if space.spacing is not None else (1.0, 1.0, 1.0))
    shaped = (lambda a: a) if space.volumetric else (lambda a: a[..., None])
    for c, image in enumerate(images):
        save_volume(folder / f"{case}_{c:04d}{NIFTI_SUFFIX}", shaped(image), affine)
    if mask is not None:
        save_volume(folder.parent / "labelsTr" / f"{case}{NIFTI_SUFFIX}", shaped(mask), affine, is_mask=True)


def export_training_set(raw: Path, name: str, data: ItemSet, image_keys: list[str], space: SampleSpace) -> Path:
    """Training set ``name`` (one of :data:`DATASETS`) in nnU-Net v2's raw format under ``raw``:
    ``Dataset<id>_<name>/imagesTr``, ``labelsTr`` and ``dataset.json``, one case per item."""
    dataset_id, slug = DATASETS[name]
    root = raw / f"Dataset{dataset_id:03d}_{slug}"
    if root.exists():
        shutil.rmtree(root)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(len(data)):
        _write_case(root / "imagesTr", f"case_{i:05d}", data.images[i], data.masks[i], space)
    description = f"the {name} training set of a medgen-evaluate downstream experiment ({space.unit}s)"
    (root / "dataset.json").write_text(json.dumps(nnunet_dataset_json(image_keys, len(data), slug, description),
                                                  indent=2))
    return root


def read_predictions(folder: Path, count: int, space: SampleSpace) -> np.ndarray:
    """The ``count`` predictions ``test_<i>.nii.gz`` of ``folder`` as ``[N, S, S]`` (``[N, X, Y, Z]``) uint8."""
    out = []
    for i in range(count):
        path = folder / f"test_{i:05d}{NIFTI_SUFFIX}"
        if not path.is_file():
            raise EvaluationError(f"nnU-Net wrote no prediction {path}")
        array = np.asarray(nib.load(str(path)).dataobj)
        out.append(array if space.volumetric else array[..., 0])
    pred = (np.stack(out) > 0).astype(np.uint8)
    if pred.shape[1:] != tuple(space.shape):
        raise EvaluationError(f"nnU-Net's predictions in {folder} have shape {pred.shape[1:]}, not {tuple(space.shape)}")
    return pred


def _tail(path: Path, lines: int = 1) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.is_file() else []
    return " | ".join(line.strip() for line in text[-lines:]) or "no output"


class NnunetSegmenter:
    """The downstream experiment's segmenter backend (:data:`~medgen.evaluation.downstream.Segment`):
    ``segmenter(name, data, seed, images)`` trains nnU-Net on ``data`` with the epoch budget of
    ``request`` and returns its binary predictions of ``images``."""

    def __init__(self, request: NnunetRequest, root: Path, space: SampleSpace, image_keys: list[str], device: str):
        self.request, self.root, self.space, self.image_keys = request, Path(root), space, list(image_keys)
        self.device = "cuda" if device == "cuda" else "cpu"
        self.python = find_python(request.python)
        if self.root.exists():  # a fresh experiment: nothing of an earlier evaluation into this folder is reused
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True)
        self.version = nnunet_version(self.python, self.root)
        self.configuration = space.either("2d", "3d_fullres")
        self._exported: set[str] = set()
        self._test: np.ndarray | None = None
        log.info("downstream segmenter: nnU-Net %s (%s, %d epochs of %d iterations, %s) from %s", self.version,
                 self.configuration, request.epochs, request.iterations_per_epoch, self.device, self.python)

    def record(self) -> dict:
        """What ``metrics.json`` records as ``downstream.segmenter``."""
        return {"name": "nnunet", "version": self.version, "configuration": self.configuration, "trainer": TRAINER,
                "fold": "all", "device": self.device, "python": str(self.python), "folder": str(self.root)}

    def budget(self) -> dict:
        """What ``metrics.json`` records as ``downstream.budget``: the epochs and the training steps they make."""
        r = self.request
        return {"epochs": r.epochs, "iterations_per_epoch": r.iterations_per_epoch,
                "steps": r.epochs * r.iterations_per_epoch}

    def _test_folder(self, images: np.ndarray) -> Path:
        folder = self.root / "test_images"
        if self._test is None or self._test.shape != images.shape or not np.array_equal(self._test, images):
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            for i, item in enumerate(images):
                _write_case(folder, f"test_{i:05d}", item, None, self.space)
            self._test = images
        return folder

    def __call__(self, name: str, data: ItemSet, seed: int, images: np.ndarray) -> np.ndarray:
        if name not in self._exported:
            export_training_set(self.root / "nnUNet_raw", name, data, self.image_keys, self.space)
            self._exported.add(name)
        slug = f"{DATASETS[name][1]}_seed{seed}"
        predictions, log_file, job_file = (self.root / "predictions" / slug, self.root / "logs" / f"{slug}.log",
                                           self.root / "jobs" / f"{slug}.json")
        job = {"dataset_id": DATASETS[name][0], "configuration": self.configuration, "epochs": self.request.epochs,
               "iterations": self.request.iterations_per_epoch, "seed": seed, "device": self.device,
               "test_images": str(self._test_folder(images)), "predictions": str(predictions)}
        for folder in (log_file.parent, job_file.parent):
            folder.mkdir(parents=True, exist_ok=True)
        job_file.write_text(json.dumps(job, indent=1))
        log.info("nnU-Net: training on the %s set (%d %ss), seed %d; log %s", name, len(data), self.space.unit,
                 seed, log_file)
        t0 = time.perf_counter()
        with open(log_file, "w") as out:
            rc = subprocess.run([str(self.python), str(DRIVER), str(job_file)], stdout=out, stderr=subprocess.STDOUT,
                                env=_env(self.root, seed), cwd=self.root).returncode
        if rc != 0:
            raise EvaluationError(f"nnU-Net failed training on the {name} set, seed {seed} (exit code {rc}): "
                                  f"{_tail(log_file)} (whole log: {log_file})")
        log.info("nnU-Net: %s seed %d done in %.0f s", name, seed, time.perf_counter() - t0)
        return read_predictions(predictions, len(images), self.space)


def segmenter_text(downstream_result: dict, space: SampleSpace) -> str:
    """The sentence of the report that says which network the downstream experiment trained."""
    seg, budget = downstream_result.get("segmenter", {"name": "dynunet"}), downstream_result["budget"]
    if seg["name"] == "nnunet":
        return (f"nnU-Net {seg['version']} ({seg['configuration']}, fold all, {budget['epochs']} epochs of "
                f"{budget['iterations_per_epoch']} iterations) trained on each set per seed. ")
    return space.either("medgen's 2D DynUNet trained on each set per seed. ",
                        "medgen's 3D DynUNet trained on whole volumes of each set per seed. ")
