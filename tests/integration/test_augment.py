"""The targeted-augmentation experiment (medgen-augment) end to end on tiny data: one synthetic set
per size target, the downstream segmenter on real and on real + each set over seeds, per-bin
lesion-wise figures in augmentation.json and the report. (The command line's refusals, fast:
test_augment_cli.py.)"""

from __future__ import annotations

import json

import pytest
from conftest import square_seg_model

from medgen.scripts.augment import main

pytestmark = pytest.mark.slow


def test_each_target_makes_its_set_and_every_set_is_scored_per_size_bin(tmp_path, tiny_data, tiny_checkpoints,
                                                                       monkeypatch, capsys):
    square_seg_model(monkeypatch, [2, 5, 9])  # tiny, small, medium at 2 mm pixels
    out = tmp_path / "augment"
    args = ["--real", str(tiny_data), "--seg", str(tiny_checkpoints["seg"]), "--image", str(tiny_checkpoints["bravo"]),
            "--out", str(out), "--target", "tiny=tiny:1", "--target", "bigger=small:1,medium:1", "--num-images", "4",
            "--seeds", "0,1", "--steps", "4", "--generate", "gate.max_area=0.5", "--generate", "steps=2",
            "--generate", "precision=fp32", "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    result = json.loads((out / "augmentation.json").read_text())
    assert list(result["sets"]) == ["real", "real+tiny", "real+bigger"]
    # what each set holds, measured on its masks: exactly the classes asked for
    assert result["synthetic"]["tiny"]["lesions"] == {"tiny": 4, "small": 0, "medium": 0, "large": 0}
    assert result["synthetic"]["bigger"]["lesions"] == {"tiny": 0, "small": 2, "medium": 2, "large": 0}
    real_slices = result["sets"]["real"]["train_items"]
    assert result["sets"]["real+tiny"]["train_items"] == real_slices + result["synthetic"]["tiny"]["items"]
    for name, s in result["sets"].items():
        assert [r["seed"] for r in s["per_seed"]] == [0, 1]
        for b, n in result["test_lesions"].items():  # every bin with test lesions has a sensitivity in [0, 1]
            assert (s["mean"][b]["sensitivity"] is None) == (n == 0)
            if n:
                values = [r["bins"][b]["sensitivity"]["value"] for r in s["per_seed"]]
                assert s["mean"][b]["sensitivity"] == pytest.approx(sum(values) / 2)
    report = (out / "augmentation.md").read_text()
    assert "| real+bigger | all |" in report and "| tiny | whole image | 4 | 4 | 0 | 0 | 0 | 4 | 0 | 0 | 0 |" in report
    assert (out / "augmentation.png").stat().st_size > 10_000 and (out / "augmentation.html").exists()
    assert "trained on real+tiny" in capsys.readouterr().out
    # a second call reuses the finished sets (generation resumes as done) and gives the same figures
    assert main(args) == 0
    assert json.loads((out / "augmentation.json").read_text())["sets"] == result["sets"]

