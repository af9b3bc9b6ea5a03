"""Learning-rate range test (Smith 2017, "Cyclical Learning Rates", section 3.3).

The LR grows exponentially from ``min_lr`` to ``max_lr`` over ``num_steps`` real training
steps of the configured run (same model, strategy, mode, loss and data); the smoothed loss
is recorded until it diverges. The suggestion is the LR of steepest descent of the smoothed
loss, capped at a tenth of the LR at the minimum loss (the usual safe choice).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from medgen.core.distributed import DistInfo
from medgen.diffusion.trainer import DiffusionTrainer, StepResult


@dataclass
class LRFindResult:
    lrs: list[float]
    losses: list[float]  # smoothed
    raw_losses: list[float]
    suggested_lr: float
    min_loss_lr: float
    diverged: bool


def lr_schedule(min_lr: float, max_lr: float, num_steps: int) -> np.ndarray:
    """``[num_steps]`` LRs, geometric from ``min_lr`` to ``max_lr`` inclusive."""
    if not 0 < min_lr < max_lr:
        raise ValueError(f"need 0 < min_lr ({min_lr}) < max_lr ({max_lr})")
    if num_steps < 5:
        raise ValueError(f"num_steps must be >= 5, got {num_steps}")
    return np.geomspace(min_lr, max_lr, num_steps)


def suggest_lr(lrs: np.ndarray, losses: np.ndarray) -> tuple[float, float]:
    """(suggested LR, LR at the minimum loss) from a smoothed loss curve.

    The steepest descent is searched between the first tenth of the sweep (where the moving
    average is still settling and tiny LRs change nothing) and the minimum."""
    i_min = int(np.argmin(losses))
    min_loss_lr = float(lrs[i_min])
    skip = max(1, len(lrs) // 10)
    if i_min - skip < 2:
        return min_loss_lr / 10, min_loss_lr
    grad = np.gradient(losses[skip : i_min + 1], np.log(lrs[skip : i_min + 1]))
    steepest = float(lrs[skip + int(np.argmin(grad))])
    return min(steepest, min_loss_lr / 10), min_loss_lr


def find_lr(cfg: DictConfig, run_dir: str | Path, dist: DistInfo | None = None, min_lr: float = 1e-7,
            max_lr: float = 1e-1, num_steps: int = 100, smoothing: float = 0.05, diverge_factor: float = 4.0,
            progress: bool = True) -> LRFindResult:
    """Run the sweep with a trainer of ``cfg`` whose LR schedule is the sweep (its weights are thrown away)."""
    from tqdm.auto import tqdm

    sweep = lr_schedule(min_lr, max_lr, num_steps)
    trainer = DiffusionTrainer(cfg, run_dir, dist, lr_schedule=lambda step: float(sweep[min(step, num_steps - 1)]),
                               progress=progress)
    lrs: list[float] = []
    smooth: list[float] = []
    raw: list[float] = []
    avg, best, diverged = 0.0, math.inf, False
    bar = tqdm(total=num_steps, desc="LR sweep", disable=not progress)

    def record(result: StepResult) -> bool:
        """Smooth and record the loss of the step just run; True (stop) once it diverges."""
        nonlocal avg, best, diverged
        lr, loss = trainer.lr_schedule(trainer.step - 1), float(result.loss)
        if not math.isfinite(loss):
            diverged = True
            return True
        # exponential moving average from 0 with bias correction (as in Adam): unbiased from step 1
        avg = smoothing * loss + (1 - smoothing) * avg if 0 < smoothing < 1 else loss
        corrected = avg / (1 - (1 - smoothing) ** (len(lrs) + 1)) if 0 < smoothing < 1 else avg
        lrs.append(lr)
        smooth.append(corrected)
        raw.append(loss)
        best = min(best, corrected)
        bar.update(1)
        bar.set_postfix(lr=f"{lr:.2e}", loss=f"{corrected:.4f}")
        diverged = corrected > diverge_factor * best
        return diverged

    trainer.fit(num_steps, record)
    bar.close()
    if len(lrs) < 5:
        raise RuntimeError(f"the LR sweep stopped after {len(lrs)} steps (loss not finite); lower lr_find.min_lr")
    suggested, at_min = suggest_lr(np.asarray(lrs), np.asarray(smooth))
    return LRFindResult(lrs, smooth, raw, suggested, at_min, diverged)


def plot_lr_find(result: LRFindResult, path: str | Path) -> Path:
    """Loss-vs-LR plot (log x) with the suggestion marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(result.lrs, result.raw_losses, color="0.75", lw=0.8, label="loss")
    ax.plot(result.lrs, result.losses, color="C0", lw=1.8, label="smoothed loss")
    ax.axvline(result.suggested_lr, color="C3", ls="--", label=f"suggested lr = {result.suggested_lr:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    hi = np.percentile(result.losses, 95)
    ax.set_ylim(min(result.losses) * 0.9, hi * 1.2)
    ax.set_title("LR range test")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def save_lr_find(result: LRFindResult, folder: str | Path) -> tuple[Path, Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lr_find.json").write_text(json.dumps(asdict(result), indent=1))
    return plot_lr_find(result, folder / "lr_find.png"), folder / "lr_find.json"
