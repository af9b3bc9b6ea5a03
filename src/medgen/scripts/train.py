"""``medgen-train``: train a diffusion model (any strategy x mode) from the Hydra config.

    medgen-train mode=bravo strategy=rflow training=cpu paths.data_dir=./data/phantoms
    medgen-train --cfg job                     # print the resolved config, do not run
    torchrun --nproc_per_node 4 -m medgen.scripts.train training.use_multi_gpu=true
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from medgen.scripts._cli import CONFIG_DIR, run_in_hydra_folder

log = logging.getLogger("medgen.train")


def run(cfg: DictConfig, run_dir: Path) -> str:
    """Validate, set up (distributed) training, resume if asked, train. Returns the final status."""
    from medgen.core.config import validate_config
    from medgen.core.distributed import cleanup, env_world, setup_distributed
    from medgen.diffusion.checkpointer import find_resume_checkpoint
    from medgen.diffusion.trainer import DiffusionTrainer

    _, _, world = env_world()
    cfg = validate_config(cfg, world_size=world)
    dist = setup_distributed(cfg.training.use_multi_gpu)
    try:
        ckpt = find_resume_checkpoint(cfg.training.resume, cfg)
        if ckpt is not None:
            run_dir = ckpt.parent.parent  # the run continues in its own folder
        elif cfg.training.resume == "auto":
            log.info("training.resume=auto: no earlier run found, starting fresh")
        trainer = DiffusionTrainer(cfg, run_dir, dist)
        if ckpt is not None:
            trainer.resume_from(ckpt)
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        status = trainer.train()
        if dist.is_main:
            msg = {"done": "finished", "max_steps": f"stopped at training.max_steps={cfg.training.max_steps}",
                   "stopped": "stopped by signal; resume with training.resume=auto"}[status]
            log.info("%s at epoch %d, step %d; checkpoints in %s", msg, trainer.epoch, trainer.step,
                     run_dir / "checkpoints")
        return status
    finally:
        cleanup()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _main(cfg: DictConfig) -> None:
    run_in_hydra_folder("medgen-train", run, cfg)


def main() -> None:
    _main()


if __name__ == "__main__":
    sys.exit(main())
