"""Every shipped config composes and validates; bad configs fail naming the dotted key."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from medgen.core.config import ConfigError, compose_config, load_config, validate_config
from medgen.core.paths import configs_dir, resolve_path

CONFIGS = configs_dir()
GROUPS = {g: sorted(p.stem for p in (CONFIGS / g).glob("*.yaml")) for g in ("model", "strategy", "mode", "training", "paths")}


def test_groups_are_the_specification_s():
    assert GROUPS["strategy"] == ["ddpm", "rflow"]
    assert GROUPS["mode"] == ["bravo", "dual", "seg"]
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


def test_spec_defaults():
    cfg = load_config([])
    assert cfg.model.image_size == 128
    assert list(cfg.model.channels) == [128, 256, 256]
    assert list(cfg.model.attention_levels) == [False, True, True]
    assert cfg.model.num_res_blocks == 1 and cfg.model.num_head_channels == 256
    t = cfg.training
    assert (t.epochs, t.batch_size, t.learning_rate, t.gradient_clip_norm, t.warmup_epochs, t.val_interval) == (
        500, 16, 1e-4, 1.0, 5, 30)
    assert (t.ema_decay, t.ema_update_after_step, t.ema_update_every) == (0.9999, 100, 10)
    assert t.use_min_snr and t.min_snr_gamma == 5 and t.perceptual_weight == 0.001 and not t.use_multi_gpu
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
    (["model.attention_levels=[false,true]"], "model.attention_levels"),
    (["model.image_size=98"], "model.image_size"),
    (["model.channels=[128,250,256]"], "model.channels[1]"),
    (["model.num_head_channels=100"], "model.num_head_channels"),
    (["strategy.prediction_type=velocity"], "strategy.prediction_type"),
    (["strategy=rflow", "strategy.prediction_type=epsilon"], "strategy.prediction_type"),
    (["strategy=rflow", "strategy.sample_method=gaussian"], "strategy.sample_method"),
    (["mode.in_channels=3"], "mode.in_channels"),
    (["mode=bravo", "mode.image_keys=[t2]"], "mode.image_keys[0]"),
    (["training.precision=fp16"], "training.precision"),
    (["training.ema_decay=1.5"], "training.ema_decay"),
    (["training.cond_dropout=0.1"], "training.cond_dropout"),  # seg mode is unconditional
    (["+training.learning_rat=1e-3"], "training.learning_rat"),  # unknown key (typo)
    (["training.epochs=many"], "training.epochs"),  # wrong type
    (["data.lower_percentile=99", "data.upper_percentile=1"], "data.upper_percentile"),
]


@pytest.mark.parametrize("overrides,key", BAD, ids=[k for _, k in BAD])
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(overrides)
    assert info.value.key == key, str(info.value)
    assert key in str(info.value)


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


def test_run_folder_pattern():
    raw = OmegaConf.load(CONFIGS / "config.yaml")
    dir_ = OmegaConf.to_container(raw, resolve=False)["hydra"]["run"]["dir"]
    assert dir_.startswith("${paths.model_dir}/${mode.name}/${strategy.name}_${model.image_size}_${now:")
