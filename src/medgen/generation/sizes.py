"""Size and count targets: how many generated masks of each lesion class a run makes
(``lesion_sizes.*``, ``lesion_counts.*``).

A mask's **size class** is the bin (``lesion_sizes.bins``: RANO-BM by default, or edges in mm) of
the Feret diameter of its largest lesion, measured with the seg model's voxel spacing; its **count
class** is the class (``lesion_counts.classes``: 1, 2, 3, 4+ by default) of its number of lesions
(connected components, as the gate counts them). A target gives each class a weight; the run's
``num_images`` masks are shared out by the largest-remainder rule (:func:`quotas`), and the gate
accepts a candidate only while its size class *and* its count class still have room, in candidate
order, so the output holds exactly the requested number of each class of both whatever the batch
size, the number of processes or interruptions. The two are shared out independently: the output
matches each distribution asked for, and how sizes and counts go together is the model's.

Targets (``lesion_sizes.target``, ``lesion_counts.target``): ``model`` (none: as the seg model
draws them), ``real`` (the classes of the seg model's training slices with a lesion, recorded in
its checkpoint), ``uniform``, or weights per class name (``{tiny: 4, small: 2, medium: 1, large:
1}``, ``{1: 3, 2: 1, 3+: 1}``; a class left out gets none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from medgen.data import lesions
from medgen.data.lesions import SizeBins
from medgen.data.space import SampleSpace
from medgen.generation.models import GenerationError
from medgen.generation.requests import CountRequest, SizeRequest
from medgen.generation.requests import quota_keys  # noqa: F401 - generation.config validates with it

__all__ = ["ClassTarget", "Targets", "conditioned_groups", "count_classes", "hard_to_draw", "parse_bins", "pixel_edge",
           "parse_target", "quota_keys", "quotas", "requested_quotas", "resolve_count_target",
           "resolve_target", "slot_class"]


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
class ClassTarget:
    """What a run asks of one kind of class (``key``: ``lesion_sizes`` or ``lesion_counts``):
    ``counts[b]`` masks in class ``b`` of ``bins``."""

    key: str
    source: str  #: real, uniform or weights
    bins: SizeBins
    weights: np.ndarray  #: as given, per class
    counts: np.ndarray  #: int64 per class, summing to num_images

    def describe(self) -> str:
        return ", ".join(f"{name} {int(c)}" for name, c in zip(self.bins.names, self.counts))

    def requested(self, candidates: Sequence[int]) -> np.ndarray:
        """The class asked of each stage-1 candidate (int64 class indices): candidate ``j`` gets slot
        ``j mod num_images`` of the quotas spread evenly (class ``b``'s ``k``-th slot at
        ``(k + 1/2) / counts[b]``, ties to the earlier class), so any run of ``num_images``
        consecutive candidates asks for each class its quota; fixed per candidate, whatever the
        batches, ranks and restarts. Each slot's class is computed on its own (:func:`slot_class`),
        so the memory does not grow with ``num_images``."""
        n = int(self.counts.sum())
        counts = tuple(int(c) for c in self.counts)
        return np.asarray([slot_class(counts, int(j) % n) for j in candidates], dtype=np.int64)


def slot_class(counts: Sequence[int], slot: int) -> int:
    """The class of slot ``slot`` (0-based) when class ``b``'s ``k``-th slot sits at ``(k + 1/2) /
    counts[b]`` and the ``sum(counts)`` slots are sorted by position, ties to the earlier class.

    The slot of class ``b``'s ``k``-th position is its rank: ``k`` plus, per other class ``c``, its
    positions before it, ``#{i < counts[c] : (2i + 1) counts[b] < (2k + 1) counts[c]}`` (``<=`` for
    an earlier class), exact in integers. The rank grows with ``k``, so a bisection over ``k`` per
    class finds the one position at ``slot``: O(classes² log n), no list of n slots."""
    def rank(b: int, k: int) -> int:
        out = k
        for c, nc in enumerate(counts):
            if c == b or nc == 0:
                continue
            m = (2 * k + 1) * nc  # position of (b, k) scaled by 2 counts[b] counts[c], against (2i + 1) counts[b]
            odd = m // counts[b] if c < b else (m - 1) // counts[b]  # the largest odd 2i + 1 allowed, or one more
            out += min(nc, max(0, (odd + 1) // 2))
        return out

    for b, nb in enumerate(counts):
        lo, hi = 0, nb - 1
        while lo <= hi:
            k = (lo + hi) // 2
            r = rank(b, k)
            if r == slot:
                return b
            lo, hi = (k + 1, hi) if r < slot else (lo, k - 1)
    raise ValueError(f"slot {slot} is outside the {sum(counts)} slots of {list(counts)}")


@dataclass(frozen=True)
class Targets:
    """The size and the count target of a run (either None: not targeted)."""

    sizes: ClassTarget | None = None
    counts: ClassTarget | None = None

    def __bool__(self) -> bool:
        return self.sizes is not None or self.counts is not None

    def items(self) -> list[tuple[str, ClassTarget]]:
        return [(name, t) for name, t in (("sizes", self.sizes), ("counts", self.counts)) if t is not None]

    def classes(self, largest_mm: float, lesions: int) -> dict[str, int]:
        """The class of a mask with a lesion under each target, by target name."""
        value = {"sizes": largest_mm, "counts": lesions}
        return {name: int(t.bins.index(value[name])) for name, t in self.items()}


def count_classes(value: Any) -> SizeBins:
    """:func:`medgen.data.lesions.parse_count_classes` (a one-line :class:`GenerationError` naming
    ``lesion_counts.classes`` otherwise)."""
    try:
        return lesions.parse_count_classes(value)
    except ValueError as exc:
        raise GenerationError(f"lesion_counts.classes: {exc}") from None


def conditioned_groups(seg_mode: Any) -> dict[str, SizeBins]:
    """The targets a seg model is conditioned on, by name, with its classes: ``sizes``
    (``mode.size_bins``) and ``counts`` (``mode.count_classes``); empty for an unconditional one."""
    groups = {"sizes": getattr(seg_mode, "size_bins", None), "counts": getattr(seg_mode, "count_classes", None)}
    return {name: bins for name, bins in groups.items() if bins is not None}


def check_conditioning(seg_mode: Any, seg_path: Any, cond_dropout: float, targets: Targets, guidance: float) -> None:
    """A lesion-conditioned seg model and the request fit: the same classes, a class asked of every
    group it is conditioned on (or of none), and guidance or drawing without a class only from a
    model trained with condition dropout (:class:`GenerationError` naming the key)."""
    groups = {"sizes": ("lesion_sizes", "bins", "mode.size_bins"),
              "counts": ("lesion_counts", "classes", "mode.count_classes")}
    conditioned = conditioned_groups(seg_mode)
    if not conditioned:
        if guidance != 1:
            raise GenerationError(f"lesion_sizes.guidance={guidance:g}: seg_checkpoint {seg_path} is not conditioned on "
                                  "lesion sizes or counts (trained with mode.size_bins=null, mode.count_classes=null); "
                                  "leave lesion_sizes.guidance=1")
        return
    asked = dict(targets.items())
    for name, bins in conditioned.items():
        key, field, mode_key = groups[name]
        if name in asked and asked[name].bins.edges != bins.edges:  # the same edges under other names are the same classes
            raise GenerationError(f"{key}.{field} gives {list(asked[name].bins.names)} but seg_checkpoint {seg_path} is "
                                  f"conditioned on {list(bins.names)} ({mode_key}); ask for the classes it knows")
    given = [name for name in conditioned if name in asked]
    if not given and guidance != 1:
        raise GenerationError(f"lesion_sizes.guidance={guidance:g} guides seg_checkpoint {seg_path} toward the classes "
                              "asked, and lesion_sizes.target and lesion_counts.target ask for none (model): ask for "
                              "classes, or leave lesion_sizes.guidance=1")
    if given and len(given) < len(conditioned):
        keys = " and ".join(groups[n][0] + ".target" for n in conditioned)
        raise GenerationError(f"seg_checkpoint {seg_path} is conditioned on lesion {' and '.join(conditioned)} "
                              f"({', '.join(groups[n][2] for n in conditioned)}): set {keys} both to a target "
                              "(not model), or both to model")
    unseen = "guided" if guidance != 1 and given else "drawn without a class" if not given else ""
    if unseen and cond_dropout == 0:
        sources = ", ".join(f"{groups[n][0]}.target={asked[n].source if n in asked else 'model'}" for n in conditioned)
        raise GenerationError(f"seg_checkpoint {seg_path} was trained with training.cond_dropout=0, so its masks cannot "
                              f"be {unseen} ({sources}, lesion_sizes.guidance={guidance:g}); ask for its classes with "
                              "lesion_sizes.guidance=1, or train with e.g. training.cond_dropout=0.1")


def resolve_target(request: SizeRequest, n: int, space: SampleSpace,
                   training_diameters: Sequence[float] | None) -> ClassTarget | None:
    """The size target ``request`` (``lesion_sizes``) asks for, for ``n`` masks of ``space`` (None for
    ``model``). ``training_diameters``: the largest lesion of each of the seg model's training slices
    or volumes with a lesion (mm), from its checkpoint (None for an image model's).

    Raises :class:`GenerationError` naming the key for an unknown preset or bin name, weights that do
    not sum to a positive number, or a requested bin whose smallest diameter does not fit the masks."""
    bins = parse_bins(request.bins, "lesion_sizes.bins")
    target = _resolve("lesion_sizes", request.target, bins, n, training_diameters, "sizes")
    diagonal = float(np.sqrt(sum((int(k) * float(s)) ** 2 for k, s in zip(space.shape, space.mm))))
    for b, name in enumerate(bins.names):
        lower = bins.edges[b - 1] if b else 0.0
        if target is not None and target.weights[b] > 0 and lower >= diagonal:
            raise GenerationError(f"lesion_sizes.target asks for {name} lesions (>= {lower:g} mm) but the masks are "
                                  f"{space.describe_spacing()}: no lesion can be longer than their diagonal, "
                                  f"{diagonal:.0f} mm")
    return target


def resolve_count_target(request: CountRequest, n: int, training_counts: Sequence[int] | None,
                         max_components: int) -> ClassTarget | None:
    """The count target ``request`` (``lesion_counts``) asks for, for ``n`` masks (None for ``model``).
    ``training_counts``: the lesions of each of the seg model's training slices with a lesion.

    Raises :class:`GenerationError` naming the key for an unknown preset or class, weights that do
    not sum to a positive number, or a class of more lesions than ``max_components``
    (``gate.max_components``) allows."""
    classes = count_classes(request.classes)
    target = _resolve("lesion_counts", request.target, classes, n, training_counts, "counts")
    for b, name in enumerate(classes.names):
        lower = int(classes.edges[b - 1]) if b else 1
        if target is not None and target.weights[b] > 0 and lower > max_components:
            raise GenerationError(f"lesion_counts.target asks for masks of {name} lesions but the gate rejects masks of "
                                  f"more than gate.max_components={max_components}; raise it or ask for fewer lesions")
    return target


def hard_to_draw(target: ClassTarget, space: SampleSpace, pixels: float = 4.0) -> list[str]:
    """The size classes ``target`` asks for whose lesions all measure under ``pixels`` pixels (or
    voxels) across in ``space`` (a seg model at that resolution rarely draws them), as
    ``"name (< edge mm)"``. See :func:`pixel_edge`."""
    across = pixels * pixel_edge(space)
    return [f"{name} (< {edge:g} mm)" for b, (name, edge) in enumerate(zip(target.bins.names, target.bins.edges))
            if target.counts[b] > 0 and edge < across]


def pixel_edge(space: SampleSpace) -> float:
    """The mm one step of the grid spans: a slice's pixel width (x), or the edge of the cube of a
    voxel's volume, so that a coarse through-plane spacing counts too."""
    return space.either(float(space.mm[0]), space.element_mm3 ** (1 / 3))


def _resolve(key: str, target: Any, bins: SizeBins, n: int, recorded: Sequence[float] | None,
             what: str) -> ClassTarget | None:
    """``key.target`` (model, real, uniform or weights per class of ``bins``) as quotas of ``n``
    masks; ``recorded``: the value of each training slice with a lesion (``what`` it records)."""
    source, weights = parse_target(key, target, bins)
    if source == "model":
        return None
    if source == "real":
        if not recorded:
            raise GenerationError(f"{key}.target=real: the seg checkpoint records no training lesion {what}; give "
                                  "weights per class, uniform, or model")
        weights = bins.counts(recorded).astype(np.float64)
    return ClassTarget(key, source, bins, weights, quotas(weights, n))


def parse_target(key: str, target: Any, bins: SizeBins) -> tuple[str, np.ndarray | None]:
    """``key.target`` as (source, weights): ``("model", None)``, ``("real", None)`` (weights from the
    training lesions, resolved later), ``("uniform", ones)`` or ``("weights", per class)`` from a
    mapping of class names (``{tiny: 4, small: 1}``, a class left out gets 0) or a list in class
    order (``[4, 1, 0, 0]``: the form for class names the command line cannot spell, such as
    ``<10mm``). A one-line :class:`GenerationError` naming ``key`` for anything else."""
    example = "{" + ", ".join(f"{b}: 1" for b in bins.names) + "}"
    if target is None or isinstance(target, str):
        if target in (None, "model", "real"):
            return target or "model", None
        if target == "uniform":
            return "uniform", np.ones(len(bins))
        raise GenerationError(f"{key}.target={target}: use model, real, uniform or weights per class, e.g. {example} "
                              f"or in class order [{', '.join('1' for _ in bins.names)}]")
    if isinstance(target, Mapping):
        weights = _weights(key, target, bins)
    elif isinstance(target, Sequence) and not isinstance(target, (bytes, str)):
        if len(target) != len(bins):
            raise GenerationError(f"{key}.target: a list gives one weight per class in order, {len(bins)} for "
                                  f"{list(bins.names)}; got {len(target)}: {list(target)}")
        weights = _numbers(key, list(target), bins)
    else:
        raise GenerationError(f"{key}.target={target!r}: use model, real, uniform, weights per class, e.g. {example}, "
                              f"or a list of {len(bins)} weights in class order")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise GenerationError(f"{key}.target: the weights {dict(zip(bins.names, weights.tolist()))} must be "
                              ">= 0 and sum to a positive number")
    return "weights", weights


def requested_quotas(sizes: SizeRequest, counts: CountRequest) -> list[str]:
    """``lesion_sizes`` and/or ``lesion_counts`` where the requests ask for quotas of their own
    (``uniform`` or weights, not ``real`` or ``model``): the requests only a gate, or picking real masks,
    can meet. Each target is parsed (:func:`parse_target`), so a bad one is a one-line error naming its key."""
    groups = (("lesion_sizes", sizes.target, parse_bins(sizes.bins, "lesion_sizes.bins")),
              ("lesion_counts", counts.target, count_classes(counts.classes)))
    return [key for key, target, bins in groups if parse_target(key, target, bins)[0] in ("uniform", "weights")]


def _weights(key: str, target: Mapping[Any, Any], bins: SizeBins) -> np.ndarray:
    given = {str(k): v for k, v in target.items()}  # a YAML key 1 is an int; class names are strings
    unknown = [k for k in given if k not in bins.names]
    if unknown:
        which = "lesion_sizes.bins" if key == "lesion_sizes" else "lesion_counts.classes"
        raise GenerationError(f"{key}.target: unknown class {unknown[0]!r}; the classes of {which} are "
                              f"{list(bins.names)} (or give a list of {len(bins)} weights in class order)")
    return _numbers(key, [given.get(name, 0.0) for name in bins.names], bins)


def _numbers(key: str, values: list[Any], bins: SizeBins) -> np.ndarray:
    try:
        if any(isinstance(v, bool) or v is None for v in values):
            raise TypeError
        return np.asarray([float(v) for v in values])
    except (TypeError, ValueError):
        raise GenerationError(f"{key}.target: weights must be numbers, got "
                              f"{dict(zip(bins.names, values))}") from None
