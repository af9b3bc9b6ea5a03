"""`make demo`, the README's first command, end to end with its defaults (slow: about 15 minutes on
2 cores; `make test-slow`)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from medgen.data.validate import check_dataset

pytestmark = pytest.mark.slow


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
