"""Every shipped config composes and validates; bad configs fail naming the dotted key."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from medgen.core.paths import configs_dir, resolve_path
from medgen.core.schema import ConfigError, compose_config
from medgen.diffusion.config import load_config, validate_config

CONFIGS = configs_dir()
GROUPS = {g: sorted(p.stem for p in (CONFIGS / g).glob("*.yaml")) for g in ("model", "strategy", "mode", "training", "paths")}


def test_groups_are_the_specification_s():
    assert GROUPS["strategy"] == ["ddpm", "rflow"]
    assert GROUPS["mode"] == ["bravo", "dual", "inpaint", "seg"]  # the specification's 3, and inpaint
    assert {"default", "fast_debug", "cpu"} <= set(GROUPS["training"])
    assert GROUPS["paths"] == ["cluster", "local"]


@pytest.mark.parametrize("strategy,mode", list(itertools.product(GROUPS["strategy"], GROUPS["mode"])))
def test_every_strategy_mode_combination_validates(strategy, mode):
    cfg = load_config([f"strategy={strategy}", f"mode={mode}"])
    assert cfg.strategy.name == strategy and cfg.mode.name == mode


@pytest.mark.parametrize("group", ["model", "training", "paths"])
def test_every_group_option_validates(group):
    for option in GROUPS[group]:
        cfg = load_config([f"{group}={option}"])
        assert cfg[group].get("name", option) == option


def test_documented_defaults():
    """The defaults the configuration table of docs/configuration.md states."""
    cfg = load_config([])
    assert cfg.model.image_size == 128
    assert list(cfg.model.channels) == [128, 256, 256]
    assert list(cfg.model.attention_levels) == [False, True, True]
    assert cfg.model.num_res_blocks == 1 and cfg.model.num_head_channels == 256
    assert cfg.strategy.num_train_timesteps == 1000 and cfg.strategy.schedule == "cosine"
    r = load_config(["strategy=rflow"]).strategy
    assert r.sample_method == "logit-normal" and r.use_discrete_timesteps and r.use_timestep_transform


def test_cpu_profile_is_a_laptop_profile():
    t = load_config(["training=cpu"]).training
    assert t.precision == "bf16" and t.perceptual_weight == 0


BAD = [
    (["training.learning_rate=0"], "training.learning_rate"),
    (["training.learning_rate=-1e-3"], "training.learning_rate"),
    (["training.batch_size=0"], "training.batch_size"),
    (["training.warmup_steps=-1"], "training.warmup_steps"),
    (["model.attention_levels=[false,true]"], "model.attention_levels"),
    (["model.image_size=98"], "model.image_size"),
    (["model.channels=[128,250,256]"], "model.channels[1]"),
    (["model.num_head_channels=100"], "model.num_head_channels"),
    (["+strategy.prediction_type=velocity"], "strategy.prediction_type"),  # the strategy's own, not a key
    (["strategy=rflow", "strategy.sample_method=gaussian"], "strategy.sample_method"),
    (["strategy=rflow", "strategy.base_image_size=0"], "strategy.base_image_size"),
    (["strategy.schedule=quadratic"], "strategy.schedule"),
    (["strategy.num_train_timesteps=1"], "strategy.num_train_timesteps"),
    (["+strategy.beta_end=0.02"], "strategy.beta_end"),  # a key DDPM does not have
    (["strategy.name=edm"], "strategy.name"),
    (["mode.name=triple"], "mode.name"),
    (["+mode.in_channels=3"], "mode.in_channels"),  # derived from the keys, not a setting
    (["mode=bravo", "mode.image_keys=[t2]"], "mode.image_keys[0]"),
    (["mode=bravo", "mode.image_keys=[seg]"], "mode.image_keys[0]"),
    (["mode=bravo", "mode.image_keys=[bravo,flair]"], "mode.image_keys"),
    (["mode=bravo", "mode.cond_keys=[flair]"], "mode.cond_keys[0]"),
    (["mode=dual", "mode.cond_keys=[]"], "mode.cond_keys"),
    (["mode=dual", "mode.image_keys=[t1_pre,t1_pre]"], "mode.image_keys"),
    (["mode=seg", "mode.image_keys=[bravo]"], "mode.image_keys[0]"),
    (["mode=seg", "mode.cond_keys=[seg]"], "mode.cond_keys[0]"),
    (["training.precision=fp16"], "training.precision"),
    (["training.ema_decay=1.5"], "training.ema_decay"),
    (["training.cond_dropout=0.1"], "training.cond_dropout"),  # seg mode is unconditional
    (["+training.learning_rat=1e-3"], "training.learning_rat"),  # unknown key (typo)
    (["training.epochs=many"], "training.epochs"),  # wrong type
    (["data.lower_percentile=99", "data.upper_percentile=1"], "data.upper_percentile"),
    (["+model.spatial_dims=3"], "model.spatial_dims"),  # removed: model.image_size=[X,Y,Z] says volumes
    (["model.image_size=[64,64,30]"], "model.image_size"),  # 30 is not divisible by 4
    (["model.image_size=[64,64]"], "model.image_size"),  # a slice is one size, a volume three
    (["model.image_size=[64,-64,32]"], "model.image_size"),
    (["model.image_size=0"], "model.image_size"),
    (["+training.name=cpu"], "training.name"),  # removed: a label nothing read
    (["+paths.name=local"], "paths.name"),  # removed: a label nothing read
    (["mode=bravo", "+mode.size_bins=null"], "mode.size_bins"),  # only a mode conditioned on its lesions has it
    (["training.epochs=???"], "training.epochs"),  # no value: the schema has no default to fall back on
]


@pytest.mark.parametrize("overrides,key", BAD, ids=[k for _, k in BAD])
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(overrides)
    assert info.value.key == key, str(info.value)
    assert key in str(info.value)


def test_a_removed_key_is_an_unknown_key():
    """``training.name`` and ``paths.name`` are gone: set, they fail as any unknown key does (Hydra's
    own message without ``+``, the schema's ``ConfigError`` with it)."""
    from hydra.errors import ConfigCompositionException

    for key in ("training.name", "paths.name", "training.learning_rat"):
        with pytest.raises(ConfigCompositionException, match=rf"Could not override '{key}'"):
            compose_config([f"{key}=x"])
        with pytest.raises(ConfigError, match=rf"config error at '{key}': Key '{key.split('.')[1]}' not in"):
            load_config([f"+{key}=x"])


def test_batch_must_divide_world_size():
    cfg = compose_config(["training.batch_size=6"])
    validate_config(cfg, world_size=2)
    with pytest.raises(ConfigError, match="world size 4"):
        validate_config(cfg, world_size=4)


def test_cluster_paths_are_overridable_by_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDGEN_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("MEDGEN_RUNS_DIR", str(tmp_path / "r"))
    monkeypatch.setenv("MEDGEN_CACHE_DIR", str(tmp_path / "c"))
    for paths in ("local", "cluster"):
        p = load_config([f"paths={paths}"]).paths
        assert (p.data_dir, p.model_dir, p.cache_dir) == (str(tmp_path / "d"), str(tmp_path / "r"), str(tmp_path / "c"))


def test_relative_paths_resolve_against_launch_dir(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert resolve_path("./data/x") == tmp_path / "data" / "x"
    assert resolve_path("~/y") == Path.home() / "y"


def test_run_folder_pattern(tmp_path, monkeypatch):
    """Hydra writes nothing (medgen names each run folder itself, uniquely): <model_dir>/<mode>/<strategy>_<size>_<time>."""
    import re

    from medgen.diffusion.run.folder import plan_run

    hydra = OmegaConf.to_container(OmegaConf.load(CONFIGS / "config.yaml"), resolve=False)["hydra"]
    assert hydra["run"]["dir"] == "." and hydra["output_subdir"] is None
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    plan = plan_run(load_config(["mode=dual", "strategy=rflow", f"paths.model_dir={tmp_path}"]))
    assert plan.run_dir.parent == tmp_path / "dual" and plan.run_dir.is_dir() and plan.checkpoint is None
    assert re.fullmatch(r"rflow_128_\d{8}-\d{6}", plan.run_dir.name)
    volumes = plan_run(load_config(["mode=seg", "model.image_size=[32,32,16]",
                                    f"paths.model_dir={tmp_path}"]))
    assert re.fullmatch(r"ddpm_32x32x16_\d{8}-\d{6}", volumes.run_dir.name)


def test_sigmoid_schedule_is_accepted_by_the_one_validator_and_the_strategy():
    """The schedule choices are declared once, on the strategy's Config: what validates, builds."""
    from medgen.diffusion.strategies import build_strategy

    cfg = load_config(["strategy.schedule=sigmoid_beta", "model.image_size=32", "model.channels=[32,32]",
                       "model.attention_levels=[false,false]"])
    assert build_strategy(cfg, 128).scheduler.betas.shape == (1000,)


def test_a_registered_strategy_and_mode_need_no_validator_edit():
    """Adding a strategy or a mode is a class, its registration and a YAML file: the validator
    picks up the new class's schema and key rules."""
    from dataclasses import dataclass

    from medgen.core.schema import choice
    from medgen.diffusion.modes import MODES, ConditionalSingleMode, register_mode
    from medgen.diffusion.strategies import STRATEGIES, DDPMStrategy, register_strategy

    @register_strategy
    class SteppedDDPM(DDPMStrategy):
        name = "stepped"

        @dataclass
        class Config(DDPMStrategy.Config):
            schedule: str = choice("linear_beta")

    @register_mode
    class FlairFromT1(ConditionalSingleMode):
        name = "flair_from_t1"
        cond_key_choices = ("t1_pre",)

    try:
        base = compose_config([])
        base.strategy = {"name": "stepped", "num_train_timesteps": 100, "schedule": "linear_beta"}
        base.mode = {"name": "flair_from_t1", "image_keys": ["flair"], "cond_keys": ["t1_pre"]}
        cfg = validate_config(base)
        assert cfg.strategy.name == "stepped" and list(cfg.mode.cond_keys) == ["t1_pre"]
        base.strategy.schedule = "cosine"
        with pytest.raises(ConfigError) as info:
            validate_config(base)
        assert info.value.key == "strategy.schedule"
        base.strategy.schedule = "linear_beta"
        base.mode.cond_keys = ["seg"]
        with pytest.raises(ConfigError) as info:
            validate_config(base)
        assert info.value.key == "mode.cond_keys[0]" and "['t1_pre']" in str(info.value)
    finally:
        STRATEGIES.pop("stepped")
        MODES.pop("flair_from_t1")
