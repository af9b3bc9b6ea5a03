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


def _check_sweep(sweep: DictConfig) -> None:
    from medgen.core.config import ConfigError

    checks = [(0 < sweep.min_lr < sweep.max_lr, "lr_find.max_lr",
               f"need 0 < lr_find.min_lr ({sweep.min_lr}) < lr_find.max_lr ({sweep.max_lr})"),
              (sweep.num_steps >= 5, "lr_find.num_steps", f"must be >= 5, got {sweep.num_steps}"),
              (0 <= sweep.smoothing < 1, "lr_find.smoothing", f"must be in [0, 1), got {sweep.smoothing}"),
              (sweep.diverge_factor > 1, "lr_find.diverge_factor", f"must be > 1, got {sweep.diverge_factor}")]
    for ok, key, reason in checks:
        if not ok:
            raise ConfigError(key, reason)


def run(cfg: DictConfig, out_dir: Path):
    from medgen.core.config import validate_config
    from medgen.core.distributed import cleanup, setup_distributed
    from medgen.diffusion.lr_finder import find_lr, save_lr_find

    sweep = cfg.lr_find
    _check_sweep(sweep)
    train_cfg = validate_config(OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "lr_find"]))
    dist = setup_distributed(train_cfg.training.use_multi_gpu)
    try:
        result = find_lr(train_cfg, out_dir, dist, float(sweep.min_lr), float(sweep.max_lr), int(sweep.num_steps),
                         float(sweep.smoothing), float(sweep.diverge_factor))
    finally:
        cleanup()
    if not dist.is_main:
        return result
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
