"""medgen.diffusion.samplers against MONAI, diffusers and the exact solution for Gaussian data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler as DiffusersDDIM
from diffusers import DPMSolverMultistepScheduler
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler
from monai.networks.schedulers.rectified_flow import timestep_transform

import medgen.diffusion.samplers as samplers
from medgen.diffusion.samplers import (
    SAMPLERS,
    Grid,
    ddpm_grid,
    ddpm_grid_from_timesteps,
    guided,
    randn_like,
    rflow_grid,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_heun,
)
from medgen.diffusion.strategies import RFlowStrategy

T = 1000
COSINE = DDPMScheduler(T, schedule="cosine")  # only its schedule is read
ALPHA_BAR = COSINE.alphas_cumprod.clone()  # [T] float32, as MONAI and the strategies hold it


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x_T(seed: int = 0, shape=(3, 2, 4, 4), dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=_gen(seed), dtype=dtype)


def _mix(seed: int, channels: int = 2):
    """A fixed random channel mixing ``x -> x + W x + b`` (acts on each sample alone)."""
    g = _gen(seed)
    W, b = 0.2 * torch.randn(channels, channels, generator=g), 0.1 * torch.randn(channels, 1, 1, generator=g)
    return lambda x: x + torch.einsum("ij,bjhw->bihw", W.to(x.dtype), x) + b.to(x.dtype)


def _vp_eps_model(alpha_bar: torch.Tensor, seed: int = 1):
    """A fixed random epsilon predictor, affine in x, t-dependent: ``sigma_t x + alpha_t (mix(x) + cos(t))``.

    Like a trained one, ``x0_hat = alpha_t x - sigma_t (mix(x) + cos(t))`` stays O(1) at every t.
    """
    mix = _mix(seed)

    def eps(x, t):
        ab = alpha_bar[t.long()].to(x.dtype).view(-1, 1, 1, 1)
        return (1 - ab).sqrt() * x + ab.sqrt() * (mix(x) + torch.cos(t.to(x.dtype) / 7).view(-1, 1, 1, 1))

    return eps


def _vp_denoiser(eps_model, alpha_bar: torch.Tensor):
    """``x0_hat = (x - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)``, MONAI's formula (Ho et al. eq. 15)."""

    def denoise(x, t):
        ab = alpha_bar[t.long()].to(x.dtype).view(-1, 1, 1, 1)
        return (x - (1 - ab) ** 0.5 * eps_model(x, t)) / ab**0.5

    return denoise


def _rflow_v_model(seed: int = 2):
    """A fixed random velocity predictor ``v = -0.5 mix(x) + 0.2 t / T``."""
    mix = _mix(seed)
    return lambda x, t: -0.5 * mix(x) + 0.2 * (t.to(x.dtype) / T).view(-1, 1, 1, 1)


def _rflow_denoiser(v_model):
    """``x0_hat = x + (t / T) v`` (MONAI's ``pred_original_sample``)."""
    return lambda x, t: x + (t.to(x.dtype) / T).view(-1, 1, 1, 1) * v_model(x, t)


# plain dicts with every key: the strategies' config schema is not this module's concern
DDPM_CONFIG = {"name": "ddpm", "num_train_timesteps": T, "schedule": "cosine"}
RFLOW_CONFIG = {
    "name": "rflow",
    "num_train_timesteps": T,
    "use_discrete_timesteps": True,
    "sample_method": "logit-normal",
    "use_timestep_transform": True,
    "base_image_size": 64,
}


def _close(actual, expected, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


# =========================================================================== grids
@pytest.mark.parametrize(
    "make",
    [
        lambda: ddpm_grid(ALPHA_BAR, 10, "linspace"),
        lambda: ddpm_grid(ALPHA_BAR, 7, "monai"),
        lambda: ddpm_grid(ALPHA_BAR, 3, "leading"),
        lambda: ddpm_grid(ALPHA_BAR, 1, "linspace"),
        lambda: rflow_grid(T, 10),
        lambda: rflow_grid(T, 13, shift=2.0, discrete=False),
        lambda: rflow_grid(T, 1),
    ],
)
def test_grid_shape_order_and_clean_end(make):
    grid = make()
    n = grid.num_steps
    for v in (grid.t, grid.alpha, grid.sigma):
        assert v.shape == (n + 1,) and v.dtype == torch.float64
    assert bool((grid.t[1:] < grid.t[:-1]).all())
    assert grid.alpha[-1] == 1 and grid.sigma[-1] == 0 and bool((grid.sigma[:-1] > 0).all())
    assert bool((grid.alpha[1:] > grid.alpha[:-1]).all()) and bool((grid.sigma[1:] < grid.sigma[:-1]).all())


def test_ddpm_grid_levels_and_clean_end():
    grid = ddpm_grid(ALPHA_BAR, 4, "leading")
    assert grid.t.tolist() == [750, 500, 250, 0, -1]
    ab = ALPHA_BAR.double()[[750, 500, 250, 0]]
    assert torch.equal(grid.alpha[:-1], ab.sqrt()) and torch.equal(grid.sigma[:-1], (1 - ab).sqrt())


def test_rflow_grid_levels():
    grid = rflow_grid(T, 4)
    assert grid.t.tolist() == [1000, 750, 500, 250, 0]
    assert grid.alpha.tolist() == [0, 0.25, 0.5, 0.75, 1] and grid.sigma.tolist() == [1, 0.75, 0.5, 0.25, 0]
    # a volume's shift (e.g. 16 x 16 x 8 voxels against base 64: (2048 / 64^3)^(1/3)) may round r s / (1 + (r - 1) s)
    # above 1 at s = 1; the grid still starts at pure noise
    shifted = rflow_grid(T, 3, shift=(2048 / 64**3) ** (1 / 3))
    assert shifted.t[0] == T and shifted.alpha[0] == 0 and shifted.sigma[0] == 1


@pytest.mark.parametrize("make", [lambda n: ddpm_grid(ALPHA_BAR, n, "linspace"), lambda n: rflow_grid(T, n)])
@pytest.mark.parametrize("num_steps", [0, -1, T + 1])
def test_grid_num_steps_out_of_range(make, num_steps):
    with pytest.raises(ValueError, match="num_steps"):
        make(num_steps)


def test_grid_rejects_repeats_bad_spacing_and_bad_levels():
    with pytest.raises(ValueError, match="repeats"):  # linspace(0, T-1, T+1) rounds to repeated values
        ddpm_grid(ALPHA_BAR, T, "linspace")
    with pytest.raises(ValueError, match="spacing"):
        ddpm_grid(ALPHA_BAR, 10, "karras")
    with pytest.raises(ValueError, match="shift"):
        rflow_grid(T, 10, shift=0.0)
    with pytest.raises(ValueError, match="integers"):
        ddpm_grid_from_timesteps(ALPHA_BAR, [999, 500.5])
    one = torch.ones(1, dtype=torch.float64)
    with pytest.raises(ValueError, match="decreasing"):
        Grid(t=torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64), alpha=one.repeat(3), sigma=one.repeat(3))
    with pytest.raises(ValueError, match="clean end"):  # ends at sigma > 0
        Grid(t=torch.tensor([2.0, 1.0], dtype=torch.float64), alpha=one.repeat(2) / 2, sigma=one.repeat(2) / 2)


def test_monai_spacing_equals_monai_set_timesteps():
    monai = DDPMScheduler(T, schedule="cosine")
    for n in range(1, T + 1):
        monai.set_timesteps(n)
        assert torch.equal(ddpm_grid(ALPHA_BAR, n, "monai").t[:-1].long(), monai.timesteps), n


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_linspace_and_leading_spacings_equal_diffusers():
    dpm = DPMSolverMultistepScheduler(trained_betas=COSINE.betas.numpy(), num_train_timesteps=T)
    ddim = DiffusersDDIM(trained_betas=COSINE.betas.numpy(), num_train_timesteps=T)
    for n in [1, 2, 3, 7, 10, 25, 50, 99, 250, 333, 500, 999]:
        dpm.set_timesteps(n)
        assert torch.equal(ddpm_grid(ALPHA_BAR, n, "linspace").t[:-1].long(), dpm.timesteps), n
        ddim.set_timesteps(n)
        assert torch.equal(ddpm_grid(ALPHA_BAR, n, "leading").t[:-1].long(), ddim.timesteps), n


@pytest.mark.parametrize("image_size", [64, 96, 128, 256])  # shift 1, 1.5, 2, 4 at base 64
@pytest.mark.parametrize("discrete", [True, False])
def test_rflow_grid_equals_monai_timestep_transform_in_float64(image_size, discrete):
    """The strategy's grid is MONAI's set_timesteps arithmetic (its timestep_transform, 2D) without
    the float16 cast."""
    strategy = RFlowStrategy({**RFLOW_CONFIG, "use_discrete_timesteps": discrete}, image_size)
    for n in [1, 10, 50, 1000]:
        t = (1.0 - torch.arange(n, dtype=torch.float64) / n) * T
        t = t.round() if discrete else t
        if image_size != 64:
            t = timestep_transform(t, input_img_size_numel=torch.tensor(image_size**2), base_img_size_numel=64**2,
                                   num_train_timesteps=T, spatial_dim=2)
        _close(strategy.grid(n).t[:-1], t, rtol=1e-14, atol=0)
        _close(rflow_grid(T, n, shift=image_size / 64, discrete=discrete).t[:-1], t, rtol=1e-14, atol=0)


def test_rflow_grid_equals_monai_where_float16_is_exact():
    monai = RFlowScheduler(T, use_discrete_timesteps=True, use_timestep_transform=False, spatial_dim=2)
    for n in [1, 10, 40]:
        monai.set_timesteps(n)
        assert torch.equal(rflow_grid(T, n).t[:-1], monai.timesteps.double())


# =========================================================================== MONAI
def test_ddpm_equals_monai_ddpm_step_loop_full_chain():
    """MONAI's DDPMScheduler.step always steps t -> t - 1, so compare on the full chain (N = T)."""
    monai = DDPMScheduler(50, schedule="cosine", clip_sample=False)
    alpha_bar = monai.alphas_cumprod.clone()
    eps_model = _vp_eps_model(alpha_bar)
    x_T = _x_T()
    ours = sample_ddpm(_vp_denoiser(eps_model, alpha_bar), x_T, ddpm_grid(alpha_bar, 50, "monai"), generator=_gen(7))

    monai.set_timesteps(50)
    x, g = x_T, _gen(7)
    for t in monai.timesteps.tolist():
        x, _ = monai.step(eps_model(x, torch.full((3,), t)), t, x, generator=g)
    _close(ours, x)


def _respaced_monai(timesteps: torch.Tensor) -> DDPMScheduler:
    """MONAI DDPMScheduler whose chain is respaced to ``timesteps`` (descending; Nichol & Dhariwal
    2021, section 4): alpha_bar'_k = alpha_bar[tau_k], so its t -> t - 1 step is right on it."""
    monai = DDPMScheduler(T, schedule="cosine", clip_sample=False)
    ab = ALPHA_BAR.double()[timesteps.flip(0)]
    alphas = ab / torch.cat([ab.new_ones(1), ab[:-1]])
    monai.alphas_cumprod, monai.alphas, monai.betas = ab.float(), alphas.float(), (1 - alphas).float()
    monai.timesteps = torch.arange(len(timesteps) - 1, -1, -1)
    return monai


def test_ddpm_equals_respaced_monai_chain():
    """With N < T: MONAI's step on a respaced chain (clipping off)."""
    grid = ddpm_grid(ALPHA_BAR, 20, "monai")
    timesteps = grid.t[:-1].long()
    scheduler = _respaced_monai(timesteps)
    eps_model = _vp_eps_model(ALPHA_BAR)
    x_T = _x_T(1)
    ours = sample_ddpm(_vp_denoiser(eps_model, ALPHA_BAR), x_T, grid, generator=_gen(3))

    x, g = x_T, _gen(3)
    for i, t in enumerate(timesteps.tolist()):
        x, _ = scheduler.step(eps_model(x, torch.full((3,), t)), 19 - i, x, generator=g)
    _close(ours, x)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_equals_monai_ddim_step_loop(eta):
    """MONAI's DDIMScheduler.step goes to t - T // N: right on the "leading" grid 900, 800, ..., 0."""
    monai = DDIMScheduler(T, schedule="cosine", clip_sample=False, set_alpha_to_one=True)
    monai.set_timesteps(10)
    grid = ddpm_grid(ALPHA_BAR, 10, "leading")
    monai.timesteps = grid.t[:-1].long()
    eps_model = _vp_eps_model(ALPHA_BAR)
    x_T = _x_T(2)
    ours = sample_ddim(_vp_denoiser(eps_model, ALPHA_BAR), x_T, grid, eta=eta, generator=_gen(5))

    x, g = x_T, _gen(5)
    for t in monai.timesteps.tolist():
        x, _ = monai.step(eps_model(x, torch.full((3,), t)), t, x, eta=eta, generator=g)
    _close(ours, x)


def test_euler_equals_monai_rflow_step_loop():
    monai = RFlowScheduler(T, use_discrete_timesteps=True, use_timestep_transform=False, spatial_dim=2)
    monai.set_timesteps(10)
    v_model = _rflow_v_model()
    x_T = _x_T(3)
    ours = sample_euler(_rflow_denoiser(v_model), x_T, rflow_grid(T, 10))

    x, ts = x_T, monai.timesteps.tolist()
    for t, t_next in zip(ts, ts[1:] + [0]):
        x, _ = monai.step(v_model(x, torch.full((3,), float(t))), t, x, t_next)
    _close(ours, x)


def test_euler_is_ddim_eta0():
    denoise, x_T, grid = _rflow_denoiser(_rflow_v_model()), _x_T(), rflow_grid(T, 7, shift=2.0)
    assert torch.equal(sample_euler(denoise, x_T, grid), sample_ddim(denoise, x_T, grid))


def test_heun_on_rflow_is_textbook_heun_in_t():
    """Heun's method on MONAI's flow ODE ``dx/dt = -v / T`` (Karras et al. 2022, Algorithm 1, no churn)."""
    v_model = _rflow_v_model()
    grid = rflow_grid(T, 8, shift=1.5, discrete=False)
    x_T = _x_T(4, dtype=torch.float64)
    ours = sample_heun(_rflow_denoiser(v_model), x_T, grid)

    x, ts = x_T, grid.t.tolist()
    for t, t_next in zip(ts[:-1], ts[1:]):
        d = -v_model(x, torch.full((3,), t, dtype=torch.float64)) / T
        x_euler = x + (t_next - t) * d
        if t_next == 0:
            x = x_euler
        else:
            d_next = -v_model(x_euler, torch.full((3,), t_next, dtype=torch.float64)) / T
            x = x + (t_next - t) * (d + d_next) / 2
    _close(ours, x, rtol=1e-12, atol=1e-12)


# =========================================================================== diffusers
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' own numpy 2 warning
@pytest.mark.parametrize("num_steps", [10, 25])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_dpmpp_2m_equals_diffusers(num_steps, prediction_type):
    """diffusers' DPMSolverMultistepScheduler, defaults, on MONAI's cosine betas and its own timesteps.

    diffusers works in float32 (float32 sigmas, ``sample.to(float32)``): with an epsilon model its
    ``x0 = (x - sigma eps) / alpha`` at ``t = 999`` (``alpha = 5e-5``) amplifies float32 rounding
    2e4 times (up to ~1e-3 in that x0, damped by ``alpha = 0.16`` at the next level), so the epsilon
    model is compared at 2e-4 (observed 7e-5 at N = 10); the x0 model ("sample"), which diffusers
    takes as is, pins the solver arithmetic at 1e-6.
    """
    scheduler = DPMSolverMultistepScheduler(
        trained_betas=COSINE.betas.numpy(), num_train_timesteps=T, prediction_type=prediction_type
    )
    scheduler.set_timesteps(num_steps)
    grid = ddpm_grid(ALPHA_BAR, num_steps, "linspace")
    assert torch.equal(grid.t[:-1].long(), scheduler.timesteps)
    alpha_bar = ALPHA_BAR.double()
    eps_model = _vp_eps_model(alpha_bar)
    denoise = _vp_denoiser(eps_model, alpha_bar)  # float64 model and conversion
    x_T = _x_T(5)
    ours = sample_dpmpp_2m(lambda x, t: denoise(x.double(), t).float(), x_T, grid)

    x = x_T
    for t in scheduler.timesteps:
        x64, t_batch = x.double(), torch.full((3,), int(t))
        out = eps_model(x64, t_batch) if prediction_type == "epsilon" else denoise(x64, t_batch)
        x = scheduler.step(out.float(), t, x).prev_sample
    atol = 2e-4 if prediction_type == "epsilon" else 1e-6
    _close(ours, x, rtol=0, atol=atol)


# =========================================================================== exact Gaussian
MU, SD = 0.3, 0.5  # 1-D data x0 ~ N(MU, SD^2)
NS = [80, 160, 320, 640]


def _gaussian_denoiser(family: str):
    """Exact ``E[x0 | x_t] = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha mu)``, from ``t`` alone."""
    alpha_bar = ALPHA_BAR.double()

    def denoise(x, t):
        if family == "ddpm":
            alpha, sigma = alpha_bar[t.long()].sqrt(), (1 - alpha_bar[t.long()]).sqrt()
        else:
            alpha, sigma = 1 - t / T, t / T
        alpha, sigma = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
        return MU + alpha * SD**2 / (alpha**2 * SD**2 + sigma**2) * (x - alpha * MU)

    return denoise


GRIDS = {
    "ddpm": lambda n: ddpm_grid(ALPHA_BAR, n, "linspace"),
    # continuous t: integer rounding moves the last level by up to 0.5 / T, a floor unrelated to the sampler
    "rflow": lambda n: rflow_grid(T, n, discrete=False),
    "rflow_shift2": lambda n: rflow_grid(T, n, shift=2.0, discrete=False),
}


def _output_moments(name: str, grid: Grid, monkeypatch, **options) -> tuple[float, float]:
    """Exact mean and variance of the sampler's output for ``x_T ~`` the exact marginal at ``grid.t[0]``.

    With the exact (affine) denoiser every sampler is an affine map
    ``x0 = A x_T + b + sum_k C_k z_k`` of the start and its noise draws ``z_k``. One batched run
    reads off the coefficients without Monte Carlo: sample 0 has ``x_T = 0`` and no noise (``b``),
    sample 1 has ``x_T = 1`` (``A + b``), sample ``2 + k`` has ``z_k = 1`` and every other draw 0
    (``b + C_k``), via a stand-in for :func:`randn_like`. Then ``mean = A m_T + b`` and
    ``var = A^2 v_T + sum_k C_k^2``.
    """
    draws = []

    def unit_draw(x, generator=None):
        z = torch.zeros_like(x)
        z[2 + len(draws)] = 1
        draws.append(z)
        return z

    monkeypatch.setattr(samplers, "randn_like", unit_draw)
    x_T = torch.zeros(grid.num_steps + 2, 1, 1, 1, dtype=torch.float64)
    x_T[1] = 1
    family = "ddpm" if grid.t[-1] == -1 else "rflow"
    out = SAMPLERS[name](_gaussian_denoiser(family), x_T, grid, **options).flatten()
    b, A, C = out[0], out[1] - out[0], out[2 : 2 + len(draws)] - out[0]
    alpha, sigma = grid.alpha[0].item(), grid.sigma[0].item()
    m_T, v_T = alpha * MU, alpha**2 * SD**2 + sigma**2
    return (A * m_T + b).item(), (A**2 * v_T + (C**2).sum()).item()


def _denoised_var(grid: Grid) -> float:
    """Variance of ``E[x0 | x]`` with ``x`` exact at the last evaluated level: the output of an exact
    solve down to ``grid.t[N-1]`` followed by the final (first-order) step to the clean end."""
    alpha, sigma = grid.alpha[-2].item(), grid.sigma[-2].item()
    return alpha**2 * SD**4 / (alpha**2 * SD**2 + sigma**2)


def _order(ns, errors) -> float:
    return -np.polyfit(np.log(ns), np.log(errors), 1)[0]


CASES = [  # (sampler, options, expected order)
    ("euler", {}, 1),
    ("ddim", {}, 1),
    ("ddim", {"eta": 0.5}, 1),
    ("ddpm", {}, 1),
    ("heun", {}, 2),
    ("dpmpp_2m", {}, 2),
]


@pytest.mark.parametrize("family", list(GRIDS))
@pytest.mark.parametrize("name, options, order", CASES, ids=[f"{c[0]}{c[1] or ''}" for c in CASES])
def test_gaussian_convergence_order(family, name, options, order, monkeypatch):
    """Error of the output variance -> 0 at the expected order in N (fitted over N = 80..640).

    * The mean is exact for every sampler and N: from ``x_T = alpha_0 mu`` the exact denoiser
      gives ``x0_hat = mu``, ``eps_hat = 0``, and every step maps ``alpha_t mu`` to ``alpha_s mu``.
    * Error measure. Rectified flow: against the truth ``SD^2``. DDPM cosine grid: against
      :func:`_denoised_var`, i.e. the solver's error down to the last evaluated level; the final
      step's own error is tested in :func:`test_vp_final_step_error_is_first_order` (it is first
      order for every sampler, so it would hide the second-order solvers).
    * N starts at 80 because smaller N are pre-asymptotic: over N = 10..80 the ancestral samplers
      show order 0.6-0.8 (0.88-0.98 here), and DPM-Solver++'s error changes sign near N = 15.
    * DPM-Solver++(2M) converges as ``log(N) / N^2``, not ``1 / N^2``: near pure noise
      (``alpha_k ~ k / N``) the log-SNR steps are ``h_k ~ log((k + 1) / k)``, independent of N, so
      the step-size bound of Lu et al. does not shrink; the local errors there scale like
      ``alpha_k^2 h_k^3 ~ 1 / (N^2 k)`` and sum to ``log(N) / N^2`` (on the rflow grid
      ``err = (1.44 log N - 1.16) / N^2`` to 1 % for N = 80..5120). Its order is fitted to ``err / log N``.
    """
    errors = []
    for n in NS:
        grid = GRIDS[family](n)
        mean, var = _output_moments(name, grid, monkeypatch, **options)
        assert abs(mean - MU) < 1e-12
        reference = _denoised_var(grid) if family == "ddpm" else SD**2
        errors.append(abs(var - reference) / (math.log(n) if name == "dpmpp_2m" else 1.0))
    assert _order(NS, errors) >= order - 0.3, errors


@pytest.mark.parametrize("name", ["heun", "euler"])
def test_vp_final_step_error_is_first_order(name, monkeypatch):
    """On the DDPM cosine grid the last step, from ``t_{N-1} ~ T / N`` to the clean end, returns
    ``E[x0 | x]`` and so misses ``Var(x0 | x) ~ sigma^2``; with the cosine offset ``s = 0.008``,
    ``sigma^2(t) ~ 0.039 t / T + 2.4 (t / T)^2`` near ``t = 0`` (``sqrt`` of ``t`` in ``sigma``), so this
    error is first order in 1 / N for every sampler and dominates the second-order ones by N ~ 100.
    """
    errors = []
    for n in NS:
        grid = ddpm_grid(ALPHA_BAR, n, "linspace")
        _, var = _output_moments(name, grid, monkeypatch)
        final = SD**2 - _denoised_var(grid)
        errors.append(abs(var - SD**2))
        if name != "euler":
            assert abs(var - SD**2 + final) < 0.25 * final  # the final step is most of the error
    assert 0.7 <= _order(NS, errors) <= 1.5


# =========================================================================== noise, batching, seeds
def test_randn_like_draws():
    x = torch.zeros(3, 2, 4, 4, dtype=torch.float64)
    assert torch.equal(randn_like(x, _gen(1)), torch.randn(x.shape, generator=_gen(1), dtype=torch.float64))
    per_sample = randn_like(x, [_gen(1), _gen(2), _gen(3)])
    for i in range(3):
        assert torch.equal(per_sample[i], torch.randn(2, 4, 4, generator=_gen(i + 1), dtype=torch.float64))
    assert randn_like(x).shape == x.shape
    with pytest.raises(ValueError, match="generators"):
        randn_like(x, [_gen(1)])


@pytest.mark.parametrize("name, options", [("ddpm", {}), ("ddim", {"eta": 0.5})])
def test_per_sample_generators_make_samples_batch_independent(name, options):
    denoise = _vp_denoiser(_vp_eps_model(ALPHA_BAR), ALPHA_BAR)
    grid, x_T, seeds = ddpm_grid(ALPHA_BAR, 12, "linspace"), _x_T(6, shape=(4, 2, 4, 4)), [11, 12, 13, 14]
    batch = SAMPLERS[name](denoise, x_T, grid, generator=[_gen(s) for s in seeds], **options)
    singles = torch.cat(
        [SAMPLERS[name](denoise, x_T[i : i + 1], grid, generator=[_gen(s)], **options) for i, s in enumerate(seeds)]
    )
    _close(batch, singles, rtol=1e-6, atol=1e-6)
    again = SAMPLERS[name](denoise, x_T, grid, generator=[_gen(s) for s in seeds], **options)
    assert torch.equal(batch, again)
    other = SAMPLERS[name](denoise, x_T, grid, generator=[_gen(s + 10) for s in seeds], **options)
    assert not torch.allclose(batch, other)


@pytest.mark.parametrize("name", ["euler", "ddim", "heun", "dpmpp_2m"])
def test_deterministic_samplers_ignore_generator(name):
    denoise, x_T, grid = _rflow_denoiser(_rflow_v_model()), _x_T(), rflow_grid(T, 6, shift=2.0)
    assert torch.equal(SAMPLERS[name](denoise, x_T, grid), SAMPLERS[name](denoise, x_T, grid, generator=_gen(0)))


def test_no_noise_drawn_where_c_is_zero(monkeypatch):
    calls = []
    monkeypatch.setattr(samplers, "randn_like", lambda x, g=None: calls.append(1) or torch.zeros_like(x))
    denoise, x_T, grid = _rflow_denoiser(_rflow_v_model()), _x_T(), rflow_grid(T, 6)
    sample_ddpm(denoise, x_T, grid)
    assert len(calls) == 5  # the final step (to sigma = 0) has c = 0
    sample_ddim(denoise, x_T, grid, eta=0.0)
    assert len(calls) == 5


# =========================================================================== interface
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_callback_dtype_and_inputs(name):
    seen, evaluated = [], []
    v_model = _rflow_v_model()

    def denoise(x, t):
        evaluated.append(t[0].item())
        assert t.dtype == torch.float64 and t.shape == (3,)
        return _rflow_denoiser(v_model)(x.double(), t)  # a float64 denoiser: x stays float32

    grid, x_T = rflow_grid(T, 5, shift=2.0), _x_T()
    x_T_before = x_T.clone()
    out = SAMPLERS[name](denoise, x_T, grid, callback=lambda i, t, x, x0: seen.append((i, t[0].item(), x, x0)))
    assert out.dtype == torch.float32 and out.shape == x_T.shape and torch.equal(x_T, x_T_before)
    assert [s[0] for s in seen] == list(range(5)) and [s[1] for s in seen] == grid.t[:-1].tolist()
    assert seen[-1][2] is out or torch.equal(seen[-1][2], out)
    assert len(evaluated) == (9 if name == "heun" else 5) and 0.0 not in evaluated
    assert set(SAMPLERS) == {"ddpm", "ddim", "dpmpp_2m", "euler", "heun"}


def test_last_step_returns_x0_hat():
    denoise, x_T, grid = _rflow_denoiser(_rflow_v_model()), _x_T(), rflow_grid(T, 4)
    for name in ("dpmpp_2m", "heun", "ddpm"):
        last = []
        out = SAMPLERS[name](denoise, x_T, grid, callback=lambda i, t, x, x0: last.append(x0))
        assert torch.equal(out, last[-1])


# =========================================================================== guidance
def _cond_model():
    calls = []

    def model_fn(x, t, cond):
        calls.append(x.shape[0])
        return 0.5 * x + cond.view(-1, 1, 1, 1) * (1 + t.to(x.dtype).view(-1, 1, 1, 1) / T)

    return model_fn, calls


def test_guidance_scale_one_is_unguided():
    model_fn, calls = _cond_model()
    cond, null = torch.tensor([1.0, -2.0, 0.5]), torch.zeros(3)
    grid, x_T = rflow_grid(T, 6), _x_T()
    guided_out = sample_euler(_rflow_denoiser(guided(model_fn, cond, null, 1.0)), x_T, grid)
    assert calls == [3] * 6
    unguided = sample_euler(_rflow_denoiser(lambda x, t: model_fn(x, t, cond)), x_T, grid)
    assert torch.equal(guided_out, unguided)


def test_guidance_scale_two_mixes_branches_in_one_batched_call():
    model_fn, calls = _cond_model()
    cond, null = torch.tensor([1.0, -2.0, 0.5]), torch.zeros(3)
    fn = guided(model_fn, cond, null, 2.0)
    x, t = _x_T(), torch.tensor([100.0, 500.0, 900.0], dtype=torch.float64)
    out = fn(x, t)
    assert calls == [6]
    out_c, out_u = model_fn(x, t, cond), model_fn(x, t, null)
    _close(out, out_u + 2.0 * (out_c - out_u), rtol=1e-6, atol=1e-6)

    calls.clear()
    sample_dpmpp_2m(_rflow_denoiser(fn), x, rflow_grid(T, 7))
    assert calls == [6] * 7
