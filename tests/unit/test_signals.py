"""Stop signals: caught only while a run lasts, and never inherited by pool workers."""

from __future__ import annotations

import os
import signal

import pytest

from medgen.core.signals import stop_signals
from medgen.data import phantom
from medgen.diffusion.trainer import DiffusionTrainer


def _catching(signum, frame):  # noqa: ARG001 - a handler that ignores the signal, like a run's
    pass


def test_a_caught_signal_requests_a_stop_and_the_old_handlers_come_back():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    with stop_signals() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested
        assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT]  # Ctrl-C untouched without ctrl_c
    assert {s: signal.getsignal(s) for s in before} == before
    with stop_signals(ctrl_c=True) as stop:
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C asks politely ...
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):  # ... the second one interrupts
            os.kill(os.getpid(), signal.SIGINT)
    assert {s: signal.getsignal(s) for s in before} == before


def test_training_restores_the_signal_handlers(tiny_cfg, tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    run = DiffusionTrainer(tiny_cfg("mode=seg", "training.max_steps=1"), tmp_path / "r", progress=False)
    assert run.train() == "max_steps"
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.timeout(120)
def test_phantom_pool_ends_while_the_parent_catches_sigterm(tmp_path):
    """Regression: workers forked from a process that catches SIGTERM ignored Pool.terminate()
    and hung the test run (and the CI job waiting on their output) for good."""
    previous = signal.signal(signal.SIGTERM, _catching)
    try:
        paths = phantom.generate_dataset(tmp_path / "p", subjects=2, size=24, slices=8, seed=1, workers=2)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert len(paths) == 2


def test_a_finished_training_outlives_a_late_time_limit_warning():
    """SLURM's USR1 can come while a finished run's process exits (tearing down takes seconds): it has
    nothing left to stop and must not kill the job (by default USR1 terminates a process: FAILED)."""
    import subprocess
    import sys

    code = ("import os, signal\n"
            "from medgen.scripts import train\n"
            "train._run = lambda cfg, explicit_dir, stop: 'done'  # the whole run, finished\n"
            "assert train.run(None) == 'done'\n"
            "os.kill(os.getpid(), signal.SIGUSR1)  # the warning, late\n"
            "print('still here')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "still here" in out.stdout, (out.returncode, out.stderr[-2000:])
