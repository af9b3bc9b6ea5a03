"""``medgen-lr-find``: exponential LR sweep on the configured run; writes a plot and the suggestion.

    medgen-lr-find mode=bravo training=cpu lr_find.num_steps=100
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from medgen.scripts._cli import CONFIG_DIR, run_in_hydra_folder

log = logging.getLogger("medgen.lr_find")


def run(cfg: DictConfig, out_dir: Path):
    from medgen.core.config import validate_config
    from medgen.diffusion.lr_finder import find_lr, save_lr_find
    from medgen.diffusion.trainer import DiffusionTrainer

    sweep = cfg.lr_find
    train_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "lr_find"])
    train_cfg = validate_config(train_cfg)
    trainer = DiffusionTrainer(train_cfg, out_dir)
    result = find_lr(trainer, float(sweep.min_lr), float(sweep.max_lr), int(sweep.num_steps),
                     float(sweep.smoothing), float(sweep.diverge_factor))
    png, js = save_lr_find(result, out_dir)
    print(f"suggested learning rate: {result.suggested_lr:.3g}  (minimum loss at {result.min_loss_lr:.3g})")
    print(f"plot: {png}\nvalues: {js}")
    print(f"use it with: medgen-train training.learning_rate={result.suggested_lr:.3g} ...")
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="lr_find")
def _main(cfg: DictConfig) -> None:
    run_in_hydra_folder("medgen-lr-find", run, cfg)


def main() -> None:
    _main()


if __name__ == "__main__":
    sys.exit(main())
