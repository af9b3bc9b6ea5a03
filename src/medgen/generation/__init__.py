"""Paired synthetic data from trained checkpoints: masks (stage 1, quality gate) -> images (stage 2).

    import medgen
    result = medgen.generate(seg_checkpoint="runs/seg/<run>", image_checkpoint="runs/bravo/<run>",
                             num_images=64, out_dir="synthetic")
    result.sample_ids, result.acceptance_rate, result.manifest

``medgen-generate`` is the same function behind Hydra; every key of ``configs/generate.yaml`` is a
keyword argument here (nested keys as dicts, e.g. ``gate={"max_area": 0.05}``).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from medgen.core.schema import compose_config
from medgen.generation.config import validate_generate_config
from medgen.generation.models import GenerationError, Stage, load_stage
from medgen.generation.pipeline import GenerationResult, run_generation

__all__ = ["generate", "generate_config", "GenerationError", "GenerationResult", "Stage", "load_stage"]


def generate_config(**settings: Any) -> DictConfig:
    """The validated generate config: ``configs/generate.yaml`` with ``settings`` merged in
    (schema: :class:`medgen.generation.config.GenerateConfig`)."""
    base = compose_config([], config_name="generate")
    return validate_generate_config(OmegaConf.merge(base, OmegaConf.create(settings)))


def generate(progress: bool = True, **settings: Any) -> GenerationResult:
    """Generate a synthetic dataset (see the module docstring); returns what was written."""
    return run_generation(generate_config(**settings), progress=progress)
