"""What a training run records while it trains: TensorBoard events and ``metrics.jsonl``
(:class:`RunLogger`), and the count of skipped, non-finite steps (:class:`SkipTracker`).

Training statistics are accumulated on the device every step and read back (one host sync)
only every ``log_every`` steps. Only the main rank writes; on other ranks the logger keeps
nothing and writes nothing.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from medgen.core.jsonio import append_jsonl

log = logging.getLogger("medgen.train")

#: training loss is also logged per timestep bin (``loss_by_timestep/bin_XX``), this many bins
N_TIMESTEP_BINS = 10
_WINDOW_KEYS = ("loss", "mse", "perceptual", "grad_norm")


class RunLogger:
    """Accumulates step statistics and writes them to ``<run_dir>/tensorboard`` and ``metrics.jsonl``.

    Args:
        run_dir: the run folder.
        device: where the step statistics live.
        num_train_timesteps: ``T``, to bin timesteps.
        enabled: False on every rank but the main one.
    """

    def __init__(self, run_dir: str | Path, device: torch.device, num_train_timesteps: int, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.device = device
        self.num_train_timesteps = num_train_timesteps
        self.enabled = enabled
        self.writer: SummaryWriter | None = None
        self.reset()

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    # ------------------------------------------------------------------ files
    def open(self, step: int) -> None:
        """Start writing at ``step``: later TensorBoard events and JSON lines of a resumed run
        replace those that an interrupted run wrote after its last checkpoint."""
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.drop_metrics_after(step)
        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=step or None)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None

    def drop_metrics_after(self, step: int) -> None:
        """Remove ``metrics.jsonl`` lines past ``step`` (they are redone after a resume) and a torn
        last line (a kill in the middle of a write), with a warning."""
        path = self.metrics_path
        if not self.enabled or not path.is_file():
            return
        text = path.read_text(errors="replace")
        lines = text.splitlines()
        kept = []
        for i, line in enumerate(lines):
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a record")
            except ValueError:
                if line.strip():
                    log.warning("%s: dropping unreadable line %d (a run killed while writing it)", path, i + 1)
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        if len(kept) != len(lines) or (text and not text.endswith("\n")):
            path.write_text("".join(line + "\n" for line in kept))

    # ------------------------------------------------------------------ step statistics
    def reset(self) -> None:
        z = lambda: torch.zeros((), device=self.device)  # noqa: E731
        self._window: dict[str, Any] = {k: z() for k in _WINDOW_KEYS}
        self._window.update(n=z(), images=0, t0=time.perf_counter())  # n: applied steps, on the device
        self._bin_sum = torch.zeros(N_TIMESTEP_BINS, device=self.device)
        self._bin_count = torch.zeros(N_TIMESTEP_BINS, device=self.device)

    def record_step(self, values: Mapping[str, torch.Tensor], images: int, applied: torch.Tensor) -> None:
        """Add one step's scalars (device tensors: loss, mse, perceptual, grad_norm) if ``applied``
        (a device bool: a skipped step's non-finite values are left out), without a host sync."""
        if not self.enabled:
            return
        for k in _WINDOW_KEYS:
            self._window[k] += torch.where(applied, values[k].float(), 0.0)
        self._window["n"] += applied.float()
        self._window["images"] += images

    def record_bins(self, t: torch.Tensor, per_sample: torch.Tensor, applied: torch.Tensor) -> None:
        """Accumulate per-sample losses ``[B]`` by timestep ``t [B]`` bin if ``applied``, on the device."""
        if not self.enabled:
            return
        bins = (t.float() / self.num_train_timesteps * N_TIMESTEP_BINS).long().clamp(0, N_TIMESTEP_BINS - 1)
        self._bin_sum.index_add_(0, bins, torch.where(applied, per_sample.float(), 0.0))
        self._bin_count.index_add_(0, bins, applied.float().expand(per_sample.shape[0]).contiguous())

    def flush(self, step: int, epoch: int, lr: float) -> dict[str, float] | None:
        """Write the window's means at ``step`` and start a new window; returns them (None if empty)."""
        w = self._window
        if not self.enabled:
            return None
        sums = torch.stack([w["n"], *(w[k] for k in _WINDOW_KEYS)]).tolist()  # the one host read per window
        n = sums[0]
        if n == 0:
            self.reset()
            return None
        elapsed = max(1e-9, time.perf_counter() - w["t0"])
        stats = {k: v / n for k, v in zip(_WINDOW_KEYS, sums[1:])}
        stats["lr"] = lr
        stats["images_per_sec"] = w["images"] / elapsed
        stats["peak_memory_mb"] = self._peak_memory_mb()
        bins = (self._bin_sum / self._bin_count.clamp(min=1)).tolist()
        counts = self._bin_count.tolist()
        if self.writer is not None:
            tags = {"loss/total": "loss", "loss/mse": "mse", "loss/perceptual": "perceptual", "train/lr": "lr",
                    "train/grad_norm": "grad_norm", "perf/images_per_sec": "images_per_sec",
                    "perf/peak_memory_mb": "peak_memory_mb"}
            for tag, key in tags.items():
                self.writer.add_scalar(tag, stats[key], step)
            for i, (v, c) in enumerate(zip(bins, counts)):
                if c > 0:
                    self.writer.add_scalar(f"loss_by_timestep/bin_{i:02d}", v, step)
        append_jsonl(self.metrics_path, {"step": step, "epoch": epoch, **stats})
        self.reset()
        return stats

    def _peak_memory_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    # ------------------------------------------------------------------ validation
    def validation(self, step: int, epoch: int, val_loss: float, grid: np.ndarray | None) -> None:
        """The validation loss (``val/loss``) and the sample grid (``samples``)."""
        if not self.enabled:
            return
        if self.writer is not None:
            if math.isfinite(val_loss):
                self.writer.add_scalar("val/loss", val_loss, step)
            if grid is not None:
                self.writer.add_image("samples", grid[None], step)
        append_jsonl(self.metrics_path, {"step": step, "epoch": epoch, "val_loss": val_loss})


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many non-finite losses in a row)."""


class SkipTracker:
    """Non-finite steps counted on the device, so that deciding a skip never makes the host wait:
    how many since the last read, the longest run of them in a row, the last one's step."""

    def __init__(self, device: torch.device):
        z = lambda: torch.zeros((), dtype=torch.long, device=device)  # noqa: E731
        self.device = device
        self.streak, self.longest, self.count, self.last = z(), z(), z(), z()

    def record(self, ok: torch.Tensor, step: int) -> None:
        bad = (~ok).long()
        self.streak = (self.streak + 1) * bad
        self.longest = torch.maximum(self.longest, self.streak)
        self.count = self.count + bad
        self.last = torch.where(ok, self.last, torch.full((), step, dtype=torch.long, device=self.device))

    def read(self) -> tuple[int, int, int]:
        """(skipped, longest run in a row, last skipped step) since the last read; one host sync."""
        n, longest, last = torch.stack([self.count, self.longest, self.last]).tolist()
        self.count.zero_()
        self.longest.copy_(self.streak)
        return n, longest, last

    def check(self, max_in_a_row: int) -> None:
        """Warn about the steps skipped since the last check (one host read); raise
        :class:`TrainingStopped` once ``max_in_a_row`` of them came in a row."""
        n, longest, last = self.read()
        if n == 0:
            return
        log.warning("%d step(s) skipped since the last report: non-finite loss or gradient (the last at step %d)",
                    n, last)
        if longest >= max_in_a_row:
            raise TrainingStopped(
                f"{longest} non-finite losses in a row, the last at step {last}; "
                "lower training.learning_rate, keep gradient clipping on, or check the data "
                "(medgen-data check)")

    def streak_now(self) -> int:
        return int(self.streak)

    def load(self, streak: int) -> None:
        self.streak.fill_(streak)
        self.longest.fill_(streak)
