"""The schema of the ``data`` keys of a training config: slice selection, normalisation, split, loading.

Part of the training schema (``medgen.diffusion.config.validate_config`` checks it); the data
layer reads these keys and trusts a config that passed there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig

from medgen.core.constants import IMAGE_MODALITIES
from medgen.core.schema import at_least, check, choice

__all__ = ["DataConfig", "check_data_values"]


@dataclass
class DataConfig:
    seg_positive_only: bool = True
    min_lesion_pixels: int = at_least(1, 0)
    min_brain_fraction: float = 0.05
    brain_intensity: float = 0.1
    brain_from: str = choice("bravo", *IMAGE_MODALITIES)
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    val_fraction: float = 0.15
    #: the shape [X, Y, Z] every volume is resampled to for a 3D model (model.spatial_dims=3)
    volume_shape: list[int] = field(default_factory=lambda: [64, 64, 32])
    num_workers: int = at_least(2, 0)
    validate: bool = True


def check_data_values(d: DictConfig) -> None:
    """The ranges of the ``data`` keys that field metadata cannot express (``d`` is ``cfg.data``)."""
    check(0 <= d.lower_percentile < d.upper_percentile <= 100, "data.upper_percentile",
          f"need 0 <= lower_percentile ({d.lower_percentile}) < upper_percentile ({d.upper_percentile}) <= 100")
    check(0 <= d.min_brain_fraction <= 1, "data.min_brain_fraction", "must be in [0, 1]")
    check(0 <= d.brain_intensity < 1, "data.brain_intensity", "must be in [0, 1)")
    check(0 < d.val_fraction < 1, "data.val_fraction", "must be in (0, 1)")
