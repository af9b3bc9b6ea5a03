"""How a configuration is checked: the mechanism every layer's schema uses.

A schema is a dataclass beside what it configures (``medgen.diffusion.config`` for training,
``medgen.generation.config``, ``medgen.evaluation.config``). It declares types and rules only:
every default value is written once, in the shipped YAML files (``medgen/configs``), and every
schema field is ``MISSING`` (or a nested schema). Fields declare allowed values with :func:`choice`
and :func:`at_least`; :func:`merge_schema` merges a composed config into it (unknown keys, wrong
types and keys the config gives no value fail there) and :func:`check_fields` checks the declared
values. Every failure is a :class:`ConfigError` naming the dotted key and the reason.
:func:`compose_config` composes the shipped Hydra configs without validating them
(``tests/unit/test_config_once.py`` holds the YAML files and the schemas to each other).
"""

from __future__ import annotations

from dataclasses import field, fields
from typing import Any, Callable, Iterable, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = ["ConfigError", "choice", "at_least", "check", "check_fields", "merge_schema", "compose_config",
           "shipped_values", "no_effect"]


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or impossible. ``key`` is the dotted path."""

    def __init__(self, key: str, reason: str):
        self.key = key
        self.reason = reason
        super().__init__(f"config error at '{key}': {reason}")


# --------------------------------------------------------------------------- field helpers
def choice(*choices: Any) -> Any:
    """A dataclass field whose value must be one of ``choices`` (checked by :func:`check_fields`);
    ``MISSING`` in the schema: its default is the shipped YAML's."""
    return field(default=MISSING, metadata={"choices": choices})


def at_least(minimum: float) -> Any:
    """A dataclass field whose value must be ``>= minimum`` (a null passes: checked by
    :func:`check_fields`); ``MISSING`` in the schema: its default is the shipped YAML's."""
    return field(default=MISSING, metadata={"min": minimum})


# --------------------------------------------------------------------------- checks
def check(ok: bool, key: str, reason: str) -> None:
    """Raise :class:`ConfigError` at ``key`` with ``reason`` unless ``ok``."""
    if not ok:
        raise ConfigError(key, reason)


def check_fields(node: DictConfig, schema: type, prefix: str | None) -> None:
    """The ``choices`` / ``min`` metadata of each dataclass field of ``schema`` (see :func:`choice`,
    :func:`at_least`), for the values in ``node``; ``prefix`` is the node's dotted key (None: root)."""
    for f in fields(schema):
        value, key = node[f.name], f"{prefix}.{f.name}" if prefix else f.name
        if "choices" in f.metadata:
            options = f.metadata["choices"]
            if value in ("True", "False") and value.lower() in options:  # `key=true` parsed as a boolean
                value = node[f.name] = value.lower()
            check(value in options, key, f"{value!r} is not one of {list(options)}")
        if "min" in f.metadata and value is not None:
            check(value >= f.metadata["min"], key, f"must be >= {f.metadata['min']}, got {value}")


def _plain(cfg: DictConfig) -> DictConfig:
    """``cfg`` without Hydra's own node, as plain (untyped) config: a config that was validated
    before validates again."""
    keys = [k for k in cfg.keys() if k != "hydra"]
    return OmegaConf.create(OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=False))


def merge_schema(schema: type | Callable[[], DictConfig], cfg: DictConfig) -> DictConfig:
    """``cfg`` (Hydra's node dropped) merged into ``schema`` (a dataclass, or a function building the
    structured config) and resolved: the typed config. An unknown key, a wrong type or a bad
    interpolation raises :class:`ConfigError` at its key (``<root>`` where OmegaConf names none); so
    does a key the config gives no value (the schema has no defaults: a config must be composed from
    the shipped YAML files, which set every key)."""
    try:
        base = OmegaConf.structured(schema) if isinstance(schema, type) else schema()
        merged = OmegaConf.merge(base, _plain(cfg))
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            more = missing[1:6] + ([f"{len(missing) - 6} more"] if len(missing) > 6 else [])
            also = f"; no value for {', '.join(more)} either" if more else ""
            raise ConfigError(missing[0], "missing: the config gives it no value (defaults live in the shipped YAML "
                                          "files, not in the schema: compose the config with "
                                          "medgen.core.schema.compose_config)" + also)
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(str(getattr(exc, "full_key", None) or "<root>"), str(exc).splitlines()[0]) from None
    return merged


# --------------------------------------------------------------------------- keys a run does not use
#: a rule of :func:`no_effect`: (keys, or groups of keys, that do nothing ... when this holds of the config, why)
NoEffect = tuple[tuple[str, ...], Callable[[DictConfig], bool], str]


def no_effect(cfg: DictConfig, given: Iterable[str], rules: Sequence[NoEffect]) -> list[str]:
    """The keys among ``given`` (dotted keys a user set: command-line overrides, or values away from
    the defaults) that do nothing in ``cfg``'s combination by ``rules``, each as ``"key=value (why)"``,
    for a warning: a key a run cannot use is named, never dropped without a word."""
    out = []
    for keys, applies, why in rules:
        if applies(cfg):
            out += [f"{key}={OmegaConf.select(cfg, key)} ({why})" for key in sorted(given)
                    if any(key == k or key.startswith(k + ".") for k in keys)]
    return out


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


def shipped_values(config_name: str) -> DictConfig:
    """The resolved values of a shipped config that composes no group (``generate``, ``evaluate``):
    what :func:`compose_config` gives for it, read without Hydra, so safe to call inside a running
    Hydra app (which :func:`compose_config` would re-initialise): the defaults to compare a config with."""
    from medgen.core.paths import configs_dir

    cfg = OmegaConf.load(configs_dir() / f"{config_name}.yaml")
    values = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k not in ("defaults", "hydra")])
    OmegaConf.resolve(values)
    return values
