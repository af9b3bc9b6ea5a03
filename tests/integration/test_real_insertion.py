"""Insertion into real heads no one here made (docs/insertion_real.png, benchmarks/insert_figure.py):
3D Slicer's MRHead (healthy) and MRBrainTumor2 (a patient), which ``make real-scans`` extracts into
``.real-scans/``, and nilearn's MNI152 T1 template, each written as a medgen dataset with an all-zero
``seg`` (these heads come without lesion labels), in ``test/`` (read as it is; ``train/`` without
``val/`` would lose the heads medgen's patient-level split sends to validation).

Painters trained a few steps on phantoms at 64 px (a seg model for the new lesions' shapes,
``insert.shapes=seg``, since heads without lesions have none to take; a bravo model for
``insert.painter=repaint``; a ``mode=inpaint`` model too where medgen has that mode) paint one new
lesion into 2D axial slices of each head, with ``insert.brain_method=deepbet``. Checked against what
is computed here independently of the run: the slice the manifest names is that head's slice
(preprocessed from the file), every new lesion and its region lie in deepbet's brain of the whole
head, the painted slice equals the source outside the region and differs inside it. A copy painter
on heads without lesions is refused in one line naming ``insert.into``.

About 3-4 minutes on 2 cores (deepbet ~20 s per head).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medgen.data.brain import brain_of
from medgen.data.brain_deepbet import deepbet_available
from medgen.data.nifti_dataset import DataError
from medgen.data.transforms import preprocess_image, preprocess_mask
from medgen.diffusion.modes import MODES

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
SCANS = ROOT / ".real-scans"
#: training steps of each painter on phantoms: enough to paint, not to paint well (the test checks
#: where the painter may change a scan, not how good its lesions look)
STEPS = 12
PAINTERS = ("repaint", "inpaint") if "inpaint" in MODES else ("repaint",)
PER_HEAD = 2


def _figure():
    spec = importlib.util.spec_from_file_location("insert_figure", ROOT / "benchmarks" / "insert_figure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    for name in ("MRHead", "MRBrainTumor2"):
        if not (SCANS / f"{name}.nii.gz").exists():
            pytest.skip(f"{SCANS / name}.nii.gz is missing: make real-scans")
    if not deepbet_available():
        pytest.skip("insert.brain_method=deepbet: its package is not installed (pip install -e '.[bet]')")
    figure = _figure()
    root = tmp_path_factory.mktemp("real_insertion")
    extra = {"inpaint": "rflow"} if "inpaint" in PAINTERS else {}
    checkpoints = figure.train_painters(root, STEPS, modes={**figure.MODELS, **extra})
    return figure, root, checkpoints


def _head(name: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The head as the cache reads it: RAS, float32, its voxel size."""
    if name == "MNI152":
        from nilearn import datasets

        image = datasets.load_mni152_template(resolution=1)
    else:
        image = nib.load(str(SCANS / f"{name}.nii.gz"))
    image = nib.as_closest_canonical(image)
    return image.get_fdata(dtype=np.float32), tuple(float(z) for z in image.header.get_zooms()[:3])


#: every head with the default painter (repaint); the inpaint painter on the patient's head
CASES = [(name, "repaint") for name in ("MRHead", "MRBrainTumor2", "MNI152")] + \
    [("MRBrainTumor2", painter) for painter in PAINTERS if painter != "repaint"]


@pytest.mark.parametrize("name, painter", CASES)
def test_new_lesions_painted_into_a_real_head_stay_in_its_brain_and_leave_the_rest(work, name, painter):
    figure, root, checkpoints = work
    dataset = root / "heads" / name
    if not dataset.exists():
        figure.heads_dataset(SCANS, dataset, (name,))
    out = root / f"out_{painter}_{name}"
    result = figure.insert(dataset, checkpoints, out, root / "cache", painter=painter, num_images=PER_HEAD, steps=4)
    assert result.status == "done"
    volume, spacing = _head(name)
    size = figure.IMAGE_SIZE
    image = preprocess_image(volume, size)  # [S, S, D]: the slices the manifest's source names
    brain = preprocess_mask(brain_of(volume, "deepbet", spacing).astype(np.float32), size) > 0
    rows = figure.manifest(out)
    assert len(rows) == PER_HEAD
    for row in rows:
        assert row["source"].startswith(f"{figure.SPLIT}/{name}/z") and row["painter"] == painter, row
        z = int(row["source"].rsplit("/z", 1)[1])
        s = figure.read_sample(out / "train" / row["id"])
        np.testing.assert_allclose(s["source_bravo"], image[..., z], atol=2e-3)  # the named head and slice
        assert not s["source_seg"].any()  # the head had no lesion
        new, region = s["seg"] > 0, s["region"] > 0
        assert new.any() and int(row["new_lesions"]) == 1
        assert (new & ~region).sum() == 0
        assert (region & ~brain[..., z]).sum() == 0, f"{row['id']}: region outside deepbet's brain of {name}"
        assert np.array_equal(s["bravo"][~region], s["source_bravo"][~region])  # exactly the scan outside
        assert np.abs(s["bravo"][region] - s["source_bravo"][region]).max() > 0.02  # painted inside
        assert float(row["inside_brain"]) == 1.0


def test_heads_without_lesions_have_no_shapes_to_copy_or_repaint(work, tmp_path):
    """``insert.shapes=real`` takes shapes from the heads' own lesions: without any, the copy painter
    (through ``medgen-generate``, as a user runs it) and the repaint painter are refused in one line
    naming ``insert.into`` and what to do."""
    figure, root, checkpoints = work
    dataset = figure.heads_dataset(SCANS, tmp_path / "heads", ("MRHead",))
    done = subprocess.run([sys.executable, "-m", "medgen.scripts.generate", f"insert.into={dataset}",
                           f"insert.split={figure.SPLIT}", "insert.painter=copy", "insert.image_size=64",
                           f"out_dir={tmp_path / 'copy'}", f"cache_dir={tmp_path / 'cache'}", "num_images=2"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[-1].endswith(f"insert.into={dataset}: no lesion in {figure.SPLIT}/ to take shapes from "
                              "(insert.painter=copy moves real lesions; insert.shapes_from=<an annotated medgen "
                              "dataset> takes them from another set)"), done.stderr[-3000:]
    from medgen.generation import generate

    with pytest.raises(DataError, match=r"insert.into=.*: no lesion in test/ to take shapes from \(insert.shapes_from"
                                        r"=<an annotated medgen dataset> takes them from another set, "
                                        r"insert.shapes=seg from a seg_checkpoint\)"):
        generate(progress=False, out_dir=str(tmp_path / "repaint"), num_images=1, precision="fp32",
                 cache_dir=str(tmp_path / "cache"), image_checkpoint=str(checkpoints["bravo"]),
                 insert={"into": str(dataset), "split": figure.SPLIT, "painter": "repaint"})
