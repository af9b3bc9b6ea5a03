"""The cluster path on a real SLURM (``make test-cluster``): a one-node cluster on this machine
(tests/cluster/slurm_cluster.sh), the IDUN job templates submitted unchanged with sbatch, on the
CPU, and what a user of a shared cluster meets: a time limit that expires mid-run, ``scancel
--signal=TERM``, pre-emption and requeue, for training and generation, one process and two.

Each job's SLURM output is printed when a test fails, with the cluster's logs."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medgen.core.checkpoint import load_checkpoint

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "tests" / "cluster" / "slurm_cluster.sh"
TRAIN = REPO / "IDUN" / "train_template.slurm"
GENERATE = REPO / "IDUN" / "generate_template.slurm"
KILL_WAIT = 10  # slurm_cluster.sh's KillWait
# SLURM's own options, as a user changes them for a cluster (the template's #SBATCH lines ask for
# 4 GPUs, 128G and an IDUN account): the CPU, one thread per process
CPU_JOB = ["--account=medgen-test", "--partition=debug", "--gres=none", "--ntasks-per-node=1", "--cpus-per-task=1",
           "--mem=3G"]
# reasons a pending job gives when it asks for more than the cluster has: it would wait for ever
NEVER_STARTS = {"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints", "ReqNodeNotAvail"}
# the cpu profile at 32 px; fp32, so that an interrupted run can be compared bit for bit
TRAIN_ARGS = ["mode=bravo", "strategy=rflow", "training=cpu", "model.image_size=32", "training.precision=fp32",
              "training.val_interval=100"]


# ----------------------------------------------------------------------------------- cluster
@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict[str, str]:
    """A running one-node cluster and the environment that submits to it (the job inherits it)."""
    if shutil.which("sbatch") is None or shutil.which("slurmctld") is None:
        pytest.fail("SLURM is not installed: make cluster-deps installs Debian's slurm-wlm and munge")
    base = tmp_path_factory.mktemp("slurm")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(MEDGEN_SLURM_DIR=str(base / "cluster"), SLURM_CONF=str(base / "cluster" / "slurm.conf"),
               MEDGEN_HOME=str(REPO), MEDGEN_VENV=sys.prefix, MEDGEN_MODULES="", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1")
    up = subprocess.run(["bash", str(CLUSTER), "up"], env=env, capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stdout + up.stderr
    print(up.stdout)
    try:
        yield env
    finally:
        subprocess.run(["bash", str(CLUSTER), "down"], env=env, timeout=120)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory, slurm) -> Path:
    root = tmp_path_factory.mktemp("phantoms") / "data"
    subprocess.run([sys.executable, "-m", "medgen.scripts.data", "phantom", "--out", str(root), "--subjects", "6",
                    "--size", "32", "--slices", "16", "--split", "0.7,0.3,0"], check=True, env=slurm,
                   capture_output=True, timeout=300)
    return root


def _paths(env: dict[str, str], data: Path, work: Path) -> dict[str, str]:
    return {**env, "MEDGEN_DATA_DIR": str(data), "MEDGEN_RUNS_DIR": str(work / "runs"),
            "MEDGEN_CACHE_DIR": str(work / "cache")}


class Job:
    """A submitted batch job: its id, its output file, its state as ``scontrol`` reports it."""

    def __init__(self, env: dict[str, str], out: Path, options: list[str], script: Path, args: list[str]):
        self.env, self.out = env, out
        cmd = ["sbatch", "--parsable", f"--output={out}", *options, str(script), *args]
        sub = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert sub.returncode == 0, sub.stderr
        self.id = sub.stdout.strip().split(";")[0]
        self.out = Path(str(out).replace("%j", self.id))

    def info(self) -> dict[str, str]:
        show = subprocess.run(["scontrol", "-o", "show", "job", self.id], env=self.env, capture_output=True,
                              text=True, timeout=60)
        return dict(re.findall(r"(\w+)=(\S*)", show.stdout))

    def log(self) -> str:
        return self.out.read_text() if self.out.exists() else "(no output yet)"

    def wait(self, until, what: str, timeout: float) -> dict[str, str]:
        t0 = time.time()
        while True:
            info = self.info()
            if until(info):
                return info
            never = info.get("JobState") == "PENDING" and info.get("Reason") in NEVER_STARTS
            if info.get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") or never \
                    or time.time() - t0 > timeout:
                raise AssertionError(f"job {self.id}: waited {time.time() - t0:.0f} s for {what}; "
                                     f"state {info.get('JobState')} (reason {info.get('Reason')})\n{self.log()}")
            time.sleep(0.5)

    def wait_done(self, timeout: float) -> dict[str, str]:
        return self.wait(lambda i: i.get("JobState") == "COMPLETED", "completion", timeout)

    def wait_failed(self, timeout: float) -> dict[str, str]:
        """Until the job ends with a non-zero exit code (SLURM's FAILED)."""
        return self.wait(lambda i: i.get("JobState") == "FAILED", "its end", timeout)

    def signal_batch(self, sig: str) -> None:
        """What SLURM does at ``--signal=B:<sig>@<n>``: the signal to the batch script alone."""
        subprocess.run(["scancel", "--batch", f"--signal={sig}", self.id], env=self.env, check=True, timeout=60)


def _wait_for(path_fn, job: Job, what: str, timeout: float = 240):
    t0 = time.time()
    while not (found := path_fn()):
        if job.info().get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING"):
            raise AssertionError(f"job {job.id} ended before {what}:\n{job.log()}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout} s\n{job.log()}")
        time.sleep(0.2)
    return found


def _run_folders(work: Path) -> list[Path]:
    return sorted((work / "runs" / "bravo").glob("rflow_32_*"))


def _steps(run: Path) -> list[int]:
    """The steps logged to metrics.jsonl (none before the first ``log_every`` steps)."""
    if not (run / "metrics.jsonl").exists():
        return []
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["step"] for r in lines if "loss" in r]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, slurm, phantoms) -> tuple[Job, Path, dict[str, str]]:
    """An uninterrupted training job (20 epochs, 80 steps): the reference for the interrupted ones."""
    work = tmp_path_factory.mktemp("straight")
    job = Job(_paths(slurm, phantoms, work), work / "slurm-%j.out", [*CPU_JOB, "--time=30"], TRAIN,
              [*TRAIN_ARGS, "training.epochs=20"])
    info = job.wait_done(timeout=600)
    return job, work, info


# ------------------------------------------------------------------------------------ tests
@pytest.mark.timeout(900)
def test_1_a_training_job_completes_with_its_run_where_the_readme_says(straight_run):
    job, work, info = straight_run
    assert info["ExitCode"] == "0:0", job.log()
    runs = _run_folders(work)
    assert len(runs) == 1 and re.fullmatch(rf"rflow_32_\d{{8}}-\d{{6}}_job{job.id}", runs[0].name), runs
    run = runs[0]
    for name in ("config.yaml", "overrides.yaml", "metrics.jsonl", "checkpoints/latest.pt", "checkpoints/best.pt",
                 "checkpoints/epoch_0020.pt"):
        assert (run / name).is_file(), name
    assert list((run / "samples").glob("*.png"))
    assert load_checkpoint(run / "checkpoints" / "latest.pt")["step"] == 80
    log = job.log()
    assert "1 node(s) x 1 process(es), 0 GPU(s) per node" in log
    assert f"finished in epoch 20/20, step 80; checkpoints in {run / 'checkpoints'}" in log


@pytest.mark.timeout(900)
def test_2_a_time_limit_mid_run_saves_requeues_and_resumes_bit_exactly(tmp_path, slurm, phantoms, straight_run):
    work = tmp_path
    # a one-minute limit; the warning comes 10 s before it or up to a minute earlier (SLURM's timer)
    job = Job(_paths(slurm, phantoms, work), work / "slurm-%j.out", [*CPU_JOB, "--time=1", "--signal=B:USR1@10"],
              TRAIN, [*TRAIN_ARGS, "training.epochs=20"])
    info = job.wait_done(timeout=900)
    log = job.log()
    assert info["ExitCode"] == "0:0", log
    assert int(info["Restarts"]) >= 1, log  # the limit came before the end, at least once
    assert log.count("requeueing job") == int(info["Restarts"]), log
    assert "stopped on request" in log and "resumed from" in log, log
    assert "DUE TO TIME LIMIT" not in log, log  # every segment ended on the warning, none was killed
    runs = _run_folders(work)
    assert len(runs) == 1, runs  # every segment continued the one run folder
    assert _steps(runs[0]) == sorted(set(_steps(runs[0])))  # no step logged twice
    final = load_checkpoint(runs[0] / "checkpoints" / "latest.pt")
    assert final["step"] == 80
    reference = _weights(_run_folders(straight_run[1])[0] / "checkpoints" / "latest.pt")
    for k, v in reference.items():
        assert torch.equal(v, final["model"][k]), k  # bit-exact in fp32


@pytest.mark.timeout(600)
def test_3_scancel_term_saves_latest_and_ends_with_exit_75_within_killwait(tmp_path, slurm, phantoms):
    work = tmp_path
    job = Job(_paths(slurm, phantoms, work), work / "slurm-%j.out", [*CPU_JOB, "--time=30"], TRAIN,
              [*TRAIN_ARGS, "training.epochs=200"])
    run = _wait_for(lambda: next(iter(_run_folders(work)), None), job, "the run folder")
    _wait_for(lambda: (run / "checkpoints" / "latest.pt").exists(), job, "the first epoch's latest.pt")
    t0 = time.time()
    subprocess.run(["scancel", "--signal=TERM", job.id], env=slurm, check=True, timeout=60)
    info = job.wait_failed(timeout=120)
    elapsed = time.time() - t0
    log = job.log()
    assert elapsed < KILL_WAIT, f"took {elapsed:.1f} s, KillWait is {KILL_WAIT} s\n{log}"
    # stopped before done: exit 75 (not requeued: no time-limit warning came), so afterok dependents wait
    assert info["ExitCode"] == "75:0" and info["Restarts"] == "0", log
    assert "stopped on request" in log and f"continue with training.resume={run}" in log, log
    assert "medgen stopped before its work was done (exit 75)" in log and "requeueing" not in log, log
    step = load_checkpoint(run / "checkpoints" / "latest.pt")["step"]
    assert 0 < step < 800 and all(k <= step for k in _steps(run))


def _generate_args(ckpts: dict[str, Path], out: Path, n: int) -> list[str]:
    return [f"seg_checkpoint={ckpts['seg']}", f"image_checkpoint={ckpts['bravo']}", f"out_dir={out}",
            f"num_images={n}", "batch_size=2", "steps=25", "precision=fp32", "gate.enabled=false", "seed=3"]


@pytest.mark.timeout(900)
def test_4_a_preempted_generation_job_finishes_with_no_sample_lost_or_doubled(tmp_path, slurm, tiny_checkpoints):
    n = 40
    out = tmp_path / "synthetic"
    job = Job(slurm, tmp_path / "slurm-%j.out", [*CPU_JOB, "--time=30"], GENERATE,
              _generate_args(tiny_checkpoints, out, n))
    _wait_for(lambda: (out / "train").is_dir() and len(list((out / "train").glob("syn_*"))) >= 6, job,
              "6 samples")
    job.signal_batch("USR1")  # the time-limit warning, or a pre-emption
    # meanwhile, the same command uninterrupted, outside SLURM
    reference = tmp_path / "reference"
    straight = subprocess.run([sys.executable, "-m", "medgen.scripts.generate",
                               *_generate_args(tiny_checkpoints, reference, n)],
                              env={**slurm, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    info = job.wait_done(timeout=600)
    log = job.log()
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "1", log
    assert "stopped by signal" in log and "requeueing job" in log, log
    assert f"wrote {n} samples" in log, log
    names = sorted(p.name for p in (out / "train").iterdir())
    assert names == sorted(p.name for p in (reference / "train").iterdir()) and len(names) == n
    assert not list(out.glob("**/.*.tmp-*"))
    with open(out / "manifest.csv") as a, open(reference / "manifest.csv") as b:
        assert list(csv.DictReader(a)) == list(csv.DictReader(b))


@pytest.mark.timeout(900)
def test_5_two_processes_train_with_ddp_and_resume_after_preemption(tmp_path, slurm, phantoms):
    work = tmp_path
    job = Job(_paths(slurm, phantoms, work), work / "slurm-%j.out",
              [*CPU_JOB, "--ntasks-per-node=2", "--time=30"], TRAIN, [*TRAIN_ARGS, "training.epochs=16"])
    run = _wait_for(lambda: next(iter(_run_folders(work)), None), job, "the run folder")
    _wait_for(lambda: (run / "checkpoints" / "epoch_0002.pt").exists(), job, "the second epoch's snapshot")
    job.signal_batch("USR1")
    info = job.wait_done(timeout=600)
    log = job.log()
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "1", log
    assert log.count("1 node(s) x 2 process(es), 0 GPU(s) per node") == 2, log
    assert "(fp32 x 2 process(es))" in log and "stopped on request" in log, log
    assert log.count("resumed from") == 1, log  # rank 0 says it, for both
    assert _run_folders(work) == [run]
    assert load_checkpoint(run / "checkpoints" / "latest.pt")["step"] == 64
    steps = _steps(run)
    assert steps == [10, 20, 30, 40, 50, 60]  # every log_every=10 steps, each once
