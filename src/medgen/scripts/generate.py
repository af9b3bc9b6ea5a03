"""``medgen-generate``: a paired synthetic dataset (masks, then images) from trained checkpoints.

    medgen-generate seg_checkpoint=runs/seg/<run> image_checkpoint=runs/bravo/<run> num_images=1000
    medgen-generate masks_from=data/phantoms image_checkpoint=runs/bravo/<run> format=nnunet
    torchrun --nproc_per_node 4 -m medgen.scripts.generate ...   # samples sharded across GPUs
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from medgen.scripts._cli import CONFIG_DIR, command_line, run_in_hydra_folder


def run(cfg: DictConfig, run_dir: Path):  # noqa: ARG001 - the run folder is out_dir itself
    """Generate; a run stopped by a signal returns ``status == "stopped"`` (exit 75)."""
    from medgen.core.distributed import cleanup, setup_distributed
    from medgen.core.schema import ConfigError
    from medgen.generation import run_generation
    from medgen.generation.config import validate_generate_config

    cfg = validate_generate_config(cfg)
    try:
        dist = setup_distributed(use_multi_gpu=True, device=cfg.device)
    except RuntimeError as exc:
        raise ConfigError("device", str(exc)) from None
    try:
        result = run_generation(cfg, dist, command=command_line("medgen-generate"))
    finally:
        cleanup()
    if dist.is_main and result.status == "done":
        rate = "" if result.acceptance_rate is None else f"; quality gate acceptance {100 * result.acceptance_rate:.1f}%"
        print(f"{len(result.sample_ids)} samples in {result.out_dir / cfg.split}{rate}")
        print(f"manifest: {result.manifest}\ncontact sheet: {result.contact_sheet}")
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="generate")
def _main(cfg: DictConfig) -> None:
    run_in_hydra_folder("medgen-generate", run, cfg)


def main() -> None:
    _main()


if __name__ == "__main__":
    sys.exit(main())
