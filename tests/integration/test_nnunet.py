"""nnU-Net v2 itself (slow): its own dataset check on medgen-generate's ``format=nnunet`` export of
volumes, and ``medgen-evaluate segmenter=nnunet`` (nnU-Net as the downstream segmenter) on tiny slices.

nnU-Net runs in a side environment (``make nnunet-venv``: ``.nnunet-venv``, pinned in
tests/nnunet-requirements.txt; ``MEDGEN_NNUNET_PYTHON`` names another interpreter), so its
dependencies never touch medgen's. ``make test-slow`` builds it first; without it the test is
skipped with the command that builds it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
ROOT = Path(__file__).resolve().parents[2]
VERIFY = "import sys; from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity; " \
         "verify_dataset_integrity(sys.argv[1], 1)"


def _nnunet_python() -> str:
    python = os.environ.get("MEDGEN_NNUNET_PYTHON") or str(ROOT / ".nnunet-venv" / "bin" / "python")
    if not Path(python).is_file():
        pytest.skip(f"nnU-Net v2 is not installed beside medgen ({python}): make nnunet-venv")
    return python


def _verify(python: str, folder: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "nnUNet_raw": str(folder.parent), "nnUNet_preprocessed": str(folder.parent / "pre"),
           "nnUNet_results": str(folder.parent / "results"), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("PYTHONPATH", None)
    return subprocess.run([python, "-c", VERIFY, str(folder)], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.timeout(900)
def test_the_nnunet_export_of_volumes_passes_nnunets_dataset_check(tmp_path, volume_checkpoints):
    python = _nnunet_python()
    ckpts = volume_checkpoints
    out = tmp_path / "synthetic"
    run = subprocess.run([sys.executable, "-m", "medgen.scripts.generate", f"seg_checkpoint={ckpts['seg']}",
                          f"image_checkpoint={ckpts['bravo']}", f"out_dir={out}", "num_images=3", "steps=3",
                          "gate.enabled=false", "format=nnunet", "precision=fp32"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 0, run.stderr[-3000:]
    (dataset,) = (out / "nnUNet_raw").iterdir()
    labels = sorted((dataset / "labelsTr").glob("*.nii.gz"))
    assert len(labels) == 3 and nib.load(labels[0]).shape == (16, 16, 8)

    checked = _verify(python, dataset)
    assert checked.returncode == 0, checked.stdout[-2000:] + checked.stderr[-3000:]
    assert "verify_dataset_integrity Done" in checked.stdout

    # the check can fail: a label value nnU-Net was not told about is refused
    bad = nib.load(labels[0])
    data = np.asarray(bad.dataobj).copy()
    data[0, 0, 0] = 2
    nib.save(nib.Nifti1Image(data, bad.affine, bad.header), labels[0])
    refused = _verify(python, dataset)
    assert refused.returncode != 0 and "unexpected" in (refused.stdout + refused.stderr).lower()


def _synthetic_slices(real: Path, out: Path, cache: Path) -> Path:
    """A medgen set of the real train lesion slices (2D samples), as medgen-generate writes them."""
    from medgen.data.slices import SliceSpec, open_or_build_cache
    from medgen.data.splits import split_patients
    from medgen.generation.writer import write_sample

    spec = SliceSpec(keys=("bravo", "seg"), image_size=32, selection="lesion")
    data = np.asarray(open_or_build_cache(split_patients(real, "train"), spec, cache, progress=False).data, np.float32)
    for i in range(len(data)):
        write_sample(out / "train" / f"syn_{i:04d}", {"bravo": data[i, 0], "seg": data[i, 1]}, (1.0, 1.0, 2.0))
    return out


def _evaluate(tmp_path: Path, name: str, *overrides: str) -> dict:
    out = tmp_path / name
    run = subprocess.run([sys.executable, "-m", "medgen.scripts.evaluate", f"real_dir={tmp_path / 'real'}",
                          f"synthetic_dir={tmp_path / 'synthetic'}", f"out_dir={out}", f"cache_dir={tmp_path / 'cache'}",
                          "seeds=[0]", "num_workers=0", "budget.steps=5", "budget.batch_size=4", "lesions.resamples=10",
                          "features.network=radimagenet", f"features.weights_path={tmp_path / 'none.pth'}",
                          *overrides], capture_output=True, text=True, timeout=400,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "nnUNet_n_proc_DA": "0"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


def _keys(node, depth: int = 0) -> set[str]:
    """The dotted keys of a nested dict, lists by their first element (the tables' shape, not their numbers)."""
    if isinstance(node, list):
        return _keys(node[0], depth) if node else set()
    if not isinstance(node, dict):
        return set()
    return {k for k in node} | {f"{k}.{sub}" for k, v in node.items() for sub in _keys(v, depth + 1)}


@pytest.mark.timeout(600)
def test_nnunet_as_the_downstream_segmenter_fills_the_same_tables(tmp_path):
    """segmenter=nnunet on tiny slices (one epoch of a few iterations, the CPU): metrics.json has the
    default segmenter's downstream and lesion-wise tables, nnU-Net's version, and the predictions
    nnU-Net wrote are masks of the test slices' shape."""
    from datagen import write_dataset

    python = _nnunet_python()
    write_dataset(tmp_path / "real", n_patients=8, shape=(32, 32, 6), splits=("train", "train", "test", "val"),
                  keys=("bravo", "seg"))
    _synthetic_slices(tmp_path / "real", tmp_path / "synthetic", tmp_path / "syncache")
    default = _evaluate(tmp_path, "dynunet")
    nnunet = _evaluate(tmp_path, "nnunet", "segmenter=nnunet", f"nnunet.python={python}", "nnunet.epochs=1",
                       "nnunet.iterations_per_epoch=4")

    record = nnunet["downstream"].pop("segmenter")
    assert default["downstream"].pop("segmenter") == {"name": "dynunet"}
    assert record["name"] == "nnunet" and re.fullmatch(r"\d+\.\d+.*", record["version"]) and record["configuration"] == "2d"
    assert nnunet["downstream"].pop("budget") == {"epochs": 1, "iterations_per_epoch": 4, "steps": 4}
    default["downstream"].pop("budget")
    assert _keys(nnunet["downstream"]) == _keys(default["downstream"])
    assert _keys(nnunet["lesions"]) == _keys(default["lesions"])
    for name in ("real", "real+synthetic", "synthetic"):
        assert 0 <= nnunet["downstream"][name]["mean"] <= 1
    # every test slice was segmented by nnU-Net (a [32, 32, 1] case each) and scored
    folder = tmp_path / "nnunet" / "nnunet" / "predictions" / "real_seed0"
    predictions = sorted(folder.glob("test_*.nii.gz"))
    assert len(predictions) == nnunet["lesions"]["test_items"]
    masks = [np.asarray(nib.load(p).dataobj) for p in predictions]
    assert {m.shape for m in masks} == {(32, 32, 1)} and set(np.unique(np.stack(masks))) <= {0, 1}
    assert (tmp_path / "nnunet" / "nnunet" / "logs" / "synthetic_seed0.log").is_file()
    report = (tmp_path / "nnunet" / "report.md").read_text()
    assert "Downstream segmentation" in report
