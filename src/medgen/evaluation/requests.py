"""What an evaluation asks for, as frozen values made once from the validated config.

``medgen-evaluate`` and ``medgen-augment`` validate their config
(:func:`~medgen.evaluation.config.validate_evaluate_config`), then :func:`evaluation_request` turns
it into an :class:`EvaluationRequest`; nothing below the entry points reads the config itself.
The training budget of the segmenters stays the config's own dataclass
(:class:`~medgen.evaluation.config.BudgetConfig`), passed whole.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from medgen.core.paths import resolve_path
from medgen.data.lesions import SizeBins
from medgen.evaluation.config import BudgetConfig, size_bins

__all__ = ["SetsRequest", "FeatureRequest", "LesionRequest", "NnunetRequest", "EvaluationRequest",
           "evaluation_request"]


@dataclass(frozen=True)
class SetsRequest:
    """Which sets to compare and how to read them (:class:`~medgen.evaluation.sets.Sets`)."""

    real_dir: Path
    synthetic_dir: Path
    cache_dir: Path
    #: the in-plane size the user expects (None: the synthetic set's)
    image_size: int | None
    #: 2, 3 or None (by the synthetic set's first sample)
    spatial_dims: int | None
    val_fraction: float
    brain_intensity: float
    num_workers: int
    allow_partial: bool
    seg_net_checkpoint: str | None
    #: whether the downstream experiment runs (it needs the whole reference split)
    downstream: bool
    max_images: int
    seed: int

    def with_synthetic(self, folder: str | Path) -> "SetsRequest":
        return replace(self, synthetic_dir=resolve_path(folder))


@dataclass(frozen=True)
class FeatureRequest:
    """FID/KID: the feature network and the KID subsets; for volumes the 2.5D planes."""

    network: str
    weights_path: str | None
    batch_size: int
    kid_subsets: int
    kid_subset_size: int
    slices_per_plane: int
    plane_fraction: float


@dataclass(frozen=True)
class LesionRequest:
    """Lesion-wise figures: the size bins, the bootstrap and the yardstick rule."""

    bins: SizeBins
    resamples: int
    min_sensitivity: float
    min_dice: float


@dataclass(frozen=True)
class NnunetRequest:
    """nnU-Net v2 as the downstream segmenter: its interpreter (None: found beside medgen) and the
    training budget of every training set and seed."""

    python: str | None
    epochs: int
    iterations_per_epoch: int


@dataclass(frozen=True)
class EvaluationRequest:
    """Everything one evaluation (or augmentation experiment) is asked to do."""

    sets: SetsRequest
    features: FeatureRequest
    lesions: LesionRequest
    budget: BudgetConfig
    #: the downstream segmenter: ``dynunet`` (medgen's, trained with ``budget``) or ``nnunet``
    segmenter: str
    nnunet: NnunetRequest
    out_dir: Path
    seed: int
    seeds: tuple[int, ...]
    device: str | None
    diversity_pairs: int
    brain_intensity: float
    brain_from: str
    downstream: bool

    def budget_record(self) -> dict[str, Any]:
        """The budget as ``metrics.json`` records it."""
        return asdict(self.budget)


def evaluation_request(cfg: Any) -> EvaluationRequest:
    """The :class:`EvaluationRequest` of a validated evaluate config (the only reader of it)."""
    f, b, les = cfg.features, cfg.budget, cfg.lesions
    sets = SetsRequest(real_dir=resolve_path(cfg.real_dir), synthetic_dir=resolve_path(cfg.synthetic_dir),
                       cache_dir=resolve_path(cfg.cache_dir), image_size=cfg.image_size, spatial_dims=cfg.spatial_dims,
                       val_fraction=float(cfg.val_fraction), brain_intensity=float(cfg.brain_intensity),
                       num_workers=int(cfg.num_workers), allow_partial=bool(cfg.allow_partial),
                       seg_net_checkpoint=cfg.seg_net_checkpoint, downstream=bool(cfg.downstream),
                       max_images=int(cfg.max_images), seed=int(cfg.seed))
    features = FeatureRequest(network=str(f.network), weights_path=f.weights_path, batch_size=int(f.batch_size),
                              kid_subsets=int(f.kid_subsets), kid_subset_size=int(f.kid_subset_size),
                              slices_per_plane=int(f.slices_per_plane), plane_fraction=float(f.plane_fraction))
    lesions = LesionRequest(bins=size_bins(les.bins), resamples=int(les.resamples),
                            min_sensitivity=float(les.min_sensitivity), min_dice=float(les.min_dice))
    budget = BudgetConfig(steps=int(b.steps), batch_size=int(b.batch_size), learning_rate=float(b.learning_rate),
                          precision=str(b.precision))
    nnunet = NnunetRequest(python=cfg.nnunet.python, epochs=int(cfg.nnunet.epochs),
                           iterations_per_epoch=int(cfg.nnunet.iterations_per_epoch))
    return EvaluationRequest(sets=sets, features=features, lesions=lesions, budget=budget,
                             segmenter=str(cfg.segmenter), nnunet=nnunet,
                             out_dir=resolve_path(cfg.out_dir), seed=int(cfg.seed),
                             seeds=tuple(int(s) for s in cfg.seeds), device=cfg.device,
                             diversity_pairs=int(cfg.diversity_pairs), brain_intensity=float(cfg.brain_intensity),
                             brain_from=str(cfg.brain_from), downstream=bool(cfg.downstream))
