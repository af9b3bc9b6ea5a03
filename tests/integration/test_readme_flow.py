"""The quick start (docs/getting-started.md, "Quick start (no real data needed)"; it was the README's),
end to end, as a newcomer runs it (slow: `make test-slow`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from medgen.core.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
#: the page's commands this test runs (with fewer subjects and epochs)
QUICK_START = ["medgen-data phantom --out data/phantoms --subjects", "medgen-data check data/phantoms",
               "medgen-data preview data/phantoms --out preview.png",
               "medgen-train mode=bravo strategy=rflow training=cpu paths.data_dir=data/phantoms"]


def _run(args: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEDGEN_CACHE_DIR": str(cwd / "cache")}
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out


def test_quick_start(tmp_path):
    page = (ROOT / "docs" / "getting-started.md").read_text()
    assert all(command in page for command in QUICK_START), "the quick start's commands moved: update QUICK_START"
    _run([str(BIN / "medgen-data"), "phantom", "--out", "data/phantoms", "--subjects", "8", "--workers", "2"], tmp_path)
    check = _run([str(BIN / "medgen-data"), "check", "data/phantoms"], tmp_path)
    assert "0 error(s)" in check.stdout
    _run([str(BIN / "medgen-data"), "preview", "data/phantoms", "--out", "preview.png"], tmp_path)
    assert Image.open(tmp_path / "preview.png").size[0] > 500

    for mode, strategy in (("seg", "ddpm"), ("bravo", "rflow"), ("dual", "ddpm")):
        _run([str(BIN / "medgen-train"), f"mode={mode}", f"strategy={strategy}", "training=cpu",
              "paths.data_dir=data/phantoms", "training.epochs=2", "training.val_interval=1",
              "training.num_sample_steps=5"], tmp_path)
        runs = sorted((tmp_path / "runs" / mode).glob(f"{strategy}_64_*"))
        assert len(runs) == 1, runs
        run = runs[0]
        assert (run / "config.yaml").is_file() and "training.epochs=2" in (run / "overrides.yaml").read_text()
        assert not (tmp_path / ".hydra").exists()  # Hydra writes nothing into the launch folder
        assert {p.name for p in (run / "samples").iterdir()} == {"epoch_0001.png", "epoch_0002.png"}
        ckpt = load_checkpoint(run / "checkpoints" / "latest.pt")
        assert ckpt["epoch"] == 2 and ckpt["mode"] == mode

    # the resume docs/training.md promises: more epochs on the same run, in the same folder
    _run([str(BIN / "medgen-train"), "mode=bravo", "strategy=rflow", "training=cpu", "paths.data_dir=data/phantoms",
          "training.epochs=3", "training.val_interval=1", "training.num_sample_steps=5", "training.resume=auto"], tmp_path)
    runs = sorted((tmp_path / "runs" / "bravo").glob("rflow_64_*"))
    assert len(runs) == 1
    assert load_checkpoint(runs[0] / "checkpoints" / "latest.pt")["epoch"] == 3
