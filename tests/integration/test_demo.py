"""`make demo` and `make demo-3d`, the README's first commands, end to end with their defaults (about 19
and 14 minutes on 2 cores; `make test-demo`, which CI does not run: it would take CI past 50 minutes)."""

from __future__ import annotations

import csv
import re
import subprocess
import sys

import pytest

from medgen.data.validate import check_dataset

pytestmark = pytest.mark.demo


@pytest.mark.timeout(2400)
def test_demo_runs_the_whole_pipeline_and_its_lesions_sit_on_the_masks(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run([sys.executable, "-m", "medgen.scripts.demo", "--out", str(out)], capture_output=True,
                         text=True, timeout=2300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    total = float(re.search(r"\| total \| ([\d.]+) \|", summary).group(1))
    assert total < 25, summary  # minutes; about 15 on a 2-core machine
    own = float(re.search(r"\| synthetic \| their own \| ([-\d.]+) \|", summary).group(1))
    control = float(re.search(r"\| synthetic \| another sample's \(control\) \| ([-\d.]+) \|", summary).group(1))
    assert own > 0.1 and own > control + 0.1, summary  # a bright lesion at its own mask, not at others'
    assert (out / "contact_sheet.png").is_file()
    # every generated lesion lies in the brain of its own image (measured on the image, not the mask model's brain)
    inside = float(re.search(r"lesion pixels inside the brain of their image: ([\d.]+)% synthetic", summary).group(1))
    assert inside >= 99, summary
    report = check_dataset(out / "synthetic", progress=False)
    assert report.ok and report.patients_checked == 64
    metrics = (out / "evaluation" / "metrics.json").read_text()
    assert '"downstream"' in metrics and (out / "evaluation" / "report.html").is_file()
    assert "downstream Dice, trained on real" in summary
    _insertion_ran(out, summary)


def _insertion_ran(out, summary: str) -> None:
    """The demo's insertion stage: both painters' rows with their classes, the before | after sheet, and
    every inserted sample a valid medgen sample whose scan is unchanged outside its region."""
    for painter in ("repaint", "copy"):
        row = re.search(rf"\| {painter} \| (\d+), (\d+) \| ([\d.]+) \|", summary)
        assert row and int(row.group(1)) + int(row.group(2)) >= 4, summary
        report = check_dataset(out / "inserted" / painter, progress=False)
        assert report.ok, report
    assert (out / "insertion_sheet.png").is_file()


@pytest.mark.timeout(2400)
def test_the_volume_demo_runs_the_3d_pipeline_within_20_minutes(tmp_path):
    """`make demo-3d`: a 3D seg and a 3D bravo model, volumes generated through the gate, evaluated in
    3D, a three-plane contact sheet; lesions inside the brain of their own volumes."""
    import json

    import numpy as np

    from medgen.data.nifti_dataset import load_volume

    out = tmp_path / "demo3d"
    run = subprocess.run([sys.executable, "-m", "medgen.scripts.demo", "--out", str(out), "--3d"],
                         capture_output=True, text=True, timeout=2300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    total = float(re.search(r"\| total \| ([\d.]+) \|", summary).group(1))
    assert total < 20, summary  # minutes on 2 cores
    assert "| train seg |" in summary and "seg and bravo models" in summary
    report = check_dataset(out / "synthetic", progress=False)
    assert report.ok and report.patients_checked == 16  # --pairs: the seg model's masks through the gate
    assert "→ 16 synthetic pairs (volumes)" in summary
    rate = float(re.search(r"quality gate acceptance (\d+)%", summary).group(1))
    assert rate >= 10, summary  # about a third on 2 cores; far fewer would mean masks of specks or empty ones
    rows = list(csv.DictReader(open(out / "synthetic" / "manifest.csv")))
    accepted = [r for r in rows if r["accepted"] == "True"]
    assert len(accepted) == 16 and all(int(r["components"]) >= 1 for r in accepted)
    first = out / "synthetic" / "train" / "syn_000000"
    volume, mask = load_volume(first / "bravo.nii.gz")[0], load_volume(first / "seg.nii.gz")[0]
    assert volume.shape == mask.shape == (32, 32, 16) and mask.max() == 1
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert metrics["unit"] == "volume" and metrics["space"]["shape"] == [32, 32, 16]
    # measured on each image's own brain: 99.6% on 2 cores (real test volumes: 94.7%, large lesions at its edge)
    assert metrics["anatomy"]["inside_brain"]["synthetic"] >= 0.95
    assert (out / "evaluation" / "planes_synthetic.png").is_file()
    from PIL import Image

    sheet = np.asarray(Image.open(out / "contact_sheet.png").convert("RGB"))
    assert (np.all(sheet == (255, 42, 42), axis=-1)).any()  # lesions outlined in the three planes
    own = float(re.search(r"\| synthetic \| their own \| ([-\d.]+) \|", summary).group(1))
    control = float(re.search(r"\| synthetic \| another sample's \(control\) \| ([-\d.]+) \|", summary).group(1))
    assert own > control, summary  # a brighter lesion at its own mask than at another volume's
    _insertion_ran(out, summary)
