"""Typed configuration schema, checked once at the boundary.

Hydra composes ``configs/``; :func:`validate_config` merges the result into the typed
schema below (unknown keys and wrong types fail there) and then checks values that are
impossible (lr <= 0, channel/attention length mismatch, ...). Every failure is a
:class:`ConfigError` naming the dotted key and the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from medgen.core.constants import IMAGE_MODALITIES, MASK_KEY, MODALITIES


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or impossible. ``key`` is the dotted path."""

    def __init__(self, key: str, reason: str):
        self.key = key
        self.reason = reason
        super().__init__(f"config error at '{key}': {reason}")


# --------------------------------------------------------------------------- schema
@dataclass
class ModelConfig:
    image_size: int = 128
    channels: list[int] = field(default_factory=lambda: [128, 256, 256])
    attention_levels: list[bool] = field(default_factory=lambda: [False, True, True])
    num_res_blocks: int = 1
    num_head_channels: int = 256
    norm_num_groups: int = 32


@dataclass
class DDPMConfig:
    name: str = "ddpm"
    num_train_timesteps: int = 1000
    schedule: str = "cosine"
    prediction_type: str = "epsilon"


@dataclass
class RFlowConfig:
    name: str = "rflow"
    num_train_timesteps: int = 1000
    use_discrete_timesteps: bool = True
    sample_method: str = "logit-normal"
    use_timestep_transform: bool = True
    base_image_size: int = 64
    prediction_type: str = "velocity"


@dataclass
class ModeConfig:
    name: str = "seg"
    is_conditional: bool = False
    in_channels: int = 1
    out_channels: int = 1
    image_keys: list[str] = field(default_factory=lambda: ["seg"])
    cond_keys: list[str] = field(default_factory=list)


@dataclass
class TrainingConfig:
    name: str = "default"
    epochs: int = 500
    batch_size: int = 16
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    gradient_clip_norm: float = 1.0
    warmup_epochs: int = 5
    val_interval: int = 30
    use_ema: bool = True
    ema_decay: float = 0.9999
    ema_update_after_step: int = 100
    ema_update_every: int = 10
    use_min_snr: bool = True
    min_snr_gamma: float = 5.0
    perceptual_weight: float = 0.001
    perceptual_weights_path: Optional[str] = None
    perceptual_allow_download: bool = False
    use_multi_gpu: bool = False
    precision: str = "bf16"
    compile: bool = False
    cond_dropout: float = 0.0
    max_steps: Optional[int] = None
    resume: Optional[str] = None
    checkpoint_keep: int = 3
    max_nonfinite_steps: int = 5
    log_every: int = 50
    num_val_samples: int = 4
    num_sample_steps: int = 50


@dataclass
class PathsConfig:
    name: str = "local"
    data_dir: str = "./data/brainmetshare-3"
    model_dir: str = "./runs"
    cache_dir: str = "~/.cache/medgen"


@dataclass
class DataConfig:
    seg_positive_only: bool = True
    min_lesion_pixels: int = 1
    min_brain_fraction: float = 0.05
    brain_intensity: float = 0.1
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    val_fraction: float = 0.15
    num_workers: int = 2
    validate: bool = True


STRATEGY_SCHEMAS: dict[str, type] = {"ddpm": DDPMConfig, "rflow": RFlowConfig}
#: prediction targets each strategy implements
PREDICTION_TYPES: dict[str, tuple[str, ...]] = {"ddpm": ("epsilon",), "rflow": ("velocity",)}
PRECISIONS = ("bf16", "fp32")


def _schema(strategy_name: str) -> DictConfig:
    @dataclass
    class Root:
        seed: int = 42
        model: ModelConfig = field(default_factory=ModelConfig)
        strategy: Any = None
        mode: ModeConfig = field(default_factory=ModeConfig)
        training: TrainingConfig = field(default_factory=TrainingConfig)
        paths: PathsConfig = field(default_factory=PathsConfig)
        data: DataConfig = field(default_factory=DataConfig)

    root = OmegaConf.structured(Root)
    root.strategy = OmegaConf.structured(STRATEGY_SCHEMAS[strategy_name])
    return root


# --------------------------------------------------------------------------- checks
def _check(ok: bool, key: str, reason: str) -> None:
    if not ok:
        raise ConfigError(key, reason)


def validate_config(cfg: DictConfig, world_size: int = 1) -> DictConfig:
    """Merge ``cfg`` into the typed schema and check every value. Returns the typed config.

    Raises :class:`ConfigError` naming the first bad key.
    """
    strategy_name = OmegaConf.select(cfg, "strategy.name", default=None)
    _check(
        strategy_name in STRATEGY_SCHEMAS,
        "strategy.name",
        f"unknown strategy {strategy_name!r}; choose one of {sorted(STRATEGY_SCHEMAS)}",
    )
    schema = _schema(strategy_name)
    user = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]) if "hydra" in cfg else cfg
    try:
        merged = OmegaConf.merge(schema, user)
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as exc:  # unknown key / wrong type / bad interpolation
        key = getattr(exc, "full_key", None) or "<root>"
        msg = str(exc).splitlines()[0]
        raise ConfigError(str(key), msg) from None
    _check_values(merged, world_size)
    return merged


def _check_values(cfg: DictConfig, world_size: int) -> None:
    m, s, mo, t, d = cfg.model, cfg.strategy, cfg.mode, cfg.training, cfg.data

    # model
    n_levels = len(m.channels)
    _check(n_levels >= 1, "model.channels", "needs at least one level")
    _check(
        len(m.attention_levels) == n_levels,
        "model.attention_levels",
        f"has {len(m.attention_levels)} entries but model.channels has {n_levels}; they must match",
    )
    _check(m.image_size > 0, "model.image_size", "must be positive")
    factor = 2 ** (n_levels - 1)
    _check(
        m.image_size % factor == 0,
        "model.image_size",
        f"{m.image_size} is not divisible by 2^{n_levels - 1}={factor} (the U-Net downsamples {n_levels - 1} times)",
    )
    for i, ch in enumerate(m.channels):
        _check(ch > 0, f"model.channels[{i}]", "must be positive")
        _check(
            ch % m.norm_num_groups == 0,
            f"model.channels[{i}]",
            f"{ch} is not divisible by model.norm_num_groups={m.norm_num_groups}",
        )
        if m.attention_levels[i]:
            _check(
                m.num_head_channels > 0 and ch % m.num_head_channels == 0,
                "model.num_head_channels",
                f"{m.num_head_channels} does not divide model.channels[{i}]={ch} (an attention level)",
            )
    _check(m.num_res_blocks >= 1, "model.num_res_blocks", "must be >= 1")

    # strategy
    _check(s.num_train_timesteps >= 2, "strategy.num_train_timesteps", "must be >= 2")
    allowed = PREDICTION_TYPES[s.name]
    _check(
        s.prediction_type in allowed,
        "strategy.prediction_type",
        f"{s.prediction_type!r} does not match strategy {s.name!r} (which predicts {', '.join(allowed)})",
    )
    if s.name == "ddpm":
        _check(s.schedule in ("cosine", "linear_beta", "scaled_linear_beta"), "strategy.schedule",
               f"unknown schedule {s.schedule!r}; choose cosine, linear_beta or scaled_linear_beta")
    if s.name == "rflow":
        _check(s.sample_method in ("uniform", "logit-normal"), "strategy.sample_method",
               f"unknown sample method {s.sample_method!r}; choose uniform or logit-normal")
        _check(s.base_image_size > 0, "strategy.base_image_size", "must be positive")

    # mode
    known = set(MODALITIES)
    for i, k in enumerate(mo.image_keys):
        _check(k in known, f"mode.image_keys[{i}]", f"unknown modality {k!r}; known: {sorted(known)}")
    for i, k in enumerate(mo.cond_keys):
        _check(k == MASK_KEY, f"mode.cond_keys[{i}]", f"only the mask {MASK_KEY!r} can condition, got {k!r}")
    _check(len(mo.image_keys) >= 1, "mode.image_keys", "needs at least one key")
    _check(mo.is_conditional == bool(mo.cond_keys), "mode.is_conditional",
           f"is {mo.is_conditional} but mode.cond_keys is {list(mo.cond_keys)}")
    _check(mo.out_channels == len(mo.image_keys), "mode.out_channels",
           f"{mo.out_channels} but mode.image_keys has {len(mo.image_keys)} entries")
    _check(mo.in_channels == len(mo.image_keys) + len(mo.cond_keys), "mode.in_channels",
           f"{mo.in_channels} but image_keys + cond_keys give {len(mo.image_keys) + len(mo.cond_keys)}")
    if mo.name == "seg":
        _check(list(mo.image_keys) == [MASK_KEY], "mode.image_keys", "seg mode generates the mask only: [seg]")
    else:
        for i, k in enumerate(mo.image_keys):
            _check(k in IMAGE_MODALITIES, f"mode.image_keys[{i}]", f"{k!r} is not an image modality")

    # training
    _check(t.epochs >= 1, "training.epochs", "must be >= 1")
    _check(t.batch_size >= 1, "training.batch_size", "must be >= 1")
    _check(world_size >= 1 and t.batch_size % world_size == 0, "training.batch_size",
           f"{t.batch_size} is not divisible by the world size {world_size} (batch_size is the global batch)")
    _check(t.learning_rate > 0, "training.learning_rate", f"must be > 0, got {t.learning_rate}")
    _check(t.weight_decay >= 0, "training.weight_decay", "must be >= 0")
    _check(t.gradient_clip_norm > 0, "training.gradient_clip_norm", "must be > 0")
    _check(0 <= t.warmup_epochs < t.epochs or t.warmup_epochs == 0, "training.warmup_epochs",
           f"{t.warmup_epochs} must be smaller than training.epochs={t.epochs}")
    _check(t.val_interval >= 1, "training.val_interval", "must be >= 1")
    _check(0 < t.ema_decay < 1, "training.ema_decay", "must be in (0, 1)")
    _check(t.ema_update_after_step >= 0, "training.ema_update_after_step", "must be >= 0")
    _check(t.ema_update_every >= 1, "training.ema_update_every", "must be >= 1")
    _check(t.min_snr_gamma > 0, "training.min_snr_gamma", "must be > 0")
    _check(t.perceptual_weight >= 0, "training.perceptual_weight", "must be >= 0")
    _check(t.precision in PRECISIONS, "training.precision", f"{t.precision!r}; choose one of {PRECISIONS}")
    _check(0 <= t.cond_dropout < 1, "training.cond_dropout", "must be in [0, 1)")
    _check(t.cond_dropout == 0 or mo.is_conditional, "training.cond_dropout",
           f"classifier-free guidance needs a conditional mode; mode {mo.name!r} has no condition")
    _check(t.max_steps is None or t.max_steps >= 1, "training.max_steps", "must be >= 1 or null")
    _check(t.checkpoint_keep >= 0, "training.checkpoint_keep", "must be >= 0")
    _check(t.max_nonfinite_steps >= 1, "training.max_nonfinite_steps", "must be >= 1")
    _check(t.log_every >= 1, "training.log_every", "must be >= 1")
    _check(t.num_val_samples >= 0, "training.num_val_samples", "must be >= 0")
    _check(t.num_sample_steps >= 1, "training.num_sample_steps", "must be >= 1")

    # data
    _check(0 <= d.lower_percentile < d.upper_percentile <= 100, "data.upper_percentile",
           f"need 0 <= lower_percentile ({d.lower_percentile}) < upper_percentile ({d.upper_percentile}) <= 100")
    _check(0 <= d.min_brain_fraction <= 1, "data.min_brain_fraction", "must be in [0, 1]")
    _check(0 <= d.brain_intensity < 1, "data.brain_intensity", "must be in [0, 1)")
    _check(0 < d.val_fraction < 1, "data.val_fraction", "must be in (0, 1)")
    _check(d.min_lesion_pixels >= 0, "data.min_lesion_pixels", "must be >= 0")
    _check(d.num_workers >= 0, "data.num_workers", "must be >= 0")


# --------------------------------------------------------------------------- compose
def compose_config(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose the shipped configs with Hydra's compose API (no run folder, no chdir).

    Used by tests, benchmarks and non-Hydra entry points. Does not validate.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from medgen.core.paths import configs_dir

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(configs_dir()), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides or []))


def load_config(overrides: list[str] | None = None, world_size: int = 1) -> DictConfig:
    """Compose and validate: the typed config a run uses."""
    return validate_config(compose_config(overrides), world_size=world_size)
