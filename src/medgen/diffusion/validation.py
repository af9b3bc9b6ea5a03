"""Validation during training: a loss comparable between epochs and world sizes, and sample grids.

The validation loss is the unweighted MSE of the evaluation model (EMA when enabled) on every
validation slice exactly once, each at a timestep and noise drawn from its own seed
(``sample_seed(seed, slice index)``). Under DDP the ranks take interleaved shares of the slices
and sum (loss, count) with one all-reduce, so the value is the same for any number of processes.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable

import numpy as np
import torch
import torch.distributed as torch_dist

from medgen.core.constants import LESION_COUNT_KEY, LESION_MM_KEY
from medgen.core.distributed import DistInfo
from medgen.data.slices import ItemCache
from medgen.data.space import SampleSpace
from medgen.data.transforms import ras_to_display
from medgen.diffusion.losses import per_sample_mse
from medgen.diffusion.modes import TrainingMode
from medgen.diffusion.strategies import DiffusionStrategy
from medgen.diffusion.utils import make_grid, sample_seed

#: seed streams, so validation draws never coincide with training or sampling draws
VAL_LOSS_STREAM = 1
SAMPLE_GRID_STREAM = 2


def cache_batch(cache: ItemCache, indices: np.ndarray, sizes: bool = False) -> dict[str, torch.Tensor]:
    """Slices ``indices`` (ascending) of a cache as ``{key: [B, 1, H, W] float32 in [0, 1]}`` (with
    ``sizes``, also ``lesion_mm`` and ``lesion_count`` ``[B, 1]``, as the training batches of a
    lesion-conditioned mode)."""
    arr = torch.from_numpy(np.asarray(cache.data[indices], dtype=np.float32))
    batch = {k: arr[:, c : c + 1] for c, k in enumerate(cache.keys)}
    if sizes:
        batch[LESION_MM_KEY] = torch.from_numpy(cache.largest_mm[indices].astype(np.float32))[:, None]
        batch[LESION_COUNT_KEY] = torch.from_numpy(cache.lesion_count[indices].astype(np.float32))[:, None]
    return batch


@torch.no_grad()
def validation_loss(model: torch.nn.Module, strategy: DiffusionStrategy, mode: TrainingMode, cache: ItemCache, *,
                    seed: int, batch_size: int, device: torch.device, dist: DistInfo,
                    autocast: Callable[[], AbstractContextManager]) -> float:
    """Mean unweighted MSE over every slice of ``cache`` (NaN for an empty cache); same value on every rank."""
    indices = np.arange(dist.rank, len(cache), dist.world_size)
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of per-sample MSE, count)
    was_training = model.training
    model.eval()
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        x0, cond = mode.split({k: v.to(device) for k, v in cache_batch(cache, chunk, mode.lesion_conditioned).items()})
        gens = [torch.Generator().manual_seed(sample_seed(seed, int(i), VAL_LOSS_STREAM)) for i in chunk]
        t = torch.cat([strategy.sample_timesteps(1, g, device) for g in gens])
        eps = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(device)
        x_t = strategy.add_noise(x0, eps, t)
        with autocast():
            out = model(mode.model_input(x_t, cond), t)
        per_sample = per_sample_mse(out, strategy.target(x0, eps, t))
        total += torch.stack([per_sample.sum().double(), total.new_tensor(len(chunk))])
    model.train(was_training)
    if dist.distributed:
        torch_dist.all_reduce(total)
    loss_sum, count = total.tolist()
    return loss_sum / count if count else float("nan")


def fixed_samples(cache: ItemCache, n: int, sizes: bool = False) -> dict[str, torch.Tensor] | None:
    """``n`` slices with the most lesion, one per patient where possible (the rows of the sample grids)."""
    n = min(n, len(cache))
    if n == 0:
        return None
    order = np.lexsort((np.arange(len(cache)), -cache.lesion_pixels))
    chosen: list[int] = []
    seen: set[int] = set()
    for i in order:
        if cache.patient_index[i] not in seen:
            chosen.append(int(i))
            seen.add(int(cache.patient_index[i]))
        if len(chosen) == n:
            break
    for i in order:
        if len(chosen) == n:
            break
        if int(i) not in chosen:
            chosen.append(int(i))
    return cache_batch(cache, np.sort(np.asarray(chosen)), sizes)


@torch.no_grad()
def sample_grid(model: torch.nn.Module, strategy: DiffusionStrategy, mode: TrainingMode, space: SampleSpace,
                batch: dict[str, torch.Tensor], *, num_steps: int, seed: int, device: torch.device,
                autocast: Callable[[], AbstractContextManager],
                forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> np.ndarray:
    """Samples for the conditions of ``batch``: one row per slice (a volume: its middle axial slice);
    columns = condition (:meth:`~medgen.diffusion.modes.TrainingMode.grid_columns`), real, generated
    (inpaint: of each item's window, its region drawn without a generator, so the same every time).
    ``forward``: what evaluates ``model`` (default: ``model`` itself), e.g. its compiled forward
    (:func:`medgen.diffusion.utils.sampling_forward`); the batch, and so every shape, is fixed."""
    forward = model if forward is None else forward
    was_training = model.training
    model.eval()
    x0, cond = mode.split({k: v.to(device) for k, v in batch.items()})
    g = torch.Generator(device=device).manual_seed(sample_seed(seed, 0, SAMPLE_GRID_STREAM))
    x_T = torch.randn(x0.shape, generator=g, device=device)

    def predict(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's prediction (the strategy's target, e.g. noise or velocity) for ``x_t``;
        the strategy turns it into the samplers' denoiser."""
        with autocast():
            return forward(mode.model_input(x_t, cond), t).float()

    x0_gen = strategy.sample(predict, x_T, num_steps, generator=g)
    model.train(was_training)
    real, gen = mode.to_outputs(x0), mode.to_outputs(x0_gen)
    columns = mode.grid_columns(batch, cond)  # inpaint: the window's known images, region and mask
    rows = []
    for i in range(x0.shape[0]):
        row = [tile[i, 0].float().cpu().numpy() for _, tile in columns]
        row += [real[k][i, 0].float().cpu().numpy() for k in mode.image_keys]
        row += [gen[k][i, 0].float().cpu().numpy() for k in mode.image_keys]
        rows.append([ras_to_display(space.axial(tile)) for tile in row])
    labels = [*(label for label, _ in columns), *(f"{k} real" for k in mode.image_keys),
              *(f"{k} gen" for k in mode.image_keys)]
    return make_grid(rows, labels=labels, scale=2)
