"""Every config default is written once, in the shipped YAML files, and YAML and schema cannot disagree.

The schemas (dataclasses) declare types and rules only: (a) no field of any schema has a default
(each is ``MISSING``, or a nested schema), so a default can live nowhere but in YAML; and (b) each
shipped YAML file, composed as its command composes it (every option of every config group), fills
its schema exactly: no key left ``MISSING`` (a key deleted from a YAML file) and no key outside the
schema (a key the schema lost). A config without a value fails in one line naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import itertools
from functools import partial

import pytest
from omegaconf import MISSING, DictConfig, OmegaConf

from medgen.core.paths import configs_dir
from medgen.core.schema import ConfigError, compose_config, merge_schema, shipped_values
from medgen.diffusion.config import (InpaintModeConfig, LesionModeConfig, ModeConfig, mode_schema, training_schema,
                                     validate_config)
from medgen.diffusion.modes import MODES
from medgen.diffusion.strategies import STRATEGIES
from medgen.evaluation.config import EvaluateConfig, validate_evaluate_config
from medgen.generation.config import GenerateConfig, validate_generate_config

#: the modules that hold schemas: every dataclass defined in one is a schema
SCHEMA_MODULES = ("medgen.data.config", "medgen.diffusion.config", "medgen.generation.config",
                  "medgen.evaluation.config")
#: the config groups of config.yaml (lr_find.yaml composes it)
GROUPS = ("model", "strategy", "mode", "training", "paths")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (configs_dir() / group).glob("*.yaml"))


# ============================================================================ (a) no defaults in a schema
def _schemas() -> dict[str, type]:
    """Every schema dataclass: those of the schema modules, each registered strategy's ``Config``,
    and every dataclass nested in one of them."""
    found = {f"{cls.__module__}.{cls.__qualname__}": cls for name in SCHEMA_MODULES
             for cls in vars(importlib.import_module(name)).values()
             if inspect.isclass(cls) and dataclasses.is_dataclass(cls) and cls.__module__ == name}
    found |= {f"strategy {name}: {cls.__qualname__}.Config": cls.Config for name, cls in STRATEGIES.items()}
    todo = list(found.values())
    while todo:
        for f in dataclasses.fields(todo.pop()):
            nested = f.default_factory
            if inspect.isclass(nested) and dataclasses.is_dataclass(nested) and nested not in found.values():
                found[f"{nested.__module__}.{nested.__qualname__}"] = nested
                todo.append(nested)
    return found


def test_the_schemas_are_found():
    names = set(_schemas())
    assert {"medgen.diffusion.config.Root", "medgen.diffusion.config.ModelConfig", "medgen.diffusion.config.ModeConfig",
            "medgen.diffusion.config.LesionModeConfig", "medgen.diffusion.config.TrainingConfig",
            "medgen.diffusion.config.PathsConfig", "medgen.data.config.DataConfig",
            "medgen.generation.config.GenerateConfig", "medgen.generation.config.GateConfig",
            "medgen.evaluation.config.EvaluateConfig", "medgen.evaluation.config.BudgetConfig"} <= names
    assert {f"strategy {name}: {cls.__qualname__}.Config" for name, cls in STRATEGIES.items()} <= names


def _defaults(schema: type) -> list[str]:
    """The fields of ``schema`` that have a default (a value, or a factory that makes no schema)."""
    out = []
    for f in dataclasses.fields(schema):
        factory = f.default_factory
        if factory is not dataclasses.MISSING:
            if not (inspect.isclass(factory) and dataclasses.is_dataclass(factory)):
                out.append(f"{f.name} (default_factory={factory!r})")
        elif f.default is not dataclasses.MISSING and f.default is not MISSING:
            out.append(f"{f.name} = {f.default!r}")
    return out


@pytest.mark.parametrize("name", sorted(_schemas()))
def test_no_schema_field_has_a_default(name):
    """A default lives in the YAML file a user reads and overrides, never in the schema as well."""
    defaults = _defaults(_schemas()[name])
    assert not defaults, (f"{name} has defaults: {defaults}; a schema declares types and rules only (field = MISSING, "
                          "or choice(...) / at_least(...)): write the default in the shipped YAML file")


#: the typed values the entry points make from a validated config once, for the stages below them: built
#: from every key, they hold no default of their own either (a third copy that would drift)
REQUEST_MODULES = ("medgen.generation.requests", "medgen.evaluation.requests")


def _requests() -> dict[str, type]:
    return {f"{cls.__module__}.{cls.__qualname__}": cls for name in REQUEST_MODULES
            for cls in vars(importlib.import_module(name)).values()
            if inspect.isclass(cls) and dataclasses.is_dataclass(cls) and cls.__module__ == name}


@pytest.mark.parametrize("name", sorted(_requests()))
def test_no_stage_request_field_has_a_default(name):
    defaults = _defaults(_requests()[name])
    assert not defaults, f"{name} has defaults: {defaults}; its builder passes every value from the validated config"


# ============================================================================ (b) every YAML fills its schema
def _leaves(node: DictConfig, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for key in node.keys():
        child = node._get_node(key)
        out |= _leaves(child, f"{prefix}{key}.") if isinstance(child, DictConfig) else {f"{prefix}{key}"}
    return out


def _disagreement(schema: DictConfig, cfg: DictConfig, where: str) -> None:
    """Fail naming every key of ``cfg`` (Hydra's node dropped) outside ``schema`` and every schema
    key ``cfg`` leaves without a value."""
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])
    known = _leaves(schema)  # a leaf of type Any may hold a dict: its keys are inside
    outside = sorted(k for k in _leaves(cfg) if not any(k == s or k.startswith(s + ".") for s in known))
    plain = OmegaConf.create(OmegaConf.to_container(schema))  # untyped: takes the keys outside it (named above)
    merged = OmegaConf.merge(plain, OmegaConf.to_container(cfg))
    missing = sorted(OmegaConf.missing_keys(merged))
    problems = ([f"keys outside the schema {outside}"] if outside else []) + \
        ([f"schema keys without a value (the YAML must set them) {missing}"] if missing else [])
    assert not problems, f"{where} and its schema disagree: {'; '.join(problems)}"


def _training_combinations() -> list:
    """Every option of every group of config.yaml, each strategy with each mode."""
    combos = [[f"strategy={s}", f"mode={m}"] for s, m in itertools.product(_options("strategy"), _options("mode"))]
    combos += [[f"{group}={option}"] for group in ("model", "training", "paths") for option in _options(group)]
    return [pytest.param(config_name, overrides, id=f"{config_name}:{','.join(overrides)}")
            for config_name in ("config", "lr_find") for overrides in combos]


@pytest.mark.parametrize("config_name, overrides", _training_combinations())
def test_each_training_yaml_fills_its_schema(config_name, overrides):
    """config.yaml (and lr_find.yaml, which composes it) with each group option: the root, the
    chosen strategy's ``Config``, the mode class's schema, ``model``/``training``/``paths``/``data``."""
    cfg = compose_config(overrides, config_name)
    schema = training_schema(STRATEGIES[cfg.strategy.name], MODES[cfg.mode.name])
    train = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "lr_find"])
    _disagreement(schema, train, f"{config_name}.yaml with {' '.join(overrides)}")
    validate_config(train)  # and it validates: the shipped values are legal values
    if config_name == "lr_find":  # the sweep's keys are checked by scripts/lr_find.py, which has no dataclass
        assert not OmegaConf.missing_keys(cfg.lr_find)


@pytest.mark.parametrize("config_name, schema", [("generate", GenerateConfig), ("evaluate", EvaluateConfig)])
def test_generate_and_evaluate_yaml_fill_their_schemas(config_name, schema):
    cfg = compose_config([], config_name)
    _disagreement(OmegaConf.structured(schema), cfg, f"{config_name}.yaml")


def test_every_mode_file_has_its_mode_class_s_keys():
    """The mode schema follows the mode class: only a mode that may be conditioned on its lesions
    has ``size_bins`` / ``count_classes``, only the one that paints into scans its window and regions."""
    schemas = {"seg": LesionModeConfig, "inpaint": InpaintModeConfig}
    for name in _options("mode"):
        assert mode_schema(MODES[name]) is schemas.get(name, ModeConfig), name


def test_the_shipped_values_are_what_hydra_composes():
    """``shipped_values`` (the defaults ``generation.config.ignored_keys`` compares with) reads the
    file without Hydra; it gives what composing does."""
    for name in ("generate", "evaluate"):
        composed = compose_config([], name)
        OmegaConf.resolve(composed)
        assert OmegaConf.to_container(shipped_values(name)) == OmegaConf.to_container(composed), name


# ============================================================================ a config without a value
def _without(cfg: DictConfig, key: str) -> DictConfig:
    OmegaConf.set_struct(cfg, False)
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    del node[leaf]
    return cfg


@pytest.mark.parametrize("validate, config_name, key", [
    (validate_config, "config", "training.epochs"),
    (validate_config, "config", "strategy.schedule"),
    (validate_config, "config", "mode.size_bins"),
    (validate_config, "config", "data.brain_from"),
    (validate_config, "config", "seed"),
    (validate_generate_config, "generate", "gate.max_area"),
    (validate_evaluate_config, "evaluate", "budget.steps"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_key_without_a_value_is_a_config_error_naming_it(validate, config_name, key):
    cfg = _without(compose_config(["image_checkpoint=i", "seg_checkpoint=s"] if config_name == "generate" else
                                  ["real_dir=r", "synthetic_dir=s"] if config_name == "evaluate" else [], config_name),
                   key)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert info.value.key == key and info.value.reason.startswith("missing: the config gives it no value"), str(info.value)


def test_a_config_built_without_the_yaml_names_what_it_lacks():
    """The schema alone supplies nothing: a partial config built in code fails naming a key it lacks."""
    with pytest.raises(ConfigError, match=r"config error at 'allow_partial': missing: .*compose_config.*; no value for "):
        validate_evaluate_config(OmegaConf.create({"real_dir": "r", "synthetic_dir": "s"}))
    with pytest.raises(ConfigError, match=r"config error at 'data.brain_from': missing: "):
        merge_schema(partial(training_schema, STRATEGIES["ddpm"], MODES["seg"]), OmegaConf.create({}))
