"""Size targets: how many generated masks of each lesion size class a run makes (``lesion_sizes.*``).

A mask's **size class** is the bin (``lesion_sizes.bins``: RANO-BM by default, or edges in mm) of
the Feret diameter of its largest lesion, measured with the seg model's voxel spacing. A target
gives each class a weight; the run's ``num_images`` masks are shared out by the largest-remainder
rule (:func:`quotas`), and the gate accepts a candidate only while its class still has room, in
candidate order, so the output holds exactly the requested number of each class whatever the
batch size, the number of processes or interruptions.

Targets (``lesion_sizes.target``): ``model`` (none: as the seg model draws them), ``real`` (the
classes of the seg model's training slices, recorded in its checkpoint), ``uniform``, or weights
per bin name (``{tiny: 4, small: 2, medium: 1, large: 1}``; a bin left out gets none).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from medgen.data import lesions
from medgen.data.lesions import SizeBins
from medgen.generation.models import GenerationError

__all__ = ["SizeTarget", "quotas", "resolve_target", "parse_bins"]


def parse_bins(value: Any, key: str) -> SizeBins:
    """``rano_bm`` or a list of edges in mm (a one-line :class:`GenerationError` naming ``key`` otherwise)."""
    try:
        return lesions.parse_bins(value)
    except ValueError as exc:
        raise GenerationError(f"{key}: {exc}") from None


def quotas(weights: np.ndarray, n: int) -> np.ndarray:
    """``n`` shared out in proportion to ``weights`` (>= 0, positive sum) by the largest-remainder
    rule: the counts sum to ``n`` and each is within 1 of ``n * w / sum(w)`` (ties: the earlier bin)."""
    share = n * np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    out = np.floor(share).astype(np.int64)
    order = sorted(range(len(share)), key=lambda i: (-(share[i] - out[i]), i))
    for i in order[: n - int(out.sum())]:
        out[i] += 1
    return out


@dataclass(frozen=True)
class SizeTarget:
    """What a run asks for: ``counts[b]`` masks whose largest lesion is in bin ``b`` of ``bins``."""

    source: str  #: real, uniform or weights
    bins: SizeBins
    weights: np.ndarray  #: as given, per bin
    counts: np.ndarray  #: int64 per bin, summing to num_images

    def describe(self) -> str:
        return ", ".join(f"{name} {int(c)}" for name, c in zip(self.bins.names, self.counts))

    def requested(self, candidates: Sequence[int]) -> np.ndarray:
        """The class asked of each stage-1 candidate (int64 bin indices): candidate ``j`` gets slot
        ``j mod num_images`` of the quotas spread evenly (bin ``b``'s ``k``-th slot at
        ``(k + 1/2) / counts[b]``), so any run of ``num_images`` consecutive candidates asks for each
        class its quota; fixed per candidate, whatever the batches, ranks and restarts."""
        return self._slots[np.asarray(candidates, dtype=np.int64) % len(self._slots)]

    @functools.cached_property
    def _slots(self) -> np.ndarray:
        slots = sorted(((k + 0.5) / c, b) for b, c in enumerate(self.counts.tolist()) for k in range(c))
        return np.asarray([b for _, b in slots], dtype=np.int64)


def check_conditioning(seg_mode: Any, seg_path: Any, cond_dropout: float, target: SizeTarget | None,
                       guidance: float) -> None:
    """A size-conditioned seg model and the request fit: the same bins, and guidance or drawing
    without a class only from a model trained with condition dropout (:class:`GenerationError` naming the key)."""
    bins = seg_mode.size_bins
    if bins is None:
        if guidance != 1:
            raise GenerationError(f"lesion_sizes.guidance={guidance:g}: seg_checkpoint {seg_path} is not conditioned on "
                                  "lesion sizes (trained with mode.size_bins=null); leave lesion_sizes.guidance=1")
        return
    if target is not None and target.bins != bins:
        raise GenerationError(f"lesion_sizes.bins gives {list(target.bins.names)} but seg_checkpoint {seg_path} is "
                              f"conditioned on {list(bins.names)} (mode.size_bins); ask for the bins it knows")
    unseen = "guided" if guidance != 1 and target is not None else "drawn without a class" if target is None else ""
    if unseen and cond_dropout == 0:
        raise GenerationError(f"seg_checkpoint {seg_path} was trained with training.cond_dropout=0, so its masks cannot "
                              f"be {unseen} (lesion_sizes.target={target.source if target else 'model'}, "
                              f"lesion_sizes.guidance={guidance:g}); ask for size classes with lesion_sizes.guidance=1, "
                              "or train with e.g. training.cond_dropout=0.1")


def resolve_target(cfg: Any, n: int, image_size: int, spacing: Sequence[float],
                   training_diameters: Sequence[float] | None) -> SizeTarget | None:
    """The target ``cfg.lesion_sizes`` asks for, for ``n`` masks of ``image_size`` px at ``spacing``
    mm (None for ``model``). ``training_diameters``: the largest lesion of each of the seg model's
    training slices (mm), from its checkpoint (None for a checkpoint that does not record them).

    Raises :class:`GenerationError` naming the key for an unknown preset or bin name, weights that do
    not sum to a positive number, or a requested bin whose smallest diameter does not fit the image."""
    sizes = cfg.lesion_sizes
    bins = parse_bins(sizes.bins, "lesion_sizes.bins")
    target = sizes.target
    if target is None or target == "model":
        return None
    if isinstance(target, str):
        if target == "uniform":
            weights = np.ones(len(bins))
        elif target == "real":
            if not training_diameters:
                raise GenerationError("lesion_sizes.target=real: the seg checkpoint records no training lesion sizes "
                                      "(trained with an older medgen); give weights per bin, uniform, or model")
            weights = bins.counts(training_diameters).astype(np.float64)
        else:
            raise GenerationError(f"lesion_sizes.target={target}: use model, real, uniform or weights per bin, e.g. "
                                  f"{{{', '.join(f'{b}: 1' for b in bins.names)}}}")
        source = target
    else:
        weights = _weights(target, bins)
        source = "weights"
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise GenerationError(f"lesion_sizes.target: the weights {dict(zip(bins.names, weights.tolist()))} must be "
                              ">= 0 and sum to a positive number")
    diagonal = image_size * float(np.hypot(*spacing[:2]))
    for b, name in enumerate(bins.names):
        lower = bins.edges[b - 1] if b else 0.0
        if weights[b] > 0 and lower >= diagonal:
            raise GenerationError(f"lesion_sizes.target asks for {name} lesions (>= {lower:g} mm) but the images are "
                                  f"{image_size} px of {spacing[0]:g} x {spacing[1]:g} mm: no lesion can be longer than "
                                  f"their diagonal, {diagonal:.0f} mm")
    return SizeTarget(source, bins, weights, quotas(weights, n))


def _weights(target: Mapping[str, Any], bins: SizeBins) -> np.ndarray:
    unknown = [k for k in target if k not in bins.names]
    if unknown:
        raise GenerationError(f"lesion_sizes.target: unknown bin {unknown[0]!r}; the bins of lesion_sizes.bins are "
                              f"{list(bins.names)}")
    try:
        return np.asarray([float(target.get(name, 0.0)) for name in bins.names])
    except (TypeError, ValueError):
        raise GenerationError(f"lesion_sizes.target: weights must be numbers, got {dict(target)}") from None
