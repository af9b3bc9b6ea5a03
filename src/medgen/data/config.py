"""The schema of the ``data`` keys of a training config: slice selection, normalisation, split, loading.

Part of the training schema (``medgen.diffusion.config.validate_config`` checks it); the data
layer reads these keys and trusts a config that passed there.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING, DictConfig

from medgen.core.constants import IMAGE_MODALITIES
from medgen.core.schema import at_least, check, choice
from medgen.data.brain import BRAIN_METHODS

__all__ = ["DataConfig", "check_data_values"]


@dataclass
class DataConfig:
    """Types and rules only: the values (defaults included) are config.yaml's ``data`` node."""
    seg_positive_only: bool = MISSING
    min_lesion_pixels: int = at_least(0)
    min_brain_fraction: float = MISSING
    brain_intensity: float = MISSING
    brain_from: str = choice(*IMAGE_MODALITIES)
    brain_method: str = choice(*BRAIN_METHODS)
    lower_percentile: float = MISSING
    upper_percentile: float = MISSING
    val_fraction: float = MISSING
    num_workers: int = at_least(0)
    validate: bool = MISSING


def check_data_values(d: DictConfig) -> None:
    """The ranges of the ``data`` keys that field metadata cannot express (``d`` is ``cfg.data``)."""
    check(0 <= d.lower_percentile < d.upper_percentile <= 100, "data.upper_percentile",
          f"need 0 <= lower_percentile ({d.lower_percentile}) < upper_percentile ({d.upper_percentile}) <= 100")
    check(0 <= d.min_brain_fraction <= 1, "data.min_brain_fraction", "must be in [0, 1]")
    check(0 <= d.brain_intensity < 1, "data.brain_intensity", "must be in [0, 1)")
    check(0 < d.val_fraction < 1, "data.val_fraction", "must be in (0, 1)")
