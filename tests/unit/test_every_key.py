"""Every config key of ``medgen-train``, ``medgen-lr-find`` and ``medgen-evaluate`` does something.

The key rule: a key a command accepts must have an effect, or be refused. For each command a
``COVERAGE`` table maps every leaf key of its composed config (every option of every config group:
``strategy=rflow``'s keys, ``mode=seg``'s ``size_bins``, ...) to the node id of a test that sets
the key (or the constructor argument it feeds) to a non-default legal value and asserts something
that depends on it, or to ``"exempt: <reason>"``. The first tests below keep the tables honest: a
key added to a config without an entry fails, naming the key, and every node id must exist.

Where no other test showed a key's effect, the test is here, below the tables (cheap: pure
functions, or a few steps of a 16 px network on the tiny dataset of ``tests/conftest.py``).

Keys read by nothing are exempt as ``"exempt: read by nothing (reported)"``; keys that the command
reads in other combinations but that have no effect in this one (``medgen-lr-find`` runs training
steps only) are exempt as ``"exempt: no effect in medgen-lr-find: ... (reported)"``.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, missing_test, tiny_overrides
from datagen import make_patient, write_dataset
from omegaconf import DictConfig

from medgen.core.distributed import DistInfo
from medgen.core.paths import configs_dir
from medgen.core.schema import compose_config
from medgen.diffusion.config import load_config

REPO = Path(__file__).resolve().parents[2]
CPU = DistInfo(device=torch.device("cpu"))
#: the config groups of ``config.yaml`` (``lr_find.yaml`` composes it)
GROUPS = ("model", "strategy", "mode", "training", "paths")
HERE = "tests/unit/test_every_key.py"


# ============================================================================ the composed keys
def leaf_keys(node: DictConfig, prefix: str = "") -> set[str]:
    """The dotted leaf keys of ``node`` (a list is one leaf; Hydra's own ``hydra`` node is left out)."""
    keys: set[str] = set()
    for key in node.keys():
        if not prefix and key == "hydra":
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            keys |= leaf_keys(child, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


@functools.lru_cache(maxsize=None)
def composed_keys(config_name: str) -> frozenset[str]:
    """Every leaf key of ``config_name`` as the command composes it, over every option of every
    config group (each option composed once with the other groups' defaults: a group's keys do
    not depend on the options of the others, so this is the union over all combinations)."""
    keys = leaf_keys(compose_config([], config_name))
    if config_name not in ("evaluate", "generate"):
        for group in GROUPS:
            for option in sorted(p.stem for p in (configs_dir() / group).glob("*.yaml")):
                keys |= leaf_keys(compose_config([f"{group}={option}"], config_name))
    return frozenset(keys)


# ============================================================================ the tables
def _t(path: str, name: str) -> str:
    return f"tests/{path}::{name}"


def _here(name: str) -> str:
    return f"{HERE}::{name}"


TRAINER = "unit/test_trainer.py"
SLICES = "unit/test_slices.py"
INPAINT = "unit/test_inpaint_mode.py"
INSERT = "unit/test_insert.py"
COVERAGE_TRAIN: dict[str, str] = {
    "seed": _t(TRAINER, "test_building_a_trainer_leaves_process_wide_state_alone"),
    # ---- data
    "data.seg_positive_only": _here("test_data_keys_select_and_scale_the_training_slices"),
    "data.min_lesion_pixels": _here("test_data_keys_select_and_scale_the_training_slices"),
    "data.min_brain_fraction": _t(SLICES, "test_no_selected_slice_says_what_selects_one"),
    "data.brain_intensity": _here("test_data_keys_select_and_scale_the_training_slices"),
    "data.brain_from": _t(SLICES, "test_the_brain_channel_is_read_from_brain_from_and_other_caches_keep_their_fingerprint"),
    "data.brain_method": _t("unit/test_brain_method.py", "test_data_brain_method_reaches_both_caches"),
    "data.lower_percentile": _here("test_data_keys_select_and_scale_the_training_slices"),
    "data.upper_percentile": _here("test_data_keys_select_and_scale_the_training_slices"),
    "data.val_fraction": _here("test_data_val_fraction_moves_patients_to_validation"),
    "data.num_workers": "exempt: parallelism only (cache building and data-loader processes); the same caches and "
                        "batches for any value (tests/unit/test_slices.py::test_parallel_build_and_check_equal_serial)",
    "data.validate": _t(SLICES, "test_unvalidated_build_skips_the_checks_but_not_unusable_files"),
    # ---- model
    "model.image_size": _t(SLICES, "test_seg_mode_keeps_tumour_positive_slices_and_bravo_keeps_brain"),
    "model.channels": _here("test_model_keys_shape_the_network"),
    "model.attention_levels": _here("test_model_keys_shape_the_network"),
    "model.num_res_blocks": _here("test_model_keys_shape_the_network"),
    "model.num_head_channels": _here("test_model_keys_shape_the_network"),
    "model.norm_num_groups": _here("test_model_keys_shape_the_network"),
    # ---- strategy (ddpm and rflow)
    "strategy.name": _t("unit/test_strategies.py", "test_build_strategy_from_config"),
    "strategy.num_train_timesteps": _here("test_num_train_timesteps_bounds_the_timesteps"),
    "strategy.schedule": _t("unit/test_strategies.py", "test_ddpm_add_noise_equals_monai"),
    "strategy.use_discrete_timesteps": _t("unit/test_strategies.py", "test_every_rflow_key_is_honoured"),
    "strategy.sample_method": _t("unit/test_strategies.py", "test_every_rflow_key_is_honoured"),
    "strategy.use_timestep_transform": _t("unit/test_strategies.py", "test_every_rflow_key_is_honoured"),
    "strategy.base_image_size": _t("unit/test_strategies.py", "test_every_rflow_key_is_honoured"),
    # ---- mode (seg, bravo, dual)
    "mode.name": _t(TRAINER, "test_run_folder_files_and_tensorboard_tags"),
    "mode.image_keys": _t("unit/test_modes.py", "test_registry_and_attributes"),
    "mode.cond_keys": _t("unit/test_modes.py", "test_registry_and_attributes"),
    "mode.size_bins": _t("unit/test_sizes.py",
                         "test_a_size_conditioned_seg_model_trains_and_draws_the_class_asked_of_each_candidate"),
    "mode.count_classes": _t("unit/test_sizes.py",
                             "test_a_count_conditioned_seg_model_trains_and_draws_the_number_of_lesions_asked"),
    # ---- mode (inpaint)
    "mode.window": _t(INPAINT, "test_the_window_has_its_shape_and_holds_the_whole_region_when_it_fits"),
    "mode.lesion_fraction": _t(INPAINT, "test_a_region_at_a_lesion_is_the_lesion_dilated_by_the_margin"),
    "mode.margin": _t(INPAINT, "test_a_region_at_a_lesion_is_the_lesion_dilated_by_the_margin"),
    "mode.max_radius": _t(INPAINT, "test_random_regions_are_balls_centred_in_the_brain_no_larger_than_max_radius"),
    # ---- paths (local, cluster)
    "paths.data_dir": _t(SLICES, "test_missing_data_folder_says_how_to_make_one"),
    "paths.model_dir": _t("unit/test_config.py", "test_run_folder_pattern"),
    "paths.cache_dir": _t(SLICES, "test_a_bad_file_in_val_refuses_with_the_check_report_and_leaves_nothing"),
    # ---- training (default, cpu, fast_debug)
    "training.epochs": _t(TRAINER, "test_lr_schedule_warmup_then_cosine_independent_of_max_steps"),
    "training.batch_size": _t(SLICES, "test_seg_mode_keeps_tumour_positive_slices_and_bravo_keeps_brain"),
    "training.learning_rate": _t(TRAINER, "test_lr_schedule_warmup_then_cosine_independent_of_max_steps"),
    "training.weight_decay": _here("test_a_training_key_changes_what_three_steps_give"),
    "training.gradient_clip_norm": _here("test_a_training_key_changes_what_three_steps_give"),
    "training.warmup_steps": _t(TRAINER, "test_lr_schedule_warmup_then_cosine_independent_of_max_steps"),
    "training.val_interval": _here("test_val_interval_and_checkpoint_keep_shape_the_epoch_loop"),
    "training.use_ema": _here("test_a_training_key_changes_what_three_steps_give"),
    "training.ema_decay": _here("test_a_training_key_changes_what_three_steps_give"),
    "training.ema_update_after_step": _here("test_a_training_key_changes_what_three_steps_give"),
    "training.ema_update_every": _here("test_a_training_key_changes_what_three_steps_give"),
    "training.use_min_snr": _here("test_a_training_key_changes_what_three_steps_give"),
    "training.min_snr_gamma": _here("test_a_training_key_changes_what_three_steps_give"),
    "training.perceptual_weight": _t(TRAINER, "test_a_3d_image_model_trains_with_the_2_5d_perceptual_loss_and_resumes_exactly"),
    "training.perceptual_weights_path": _t("unit/test_perceptual.py", "test_configured_path_takes_precedence_over_hub_cache"),
    "training.perceptual_allow_download": _t("unit/test_perceptual.py", "test_download_goes_through_monai_torch_hub"),
    "training.perceptual_slices": _t(TRAINER, "test_a_3d_image_model_trains_with_the_2_5d_perceptual_loss_and_resumes_exactly"),
    "training.use_multi_gpu": _t("integration/test_train_cli.py", "test_ddp_two_cpu_processes_end_with_identical_weights"),
    "training.precision": _here("test_training_precision_picks_the_autocast"),
    "training.compile": _t("unit/test_performance_options.py", "test_the_compile_mode_reaches_torch_compile"),
    "training.compile_mode": _t("unit/test_performance_options.py", "test_the_compile_mode_reaches_torch_compile"),
    "training.channels_last": _t("unit/test_performance_options.py", "test_channels_last_trains_as_the_default_layout_does"),
    "training.gradient_checkpointing": _t(TRAINER, "test_gradient_checkpointing_recomputes_the_blocks_and_trains_the_same_weights"),
    "training.cond_dropout": _here("test_a_training_key_changes_what_three_steps_give"),
    "training.max_steps": _t(TRAINER, "test_resume_is_exact"),
    "training.resume": _t("integration/test_train_run_safety.py",
                          "test_resuming_from_an_older_snapshot_branches_and_keeps_newer_work"),
    "training.checkpoint_keep": _here("test_val_interval_and_checkpoint_keep_shape_the_epoch_loop"),
    "training.max_nonfinite_steps": _t(TRAINER, "test_non_finite_loss_skips_the_step_and_k_in_a_row_stop"),
    "training.log_every": _t(TRAINER, "test_without_a_terminal_progress_is_a_log_line_not_a_bar"),
    "training.num_val_samples": _here("test_the_sample_grid_keys_shape_the_grid"),
    "training.num_sample_steps": _here("test_the_sample_grid_keys_shape_the_grid"),
}

#: training keys that ``medgen-lr-find`` accepts (it composes config.yaml) but that change nothing in
#: its sweep: it runs ``DiffusionTrainer.fit`` with its own LR schedule and throws the weights away
LR_FIND_IGNORED: dict[str, str] = {
    "training.epochs": "the sweep's own LR schedule replaces the warm-up/cosine schedule the epochs set",
    "training.learning_rate": "the sweep sets the optimizer's LR before every step",
    "training.warmup_steps": "the sweep's own LR schedule replaces the warm-up",
    "training.val_interval": "fit() runs no validation",
    "training.num_val_samples": "fit() draws no sample grids",
    "training.num_sample_steps": "fit() draws no sample grids",
    "training.use_ema": "the EMA copy is updated but never read; the sweep's losses are the raw network's",
    "training.ema_decay": "the EMA copy is never read",
    "training.ema_update_after_step": "the EMA copy is never read",
    "training.ema_update_every": "the EMA copy is never read",
    "training.max_steps": "the sweep runs lr_find.num_steps steps",
    "training.resume": "never read: the sweep starts from the seed's initial weights",
    "training.checkpoint_keep": "fit() writes no checkpoints",
    "training.max_nonfinite_steps": "fit() never checks the skip count; the sweep stops at the first non-finite loss",
    "training.log_every": "fit() writes no logs",
}

COVERAGE_LR_FIND: dict[str, str] = {
    # the other training keys: the sweep runs DiffusionTrainer on the training part of its config
    # (test_lr_find_hands_its_trainer_the_training_config), so their medgen-train tests show their effect
    **COVERAGE_TRAIN,
    # no effect in a sweep, and set on its command line each is named in a warning (diffusion.config.SWEEP_NO_EFFECT,
    # tests/unit/test_requests.py::test_training_keys_a_run_does_not_use_are_named)
    **{key: f"exempt: no effect in medgen-lr-find ({why}); it warns naming the key" for key, why in LR_FIND_IGNORED.items()},
    "paths.model_dir": _t("unit/test_lr_finder.py", "test_two_sweeps_started_in_the_same_second_get_folders_of_their_own"),
    "lr_find.min_lr": _here("test_the_sweep_keys_shape_the_sweep"),
    "lr_find.max_lr": _here("test_the_sweep_keys_shape_the_sweep"),
    "lr_find.num_steps": _here("test_the_sweep_keys_shape_the_sweep"),
    "lr_find.smoothing": _here("test_the_sweep_keys_shape_the_sweep"),
    "lr_find.diverge_factor": _here("test_the_sweep_keys_shape_the_sweep"),
}

EVALUATE, NNUNET = "unit/test_evaluate.py", "unit/test_nnunet_segmenter.py"
COVERAGE_EVALUATE: dict[str, str] = {
    "real_dir": _t("integration/test_cli_errors.py", "test_evaluate_errors_are_one_line_and_leave_no_folder"),
    "synthetic_dir": _t(EVALUATE, "test_a_matching_set_beats_a_broken_one_and_the_report_is_complete"),
    "out_dir": _t(EVALUATE, "test_a_matching_set_beats_a_broken_one_and_the_report_is_complete"),
    "image_size": _t(EVALUATE, "test_bad_inputs_give_one_line"),  # its one legal non-null value is the set's own size
    "spatial_dims": _t("unit/test_evaluate_3d.py", "test_a_2d_look_at_a_3d_set_and_refusals"),
    "seed": _here("test_the_distribution_keys_change_the_distribution_metrics"),
    "seeds": _here("test_the_budget_keys_train_the_segmenter"),
    "device": _here("test_the_device_key_picks_the_device"),
    "max_images": _here("test_the_set_keys_shape_the_sets"),
    "diversity_pairs": _here("test_the_distribution_keys_change_the_distribution_metrics"),
    "brain_intensity": _here("test_the_distribution_keys_change_the_distribution_metrics"),
    "brain_from": _here("test_brain_from_picks_the_image_the_brain_comes_from"),
    "val_fraction": _here("test_the_set_keys_shape_the_sets"),
    "downstream": _here("test_the_budget_keys_train_the_segmenter"),
    "seg_net_checkpoint": _here("test_the_set_keys_shape_the_sets"),
    "allow_partial": _here("test_the_set_keys_shape_the_sets"),
    "num_workers": "exempt: parallelism only (cache-building processes); the same caches for any value "
                   "(tests/unit/test_slices.py::test_parallel_build_and_check_equal_serial)",
    "cache_dir": _here("test_the_set_keys_shape_the_sets"),
    "features.network": _here("test_the_feature_keys_change_fid_and_kid"),
    "features.weights_path": _t("unit/test_radimagenet.py", "test_features_and_perceptual_loss_use_the_same_network"),
    "features.batch_size": "exempt: memory and timing only: the features do not depend on the batch "
                           "(tests/unit/test_evaluate.py::test_the_fid_inception_loads_offline_and_gives_2048_features)",
    "features.kid_subsets": _here("test_the_feature_keys_change_fid_and_kid"),
    "features.kid_subset_size": _here("test_the_feature_keys_change_fid_and_kid"),
    "features.slices_per_plane": _t("unit/test_evaluate_3d.py", "test_a_3d_set_is_evaluated_as_volumes_with_a_three_plane_report"),
    "features.plane_fraction": _t("unit/test_evaluate_3d.py",
                                  "test_2_5d_slices_come_from_the_middle_of_each_axis_with_square_pixels"),
    "budget.steps": _here("test_the_budget_keys_train_the_segmenter"),
    "budget.batch_size": _here("test_the_budget_keys_train_the_segmenter"),
    "budget.learning_rate": _here("test_the_budget_keys_train_the_segmenter"),
    "budget.precision": _t("unit/test_eval_metrics.py", "test_budget_precision_bf16_trains_the_segmenter_in_bf16_to_the_same_skill"),
    "lesions.bins": _here("test_the_lesion_keys_shape_the_lesion_figures"),
    "lesions.resamples": _here("test_the_lesion_keys_shape_the_lesion_figures"),
    "lesions.min_sensitivity": _here("test_the_lesion_keys_shape_the_lesion_figures"),
    "lesions.min_dice": _here("test_the_lesion_keys_shape_the_lesion_figures"),
    "segmenter": _t(NNUNET, "test_the_nnunet_keys_reach_nnunet_and_its_predictions_are_scored"),
    "nnunet.python": _t(NNUNET, "test_the_nnunet_keys_reach_nnunet_and_its_predictions_are_scored"),
    "nnunet.epochs": _t(NNUNET, "test_the_nnunet_keys_reach_nnunet_and_its_predictions_are_scored"),
    "nnunet.iterations_per_epoch": _t(NNUNET, "test_the_nnunet_keys_reach_nnunet_and_its_predictions_are_scored"),
}

GENERATE, REQUESTS, SIZES = "unit/test_generate.py", "unit/test_requests.py", "unit/test_sizes.py"
GATE = "unit/test_gate.py"
COVERAGE_GENERATE: dict[str, str] = {
    "seg_checkpoint": _t(GENERATE, "test_output_is_a_medgen_dataset_with_the_training_geometry"),
    "image_checkpoint": _t(GENERATE, "test_nnunet_export_and_dual_images"),  # a dual model paints t1_pre + t1_gd
    "masks_from": _t(GENERATE, "test_masks_from_a_dataset_and_several_samples_per_mask"),
    "masks_split": _t(GENERATE, "test_masks_from_a_dataset_and_several_samples_per_mask"),  # train/patient_*
    "out_dir": _t(GENERATE, "test_output_is_a_medgen_dataset_with_the_training_geometry"),
    "num_images": _here("test_a_generate_key_changes_the_output"),
    "samples_per_mask": _here("test_a_generate_key_changes_the_output"),
    "batch_size": "exempt: memory and speed only; the output does not depend on it by design "
                  "(tests/unit/test_generate.py::test_samples_do_not_depend_on_the_batch_size)",
    "split": _here("test_a_generate_key_changes_the_output"),
    "seed": _here("test_a_generate_key_changes_the_output"),
    "sampler": _here("test_a_generate_key_changes_the_output"),
    "seg_sampler": _here("test_the_seg_sampler_key_reaches_the_mask_stage"),
    "image_sampler": _here("test_a_generate_key_changes_the_output"),
    "steps": _here("test_a_generate_key_changes_the_output"),
    "guidance_scale": _here("test_a_generate_key_changes_the_output"),
    "use_ema": _here("test_a_generate_key_changes_the_output"),
    "precision": _here("test_a_generate_key_changes_the_output"),
    "device": _here("test_the_generate_device_and_compile_keys_reach_the_network"),
    "compile": _here("test_the_generate_device_and_compile_keys_reach_the_network"),
    "compile_mode": _here("test_the_generate_device_and_compile_keys_reach_the_network"),
    "format": _t(GENERATE, "test_nnunet_export_and_dual_images"),
    "previews": _here("test_a_generate_key_changes_the_output"),
    "cache_dir": _here("test_a_generate_key_changes_the_output"),
    "brain_outline": _here("test_a_generate_key_changes_the_output"),
    "gate.enabled": _t(GATE, "test_passes_rejects_what_it_should"),
    "gate.min_area": _t(GATE, "test_passes_rejects_what_it_should"),
    "gate.max_area": _t(GATE, "test_passes_rejects_what_it_should"),
    "gate.max_components": _t(GATE, "test_passes_rejects_what_it_should"),
    "gate.min_component_pixels": _t(GATE, "test_passes_rejects_what_it_should"),
    "gate.inside_brain": _t(GATE, "test_a_lesion_pixel_outside_the_brain_drawn_with_it_rejects_the_mask"),
    "gate.max_attempts": _t(REQUESTS, "test_gate_max_attempts_bounds_the_candidates_inside_a_batch"),
    "lesion_sizes.target": _t(SIZES, "test_the_output_holds_exactly_the_size_classes_asked_for"),
    "lesion_sizes.bins": _t(REQUESTS, "test_masks_from_picks_real_masks_to_meet_the_quotas"),
    "lesion_sizes.guidance": _t(SIZES, "test_a_size_conditioned_seg_model_trains_and_draws_the_class_asked_of_each_candidate"),
    "lesion_counts.target": _t(SIZES, "test_the_output_holds_exactly_the_lesion_counts_asked_for"),
    "lesion_counts.classes": _t(SIZES, "test_the_output_holds_exactly_the_lesion_counts_asked_for"),
    "nnunet.dataset_id": _here("test_a_generate_key_changes_the_output"),
    "nnunet.name": _here("test_a_generate_key_changes_the_output"),
    "insert.into": _t(INSERT, "test_new_lesions_lie_in_the_brain_apart_from_old_ones_and_nothing_else_changes"),
    "insert.split": _t(INSERT, "test_refusals_name_the_key_or_file"),  # split=test: its (missing) patients
    "insert.painter": _t(INSERT, "test_new_lesions_lie_in_the_brain_apart_from_old_ones_and_nothing_else_changes"),
    "insert.keep_source": _t(INSERT, "test_new_lesions_lie_in_the_brain_apart_from_old_ones_and_nothing_else_changes"),
    "insert.margin": _t(INSERT, "test_new_lesions_lie_in_the_brain_apart_from_old_ones_and_nothing_else_changes"),
    "insert.shapes": _t(INSERT, "test_shapes_drawn_by_a_seg_model"),
    "insert.shapes_from": _t(INSERT, "test_healthy_scans_take_lesions_from_another_dataset"),
    "insert.image_size": _t(INSERT, "test_the_size_and_count_classes_equal_the_request_exactly"),
    "insert.modalities": _t(INSERT, "test_refusals_name_the_key_or_file"),  # [flair]: the scans have none
    "insert.brain_method": _t(INSERT, "test_the_brain_method_asked_derives_the_scans_brains"),
}

#: command -> (its Hydra config, its table)
COMMANDS: dict[str, tuple[str, dict[str, str]]] = {
    "medgen-train": ("config", COVERAGE_TRAIN),
    "medgen-lr-find": ("lr_find", COVERAGE_LR_FIND),
    "medgen-evaluate": ("evaluate", COVERAGE_EVALUATE),
    "medgen-generate": ("generate", COVERAGE_GENERATE),
}


# ============================================================================ the tables are honest
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_the_table_covers_exactly_the_composed_keys(command):
    config_name, table = COMMANDS[command]
    keys = composed_keys(config_name)
    missing, stale = sorted(keys - table.keys()), sorted(table.keys() - keys)
    assert not missing, (f"{command}: no COVERAGE entry for {missing} (tests/unit/test_every_key.py): name a test that "
                         "sets each to a non-default value and asserts its effect, or exempt it with the reason")
    assert not stale, f"{command}: COVERAGE entries for keys {configs_dir() / config_name}.yaml does not have: {stale}"


def test_the_key_lists_include_every_group_option():
    """Keys only one option of a group has are listed, and the @package _global_ cpu profile adds none."""
    train = composed_keys("config")
    assert {"strategy.use_timestep_transform", "strategy.schedule", "mode.size_bins", "mode.count_classes",
            "training.ema_decay", "paths.cache_dir"} <= train
    assert composed_keys("lr_find") == train | {f"lr_find.{k}" for k in
                                                ("min_lr", "max_lr", "num_steps", "smoothing", "diverge_factor")}
    assert leaf_keys(compose_config(["training=cpu"])) <= leaf_keys(compose_config([]))
    assert {"features.plane_fraction", "lesions.min_dice", "budget.precision"} <= composed_keys("evaluate")


def _node_ids() -> list:
    return [pytest.param(command, key, target, id=f"{command}:{key}") for command, (_, table) in COMMANDS.items()
            for key, target in sorted(table.items()) if not target.startswith("exempt")]


@pytest.mark.parametrize("command, key, node_id", _node_ids())
def test_every_node_id_exists(command, key, node_id):
    problem = missing_test(node_id)
    assert problem is None, f"{command} {key}: {problem}"


def test_every_exemption_has_a_reason():
    for command, (_, table) in COMMANDS.items():
        for key, target in table.items():
            if target.startswith("exempt"):
                assert re.fullmatch(r"exempt: \S.*", target, re.DOTALL), f"{command} {key}: {target!r} gives no reason"


# ============================================================================ medgen-train: new effect tests
def _train_cfg(*overrides: str) -> DictConfig:
    """A validated training config of the tiny network (no data needed)."""
    return load_config([*TINY_MODEL, *overrides])


@pytest.mark.parametrize("override", ["model.channels=[32,64]", "model.attention_levels=[false,false]",
                                      "model.num_res_blocks=2", "model.num_head_channels=16",
                                      "model.norm_num_groups=16"])
def test_model_keys_shape_the_network(override):
    from medgen.diffusion.modes import build_mode
    from medgen.data.space import SampleSpace
    from medgen.diffusion.utils import build_network, network_kwargs

    def shape(cfg) -> tuple:
        net = build_network(network_kwargs(cfg.model, build_mode(cfg), SampleSpace.from_config(cfg)), False)
        return (sum(p.numel() for p in net.parameters()),
                tuple(m.num_groups for m in net.modules() if isinstance(m, torch.nn.GroupNorm)),
                tuple(m.num_heads for m in net.modules() if hasattr(m, "num_heads")))

    assert shape(_train_cfg(override)) != shape(_train_cfg())


@pytest.mark.parametrize("strategy", ["ddpm", "rflow"])
def test_num_train_timesteps_bounds_the_timesteps(strategy):
    from medgen.data.space import SampleSpace
    from medgen.diffusion.strategies import build_strategy

    def drawn(*overrides):
        cfg = _train_cfg(f"strategy={strategy}", *overrides)
        s = build_strategy(cfg, SampleSpace.from_config(cfg).shape)
        return s.num_train_timesteps, s.sample_timesteps(4096, torch.Generator().manual_seed(0), "cpu")

    (t_base, base), (t_short, short) = drawn(), drawn("strategy.num_train_timesteps=200")
    assert (t_base, t_short) == (1000, 200)
    assert float(short.max()) <= 200 < float(base.max())


@pytest.fixture(scope="module")
def patient() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One phantom patient (bravo, t1_pre, seg) of 32 x 32 x 12 voxels, and its affine."""
    return make_patient((32, 32, 12), seed=3, keys=("bravo", "t1_pre", "seg")), np.diag([1.0, 1.0, 2.0, 1.0])


@pytest.mark.parametrize("mode, override", [
    ("seg", "data.seg_positive_only=false"),  # every slice, not only those with a lesion
    ("seg", "data.min_lesion_pixels=6"),  # fewer lesion slices
    ("bravo", "data.brain_intensity=0.6"),  # fewer slices show enough "brain"
    ("bravo", "data.lower_percentile=80"),  # other intensities (below 69% of the voxels are background)
    ("bravo", "data.upper_percentile=80"),
])
def test_data_keys_select_and_scale_the_training_slices(patient, mode, override):
    """The slices ``build_data`` caches for a patient: its ``SliceSpec.for_mode`` of the config."""
    from medgen.data.slices import SliceSpec
    from medgen.data.space import SampleSpace
    from medgen.diffusion.modes import MODES

    def slices(cfg):
        spec = SliceSpec.for_mode(cfg.mode, cfg.data, SampleSpace.from_config(cfg), MODES[cfg.mode.name].slice_selection)
        block, z, _, _ = spec.patient_items(*patient)
        return block, z

    (block, z), (base_block, base_z) = slices(_train_cfg(f"mode={mode}", override)), slices(_train_cfg(f"mode={mode}"))
    assert len(base_z) > 0
    assert z.tolist() != base_z.tolist() or not np.array_equal(block, base_block)


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> Path:
    """One cache and runs folder for the trainers of this module (their slice caches are shared)."""
    return tmp_path_factory.mktemp("every_key")


def _tiny(run_root: Path, tiny_data: Path, *extra: str) -> DictConfig:
    return load_config(tiny_overrides(run_root, tiny_data, *extra))


def test_data_val_fraction_moves_patients_to_validation(run_root, tiny_data):
    from medgen.data.loading import build_data
    from medgen.diffusion.modes import MODES

    def val_patients(*extra):
        cfg = _tiny(run_root, tiny_data, "mode=seg", *extra)
        data = build_data(cfg, progress=False, selection=MODES["seg"].slice_selection)
        return len(data.val_cache.patient_ids), len(data.train_cache.patient_ids)

    base, more = val_patients(), val_patients("data.val_fraction=0.6")
    assert more[0] > base[0] and sum(more) == sum(base) == 5  # tiny_data: 5 patients in train/, no val/


def _trainer(run_root: Path, tiny_data: Path, name: str, *extra: str):
    from medgen.diffusion.trainer import DiffusionTrainer

    return DiffusionTrainer(_tiny(run_root, tiny_data, *extra), run_root / name, CPU, progress=False)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


#: bravo (conditional, for cond_dropout), a learning rate that moves the weights, EMA from the first step
STEP_BASE = ("mode=bravo", "training.learning_rate=1e-3", "training.ema_update_after_step=0",
             "training.ema_update_every=1")


@pytest.fixture(scope="module")
def three_steps(run_root, tiny_data):
    """(model weights, EMA weights or None) after 3 training steps of ``STEP_BASE`` + overrides."""
    @functools.lru_cache(maxsize=None)
    def run(*overrides: str):
        trainer = _trainer(run_root, tiny_data, "steps", *STEP_BASE, *overrides)
        assert trainer.fit(3) == 3
        return _state(trainer.model), None if trainer.ema is None else _state(trainer.ema.ema_model)

    return run


def _differ(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("override, acts_on", [
    ("training.weight_decay=0.5", "weights"),
    ("training.gradient_clip_norm=1e-4", "weights"),
    ("training.use_min_snr=false", "weights"),
    ("training.min_snr_gamma=0.5", "weights"),
    ("training.cond_dropout=0.5", "weights"),
    ("training.use_ema=false", "no ema"),
    ("training.ema_decay=0.3", "ema"),
    ("training.ema_update_after_step=2", "ema"),
    ("training.ema_update_every=2", "ema"),
])
def test_a_training_key_changes_what_three_steps_give(three_steps, override, acts_on, one_thread):
    """The same three steps (same seed, data and schedule) with one key changed: the trained weights
    differ, or (EMA keys) the weights are the same and only the EMA copy differs."""
    (weights, ema), (base_weights, base_ema) = three_steps(override), three_steps()
    if acts_on == "weights":
        assert _differ(weights, base_weights)
        return
    assert not _differ(weights, base_weights)  # the EMA never feeds back into training
    if acts_on == "no ema":
        assert ema is None and base_ema is not None
    else:
        assert _differ(ema, base_ema)


def test_training_precision_picks_the_autocast(run_root, tiny_data, monkeypatch):
    from medgen.core import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)  # the choice, not this CPU's
    a = torch.ones(4, 4)
    dtypes = {}
    for value in ("bf16", "fp32"):  # bf16 is the default (tiny_overrides sets fp32)
        with _trainer(run_root, tiny_data, "precision", f"training.precision={value}").autocast():
            dtypes[value] = (a @ a).dtype
    assert dtypes == {"bf16": torch.bfloat16, "fp32": torch.float32}


def test_val_interval_and_checkpoint_keep_shape_the_epoch_loop(run_root, tiny_data):
    """Three epochs of a loop whose steps do nothing: validation after the epochs val_interval
    divides (and the last); the newest checkpoint_keep epoch snapshots kept."""
    from medgen.diffusion.trainer import StepResult

    def loop(name: str, *extra: str) -> tuple[list[int], list[str]]:
        trainer = _trainer(run_root, tiny_data, name, "mode=seg", "training.epochs=3", *extra)
        zero = torch.zeros(())
        trainer.train_step = lambda batch: StepResult(zero, zero, zero, zero, torch.tensor(False))
        validated: list[int] = []
        trainer.validate_and_sample = lambda: validated.append(trainer.epoch)
        assert trainer.train() == "done"
        return validated, sorted(p.name for p in (run_root / name / "checkpoints").glob("epoch_*.pt"))

    # fast_debug (the tiny configs' profile) validates every epoch and keeps 3 snapshots
    assert loop("loop_base") == ([1, 2, 3], ["epoch_0001.pt", "epoch_0002.pt", "epoch_0003.pt"])
    assert loop("loop_keys", "training.val_interval=2", "training.checkpoint_keep=1") == ([2, 3], ["epoch_0003.pt"])


def test_the_sample_grid_keys_shape_the_grid(run_root, tiny_data, one_thread):
    def grid(*extra: str) -> np.ndarray:
        trainer = _trainer(run_root, tiny_data, "grid", "mode=bravo", "strategy=rflow", *extra)
        with torch.no_grad():  # random weights: MONAI zero-initialises the output layer
            g = torch.Generator().manual_seed(0)
            for p in trainer.ema.ema_model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        return trainer.sample_grid()

    base, rows, steps = grid(), grid("training.num_val_samples=1"), grid("training.num_sample_steps=2")
    assert rows.shape[0] < base.shape[0] and rows.shape[1] == base.shape[1]  # one row per sample
    assert steps.shape == base.shape and not np.array_equal(steps, base)


# ============================================================================ medgen-lr-find
class _FakeTrainer:
    """Stands in for DiffusionTrainer in the sweep: each step's loss is a fixed function of its LR
    (minimum at 1e-3, growing to 3x the minimum at 1e-1)."""

    built: list[DictConfig] = []

    def __init__(self, cfg, run_dir, dist=None, lr_schedule=None, progress=True):
        self.built.append(cfg)
        self.lr_schedule, self.step = lr_schedule, 0

    def fit(self, max_steps, on_step):
        for _ in range(max_steps):
            self.step += 1
            loss = 1.0 + 0.5 * (np.log10(self.lr_schedule(self.step - 1)) + 3) ** 2
            if on_step(SimpleNamespace(loss=torch.tensor(loss))):
                break
        return self.step


#: the smoothed loss is the raw loss: its minimum is 1 (at 1e-3), its end 3 (at 1e-1)
SWEEP_BASE = ("lr_find.num_steps=20", "lr_find.smoothing=0")


@pytest.fixture
def sweep(tmp_path, tiny_data, monkeypatch):
    """``medgen-lr-find``'s run() on the composed lr_find config + overrides, with a fake trainer."""
    from medgen.diffusion import lr_finder
    from medgen.scripts.lr_find import run

    monkeypatch.setattr(lr_finder, "DiffusionTrainer", _FakeTrainer)
    monkeypatch.setattr(lr_finder, "save_lr_find", lambda result, folder: (folder / "lr_find.png", folder / "x.json"))
    _FakeTrainer.built.clear()

    def go(*overrides: str):
        cfg = compose_config(tiny_overrides(tmp_path, tiny_data, *SWEEP_BASE, *overrides),
                             config_name="lr_find")
        return run(cfg, tmp_path / f"sweep{len(_FakeTrainer.built)}")

    return go


@pytest.mark.parametrize("override", ["lr_find.min_lr=1e-5", "lr_find.max_lr=1e-2", "lr_find.num_steps=10",
                                      "lr_find.smoothing=0.5", "lr_find.diverge_factor=1.5"])
def test_the_sweep_keys_shape_the_sweep(sweep, override):
    base, changed = sweep(), sweep(override)
    assert not base.diverged and len(base.lrs) == 20
    assert (base.lrs[0], base.lrs[-1]) == pytest.approx((1e-7, 1e-1))
    key, value = override.split("=")
    if key == "lr_find.min_lr":
        assert changed.lrs[0] == pytest.approx(1e-5)
    elif key == "lr_find.max_lr":
        assert changed.lrs[-1] == pytest.approx(1e-2)
    elif key == "lr_find.num_steps":
        assert len(changed.lrs) == 10
    elif key == "lr_find.smoothing":
        assert changed.lrs == base.lrs and changed.losses != pytest.approx(base.losses)
    else:  # the loss reaches 1.5x its minimum (at 1e-2) before the end of the sweep
        assert changed.diverged and len(changed.lrs) < len(base.lrs)


def test_lr_find_hands_its_trainer_the_training_config(sweep):
    """The sweep's trainer gets the validated training part of the config: every training key
    reaches the same DiffusionTrainer as in medgen-train (their effects are tested there)."""
    sweep("seed=7", "model.num_res_blocks=2", "training.weight_decay=0.1", "data.min_lesion_pixels=3")
    (cfg,) = _FakeTrainer.built
    assert "lr_find" not in cfg
    assert (cfg.seed, cfg.model.num_res_blocks, cfg.training.weight_decay, cfg.data.min_lesion_pixels) == (7, 2, 0.1, 3)


# ============================================================================ medgen-evaluate
def _evaluate_cfg(*overrides: str) -> DictConfig:
    from medgen.evaluation.config import validate_evaluate_config

    return validate_evaluate_config(compose_config(["real_dir=real", "synthetic_dir=synthetic", *overrides],
                                                   config_name="evaluate"))


def _evaluate_request(*overrides: str):
    """The :class:`~medgen.evaluation.requests.EvaluationRequest` of the evaluate config + overrides."""
    from medgen.evaluation.requests import evaluation_request

    return evaluation_request(_evaluate_cfg(*overrides))


def _random_set(n: int, channels: int = 1, size: int = 32, seed: int = 0):
    from medgen.evaluation.downstream import ItemSet

    rng = np.random.default_rng(seed)
    images = rng.random((n, channels, size, size)).astype(np.float32)
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        x, y = rng.integers(4, size - 8, 2)
        masks[i, x:x + 4, y:y + 4] = 1
    return ItemSet(images, masks)


def _fake_sets(keys=("bravo",), n: int = 8):
    samples = {"synthetic": _random_set(n, len(keys), seed=1), "real": _random_set(n, len(keys), seed=2), "val": None}
    from medgen.data.space import SampleSpace

    return SimpleNamespace(image_keys=list(keys), space=SampleSpace((32, 32)), reference_split="test", warnings=[],
                           real_root=Path("real"), synthetic_root=Path("synthetic"),
                           sample=samples.__getitem__, spacing=lambda name: (1.0, 1.0, 2.0),
                           warn=lambda text: None)


@pytest.fixture(scope="module")
def distribution():
    """distribution_metrics of a fake pair of sets under the evaluate config + overrides."""
    from medgen.evaluation.evaluate import distribution_metrics

    sets = _fake_sets()

    @functools.lru_cache(maxsize=None)
    def run(*overrides: str) -> dict:
        return distribution_metrics(sets, _evaluate_request("diversity_pairs=8", *overrides))

    return run


@pytest.mark.parametrize("override", ["seed=1", "diversity_pairs=3", "brain_intensity=0.5"])
def test_the_distribution_keys_change_the_distribution_metrics(distribution, override):
    base, changed = distribution(), distribution(override)
    field = "intensity" if override.startswith("brain_intensity") else "diversity"
    assert json.dumps(changed[field]) != json.dumps(base[field])


def test_brain_from_picks_the_image_the_brain_comes_from():
    from medgen.evaluation.evaluate import anatomy_metrics

    sets = _fake_sets(("t1_pre", "t1_gd"))
    assert anatomy_metrics(sets, _evaluate_request())["brain_from"] == "t1_pre"  # bravo is not there: the first image
    assert anatomy_metrics(sets, _evaluate_request("brain_from=t1_gd"))["brain_from"] == "t1_gd"


def test_the_device_key_picks_the_device(tmp_path, monkeypatch):
    from medgen.core import distributed
    from medgen.evaluation import evaluate as evaluate_module

    monkeypatch.setattr(distributed, "default_device", lambda: torch.device("meta"))  # "a GPU"
    monkeypatch.setattr(evaluate_module, "_evaluate", lambda cfg, out_dir, device, progress: device)
    out = f"out_dir={tmp_path / 'e'}"
    assert evaluate_module.evaluate(_evaluate_cfg(out), progress=False) == torch.device("meta")
    assert evaluate_module.evaluate(_evaluate_cfg(out, "device=cpu"), progress=False) == torch.device("cpu")


@pytest.fixture(scope="module")
def feature_nets(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("nets")
    paths = []
    for i in range(2):
        torch.manual_seed(i)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                  torch.nn.Flatten())
        paths.append(folder / f"net{i}.pt")
        torch.jit.script(net).save(str(paths[-1]))
    return paths


@pytest.mark.parametrize("override", ["features.network", "features.kid_subsets=3", "features.kid_subset_size=6"])
def test_the_feature_keys_change_fid_and_kid(feature_nets, override):
    from medgen.evaluation.evaluate import feature_metrics

    sets = _fake_sets(n=12)
    base_keys = (f"features.network={feature_nets[0]}", "features.kid_subset_size=4")
    if override == "features.network":
        override = f"features.network={feature_nets[1]}"
    base = feature_metrics(sets, _evaluate_request(*base_keys), torch.device("cpu"))
    changed = feature_metrics(sets, _evaluate_request(*base_keys, override), torch.device("cpu"))
    if override.startswith("features.network"):
        assert (base["network"], changed["network"]) == ("net0.pt", "net1.pt")
        assert changed["bravo"]["fid"] != base["bravo"]["fid"]
    else:
        assert changed["bravo"]["fid"] == base["bravo"]["fid"]
        assert (changed["bravo"]["kid_mean"], changed["bravo"]["kid_std"]) != (base["bravo"]["kid_mean"],
                                                                               base["bravo"]["kid_std"])


class _CacheLike(SimpleNamespace):
    """A ItemSet as the caches Sets holds (``data [N, C, S, S]`` with the mask last)."""

    def __init__(self, s):
        super().__init__(data=np.concatenate([s.images, s.masks[:, None].astype(np.float32)], 1),
                         keys=["bravo", "seg"], spacing=(1.0, 1.0, 2.0))

    def __len__(self) -> int:
        return len(self.data)


def test_the_budget_keys_train_the_segmenter(tmp_path, monkeypatch, one_thread):
    """downstream=false: one segmenter, trained on the real train slices with seeds[0] and the
    budget, saved as seg_net.pt; downstream=true: the experiment gets the seeds and the budget."""
    from medgen.evaluation import downstream
    from medgen.evaluation.evaluate import segmentation_metrics

    parts = {name: _CacheLike(_random_set(6, size=16, seed=i)) for i, name in enumerate(("train", "test", "synthetic"))}
    from medgen.data.space import SampleSpace

    sets = SimpleNamespace(**parts, segmenter=None, image_keys=["bravo"], space=SampleSpace((16, 16)),
                           real_root=tmp_path, test_brain=None, warnings=[])
    base_keys = ("downstream=false", "seeds=[0]", "budget.steps=2", "budget.batch_size=2")

    def trained(*overrides: str) -> dict[str, torch.Tensor]:
        out = tmp_path / f"e{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        result = segmentation_metrics(sets, _evaluate_request(*base_keys, *overrides), out, torch.device("cpu"),
                                      False)
        assert "downstream" not in result and "synthetic_dice" in result["adherence"]
        return torch.load(out / "seg_net.pt", weights_only=False)["state_dict"]

    base = trained()
    for override in ("budget.steps=3", "budget.batch_size=3", "budget.learning_rate=0.1", "seeds=[1]"):
        assert _differ(trained(override), base), override

    class Called(Exception):
        pass

    def experiment(*args, **kwargs):
        raise Called(kwargs)

    monkeypatch.setattr(downstream, "downstream", experiment)
    with pytest.raises(Called) as info:
        segmentation_metrics(sets, _evaluate_request(*base_keys, "downstream=true", "seeds=[4,5]"), tmp_path,
                             torch.device("cpu"), False)
    kwargs = info.value.args[0]
    budget = kwargs["budget"]  # passed whole
    assert (kwargs["seeds"], budget.steps, budget.batch_size, budget.precision) == ([4, 5], 2, 2, "fp32")


def test_the_lesion_keys_shape_the_lesion_figures():
    from medgen.evaluation import downstream
    from medgen.evaluation.evaluate import _lesion_figures, whole_test_split
    from medgen.evaluation.lesionwise import over_seeds

    lesion_items = _random_set(6, size=32)
    from medgen.data.space import SampleSpace

    sets = SimpleNamespace(test_brain=None, space=SampleSpace((32, 32), (1.0, 1.0, 2.0)))
    prediction = lesion_items.masks.copy()
    prediction[:3] = 0  # half the lesions missed

    def figures(*overrides: str):
        request = _evaluate_request(*overrides)
        test = whole_test_split(sets, lesion_items, request.lesions)
        summary = test.score(prediction, seed=0)
        entry = {"sensitivity": {"value": 0.6}, "dice": {"value": 0.4}, "false_positives_per_item": {"value": 0.0}}
        results = {name: {"lesions": over_seeds([{"bins": {}, "all": entry}])} for name in downstream.SETS}
        return summary, _lesion_figures(results, test, len(lesion_items), sets.space, request.lesions, [])

    base_summary, base = figures()
    assert base["bins"] == ["tiny", "small", "medium", "large"] and base["yardstick"]["ok"]
    assert figures("lesions.bins=[2,3]")[1]["bins"] == ["<2mm", "2-3mm", ">=3mm"]
    resampled, _ = figures("lesions.resamples=20")
    assert resampled["all"]["sensitivity"]["value"] == base_summary["all"]["sensitivity"]["value"] == 0.5
    assert resampled["all"]["sensitivity"]["ci95"] != base_summary["all"]["sensitivity"]["ci95"]
    assert not figures("lesions.min_sensitivity=0.7")[1]["yardstick"]["ok"]  # the real-trained network finds 60%
    assert not figures("lesions.min_dice=0.5")[1]["yardstick"]["ok"]  # ... with a lesion Dice of 0.4


@pytest.fixture(scope="module")
def eval_sets(tmp_path_factory):
    """A real set with train/ and test/ but no val/ (val_fraction holds some train patients out)
    and a synthetic set of two volumes (looked at as slices), both phantoms."""
    root = tmp_path_factory.mktemp("eval_sets")
    write_dataset(root / "real", n_patients=8, shape=(32, 32, 8), splits=("train", "train", "train", "test"),
                  keys=("bravo", "seg"))
    write_dataset(root / "synthetic", n_patients=2, shape=(32, 32, 8), keys=("bravo", "seg"), seed=50)
    return root


def test_the_set_keys_shape_the_sets(eval_sets, tmp_path):
    from medgen.evaluation import EvaluationError
    from medgen.data.space import SampleSpace
    from medgen.evaluation.downstream import build_segmenter, save_segmenter
    from medgen.evaluation.sets import Sets
    from medgen.generation.status import GenerationStatus, write_status

    base_keys = (f"real_dir={eval_sets / 'real'}", f"synthetic_dir={eval_sets / 'synthetic'}", "spatial_dims=2",
                 f"cache_dir={tmp_path / 'cache'}", "num_workers=0", "downstream=false")

    def sets(*overrides: str) -> Sets:
        return Sets(_evaluate_request(*base_keys, *overrides).sets, progress=False)

    base = sets()
    assert Path(base.synthetic.directory).is_relative_to(tmp_path / "cache")  # cache_dir
    assert base.segmenter is None and not base.warnings
    # val_fraction: more of train/ held out as the real val set (FID's floor)
    assert len(sets("val_fraction=0.5").val.patient_ids) > len(base.val.patient_ids) >= 1
    # max_images: a seeded subset of each set
    assert len(base.sample("synthetic")) == 16 and len(sets("max_images=3").sample("synthetic")) == 3
    # seg_net_checkpoint: the adherence segmenter is loaded, not trained
    space = SampleSpace((32, 32))
    path = save_segmenter(build_segmenter(1, space), tmp_path / "seg_net.pt", ["bravo"], space)
    assert sets(f"seg_net_checkpoint={path}").segmenter is not None
    # allow_partial: an unfinished generation is evaluated, with a warning, instead of refused
    (eval_sets / "synthetic" / ".medgen").mkdir()
    write_status(eval_sets / "synthetic", GenerationStatus(complete=False, done=2, expected=4))
    try:
        with pytest.raises(EvaluationError, match="unfinished generation"):
            sets()
        assert "unfinished generation" in sets("allow_partial=true").warnings[0]
    finally:
        shutil.rmtree(eval_sets / "synthetic" / ".medgen")


# ============================================================================ medgen-generate: new effect tests
def _generated(out: Path) -> dict[str, bytes]:
    """Every file a run wrote under ``out`` (its own state folder left out), by relative path, as bytes;
    the NIfTI files decompressed (their gzip header holds a time)."""
    import gzip

    files = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if path.is_file() and not rel.startswith(".medgen"):
            data = path.read_bytes()
            files[rel] = gzip.decompress(data) if rel.endswith(".gz") else data
    return files


@pytest.fixture(scope="module")
def generate_runs(tmp_path_factory, tiny_checkpoints, tiny_data):
    """``run(**settings)``: the files of a tiny generation with the base settings and ``settings``
    (the base: seg (DDPM) + bravo (rectified flow) checkpoints, the gate off, 2 masks, fp32)."""
    from medgen.generation import generate

    root = tmp_path_factory.mktemp("every_generate_key")
    base = dict(seg_checkpoint=str(tiny_checkpoints["seg"]), image_checkpoint=str(tiny_checkpoints["bravo"]),
                num_images=2, batch_size=2, steps=2, precision="fp32", gate={"enabled": False}, progress=False,
                cache_dir=str(root / "cache"))
    runs = [0]

    def run(**settings) -> dict[str, bytes]:
        runs[0] += 1
        merged = {**base, **settings}
        merged = {k: v for k, v in merged.items() if v is not None or k in ("seg_checkpoint", "num_images")}
        return _generated(generate(out_dir=str(root / f"run{runs[0]}"), **merged).out_dir)

    torch.set_num_threads(1)
    return run, run(), tiny_data


@pytest.mark.parametrize("settings, shows", [
    ({"num_images": 3}, "train/syn_000002/bravo.nii.gz"),
    ({"samples_per_mask": 2}, "uncertainty/syn_000000/bravo_std.nii.gz"),
    ({"split": "val"}, "val/syn_000000/bravo.nii.gz"),
    ({"seed": 1}, "train/syn_000000/seg.nii.gz"),
    ({"image_sampler": "heun"}, "train/syn_000000/bravo.nii.gz"),
    ({"sampler": "heun", "seg_sampler": "ddpm"}, "train/syn_000000/bravo.nii.gz"),  # sampler: where none is named
    ({"steps": 3}, "train/syn_000000/bravo.nii.gz"),
    ({"guidance_scale": 3.0}, "train/syn_000000/bravo.nii.gz"),
    ({"use_ema": False}, "train/syn_000000/bravo.nii.gz"),
    ({"precision": "bf16"}, "train/syn_000000/bravo.nii.gz"),
    ({"previews": False}, "previews/syn_000000.png"),
    ({"brain_outline": "as_drawn"}, "train/syn_000000/bravo.nii.gz"),
    ({"format": "nnunet", "nnunet": {"dataset_id": 777}}, "nnUNet_raw/Dataset777_MedgenSynthetic/dataset.json"),
    ({"format": "nnunet", "nnunet": {"name": "Mets"}}, "nnUNet_raw/Dataset501_Mets/dataset.json"),
    ({"seg_checkpoint": None, "cache_dir": "other"}, "cache"),  # the slice cache of masks_from
], ids=lambda v: ",".join(v) if isinstance(v, dict) else None)
def test_a_generate_key_changes_the_output(generate_runs, settings, shows, tmp_path, monkeypatch):
    """Each key set away from its default changes the files a run writes (``shows``: one that differs,
    appears or disappears); ``cache_dir`` acts with ``masks_from``."""
    from medgen.core import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)  # precision=bf16: the choice, not this CPU's
    run, base, data = generate_runs
    if "cache_dir" in settings:  # masks_from builds its slice cache there
        run(seg_checkpoint=None, masks_from=str(data), masks_split="train", cache_dir=str(tmp_path / "other"))
        assert any((tmp_path / "other").iterdir()), "masks_from built no cache in cache_dir"
        return
    changed = run(**settings)
    assert changed.get(shows) != base.get(shows), f"{settings} left {shows} as it was"


def test_the_generate_device_and_compile_keys_reach_the_network(tiny_checkpoints, monkeypatch):
    """device, compile and compile_mode: what load_stage builds (their effect is where the network runs
    and how it is compiled; the pixels are the same function)."""
    from medgen.generation.models import load_stage

    compiled = []
    real_compile = torch.compile

    def spy(model, **kwargs):
        compiled.append(kwargs.get("mode"))
        return real_compile(model, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    eager = load_stage(tiny_checkpoints["bravo"], "image", "image_checkpoint", device=torch.device("cpu"), compile="false")
    assert compiled == [] and eager.device.type == "cpu"
    load_stage(tiny_checkpoints["bravo"], "image", "image_checkpoint", device=torch.device("cpu"), compile="true",
               compile_mode="max-autotune-no-cudagraphs")
    assert compiled == ["max-autotune-no-cudagraphs"]
    with pytest.raises(Exception, match="cuda|CUDA|device"):  # a device this machine lacks is refused
        from medgen.core.distributed import setup_distributed

        setup_distributed(use_multi_gpu=True, device="cuda:7" if not torch.cuda.is_available() else "cuda:99")


def test_the_seg_sampler_key_reaches_the_mask_stage(tiny_checkpoints, tmp_path, monkeypatch, one_thread):
    """seg_sampler: the tiny seg model's masks saturate at +-1 after 2 steps whatever the sampler, so
    the files cannot show it; the mask stage is asked to sample with it (each sampler's numbers:
    tests/unit/test_samplers.py), and the manifest records it."""
    from medgen.generation import Stage, generate

    asked, real_sample = [], Stage.sample

    def spy(self, cond, generators, **kwargs):
        asked.append((self.mode.generates_mask, kwargs["sampler"]))
        return real_sample(self, cond, generators, **kwargs)

    monkeypatch.setattr(Stage, "sample", spy)
    result = generate(seg_checkpoint=str(tiny_checkpoints["seg"]), image_checkpoint=str(tiny_checkpoints["bravo"]),
                      out_dir=str(tmp_path / "out"), num_images=2, batch_size=2, steps=2, precision="fp32",
                      gate={"enabled": False}, progress=False, seg_sampler="ddpm")
    assert sorted(set(asked)) == [(False, "euler"), (True, "ddpm")]
    assert "ddpm" in (result.out_dir / "manifest.csv").read_text()


def test_every_key_the_sweep_ignores_is_one_it_warns_about():
    from medgen.diffusion.config import SWEEP_NO_EFFECT

    warned = {key for keys, _, _ in SWEEP_NO_EFFECT for key in keys}
    assert set(LR_FIND_IGNORED) <= warned, sorted(set(LR_FIND_IGNORED) - warned)
