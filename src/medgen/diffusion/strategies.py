"""Diffusion strategies: how noise is added to ``x0`` and removed again (docs/architecture.md).

Two implementations of one interface (adapters, not ``isinstance`` branches):

* :class:`DDPMStrategy` — DDPM (Ho et al. 2020) with epsilon prediction on a MONAI
  ``DDPMScheduler`` noise schedule (cosine by default, Nichol & Dhariwal 2021).
  Timesteps are integer indices ``t in {0, ..., T-1}``.
* :class:`RFlowStrategy` — rectified flow (Liu et al. 2022) with MONAI's ``RFlowScheduler``
  conventions: ``x_t = (1 - s) x0 + s eps`` with ``s = t / T``, velocity target
  ``v = x0 - eps``, uniform or logit-normal timesteps (Esser et al. 2024) and the
  resolution-dependent timestep shift. Timesteps are floats in ``[0, T]``.

Sampling is not done here: a strategy supplies the pieces the pure sampler functions of
:mod:`medgen.diffusion.samplers` need (:meth:`DiffusionStrategy.grid`, :meth:`~DiffusionStrategy.denoiser`,
the ``samplers`` it supports) and :meth:`DiffusionStrategy.sample` puts them together.

The trainer draws ``t`` and ``eps`` from generators it derives from ``(seed, step, rank)``, so
every random draw here goes through an explicit ``torch.Generator``.

Facts about MONAI 1.6 this module relies on / works around (each is checked in
``tests/unit/test_strategies.py``):

* ``RFlowScheduler`` defaults to 3D (``spatial_dim=3``, ``base_img_size_numel=32**3``); both are
  passed explicitly from the sample shape (2D slices: ``spatial_dim=2``, ``base_image_size**2``, so
  the shift is ``image_size / base_image_size``; volumes: ``3``, ``base_image_size**3`` and the
  voxel count).
* Its velocity is ``v = x0 - eps`` (the *negative* of ``dx_t/ds``); its Euler step is
  ``x_{t'} = x_t + (t - t') / T * v`` and ``x0_hat = x_t + t / T * v``.
* ``RFlowScheduler.set_timesteps`` casts the grid to float16 (and to int64 when discrete
  timesteps are used): with a shift > 1 and many steps the grid has duplicates (1000 steps at
  128 px, base 64: 829 distinct values). ``RFlowScheduler.step`` truncates a fractional
  ``next_timestep`` with ``int()``, so its ``dt`` is wrong on shifted (non-integer) grids.
  :meth:`RFlowStrategy.grid` builds the same grid in float64 (``samplers.rflow_grid``).
* ``DDPMScheduler.step`` always uses ``alpha_bar[t - 1]`` as the previous step, whatever
  ``set_timesteps`` chose, so with fewer steps than ``T`` its ancestral sampler jumps noise
  levels without the matching posterior (samples stay far too noisy). The samplers of
  :mod:`medgen.diffusion.samplers` step between the grid's own noise levels instead (respacing,
  Nichol & Dhariwal 2021, section 4).
* ``DDPMScheduler`` clips ``x0_hat`` to [-1, 1] in ``step`` by default (``clip_sample=True``);
  kept (see :attr:`DDPMStrategy.CLIP_X0`). ``DDPMScheduler.add_noise`` re-casts the scheduler's
  ``alphas_cumprod`` in place to the input dtype (a bf16 call would degrade it for good), so this
  module keeps its own float32 copy and never calls it.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler
from monai.networks.schedulers.rectified_flow import timestep_transform
from monai.utils import unsqueeze_right
from omegaconf import MISSING, OmegaConf
from torch import Tensor

from medgen.core.schema import at_least, choice
from medgen.diffusion.losses import min_snr_weight
from medgen.diffusion.samplers import SAMPLERS, Generators, Grid, SampleCallback, ddpm_grid, rflow_grid

__all__ = [
    "ModelFn",
    "DiffusionStrategy",
    "DDPMStrategy",
    "RFlowStrategy",
    "STRATEGIES",
    "register_strategy",
    "build_strategy",
]

#: ``model_fn(x_t [B, C, H, W], t [B] in the network's dtype) -> raw network output [B, C, H, W]``
ModelFn = Callable[[Tensor, Tensor], Tensor]


def _work_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype schedule arithmetic runs in: the inputs' promoted dtype, at least float32."""
    dtype = torch.float32
    for x in tensors:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


class DiffusionStrategy(abc.ABC):
    """How noise is added and removed; see the module docstring.

    Attributes:
        name: registry name (``strategy.name``).
        prediction_type: what the network predicts (``epsilon``, ``velocity``): the class's, not a key.
        num_train_timesteps: ``T``.
        shape: the shape of one sample, ``(S, S)`` or ``(X, Y, Z)`` (the RFlow shift depends on it).
        config: the strategy config as a plain dict (recorded by :meth:`state_dict`).
    """

    name: ClassVar[str]
    #: what the network predicts: ``epsilon`` (DDPM) or ``velocity`` (RFlow), for the Min-SNR weight
    prediction_type: ClassVar[str]
    #: the schema of ``configs/strategy/<name>.yaml``: every key, with its ``choices``/``min``
    #: (checked by ``medgen.diffusion.config.validate_config``, never here)
    Config: ClassVar[type]
    #: names in ``medgen.diffusion.samplers.SAMPLERS`` this strategy's models sample with; the first is the default
    samplers: ClassVar[tuple[str, ...]]
    #: clip ``x0_hat`` to [-1, 1] in the sampling denoiser (model space is exactly [-1, 1])
    CLIP_X0: ClassVar[bool] = False

    def __init__(self, cfg_strategy: Any, shape: int | Sequence[int]):
        """``cfg_strategy``: a validated ``strategy`` config (or a ``Config`` instance); ``shape``: the
        shape of one sample (the sample space's), an int ``S`` for a square slice ``(S, S)``."""
        self.config: dict[str, Any] = OmegaConf.to_container(OmegaConf.create(cfg_strategy), resolve=True)
        self.shape: tuple[int, ...] = (int(shape),) * 2 if isinstance(shape, int) else tuple(int(n) for n in shape)
        self.num_train_timesteps = int(self.config["num_train_timesteps"])

    # ---------------------------------------------------------------- training
    @abc.abstractmethod
    def sample_timesteps(self, batch: int, generator: torch.Generator, device: torch.device | str) -> Tensor:
        """``[B]`` training timesteps drawn only from ``generator`` (on ``generator.device``), moved to ``device``."""

    @abc.abstractmethod
    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Forward process ``q(x_t | x0)``: ``x0, noise [B, C, H, W]``, ``t [B]`` -> ``x_t [B, C, H, W]``."""

    @abc.abstractmethod
    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The regression target the network is trained on, ``[B, C, H, W]``."""

    @abc.abstractmethod
    def snr(self, t: Tensor) -> Tensor:
        """``[B]`` signal-to-noise ratio of ``x_t`` (float32, in [0, inf])."""

    @abc.abstractmethod
    def predict_x0(self, model_out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """``x0_hat [B, C, H, W]`` implied by the network output at ``(x_t, t)`` (no clipping)."""

    def loss_weight(self, t: Tensor, gamma: float) -> Tensor:
        """``[B]`` per-sample Min-SNR-gamma weight for this strategy's target (Hang et al. 2023)."""
        return min_snr_weight(self.snr(t), gamma, self.prediction_type)

    # ---------------------------------------------------------------- sampling
    @abc.abstractmethod
    def grid(self, num_steps: int) -> Grid:
        """The noise levels of a ``num_steps``-step sampling run at this strategy's settings."""

    @abc.abstractmethod
    def network_timesteps(self, t: Tensor) -> Tensor:
        """Grid timesteps ``[B]`` (float64) in the form the network was trained on."""

    def denoiser(self, model_fn: ModelFn) -> Callable[[Tensor, Tensor], Tensor]:
        """The samplers' denoiser ``(x_t, t float64) -> x0_hat`` for a network function.

        ``x0_hat`` is :meth:`predict_x0` of the network output (float32 or wider), clipped to
        [-1, 1] when :attr:`CLIP_X0` is set.
        """

        def denoise(x_t: Tensor, t: Tensor) -> Tensor:
            t_net = self.network_timesteps(t)
            x0_hat = self.predict_x0(model_fn(x_t, t_net), x_t, t_net).to(x_t.dtype)
            return x0_hat.clamp_(-1.0, 1.0) if self.CLIP_X0 else x0_hat

        return denoise

    def sample(self, model_fn: ModelFn, x_T: Tensor, num_steps: int, *, sampler: str | None = None,
               generator: Generators = None, callback: SampleCallback | None = None) -> Tensor:
        """Generate ``x0 [B, C, H, W]`` from pure noise ``x_T`` with ``sampler`` (default: this
        strategy's first, :attr:`samplers`) on :meth:`grid` ``(num_steps)``. ``generator``: one
        ``torch.Generator`` or one per sample (:func:`medgen.diffusion.samplers.randn_like`)."""
        name = sampler or self.samplers[0]
        if name not in self.samplers:
            raise ValueError(f"strategy {self.name!r} samples with {list(self.samplers)}, not {name!r}")
        return SAMPLERS[name](self.denoiser(model_fn), x_T, self.grid(num_steps), generator=generator,
                              callback=callback)

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """No learnable state: the config, so a checkpoint records which strategy made it."""
        return {"strategy": dict(self.config), "shape": list(self.shape)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Check that ``state`` (from :meth:`state_dict`) describes this very strategy."""
        mine = self.state_dict()
        if dict(state) != mine:
            theirs_cfg = dict(state.get("strategy", {}))
            diff = sorted(k for k in set(theirs_cfg) | set(self.config) if theirs_cfg.get(k) != self.config.get(k))
            if state.get("shape") != mine["shape"]:
                diff.append(f"shape ({state.get('shape')} != {mine['shape']})")
            raise ValueError(f"checkpoint strategy does not match this {self.name!r} strategy; differing: {diff}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config}, shape={list(self.shape)})"


# ============================================================================ registry
STRATEGIES: dict[str, type[DiffusionStrategy]] = {}


def register_strategy(cls: type[DiffusionStrategy]) -> type[DiffusionStrategy]:
    """Class decorator: make ``cls`` available as ``strategy=<cls.name>`` (its YAML file is
    ``configs/strategy/<name>.yaml``)."""
    STRATEGIES[cls.name] = cls
    return cls


# ============================================================================ DDPM
@register_strategy
class DDPMStrategy(DiffusionStrategy):
    """DDPM, epsilon prediction (Ho et al. 2020) on a MONAI ``DDPMScheduler`` schedule.

    ``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps`` (Ho et al. eq. 4), target ``eps``,
    ``SNR(t) = alpha_bar_t / (1 - alpha_bar_t)``.
    """

    name = "ddpm"

    @dataclass
    class Config:
        name: str = MISSING
        num_train_timesteps: int = at_least(2)
        #: MONAI ``NoiseSchedules`` names; cosine: Nichol & Dhariwal 2021, eq. 17
        schedule: str = choice("cosine", "linear_beta", "scaled_linear_beta", "sigmoid_beta")

    prediction_type = "epsilon"
    samplers = ("dpmpp_2m", "ddim", "ddpm")
    #: clip ``x0_hat`` to [-1, 1] while sampling (MONAI's default ``clip_sample=True``, as in Ho
    #: et al.'s reference sampler; DPM-Solver++'s thresholding for pixel space): this only removes
    #: impossible values early in few-step sampling. :meth:`predict_x0` itself never clips.
    CLIP_X0 = True

    def __init__(self, cfg_strategy: Any, shape: int | Sequence[int]):
        super().__init__(cfg_strategy, shape)
        self.scheduler = DDPMScheduler(num_train_timesteps=self.num_train_timesteps, schedule=self.config["schedule"],
                                       prediction_type="epsilon", clip_sample=self.CLIP_X0)
        # own float32 copy: MONAI's add_noise re-casts scheduler.alphas_cumprod in place
        self.alpha_bar: Tensor = self.scheduler.alphas_cumprod.detach().clone().to(torch.float32)
        self._alpha_bar_cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def _alpha_bar_at(self, t: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``alpha_bar_t`` ``[B]`` in ``dtype`` on ``device`` for integer timesteps ``t [B]``."""
        if t.is_floating_point() or t.is_complex():
            raise TypeError(
                f"DDPM timesteps are integer indices in [0, {self.num_train_timesteps}); got dtype {t.dtype}"
            )
        key = (torch.device(device), dtype)
        if key not in self._alpha_bar_cache:
            self._alpha_bar_cache[key] = self.alpha_bar.to(device=device, dtype=dtype)
        return self._alpha_bar_cache[key][t.to(device)]

    def sample_timesteps(self, batch: int, generator: torch.Generator, device: torch.device | str) -> Tensor:
        """``[B]`` int64, uniform on ``{0, ..., T-1}`` (Ho et al. 2020, Algorithm 1)."""
        t = torch.randint(0, self.num_train_timesteps, (batch,), generator=generator, device=generator.device)
        return t.to(device)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Ho et al. eq. 4, same arithmetic as ``DDPMScheduler.add_noise`` (dtype at least float32)."""
        dtype = _work_dtype(x0, noise)
        alpha_bar = self._alpha_bar_at(t, dtype, x0.device)
        sqrt_alpha_bar = unsqueeze_right(alpha_bar**0.5, x0.ndim)
        sqrt_one_minus_alpha_bar = unsqueeze_right((1 - alpha_bar) ** 0.5, x0.ndim)
        return sqrt_alpha_bar * x0.to(dtype) + sqrt_one_minus_alpha_bar * noise.to(dtype)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Epsilon prediction: the target is the noise itself (Ho et al. eq. 14)."""
        return noise

    def snr(self, t: Tensor) -> Tensor:
        alpha_bar = self._alpha_bar_at(t, torch.float64, t.device)
        return (alpha_bar / (1.0 - alpha_bar)).to(torch.float32)

    def predict_x0(self, model_out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """``x0_hat = (x_t - sqrt(1 - alpha_bar) eps_hat) / sqrt(alpha_bar)`` (Ho et al. eq. 15)."""
        dtype = _work_dtype(model_out, x_t)
        alpha_bar = unsqueeze_right(self._alpha_bar_at(t, dtype, x_t.device), x_t.ndim)
        return (x_t.to(dtype) - (1 - alpha_bar) ** 0.5 * model_out.to(dtype)) / alpha_bar**0.5

    def grid(self, num_steps: int) -> Grid:
        """MONAI's ``set_timesteps`` grid ``linspace(T - 1, 0, N).round()``, then the clean end."""
        return ddpm_grid(self.alpha_bar, num_steps, spacing="monai")

    def network_timesteps(self, t: Tensor) -> Tensor:
        return t.round().long()


# ============================================================================ RFlow
def _clipped_unit(u: Tensor) -> Tensor:
    """Clamp to ``[tiny, 1 - eps]`` like ``torch.distributions``' clipped sigmoid (so ``t < T``)."""
    finfo = torch.finfo(u.dtype)
    return u.clamp(min=finfo.tiny, max=1.0 - finfo.eps)


@register_strategy
class RFlowStrategy(DiffusionStrategy):
    """Rectified flow (Liu et al. 2022) with MONAI ``RFlowScheduler`` conventions.

    With ``s = t / T``: ``x_t = (1 - s) x0 + s eps`` (``s = 1`` is pure noise), target
    ``v = x0 - eps`` (MONAI's sign: sampling integrates from ``t = T`` down to 0 with
    ``x <- x + (t - t') / T * v``), ``SNR = ((1 - s) / s)^2``, ``x0_hat = x_t + s v_hat``.

    Training timesteps follow ``RFlowScheduler.sample_timesteps``: ``u ~ U(0, 1)`` or
    ``u = sigmoid(n)``, ``n ~ N(loc, scale)`` (logit-normal, Esser et al. 2024, eq. 19),
    ``t = u T``, floored to an integer if ``use_discrete_timesteps``, then shifted by
    ``timestep_transform`` if ``use_timestep_transform``. Returned as float32.
    """

    name = "rflow"
    samplers = ("euler", "heun")

    @dataclass
    class Config:
        name: str = MISSING
        num_train_timesteps: int = at_least(2)
        use_discrete_timesteps: bool = MISSING
        sample_method: str = choice("uniform", "logit-normal")
        use_timestep_transform: bool = MISSING
        #: the timestep shift is ``(N / base_image_size^d)^(1/d)`` for N pixels (voxels) in d dimensions
        base_image_size: int = at_least(1)

    prediction_type = "velocity"

    #: logit-normal parameters: MONAI's ``RFlowScheduler`` defaults, Esser et al.'s lognorm(0, 1)
    LOGIT_NORMAL_LOC: ClassVar[float] = 0.0
    LOGIT_NORMAL_SCALE: ClassVar[float] = 1.0
    def __init__(self, cfg_strategy: Any, shape: int | Sequence[int]):
        super().__init__(cfg_strategy, shape)
        c = self.config
        draws: dict[str, Callable[[int, torch.Generator], Tensor]] = {
            "uniform": self._draw_uniform,
            "logit-normal": self._draw_logit_normal,
        }
        self._draw_unit = draws[c["sample_method"]]
        self.scheduler = RFlowScheduler(
            num_train_timesteps=self.num_train_timesteps,
            use_discrete_timesteps=bool(c["use_discrete_timesteps"]),
            sample_method=c["sample_method"],
            loc=self.LOGIT_NORMAL_LOC,
            scale=self.LOGIT_NORMAL_SCALE,
            use_timestep_transform=bool(c["use_timestep_transform"]),
            base_img_size_numel=int(c["base_image_size"]) ** len(self.shape),
            spatial_dim=len(self.shape),
        )

    # ---------------------------------------------------------------- timesteps
    @staticmethod
    def _draw_uniform(batch: int, generator: torch.Generator) -> Tensor:
        return torch.rand(batch, generator=generator, device=generator.device)

    def _draw_logit_normal(self, batch: int, generator: torch.Generator) -> Tensor:
        n = torch.randn(batch, generator=generator, device=generator.device)
        return _clipped_unit(torch.sigmoid(self.LOGIT_NORMAL_LOC + self.LOGIT_NORMAL_SCALE * n))

    def transform_timesteps(self, t: Tensor) -> Tensor:
        """MONAI's resolution shift (Esser et al. 2024, eq. 23) for this sample shape.

        ``s' = r s / (1 + (r - 1) s)`` with ``s = t / T`` and ``r = (N / base_image_size^d)^(1/d)``
        for ``N`` pixels (voxels) in ``d`` spatial dimensions; for a square slice
        ``r = image_size / base_image_size``: the identity at ``image_size == base_image_size``,
        towards noise (``t' > t``) for bigger images. Same arguments as
        ``RFlowScheduler.sample_timesteps`` passes for an input of this shape.
        """
        return timestep_transform(
            t,
            input_img_size_numel=torch.tensor(math.prod(self.shape)),
            base_img_size_numel=self.scheduler.base_img_size_numel,
            num_train_timesteps=self.num_train_timesteps,
            spatial_dim=self.scheduler.spatial_dim,
        )

    def sample_timesteps(self, batch: int, generator: torch.Generator, device: torch.device | str) -> Tensor:
        """``[B]`` float32 in ``[0, T)``: ``RFlowScheduler.sample_timesteps`` with an explicit generator."""
        t = self._draw_unit(batch, generator) * self.num_train_timesteps
        if self.scheduler.use_discrete_timesteps:
            t = t.long()  # MONAI floors (truncates) to an integer timestep
        if self.scheduler.use_timestep_transform:
            t = self.transform_timesteps(t)
        return t.to(device=device, dtype=torch.float32)

    @property
    def shift(self) -> float:
        """The resolution shift ``(N / base_image_size^d)^(1/d)`` for ``N`` pixels (voxels) in ``d``
        dimensions: ``S / base_image_size`` for a square slice of side ``S`` (1 without the timestep
        transform)."""
        if not self.scheduler.use_timestep_transform:
            return 1.0
        base, dim = int(self.config["base_image_size"]), len(self.shape)
        return (math.prod(self.shape) / base**dim) ** (1.0 / dim)

    def grid(self, num_steps: int) -> Grid:
        """MONAI's ``RFlowScheduler.set_timesteps`` grid with the shift the model was trained with,
        in float64 (no float16 cast), then the clean end ``t = 0``."""
        return rflow_grid(self.num_train_timesteps, num_steps, shift=self.shift,
                          discrete=bool(self.scheduler.use_discrete_timesteps))

    def network_timesteps(self, t: Tensor) -> Tensor:
        return t.float()

    # ---------------------------------------------------------------- forward process
    def _s(self, t: Tensor, dtype: torch.dtype, ndim: int) -> Tensor:
        """``s = t / T`` as ``[B, 1, ..., 1]`` in ``dtype``."""
        return unsqueeze_right(t.to(dtype) / self.num_train_timesteps, ndim)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``x_t = (1 - s) x0 + s eps``, same arithmetic as ``RFlowScheduler.add_noise``."""
        dtype = _work_dtype(x0, noise)
        a = 1 - self._s(t.to(x0.device), dtype, x0.ndim)
        return a * x0.to(dtype) + (1 - a) * noise.to(dtype)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """MONAI's velocity ``v = x0 - eps`` (= ``-dx_t/ds``; MONAI's docstring trains on ``inputs - noise``)."""
        dtype = _work_dtype(x0, noise)
        return x0.to(dtype) - noise.to(dtype)

    def snr(self, t: Tensor) -> Tensor:
        """``((1 - s) / s)^2``: inf at ``t = 0`` (clean), 0 at ``t = T`` (pure noise)."""
        s = t.to(torch.float64) / self.num_train_timesteps
        return ((1.0 - s) / s).square().to(torch.float32)

    def predict_x0(self, model_out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """``x0_hat = x_t + s v_hat`` (``RFlowScheduler.step``'s ``pred_original_sample``)."""
        dtype = _work_dtype(model_out, x_t)
        return x_t.to(dtype) + self._s(t.to(x_t.device), dtype, x_t.ndim) * model_out.to(dtype)


def build_strategy(cfg: Any, shape: int | Sequence[int]) -> DiffusionStrategy:
    """The strategy of a validated config, ``cfg.strategy``, for samples of ``shape`` (the sample
    space's; an int for a square slice)."""
    return STRATEGIES[cfg.strategy.name](cfg.strategy, shape)
