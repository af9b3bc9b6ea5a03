"""Shared contract of strategies x modes: all 8 combinations train and sample with the production
network (``build_network``), on slices and on volumes (``spatial_dims`` 3, a tiny shape)."""

from __future__ import annotations

import itertools

import pytest
import torch

from medgen.data.space import SampleSpace
from medgen.diffusion.config import load_config
from medgen.diffusion.losses import diffusion_loss
from medgen.diffusion.modes import build_mode
from medgen.diffusion.strategies import build_strategy
from medgen.diffusion.utils import build_network, network_kwargs

MODEL_OVERRIDES = [
    "model.image_size=32",
    "model.channels=[32,32]",
    "model.attention_levels=[false,true]",
    "model.num_head_channels=32",
    "model.norm_num_groups=32",
    "model.num_res_blocks=1",
]
#: the sample shape per number of spatial dimensions (2D: model.image_size)
SHAPES = {2: (32, 32), 3: (16, 16, 8)}
COMBINATIONS = list(itertools.product([2, 3], ["ddpm", "rflow"], ["seg", "bravo", "dual", "inpaint"]))
BATCH = 2
GAMMA = 5.0
#: optimizer steps of the overfit check per number of spatial dimensions (a tiny volume has fewer voxels to fit)
STEPS = {2: 30, 3: 80}


pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(dims: int, strategy_name: str, mode_name: str):
    cfg = load_config([f"strategy={strategy_name}", f"mode={mode_name}", *MODEL_OVERRIDES])
    strategy, mode = build_strategy(cfg, SHAPES[dims]), build_mode(cfg)
    torch.manual_seed(0)  # network initialisation only
    model = build_network(network_kwargs(cfg.model, mode, SampleSpace(SHAPES[dims])))  # the production network, with its settings
    return cfg, strategy, mode, model


def _batch(shape: tuple[int, ...], seed: int = 0) -> dict[str, torch.Tensor]:
    """Smooth images in [0, 1], a binary disc (ball) mask and the brain around it, one [B, 1, *shape] tensor per key."""
    g = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*(torch.linspace(-1, 1, n) for n in shape), indexing="ij")
    yy, xx = axes[0], axes[1]
    centres = torch.rand(BATCH, len(shape), generator=g) * 0.8 - 0.4
    ones = [1] * len(shape)
    disc = (sum((a - centres[:, i].view(-1, *ones)) ** 2 for i, a in enumerate(axes)) < 0.1).float()[:, None]
    brain = (sum(a**2 for a in axes) < 0.8).float()[None, None]
    full = (BATCH, 1, *shape)
    batch = {"seg": disc, "brain": ((brain + disc) > 0).float().expand(full).contiguous()}
    for i, key in enumerate(("bravo", "t1_pre", "t1_gd", "flair")):
        texture = 0.1 * torch.sin((3 + i) * xx + (2 + i) * yy)[None, None]
        batch[key] = (brain * (0.5 + texture) + 0.4 * disc * (i % 2)).clamp(0, 1).expand(full).contiguous()
    return batch


@pytest.mark.parametrize("dims, strategy_name, mode_name", COMBINATIONS,
                         ids=[f"{d}d-{s}-{m}" for d, s, m in COMBINATIONS])
def test_contract(dims, strategy_name, mode_name):
    cfg, strategy, mode, model = _setup(dims, strategy_name, mode_name)
    shape = SHAPES[dims]

    # split / model_input / model shapes
    x0, cond = mode.split(_batch(shape))
    assert x0.shape == (BATCH, mode.out_channels, *shape)
    assert x0.min() >= -1 and x0.max() <= 1
    assert (cond is None) == (not mode.is_conditional)
    g = torch.Generator().manual_seed(1)
    t = strategy.sample_timesteps(BATCH, g, "cpu")
    noise = torch.randn(x0.shape, generator=g)
    x_t = strategy.add_noise(x0, noise, t)
    target = strategy.target(x0, noise, t)
    net_in = mode.model_input(x_t, cond)
    assert net_in.shape == (BATCH, mode.in_channels, *shape)
    out = model(net_in, t)
    assert out.shape == target.shape == x0.shape
    assert strategy.predict_x0(out, x_t, t).shape == x0.shape

    # finite loss, then overfit this one fixed batch (fixed t and noise)
    weight = strategy.loss_weight(t, GAMMA)
    assert weight.shape == (BATCH,) and torch.isfinite(weight).all()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(STEPS[dims]):
        loss, per_sample = diffusion_loss(model(net_in, t), target, weight)
        assert per_sample.shape == (BATCH,) and torch.isfinite(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-5:]) < 0.5 * losses[0], losses

    # sampling: right shape, finite, decodable
    model.eval()

    @torch.no_grad()
    def denoise_fn(x, t_batch):
        return model(mode.model_input(x, cond), t_batch)

    x_T = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    seen = []
    x_gen = strategy.sample(
        denoise_fn, x_T, num_steps=3, generator=torch.Generator().manual_seed(3), callback=lambda i, *_: seen.append(i)
    )
    assert seen == [0, 1, 2]
    assert x_gen.shape == x0.shape and torch.isfinite(x_gen).all()
    outputs = mode.to_outputs(x_gen)
    assert set(outputs) == set(mode.image_keys)
    assert all(v.shape == (BATCH, 1, *shape) and v.min() >= 0 and v.max() <= 1 for v in outputs.values())
