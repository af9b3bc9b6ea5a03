"""Stage 1: the masks a run paints, sampled through the quality gate, or real ones (``masks_from``).

Candidate ``j`` draws its noise from ``sample_seed(seed, j, MASK_STREAM)``; the accepted masks
are the first ``num_images`` candidates, in candidate order, that pass the gate (and, with size or
count targets, fit classes that still have room: :mod:`medgen.generation.sizes`), whatever the
batch size or the number of processes. Each evaluated batch is kept as one block file in
``<out_dir>/.medgen/masks/`` (``block_<first>_<count>_r<rank>.npz``), so a restarted run
evaluates only the candidates no earlier run did.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as torch_dist
from tqdm.auto import tqdm

from medgen.core.constants import BRAIN_KEY, MASK_KEY
from medgen.core.distributed import DistInfo, any_rank
from medgen.core.fs import atomic_write
from medgen.core.paths import resolve_path
from medgen.core.signals import StopRequest
from medgen.data.brain import convex_hull
from medgen.data.lesions import largest_diameter
from medgen.data.masks import is_lesion
from medgen.data.nifti_dataset import DataError
from medgen.data.space import SampleSpace
from medgen.diffusion.utils import sample_seed
from medgen.generation import gate as quality_gate
from medgen.generation.models import GenerationError, Stage
from medgen.generation.records import Candidate, CandidateSource, ItemSource, MaskRecord, Masks
from medgen.generation.requests import GateRules, MaskRequest, RealMasks
from medgen.generation.sizes import ClassTarget, Targets, conditioned_groups

log = logging.getLogger("medgen.generate")

MASK_STREAM = 11


def sample_generators(seed: int, indices: Sequence[int], stream: int, device: torch.device) -> list[torch.Generator]:
    """One generator per sample, on the sampling device (drawing on the CPU and copying would
    cost ~10% of a GPU step for the ancestral samplers). PyTorch's CPU and CUDA generators differ,
    so the same seed gives other noise on a GPU than on the CPU."""
    return [torch.Generator(device=device).manual_seed(sample_seed(seed, int(i), stream)) for i in indices]


def progress_bar(total: int, initial: int, desc: str, dist: DistInfo, progress: bool):
    """A progress bar of samples, shown on the main rank only."""
    return tqdm(total=total, initial=initial, desc=desc, unit="sample", dynamic_ncols=True,
                disable=not (progress and dist.is_main))


# ============================================================================ sampled masks
def sample_masks(seg: Stage, request: MaskRequest, sampler: str, folder: Path, dist: DistInfo, stop: StopRequest,
                 progress: bool, targets: Targets, space: SampleSpace) -> Masks | None:
    """Masks until ``request.num_images`` pass the gate (and fill the classes of ``targets``, lesions
    measured in ``space``, the image model's); None if stopped by a signal. The evaluated candidates
    are kept in ``folder``."""
    n_wanted, gate, batch = int(request.num_images), request.gate, request.sampling.batch_size
    max_attempts = gate.max_attempts or 20 * n_wanted
    folder.mkdir(parents=True, exist_ok=True)
    if gate.enabled and gate.inside_brain and BRAIN_KEY not in seg.mode.image_keys and dist.is_main:
        log.warning("%s does not draw the brain with the lesions (mode.image_keys=%s): the gate cannot check "
                    "that they lie inside it; train the seg model with mode.image_keys=[seg,brain]", seg.path,
                    list(seg.mode.image_keys))
    evaluated = read_blocks(folder)
    walk = _walk(evaluated, targets, n_wanted, max_attempts)
    with progress_bar(n_wanted, len(walk.chosen), "masks", dist, progress) as bar:
        while True:
            bar.n = min(len(walk.chosen), n_wanted)
            bar.set_postfix(accepted=f"{len(walk.chosen)}/{walk.prefix}")
            bar.refresh()
            if len(walk.chosen) >= n_wanted:
                break
            if walk.prefix >= max_attempts:
                raise _gate_failure(request, walk, max_attempts, targets, evaluated)
            if any_rank(stop.requested, dist):
                return None
            queue = _next_candidates(evaluated, dist.world_size * batch, max_attempts)
            mine = queue[dist.rank * batch:(dist.rank + 1) * batch]
            results = _evaluate(seg, mine, request, sampler, folder, dist, space, targets) if mine else {}
            for part in _gather(results, dist):
                evaluated.update(part)
            walk = _walk(evaluated, targets, n_wanted, max_attempts)
    conditioned = tuple(name for name, _ in targets.items() if name in conditioned_groups(seg.mode))
    guidance = request.sizes.guidance if conditioned else None
    return _chosen(evaluated, walk, request.sampling.seed, folder, dist, targets, request.brain_outline, guidance,
                   conditioned)


@dataclass
class _Tally:
    """Per class of one target: among all candidates, those asked for it (``asked``,
    :meth:`ClassTarget.requested`) and those of them that drew it (``matched``: the adherence before
    any gate); among candidates that pass the gate's other rules, those in it (``drawn``) and those
    accepted (``taken``)."""

    asked: np.ndarray
    matched: np.ndarray
    drawn: np.ndarray
    taken: np.ndarray


@dataclass
class _Walk:
    """The evaluated candidates 0, 1, 2, ... in order: how many (``prefix``), the accepted ones
    (``chosen``, at most num_images), and a :class:`_Tally` per target (by name: ``sizes``, ``counts``)."""

    prefix: int
    chosen: list[int]
    tallies: dict[str, _Tally]


def _walk(evaluated: dict[int, Candidate], targets: Targets, wanted: int, limit: int | None = None) -> _Walk:
    """Accept candidates in order until ``wanted``: those that pass the gate, and with targets only
    while their class under each has room (a candidate without lesion has none); the first ``limit``
    candidates at most (``gate.max_attempts``, also when a folder holds more from an earlier run)."""
    by_name = dict(targets.items())
    tallies = {name: _Tally(*(np.zeros(len(t.bins), np.int64) for _ in range(4))) for name, t in by_name.items()}
    walk = _Walk(0, [], tallies)
    while walk.prefix in evaluated and (limit is None or walk.prefix < limit):
        c = evaluated[walk.prefix]
        walk.prefix += 1
        classes = targets.classes(c.largest_mm, int(c.stats.components)) if c.largest_mm > 0 else {}
        for name, t in by_name.items():
            asked = int(t.requested([c.index])[0])
            tallies[name].asked[asked] += 1
            tallies[name].matched[asked] += classes.get(name) == asked
        if not c.accepted or targets and not classes:  # no lesion: no class
            continue
        for name, k in classes.items():
            tallies[name].drawn[k] += 1
        room = all(tallies[name].taken[k] < by_name[name].counts[k] for name, k in classes.items())
        if room and len(walk.chosen) < wanted:
            for name, k in classes.items():
                tallies[name].taken[k] += 1
            walk.chosen.append(c.index)
    return walk


def _rejections(gate: GateRules, stats: list) -> str:
    """What the gate's rules rejected among the candidates ``stats`` (one mask's MaskStats each), most first."""
    if not gate.enabled:
        return "the gate is off"
    as_arrays = quality_gate.MaskStats(**{f.name: np.array([getattr(m, f.name) for m in stats])
                                          for f in fields(quality_gate.MaskStats)})
    broken = sorted(((int(v.sum()), k) for k, v in quality_gate.failures(as_arrays, gate).items() if v.any()),
                    reverse=True)
    listed = ", ".join(f"{k} {n}" for n, k in broken) if broken else "none"
    return f"masks breaking each rule (one mask may break several): {listed}"


def _gate_failure(request: MaskRequest, walk: _Walk, max_attempts: int, targets: Targets,
                  evaluated: dict[int, Candidate]) -> GenerationError:
    accepted, tried, gate = len(walk.chosen), walk.prefix, request.gate
    message = (f"the quality gate accepted {accepted} of {tried} generated masks ({100 * accepted / tried:.1f}%), "
               f"short of num_images={request.num_images} within gate.max_attempts={max_attempts}; "
               f"{_rejections(gate, [evaluated[i].stats for i in range(tried)])}; ")
    if targets:
        per_class = "; ".join(
            f"by {key[:-1]} class ({t.key}.target={request.target(t.key)}), accepted/wanted: " + ", ".join(
                f"{name} {int(k)}/{int(q)} ({int(d)} drawn)" for name, k, q, d in
                zip(t.bins.names, walk.tallies[key].taken, t.counts, walk.tallies[key].drawn))
            for key, t in targets.items())
        return GenerationError(message + f"{per_class}; ask for fewer of the classes the model rarely draws, raise "
                               "gate.max_attempts, or train the seg model longer")
    return GenerationError(
        message + f"loosen gate.* (min_area={gate.min_area}, max_area={gate.max_area}, max_components="
        f"{gate.max_components}, min_component_pixels={gate.min_component_pixels}, inside_brain="
        f"{gate.inside_brain}), raise gate.max_attempts, or train the seg model longer")


def _chosen(evaluated: dict[int, Candidate], walk: _Walk, seed: int, folder: Path, dist: DistInfo,
            targets: Targets, outline: str = "as_drawn", guidance: float | None = None,
            conditioned: tuple[str, ...] = ()) -> Masks:
    """The accepted candidates, and the rejected ones before the last of them; their brains as
    drawn, or (``outline="convex"``) each replaced by its convex hull, which holds it. ``guidance``:
    the scale a lesion-conditioned model drew them with (None: unconditional), ``conditioned`` the
    targets (``sizes``, ``counts``) it was conditioned on."""
    chosen = walk.chosen
    last, keep = chosen[-1], set(chosen)
    with_masks = read_blocks(folder, with_masks=keep)
    records, rejected = [], []
    for j in sorted(evaluated):
        if j > last:
            break
        c = evaluated[j]
        record = MaskRecord(CandidateSource(j), c.stats.area, c.stats.components, j in keep,
                            seed=sample_seed(seed, j, MASK_STREAM))
        (records if j in keep else rejected).append(record)
    rate = len(chosen) / (last + 1)
    # what the model drew up to the last accepted candidate (later ones of the batch do not count)
    report = size_report(targets, _walk({j: evaluated[j] for j in range(last + 1)}, targets, len(chosen)), last + 1,
                         guidance, conditioned) if targets else None
    if dist.is_main:
        log.info("quality gate: %d of %d masks accepted (%.1f%%)", len(chosen), last + 1, 100 * rate)
        for name, target in targets.items():
            part = report["counts"] if name == "counts" else report
            log.info("%s: requested %s; before the gate %s; the class asked of each candidate drawn exactly: %.1f%% (%s)",
                     "size classes (largest lesion)" if name == "sizes" else "lesions per mask", target.describe(),
                     ", ".join(f"{k} {100 * v:.0f}%" for k, v in part["before_gate_share"].items()),
                     100 * part["exact_match"], "conditioned" if part["conditioned"] else "not conditioned: chance")
    masks = np.stack([with_masks[j].mask for j in chosen])
    brains = [with_masks[j].brain for j in chosen]
    if any(b is None for b in brains):
        return Masks(masks, records, rejected, rate, None, report)
    if outline == "convex":
        brains = [convex_hull(b).astype(np.uint8) for b in brains]
    return Masks(masks, records, rejected, rate, np.stack(brains), report)


def size_report(targets: Targets, walk: _Walk, candidates: int, guidance: float | None = None,
                conditioned: tuple[str, ...] = ()) -> dict[str, Any]:
    """What ``lesion_sizes.json`` says. Per target (the size classes at the top level, the count
    classes under ``counts``): the request; the exact class match before any gate (each candidate's
    class the one asked of it: what conditioning alone achieves, chance for a model not conditioned
    on it), overall and per class; the classes among candidates that passed the gate's other rules
    (the model before the size and count gate); the output's classes (= the request).
    ``guidance``: the scale a lesion-conditioned model drew with (None: unconditional); each part
    says whether the model was ``conditioned`` on it (``conditioned`` names them)."""
    out: dict[str, Any] = {"guidance": guidance}
    for name, target in targets.items():
        part = {**_class_report(target, walk.tallies[name]), "conditioned": name in conditioned}
        if name == "counts":
            out["counts"] = part
        else:
            out.update(part, edges_mm=list(target.bins.edges))
    return {**out, "candidates": candidates, "acceptance_rate": len(walk.chosen) / candidates}


def _class_report(target: ClassTarget, tally: _Tally) -> dict[str, Any]:
    names = target.bins.names
    drawn = tally.drawn.astype(np.float64)
    want = target.counts / max(int(target.counts.sum()), 1)
    share = drawn / (float(drawn.sum()) or 1.0)
    asked = dict(zip(names, tally.asked.tolist()))
    return {"target": target.source, "bins": list(names),
            "exact_match": int(tally.matched.sum()) / max(int(tally.asked.sum()), 1),
            "exact_match_per_bin": {b: (int(m) / asked[b] if asked[b] else None) for b, m in zip(names, tally.matched)},
            "asked": asked,
            "requested": dict(zip(names, target.counts.tolist())),
            "before_gate": dict(zip(names, tally.drawn.tolist())),
            "before_gate_share": dict(zip(names, share.tolist())),
            "before_gate_match": float(np.minimum(share, want).sum()),
            "output": dict(zip(names, tally.taken.tolist()))}


def _evaluate(seg: Stage, candidates: list[int], request: MaskRequest, sampler: str, folder: Path,
              dist: DistInfo, space: SampleSpace, targets: Targets = Targets()) -> dict[int, Candidate]:
    """Generate and gate ``candidates`` (a lesion-conditioned model: each asked for the classes the
    targets give it, or none without targets); save them as one block file; return their verdicts."""
    cond, guidance = None, 1.0
    if seg.mode.lesion_conditioned:  # check_conditioning: a class asked of every group it knows, or of none
        asked = {name: 1 + torch.from_numpy(t.requested(candidates)) for name, t in targets.items()}
        none = torch.full((len(candidates),), -1)
        cond = seg.mode.lesion_condition(seg.space.shape, asked.get("sizes", none), asked.get("counts", none))
        cond = cond.to(seg.device)
        guidance = request.sizes.guidance if targets else 1.0
    sampling = request.sampling
    x0 = seg.sample(cond, sample_generators(sampling.seed, candidates, MASK_STREAM, seg.device), steps=sampling.steps,
                    sampler=sampler, guidance_scale=guidance, batch_size=sampling.batch_size)
    outputs = {k: v[:, 0].cpu().numpy().astype(np.uint8) for k, v in seg.mode.to_outputs(x0).items()}
    masks, brains = outputs[MASK_KEY], outputs.get(BRAIN_KEY)
    stats = quality_gate.measure(masks, brains)
    ok = quality_gate.passes(stats, request.gate)
    largest = np.asarray([largest_diameter(m, space.mm) for m in masks], dtype=np.float64)
    path = folder / f"block_{candidates[0]:09d}_{len(candidates):05d}_r{dist.rank}.npz"
    extra = {} if brains is None else {"brains": brains}
    with atomic_write(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, candidates=np.asarray(candidates, dtype=np.int64), masks=masks, area=stats.area,
                            components=stats.components, smallest=stats.smallest, outside=stats.outside,
                            largest_mm=largest, accepted=ok, **extra)
    return {j: Candidate(j, stats[i], bool(ok[i]), largest_mm=float(largest[i])) for i, j in enumerate(candidates)}


def read_blocks(folder: Path, with_masks: set[int] | None = None) -> dict[int, Candidate]:
    """The stage-1 candidates on disk by index: every one without its mask or, with
    ``with_masks``, those candidates with their masks (and brains, where the mask model drew them;
    blocks of a medgen before 0.2 hold no brain)."""
    out: dict[int, Candidate] = {}
    for path in sorted(folder.glob("block_*.npz")):
        with np.load(path) as block:
            n = block["candidates"].size
            outside = block["outside"] if "outside" in block.files else np.zeros(n, dtype=np.int64)
            stats = quality_gate.MaskStats(block["area"], block["components"], block["smallest"], outside)
            masks = block["masks"] if with_masks is not None else None
            brains = block["brains"] if with_masks is not None and "brains" in block.files else None
            largest = block["largest_mm"] if "largest_mm" in block.files else np.zeros(n)
            for i, j in enumerate(block["candidates"].tolist()):
                if with_masks is None:
                    out[j] = Candidate(j, stats[i], bool(block["accepted"][i]), largest_mm=float(largest[i]))
                elif j in with_masks:
                    out[j] = Candidate(j, stats[i], bool(block["accepted"][i]), masks[i],
                                       None if brains is None else brains[i], float(largest[i]))
    return out


def _next_candidates(evaluated: dict[int, Candidate], count: int, limit: int) -> list[int]:
    """The next ``count`` candidates no run evaluated, among the first ``limit``."""
    out, j = [], 0
    while len(out) < count and j < limit:
        if j not in evaluated:
            out.append(j)
        j += 1
    return out


def _gather(results: dict[int, Candidate], dist: DistInfo) -> list[dict[int, Candidate]]:
    if not dist.distributed:
        return [results]
    parts: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(parts, results)
    return parts


# ============================================================================ masks_from
def real_masks(real: RealMasks, num_images: int | None, seed: int, space: SampleSpace,
               brain_from: str | None = None, targets: Targets = Targets(), brain_method: str = "heuristic") -> Masks:
    """The lesion items of ``real.split`` of the medgen dataset ``real.root`` at the image model's
    ``space``: its slices ``(S, S)`` or volumes ``(X, Y, Z)`` (each patient's head resampled as for
    training), ``num_images`` of them (None: all), with their brains derived from the image
    ``brain_from`` (None: no brain) by ``brain_method``. With ``targets`` (lesions measured in ``space``), the masks are
    picked to meet their quotas: walked in an order shuffled by ``seed``, each taken while its classes
    have room, as the gate takes generated ones."""
    cache = _real_cache(real, space, brain_from, brain_method)
    items = space.either(lambda: np.arange(len(cache)), lambda: np.flatnonzero(cache.lesion_pixels > 0))()
    what = f"lesion {space.unit}s"
    if len(items) == 0:
        raise DataError(f"masks_from={real.root}: no {what[:-1]} in {resolve_path(real.root) / real.split}")
    report = None
    if targets:
        items, report = _pick(cache, items, targets, int(num_images), seed, space,
                              f"masks_from={real.root}: the {len(items)} {what} of {real.split}/")
    n = len(items) if num_images is None else min(int(num_images), len(items))
    if num_images is not None and n < num_images:
        log.warning("masks_from has %d %s in %s/; generating for all of them (num_images=%d)", n, what,
                    real.split, num_images)
    items = items[:n]
    masks = is_lesion(cache.data[items, 0]).astype(np.uint8)
    stats = quality_gate.measure(masks)
    z_of = space.either(lambda i: int(cache.slice_index[i]), lambda i: None)
    records = [MaskRecord(ItemSource(real.split, cache.patient_ids[cache.patient_index[i]], z_of(i)),
                          float(stats.area[k]), int(stats.components[k]), True) for k, i in enumerate(items)]
    brains = None if brain_from is None else is_lesion(cache.data[items, 1]).astype(np.uint8)
    return Masks(masks, records, [], None, brains, report)


def _real_cache(real: RealMasks, space: SampleSpace, brain_from: str | None, brain_method: str = "heuristic") -> Any:
    """The cache of ``real.split``'s lesion slices or volumes of ``space`` (with their brains)."""
    from medgen.data.slices import open_or_build_cache

    patients = split_of(real.root, real.split, "masks_from", "masks_split")
    keys = (MASK_KEY,) if brain_from is None else (MASK_KEY, BRAIN_KEY)
    spec = item_spec(space, keys, "lesion", brain_from or "bravo", brain_method)
    return open_or_build_cache(patients, spec, resolve_path(real.cache_dir), desc=f"{real.split} masks")


def item_spec(space: SampleSpace, keys: tuple[str, ...], selection: str, brain_from: str, brain_method: str) -> Any:
    """The item cache spec of a real split read at ``space``: its ``selection`` of slices (a slice
    space), or each patient's volume."""
    from medgen.data.slices import SliceSpec
    from medgen.data.volumes import VolumeSpec

    return space.either(
        lambda: SliceSpec(keys=keys, image_size=space.size, selection=selection, brain_from=brain_from,
                          brain_method=brain_method),
        lambda: VolumeSpec(keys=keys, volume_shape=space.shape, brain_from=brain_from, brain_method=brain_method))()


def split_of(root: str, split: str, key: str, split_key: str) -> list:
    """The patient folders of ``split`` of the dataset ``root`` (the config key ``key``); a
    :class:`DataError` naming ``key`` and ``split_key`` for a missing folder or an empty split."""
    from medgen.data.nifti_dataset import list_patients
    from medgen.data.splits import split_patients

    folder = resolve_path(root)
    if not folder.is_dir():
        raise DataError(f"{key}={root}: {folder} is not a folder")
    patients = split_patients(folder, split)
    if not patients:
        held = list_patients(folder / split) if split == "train" and (folder / split).is_dir() else []
        if held:  # no val/: train/'s patients were all drawn for validation
            raise DataError(f"{key}={root}: the {len(held)} patient(s) of {folder / split} all go to validation by "
                            f"medgen's patient-level split (there is no val/ folder); add a val/ folder, or put the "
                            f"scans in test/ and set {split_key}=test")
        raise DataError(f"{key}={root}: no patients in {folder / split} (choose another {split_key})")
    return patients


def _pick(cache: Any, items: np.ndarray, targets: Targets, n: int, seed: int, space: SampleSpace,
          what: str) -> tuple[np.ndarray, dict[str, Any]]:
    """The ``n`` items of ``cache`` (in dataset order) that meet the quotas of ``targets``, taken in an
    order shuffled by ``seed``, and the size report (:func:`size_report`); a :class:`GenerationError`
    naming the classes that hold too few masks (``what``: the masks, for that message)."""
    order = items[np.random.default_rng(seed).permutation(len(items))]
    evaluated = {}
    for j, i in enumerate(order):
        mask = is_lesion(cache.data[i, 0])
        stats = quality_gate.measure(mask[None])
        evaluated[j] = Candidate(j, stats[0], True, largest_mm=largest_diameter(mask, space.mm))
    walk = _walk(evaluated, targets, n)
    if len(walk.chosen) < n:
        short = "; ".join(f"{t.key}: " + ", ".join(f"{name} {int(k)}/{int(q)}" for name, k, q in
                                                    zip(t.bins.names, walk.tallies[key].taken, t.counts))
                          for key, t in targets.items())
        raise GenerationError(f"{what} hold too few masks of some classes for "
                              f"num_images={n} (picked/wanted: {short}); ask for fewer of the rare classes, a smaller "
                              "num_images, or more real masks")
    report = size_report(targets, _walk({j: evaluated[j] for j in range(walk.chosen[-1] + 1)}, targets, n),
                         walk.chosen[-1] + 1)
    return np.sort(order[walk.chosen]), report
