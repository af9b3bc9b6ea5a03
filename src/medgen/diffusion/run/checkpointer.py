"""Checkpoint policy of a training run: which files are written when, and what may resume.

``latest.pt`` is written every epoch and when a run stops; ``best.pt`` at each new lowest
validation loss; ``epoch_XXXX.pt`` snapshots, the newest ``training.checkpoint_keep`` kept.
Each file is written atomically by :func:`medgen.core.checkpoint.save_checkpoint`. A resumed
optimizer gets its parameters' memory layout back (:func:`match_state_layout`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from medgen.core.checkpoint import CheckpointError, config_diff, save_checkpoint

#: config keys that may change when resuming (everything else must match the checkpoint)
RESUME_ALLOWED = (
    "training.epochs", "training.max_steps", "training.val_interval", "training.log_every",
    "training.resume", "training.num_val_samples", "training.num_sample_steps", "training.checkpoint_keep",
    "training.compile", "training.compile_mode", "training.channels_last", "paths", "data.num_workers",
)


class Checkpointer:
    """Writes the checkpoints of one run under ``<run_dir>/checkpoints`` (main rank only)."""

    def __init__(self, run_dir: str | Path, keep: int, enabled: bool = True):
        self.folder = Path(run_dir) / "checkpoints"
        self.keep = int(keep)
        self.enabled = enabled

    def save(self, name: str, state: Mapping[str, Any]) -> Path | None:
        """Write ``state`` as ``<folder>/<name>``."""
        if not self.enabled:
            return None
        return save_checkpoint(self.folder / name, state)

    def snapshot(self, epoch: int, state: Mapping[str, Any]) -> None:
        """Write ``epoch_XXXX.pt`` and delete all but the newest ``keep`` snapshots."""
        if not self.enabled or self.keep == 0:
            return
        save_checkpoint(self.folder / f"epoch_{epoch:04d}.pt", state)
        for old in sorted(self.folder.glob("epoch_*.pt"))[: -self.keep]:
            old.unlink()


def check_resumable(ckpt: Mapping[str, Any], cfg: DictConfig, path: str | Path) -> None:
    """Refuse a checkpoint whose config differs from ``cfg`` outside :data:`RESUME_ALLOWED`,
    listing every changed key as ``key: old -> new``."""
    changes = config_diff(ckpt["config"], OmegaConf.to_container(cfg, resolve=True), RESUME_ALLOWED)
    if changes:
        raise CheckpointError(
            f"cannot resume from {path}: the config differs from the checkpoint's in\n  "
            + "\n  ".join(changes)
            + "\nrun with the checkpoint's values, or start a new run (training.resume=null)")


def match_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give each optimizer state tensor its parameter's memory layout. ``load_state_dict`` keeps the
    saved layout, and the fused AdamW walks parameter, gradient and moments as flat memory: a
    channels_last parameter with contiguous moments (a run resumed with ``training.channels_last``
    changed) would be updated with another element's moments, silently."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    optimizer.state[p][key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
