"""nnU-Net v2's own dataset check on medgen-generate's ``format=nnunet`` export of volumes (slow).

nnU-Net runs in a side environment (``make nnunet-venv``: ``.nnunet-venv``, pinned in
tests/nnunet-requirements.txt; ``MEDGEN_NNUNET_PYTHON`` names another interpreter), so its
dependencies never touch medgen's. ``make test-slow`` builds it first; without it the test is
skipped with the command that builds it.
"""

from __future__ import annotations

import os
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
