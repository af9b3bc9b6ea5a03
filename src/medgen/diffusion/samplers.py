"""Samplers for Gaussian diffusion paths, in the style of k-diffusion (Karras et al. 2022).

Representation. Every process here is a Gaussian path ``x_t = alpha_t x0 + sigma_t eps``:

* DDPM, variance preserving (Ho et al. 2020, eq. 4): ``alpha_t = sqrt(alpha_bar[t])``,
  ``sigma_t = sqrt(1 - alpha_bar[t])`` for integer ``t in 0..T-1``; the clean end is ``t = -1``
  with ``alpha = 1, sigma = 0`` (MONAI's DDPM/DDIM steps use ``alpha_bar_prev = 1`` below ``t = 0``).
* Rectified flow (Liu et al. 2022, MONAI ``RFlowScheduler``): ``s = t / T``, ``alpha = 1 - s``,
  ``sigma = s``; the clean end is ``t = 0``.

A :class:`Grid` lists the noise levels of one run (``t``, ``alpha``, ``sigma``, most noisy first,
ending at the clean end); grid functions build it, and any grid pairs with any sampler. A
sampler is a pure function ``(denoise, x_T, grid, *, generator, callback, **options) -> x0`` of
a *denoiser* ``denoise(x_t [B, C, H, W], t [B] float64) -> x0_hat [B, C, H, W]`` (data
prediction, k-diffusion's ``D``); it derives ``eps_hat = (x_t - alpha_t x0_hat) / sigma_t``
where it needs it (``sigma_t > 0`` at every evaluated point). Converting a network output
(epsilon or velocity) to ``x0_hat`` is the caller's job. Step coefficients are Python floats
computed in float64; ``x`` stays in ``x_T``'s dtype.

Random draws go through :func:`randn_like`: ``generator`` is ``None`` (global RNG), one
``torch.Generator`` (one draw of the whole batch, like MONAI's schedulers) or one generator per
sample (sample ``i``'s noise comes only from generator ``i``, so it does not depend on the batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Denoiser",
    "SampleCallback",
    "Generators",
    "Grid",
    "ddpm_grid",
    "ddpm_grid_from_timesteps",
    "rflow_grid",
    "randn_like",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_heun",
    "SAMPLERS",
    "guided",
]

#: ``denoise(x_t [B, C, H, W], t [B] float64) -> x0_hat [B, C, H, W]``
Denoiser = Callable[[Tensor, Tensor], Tensor]
#: ``callback(i, t [B], x [B, C, H, W] after step i, x0_hat [B, C, H, W] predicted at step i)``
SampleCallback = Callable[[int, Tensor, Tensor, Tensor], None]
#: ``None`` (global RNG), one generator for the batch, or one generator per sample
Generators = torch.Generator | Sequence[torch.Generator] | None


# ============================================================================ grids
@dataclass(frozen=True, eq=False)
class Grid:
    """Noise levels of one sampling run, most noisy first, ending at the clean end.

    Attributes:
        t: ``[N+1]`` float64 timesteps in the network's units; ``t[N]`` is the clean end and is
            never evaluated.
        alpha: ``[N+1]`` float64, ``alpha[N] == 1``.
        sigma: ``[N+1]`` float64, ``sigma[N] == 0``.
    """

    t: Tensor
    alpha: Tensor
    sigma: Tensor

    def __post_init__(self) -> None:
        t, alpha, sigma = self.t, self.alpha, self.sigma
        if any(v.dtype != torch.float64 or v.ndim != 1 for v in (t, alpha, sigma)):
            raise ValueError("Grid t, alpha, sigma must be 1-D float64 tensors")
        if not len(t) == len(alpha) == len(sigma) >= 2:
            lengths = [len(v) for v in (t, alpha, sigma)]
            raise ValueError(f"Grid needs t, alpha, sigma of one length >= 2, got lengths {lengths}")
        if not bool((t[1:] < t[:-1]).all()):
            raise ValueError(f"Grid timesteps must be strictly decreasing, got {t.tolist()}")
        if alpha[-1] != 1 or sigma[-1] != 0 or not bool((sigma[:-1] > 0).all()) or not bool((alpha >= 0).all()):
            raise ValueError("Grid must have sigma > 0 and alpha >= 0 before the clean end (alpha = 1, sigma = 0)")
        # signal-to-noise ratio alpha / sigma strictly increasing (DDIM's c and DPM-Solver's h need it)
        if not bool((alpha[:-1] * sigma[1:] < alpha[1:] * sigma[:-1]).all()):
            raise ValueError("Grid alpha / sigma must be strictly increasing")

    @property
    def num_steps(self) -> int:
        """``N``, the number of steps (network evaluations of a first-order sampler)."""
        return len(self.t) - 1


def _check_num_steps(num_steps: int, T: int) -> None:
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be in [1, {T}], got {num_steps}")


def ddpm_grid_from_timesteps(alpha_bar: Tensor, timesteps: Tensor | Sequence[int]) -> Grid:
    """Variance-preserving grid at given integer timesteps, then the clean end ``t = -1``.

    Args:
        alpha_bar: ``[T]`` cumulative products ``alpha_bar_t`` of the training schedule.
        timesteps: ``[N]`` strictly decreasing integers in ``[0, T)``, the network evaluations.
    """
    alpha_bar = alpha_bar.detach().to("cpu", torch.float64)
    t = torch.as_tensor(timesteps, dtype=torch.float64).flatten()
    if len(t) == 0 or t.min() < 0 or t.max() > len(alpha_bar) - 1 or not bool((t == t.round()).all()):
        raise ValueError(f"timesteps must be integers in [0, {len(alpha_bar)}), got {t.tolist()}")
    ab = alpha_bar[t.long()]
    one, zero = t.new_ones(1), t.new_zeros(1)
    return Grid(t=torch.cat([t, -one]), alpha=torch.cat([ab.sqrt(), one]), sigma=torch.cat([(1 - ab).sqrt(), zero]))


def ddpm_grid(alpha_bar: Tensor, num_steps: int, spacing: str) -> Grid:
    """``num_steps`` DDPM timesteps from ``alpha_bar`` (``[T]``), then the clean end ``t = -1``.
    The DDPM strategy samples on the ``"monai"`` spacing; the others are there to compare with.

    Spacings (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed", Table 2):

    * ``"linspace"``: ``np.linspace(0, T-1, N+1).round()[::-1][:-1]`` from ``T-1`` down to about
      ``T/N`` (diffusers' ``DPMSolverMultistepScheduler`` default).
    * ``"monai"``: ``linspace(T-1, 0, N).round()`` in float32, MONAI's ``DDPMScheduler`` /
      ``DDIMScheduler.set_timesteps`` (= diffusers ``DDIMScheduler``'s ``"linspace"``).
    * ``"leading"``: ``arange(N) * (T // N)`` descending (diffusers ``DDIMScheduler``'s default,
      the DDIM paper's uniform skip); MONAI's ``DDIMScheduler.step`` always steps to
      ``t - T // N``, which is right on this grid and not on MONAI's own ``"monai"`` grid.

    Raises:
        ValueError: ``num_steps`` outside ``[1, T]``, unknown spacing, or a grid with repeated
            timesteps after rounding (e.g. ``"linspace"`` with ``num_steps == T``).
    """
    T = len(alpha_bar)
    _check_num_steps(num_steps, T)
    if spacing == "linspace":
        t = np.linspace(0, T - 1, num_steps + 1).round()[::-1][:-1].copy()
    elif spacing == "monai":
        t = torch.linspace(T - 1, 0, num_steps, dtype=torch.float32).round().numpy()
    elif spacing == "leading":
        t = (np.arange(num_steps) * (T // num_steps))[::-1].copy()
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose 'linspace', 'monai' or 'leading'")
    if len(np.unique(t)) != num_steps:
        raise ValueError(f"{spacing!r} spacing with {num_steps} of {T} steps repeats timesteps: {t.tolist()}")
    return ddpm_grid_from_timesteps(alpha_bar, torch.from_numpy(t.astype(np.int64)))


def rflow_grid(num_train_timesteps: int, num_steps: int, shift: float = 1.0, discrete: bool = True) -> Grid:
    """Rectified-flow grid of MONAI's ``RFlowScheduler.set_timesteps`` in float64, then ``t = 0``.

    ``t_i = (1 - i / N) T`` for ``i = 0..N-1``, rounded half-to-even if ``discrete``, then the
    resolution shift (Esser et al. 2024, eq. 23; MONAI's ``timestep_transform``)
    ``t' = T r s / (1 + (r - 1) s)`` with ``s = t / T`` and ``r = shift`` (skipped at ``shift == 1``).
    MONAI's float16 cast, which merges shifted timesteps, is left out. ``alpha = 1 - t / T``,
    ``sigma = t / T``.
    """
    T = num_train_timesteps
    _check_num_steps(num_steps, T)
    if not shift > 0:
        raise ValueError(f"shift must be positive, got {shift}")
    t = (1.0 - torch.arange(num_steps, dtype=torch.float64) / num_steps) * T
    if discrete:
        t = t.round()
    if shift != 1.0:
        s = t / T
        t = (T * (shift * s / (1 + (shift - 1) * s))).clamp_(max=T)  # r s / (1 + (r - 1) s) at s = 1 may round above 1
    t = torch.cat([t, t.new_zeros(1)])
    return Grid(t=t, alpha=1 - t / T, sigma=t / T)


# ============================================================================ samplers
def randn_like(x: Tensor, generator: Generators = None) -> Tensor:
    """Standard normal noise shaped like ``x`` (dtype and device of ``x``), drawn on the generator's device.

    One generator draws the whole batch at once; a sequence of ``B`` generators draws sample
    ``i`` (shape ``x.shape[1:]``) from generator ``i`` only.
    """
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
    if len(generator) != x.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
    return torch.stack(
        [torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype).to(x.device) for g in generator]
    )


def _levels(grid: Grid) -> tuple[list[float], list[float], list[float]]:
    return grid.t.tolist(), grid.alpha.tolist(), grid.sigma.tolist()


def _t_batch(t: float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device)


def sample_ddim(
    denoise: Denoiser,
    x_T: Tensor,
    grid: Grid,
    *,
    generator: Generators = None,
    callback: SampleCallback | None = None,
    eta: float = 0.0,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12 with eq. 16's ``sigma(eta)``) on a general Gaussian path.

    Step ``t -> s``: ``c = eta sigma_s sqrt(1 - (alpha_t sigma_s / (alpha_s sigma_t))^2)``,
    ``x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z``. For VP this is DDIM's
    ``sigma_eta``; ``eta = 0`` is deterministic, ``eta = 1`` the DDPM posterior
    ``q(x_s | x_t, x0_hat)``. No noise is drawn where ``c == 0`` (e.g. the final step).

    Args:
        denoise: ``(x_t [B, C, H, W], t [B] float64) -> x0_hat [B, C, H, W]``.
        x_T: ``[B, C, H, W]`` sample at ``grid.t[0]``.
        grid: the noise levels.
        generator: noise source (see :func:`randn_like`).
        callback: called after each step.
        eta: stochasticity, 0 (deterministic) to 1 (ancestral).

    Returns:
        ``[B, C, H, W]`` sample at the clean end, in ``x_T``'s dtype.
    """
    ts, alphas, sigmas = _levels(grid)
    x = x_T
    for i in range(grid.num_steps):
        (a_t, a_s), (s_t, s_s) = alphas[i : i + 2], sigmas[i : i + 2]
        c = eta * s_s * math.sqrt(max(0.0, 1.0 - (a_t * s_s / (a_s * s_t)) ** 2))
        k_x = math.sqrt(s_s**2 - c**2) / s_t  # x_s = k_x x_t + k_0 x0_hat + c z
        k_0 = a_s - k_x * a_t
        t = _t_batch(ts[i], x)
        x0_hat = denoise(x, t)
        x_next = x.mul(k_x).add_(x0_hat, alpha=k_0)
        if c > 0:
            x_next.add_(randn_like(x, generator), alpha=c)
        x = x_next
        if callback is not None:
            callback(i, t, x, x0_hat)
    return x


def sample_ddpm(
    denoise: Denoiser,
    x_T: Tensor,
    grid: Grid,
    *,
    generator: Generators = None,
    callback: SampleCallback | None = None,
) -> Tensor:
    """Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2) on the chain the grid respaces to.

    Each step samples the posterior ``q(x_s | x_t, x0 = x0_hat)`` (Ho et al. eq. 6-7, with
    ``beta = 1 - alpha_bar_s / alpha_bar_t``, Nichol & Dhariwal 2021 section 4), which is
    :func:`sample_ddim` with ``eta = 1``; the "fixed small" variance ``beta_tilde``. Arguments,
    shapes and return as in :func:`sample_ddim`.
    """
    return sample_ddim(denoise, x_T, grid, generator=generator, callback=callback, eta=1.0)


def sample_euler(
    denoise: Denoiser,
    x_T: Tensor,
    grid: Grid,
    *,
    generator: Generators = None,
    callback: SampleCallback | None = None,
) -> Tensor:
    """Euler's method on the probability-flow ODE, first order.

    ``x_s = x_t + (alpha_s - alpha_t) x0_hat + (sigma_s - sigma_t) eps_hat``; for rectified flow
    this is MONAI's Euler step ``x + (t - t') / T v``. Since ``x_t = alpha_t x0_hat + sigma_t eps_hat``,
    it equals ``alpha_s x0_hat + sigma_s eps_hat``, deterministic DDIM (Karras et al. 2022, Table 1:
    DDIM is Euler on ``x / alpha`` in ``sigma / alpha``), so it is :func:`sample_ddim` with
    ``eta = 0``. Arguments, shapes and return as in :func:`sample_ddim`; ``generator`` is ignored.
    """
    return sample_ddim(denoise, x_T, grid, callback=callback, eta=0.0)


def sample_heun(
    denoise: Denoiser,
    x_T: Tensor,
    grid: Grid,
    *,
    generator: Generators = None,
    callback: SampleCallback | None = None,
) -> Tensor:
    """Heun's second-order method (Karras et al. 2022, Algorithm 1 without churn) on the same ODE.

    ``x_s - x_t = int x0_hat d(alpha) + int eps_hat d(sigma)``, integrated with the trapezoidal
    rule: an Euler predictor ``x'_s = alpha_s x0_hat + sigma_s eps_hat``, then
    ``x_s = x_t + (alpha_s - alpha_t) mean(x0_hat, x0'_s) + (sigma_s - sigma_t) mean(eps_hat, eps'_s)``.
    For rectified flow (``alpha``, ``sigma`` linear in ``t``) this is exactly Karras et al.'s
    Algorithm 1, Heun in ``t``; on other paths it uses the increments of ``alpha`` and ``sigma``
    rather than their derivatives in ``t``. The last step (to ``sigma = 0``) is a plain Euler
    step, as in k-diffusion: ``2N - 1`` evaluations, ``callback`` once per step. Arguments,
    shapes and return as in :func:`sample_ddim`; ``generator`` is ignored.
    """
    ts, alphas, sigmas = _levels(grid)
    x = x_T
    for i in range(grid.num_steps):
        (a_t, a_s), (s_t, s_s) = alphas[i : i + 2], sigmas[i : i + 2]
        t = _t_batch(ts[i], x)
        x0_hat = denoise(x, t)
        x_euler = x.mul(s_s / s_t).add_(x0_hat, alpha=a_s - a_t * s_s / s_t)
        if s_s == 0:
            x = x_euler
        else:
            x0_s = denoise(x_euler, _t_batch(ts[i + 1], x))
            # x_s = (x_t + x'_s) / 2 + ((alpha_s - alpha_t) x0'_s + (sigma_s - sigma_t) eps'_s) / 2
            d_a, d_s = a_s - a_t, s_s - s_t
            x = x.mul(0.5).add_(x_euler, alpha=0.5 + 0.5 * d_s / s_s).add_(x0_s, alpha=0.5 * (d_a - d_s * a_s / s_s))
        if callback is not None:
            callback(i, t, x, x0_hat)
    return x


def _log_snr(alpha: float, sigma: float) -> float:
    """``lambda = log(alpha / sigma)``, ``-inf`` at pure noise, ``+inf`` at the clean end."""
    if alpha == 0:
        return -math.inf
    return math.inf if sigma == 0 else math.log(alpha) - math.log(sigma)


def sample_dpmpp_2m(
    denoise: Denoiser,
    x_T: Tensor,
    grid: Grid,
    *,
    generator: Generators = None,
    callback: SampleCallback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), ``lambda = log(alpha / sigma)``.

    With ``h = lambda_s - lambda_t`` and ``h' = lambda_t - lambda_prev``:
    ``x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - e^-h) (x0_hat + h / (2 h') (x0_hat - x0_hat_prev))``.
    The first step and the last step (to ``sigma = 0``, which returns ``x0_hat``) are first
    order. Matches diffusers' ``DPMSolverMultistepScheduler`` defaults (``dpmsolver++``, order 2,
    ``midpoint``, ``final_sigmas_type="zero"``, ``lower_order_final``). A step from pure noise
    (``alpha_t = 0``, ``h = inf``) is the DDIM step, and the next one is then first order too.
    Arguments, shapes and return as in :func:`sample_ddim`; ``generator`` is ignored.
    """
    ts, alphas, sigmas = _levels(grid)
    lambdas = [_log_snr(a, s) for a, s in zip(alphas, sigmas)]
    x, x0_prev = x_T, None
    for i in range(grid.num_steps):
        h = lambdas[i + 1] - lambdas[i]
        k_x, k_0 = sigmas[i + 1] / sigmas[i], -alphas[i + 1] * math.expm1(-h)
        t = _t_batch(ts[i], x)
        x0_hat = denoise(x, t)
        if x0_prev is None or sigmas[i + 1] == 0:  # first order
            x_next = x.mul(k_x).add_(x0_hat, alpha=k_0)
        else:  # r = 1 / (2 r_0) of Lu et al.; 0 after a step from pure noise (h' = inf)
            r = 0.5 * h / (lambdas[i] - lambdas[i - 1])
            x_next = x.mul(k_x).add_(x0_hat, alpha=k_0 * (1 + r)).add_(x0_prev, alpha=-k_0 * r)
        x, x0_prev = x_next, x0_hat
        if callback is not None:
            callback(i, t, x, x0_hat)
    return x


#: sampler registry: name -> ``(denoise, x_T, grid, *, generator, callback) -> x0``
SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "euler": sample_euler,
    "heun": sample_heun,
}


# ============================================================================ guidance
def guided(
    model_fn: Callable[[Tensor, Tensor, Tensor], Tensor], cond: Tensor, null_cond: Tensor, scale: float
) -> Callable[[Tensor, Tensor], Tensor]:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): ``out_u + scale (out_c - out_u)``.

    Args:
        model_fn: ``(x [B, ...], t [B], cond [B, ...]) -> out [B, ...]``, the raw network output
            (epsilon or velocity; guidance is linear, so either works).
        cond: ``[B, ...]`` conditioning; null_cond: ``[B, ...]`` its "no condition" stand-in.
        scale: guidance scale ``w + 1`` in Ho & Salimans' notation; 1 is unguided.

    Returns:
        ``fn(x, t) -> out``. At ``scale == 1`` it calls only the conditional branch (identical to
        unguided); otherwise both branches run in one batched call of size ``2B``.
    """
    if scale == 1:
        return lambda x, t: model_fn(x, t, cond)
    both_cond = torch.cat([cond, null_cond])

    def fn(x: Tensor, t: Tensor) -> Tensor:
        out_c, out_u = model_fn(torch.cat([x, x]), torch.cat([t, t]), both_cond).chunk(2)
        return out_u + scale * (out_c - out_u)

    return fn
