"""Learning-rate schedules: plain functions of the optimizer step.

The trainer takes any ``schedule(step) -> lr``; training uses :func:`warmup_cosine`, the LR
finder an exponential sweep. Because the LR is a pure function of the step, a resumed run uses
exactly the LRs of an uninterrupted one, and ``training.max_steps`` (which only caps a run)
never changes the schedule.
"""

from __future__ import annotations

import math
from typing import Callable

LRSchedule = Callable[[int], float]


def warmup_cosine(base_lr: float, warmup_steps: int, total_steps: int) -> LRSchedule:
    """Linear warm-up from ``base_lr / warmup_steps`` to ``base_lr`` over ``warmup_steps`` steps,
    then cosine decay to 0 at ``total_steps`` (Loshchilov & Hutter 2017, SGDR eq. 5 without restarts)."""
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}")

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return base_lr * (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    return schedule


def capped_warmup(requested: int, total_steps: int, max_fraction: float) -> int:
    """The warm-up actually used: ``requested`` steps, at most ``max_fraction`` of the run, so a
    short run (a debug run, a small dataset) never spends itself warming up."""
    return min(int(requested), int(max_fraction * total_steps))
