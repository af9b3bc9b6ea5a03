"""medgen.diffusion.inpaint: the inpainting painter's channels, training regions, windows, config and training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from scipy import ndimage

from medgen.core.checkpoint import load_checkpoint
from medgen.core.distributed import DistInfo
from medgen.core.schema import ConfigError
from medgen.diffusion.config import InpaintModeConfig, load_config, mode_schema
from medgen.diffusion.inpaint import InpaintMode
from medgen.diffusion.modes import MODES, build_mode

CPU = DistInfo(device=torch.device("cpu"))


def _mode(**keys) -> InpaintMode:
    cfg = OmegaConf.to_container(load_config(["mode=inpaint", "model.image_size=32"]).mode)
    cfg.update(keys)
    return InpaintMode(OmegaConf.create(cfg))


def _batch(shape=(32, 32), b: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Images with a distinct value per voxel (a window's place can be read off it), irregular lesions
    (item 2: none) inside a disc / ball of brain well inside the item."""
    g = torch.Generator().manual_seed(seed)
    n = int(np.prod(shape))
    bravo = torch.stack([torch.randperm(n, generator=g).float().view(1, *shape) / n for _ in range(b)])
    axes = torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in shape), indexing="ij")
    centre = [(s - 1) / 2 for s in shape]
    radius = min(shape) * 0.3
    brain = (sum((a - c) ** 2 for a, c in zip(axes, centre)) <= radius**2).float().expand(b, 1, *shape).clone()
    seg = torch.zeros(b, 1, *shape)
    c0, c1 = shape[0] // 2, shape[1] // 2
    seg[0, 0, c0 - 4 : c0 - 1, c1 - 2 : c1] = 1
    seg[0, 0, c0 + 1, c1 + 2] = 1
    seg[1, 0, c0 - 3 : c0 - 1, c1 + 2] = 1
    return {"bravo": bravo, "t1_pre": bravo.flip(0), "t1_gd": 1 - bravo, "seg": seg * brain, "brain": brain}


def _region(cond: torch.Tensor, out: int = 1) -> torch.Tensor:
    return cond[:, out] > 0


# ---------------------------------------------------------------------------- channels and the condition
def test_registered_with_its_channels_and_schema():
    assert MODES["inpaint"] is InpaintMode and InpaintMode.paints_into_scans
    assert not any(MODES[name].paints_into_scans for name in ("seg", "bravo", "dual"))
    assert mode_schema(InpaintMode) is InpaintModeConfig
    bravo = build_mode(load_config(["mode=inpaint"]))
    assert bravo.cond_keys == ("seg", "brain") and bravo.slice_selection == "brain"
    assert (bravo.in_channels, bravo.cond_channels, bravo.out_channels) == (5, 4, 1)
    dual = _mode(image_keys=["t1_pre", "t1_gd"])
    assert (dual.in_channels, dual.cond_channels, dual.out_channels) == (7, 5, 2)


def test_known_is_minus_one_exactly_inside_the_region_and_the_scan_outside():
    mode = _mode(image_keys=["t1_pre", "t1_gd"])
    g = torch.Generator().manual_seed(0)
    known = torch.rand(2, 2, 8, 8, generator=g) * 2 - 1
    region = torch.rand(2, 1, 8, 8, generator=g) > 0.6
    cond = torch.rand(2, 2, 8, 8, generator=g) * 2 - 1
    c = mode.inpaint_condition(known, region.float(), cond)
    assert c.shape == (2, mode.cond_channels, 8, 8)
    inside = region.expand(-1, 2, -1, -1)
    assert (c[:, :2][inside] == -1).all() and torch.equal(c[:, :2][~inside], known[~inside])
    assert torch.equal(c[:, 2:3], torch.where(region, 1.0, -1.0)) and torch.equal(c[:, 3:], cond)
    # through split: known is x0 outside the region, -1 inside; the condition keeps seg and brain of the window
    x0, cond = mode.split(_batch(), torch.Generator().manual_seed(1))
    hidden = _region(cond, 2)[:, None].expand(-1, 2, -1, -1)
    assert (cond[:, :2][hidden] == -1).all() and torch.equal(cond[:, :2][~hidden], x0[~hidden])
    with pytest.raises(ValueError, match="region must be"):
        mode.inpaint_condition(known, region[:, :, :4].float(), cond[:, 3:])


def test_null_cond_drops_the_lesion_and_brain_but_keeps_the_scan():
    mode = _mode()
    _, cond = mode.split(_batch())
    null = mode.null_cond(cond)
    assert torch.equal(null[:, :2], cond[:, :2]) and (null[:, 2:] == -1).all()


# ---------------------------------------------------------------------------- training regions
@pytest.mark.parametrize("shape, margin", [((32, 32), 2), ((16, 16, 8), 1)])
def test_a_region_at_a_lesion_is_the_lesion_dilated_by_the_margin(shape, margin):
    mode = _mode(lesion_fraction=1.0, margin=margin)
    batch = _batch(shape)
    if len(shape) == 3:
        batch["seg"][1, 0, 7:9, 5, 3:5] = 1
    x0, cond = mode.split(batch, torch.Generator().manual_seed(2))
    region = _region(cond).numpy()
    structure = np.ones((2 * margin + 1,) * len(shape), dtype=bool)  # the cube of half-width margin
    for i in range(2):  # items with a lesion
        expected = ndimage.binary_dilation(batch["seg"][i, 0].numpy() > 0, structure=structure)
        assert np.array_equal(region[i], expected), i
    assert region[2].sum() > 0  # no lesion: a ball instead


def _window_start(item: torch.Tensor, window_first: float) -> tuple[int, ...]:
    """Where a window of ``item`` (distinct values) starts: the position of its first voxel's value."""
    return tuple(int(n) for n in (item == window_first).nonzero()[0])


def test_a_lesion_region_in_a_window_holds_every_lesion_voxel_of_it_plus_the_margin():
    mode = _mode(lesion_fraction=1.0, margin=2, window=16)
    batch = _batch()
    for seed in range(4):
        x0, cond = mode.split(batch, torch.Generator().manual_seed(seed))
        assert x0.shape == (3, 1, 16, 16) and cond.shape == (3, 4, 16, 16)
        for i in range(2):
            a, b = _window_start(batch["bravo"][i, 0], float(x0[i, 0, 0, 0] * 0.5 + 0.5))
            dilated = ndimage.binary_dilation(batch["seg"][i, 0].numpy() > 0, structure=np.ones((5, 5), bool))
            assert np.array_equal(_region(cond)[i].numpy(), dilated[a : a + 16, b : b + 16])
            assert dilated[a : a + 16, b : b + 16].sum() == dilated.sum()  # the whole region lies in the window
            seg_window = cond[i, 2].numpy() > 0
            assert np.array_equal(seg_window, batch["seg"][i, 0, a : a + 16, b : b + 16].numpy() > 0)
            assert not (seg_window & ~_region(cond)[i].numpy()).any()


@pytest.mark.parametrize("shape", [(32, 32), (16, 16, 16)])
def test_random_regions_are_balls_centred_in_the_brain_no_larger_than_max_radius(shape):
    mode = _mode(lesion_fraction=0.0, max_radius=5)
    batch = _batch(shape)
    radii = []
    for seed in range(6):
        _, cond = mode.split(batch, torch.Generator().manual_seed(seed))
        for i in range(3):
            voxels = _region(cond)[i].nonzero().float()
            centre = voxels.mean(0)  # a ball away from the edges: symmetric about its centre voxel
            assert torch.equal(centre, centre.round()) and batch["brain"][i, 0][tuple(centre.long())] == 1
            radius = (voxels - centre).norm(dim=1).max()
            assert 0 < radius <= 5
            radii.append(float(radius))
    assert len(set(radii)) > 3  # the radius is drawn
    no_brain = {k: v.clone() for k, v in batch.items()}
    no_brain["brain"].zero_()
    no_brain["seg"].zero_()
    _, cond = mode.split(no_brain, torch.Generator().manual_seed(0))
    assert all(torch.equal(_region(cond)[i].nonzero().float().mean(0), torch.tensor([s // 2 for s in shape]).float())
               for i in range(3))  # no brain: the item's centre


@pytest.mark.parametrize("shape, window", [((32, 32), 16), ((32, 32), 8), ((16, 16, 16), [8, 8, 8])])
def test_the_window_has_its_shape_and_holds_the_whole_region_when_it_fits(shape, window):
    whole, windowed = _mode(max_radius=3), _mode(max_radius=3, window=window)
    size = tuple(window) if isinstance(window, list) else (window, window)
    assert windowed.sample_shape(shape) == size and whole.sample_shape(shape) == shape
    batch = _batch(shape)
    for seed in range(5):
        _, full = whole.split(batch, torch.Generator().manual_seed(seed))
        x0, cond = windowed.split(batch, torch.Generator().manual_seed(seed))  # the same draws: the same regions
        assert x0.shape == (3, 1, *size) and cond.shape == (3, 4, *size)
        for i in range(3):
            if _region(full)[i].sum() and all(np.ptp(_region(full)[i].nonzero().numpy(), 0) < np.array(size)):
                assert _region(cond)[i].sum() == _region(full)[i].sum(), (seed, i)


def test_same_seed_same_regions_other_seed_other_regions_and_no_generator_is_deterministic():
    mode = _mode(window=16)
    batch = _batch()
    a, b = (mode.split(batch, torch.Generator().manual_seed(7)) for _ in range(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    others = [mode.split(batch, torch.Generator().manual_seed(s))[1] for s in range(8, 12)]
    assert all(not torch.equal(a[1], c) for c in others)
    fixed = mode.split(batch)
    assert torch.equal(fixed[1], mode.split(batch)[1])
    # without a generator an item's region depends on the item alone, not on the batch it is in
    alone = mode.split({k: v[1:2] for k, v in batch.items()})
    assert torch.equal(alone[1][0], fixed[1][1]) and torch.equal(alone[0][0], fixed[0][1])


@pytest.mark.parametrize("name", ["seg", "bravo", "dual"])
def test_other_modes_draw_nothing_from_the_generator(name):
    mode = build_mode(load_config([f"mode={name}"]))
    batch = _batch()
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    x0, cond = mode.split(batch, g)
    plain = mode.split(batch)
    assert torch.equal(g.get_state(), state) and torch.equal(x0, plain[0])
    assert (cond is None and plain[1] is None) or torch.equal(cond, plain[1])
    assert mode.sample_shape((32, 32)) == (32, 32)


# ---------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("overrides, key, words", [
    (["model.image_size=32", "mode.window=64"], "mode.window", "larger than model.image_size"),
    (["model.image_size=32", "mode.window=18"], "mode.window", "not divisible"),
    (["model.image_size=32", "mode.window=[16,16,8]"], "mode.window", "an int W"),
    (["model.image_size=[32,32,16]", "mode.window=16"], "mode.window", "[X, Y, Z]"),
    (["model.image_size=[32,32,16]", "mode.window=[16,16,32]"], "mode.window", "larger than"),
    (["mode.cond_keys=[seg]"], "mode.cond_keys", "'brain'"),
    (["mode.cond_keys=[brain,seg]"], "mode.cond_keys", "[seg, brain]"),
    (["mode.lesion_fraction=1.5"], "mode.lesion_fraction", "[0, 1]"),
    (["mode.margin=-1"], "mode.margin", ">= 0"),
    (["mode.max_radius=0"], "mode.max_radius", ">= 1"),
])
def test_config_errors_name_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as info:
        load_config(["mode=inpaint", *overrides])
    assert info.value.key == key and words in info.value.reason, str(info.value)


def test_inpaint_keys_are_refused_for_other_modes():
    with pytest.raises(ConfigError, match="mode.window"):
        load_config(["mode=bravo", "+mode.window=16"])


# ---------------------------------------------------------------------------- training
def test_training_on_windows_samples_grids_and_the_checkpoint_paints_windows(tiny_cfg, tmp_path):
    """2D: image_size 16, window 8: steps run, the grid shows windows, the strategy and generation's
    sampling use the window, the checkpoint records the item space."""
    from medgen.diffusion.trainer import DiffusionTrainer
    from medgen.generation.models import load_stage

    extra = ("mode=inpaint", "mode.window=8", "training.epochs=1", "training.max_steps=3", "training.num_val_samples=2")
    trainer = DiffusionTrainer(tiny_cfg(*extra), tmp_path / "run", CPU, progress=False)
    assert trainer.strategy.shape == (8, 8) and trainer.space.shape == (16, 16)
    assert trainer.train() == "max_steps"
    grid = trainer.sample_grid()
    assert grid is not None and grid.shape[0] > 0
    ckpt_path = tmp_path / "run" / "checkpoints" / "latest.pt"
    assert load_checkpoint(ckpt_path)["space"]["shape"] == [16, 16]
    stage = load_stage(ckpt_path, "image", "image_checkpoint", device=torch.device("cpu"), compile="false")
    assert stage.strategy.shape == (8, 8) and stage.space.shape == (16, 16)
    known, region = torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)
    region[:, :, 2:5, 2:5] = 1
    cond = stage.mode.inpaint_condition(known, region, torch.full((2, 2, 8, 8), -1.0))
    x0 = stage.sample(cond, [torch.Generator().manual_seed(i) for i in range(2)], steps=2, sampler="ddpm")
    assert x0.shape == (2, 1, 8, 8) and torch.isfinite(x0).all()


def test_a_3d_inpaint_model_trains_on_windows_and_writes_its_grid(tiny_cfg, tmp_path):
    from medgen.diffusion.trainer import DiffusionTrainer

    extra = ("mode=inpaint", "strategy=rflow", "model.image_size=[16,16,8]", "mode.window=[8,8,8]",
             "training.batch_size=2", "training.epochs=1", "training.val_interval=1")
    trainer = DiffusionTrainer(tiny_cfg(*extra), tmp_path / "run", CPU, progress=False)
    assert trainer.strategy.shape == (8, 8, 8)
    assert trainer.train() == "done"
    grids = sorted((tmp_path / "run" / "samples").glob("*.png"))
    assert grids and Image.open(grids[-1]).size[0] > 0


def test_inpaint_resume_is_exact(tiny_cfg, tmp_path):
    """The regions come from the step's generator: N steps straight == N/2, stop, resume to N."""
    from medgen.diffusion.trainer import DiffusionTrainer

    extra = ("mode=inpaint", "mode.window=8", "training.epochs=2", "training.warmup_steps=1",
             "training.cond_dropout=0.2", "training.val_interval=1")
    straight = DiffusionTrainer(tiny_cfg(*extra, "training.max_steps=6"), tmp_path / "a", CPU, progress=False)
    assert straight.train() == "max_steps"
    half = DiffusionTrainer(tiny_cfg(*extra, "training.max_steps=3"), tmp_path / "b", CPU, progress=False)
    assert half.train() == "max_steps"
    resumed = DiffusionTrainer(tiny_cfg(*extra, "training.max_steps=6"), tmp_path / "b", CPU, progress=False)
    resumed.resume_from(tmp_path / "b" / "checkpoints" / "latest.pt")
    resumed.train()
    assert resumed.step == straight.step == 6
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_region_keys_a_run_does_not_use_are_named():
    from medgen.diffusion.config import unused_keys

    never_lesion = load_config(["mode=inpaint", "mode.lesion_fraction=0", "mode.margin=3", "mode.max_radius=4"])
    assert unused_keys(never_lesion, ["mode.margin", "mode.max_radius"]) == [
        "mode.margin=3 (mode.lesion_fraction=0: no region is a lesion)"]
    # lesion_fraction=1 still draws balls for the items without a lesion: max_radius acts
    always = load_config(["mode=inpaint", "mode.lesion_fraction=1", "mode.max_radius=4"])
    assert unused_keys(always, ["mode.margin", "mode.max_radius"]) == []
    assert unused_keys(load_config(["mode=inpaint", "mode.margin=3"]), ["mode.margin", "mode.max_radius"]) == []
