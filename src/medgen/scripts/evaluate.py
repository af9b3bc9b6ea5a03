"""``medgen-evaluate``: metrics, FID/KID, downstream segmentation and a report for a synthetic set.

    medgen-evaluate real_dir=data/brainmetshare-3 synthetic_dir=synthetic out_dir=evaluation
    medgen-evaluate ... budget.steps=500 seeds=[0,1,2] features.network=radimagenet
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from medgen.scripts._cli import CONFIG_DIR, given_keys, run_in_hydra_folder, warn_unused


def run(cfg: DictConfig, run_dir: Path):  # noqa: ARG001 - the run folder is out_dir itself
    from medgen.evaluation.config import unused_keys, validate_evaluate_config
    from medgen.evaluation.evaluate import evaluate
    from medgen.evaluation.report import summary_lines

    cfg = validate_evaluate_config(cfg)
    warn_unused("medgen-evaluate", unused_keys(cfg, given_keys()))
    result = evaluate(cfg)
    print("\n".join(summary_lines(result)))
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def _main(cfg: DictConfig) -> None:
    run_in_hydra_folder("medgen-evaluate", run, cfg)


def main() -> None:
    _main()


if __name__ == "__main__":
    sys.exit(main())
