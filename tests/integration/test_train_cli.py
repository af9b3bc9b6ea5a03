"""medgen-train as a user runs it: real processes, signals, SIGKILL + resume, DDP on 2 CPU processes
(slow: `make test-slow`). Every test has its own timeout, so a hung DDP run fails alone."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import VOLUMES, tiny_overrides

from medgen.core.checkpoint import load_checkpoint
from medgen.core.distributed import DistInfo
from medgen.core.signals import STOPPED_EXIT
from medgen.diffusion.config import load_config
from medgen.diffusion.trainer import DiffusionTrainer

pytestmark = pytest.mark.slow
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _train_cmd(run_dir: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "medgen.scripts.train", f"hydra.run.dir={run_dir}", *overrides]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process ended ({proc.returncode}) before {path} appeared:\n{proc.stderr.read()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)


@pytest.mark.timeout(180)
def test_cfg_job_prints_the_resolved_config(tmp_path, tiny_data):
    out = subprocess.run([sys.executable, "-m", "medgen.scripts.train", "--cfg", "job", "mode=dual", "strategy=rflow"],
                         capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "name: rflow" in out.stdout and "image_keys:\n  - t1_pre\n  - t1_gd" in out.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.timeout(180)
def test_bad_config_exits_2_naming_the_key(tmp_path):
    out = subprocess.run([sys.executable, "-m", "medgen.scripts.train", "training.learning_rate=0",
                          f"hydra.run.dir={tmp_path / 'r'}"], capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 2
    assert "config error at 'training.learning_rate': must be > 0" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "r").exists()  # a run that never started leaves no folder behind


@pytest.mark.timeout(180)
def test_missing_perceptual_weights_message_from_the_command(tmp_path, tiny_data):
    env = {**ENV, "TORCH_HOME": str(tmp_path / "th")}
    out = subprocess.run(_train_cmd(tmp_path / "r", tiny_overrides(tmp_path, tiny_data, "mode=bravo",
                                                                   "training.perceptual_weight=0.001")),
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 1
    assert "training.perceptual_weight=0" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_stop_signal_saves_latest_and_exits_75(tmp_path, tiny_data, sig):
    run = tmp_path / "r"
    proc = subprocess.Popen(_train_cmd(run, tiny_overrides(tmp_path, tiny_data, "mode=seg", "training.epochs=1000")),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    _wait_for(run / "metrics.jsonl", proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == STOPPED_EXIT == 75, err  # saved, but not done: `train && next` stops here
    ckpt = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert 0 < ckpt["step"] < 1000 * 3
    assert re.search(rf"stopped on request in epoch \d+/1000, step {ckpt['step']};", out + err)
    assert f"continue with training.resume={run}" in out + err


@pytest.mark.timeout(400)
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_data, one_thread):
    over = tiny_overrides(tmp_path, tiny_data, "mode=bravo", "strategy=rflow", "training.epochs=40",
                          "training.max_steps=80", "training.val_interval=5", "training.warmup_steps=6")
    run = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(run, over), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    _wait_for(run / "checkpoints" / "epoch_0002.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(run / "checkpoints" / "latest.pt")["step"] < 80  # it really died mid-run

    resumed = subprocess.run(_train_cmd(tmp_path / "fresh", [*over, f"training.resume={run}"]),
                             capture_output=True, text=True, env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert not (tmp_path / "fresh").exists()  # continued in its own run folder
    final = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert final["step"] == 80
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert logged == sorted(logged) and len(logged) == len(set(logged))  # no step logged twice

    straight = DiffusionTrainer(load_config(over), tmp_path / "straight", DistInfo(device=torch.device("cpu")),
                                progress=False)
    straight.train()
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, final["model"][k]), k


@pytest.mark.timeout(300)
@pytest.mark.parametrize("nan_on_rank, extra", [(None, ()), (1, ()), (None, VOLUMES)],
                         ids=["clean", "NaN-on-rank-1", "volumes"])
def test_ddp_two_cpu_processes_end_with_identical_weights(tmp_path, tiny_data, nan_on_rank, extra, one_thread):
    over = tiny_overrides(tmp_path, tiny_data, "mode=bravo", "training.use_multi_gpu=true", "training.max_steps=4",
                          *extra)
    env = {**ENV, **({"MEDGEN_TEST_NAN_RANK": str(nan_on_rank)} if nan_on_rank is not None else {})}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(Path(__file__).parent / "ddp_worker.py"), str(tmp_path), *over],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["step"] == r1["step"] == 4
    assert r0["model"]["conv_in.conv.weight"].ndim == (5 if extra else 4)  # a 3D network on volumes
    assert r0["skipped"] == r1["skipped"] == ([1] if nan_on_rank is not None else [])  # same decision on both
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k
    for k in r0["ema"]:
        assert torch.equal(r0["ema"][k], r1["ema"][k]), k
    assert (tmp_path / "run" / "checkpoints" / "latest.pt").is_file()

    # validation covers the whole val split once: 2 processes give the 1-process value
    assert r0["val_loss"] == r1["val_loss"]
    single = DiffusionTrainer(load_config(over), tmp_path / "single", DistInfo(device=torch.device("cpu")),
                              progress=False)
    single.load_state_dict(load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt"))
    assert single.validation_loss() == pytest.approx(r0["val_loss"], rel=1e-5)


@pytest.mark.timeout(300)
def test_ddp_with_channels_last_trains_as_ddp_with_the_default_layout(tmp_path, tiny_data, one_thread):
    """DDP all-reduces gradients in buckets and copies them back into each weight's layout: the two
    layouts give the same training (up to the order of the convolutions' sums), on both ranks."""
    models = {}
    for layout in ("false", "true"):
        folder = tmp_path / f"channels_last_{layout}"
        over = tiny_overrides(folder, tiny_data, "mode=bravo", "training.use_multi_gpu=true", "training.max_steps=4",
                              "training.learning_rate=1e-3", f"training.channels_last={layout}")
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              str(Path(__file__).parent / "ddp_worker.py"), str(folder), *over],
                             capture_output=True, text=True, env=ENV, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        r0, r1 = (torch.load(folder / f"rank{r}.pt") for r in (0, 1))
        for k in r0["model"]:
            assert torch.equal(r0["model"][k], r1["model"][k]), k
        models[layout] = torch.cat([v.flatten() for v in r0["model"].values()])
    start = DiffusionTrainer(load_config(over), tmp_path / "start", DistInfo(device=torch.device("cpu")),
                             progress=False).model
    moved = (models["false"] - torch.cat([v.detach().flatten() for v in start.state_dict().values()])).abs().mean()
    assert moved > 1e-4
    assert (models["true"] - models["false"]).abs().mean() < 1e-3 * moved


@pytest.mark.timeout(180)
@pytest.mark.parametrize("resume", ["auto"])
def test_resume_auto_without_a_run_starts_fresh(tmp_path, tiny_data, resume):
    out = subprocess.run(_train_cmd(tmp_path / "r", tiny_overrides(tmp_path, tiny_data, "mode=seg",
                                                                   "training.max_steps=2", f"training.resume={resume}")),
                         capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "starting fresh" in out.stderr + out.stdout
    assert (tmp_path / "r" / "config.yaml").is_file() and (tmp_path / "r" / "checkpoints" / "latest.pt").is_file()


@pytest.mark.timeout(300)
def test_torchrun_ranks_agree_on_one_run_folder(tmp_path, tiny_data, one_thread):
    over = tiny_overrides(tmp_path, tiny_data, "mode=bravo", "training.use_multi_gpu=true", "training.max_steps=2")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "medgen.scripts.train", *over], capture_output=True, text=True, env=ENV, cwd=tmp_path,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = list((tmp_path / "runs" / "bravo").iterdir())  # one folder for both ranks
    assert load_checkpoint(run / "checkpoints" / "latest.pt")["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "runs"]  # nothing else in the launch folder


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy, mode", [(s, m) for s in ("ddpm", "rflow") for m in ("seg", "bravo", "dual")])
def test_every_strategy_and_mode_trains_on_volumes_from_the_command(tmp_path, tiny_data, strategy, mode):
    over = tiny_overrides(tmp_path, tiny_data, f"mode={mode}", f"strategy={strategy}", "model.image_size=[16,16,8]",
                          "training.batch_size=2", "training.max_steps=2")
    run = tmp_path / "run"
    out = subprocess.run(_train_cmd(run, over), capture_output=True, text=True, env=ENV, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"{strategy} x {mode} at 16 x 16 x 8 voxels" in out.stdout + out.stderr
    ckpt = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert ckpt["step"] == 2 and ckpt["network"]["spatial_dims"] == 3
    assert ckpt["model"]["conv_in.conv.weight"].ndim == 5  # a 3D convolution: [out, in, 3, 3, 3]
    assert sorted((run / "samples").glob("*.png"))  # the middle axial slice of each generated volume
