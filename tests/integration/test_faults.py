"""medgen-generate and medgen-evaluate under the faults a user meets (slow: ``make test-slow``).

Each case runs the commands as a user does and checks what the user sees: the exit code, one line
on stderr naming the path or the keys (never a traceback), and what is on disk afterwards: no
sample, preview or manifest missing or half-written once the same command has run again.

A full disk and a read-only folder are real: a small tmpfs, and a tmpfs mounted read-only (this
needs root, as ``make test-cluster`` does; the cases are skipped with the reason otherwise).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from datagen import write_dataset

from medgen.core.signals import STOPPED_EXIT
from medgen.data.space import SampleSpace
from medgen.evaluation.downstream import build_segmenter, save_segmenter
from medgen.generation.status import read_status
from medgen.generation.writer import write_sample

pytestmark = pytest.mark.slow
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
SIZE = 16  # the tiny checkpoints' image size


# ------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults") / "real"
    write_dataset(root, n_patients=12, shape=(32, 32, 8), splits=("train", "train", "test", "val"),
                  keys=("bravo", "t1_pre", "t1_gd", "seg"))
    return root


def _generate_args(ckpts: dict[str, Path], out: Path, n: int) -> list[str]:
    return [f"seg_checkpoint={ckpts['seg']}", f"image_checkpoint={ckpts['bravo']}", f"out_dir={out}",
            f"num_images={n}", "batch_size=2", "steps=25", "precision=fp32", "gate.enabled=false", "seed=3",
            f"cache_dir={out.parent / 'gen-cache'}"]


def _evaluate_args(real: Path, synthetic: Path, out: Path, feature_net: Path, *extra: str) -> list[str]:
    return [f"real_dir={real}", f"synthetic_dir={synthetic}", f"out_dir={out}", f"cache_dir={out.parent / 'ev-cache'}",
            "seeds=[0]", "budget.steps=20", "budget.batch_size=4", "num_workers=0", "diversity_pairs=10",
            f"features.network={feature_net}", "features.kid_subsets=5", "features.kid_subset_size=10", *extra]


def _run(script: str, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"medgen.scripts.{script}", *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def _one_line_error(out: subprocess.CompletedProcess, prog: str, code: int) -> str:
    """The command failed with ``code`` and said why in one line, its last on stderr (progress bars
    come before it), with no traceback."""
    assert out.returncode == code, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: "), out.stderr[-3000:]
    return last


@contextmanager
def _tmpfs(path: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"needs a tmpfs mount (root): {mount.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _manifest_ids(out: Path) -> list[str]:
    with open(out / "manifest.csv") as f:
        return [r["id"] for r in csv.DictReader(f) if r["accepted"] == "True"]


def _samples(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "train").iterdir()) if (out / "train").is_dir() else []


def _assert_consistent(out: Path, expected: int | None = None) -> list[str]:
    """Every sample folder on disk is whole and has its preview, the manifest lists exactly those
    samples, and no temporary is left; with ``expected``, that many samples and a complete status."""
    done = _samples(out)
    for name in done:
        assert sorted(p.name for p in (out / "train" / name).iterdir()) == ["bravo.nii.gz", "seg.nii.gz"], name
        assert (out / "previews" / f"{name}.png").is_file(), name
    assert sorted(_manifest_ids(out)) == done
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    if expected is not None:
        assert len(done) == expected and len(list((out / "previews").iterdir())) == expected
        status = read_status(out)
        assert (status.complete, status.done, status.expected) == (True, expected, expected)
        assert not (out / ".medgen" / "reserve").exists()  # a finished set keeps no room held back
    return done


# ------------------------------------------------------------------------------------ generate
@pytest.mark.timeout(900)
def test_a_stopped_generation_exits_75_is_refused_by_evaluation_and_the_rerun_completes_it(
        tmp_path, tiny_checkpoints, real, feature_net):
    n = 30
    out = tmp_path / "synthetic"
    args = _generate_args(tiny_checkpoints, out, n)
    proc = subprocess.Popen([sys.executable, "-m", "medgen.scripts.generate", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    t0 = time.time()
    while len(_samples(out)) < 6:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() - t0 < 300, "no samples appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # what SLURM's time-limit warning does (SIGUSR1 the same)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == STOPPED_EXIT == 75, stderr[-3000:]  # `generate && evaluate` stops here
    assert "Traceback" not in stderr and "stopped by signal before every sample was written" in stdout
    done = _assert_consistent(out)  # the manifest lists the samples done so far
    assert 6 <= len(done) < n
    status = read_status(out)
    assert (status.complete, status.done, status.expected) == (False, len(done), n)

    # the unfinished set is refused, naming the folder and the command that finishes it
    evaluation = tmp_path / "evaluation"
    refused = _run("evaluate", _evaluate_args(real, out, evaluation, feature_net, "downstream=false"))
    line = _one_line_error(refused, "medgen-evaluate", 1)
    assert line == (f"medgen-evaluate: synthetic_dir: {out} holds an unfinished generation ({len(done)} of {n} samples "
                    f"done): run medgen-generate {' '.join(args)} again to complete it, or pass allow_partial=true "
                    "to evaluate what is there")
    assert not evaluation.exists()
    partial = _run("evaluate", _evaluate_args(real, out, evaluation, feature_net, "downstream=false",
                                              "allow_partial=true"))
    assert partial.returncode == 0, partial.stderr[-3000:]
    assert f"warning: the synthetic set is an unfinished generation ({len(done)} samples done of {n})" in partial.stdout
    assert json.loads((evaluation / "metrics.json").read_text())["distribution"]["items"]["synthetic"] == len(done)

    again = _run("generate", args)  # the command the message names
    assert again.returncode == 0, again.stderr[-3000:]
    _assert_consistent(out, expected=n)
    accepted = _run("evaluate", _evaluate_args(real, out, tmp_path / "evaluation2", feature_net, "downstream=false"))
    assert accepted.returncode == 0, accepted.stderr[-3000:]


def _shrink_to_used(disk: Path, spare: int = 4096) -> None:
    """Remount the tmpfs ``disk`` with room for ``spare`` bytes more than it holds now (retried
    while a write in flight makes the size fall below its use)."""
    for _ in range(100):
        st = os.statvfs(disk)
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        if subprocess.run(["mount", "-o", f"remount,size={used + spare}", str(disk)], capture_output=True).returncode == 0:
            return
    raise AssertionError(f"could not shrink {disk}")


@pytest.mark.timeout(900)
def test_a_full_disk_names_the_path_and_the_rerun_leaves_every_sample_whole(tmp_path, tiny_checkpoints):
    n = 40
    with _tmpfs(tmp_path / "disk", "16m") as disk:
        out = disk / "synthetic"
        args = _generate_args(tiny_checkpoints, out, n)
        proc = subprocess.Popen([sys.executable, "-m", "medgen.scripts.generate", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=ENV)
        t0 = time.time()
        while len(_samples(out)) < 3:  # the disk fills in stage 2, after a few samples, whatever stage 1 wrote
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() - t0 < 300, "no samples appeared"
            time.sleep(0.02)
        assert (out / ".medgen" / "reserve").stat().st_size == 64 * 1024 + 1024 * n  # room to list what is done
        _shrink_to_used(disk)
        stdout, stderr = proc.communicate(timeout=300)
        line = _one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr),
                               "medgen-generate", 1)
        assert line.startswith(f"medgen-generate: {out}/") and line.endswith(
            ": cannot write: No space left on device (free some space or choose another folder)")
        done = _assert_consistent(out)  # whole samples, each with its preview, all in the manifest
        assert 0 < len(done) < n
        assert not read_status(out).complete
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)  # space freed
        again = _run("generate", args)
        assert again.returncode == 0, again.stderr[-3000:]
        _assert_consistent(out, expected=n)


@pytest.mark.timeout(600)
def test_an_out_dir_that_is_read_only_or_a_file_is_one_line(tmp_path, tiny_checkpoints, real, feature_net):
    synthetic = tmp_path / "synthetic"
    write_sample(synthetic / "train" / "syn_0", {"bravo": np.full((SIZE, SIZE), 0.5), "seg": np.eye(SIZE)},
                 (2.0, 2.0, 2.0))
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    for prog, script, args in (
            ("medgen-generate", "generate", lambda o: _generate_args(tiny_checkpoints, o, 4)),
            ("medgen-evaluate", "evaluate", lambda o: _evaluate_args(real, synthetic, o, feature_net))):
        line = _one_line_error(_run(script, args(a_file)), prog, 1)
        assert line == (f"{prog}: {a_file}: out_dir must be a folder, and this is a file (choose another out_dir, or "
                        "move the file away)")
        assert a_file.read_text() == "not a folder"
    with _tmpfs(tmp_path / "read-only", "1m", read_only=True) as read_only:
        for prog, script, args in (
                ("medgen-generate", "generate", lambda o: _generate_args(tiny_checkpoints, o, 4)),
                ("medgen-evaluate", "evaluate", lambda o: _evaluate_args(real, synthetic, o, feature_net))):
            for out in (read_only, read_only / "sub"):  # the mount itself, and a folder to create in it
                line = _one_line_error(_run(script, args(out)), prog, 1)
                assert line == (f"{prog}: {out}: cannot write to out_dir: Read-only file system (choose a folder on "
                                "a writable file system)")


# ------------------------------------------------------------------------------------ evaluate
@pytest.mark.timeout(600)
def test_a_one_sample_set_is_evaluated_with_what_needs_two_skipped(tmp_path, real, feature_net):
    synthetic = tmp_path / "one"
    mask = np.zeros((SIZE, SIZE))
    mask[6:9, 6:9] = 1
    write_sample(synthetic / "train" / "syn_0", {"bravo": np.random.default_rng(0).random((SIZE, SIZE)), "seg": mask},
                 (2.0, 2.0, 2.0))
    out = tmp_path / "evaluation"
    run = _run("evaluate", _evaluate_args(real, synthetic, out, feature_net))
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    reason = "FID/KID needs at least 2 slices per set (synthetic 1)"
    assert m["features"] == {"skipped": reason}
    assert m["distribution"]["diversity"]["bravo"]["skipped"] == \
        "MS-SSIM between random pairs needs at least 2 slices per set (synthetic 1)"
    assert f"skipped: features: {reason}" in run.stdout
    # the rest is computed
    assert m["distribution"]["masks"]["area"]["synthetic_mean"] == pytest.approx(9 / SIZE**2)
    assert m["downstream"]["synthetic"]["train_items"] == 1 and 0 <= m["downstream"]["synthetic"]["mean"] <= 1
    assert m["adherence"]["lesion_items"] == 1 and m["adherence"]["synthetic_dice"] is not None
    assert f"Skipped (features): {reason}" in (out / "report.html").read_text()


@pytest.mark.timeout(600)
def test_lesion_free_masks_are_scored_by_false_positives_with_a_warning(tmp_path, real, feature_net):
    synthetic = tmp_path / "empty"
    rng = np.random.default_rng(1)
    for i in range(6):
        write_sample(synthetic / "train" / f"syn_{i}", {"bravo": rng.random((SIZE, SIZE)), "seg": np.zeros((SIZE, SIZE))},
                     (2.0, 2.0, 2.0))
    out = tmp_path / "evaluation"
    run = _run("evaluate", _evaluate_args(real, synthetic, out, feature_net, "downstream=false"))
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert "warning: the synthetic set has no lesion at all (every mask is empty)" in run.stdout
    a = json.loads((out / "metrics.json").read_text())["adherence"]
    assert a["synthetic_dice"] is None and (a["lesion_items"], a["empty_items"]) == (0, 6)
    assert 0 <= a["false_positive_fraction"] <= 1 and a["real_test_dice"] is not None
    assert "conditioning Dice" not in run.stdout and "lesion-free synthetic slices" in run.stdout
    assert "the synthetic set has no lesion at all" in (out / "report.md").read_text()


@pytest.mark.timeout(300)
def test_a_segmenter_of_other_modalities_is_refused_at_once(tmp_path, real, feature_net):
    synthetic = tmp_path / "dual"
    rng = np.random.default_rng(2)
    for i in range(4):
        write_sample(synthetic / "train" / f"syn_{i}", {"t1_pre": rng.random((SIZE, SIZE)),
                                                        "t1_gd": rng.random((SIZE, SIZE)), "seg": np.eye(SIZE)},
                     (2.0, 2.0, 2.0))
    seg_net = save_segmenter(build_segmenter(1, SampleSpace((SIZE, SIZE))), tmp_path / "seg_net.pt", ["bravo"],
                           SampleSpace((SIZE, SIZE)))
    out = tmp_path / "evaluation"
    t0 = time.time()
    run = _run("evaluate", _evaluate_args(real, synthetic, out, feature_net, f"seg_net_checkpoint={seg_net}"))
    elapsed = time.time() - t0
    line = _one_line_error(run, "medgen-evaluate", 1)
    assert line == (f"medgen-evaluate: seg_net_checkpoint={seg_net} segments ['bravo'] at {SIZE} px, but the synthetic "
                    f"set holds ['t1_pre', 't1_gd'] at {SIZE} px: give the seg_net.pt of an evaluation of such a set, "
                    "or leave seg_net_checkpoint unset to train one on the real train split")
    assert elapsed < 60, f"refused after {elapsed:.0f} s"  # before any slice cache or metric (start-up included)
    assert not out.exists()
