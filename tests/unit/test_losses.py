"""medgen.diffusion.losses: per-sample MSE, Min-SNR-gamma weights (Hang et al. 2023), diffusion_loss."""

from __future__ import annotations

import math

import pytest
import torch

from omegaconf import OmegaConf

from medgen.core.paths import configs_dir
from medgen.diffusion.losses import diffusion_loss, min_snr_weight, per_sample_mse
from medgen.diffusion.strategies import DDPMStrategy, RFlowStrategy


def _shipped(name: str, **kw):
    """``configs/strategy/<name>.yaml`` (where its defaults are written), ``kw`` over it."""
    return OmegaConf.merge(OmegaConf.load(configs_dir() / "strategy" / f"{name}.yaml"), kw)

GAMMA = 5.0
SNRS = torch.tensor([1.0, 5.0, 20.0], dtype=torch.float64)


# --------------------------------------------------------------------------- closed forms
def test_epsilon_weight_closed_form():
    # min(SNR, 5) / SNR at SNR = 1, 5, 20
    w = min_snr_weight(SNRS, GAMMA, "epsilon")
    torch.testing.assert_close(w, torch.tensor([1.0, 1.0, 0.25], dtype=torch.float64))


def test_velocity_weight_closed_form():
    # min(SNR, 5) / (1 + sqrt(SNR))^2
    expected = [1 / 4, 5 / (1 + math.sqrt(5)) ** 2, 5 / (1 + math.sqrt(20)) ** 2]
    w = min_snr_weight(SNRS, GAMMA, "velocity")
    torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float64))


def test_velocity_weight_is_min_snr_times_s_squared():
    # the derivation's intermediate form: min(SNR(s), gamma) * s^2 with SNR = ((1 - s) / s)^2
    s = torch.tensor([0.05, 0.2, 0.5, 0.8, 0.99], dtype=torch.float64)
    snr = ((1 - s) / s) ** 2
    torch.testing.assert_close(min_snr_weight(snr, GAMMA, "velocity"), snr.clamp(max=GAMMA) * s**2)


@pytest.mark.parametrize("prediction_type", ["epsilon", "velocity"])
def test_weights_finite_at_edges(prediction_type):
    snr = torch.tensor([0.0, 1e-30, 1e30, float("inf")])
    w = min_snr_weight(snr, GAMMA, prediction_type)
    assert torch.isfinite(w).all(), w
    assert (w >= 0).all()
    assert w.dtype == torch.float32


def test_edge_values():
    snr = torch.tensor([0.0, float("inf")])
    torch.testing.assert_close(min_snr_weight(snr, GAMMA, "epsilon"), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(min_snr_weight(snr, GAMMA, "velocity"), torch.tensor([0.0, 0.0]))


def test_weight_errors():
    with pytest.raises(ValueError, match="unknown prediction_type"):
        min_snr_weight(SNRS, GAMMA, "sample")
    with pytest.raises(ValueError, match="unknown prediction_type"):
        min_snr_weight(SNRS, GAMMA, "v_prediction")  # no strategy predicts v
    with pytest.raises(ValueError, match="gamma"):
        min_snr_weight(SNRS, 0.0, "epsilon")


# --------------------------------------------------------------------------- weights match x0-space Min-SNR
def _x0_space_loss(strategy, x0, noise, t, model_out):
    """min(SNR, gamma) * ||x0_hat - x0||^2 per sample (Hang et al. 2023, eq. 6)."""
    x_t = strategy.add_noise(x0, noise, t)
    x0_hat = strategy.predict_x0(model_out, x_t, t)
    return strategy.snr(t).double().clamp(max=GAMMA) * (x0_hat - x0).square().flatten(1).mean(1)


@pytest.mark.parametrize(
    "strategy, t",
    [
        (DDPMStrategy(_shipped("ddpm"), 32), torch.tensor([10, 300, 700, 990])),
        (RFlowStrategy(_shipped("rflow", use_timestep_transform=False), 32), torch.tensor([10.0, 300.0, 700.0, 990.0])),
    ],
    ids=["ddpm-epsilon", "rflow-velocity"],
)
def test_weighted_target_loss_equals_x0_space_min_snr_loss(strategy, t):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    model_out = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    target = strategy.target(x0, noise, t)
    _, weighted = diffusion_loss(model_out, target, strategy.loss_weight(t, GAMMA).double())
    torch.testing.assert_close(weighted, _x0_space_loss(strategy, x0, noise, t, model_out), rtol=1e-5, atol=1e-9)


# --------------------------------------------------------------------------- MSE / loss
def test_per_sample_mse_shape_and_value():
    pred = torch.zeros(3, 2, 4, 4)
    target = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 2, 4, 4)
    mse = per_sample_mse(pred, target)
    assert mse.shape == (3,)
    torch.testing.assert_close(mse, torch.tensor([0.0, 1.0, 4.0]))


def test_per_sample_mse_bf16_inputs_give_fp32():
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 1, 16, 16, generator=g).bfloat16()
    target = torch.randn(2, 1, 16, 16, generator=g).bfloat16()
    mse = per_sample_mse(pred, target)
    assert mse.dtype == torch.float32
    expected = (pred.float() - target.float()).square().mean(dim=(1, 2, 3))
    torch.testing.assert_close(mse, expected, rtol=0, atol=0)


def test_per_sample_mse_shape_mismatch():
    with pytest.raises(ValueError, match="must match"):
        per_sample_mse(torch.zeros(2, 1, 4, 4), torch.zeros(2, 2, 4, 4))


def test_diffusion_loss_weighting_and_grad():
    pred = torch.zeros(2, 1, 4, 4, requires_grad=True)
    target = torch.ones(2, 1, 4, 4)
    loss, per_sample = diffusion_loss(pred, target)
    torch.testing.assert_close(per_sample, torch.ones(2))
    loss_w, per_sample_w = diffusion_loss(pred, target, torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(per_sample_w, torch.tensor([0.5, 2.0]))
    assert loss.ndim == 0 and loss_w.item() == pytest.approx(1.25)
    loss_w.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()
    with pytest.raises(ValueError, match="weight has shape"):
        diffusion_loss(pred, target, torch.ones(3))
