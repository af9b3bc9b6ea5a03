"""Nothing lost, nothing hung, one clear line: run folders that never collide, resume that never
destroys newer work, a torn metrics line, file-system errors, Ctrl-C, the last log line.
Real ``medgen-train`` processes and real signals; each CLI run takes a few seconds at 16 px."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import tiny_overrides
from omegaconf import OmegaConf

from medgen.core.checkpoint import load_checkpoint
from medgen.core.fs import HOST, FolderBusy, FolderLock
from medgen.diffusion.run import folder as run_folder

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def train_cmd(tmp_path: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "medgen.scripts.train",
            *tiny_overrides(tmp_path, data, "mode=bravo", "strategy=rflow", *extra)]


def train(tmp_path: Path, data: Path, *extra: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(tmp_path, data, *extra), capture_output=True, text=True, env=ENV, cwd=tmp_path,
                          timeout=timeout)


def runs(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "runs" / "bravo").iterdir() if p.is_dir())


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def steps_logged(run: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def one_line_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("medgen-train:")]
    assert len(lines) == 1, out.stderr[-2000:]
    return lines[0]


# ---------------------------------------------------------------------------------- 1. run folders
def test_claiming_the_same_name_at_once_gives_every_run_its_own_folder(tmp_path):
    claimed: list[Path] = []
    start = threading.Barrier(8)

    def claim():
        start.wait()
        claimed.append(run_folder.claim_new_folder(tmp_path, "rflow_64_20260101-120000"))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(claimed)) == 8
    assert {p.name for p in claimed} == {"rflow_64_20260101-120000"} | {f"rflow_64_20260101-120000_{i}" for i in range(2, 9)}


def test_slurm_job_and_array_ids_are_in_the_folder_name():
    cfg = OmegaConf.create({"strategy": {"name": "ddpm"}, "model": {"image_size": 128}})
    now = time.mktime((2026, 3, 4, 5, 6, 7, 0, 0, -1))
    assert run_folder.run_stem(cfg, now, env={}) == "ddpm_128_20260304-050607"
    assert run_folder.run_stem(cfg, now, env={"SLURM_JOB_ID": "77"}) == "ddpm_128_20260304-050607_job77"
    array = {"SLURM_JOB_ID": "80", "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3"}
    assert run_folder.run_stem(cfg, now, env=array) == "ddpm_128_20260304-050607_job77_3"


def test_two_runs_started_together_never_share_a_folder(tmp_path, tiny_data):
    procs = [subprocess.Popen(train_cmd(tmp_path, tiny_data, "training.max_steps=2", f"training.learning_rate={lr}"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path)
             for lr in (1e-4, 1e-3)]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]
    folders = runs(tmp_path)
    assert len(folders) == 2
    lrs = sorted(load_checkpoint(f / "checkpoints" / "latest.pt")["config"]["training"]["learning_rate"] for f in folders)
    assert lrs == [1e-4, 1e-3]  # each run's checkpoint is its own
    for f in folders:
        assert steps_logged(f) == [1, 2]  # no mixed curves
        assert OmegaConf.load(f / "config.yaml").training.learning_rate == \
            load_checkpoint(f / "checkpoints" / "latest.pt")["config"]["training"]["learning_rate"]


def test_a_folder_in_use_is_refused_and_released_on_exit(tmp_path):
    with FolderLock(tmp_path, "run folder"):
        with pytest.raises(FolderBusy, match=f"run folder {tmp_path} is in use by process {os.getpid()}"):
            FolderLock(tmp_path, "run folder").acquire()
    FolderLock(tmp_path, "run folder").acquire().release()  # free again


# ---------------------------------------------------------------------------------- 2. resume
def test_resuming_from_an_older_snapshot_branches_and_keeps_newer_work(tmp_path, tiny_data):
    first = train(tmp_path, tiny_data, "training.epochs=3", "training.max_steps=13")
    assert first.returncode == 0, first.stderr[-2000:]
    (run,) = runs(tmp_path)
    ckpts = run / "checkpoints"
    snapshot = sorted(ckpts.glob("epoch_*.pt"))[0]
    snap_step = load_checkpoint(snapshot)["step"]
    assert snap_step < load_checkpoint(ckpts / "latest.pt")["step"] == 13
    before = {p.name: digest(p) for p in [*ckpts.iterdir(), run / "metrics.jsonl"]}

    out = train(tmp_path, tiny_data, "training.epochs=3", "training.max_steps=15", f"training.resume={snapshot}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "branches into a new run folder" in out.stdout  # the log goes to stdout
    assert {p.name: digest(p) for p in [*ckpts.iterdir(), run / "metrics.jsonl"]} == before  # nothing rewound
    (branch,) = [f for f in runs(tmp_path) if f != run]
    parent = json.loads((branch / "parent.json").read_text())
    assert parent == {"checkpoint": str(snapshot), "step": snap_step, "run": str(run)}
    assert load_checkpoint(branch / "checkpoints" / "latest.pt")["step"] == 15
    assert steps_logged(branch) == list(range(1, 16))  # the parent's curve up to the branch, then its own


# ---------------------------------------------------------------------------------- 3. torn metrics line
def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, tiny_data):
    assert train(tmp_path, tiny_data, "training.max_steps=3").returncode == 0
    (run,) = runs(tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "epoch": 0, "loss": 0.3')  # killed in the middle of a write
    out = train(tmp_path, tiny_data, "training.max_steps=5", f"training.resume={run}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert "dropping unreadable line 4" in out.stdout
    assert steps_logged(run) == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------------------------- 5. temporaries of a kill
def test_checkpoint_temporaries_of_a_killed_run_are_removed_by_the_next(tmp_path, tiny_data):
    assert train(tmp_path, tiny_data, "training.max_steps=2").returncode == 0
    (run,) = runs(tmp_path)
    ckpts = run / "checkpoints"
    # a process killed while writing latest.pt and a snapshot (SIGKILL: no clean-up runs)
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from medgen.core.fs import temporary_path\n"
        "for name in ('latest.pt', 'epoch_0001.pt'):\n"
        f"    temporary_path({str(ckpts)!r} + '/' + name).write_bytes(b'half a checkpoint')\n"
        "print('written', flush=True)\n"
        "time.sleep(600)\n")], stdout=subprocess.PIPE, text=True, env=ENV)
    assert writer.stdout.readline().strip() == "written"
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    left = sorted(p.name for p in ckpts.glob(".*.tmp-*"))
    assert [n.split(".tmp-")[0] for n in left] == [".epoch_0001.pt", ".latest.pt"]
    live = ckpts / f".best.pt.tmp-{HOST}-{os.getpid()}-abc123"  # a live owner: kept
    live.write_bytes(b"")

    out = train(tmp_path, tiny_data, "training.max_steps=3", f"training.resume={run}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert [p.name for p in ckpts.glob(".*.tmp-*")] == [live.name]
    for name in left:
        assert f"removed {ckpts / name}, left by an interrupted run" in out.stdout


# ---------------------------------------------------------------------------------- 8. file-system errors
@pytest.fixture
def read_only_dir(tmp_path):
    """A folder no process can write to: a read-only tmpfs as root, permissions otherwise."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if IS_ROOT:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(folder)]).returncode != 0:
            pytest.skip("cannot mount a read-only tmpfs")
        yield folder
        subprocess.run(["umount", str(folder)])
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


@pytest.mark.parametrize("key", ["paths.model_dir", "paths.cache_dir"])
def test_a_read_only_folder_is_one_line(tmp_path, tiny_data, read_only_dir, key):
    line = one_line_error(train(tmp_path, tiny_data, f"{key}={read_only_dir / 'sub'}"))
    assert str(read_only_dir / "sub") in line
    assert ("Read-only file system" if IS_ROOT else "Permission denied") in line


def test_a_path_under_proc_is_one_line(tmp_path, tiny_data):
    line = one_line_error(train(tmp_path, tiny_data, "paths.model_dir=/proc/medgen-runs"))
    assert line == ("medgen-train: /proc/medgen-runs/bravo: cannot create this folder: "
                    "/proc does not take new folders (No such file or directory)")


@pytest.mark.skipif(not IS_ROOT, reason="mounting a small tmpfs needs root")
def test_a_full_disk_while_saving_is_one_line_and_keeps_the_last_checkpoint(tmp_path, tiny_data):
    # the size of one checkpoint of this run, to size a disk that holds two but not three
    probe = tmp_path / "probe"
    probe.mkdir()
    assert train(probe, tiny_data, "training.max_steps=1").returncode == 0
    size = next((probe / "runs").rglob("latest.pt")).stat().st_size
    disk = tmp_path / "disk"
    disk.mkdir()
    kb = (2 * size + size // 2) // 1024
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kb}k", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs")
    try:
        # epoch 1 writes best.pt and latest.pt; epoch 2 needs room for a third file while writing
        out = train(tmp_path, tiny_data, f"paths.model_dir={disk}", "training.checkpoint_keep=0",
                    "training.epochs=3")
        line = one_line_error(out)
        (ckpts,) = list(disk.rglob("checkpoints"))
        assert line.startswith(f"medgen-train: {ckpts}/")
        assert line.endswith(".pt: cannot write: No space left on device (free some space or choose another folder)")
        per_epoch = int(re.search(r"(\d+) steps/epoch", out.stdout)[1])
        assert load_checkpoint(ckpts / "latest.pt")["step"] == per_epoch  # epoch 1's checkpoint is intact
        assert not list(ckpts.glob(".*tmp*"))
    finally:
        subprocess.run(["umount", str(disk)])


# ---------------------------------------------------------------------------------- 9. Ctrl-C, last line
def _start_long_run(tmp_path: Path, data: Path) -> tuple[subprocess.Popen, Path]:
    """A run whose steps take a while (64 px), in its own process group like a terminal job;
    returns once it has logged two steps."""
    proc = subprocess.Popen(train_cmd(tmp_path, data, "training.epochs=100", "model.image_size=64",
                                      "data.num_workers=2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path,
                            start_new_session=True)
    t0 = time.time()
    while True:
        found = list((tmp_path / "runs").glob("bravo/*/metrics.jsonl"))
        if found and len(found[0].read_text().splitlines()) >= 2:
            return proc, found[0].parent
        if proc.poll() is not None or time.time() - t0 > 150:
            proc.kill()
            raise AssertionError(f"the run ended or stalled before step 2:\n{proc.stderr.read()[-2000:]}")
        time.sleep(0.05)


def test_ctrl_c_saves_latest_and_exits_75(tmp_path, tiny_data):
    proc, run = _start_long_run(tmp_path, tiny_data)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends to the whole job: workers included
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]  # saved, but stopped before done
    assert "Traceback" not in err
    step = load_checkpoint(run / "checkpoints" / "latest.pt")["step"]
    assert step >= 2
    assert f"stopped on request in epoch 1/100, step {step}; checkpoints in {run / 'checkpoints'}; " \
           f"continue with training.resume={run}" in out


def test_a_second_ctrl_c_aborts_at_once(tmp_path, tiny_data):
    proc, run = _start_long_run(tmp_path, tiny_data)
    # Ctrl-C pressed until the run ends: two presses that arrive before the busy main thread runs
    # Python again count as one (CPython keeps one flag per signal), so a fixed pair of presses is a
    # race under load; the second press the run sees must abort it
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < 60:
        try:
            os.killpg(proc.pid, signal.SIGINT)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.rstrip().endswith("medgen-train: interrupted")
    assert "Traceback" not in err
    assert not list((run / "checkpoints").glob(".*tmp*")) if (run / "checkpoints").exists() else True


def test_the_last_line_counts_epochs_like_the_progress_bar(tmp_path, tiny_data):
    out = train(tmp_path, tiny_data, "training.max_steps=3")
    assert out.returncode == 0, out.stderr[-2000:]
    (run,) = runs(tmp_path)
    assert f"stopped at training.max_steps=3 in epoch 1/2, step 3; checkpoints in {run / 'checkpoints'}" in out.stdout


@pytest.mark.parametrize("override, message", [
    ("lr_find.min_lr=1", "config error at 'lr_find.max_lr': need 0 < lr_find.min_lr (1) < lr_find.max_lr (0.1)"),
    ("lr_find.num_steps=0", "config error at 'lr_find.num_steps': must be >= 5, got 0"),
])
def test_lr_find_bad_sweep_is_one_line_naming_the_key(tmp_path, override, message):
    out = subprocess.run([sys.executable, "-m", "medgen.scripts.lr_find", override, f"paths.model_dir={tmp_path}"],
                         capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == f"medgen-lr-find: {message}"
    assert not list(tmp_path.rglob("*.png"))


def test_resume_auto_in_a_slurm_job_continues_only_that_jobs_run(tmp_path, monkeypatch, caplog):
    from medgen.core.checkpoint import save_checkpoint
    from medgen.diffusion.config import load_config

    cfg = load_config([f"paths.model_dir={tmp_path}", "training.resume=auto"])
    config = OmegaConf.to_container(cfg, resolve=True)
    for name in ("ddpm_128_20260101-000000_job77_3", "ddpm_128_20260101-000001_job77_30", "ddpm_128_20260101-000002"):
        save_checkpoint(tmp_path / "seg" / name / "checkpoints" / "latest.pt",
                        {"config": config, "mode": "seg", "strategy": "ddpm", "network": {}, "model": {}, "step": 1})
        time.sleep(0.01)  # distinct mtimes: the plain run is the newest
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert run_folder.find_checkpoint("auto", cfg).parent.parent.name == "ddpm_128_20260101-000000_job77_3"
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    assert run_folder.find_checkpoint("auto", cfg) is None  # task 4 has no run yet: it starts fresh
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID")
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    # a new job (the templates always pass resume=auto) does not take over another job's run, but names it
    caplog.set_level("INFO", logger="medgen")
    assert run_folder.find_checkpoint("auto", cfg) is None
    assert (f"SLURM job 99 has no run to continue yet; the newest run of another job that fits is "
            f"{tmp_path / 'seg' / 'ddpm_128_20260101-000002'}") in caplog.text
    save_checkpoint(tmp_path / "seg" / "ddpm_128_20260101-000003_job99" / "checkpoints" / "latest.pt",
                    {"config": config, "mode": "seg", "strategy": "ddpm", "network": {}, "model": {}, "step": 1})
    assert run_folder.find_checkpoint("auto", cfg).parent.parent.name == "ddpm_128_20260101-000003_job99"  # requeued
    monkeypatch.delenv("SLURM_JOB_ID")
    assert run_folder.find_checkpoint("auto", cfg).parent.parent.name == "ddpm_128_20260101-000003_job99"  # the newest


# ---------------------------------------------------------------------------------- signals from SLURM
def test_a_stop_signal_while_the_run_starts_up_stops_it_at_its_first_step_boundary(tmp_path, tiny_data, monkeypatch):
    """SLURM's warning (USR1) can come while the cache is built or the model set up: the run must
    not die of it (USR1's default action), but stop before its first step with latest.pt saved."""
    from medgen.diffusion.config import load_config
    from medgen.diffusion.trainer import DiffusionTrainer
    from medgen.scripts import train as train_script

    leaked = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: leaked.append(1))  # where a missed signal would land
    set_up = DiffusionTrainer.__init__

    def set_up_then_warning(self, *args, **kwargs):
        set_up(self, *args, **kwargs)
        signal.raise_signal(signal.SIGUSR1)

    monkeypatch.setattr(DiffusionTrainer, "__init__", set_up_then_warning)
    try:
        cfg = load_config(tiny_overrides(tmp_path, tiny_data, "mode=bravo", "strategy=rflow", "training.max_steps=4"))
        assert train_script.run(cfg) == "stopped"
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert leaked == []
    (run,) = runs(tmp_path)
    assert load_checkpoint(run / "checkpoints" / "latest.pt")["step"] == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT], ids=lambda s: s.name)
def test_worker_processes_leave_stop_signals_to_their_parent(sig):
    """``scancel --signal`` and srun's forwarding reach every process of a job step, data workers
    included; a worker that died of it would crash the DataLoader of a run that is saving."""
    from medgen.core.fs import die_with_parent

    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        try:
            die_with_parent(os.getppid())
            os.write(ready_w, b"1")
            time.sleep(0.5)
        finally:
            os._exit(7)
    os.read(ready_r, 1)
    os.close(ready_r), os.close(ready_w)
    os.kill(pid, sig)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 7  # it ran on to its normal end


def test_a_script_that_keeps_its_data_workers_to_the_end_still_exits(tmp_path):
    """The workers ignore SIGTERM (above), which is how ``multiprocessing`` ends daemonic children at
    interpreter exit before waiting for them: a script that kept a trainer (persistent DataLoader
    workers) to its last line waited forever. medgen stops its workers first, without the error
    PyTorch raises when it sees a worker die."""
    script = tmp_path / "keep_workers.py"
    script.write_text(
        "import torch\n"
        "from torch.utils.data import TensorDataset\n"
        "from medgen.data.loading import build_dataloader\n"
        "loader = build_dataloader(TensorDataset(torch.arange(8.0)), batch_size=2, shuffle=False, seed=0, num_workers=2)\n"
        "batches = iter(loader)\n"
        "print(next(batches)[0].tolist(), flush=True)\n")
    try:
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the script did not exit: its DataLoader workers were still waited for")
    assert done.returncode == 0 and "Error" not in done.stderr, done.stderr[-2000:]
    assert done.stdout.strip() == "[0.0, 1.0]"
