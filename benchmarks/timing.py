"""Timing shared by the benchmark scripts: wall time with the GPU's queue drained at both ends."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], device: torch.device, repeats: int = 3, warmup: bool | None = None) -> float:
    """Median wall time (seconds) of ``fn()`` over ``repeats`` runs, after one untimed run
    (``warmup``; default: when ``repeats > 1``)."""
    if warmup if warmup is not None else repeats > 1:
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
