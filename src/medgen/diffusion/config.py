"""The training schema, checked once at the boundary.

Hydra composes ``configs/``; :func:`validate_config` merges the result into the typed schema
below (unknown keys and wrong types fail there) and then checks values that are impossible
(lr <= 0, channel/attention length mismatch, ...). Every failure is a
:class:`~medgen.core.schema.ConfigError` naming the dotted key and the reason. The strategy's
schema is its class's ``Config`` and the mode's key rules are class attributes (both found
through the registries); the ``data`` keys' schema is :class:`medgen.data.config.DataConfig`.
Strategies and modes trust a config that passed here and check nothing themselves
(docs/architecture.md, "Configuration").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from medgen.core.constants import CHANNEL_KEYS
from medgen.core.schema import (ConfigError, NoEffect, at_least, check, check_fields, choice, compose_config,
                                merge_schema, no_effect)
from medgen.data.config import DataConfig, check_data_values
from medgen.data.space import SampleSpace
from medgen.data.lesions import parse_bins, parse_count_classes
from medgen.diffusion.modes import MODES
from medgen.diffusion.strategies import STRATEGIES

__all__ = ["COMPILE_MODES", "MAX_WARMUP_FRACTION", "ModelConfig", "ModeConfig", "LesionModeConfig", "InpaintModeConfig",
           "TrainingConfig", "PathsConfig", "Root", "mode_schema", "training_schema", "validate_config", "load_config",
           "unused_keys"]

#: ``torch.compile`` modes (``training.compile_mode``, ``compile_mode`` of generation): ``default``;
#: ``reduce-overhead`` (CUDA graphs); ``max-autotune`` (kernel search + CUDA graphs, slow to compile);
#: ``max-autotune-no-cudagraphs``
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

#: the warm-up never takes more than this fraction of a run's optimizer steps (``training.warmup_steps``)
MAX_WARMUP_FRACTION = 0.1


# --------------------------------------------------------------------------- schema
# Types and rules only: every value, default included, comes from the YAML files of configs/
# (a field is MISSING; tests/unit/test_config_once.py holds the two to each other).
@dataclass
class ModelConfig:
    #: the sample: S, an axial slice S x S (the specification's model.image_size=256), or [X, Y, Z], a
    #: whole volume (a 3D model); :class:`medgen.data.space.SampleSpace` reads it
    image_size: Any = MISSING
    channels: list[int] = MISSING
    attention_levels: list[bool] = MISSING
    num_res_blocks: int = at_least(1)
    num_head_channels: int = MISSING
    norm_num_groups: int = at_least(1)


@dataclass
class ModeConfig:
    """The keys of every mode (``configs/mode/<name>.yaml``)."""
    name: str = MISSING
    image_keys: list[str] = MISSING
    cond_keys: list[str] = MISSING


@dataclass
class LesionModeConfig(ModeConfig):
    """The keys of a mode that may be conditioned on its lesions (``lesion_conditionable``: seg)."""
    #: a mask model conditioned on the size class of its largest lesion: rano_bm or edges in mm (null: not)
    size_bins: Any = MISSING
    #: a mask model conditioned on the class of its number of lesions: e.g. [1, 2, 3, 4] (null: not)
    count_classes: Any = MISSING


@dataclass
class InpaintModeConfig(ModeConfig):
    """The keys of the inpainting painter (``paints_into_scans``: inpaint)."""
    #: the training window: null (the whole item), W (W x W slice windows) or [X, Y, Z] (volumes)
    window: Any = MISSING
    #: probability that a training region is the item's lesions (dilated), in [0, 1]
    lesion_fraction: float = MISSING
    #: voxels a lesion region extends around the lesion
    margin: int = at_least(0)
    #: largest radius (voxels) of a random ball region
    max_radius: int = at_least(1)


#: the keys only a ``lesion_conditionable`` mode has (:class:`LesionModeConfig`), with what they condition on
LESION_KEYS = {"size_bins": "sizes", "count_classes": "counts"}


@dataclass
class TrainingConfig:
    epochs: int = at_least(1)
    batch_size: int = at_least(1)
    learning_rate: float = MISSING
    weight_decay: float = at_least(0)
    gradient_clip_norm: float = MISSING
    #: linear warm-up in optimizer steps, capped at ``MAX_WARMUP_FRACTION`` of the run
    warmup_steps: int = at_least(0)
    val_interval: int = at_least(1)
    use_ema: bool = MISSING
    ema_decay: float = MISSING
    ema_update_after_step: int = at_least(0)
    ema_update_every: int = at_least(1)
    use_min_snr: bool = MISSING
    min_snr_gamma: float = MISSING
    perceptual_weight: float = at_least(0)
    perceptual_weights_path: Optional[str] = MISSING
    perceptual_allow_download: bool = MISSING
    #: volumes: slices of each plane (axial, coronal, sagittal) the 2.5D perceptual loss scores each step
    perceptual_slices: int = at_least(1)
    use_multi_gpu: bool = MISSING
    precision: str = choice("bf16", "fp32")
    compile: str = choice("auto", "true", "false")
    compile_mode: str = choice(*COMPILE_MODES)
    channels_last: bool = MISSING
    #: recompute the U-Net blocks' activations in the backward pass instead of keeping them (less memory)
    gradient_checkpointing: bool = MISSING
    cond_dropout: float = MISSING
    max_steps: Optional[int] = MISSING
    resume: Optional[str] = MISSING
    checkpoint_keep: int = at_least(0)
    max_nonfinite_steps: int = at_least(1)
    log_every: int = at_least(1)
    num_val_samples: int = at_least(0)
    num_sample_steps: int = at_least(1)


@dataclass
class PathsConfig:
    data_dir: str = MISSING
    model_dir: str = MISSING
    cache_dir: str = MISSING


@dataclass
class Root:
    """A training config: ``strategy`` is the chosen strategy's ``Config`` and ``mode`` the mode
    class's schema, set by :func:`training_schema`."""
    seed: int = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: Any = MISSING
    mode: Any = MISSING
    training: TrainingConfig = field(default_factory=TrainingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)


def mode_schema(mode_cls: type) -> type:
    """The schema of a mode class's YAML file: :class:`LesionModeConfig` for a ``lesion_conditionable``
    mode, :class:`InpaintModeConfig` for one that ``paints_into_scans``, else :class:`ModeConfig`."""
    if mode_cls.paints_into_scans:
        return InpaintModeConfig
    return LesionModeConfig if mode_cls.lesion_conditionable else ModeConfig


def training_schema(strategy_cls: type, mode_cls: type) -> DictConfig:
    """The structured :class:`Root` for a strategy class and a mode class (all values MISSING)."""
    root = OmegaConf.structured(Root)
    root.strategy = OmegaConf.structured(strategy_cls.Config)
    root.mode = OmegaConf.structured(mode_schema(mode_cls))
    return root


# --------------------------------------------------------------------------- checks
def _name_in(registry: dict[str, type], node: Any, group: str) -> type:
    name = OmegaConf.select(node, f"{group}.name", default=None) if node is not None else None
    check(name in registry, f"{group}.name", f"unknown {group} {name!r}; choose one of {sorted(registry)}")
    return registry[name]


def validate_config(cfg: DictConfig, world_size: int = 1) -> DictConfig:
    """Merge ``cfg`` into the typed schema and check every value. Returns the typed config.

    The one place where a training configuration is checked: unknown keys, wrong types, the
    ``choices`` and ``min`` of every schema field (the strategy's own ``Config`` included), the
    mode's key rules and the cross-key constraints below. Raises
    :class:`~medgen.core.schema.ConfigError` naming the first bad key.
    """
    strategy_cls = _name_in(STRATEGIES, cfg, "strategy")
    mode_cls = _name_in(MODES, cfg, "mode")
    _check_lesion_keys(cfg.mode, mode_cls)
    merged = merge_schema(partial(training_schema, strategy_cls, mode_cls), cfg)
    for group, schema in (("model", ModelConfig), ("strategy", strategy_cls.Config), ("training", TrainingConfig),
                          ("data", DataConfig)):
        check_fields(merged[group], schema, group)
    _check_mode(merged.mode, mode_cls)
    if mode_cls.paints_into_scans:
        check_fields(merged.mode, InpaintModeConfig, "mode")
    _check_values(merged, world_size)
    return merged


def _check_lesion_keys(mo: Any, mode_cls: type) -> None:
    """A mode that cannot be conditioned on its lesions has no ``size_bins`` / ``count_classes``
    (:func:`mode_schema`); one given a value (``+mode.size_bins=...``) is refused saying why, before
    the schema would call it an unknown key."""
    if mode_cls.lesion_conditionable or not isinstance(mo, DictConfig):
        return
    for key, what in LESION_KEYS.items():
        check(mo.get(key) is None, f"mode.{key}",
              f"mode {mo.name!r} cannot be conditioned on lesion {what} (only the seg mode can)")


def _check_mode(mo: DictConfig, mode_cls: type) -> None:
    """Modality keys: known, not repeated, and within the mode class's rules (``image_key_choices``/
    ``num_image_keys``/``required_image_keys`` and the same for ``cond_keys``)."""
    for group in ("image_keys", "cond_keys"):
        prefix = group.split("_")[0]
        choices = getattr(mode_cls, f"{prefix}_key_choices")
        count = getattr(mode_cls, f"num_{group}")
        counts = count if isinstance(count, tuple) else (count,)
        keys = list(mo[group])
        for i, k in enumerate(keys):
            check(k in CHANNEL_KEYS, f"mode.{group}[{i}]", f"unknown modality {k!r}; known: {list(CHANNEL_KEYS)}")
            check(k in choices, f"mode.{group}[{i}]",
                  f"mode {mo.name!r} takes {list(choices)} here, got {k!r}")
        check(len(keys) in counts, f"mode.{group}",
              f"mode {mo.name!r} needs {' or '.join(map(str, counts))} key(s) here, got {keys}")
        for k in (k for k in getattr(mode_cls, f"required_{group}") if k in choices):
            check(k in keys, f"mode.{group}", f"mode {mo.name!r} needs {k!r} here, got {keys}")
        check(len(set(keys)) == len(keys), f"mode.{group}", f"{keys} repeats a key")
    both = set(mo.image_keys) & set(mo.cond_keys)
    check(not both, "mode.cond_keys", f"{sorted(both)} cannot be generated and condition at once")
    for key, parse in (("size_bins", parse_bins), ("count_classes", parse_count_classes)):
        if mo.get(key) is None:
            continue
        try:
            parse(mo[key])
        except ValueError as exc:
            raise ConfigError(f"mode.{key}", str(exc)) from None


def _check_image_size(size: Any, factor: int, n_levels: int, key: str = "model.image_size") -> list[int]:
    """``model.image_size`` (or ``key``, e.g. ``mode.window``): S (a square slice) or [X, Y, Z] (a
    volume), sizes the U-Net can downsample. Returns the sizes."""
    sizes = [size] if isinstance(size, int) else list(size) if OmegaConf.is_list(size) else None
    check(not isinstance(size, bool) and sizes is not None and len(sizes) in (1, 3)
          and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes), key,
          f"must be a positive size S (slices of S x S) or three sizes [X, Y, Z] (volumes), got {size}")
    bad = [n for n in sizes if n % factor]
    check(not bad, key, f"{size} is not divisible by 2^{n_levels - 1}={factor}"
                        f"{' in every axis' if len(sizes) == 3 else ''} (the U-Net downsamples {n_levels - 1} times)")
    return sizes


def _check_inpaint(cfg: DictConfig, factor: int, n_levels: int) -> None:
    """The inpainting painter's keys: ``mode.window`` a size like ``model.image_size`` (same form, at most
    it per axis, divisible alike), ``mode.lesion_fraction`` in [0, 1], ``mode.cond_keys`` = [seg, brain]."""
    mo, image_size = cfg.mode, cfg.model.image_size
    check(list(mo.cond_keys) == ["seg", "brain"], "mode.cond_keys",
          f"mode {mo.name!r} takes exactly [seg, brain] (in this order), got {list(mo.cond_keys)}")
    check(0 <= mo.lesion_fraction <= 1, "mode.lesion_fraction", f"must be in [0, 1], got {mo.lesion_fraction}")
    if mo.window is None:
        return
    volume = not isinstance(image_size, int)
    form = OmegaConf.is_list(mo.window) and len(mo.window) == 3 if volume else isinstance(mo.window, int)
    check(form and not isinstance(mo.window, bool), "mode.window",
          f"must be {'[X, Y, Z] (model.image_size is a volume' if volume else 'an int W (model.image_size is a slice'}"
          f" size, {image_size}), got {mo.window}")
    window = _check_image_size(mo.window, factor, n_levels, "mode.window")
    sizes = list(image_size) if volume else [image_size]
    check(len(window) == len(sizes) and all(w <= s for w, s in zip(window, sizes)), "mode.window",
          f"{mo.window} is larger than model.image_size={image_size} (a window lies inside an item)")


def _check_values(cfg: DictConfig, world_size: int) -> None:
    """Constraints between keys, and value ranges that field metadata cannot express."""
    m, t = cfg.model, cfg.training

    # model
    n_levels = len(m.channels)
    check(n_levels >= 1, "model.channels", "needs at least one level")
    check(
        len(m.attention_levels) == n_levels,
        "model.attention_levels",
        f"has {len(m.attention_levels)} entries but model.channels has {n_levels}; they must match",
    )
    _check_image_size(m.image_size, 2 ** (n_levels - 1), n_levels)
    if MODES[cfg.mode.name].paints_into_scans:
        _check_inpaint(cfg, 2 ** (n_levels - 1), n_levels)
    for i, ch in enumerate(m.channels):
        check(ch > 0, f"model.channels[{i}]", "must be positive")
        check(
            ch % m.norm_num_groups == 0,
            f"model.channels[{i}]",
            f"{ch} is not divisible by model.norm_num_groups={m.norm_num_groups}",
        )
        if m.attention_levels[i]:
            check(
                m.num_head_channels > 0 and ch % m.num_head_channels == 0,
                "model.num_head_channels",
                f"{m.num_head_channels} does not divide model.channels[{i}]={ch} (an attention level)",
            )

    # training
    check(world_size >= 1 and t.batch_size % world_size == 0, "training.batch_size",
          f"{t.batch_size} is not divisible by the world size {world_size} (batch_size is the global batch)")
    check(t.learning_rate > 0, "training.learning_rate", f"must be > 0, got {t.learning_rate}")
    check(t.gradient_clip_norm > 0, "training.gradient_clip_norm", "must be > 0")
    check(0 < t.ema_decay < 1, "training.ema_decay", "must be in (0, 1)")
    check(t.min_snr_gamma > 0, "training.min_snr_gamma", "must be > 0")
    check(0 <= t.cond_dropout < 1, "training.cond_dropout", "must be in [0, 1)")
    check(t.cond_dropout == 0 or len(cfg.mode.cond_keys) > 0 or cfg.mode.get("size_bins") is not None
          or cfg.mode.get("count_classes") is not None, "training.cond_dropout",
          f"classifier-free guidance needs a conditional mode; mode {cfg.mode.name!r} has no condition "
          "(mode.cond_keys, or mode.size_bins / mode.count_classes for seg)")
    check(t.max_steps is None or t.max_steps >= 1, "training.max_steps", "must be >= 1 or null")

    # data
    check_data_values(cfg.data)


def load_config(overrides: list[str] | None = None, world_size: int = 1) -> DictConfig:
    """Compose and validate: the typed config a run uses."""
    return validate_config(compose_config(overrides), world_size=world_size)


# --------------------------------------------------------------------------- keys a run does not use
def _volumes(c: DictConfig) -> bool:
    return SampleSpace.from_config(c).volumetric


#: keys that do nothing in a combination (:func:`unused_keys`)
TRAIN_NO_EFFECT: tuple[NoEffect, ...] = (
    (("data.seg_positive_only", "data.min_lesion_pixels", "data.min_brain_fraction"), _volumes,
     "volumes are used whole, no slice is selected"),
    (("training.perceptual_slices",), lambda c: not _volumes(c), "slices: model.image_size is one size"),
    (("training.perceptual_weight", "training.perceptual_weights_path", "training.perceptual_allow_download",
      "training.perceptual_slices"), lambda c: not MODES[c.mode.name].supports_perceptual,
     "the perceptual loss is never applied to masks (mode=seg)"),
    (("training.ema_decay", "training.ema_update_after_step", "training.ema_update_every"),
     lambda c: not c.training.use_ema, "training.use_ema=false"),
    (("training.min_snr_gamma",), lambda c: not c.training.use_min_snr, "training.use_min_snr=false"),
    (("mode.margin",), lambda c: c.mode.get("lesion_fraction", 1) == 0,
     "mode.lesion_fraction=0: no region is a lesion"),
    (("strategy.base_image_size",), lambda c: not c.strategy.get("use_timestep_transform", True),
     "strategy.use_timestep_transform=false"),
)
#: what the learning-rate sweep does not use: its own schedule, no validation, EMA, checkpoints or resume
SWEEP_NO_EFFECT: tuple[NoEffect, ...] = TRAIN_NO_EFFECT + (
    (tuple(f"training.{k}" for k in ("epochs", "learning_rate", "warmup_steps", "max_steps", "val_interval",
                                      "num_val_samples", "num_sample_steps", "use_ema", "ema_decay",
                                      "ema_update_after_step", "ema_update_every", "resume", "checkpoint_keep",
                                      "max_nonfinite_steps", "log_every")),
     lambda c: True, "medgen-lr-find runs lr_find.num_steps steps at its own learning rates, with no validation, "
                     "EMA, checkpoints or resume"),
)


def unused_keys(cfg: DictConfig, given: list[str] | set[str], sweep: bool = False) -> list[str]:
    """The keys among ``given`` (set on the command line) that a training run of the validated ``cfg``
    does not use (``sweep``: medgen-lr-find's), each ``"key=value (why)"``, for a warning."""
    return no_effect(cfg, given, SWEEP_NO_EFFECT if sweep else TRAIN_NO_EFFECT)
