"""The schema of ``configs/generate.yaml`` (``medgen-generate``, :func:`medgen.generate`), checked once.

:func:`validate_generate_config` is the generation counterpart of
:func:`medgen.diffusion.config.validate_config`: typed schema, field metadata, and the
constraints between keys; a failure is a :class:`~medgen.core.schema.ConfigError` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from medgen.core.schema import NoEffect, at_least, check, check_fields, choice, merge_schema, no_effect, shipped_values
from medgen.diffusion.config import COMPILE_MODES
from medgen.diffusion.samplers import SAMPLERS

__all__ = ["GateConfig", "InsertConfig", "LesionSizesConfig", "NnunetConfig", "GenerateConfig", "ignored_keys",
           "validate_generate_config"]


# Types and rules only: every value, default included, comes from configs/generate.yaml (a field is
# MISSING; tests/unit/test_config_once.py holds the two to each other).
@dataclass
class GateConfig:
    enabled: bool = MISSING
    #: lesion area as a fraction of the image; null: 0.0005 for slices, 0 for volumes (gate.with_defaults)
    min_area: Optional[float] = at_least(0)
    max_area: float = MISSING
    max_components: int = at_least(1)
    #: a mask with a component smaller than this many pixels (voxels) is rejected (specks); null: 4
    #: pixels for slices, for volumes the voxels a ball 4 mm across fills (gate.speck_pixels)
    min_component_pixels: Optional[int] = at_least(1)
    #: a lesion pixel outside the brain the mask model drew with it rejects the mask
    inside_brain: bool = MISSING
    #: candidates tried before giving up; null: 20 x num_images
    max_attempts: Optional[int] = MISSING


@dataclass
class NnunetConfig:
    dataset_id: int = MISSING
    name: str = MISSING


@dataclass
class LesionSizesConfig:
    #: model (as the seg model draws them), real (its training slices), uniform, or weights per bin name
    target: Any = MISSING
    #: rano_bm, or diameter edges in mm
    bins: Any = MISSING
    #: classifier-free guidance scale of a size- or count-conditioned seg model (1: conditional, no guidance)
    guidance: float = MISSING


@dataclass
class LesionCountsConfig:
    #: model (as the seg model draws them), real (its training slices), uniform, or weights per class name
    target: Any = MISSING
    #: the smallest lesion count of each class, the last open-ended: [1, 2, 3, 4] = 1, 2, 3, 4+
    classes: Any = MISSING


@dataclass
class InsertConfig:
    #: a medgen dataset folder: lesions are painted into its real scans (null: whole images are generated)
    into: Optional[str] = MISSING
    split: str = choice("train", "val", "test")
    #: inpaint (a mode=inpaint checkpoint), repaint (a bravo/dual checkpoint, known region replaced) or copy
    painter: str = choice("inpaint", "repaint", "copy")
    #: also write each scan as it was (source_<key>.nii.gz, source_seg.nii.gz)
    keep_source: bool = MISSING
    #: voxels the painted region reaches beyond a new lesion (the first one in every direction)
    margin: int = at_least(1)
    #: where new lesions' shapes come from: real (lesions of the split) or seg (drawn by seg_checkpoint)
    shapes: str = choice("real", "seg")
    #: a medgen dataset whose insert.split lesions give the real shapes (null: insert.into's)
    shapes_from: Optional[str] = MISSING
    #: the size scans are read at (null: the painter checkpoint's model.image_size)
    image_size: Any = MISSING
    #: the images a copy painter without image_checkpoint copies
    modalities: list[str] = MISSING
    #: how the brain of each scan is derived (null: as the painter's training data; heuristic without one)
    brain_method: Optional[str] = MISSING


@dataclass
class GenerateConfig:
    seg_checkpoint: Optional[str] = MISSING
    image_checkpoint: Optional[str] = MISSING
    masks_from: Optional[str] = MISSING
    masks_split: str = choice("train", "val", "test")
    num_images: Optional[int] = MISSING
    samples_per_mask: int = at_least(1)
    batch_size: int = at_least(1)
    out_dir: str = MISSING
    split: str = choice("train", "val", "test")
    seed: int = at_least(0)
    sampler: Optional[str] = MISSING
    seg_sampler: Optional[str] = MISSING
    image_sampler: Optional[str] = MISSING
    steps: int = at_least(1)
    guidance_scale: float = MISSING
    use_ema: bool = MISSING
    precision: str = choice("bf16", "fp32")
    device: Optional[str] = MISSING
    compile: str = choice("auto", "true", "false")
    compile_mode: str = choice(*COMPILE_MODES)
    format: str = choice("medgen", "nnunet")
    previews: bool = MISSING
    cache_dir: str = MISSING
    #: the brain each mask is painted in: its convex hull (convex) or as the seg model drew it (as_drawn)
    brain_outline: str = choice("convex", "as_drawn")
    gate: GateConfig = field(default_factory=GateConfig)
    lesion_sizes: LesionSizesConfig = field(default_factory=LesionSizesConfig)
    lesion_counts: LesionCountsConfig = field(default_factory=LesionCountsConfig)
    nnunet: NnunetConfig = field(default_factory=NnunetConfig)
    insert: InsertConfig = field(default_factory=InsertConfig)


def validate_generate_config(cfg: DictConfig) -> DictConfig:
    """Merge ``cfg`` into :class:`GenerateConfig` and check every value; returns the typed config.
    Raises :class:`~medgen.core.schema.ConfigError` naming the key."""
    merged = merge_schema(GenerateConfig, cfg)
    check_fields(merged, GenerateConfig, None)
    check_fields(merged.gate, GateConfig, "gate")
    check_fields(merged.insert, InsertConfig, "insert")
    if merged.insert.into is not None:
        _check_insert(merged)
        _check_targets(merged)
        return merged
    check(merged.image_checkpoint is not None, "image_checkpoint",
          "missing: the bravo or dual checkpoint that paints the images, e.g. image_checkpoint=runs/bravo/<run>")
    check((merged.seg_checkpoint is None) != (merged.masks_from is None), "seg_checkpoint",
          "give exactly one mask source: seg_checkpoint=<seg run or checkpoint> (generate masks) or "
          "masks_from=<medgen dataset> (use its masks)")
    check(merged.num_images is None and merged.masks_from is not None or
          merged.num_images is not None and merged.num_images >= 1, "num_images",
          "must be >= 1 (null: every mask of masks_from)")
    for key in ("sampler", "seg_sampler", "image_sampler"):
        check(merged[key] is None or merged[key] in SAMPLERS, key,
              f"unknown sampler {merged[key]!r}; choose one of {sorted(SAMPLERS)}")
    check(merged.guidance_scale >= 0, "guidance_scale", f"must be >= 0 (1 is off), got {merged.guidance_scale}")
    check(merged.lesion_sizes.guidance >= 0, "lesion_sizes.guidance",
          f"must be >= 0 (1 is off), got {merged.lesion_sizes.guidance}")
    g = merged.gate
    check((g.min_area or 0) < g.max_area <= 1, "gate.max_area",
          f"need gate.min_area ({g.min_area}) < gate.max_area ({g.max_area}) <= 1")
    check(g.max_attempts is None or g.max_attempts >= 1, "gate.max_attempts", "must be >= 1 or null")
    _check_targets(merged)
    return merged


def _check_insert(cfg: DictConfig) -> None:
    """``insert.into`` given: lesions painted into real scans (:mod:`medgen.generation.insert`)."""
    ins = cfg.insert
    check(cfg.masks_from is None, "masks_from", "insert.into paints new lesions into real scans; masks_from "
          "paints whole images on real masks: give one of them")
    check(cfg.num_images is not None and cfg.num_images >= 1, "num_images",
          "insert.into needs the number of scans to paint lesions into (>= 1)")
    check(ins.painter == "copy" or cfg.image_checkpoint is not None, "image_checkpoint",
          f"insert.painter={ins.painter} needs the checkpoint that paints: a mode=inpaint model "
          "(insert.painter=inpaint) or a bravo/dual model (insert.painter=repaint)")
    check(cfg.image_checkpoint is not None or ins.image_size is not None, "insert.image_size",
          "insert.painter=copy without image_checkpoint: give the size scans are read at, e.g. insert.image_size=128")
    check(ins.shapes == "real" or cfg.seg_checkpoint is not None, "insert.shapes",
          "insert.shapes=seg draws the new lesions' shapes with a seg model: give seg_checkpoint, or use insert.shapes=real")
    size = ins.image_size
    sizes = [size] if isinstance(size, int) else list(size) if size is not None else [8]
    check(len(sizes) in (1, 3) and all(isinstance(n, int) and n >= 8 for n in sizes), "insert.image_size",
          f"one size S (slices S x S) or three [X, Y, Z] (volumes), each >= 8, got {size}")
    check(ins.brain_method is None or ins.brain_method in ("heuristic", "deepbet", "bet"), "insert.brain_method",
          f"heuristic, deepbet, bet or null, got {ins.brain_method!r}")
    from medgen.generation.models import GenerationError

    for key in ("lesion_sizes", "lesion_counts"):
        if cfg[key].target == "model":
            raise GenerationError(f"{key}.target=model: insertion paints each new lesion at the class asked; use "
                                  "real (as the lesions of insert.split), uniform, or weights")


def _check_targets(cfg: DictConfig) -> None:
    """The size and count requests parse (bins, classes, the form of each target), before any model
    is loaded; quotas (``uniform``, weights) need the gate, which meets them; with ``masks_from``, a
    request that picks real masks needs ``num_images`` and guidance needs a seg model. A :class:`~medgen.generation.models.GenerationError` naming the key."""
    from medgen.generation.models import GenerationError
    from medgen.generation.sizes import quota_keys

    picking = quota_keys(cfg)
    if cfg.insert.into is not None:
        return
    if cfg.masks_from is None:
        if picking and not cfg.gate.enabled:
            raise GenerationError(f"{picking[0]}.target={cfg[picking[0]].target}: the gate meets the quotas, and "
                                  "gate.enabled=false keeps every mask drawn; turn the gate on (loosen its rules, e.g. "
                                  f"gate.min_area=0 gate.max_area=1, if they are in the way) or set {picking[0]}.target=model")
        return
    if picking and cfg.num_images is None:
        raise GenerationError(f"{picking[0]}.target={cfg[picking[0]].target}: with masks_from, the real masks are "
                              "picked to meet the quotas of num_images masks; set num_images (null takes every mask "
                              "as it is)")
    if cfg.lesion_sizes.guidance != 1:
        raise GenerationError(f"lesion_sizes.guidance={cfg.lesion_sizes.guidance:g} guides a seg model toward the "
                              "classes asked, and masks_from uses real masks: leave lesion_sizes.guidance=1")


#: keys that do nothing in a combination (:func:`ignored_keys`)
_NO_EFFECT: tuple[NoEffect, ...] = (
    (("gate",), lambda c: c.masks_from is not None, "real masks are used as they are, not gated with masks_from"),
    (("seg_sampler",), lambda c: c.masks_from is not None, "there is no seg model to sample with masks_from"),
    (("brain_outline",), lambda c: c.masks_from is not None, "the brains come from the real images with masks_from"),
    (("masks_split",), lambda c: c.seg_checkpoint is not None, "the seg model draws the masks with seg_checkpoint"),
)


def ignored_keys(cfg: DictConfig) -> list[str]:
    """The keys of a validated generate config set away from their defaults (``generate.yaml``'s values)
    in a combination where they have no effect (:func:`~medgen.core.schema.no_effect`: ``gate.*``,
    ``seg_sampler`` and ``brain_outline`` with ``masks_from``, ``masks_split`` with ``seg_checkpoint``),
    for a warning."""
    defaults = shipped_values("generate")

    def changed(node: DictConfig, prefix: str = "") -> list[str]:
        out = []
        for key in node:  # a key of lesion_*.target may be a number ({1: 2, 2: 1})
            dotted = f"{prefix}{key}"
            value, default = node[key], OmegaConf.select(defaults, dotted, default=None)
            out += changed(value, dotted + ".") if isinstance(value, DictConfig) else [dotted] if value != default else []
        return out

    return no_effect(cfg, changed(cfg), _NO_EFFECT)
