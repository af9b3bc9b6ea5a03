"""Every command of the specification's "Hydra Configuration" section, run as written on a small
phantom dataset (slow: `make test-slow`). Only `training.max_steps` is added where the command
would otherwise train for hours; data and run folders come from the MEDGEN_* variables.

The 256 px command also gets `training.batch_size=2`: the specification's network at 256 px
with the default batch of 16 takes about 10 minutes and 18 GB for one step on a 2-core CPU
(measured); it is a GPU configuration, and the point here is that the command composes,
validates, builds its data and trains.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medgen.core.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    from medgen.data.phantom import generate_dataset

    root = tmp_path_factory.mktemp("spec")
    generate_dataset(root / "data", subjects=12, size=64, slices=48, seed=0, split=(0.7, 0.3, 0.0), workers=2)
    return {**os.environ, "MEDGEN_DATA_DIR": str(root / "data"), "MEDGEN_RUNS_DIR": str(root / "runs"),
            "MEDGEN_CACHE_DIR": str(root / "cache"), "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}


def _train(env: dict[str, str], *overrides: str) -> Path:
    """Run `python -m medgen.scripts.train <overrides>`; return its run folder."""
    before = set(Path(env["MEDGEN_RUNS_DIR"]).glob("*/*"))
    out = subprocess.run([sys.executable, "-m", "medgen.scripts.train", *overrides], env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    (run,) = set(Path(env["MEDGEN_RUNS_DIR"]).glob("*/*")) - before
    return run


@pytest.mark.timeout(900)
def test_quick_debug_run_as_written(env):
    run = _train(env, "training.epochs=2", "training.batch_size=4")
    ckpt = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert ckpt["epoch"] == 2 and ckpt["step"] == 2 * (29 // 4)  # both epochs, every batch
    assert (run / "checkpoints" / "best.pt").is_file() and (run / "samples" / "epoch_0002.png").is_file()


@pytest.mark.timeout(900)
@pytest.mark.parametrize("overrides, expect", [
    (["model.image_size=256", "training.batch_size=2"], {"model.image_size": 256}),
    (["training.use_ema=false", "training.use_min_snr=false"], {"training.use_ema": False, "training.use_min_snr": False}),
    (["paths=cluster", "strategy=rflow", "training.epochs=1000"], {"strategy.name": "rflow", "training.epochs": 1000}),
], ids=["image_size_256", "no_ema_no_min_snr", "cluster_rflow_1000_epochs"])
def test_spec_command_runs(env, overrides, expect):
    run = _train(env, *overrides, "training.max_steps=1")
    ckpt = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert ckpt["step"] == 1
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    for dotted, value in expect.items():
        group, key = dotted.split(".")
        assert cfg[group][key] == value, dotted
    if "training.use_ema" in expect:
        assert ckpt["ema"] is None
