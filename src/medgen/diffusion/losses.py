"""Diffusion training losses: per-sample MSE and Min-SNR-gamma weighting.

The loss is a small callable returning a per-sample loss; weighting happens in one place,
:func:`diffusion_loss`. The strategy supplies the weight
(``DiffusionStrategy.loss_weight(t, gamma)``), which calls :func:`min_snr_weight` with the
strategy's own SNR and prediction target.

Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
Strategy", ICCV, eq. 6-8): whatever the network predicts, the loss is weighted so that it
equals ``min(SNR(t), gamma) * ||x0_hat - x0||^2``. Converting that x0-space loss into the
space of the prediction target gives one closed form per target:

* epsilon (DDPM, Ho et al. 2020): ``x0_hat - x0 = -sqrt(1 - a) / sqrt(a) * (eps_hat - eps)``
  with ``a = alpha_bar``, so ``||x0_hat - x0||^2 = ||eps_hat - eps||^2 / SNR`` and the weight
  on the epsilon MSE is ``min(SNR, gamma) / SNR`` (Hang et al. eq. 8).
* rectified-flow velocity: see :func:`_velocity_weight` for the derivation; weight
  ``min(SNR, gamma) / (1 + sqrt(SNR))^2``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["per_sample_mse", "min_snr_weight", "diffusion_loss", "MIN_SNR_WEIGHTS"]


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per sample, always computed in fp32 (or fp64 for fp64 inputs).

    Args:
        pred: ``[B, C, H, W]`` network output (any float dtype, e.g. bf16 under autocast).
        target: ``[B, C, H, W]`` regression target.

    Returns:
        ``[B]`` mean over all non-batch dimensions, dtype at least float32.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred has shape {tuple(pred.shape)} but target has {tuple(target.shape)}; they must match")
    if pred.ndim < 2:
        raise ValueError(f"expected a batch [B, ...] with at least 2 dims, got shape {tuple(pred.shape)}")
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    err = pred.to(dtype) - target.to(dtype)
    return err.square().flatten(1).mean(dim=1)


# --------------------------------------------------------------------------- Min-SNR-gamma
def _epsilon_weight(snr: Tensor, gamma: float) -> Tensor:
    """``min(SNR, gamma) / SNR`` (Hang et al. 2023, eq. 8), written as ``min(1, gamma / SNR)``.

    That form is finite at both edges: SNR = 0 (pure noise) gives 1, SNR = inf (clean) gives 0.
    """
    return torch.clamp(gamma / snr, max=1.0)


def _velocity_weight(snr: Tensor, gamma: float) -> Tensor:
    """Min-SNR-gamma for the rectified-flow velocity target (MONAI ``RFlowScheduler``).

    Derivation. With ``s = t / T`` in [0, 1] the forward process is (Liu et al. 2022, eq. 1)

        x_t = (1 - s) x0 + s eps,     SNR(s) = ((1 - s) / s)^2,

    and the target is MONAI's velocity ``v = x0 - eps`` (the negative of dx_t/ds). The x0
    estimate implied by a velocity estimate is ``x0_hat = x_t + s v_hat`` (MONAI
    ``RFlowScheduler.step``'s ``pred_original_sample``); since ``x_t + s v = x0``,

        x0_hat - x0 = s (v_hat - v)   =>   ||x0_hat - x0||^2 = s^2 ||v_hat - v||^2.

    Min-SNR-gamma weights the x0-space loss by ``min(SNR, gamma)`` (Hang et al. 2023, eq. 6),
    so the weight on the velocity MSE is ``min(SNR, gamma) * s^2``. From
    ``sqrt(SNR) = (1 - s) / s`` we get ``s = 1 / (1 + sqrt(SNR))``, hence

        w(SNR) = min(SNR, gamma) / (1 + sqrt(SNR))^2.

    It vanishes at both ends: SNR -> 0 (s = 1, pure noise) gives
    ``SNR / 1 -> 0`` and SNR -> inf (s = 0, clean) gives ``gamma / inf -> 0``; its maximum is
    ``(sqrt(gamma) / (1 + sqrt(gamma)))^2`` (0.48 for gamma = 5) at SNR = gamma.
    """
    return torch.clamp(snr, max=gamma) / (1.0 + snr.sqrt()).square()


#: prediction target -> weight function ``(snr [B], gamma) -> [B]``
MIN_SNR_WEIGHTS: dict[str, Callable[[Tensor, float], Tensor]] = {
    "epsilon": _epsilon_weight,
    "velocity": _velocity_weight,
}


def min_snr_weight(snr: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Per-sample Min-SNR-gamma loss weight (Hang et al. 2023) for a prediction target.

    Args:
        snr: ``[B]`` signal-to-noise ratio of each sample's timestep, in [0, inf].
        gamma: the clamp value (5 in the paper); must be > 0.
        prediction_type: what the strategy's network predicts: ``"epsilon"`` (DDPM) or
            ``"velocity"`` (rectified flow, MONAI sign ``v = x0 - eps``).

    Returns:
        ``[B]`` float32 (float64 for float64 input) weights, finite for every SNR in [0, inf].
    """
    if prediction_type not in MIN_SNR_WEIGHTS:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {sorted(MIN_SNR_WEIGHTS)}")
    if not gamma > 0:
        raise ValueError(f"Min-SNR gamma must be > 0, got {gamma}")
    snr = snr.to(torch.promote_types(snr.dtype, torch.float32))
    return MIN_SNR_WEIGHTS[prediction_type](snr, float(gamma))


def diffusion_loss(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The diffusion regression loss: the one place where per-sample weights are applied.

    Args:
        pred: ``[B, C, H, W]`` network output.
        target: ``[B, C, H, W]`` the strategy's target (epsilon or velocity).
        weight: optional ``[B]`` per-sample weight (e.g. ``strategy.loss_weight(t, gamma)``).

    Returns:
        ``(loss, per_sample)``: the scalar batch mean (fp32) to back-propagate, and the
        ``[B]`` weighted per-sample losses (for logging / per-timestep statistics).
    """
    per_sample = per_sample_mse(pred, target)
    if weight is not None:
        if weight.shape != per_sample.shape:
            raise ValueError(f"weight has shape {tuple(weight.shape)}; expected [B] = {tuple(per_sample.shape)}")
        per_sample = per_sample * weight.to(device=per_sample.device, dtype=per_sample.dtype)
    return per_sample.mean(), per_sample
