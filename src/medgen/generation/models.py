"""The two trained models of a generation run, loaded from their checkpoints alone.

A :class:`Stage` holds a network (EMA weights by default), its strategy and mode, rebuilt from
the checkpoint's own config, plus what the output records about it (path, SHA-256, voxel
spacing). :meth:`Stage.sample` draws ``x0`` for a batch with per-sample generators, so a sample
does not depend on the batch it is drawn in.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from omegaconf import OmegaConf
from torch import Tensor

from medgen.core.checkpoint import load_checkpoint
from medgen.core.constants import BRAIN_KEY, MASK_KEY
from medgen.core.paths import resolve_path
from medgen.core.precision import autocast
from medgen.data.space import SampleSpace
from medgen.diffusion.modes import MODES, TrainingMode, build_mode
from medgen.diffusion.samplers import SAMPLERS, guided, randn_like
from medgen.diffusion.strategies import DiffusionStrategy, build_strategy
from medgen.diffusion.utils import network_from_checkpoint, sampling_forward

log = logging.getLogger("medgen.generate")

#: per stage: whether a mode can serve it (from its keys), and what the stage needs, in an error's words
STAGE_ROLES: dict[str, tuple[Callable[[TrainingMode], bool], str]] = {
    "seg": (lambda mode: mode.generates_mask and not mode.cond_keys,
            f"a model that generates the mask ({MASK_KEY!r} in mode.image_keys) from noise (and a lesion size class)"),
    "image": (lambda mode: mode.mask_conditioned and set(mode.cond_keys) <= {MASK_KEY, BRAIN_KEY}
              and not set(mode.image_keys) & {MASK_KEY, BRAIN_KEY},
              f"a model that generates images given the mask (mode.cond_keys = [{MASK_KEY!r}] or "
              f"[{MASK_KEY!r}, {BRAIN_KEY!r}])"),
}


class GenerationError(ValueError):
    """Generation cannot run as asked; the message says why (and names the file or key)."""


def checkpoint_file(path: str | Path, key: str) -> Path:
    """A checkpoint file, or a run folder's ``checkpoints/best.pt`` (else ``latest.pt``)."""
    p = resolve_path(path)
    if p.is_dir():
        folder = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        for name in ("best.pt", "latest.pt"):
            if (folder / name).is_file():
                return folder / name
        raise GenerationError(f"{key}={path}: no checkpoints/best.pt or latest.pt in {p}")
    if not p.is_file():
        raise GenerationError(f"{key}={path}: {p} does not exist")
    return p


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Stage:
    """One trained model ready to sample."""

    path: Path
    sha256: str
    network: torch.nn.Module
    strategy: DiffusionStrategy
    mode: TrainingMode
    cond_dropout: float
    #: the sample space it was trained in (shape and voxel size), recorded in its checkpoint
    space: SampleSpace
    #: the image its training data derived the brain mask from (``data.brain_from``)
    brain_from: str
    device: torch.device
    precision: str
    forward: Callable[[Tensor, Tensor], Tensor]
    #: the Feret diameter (mm) of the largest lesion of each training slice (volume) of a mask model
    #: (None for an image model)
    training_sizes: tuple[float, ...] | None = None
    #: the lesion count of each of those slices (None for an image model)
    training_counts: tuple[int, ...] | None = None
    #: how its training data derived the brain mask (``data.brain_method``)
    brain_method: str = "heuristic"

    def autocast(self):
        return autocast(self.device, self.precision)

    def sample(self, cond: Tensor | None, generators: Sequence[torch.Generator], *, steps: int, sampler: str,
               guidance_scale: float = 1.0, batch_size: int | None = None, known: Tensor | None = None,
               region: Tensor | None = None) -> Tensor:
        """``x0 [B, C, *space.shape]`` in model space for the conditions ``cond [B, len(cond_keys), *space.shape]``
        (model space; None for seg), one generator per sample (on the sampling device). With ``batch_size``, the batch
        is padded to it with throw-away samples, so a compiled network always sees one shape.

        With ``known`` (``[B, C, ...]`` model space) and ``region`` (``[B, 1, ...]`` bool), only the region
        is painted: outside it, ``x_t`` is replaced at every evaluation by ``known`` noised to the level
        of that step (``alpha_t known + sigma_t z``, fresh ``z`` from the sample's generator) and the
        denoiser's ``x0_hat`` by ``known`` itself (RePaint's replacement, Lugmayr et al. 2022, eq. 8,
        without resampling), so the result equals ``known`` outside the region."""
        n = len(generators)
        shape = (n, self.mode.out_channels, *self.mode.sample_shape(self.space.shape))
        x_T = randn_like(torch.empty(shape, device=self.device), list(generators))
        if batch_size is not None and n < batch_size:
            pad = batch_size - n
            x_T = torch.cat([x_T, torch.zeros((pad, *shape[1:]), device=self.device)])
            cond, known, region = (None if v is None else torch.cat([v, v[:1].expand(pad, *v.shape[1:])])
                                   for v in (cond, known, region))
            generators = [*generators, *[torch.Generator(device=self.device).manual_seed(i) for i in range(pad)]]
        fn = self.network_fn(cond, guidance_scale)
        with torch.no_grad():
            if known is None:
                x0 = self.strategy.sample(fn, x_T, steps, sampler=sampler, generator=list(generators))
            else:
                x0 = _sample_known(self.strategy, fn, x_T, steps, sampler, list(generators), known, region)
        return x0[:n]

    def network_fn(self, cond: Tensor | None, guidance_scale: float = 1.0) -> Callable[[Tensor, Tensor], Tensor]:
        """The network's output (its strategy's target) for ``(x_t, t)`` under the condition ``cond``
        (model space; None for seg), with classifier-free guidance at ``guidance_scale``."""
        def model_fn(x: Tensor, t: Tensor, c: Tensor | None) -> Tensor:
            with self.autocast():
                return self.forward(self.mode.model_input(x, c), t).float()

        if cond is None:
            return lambda x, t: model_fn(x, t, None)
        return guided(model_fn, cond, self.mode.null_cond(cond), guidance_scale)


def _sample_known(strategy: DiffusionStrategy, fn: Callable[[Tensor, Tensor], Tensor], x_T: Tensor, steps: int,
                  sampler: str, generators: list[torch.Generator], known: Tensor, region: Tensor) -> Tensor:
    """:meth:`Stage.sample` with the region outside ``region`` replaced by ``known`` (see there)."""
    grid = strategy.grid(steps)
    levels = {t: (a, s) for t, a, s in zip(grid.t.tolist(), grid.alpha.tolist(), grid.sigma.tolist())}
    denoise = strategy.denoiser(fn)
    known, region = known.to(x_T), region.to(x_T.device).bool()

    def replaced(x_t: Tensor, t: Tensor) -> Tensor:
        alpha, sigma = levels[float(t[0])]
        noised = known * alpha + randn_like(known, generators) * sigma
        x0_hat = denoise(torch.where(region, x_t, noised), t)
        return torch.where(region, x0_hat, known)

    return SAMPLERS[sampler](replaced, x_T, grid, generator=generators)


def load_stage(path: str | Path, stage: str, key: str, *, device: torch.device, use_ema: bool = True,
               precision: str = "bf16", compile: str = "auto", compile_mode: str = "default") -> Stage:
    """Load the checkpoint for ``stage`` (``"seg"``: the masks, or ``"image"``; ``key`` names the
    config key in errors). Its mode, rebuilt from the checkpoint's config, must be able to serve
    the stage (:data:`STAGE_ROLES`). Raises :class:`GenerationError`/:class:`CheckpointError` naming the file."""
    file = checkpoint_file(path, key)
    ckpt = load_checkpoint(file, map_location="cpu")
    trained = OmegaConf.create(ckpt["config"])  # the checkpoint's training config
    mode = _stage_mode(trained, ckpt["mode"], stage, key, file)
    if use_ema and ckpt.get("ema") is None:
        log.warning("%s has no EMA weights (trained with training.use_ema=false): using the raw weights", file)
    space = _recorded_space(ckpt, key, file)
    network = network_from_checkpoint(ckpt, file, use_ema).to(device).eval().requires_grad_(False)
    return Stage(path=file, sha256=sha256(file), network=network,
                 strategy=build_strategy(trained, mode.sample_shape(space.shape)), mode=mode,
                 cond_dropout=float(trained.training.cond_dropout), space=space,
                 brain_from=str(trained.data.get("brain_from", "bravo")), device=device, precision=precision,
                 forward=sampling_forward(network, device, compile, log, compile_mode),
                 training_sizes=_lesions(ckpt, "lesion_sizes", stage, key, file),
                 training_counts=_lesions(ckpt, "lesion_counts", stage, key, file),
                 brain_method=str(trained.data.get("brain_method", "heuristic")))


def _recorded_space(ckpt: dict, key: str, file: Path) -> SampleSpace:
    """The sample space the checkpoint records, with its voxel size (samples are written with it and
    lesions measured at it); a :class:`GenerationError` naming the file for one that lacks them."""
    state = ckpt.get("space")
    if not isinstance(state, dict) or state.get("spacing") is None:
        raise GenerationError(f"{key}={file} records no sample space with its voxel spacing ('space'); "
                              "train the model again with this medgen")
    return SampleSpace.from_state(state)


def _lesions(ckpt: dict, record: str, stage: str, key: str, file: Path) -> tuple | None:
    """A mask model's per-training-slice record (``lesion_sizes``, ``lesion_counts``); None for an image
    model; a :class:`GenerationError` naming the file for a mask model's checkpoint that lacks it."""
    if stage != "seg":
        return None
    if ckpt.get(record) is None:
        raise GenerationError(f"{key}={file} records no training {record.replace('_', ' ')} ('{record}'); "
                              "train the model again with this medgen")
    return tuple(ckpt[record])


def _stage_mode(trained, name: str, stage: str, key: str, file: Path) -> TrainingMode:
    """The checkpoint's mode, if it can serve ``stage``; else a :class:`GenerationError` naming the
    key, the file, the mode and what the stage needs."""
    if name not in MODES:
        raise GenerationError(f"{key}={file} is a {name!r} checkpoint, a mode this medgen does not know "
                              f"(known: {sorted(MODES)}; a mode of your own must be registered before generating)")
    mode = build_mode(trained)
    serves, needs = STAGE_ROLES[stage]
    if not serves(mode):
        given = f"given {list(mode.cond_keys)}" if mode.cond_keys else "from noise"
        raise GenerationError(f"{key}={file} is a {name!r} checkpoint (it generates {list(mode.image_keys)} {given}); "
                              f"the {stage} stage needs {needs}")
    return mode


def check_pair(seg: Stage | None, image: Stage, guidance_scale: float) -> None:
    """The two stages fit together, and guidance is possible for the image model."""
    if seg is not None and seg.space.shape != image.space.shape:
        raise GenerationError(f"seg_checkpoint {seg.path} makes masks as {seg.space.describe()} but image_checkpoint "
                              f"{image.path} paints {image.space.describe()}; train both with one model.image_size")
    if seg is not None and BRAIN_KEY in image.mode.cond_keys and BRAIN_KEY not in seg.mode.image_keys:
        raise GenerationError(
            f"image_checkpoint {image.path} paints images given the lesion mask and the brain "
            f"(mode.cond_keys={list(image.mode.cond_keys)}), but seg_checkpoint {seg.path} generates "
            f"{list(seg.mode.image_keys)} only; train the seg model with mode.image_keys=[seg,brain] (the default), "
            "or pair it with an image model trained with mode.cond_keys=[seg]")
    if guidance_scale != 1 and image.cond_dropout == 0:
        raise GenerationError(
            f"guidance_scale={guidance_scale:g} needs a model trained with condition dropout, and {image.path} "
            "was trained with training.cond_dropout=0; use guidance_scale=1, or train with e.g. "
            "training.cond_dropout=0.1")
