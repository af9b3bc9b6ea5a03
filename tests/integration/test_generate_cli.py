"""medgen-generate as a user runs it (slow: `make test-slow`): SIGKILL mid-run then the same command
again, and two processes under torchrun, each compared file by file with one uninterrupted run."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from medgen.data.nifti_dataset import load_volume

pytestmark = pytest.mark.slow
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _settings(ckpts: dict[str, Path], out: Path, n: int) -> dict[str, str]:
    return {"seg_checkpoint": str(ckpts["seg"]), "image_checkpoint": str(ckpts["bravo"]), "out_dir": str(out),
            "num_images": str(n), "batch_size": "2", "steps": "25", "precision": "fp32", "gate.enabled": "false",
            "seed": "3"}


def _cli(settings: dict[str, str]) -> list[str]:
    return [f"{k}={v}" for k, v in settings.items()]


def _reference(tmp: Path, ckpts: dict[str, Path], n: int) -> Path:
    """One uninterrupted process (the same thread count as the runs it is compared with)."""
    out = tmp / "reference"
    run = subprocess.run([sys.executable, "-m", "medgen.scripts.generate", *_cli(_settings(ckpts, out, n))],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in (a / "train").iterdir())
    assert names == sorted(p.name for p in (b / "train").iterdir())
    for name in names:
        for key in ("seg", "bravo"):
            assert np.array_equal(load_volume(a / "train" / name / f"{key}.nii.gz")[0],
                                  load_volume(b / "train" / name / f"{key}.nii.gz")[0]), (name, key)
    with open(a / "manifest.csv") as fa, open(b / "manifest.csv") as fb:
        assert list(csv.DictReader(fa)) == list(csv.DictReader(fb))


@pytest.mark.timeout(600)
def test_sigkill_then_the_same_command_gives_the_uninterrupted_files(tmp_path, tiny_checkpoints):
    n = 30
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "medgen.scripts.generate", *_cli(_settings(tiny_checkpoints, out, n))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    t0 = time.time()
    while not (out / "train").is_dir() or len(list((out / "train").glob("syn_*"))) < 6:
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() - t0 < 300, "no samples appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    done = [p for p in (out / "train").glob("syn_*")]
    assert 6 <= len(done) < n  # killed mid-way, in stage 2
    for folder in done:  # a folder that exists is complete
        assert {p.name for p in folder.iterdir()} == {"seg.nii.gz", "bravo.nii.gz"}
    again = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{n} samples in {out / 'train'}" in again.stdout
    assert not list(out.glob("**/.*.tmp-*"))  # what the kill left half-written is gone
    _same_files(out, _reference(tmp_path, tiny_checkpoints, n))


@pytest.mark.timeout(600)
def test_two_processes_write_the_one_process_files(tmp_path, tiny_checkpoints):
    n = 9
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "medgen.scripts.generate", *_cli(_settings(tiny_checkpoints, out, n))]
    run = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    _same_files(out, _reference(tmp_path, tiny_checkpoints, n))


@pytest.mark.timeout(600)
def test_two_processes_write_the_one_process_volumes(tmp_path, volume_checkpoints, one_thread):
    """Sharded generation of volumes: two ranks under torchrun write the files one process writes."""
    ckpts = volume_checkpoints
    n = 5
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "medgen.scripts.generate", *_cli({**_settings(ckpts, out, n), "steps": "5"})]
    run = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert load_volume(next((out / "train").iterdir()) / "bravo.nii.gz")[0].shape == (16, 16, 8)
    reference = tmp_path / "reference"
    one = subprocess.run([sys.executable, "-m", "medgen.scripts.generate",
                          *_cli({**_settings(ckpts, reference, n), "steps": "5"})],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    _same_files(out, reference)


@pytest.mark.timeout(600)
def test_an_insertion_stopped_by_sigterm_exits_75_and_the_same_command_finishes_it(tmp_path, tiny_checkpoints,
                                                                                tiny_data):
    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "medgen.scripts.generate", f"insert.into={tiny_data}", "insert.margin=1",
                f"image_checkpoint={tiny_checkpoints['bravo']}", "insert.painter=repaint", f"out_dir={out}",
                "num_images=40", "batch_size=2", "steps=25", "precision=fp32", f"cache_dir={tmp_path / 'cache'}"]

    reference = tmp_path / "reference"
    assert subprocess.run(command(reference), capture_output=True, text=True, env=ENV, timeout=300).returncode == 0
    out = tmp_path / "stopped"
    proc = subprocess.Popen(command(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    t0 = time.time()
    while not (out / "train").is_dir() or len(list((out / "train").glob("ins_*"))) < 4:
        assert proc.poll() is None and time.time() - t0 < 240, "the run ended before it could be stopped"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    said, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert "run the same command again" in said + err
    assert 4 <= len(list((out / "train").glob("ins_*"))) < 40
    again = subprocess.run(command(out), capture_output=True, text=True, env=ENV, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    names = sorted(p.name for p in (reference / "train").iterdir())
    assert names == sorted(p.name for p in (out / "train").iterdir()) and len(names) == 40
    for name in names:
        for key in ("seg", "bravo", "region"):
            assert np.array_equal(load_volume(reference / "train" / name / f"{key}.nii.gz")[0],
                                  load_volume(out / "train" / name / f"{key}.nii.gz")[0]), (name, key)
    with open(reference / "manifest.csv") as fa, open(out / "manifest.csv") as fb:
        assert list(csv.DictReader(fa)) == list(csv.DictReader(fb))
    # a request that cannot fit: one line naming what to change, exit 1, nothing written
    bad = subprocess.run([*command(tmp_path / "bad"), "lesion_sizes.target={large: 1}", "lesion_counts.target={4+: 1}"],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert bad.returncode == 1 and "fit in none of 20 scans" in bad.stderr, bad.stderr[-2000:]
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad" / "train").exists()
