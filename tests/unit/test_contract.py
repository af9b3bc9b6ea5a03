"""Shared contract of strategies x modes: all 6 combinations train and sample with the production network (``build_network``)."""

from __future__ import annotations

import itertools

import pytest
import torch

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
COMBINATIONS = list(itertools.product(["ddpm", "rflow"], ["seg", "bravo", "dual"]))
BATCH = 2
GAMMA = 5.0
STEPS = 30


pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(strategy_name: str, mode_name: str):
    cfg = load_config([f"strategy={strategy_name}", f"mode={mode_name}", *MODEL_OVERRIDES])
    strategy, mode = build_strategy(cfg), build_mode(cfg)
    torch.manual_seed(0)  # network initialisation only
    model = build_network(network_kwargs(cfg.model, mode))  # the production network, with its settings
    return cfg, strategy, mode, model


def _batch(size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Smooth images in [0, 1], a binary disc mask and the brain around it, one [B, 1, H, W] tensor per key."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    centres = torch.rand(BATCH, 2, generator=g) * 0.8 - 0.4
    disc = ((yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2 < 0.1).float()[:, None]
    brain = (yy**2 + xx**2 < 0.8).float()[None, None]
    batch = {"seg": disc, "brain": ((brain + disc) > 0).float().expand(BATCH, 1, size, size).contiguous()}
    for i, key in enumerate(("bravo", "t1_pre", "t1_gd", "flair")):
        texture = 0.1 * torch.sin((3 + i) * xx + (2 + i) * yy)[None, None]
        batch[key] = (brain * (0.5 + texture) + 0.4 * disc * (i % 2)).clamp(0, 1).expand(BATCH, 1, size, size).contiguous()
    return batch


@pytest.mark.parametrize("strategy_name, mode_name", COMBINATIONS, ids=[f"{s}-{m}" for s, m in COMBINATIONS])
def test_contract(strategy_name, mode_name):
    cfg, strategy, mode, model = _setup(strategy_name, mode_name)
    size = cfg.model.image_size

    # split / model_input / model shapes
    x0, cond = mode.split(_batch(size))
    assert x0.shape == (BATCH, mode.out_channels, size, size)
    assert x0.min() >= -1 and x0.max() <= 1
    assert (cond is None) == (not mode.is_conditional)
    g = torch.Generator().manual_seed(1)
    t = strategy.sample_timesteps(BATCH, g, "cpu")
    noise = torch.randn(x0.shape, generator=g)
    x_t = strategy.add_noise(x0, noise, t)
    target = strategy.target(x0, noise, t)
    net_in = mode.model_input(x_t, cond)
    assert net_in.shape == (BATCH, mode.in_channels, size, size)
    out = model(net_in, t)
    assert out.shape == target.shape == x0.shape
    assert strategy.predict_x0(out, x_t, t).shape == x0.shape

    # finite loss, then overfit this one fixed batch (fixed t and noise)
    weight = strategy.loss_weight(t, GAMMA)
    assert weight.shape == (BATCH,) and torch.isfinite(weight).all()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(STEPS):
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
    assert all(v.shape == (BATCH, 1, size, size) and v.min() >= 0 and v.max() <= 1 for v in outputs.values())
