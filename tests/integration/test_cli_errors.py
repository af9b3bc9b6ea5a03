"""medgen-generate and medgen-evaluate run as commands: a bad checkpoint, an unknown sampler, modalities
the real set lacks and a missing key each end in one line on stderr with the documented exit code
(1: the inputs are wrong, 2: the command line is), never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from datagen import write_dataset

from medgen.generation.writer import write_sample

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _run(module: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"medgen.scripts.{module}", *args], capture_output=True, text=True,
                          env=ENV, timeout=120, cwd=cwd)


def test_generate_errors_are_one_line(tmp_path, tiny_checkpoints):
    seg, bravo = tiny_checkpoints["seg"], tiny_checkpoints["bravo"]
    out_dir = f"out_dir={tmp_path / 'out'}"
    out = _run("generate", out_dir, f"seg_checkpoint={bravo}", f"image_checkpoint={bravo}")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(f"medgen-generate: seg_checkpoint={bravo} is a 'bravo'")
    out = _run("generate", out_dir, "sampler=heun2", f"image_checkpoint={bravo}", "masks_from=x")
    assert out.returncode == 2 and "config error at 'sampler': unknown sampler 'heun2'" in out.stderr
    out = _run("generate", out_dir, "sampler=heun", f"image_checkpoint={bravo}", f"seg_checkpoint={seg}")
    assert out.returncode == 1 and "sampler=heun: " in out.stderr and "'ddpm' model, which samples with" in out.stderr


def test_evaluate_errors_are_one_line_and_leave_no_folder(tmp_path):
    real = tmp_path / "real"
    write_dataset(real, n_patients=4, shape=(32, 32, 8), splits=("train", "test"), keys=("bravo", "seg"))
    flair = tmp_path / "flair"
    write_sample(flair / "train" / "a", {"flair": np.zeros((32, 32)), "seg": np.zeros((32, 32))}, (1, 1, 1))
    out = _run("evaluate", f"real_dir={real}", f"synthetic_dir={flair}", f"out_dir={tmp_path / 'cli'}")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip() == (f"medgen-evaluate: the synthetic set has ['flair', 'seg'] but the real set ({real}) "
                                  "lacks ['flair']")
    out = _run("evaluate", f"real_dir={real}", cwd=tmp_path)
    assert out.returncode == 2 and "config error at 'synthetic_dir': missing" in out.stderr
    assert not (tmp_path / "evaluation").exists()  # the default out_dir: a bad command line leaves no folder
    assert not (tmp_path / "cli").exists()


def test_a_volume_demo_into_a_slice_demo_folder_is_one_line(tmp_path, tiny_checkpoints):
    """`medgen-demo --3d` would otherwise reuse (or delete) the slice demo's models in that folder."""
    import shutil

    demo = tmp_path / "demo"
    (demo / "runs" / "seg" / "demo" / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_checkpoints["seg"], demo / "runs" / "seg" / "demo" / "checkpoints" / "latest.pt")
    out = _run("demo", "--out", str(demo), "--3d")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (f"medgen-demo: {demo} holds a slice demo; give medgen-demo another "
                                                   "--out for the volume demo (with --3d)")
    assert not (demo / "data").exists()  # nothing written
