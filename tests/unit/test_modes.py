"""medgen.diffusion.modes: channel layout, conditioning, outputs, errors."""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from omegaconf import OmegaConf

from medgen.diffusion.config import load_config
from medgen.diffusion.modes import (
    MODES,
    ConditionalDualMode,
    ConditionalSingleMode,
    SegmentationMode,
    build_mode,
)

#: a distinct constant per modality, so channel order is visible after to_model_space
LEVELS = {"bravo": 0.2, "t1_pre": 0.4, "t1_gd": 0.6, "flair": 0.8, "seg": 1.0, "brain": 0.9}


@lru_cache(maxsize=None)
def _config(name: str):
    return load_config([f"mode={name}"])


def _mode(name: str):
    return build_mode(_config(name))


def _batch(b: int = 3, size: int = 8) -> dict[str, torch.Tensor]:
    return {k: torch.full((b, 1, size, size), v) for k, v in LEVELS.items()}


def _mode_cfg(name: str, **overrides):
    cfg = OmegaConf.to_container(_config(name).mode)
    cfg.update(overrides)
    return OmegaConf.create(cfg)


def test_registry_and_attributes():
    assert set(MODES) == {"seg", "bravo", "dual", "inpaint"}  # inpaint: tests/unit/test_inpaint_mode.py
    seg, bravo, dual = _mode("seg"), _mode("bravo"), _mode("dual")
    assert isinstance(seg, SegmentationMode) and isinstance(bravo, ConditionalSingleMode) and isinstance(dual, ConditionalDualMode)
    # the defaults know the brain: the mask model draws it with the lesions, the image models are given it
    assert (seg.in_channels, seg.out_channels, seg.is_conditional, seg.supports_perceptual) == (2, 2, False, False)
    assert (bravo.in_channels, bravo.out_channels, bravo.is_conditional, bravo.supports_perceptual) == (3, 1, True, True)
    assert (dual.in_channels, dual.out_channels, dual.is_conditional, dual.supports_perceptual) == (4, 2, True, True)
    assert seg.image_keys == ("seg", "brain") and dual.image_keys == ("t1_pre", "t1_gd")
    assert dual.cond_keys == bravo.cond_keys == ("seg", "brain")
    assert seg.knows_brain and bravo.knows_brain
    # without the brain: the anatomy-blind layout
    blind = {name: MODES[name](_mode_cfg(name, **keys)) for name, keys in
             [("seg", {"image_keys": ["seg"]}), ("bravo", {"cond_keys": ["seg"]}), ("dual", {"cond_keys": ["seg"]})]}
    assert [(m.in_channels, m.out_channels) for m in blind.values()] == [(1, 1), (2, 1), (3, 2)]
    assert not any(m.knows_brain for m in blind.values())


def test_generation_roles_follow_from_the_keys_and_the_slice_selection_from_the_class():
    seg, bravo, dual = _mode("seg"), _mode("bravo"), _mode("dual")
    assert (seg.generates_mask, seg.mask_conditioned, seg.slice_selection) == (True, False, "lesion")
    for mode in (bravo, dual):
        assert (mode.generates_mask, mode.mask_conditioned, mode.slice_selection) == (False, True, "brain")
    # the roles are read from the keys, not the name: an unconditional image mode neither makes nor takes masks
    unconditional = ConditionalSingleMode(OmegaConf.create({"image_keys": ["flair"], "cond_keys": []}))
    assert (unconditional.generates_mask, unconditional.mask_conditioned) == (False, False)


@pytest.mark.parametrize(
    "name, x0_levels, cond_levels",
    [("seg", [1.0, 0.9], None), ("bravo", [0.2], [1.0, 0.9]), ("dual", [0.4, 0.6], [1.0, 0.9])],
)
def test_split_channel_order_and_model_space(name, x0_levels, cond_levels):
    mode = _mode(name)
    x0, cond = mode.split(_batch())
    assert x0.shape == (3, len(x0_levels), 8, 8)
    for c, level in enumerate(x0_levels):
        torch.testing.assert_close(x0[:, c], torch.full((3, 8, 8), 2 * level - 1))
    if cond_levels is None:
        assert cond is None
    else:
        assert cond.shape == (3, len(cond_levels), 8, 8)
        for c, level in enumerate(cond_levels):
            torch.testing.assert_close(cond[:, c], torch.full((3, 8, 8), 2 * level - 1))


def test_model_input_channel_order():
    x_t = torch.stack([torch.full((2, 8, 8), 10.0), torch.full((2, 8, 8), 20.0)], dim=1)  # [B, 2, H, W]
    cond = torch.cat([torch.full((2, 1, 8, 8), 1.0), torch.full((2, 1, 8, 8), 2.0)], dim=1)  # [mask, brain]
    dual = _mode("dual").model_input(x_t, cond)
    assert dual.shape == (2, 4, 8, 8)
    assert [dual[:, c].unique().item() for c in range(4)] == [10.0, 20.0, 1.0, 2.0]  # [x_t(pre), x_t(post), mask, brain]
    bravo = _mode("bravo").model_input(x_t[:, :1], cond)
    assert [bravo[:, c].unique().item() for c in range(3)] == [10.0, 1.0, 2.0]  # [x_t, mask, brain]
    blind = ConditionalSingleMode(_mode_cfg("bravo", cond_keys=["seg"])).model_input(x_t[:, :1], cond[:, :1])
    assert [blind[:, c].unique().item() for c in range(2)] == [10.0, 1.0]  # [x_t, mask]
    seg = _mode("seg").model_input(x_t, None)
    assert torch.equal(seg, x_t)


def test_model_input_errors():
    bravo, seg = _mode("bravo"), _mode("seg")
    with pytest.raises(ValueError, match="conditional"):
        bravo.model_input(torch.zeros(2, 1, 8, 8), None)
    with pytest.raises(ValueError, match="x_t must be"):
        bravo.model_input(torch.zeros(2, 2, 8, 8), torch.zeros(2, 2, 8, 8))
    with pytest.raises(ValueError, match="does not match"):
        bravo.model_input(torch.zeros(2, 1, 8, 8), torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match=r"cond must be \[B, 2, H, W\]"):  # the brain is missing
        bravo.model_input(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="unconditional"):
        seg.model_input(torch.zeros(2, 2, 8, 8), torch.zeros(2, 1, 8, 8))


@pytest.mark.parametrize("name", ["bravo", "dual"])
def test_null_cond_is_all_background(name):
    mode = _mode(name)
    _, cond = mode.split(_batch())
    null = mode.null_cond(cond)
    assert null.shape == cond.shape and torch.all(null == -1.0)
    torch.testing.assert_close(cond, mode.split(_batch())[1])  # input untouched


def test_seg_has_no_condition():
    seg = _mode("seg")
    assert seg.null_cond(None) is None
    assert seg.drop_cond(None, 0.5, torch.Generator().manual_seed(0)) is None


def test_drop_cond_rate_and_reproducibility():
    mode = _mode("bravo")
    cond = torch.ones(4000, 2, 4, 4)
    dropped = mode.drop_cond(cond, 0.3, torch.Generator().manual_seed(0))
    per_sample = dropped.flatten(1)
    is_null = (per_sample == -1).all(1)
    is_kept = (per_sample == 1).all(1)
    assert torch.all(is_null | is_kept)  # whole samples are replaced, never single pixels
    assert abs(is_null.float().mean().item() - 0.3) < 0.03
    again = mode.drop_cond(cond, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(dropped, again)
    assert not torch.equal(dropped, mode.drop_cond(cond, 0.3, torch.Generator().manual_seed(1)))
    assert torch.equal(mode.drop_cond(cond, 0.0, torch.Generator().manual_seed(0)), cond)
    assert torch.all(mode.drop_cond(cond, 1.0, torch.Generator().manual_seed(0)) == -1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mode.drop_cond(cond, 1.5, torch.Generator())


def test_drop_cond_leaves_global_rng_alone():
    mode = _mode("dual")
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    mode.drop_cond(torch.ones(8, 2, 4, 4), 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(torch.rand(3), expected)


def test_to_outputs_ranges_and_binarised_mask():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 2, 8, 8, generator=g) * 3  # beyond [-1, 1] on purpose
    out = _mode("dual").to_outputs(x0)
    assert set(out) == {"t1_pre", "t1_gd"}
    for v in out.values():
        assert v.shape == (2, 1, 8, 8) and v.min() >= 0 and v.max() <= 1
    torch.testing.assert_close(out["t1_gd"], ((x0[:, 1:2] + 1) / 2).clamp(0, 1))
    masks = _mode("seg").to_outputs(x0)
    for c, key in enumerate(("seg", "brain")):  # the lesion mask and the brain, both binarised
        assert set(masks[key].unique().tolist()) == {0.0, 1.0}
        assert torch.equal(masks[key], (x0[:, c:c + 1] > 0).float())  # 0.5 in [0, 1] is 0 in model space
    with pytest.raises(ValueError, match="outputs"):
        _mode("bravo").to_outputs(x0)


def test_split_roundtrip_through_outputs():
    mode = _mode("dual")
    batch = {k: torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i, k in enumerate(LEVELS)}
    batch["seg"] = (batch["seg"] > 0.5).float()
    x0, _ = mode.split(batch)
    out = mode.to_outputs(x0)
    for key in mode.image_keys:
        torch.testing.assert_close(out[key], batch[key])


def test_split_errors_name_the_key():
    mode = _mode("dual")
    batch = _batch()
    del batch["t1_gd"]
    with pytest.raises(KeyError, match="t1_gd"):
        mode.split(batch)
    batch = _batch()
    batch["seg"] = torch.zeros(3, 8, 8)
    with pytest.raises(ValueError, match=r"batch\['seg'\]"):
        mode.split(batch)
    batch = _batch()
    batch["t1_pre"] = torch.zeros(3, 1, 4, 4)
    with pytest.raises(ValueError, match="t1_gd"):
        mode.split(batch)


def test_keys_come_from_config():
    mode = ConditionalSingleMode(_mode_cfg("bravo", image_keys=["flair"]))
    x0, _ = mode.split(_batch())
    assert mode.image_keys == ("flair",)
    torch.testing.assert_close(x0, torch.full_like(x0, 2 * LEVELS["flair"] - 1))


def test_lesion_conditioned_seg_takes_one_hot_planes_of_the_largest_lesion_class():
    mode = SegmentationMode(_mode_cfg("seg", size_bins="rano_bm"))
    assert mode.lesion_conditioned and mode.is_conditional and not mode.cond_keys
    assert (mode.cond_channels, mode.in_channels, mode.out_channels) == (5, 7, 2)  # none, tiny, small, medium, large
    mm = torch.tensor([0.0, 5.0, 10.0, 19.9, 20.0, 35.0])  # edges 10/20/30 mm, half-open [lower, upper)
    assert mode.size_classes(mm).tolist() == [0, 1, 2, 2, 3, 4]
    batch = {"seg": torch.zeros(6, 1, 8, 8), "brain": torch.ones(6, 1, 8, 8), "lesion_mm": mm[:, None],
             "lesion_count": torch.ones(6, 1)}
    x0, cond = mode.split(batch)
    assert x0.shape == (6, 2, 8, 8) and cond.shape == (6, 5, 8, 8)
    assert torch.equal(cond[:, :, 3, 5], 2 * torch.eye(5)[[0, 1, 2, 2, 3, 4]] - 1)  # +1 on the class, -1 elsewhere
    assert torch.equal(cond, cond[:, :, :1, :1].expand_as(cond))  # constant planes
    assert torch.all(mode.null_cond(cond) == -1)
    assert torch.all(mode.lesion_condition((4, 4), torch.tensor([-1, -1])) == -1)  # no class given: the null condition
    torch.testing.assert_close(mode.model_input(torch.zeros(6, 2, 8, 8), cond)[:, 2:], cond)
    dropped = mode.drop_cond(cond, 0.5, torch.Generator().manual_seed(0))
    kept = (dropped == cond).flatten(1).all(1)
    assert torch.all(kept | (dropped == -1).flatten(1).all(1)) and 0 < kept.sum() < 6
    with pytest.raises(KeyError, match="needs batch\\['lesion_mm', 'lesion_count'\\]"):
        mode.split({"seg": batch["seg"], "brain": batch["brain"]})
    with pytest.raises(ValueError, match=r"takes the class planes \[B, 5, H, W\]"):
        mode.model_input(torch.zeros(6, 2, 8, 8), None)
    finer = SegmentationMode(_mode_cfg("seg", size_bins=[3, 6]))
    assert finer.cond_channels == 4 and finer.size_classes(torch.tensor([2.9, 3.0, 7.0])).tolist() == [1, 2, 3]


def test_count_conditioned_seg_takes_planes_of_the_lesion_count_class_after_the_size_planes():
    mode = SegmentationMode(_mode_cfg("seg", size_bins="rano_bm", count_classes=[1, 2, 4]))
    assert mode.cond_channels == 5 + 4  # none, tiny, small, medium, large; then none, 1, 2-3, 4+
    counts = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 9.0])
    assert mode.count_class_index(counts).tolist() == [0, 1, 2, 2, 3, 3]
    mm = torch.tensor([0.0, 5.0, 12.0, 12.0, 25.0, 40.0])
    batch = {"seg": torch.zeros(6, 1, 4, 4), "brain": torch.ones(6, 1, 4, 4), "lesion_mm": mm[:, None],
             "lesion_count": counts[:, None]}
    _, cond = mode.split(batch)
    expected = torch.cat([2 * torch.eye(5)[[0, 1, 2, 2, 3, 4]] - 1, 2 * torch.eye(4)[[0, 1, 2, 2, 3, 3]] - 1], 1)
    assert cond.shape == (6, 9, 4, 4) and torch.equal(cond[:, :, 2, 1], expected)
    # one group given no class: its planes all -1, the other's one-hot
    part = mode.lesion_condition((2, 2), torch.tensor([2]), torch.tensor([-1]))
    assert part[0, :5, 0, 0].tolist() == [-1, -1, 1, -1, -1] and torch.all(part[0, 5:] == -1)
    only = SegmentationMode(_mode_cfg("seg", count_classes=[1, 2, 3, 4]))
    assert only.cond_channels == 5 and only.lesion_conditioned and only.size_bins is None
    _, cond = only.split(batch)
    assert torch.equal(cond[:, :, 0, 0], 2 * torch.eye(5)[[0, 1, 2, 3, 4, 4]] - 1)


@pytest.mark.parametrize("overrides, message", [
    (["mode=bravo", "+mode.count_classes=[1,2]"], "'mode.count_classes': mode 'bravo' cannot be conditioned on lesion "
                                                  "counts"),
    (["mode=seg", "mode.count_classes=[0,1]"], "'mode.count_classes': must start at 1 and increase"),
    (["mode=bravo", "+mode.size_bins=rano_bm"], "'mode.size_bins': mode 'bravo' cannot be conditioned on lesion sizes"),
    (["mode=seg", "mode.size_bins=rano"], "'mode.size_bins': unknown binning 'rano'"),
    (["mode=seg", "mode.size_bins=[20,10]"], "'mode.size_bins': bin edges must be positive, finite and increasing"),
    (["mode=seg", "training.cond_dropout=0.1"], "'training.cond_dropout': classifier-free guidance needs a conditional"),
])
def test_size_bins_config_errors_name_the_key(overrides, message):
    from medgen.core.schema import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(overrides)
    assert load_config(["mode=seg", "mode.size_bins=rano_bm", "training.cond_dropout=0.1"]).mode.size_bins == "rano_bm"
    assert load_config(["mode=seg", "mode.count_classes=[1,2,3]", "training.cond_dropout=0.1"]).mode.count_classes == [1, 2, 3]
