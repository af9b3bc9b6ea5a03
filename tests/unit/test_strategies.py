"""medgen.diffusion.strategies against MONAI 1.6's own DDPMScheduler / RFlowScheduler."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler
from monai.networks.schedulers.rectified_flow import timestep_transform
from omegaconf import DictConfig, OmegaConf
from scipy.stats import ks_2samp

from medgen.core.paths import configs_dir
from medgen.diffusion.config import load_config
from medgen.data.space import SampleSpace
from medgen.diffusion.strategies import STRATEGIES, DDPMStrategy, RFlowStrategy, build_strategy


def _shipped(name: str, **kw) -> DictConfig:
    """``configs/strategy/<name>.yaml`` (where its defaults are written; the schema has none), ``kw`` over it."""
    return OmegaConf.merge(OmegaConf.load(configs_dir() / "strategy" / f"{name}.yaml"), kw)


DDPMConfig, RFlowConfig = partial(_shipped, "ddpm"), partial(_shipped, "rflow")

T = 1000


pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _data(seed: int = 0, shape=(4, 2, 16, 16), dtype=torch.float32):
    g = _gen(seed)
    x0 = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    noise = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x0, noise


def _rflow(image_size=128, **kw) -> RFlowStrategy:
    return RFlowStrategy(RFlowConfig(**kw), image_size)


def _monai_rflow(strategy: RFlowStrategy) -> RFlowScheduler:
    c = strategy.config
    return RFlowScheduler(
        num_train_timesteps=c["num_train_timesteps"],
        use_discrete_timesteps=c["use_discrete_timesteps"],
        sample_method=c["sample_method"],
        use_timestep_transform=c["use_timestep_transform"],
        base_img_size_numel=c["base_image_size"] ** 2,
        spatial_dim=2,
    )


def _toy_denoiser(x, t):
    """Deterministic, t-dependent stand-in for a network."""
    return 0.3 * x + 0.01 * torch.sin(t.float().view(-1, 1, 1, 1) / 100.0)


# =========================================================================== DDPM
@pytest.mark.parametrize("schedule", ["cosine", "linear_beta", "scaled_linear_beta"])
def test_ddpm_add_noise_equals_monai(schedule):
    strategy = DDPMStrategy(DDPMConfig(schedule=schedule), 32)
    monai = DDPMScheduler(T, schedule=schedule, prediction_type="epsilon")
    x0, noise = _data()
    t = torch.tensor([0, 1, 500, T - 1])
    assert torch.equal(strategy.add_noise(x0, noise, t), monai.add_noise(x0, noise, t))
    assert torch.equal(strategy.target(x0, noise, t), noise)


def test_ddpm_alpha_bar_not_degraded_by_bf16():
    strategy = DDPMStrategy(DDPMConfig(), 32)
    before = strategy.alpha_bar.clone()
    x0, noise = _data()
    strategy.add_noise(x0.bfloat16(), noise.bfloat16(), torch.tensor([1, 2, 3, 4]))
    assert torch.equal(strategy.alpha_bar, before) and strategy.alpha_bar.dtype == torch.float32


def test_ddpm_sample_equals_monai_loop():
    """The ancestral sampler on the full chain is MONAI's DDPMScheduler.step loop (x0 clipped in both)."""
    strategy = DDPMStrategy(DDPMConfig(), 16)
    x_T = torch.randn(2, 1, 8, 8, generator=_gen(5), dtype=torch.float64)  # float64: 1000 steps, no rounding drift
    ours = strategy.sample(_toy_denoiser, x_T, T, sampler="ddpm", generator=_gen(7))

    monai = DDPMScheduler(T, schedule="cosine", prediction_type="epsilon")  # clip_sample=True, as ours
    monai.set_timesteps(T)
    g, x = _gen(7), x_T
    for t in monai.timesteps:
        x, _ = monai.step(_toy_denoiser(x, t.expand(2)), t, x, generator=g)
    # MONAI's step uses its float32 betas, ours 1 - alpha_bar_t / alpha_bar_{t-1} (what a respaced
    # chain needs); the two differ by float32 rounding (up to 0.07% of a beta near t = 0), which
    # adds up to ~7e-5 over 1000 ancestral steps
    torch.testing.assert_close(ours, x, rtol=1e-3, atol=2e-4)
    assert not torch.allclose(ours, strategy.sample(_toy_denoiser, x_T, T, sampler="ddpm", generator=_gen(8)))


def test_strategies_default_to_25_step_friendly_samplers_and_refuse_others():
    ddpm, rflow = DDPMStrategy(DDPMConfig(), 16), _rflow(image_size=16)
    assert ddpm.samplers[0] == "dpmpp_2m" and rflow.samplers[0] == "euler"
    x_T = torch.randn(1, 1, 4, 4, generator=_gen(0))
    with pytest.raises(ValueError, match=r"'rflow' samples with \['euler', 'heun'\], not 'dpmpp_2m'"):
        rflow.sample(_toy_denoiser, x_T, 5, sampler="dpmpp_2m")
    assert ddpm.grid(25).num_steps == 25 and torch.equal(ddpm.grid(25).t[:-1], _monai_ddpm_timesteps(25))


def _monai_ddpm_timesteps(steps: int) -> torch.Tensor:
    monai = DDPMScheduler(T, schedule="cosine")
    monai.set_timesteps(steps)
    return monai.timesteps.double()


def _gaussian_eps_oracle(alpha_bar, var0):
    """E[eps | x_t] for data x0 ~ N(0, var0): the exact epsilon-denoiser."""

    def denoise(x, t):
        ab = alpha_bar[t].view(-1, 1, 1, 1)
        return (1 - ab).sqrt() * x / (ab * var0 + 1 - ab)

    return denoise


def test_ddpm_strided_sampling_keeps_data_variance():
    # x0 ~ N(0, 0.25) with the exact denoiser: the ancestral sampler on the grid's own levels ends
    # near var 0.25; MONAI 1.6's plain loop with set_timesteps(50) steps t -> t-1 instead of to the
    # next grid point and ends at ~0.87 (why medgen's samplers step between the grid's levels).
    var0 = 0.25
    strategy = DDPMStrategy(DDPMConfig(), 16)
    strategy.CLIP_X0 = False
    denoise = _gaussian_eps_oracle(strategy.alpha_bar, var0)
    x_T = torch.randn(8000, 1, 1, 1, generator=_gen(1))
    for steps, lo in ((T, 0.24), (50, 0.2)):
        var = strategy.sample(denoise, x_T, steps, sampler="ddpm", generator=_gen(2)).var().item()
        assert lo < var < 0.26, (steps, var)
    monai = DDPMScheduler(T, schedule="cosine", clip_sample=False)
    monai.set_timesteps(50)
    x = x_T
    for t in monai.timesteps:
        x, _ = monai.step(denoise(x, t.expand(x.shape[0])), t, x, generator=_gen(int(t)))
    assert x.var().item() > 0.5


def test_ddpm_sample_clips_x0():
    strategy = DDPMStrategy(DDPMConfig(), 16)
    out = strategy.sample(lambda x, t: -3 * x, torch.randn(2, 1, 8, 8, generator=_gen(0)), 10, sampler="ddpm",
                          generator=_gen(1))
    assert out.abs().max() <= 1.0 + 1e-6


def test_ddpm_sample_rejects_bad_steps():
    strategy = DDPMStrategy(DDPMConfig(), 16)
    for steps in (0, T + 1):
        with pytest.raises(ValueError, match="num_steps"):
            strategy.sample(_toy_denoiser, torch.randn(1, 1, 4, 4), steps)


def test_ddpm_timesteps():
    strategy = DDPMStrategy(DDPMConfig(), 16)
    t = strategy.sample_timesteps(10000, _gen(0), "cpu")
    assert t.dtype == torch.int64 and t.shape == (10000,)
    assert t.min() >= 0 and t.max() <= T - 1 and t.max() > 990 and t.min() < 10
    with pytest.raises(TypeError, match="integer"):
        strategy.add_noise(*_data(), t[:4].float())


# =========================================================================== RFlow
@pytest.mark.parametrize("use_discrete", [True, False])
def test_rflow_add_noise_equals_monai(use_discrete):
    strategy = _rflow(use_discrete_timesteps=use_discrete)
    monai = _monai_rflow(strategy)
    x0, noise = _data()
    t = strategy.sample_timesteps(4, _gen(3), "cpu")
    assert torch.equal(strategy.add_noise(x0, noise, t), monai.add_noise(x0, noise, t))
    assert torch.equal(strategy.add_noise(x0, noise, torch.zeros(4)), x0)  # t = 0: clean
    torch.testing.assert_close(strategy.add_noise(x0, noise, torch.full((4,), float(T))), noise)  # t = T: noise


def test_rflow_velocity_is_x0_minus_eps_and_matches_monai_step():
    # MONAI 1.6's velocity is x0 - eps: one Euler step of RFlowScheduler.step with the true
    # velocity stays on the straight path x_t' = (1 - t'/T) x0 + t'/T eps, and its
    # pred_original_sample is x0. With eps - x0 both would be wrong.
    strategy = _rflow(image_size=64)
    monai = _monai_rflow(strategy)
    monai.set_timesteps(10, input_img_size_numel=64 * 64)
    x0, noise = _data(dtype=torch.float64)
    t, t_next = torch.full((4,), 700.0, dtype=torch.float64), torch.full((4,), 400.0, dtype=torch.float64)
    v = strategy.target(x0, noise, t)
    torch.testing.assert_close(v, x0 - noise)
    x_t = strategy.add_noise(x0, noise, t)
    x_next, x0_pred = monai.step(v, 700, x_t, 400)
    torch.testing.assert_close(x_next, strategy.add_noise(x0, noise, t_next))
    torch.testing.assert_close(x0_pred, x0)


def test_rflow_transform_equals_monai_2d():
    t = torch.tensor([0.0, 1.0, 250.0, 500.0, 999.0, 1000.0])
    for image_size, base in ((128, 64), (64, 64), (32, 64), (96, 48)):
        strategy = _rflow(image_size=image_size, base_image_size=base)
        expected = timestep_transform(t, image_size**2, base**2, num_train_timesteps=T, spatial_dim=2)
        torch.testing.assert_close(strategy.transform_timesteps(t), expected, rtol=1e-6, atol=1e-4)
    # no-op at the base size, towards noise (larger t) above it, towards clean below it
    inner = t[1:-1]
    assert torch.equal(_rflow(image_size=64).transform_timesteps(t), t)
    assert (_rflow(image_size=128).transform_timesteps(inner) > inner).all()
    assert (_rflow(image_size=32).transform_timesteps(inner) < inner).all()
    # MONAI's defaults (3D, base 32**3) would shift a 128x128 slice the wrong way
    default_3d = timestep_transform(inner, 128 * 128)
    assert (default_3d < inner).all()


@pytest.mark.parametrize("sample_method", ["uniform", "logit-normal"])
@pytest.mark.parametrize("use_discrete", [True, False])
@pytest.mark.parametrize("image_size", [128, 64])
def test_rflow_sample_timesteps_equal_monai_for_same_draws(sample_method, use_discrete, image_size):
    # MONAI draws from the global RNG; ours from the explicit generator. Same seed -> same draws,
    # so the whole pipeline (distribution, flooring, 2D shift) must agree exactly.
    strategy = _rflow(image_size=image_size, sample_method=sample_method, use_discrete_timesteps=use_discrete)
    monai = _monai_rflow(strategy)
    torch.manual_seed(11)
    expected = monai.sample_timesteps(torch.zeros(256, 1, image_size, image_size))
    ours = strategy.sample_timesteps(256, _gen(11), "cpu")
    assert ours.dtype == torch.float32
    assert torch.equal(ours, expected.float())


@pytest.mark.parametrize("shape", [(64, 64, 32), (32, 32, 16), (128, 128, 64)])
def test_rflow_timesteps_of_a_volume_equal_monai_3d(shape):
    # MONAI's own 3D setting: spatial_dim=3, the base as a voxel count, the input's voxel count
    strategy = RFlowStrategy(RFlowConfig(), shape)
    monai = RFlowScheduler(num_train_timesteps=T, use_discrete_timesteps=True, sample_method="logit-normal",
                           use_timestep_transform=True, base_img_size_numel=64**3, spatial_dim=3)
    torch.manual_seed(11)
    expected = monai.sample_timesteps(torch.zeros(256, 1, *shape))
    assert torch.equal(strategy.sample_timesteps(256, _gen(11), "cpu"), expected.float())
    assert strategy.shift == pytest.approx((shape[0] * shape[1] * shape[2] / 64**3) ** (1 / 3))
    # the state records the sample's shape, a slice's as a volume's
    assert strategy.state_dict()["shape"] == list(shape) and _rflow(64).state_dict()["shape"] == [64, 64]
    with pytest.raises(ValueError, match=r"differing: \['shape \(\[64, 64\] != \["):
        strategy.load_state_dict(_rflow(64).state_dict())


@pytest.mark.parametrize("sample_method", ["uniform", "logit-normal"])
def test_rflow_timestep_distribution_matches_monai(sample_method):
    strategy = _rflow(sample_method=sample_method)
    monai = _monai_rflow(strategy)
    torch.manual_seed(123)
    theirs = monai.sample_timesteps(torch.zeros(4000, 1, 128, 128)).float()
    ours = strategy.sample_timesteps(4000, _gen(456), "cpu")
    assert ks_2samp(ours.numpy(), theirs.numpy()).pvalue > 1e-3
    assert ours.min() >= 0 and ours.max() < T


def test_sample_timesteps_reproducible_and_leave_global_rng_alone():
    for strategy in (DDPMStrategy(DDPMConfig(), 32), _rflow()):
        a = strategy.sample_timesteps(64, _gen(1), "cpu")
        assert torch.equal(a, strategy.sample_timesteps(64, _gen(1), "cpu"))
        assert not torch.equal(a, strategy.sample_timesteps(64, _gen(2), "cpu"))
        torch.manual_seed(0)
        expected = torch.rand(3)
        torch.manual_seed(0)
        strategy.sample_timesteps(64, _gen(1), "cpu")
        assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    "key, value, changes_grid",
    [
        ("num_train_timesteps", 500, True),
        ("use_discrete_timesteps", False, True),
        ("sample_method", "uniform", False),  # training draws only
        ("use_timestep_transform", False, True),
        ("base_image_size", 32, True),
    ],
)
def test_every_rflow_key_is_honoured(key, value, changes_grid):
    base = _rflow(image_size=128)
    changed = _rflow(image_size=128, **{key: value})
    assert not torch.equal(base.sample_timesteps(512, _gen(0), "cpu"), changed.sample_timesteps(512, _gen(0), "cpu"))
    assert torch.equal(base.grid(20).t, changed.grid(20).t) != changes_grid


def test_rflow_inference_grid_agrees_with_monai_up_to_its_float16_cast():
    for kw in ({}, {"use_discrete_timesteps": False}):
        strategy = _rflow(image_size=128, **kw)
        monai = _monai_rflow(strategy)
        for steps in (10, 50, 1000):
            monai.set_timesteps(steps, input_img_size_numel=128 * 128)
            ours = strategy.grid(steps).t[:-1]
            assert (ours - monai.timesteps.double()).abs().max() < 1.0
    # without the shift the discrete grid is integral and MONAI's is exact
    strategy = _rflow(image_size=64)
    monai = _monai_rflow(strategy)
    monai.set_timesteps(50, input_img_size_numel=64 * 64)
    assert torch.equal(strategy.grid(50).t[:-1], monai.timesteps.double())


def test_monai_float16_grid_is_degraded_ours_is_not():
    strategy = _rflow(image_size=128)
    monai = _monai_rflow(strategy)
    monai.set_timesteps(1000, input_img_size_numel=128 * 128)
    assert len(torch.unique(monai.timesteps)) < 1000  # MONAI 1.6: 829 distinct of 1000
    ours = strategy.grid(1000).t[:-1]
    assert len(torch.unique(ours)) == 1000


@pytest.mark.parametrize("kw", [{}, {"use_discrete_timesteps": False}, {"use_timestep_transform": False}])
@pytest.mark.parametrize("steps", [50, 1000])
def test_sample_path_timesteps_strictly_decreasing(kw, steps):
    for strategy in (_rflow(image_size=128, **kw), DDPMStrategy(DDPMConfig(), 128)):
        seen: list[float] = []
        strategy.sample(
            lambda x, t: torch.zeros_like(x),
            torch.zeros(1, 1, 2, 2),
            steps,
            generator=_gen(0),
            callback=lambda i, t, x, x0_hat: seen.append(float(t[0])),
        )
        ts = torch.tensor(seen, dtype=torch.float64)
        assert len(ts) == steps and len(torch.unique(ts)) == steps
        assert (ts[1:] < ts[:-1]).all()


def test_rflow_sample_equals_monai_loop_on_integer_grid():
    # at image_size == base_image_size the discrete grid is integral, where MONAI's step is exact
    strategy = _rflow(image_size=16, base_image_size=16)
    monai = _monai_rflow(strategy)
    x_T = torch.randn(2, 1, 16, 16, generator=_gen(4))
    ours = strategy.sample(_toy_denoiser, x_T, 20)
    monai.set_timesteps(20, input_img_size_numel=16 * 16)
    nexts = torch.cat([monai.timesteps[1:], torch.tensor([0])])
    x = x_T
    for t, t_next in zip(monai.timesteps, nexts):
        x, _ = monai.step(_toy_denoiser(x, t.expand(2)), t, x, t_next)
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-6)


def test_rflow_sample_exact_dt_on_shifted_grid():
    # constant velocity 1: x_0 = x_T + sum(dt) = x_T + t_0 / T = x_T + 1 exactly (MONAI's int()
    # truncation of next_timestep would overshoot on this fractional grid)
    strategy = _rflow(image_size=128, use_discrete_timesteps=False)
    out = strategy.sample(lambda x, t: torch.ones_like(x), torch.zeros(1, 1, 4, 4, dtype=torch.float64), 10)
    torch.testing.assert_close(out, torch.ones(1, 1, 4, 4, dtype=torch.float64), rtol=0, atol=1e-6)


def test_rflow_sampling_keeps_data_variance():
    var0 = 0.25
    strategy = _rflow(image_size=128)

    def velocity_oracle(x, t):  # E[x0 - eps | x_t] for x0 ~ N(0, var0)
        s = (t.double() / T).view(-1, 1, 1, 1)
        var_t = (1 - s) ** 2 * var0 + s**2
        return ((1 - s) * var0 - s) / var_t * x

    x_T = torch.randn(8000, 1, 1, 1, generator=_gen(1), dtype=torch.float64)
    assert abs(strategy.sample(velocity_oracle, x_T, 1000).var().item() - var0) < 0.01


# =========================================================================== both
@pytest.mark.parametrize("strategy", [DDPMStrategy(DDPMConfig(), 32), _rflow()], ids=["ddpm", "rflow"])
def test_predict_x0_recovers_x0(strategy):
    x0, noise = _data(dtype=torch.float64)
    t = strategy.sample_timesteps(4, _gen(9), "cpu")
    t = torch.cat([t[:2], t.new_tensor([1, T - 1])])  # include both ends
    x_t = strategy.add_noise(x0, noise, t)
    x0_hat = strategy.predict_x0(strategy.target(x0, noise, t), x_t, t)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "strategy, t",
    [
        (DDPMStrategy(DDPMConfig(), 32), torch.tensor([0, 1, T - 2, T - 1])),
        (_rflow(), torch.tensor([0.0, 1e-3, T - 1e-3, float(T)])),
    ],
    ids=["ddpm", "rflow"],
)
def test_snr_and_loss_weight_at_edges(strategy, t):
    snr = strategy.snr(t)
    assert snr.shape == (4,) and (snr[:-1] >= snr[1:]).all()  # SNR falls with t
    w = strategy.loss_weight(t, 5.0)
    assert w.shape == (4,) and torch.isfinite(w).all() and (w >= 0).all()


def test_state_dict_round_trip_and_mismatch():
    a, b = _rflow(image_size=128), _rflow(image_size=128)
    b.load_state_dict(a.state_dict())
    assert a.state_dict()["strategy"]["sample_method"] == "logit-normal"
    with pytest.raises(ValueError, match="base_image_size"):
        _rflow(image_size=128, base_image_size=32).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match=r"shape \(\[128, 128\] != \[64, 64\]\)"):
        _rflow(image_size=64).load_state_dict(a.state_dict())


# =========================================================================== construction
def test_build_strategy_from_config():
    cfg = load_config(["strategy=rflow", "model.image_size=96"])
    strategy = build_strategy(cfg, SampleSpace.from_config(cfg).shape)
    assert isinstance(strategy, RFlowStrategy) and strategy.shape == (96, 96)
    assert strategy.scheduler.spatial_dim == 2 and strategy.scheduler.base_img_size_numel == 64 * 64
    assert isinstance(build_strategy(load_config(["strategy=ddpm"]), 128), DDPMStrategy)
    assert set(STRATEGIES) == {"ddpm", "rflow"}
