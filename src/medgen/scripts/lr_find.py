"""``medgen-lr-find``: exponential LR sweep on the configured run; writes a plot and the suggestion.

    medgen-lr-find mode=bravo training=cpu lr_find.num_steps=100
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from medgen.scripts._cli import CONFIG_DIR, exit_on_user_error, given_keys, warn_unused

log = logging.getLogger("medgen.lr_find")


def _check_sweep(sweep: DictConfig) -> None:
    from medgen.core.schema import ConfigError

    checks = [(0 < sweep.min_lr < sweep.max_lr, "lr_find.max_lr",
               f"need 0 < lr_find.min_lr ({sweep.min_lr}) < lr_find.max_lr ({sweep.max_lr})"),
              (sweep.num_steps >= 5, "lr_find.num_steps", f"must be >= 5, got {sweep.num_steps}"),
              (0 <= sweep.smoothing < 1, "lr_find.smoothing", f"must be in [0, 1), got {sweep.smoothing}"),
              (sweep.diverge_factor > 1, "lr_find.diverge_factor", f"must be > 1, got {sweep.diverge_factor}")]
    for ok, key, reason in checks:
        if not ok:
            raise ConfigError(key, reason)


def lr_find_folder(cfg: DictConfig) -> Path:
    """A new folder ``<paths.model_dir>/lr_find/<mode>_<strategy>_<size>_<time>[_job<id>]``, made with
    an exclusive ``mkdir`` (``_2``, ``_3``, ... when taken): two sweeps never share one."""
    from medgen.core.paths import resolve_path
    from medgen.diffusion.run.folder import claim_new_folder, run_stem

    return claim_new_folder(resolve_path(cfg.paths.model_dir) / "lr_find", f"{cfg.mode.name}_{run_stem(cfg)}")


def run(cfg: DictConfig, out_dir: Path | None = None):
    """The sweep for ``cfg`` (a composed lr_find config) in ``out_dir``, or in a new folder of its own
    (:func:`lr_find_folder`, chosen by rank 0); the folder also gets the resolved ``config.yaml``."""
    from medgen.core.distributed import broadcast_object, cleanup, setup_distributed
    from medgen.core.precision import configure_backends
    from medgen.diffusion.config import unused_keys, validate_config
    from medgen.diffusion.lr_finder import find_lr, save_lr_find

    sweep = cfg.lr_find
    _check_sweep(sweep)
    train_cfg = validate_config(OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "lr_find"]))
    configure_backends()
    dist = setup_distributed(train_cfg.training.use_multi_gpu)
    if dist.is_main:
        warn_unused("medgen-lr-find", unused_keys(train_cfg, given_keys(), sweep=True))
    created = False
    try:
        if dist.is_main and out_dir is None:
            out_dir, created = lr_find_folder(train_cfg), True
        out_dir = broadcast_object(out_dir, dist)
        if dist.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)
        result = find_lr(train_cfg, out_dir, dist, float(sweep.min_lr), float(sweep.max_lr), int(sweep.num_steps),
                         float(sweep.smoothing), float(sweep.diverge_factor))
    except BaseException:
        if created and [p.name for p in out_dir.iterdir()] == ["config.yaml"]:
            shutil.rmtree(out_dir, ignore_errors=True)  # a sweep that stopped before writing anything
        raise
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
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    # medgen names the folder itself (unique per sweep); hydra.run.dir=... on the command line names it instead
    explicit = Path(hydra_cfg.runtime.output_dir) if str(hydra_cfg.run.dir) != "." else None
    with exit_on_user_error("medgen-lr-find"):
        run(cfg, explicit)


def main() -> None:
    _main()


if __name__ == "__main__":
    sys.exit(main())
