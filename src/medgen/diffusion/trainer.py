"""``DiffusionTrainer``: one training loop for every strategy x mode (docs/architecture.md, "Training").

:meth:`DiffusionTrainer.train` runs the configured training (epochs, validation, checkpoints, stop
signals); :meth:`DiffusionTrainer.fit` runs a number of steps for callers that drive the trainer
themselves (the LR finder, the demo's timing probe). :meth:`DiffusionTrainer.train_step` is the
whole step; the loop around it calls out to the
:class:`~medgen.diffusion.run.logger.RunLogger` (TensorBoard, ``metrics.jsonl``), the
:class:`~medgen.diffusion.run.checkpointer.Checkpointer` (which files, when), the validation
functions (:mod:`medgen.diffusion.validation`) and an LR schedule (a plain function of the
step, :mod:`medgen.diffusion.lr_schedule`). The randomness of step ``k`` (timesteps, noise,
condition dropout) comes from a generator seeded with (seed, k, rank), and the data order is a
function of (seed, epoch): so a run resumed from a checkpoint draws exactly what an
uninterrupted run would have drawn.

The trainer changes no process-wide state: the network is initialised from ``seed`` on a forked
RNG, and backend flags (TF32) are the entry point's (:func:`medgen.core.precision.configure_backends`).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from medgen.core.checkpoint import CheckpointError, load_checkpoint
from medgen.core.distributed import DistInfo, all_ranks, any_rank, barrier
from medgen.core.precision import autocast, effective_precision
from medgen.core.signals import StopRequest, stop_signals
from medgen.data.loading import DataBundle, build_data
from medgen.data.pictures import save_png
from medgen.data.space import SampleSpace
from medgen.data.transforms import from_model_space
from medgen.diffusion import validation
from medgen.diffusion.config import MAX_WARMUP_FRACTION
from medgen.diffusion.losses import diffusion_loss
from medgen.diffusion.lr_schedule import LRSchedule, capped_warmup, warmup_cosine
from medgen.diffusion.modes import build_mode
from medgen.diffusion.perceptual import perceptual_loss_for
from medgen.diffusion.run.checkpointer import Checkpointer, check_resumable, match_state_layout
from medgen.diffusion.run.logger import RunLogger, SkipTracker, TrainingStopped
from medgen.diffusion.strategies import build_strategy
from medgen.diffusion.utils import (build_network, compile_enabled, compile_module, network_kwargs, sampling_forward,
                                    step_seed, uses_cuda_graphs)

__all__ = ["DiffusionTrainer", "StepResult", "TrainingStopped"]

log = logging.getLogger("medgen.train")
PROGRESS_LINE_SECONDS = 60.0  # without a terminal, a progress line in the log at most this often


@dataclass
class StepResult:
    """What one optimizer step gives back, on the device (reading it makes the host wait)."""

    loss: torch.Tensor  # scalar total loss (device)
    mse: torch.Tensor  # scalar weighted diffusion loss (device)
    perceptual: torch.Tensor  # scalar (device)
    grad_norm: torch.Tensor  # scalar (device)
    skipped: torch.Tensor  # scalar bool (device): the update was skipped (non-finite on some rank)


class DiffusionTrainer:
    """Trains a MONAI ``DiffusionModelUNet`` for the configured strategy and mode.

    Args:
        cfg: a validated config (:func:`medgen.diffusion.config.load_config`).
        run_dir: the run folder.
        dist: process group and device (default: one process on the available accelerator).
        data: the loaders (default: built from ``cfg``).
        lr_schedule: ``step -> lr`` (default: warm-up then cosine over ``training.epochs``).
        progress: show progress bars (main rank only).
    """

    def __init__(self, cfg: DictConfig, run_dir: str | Path, dist: DistInfo | None = None,
                 data: DataBundle | None = None, lr_schedule: LRSchedule | None = None, progress: bool = True):
        self.cfg = cfg
        self.train_cfg = tc = cfg.training
        self.run_dir = Path(run_dir)
        self.dist = dist or DistInfo()
        self.device = self.dist.device
        self.progress = progress and self.dist.is_main
        # a terminal gets a progress bar; a log file (a SLURM job's, say) gets a line a minute instead
        self._log_lines, self._last_line = self.progress and not sys.stderr.isatty(), time.monotonic()

        self.mode, self.space = build_mode(cfg), SampleSpace.from_config(cfg)  # the data gives its spacing
        self.strategy = build_strategy(cfg, self.mode.sample_shape(self.space.shape))  # inpaint: its window
        self.network_kwargs = network_kwargs(cfg.model, self.mode, self.space)
        self.memory_format = self.space.memory_format  # channels_last(_3d), when training.channels_last
        # initial weights from the seed alone (the same on every rank, whatever the process drew
        # before), on a forked CPU RNG: the process's global RNG is left as it was
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(int(cfg.seed))
            self.model = build_network(self.network_kwargs, tc.gradient_checkpointing).to(self.device)
        if tc.channels_last:  # once, before the EMA copy and the optimizer state take its layout
            self.model = self.model.to(memory_format=self.memory_format)
        self.ema = self._build_ema()
        # fused (CUDA and CPU): it takes a device-side found_inf flag and skips its update for it, so a
        # non-finite step is skipped without the host waiting for the GPU
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=tc.learning_rate,
                                           weight_decay=tc.weight_decay, fused=True)
        # before any step: a missing-weights error must reach the user now, not after hours
        self.perceptual = perceptual_loss_for(tc, self.mode, self.space, self.device)

        self.data = data or build_data(cfg, self.dist.rank, self.dist.world_size, progress=self.progress,
                                       barrier=lambda: barrier(self.dist), selection=self.mode.slice_selection,
                                       sizes=self.mode.lesion_conditioned)
        self.steps_per_epoch = len(self.data.train)
        self.total_steps = tc.epochs * self.steps_per_epoch
        self.warmup_steps = capped_warmup(tc.warmup_steps, self.total_steps, MAX_WARMUP_FRACTION)
        if self.warmup_steps < tc.warmup_steps and self.dist.is_main:
            log.info("warm-up capped at %d steps (%.0f%% of this run's %d steps) instead of training.warmup_steps=%d",
                     self.warmup_steps, 100 * MAX_WARMUP_FRACTION, self.total_steps, tc.warmup_steps)
        self.lr_schedule = lr_schedule or warmup_cosine(tc.learning_rate, self.warmup_steps, self.total_steps)

        self.forward_model: torch.nn.Module = self.model
        if self.dist.distributed:
            self.forward_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self._eager_forward = self.forward_model
        self._compile_pending = compile_enabled(tc.compile, self.device)  # compiled at the first step
        if self._compile_pending:
            self.forward_model = compile_module(self.forward_model, tc.compile_mode)
        self._cuda_graphs = self._compile_pending and uses_cuda_graphs(tc.compile_mode, self.device)
        # the sample grids' network function (EMA or raw network), compiled once per run under the same
        # training.compile setting; it reads the weights as they are at each grid
        self._sample_forward = sampling_forward(self._eval_model(), self.device, tc.compile, log, tc.compile_mode)

        self.logger = RunLogger(self.run_dir, self.device, self.strategy.num_train_timesteps, enabled=self.dist.is_main)
        self.checkpointer = Checkpointer(self.run_dir, tc.checkpoint_keep, enabled=self.dist.is_main)
        self.step = 0
        self.epoch = 0
        self.best_val_loss = math.inf
        self.skips = SkipTracker(self.device)  # non-finite steps, counted on the device
        self._stop = StopRequest()  # SIGTERM/SIGUSR1 while train() runs

    # ------------------------------------------------------------------ building blocks
    def _build_ema(self):
        if not self.train_cfg.use_ema:
            return None
        from ema_pytorch import EMA

        return EMA(self.model, beta=self.train_cfg.ema_decay, update_after_step=self.train_cfg.ema_update_after_step,
                   update_every=self.train_cfg.ema_update_every, include_online_model=False)

    def autocast(self):
        return autocast(self.device, self.train_cfg.precision)

    def generator(self, step: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(step_seed(self.cfg.seed, step, self.dist.rank))

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _position_sampler(self) -> int:
        """Point the training sampler at ``self.step``: epoch ``self.epoch`` in its (seed, epoch)
        order, minus the batches already done. Returns that number of batches."""
        done = self.step - self.epoch * self.steps_per_epoch
        self.data.train.sampler.set_epoch(self.epoch, skip=done * self.data.train.batch_size)
        return done

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Training batches from the current position on, epoch after epoch (advancing ``self.epoch``)."""
        while True:
            self._position_sampler()
            yield from self.data.train
            self.epoch += 1

    # ------------------------------------------------------------------ the step
    def train_step(self, batch: dict[str, torch.Tensor]) -> StepResult:
        """One optimizer step on ``batch`` (``{key: [B, 1, H, W]}`` in [0, 1]) at ``self.step``, which
        it does not advance; skipped on every rank if the loss or gradient is not finite on any rank.
        :meth:`fit` and :meth:`train` run steps: they also position the data, count the steps and
        fall back to eager when the compiled first step fails."""
        g = self.generator(self.step)
        x0, cond = self.mode.split(self._to_device(batch), g)  # [B, C, H, W] in [-1, 1] (inpaint: draws regions)
        if cond is not None and self.train_cfg.cond_dropout > 0:
            cond = self.mode.drop_cond(cond, self.train_cfg.cond_dropout, g)  # classifier-free guidance training
        t = self.strategy.sample_timesteps(x0.shape[0], g, self.device)
        eps = torch.randn(x0.shape, generator=g, device=self.device)
        x_t = self.strategy.add_noise(x0, eps, t)
        x_in = self.mode.model_input(x_t, cond)
        if self.train_cfg.channels_last:
            x_in = x_in.contiguous(memory_format=self.memory_format)
        if self._cuda_graphs and self.forward_model is not self._eager_forward:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are free again
        with self.autocast():
            out = self.forward_model(x_in, t)
        weight = self.strategy.loss_weight(t, self.train_cfg.min_snr_gamma) if self.train_cfg.use_min_snr else None
        mse, per_sample = diffusion_loss(out, self.strategy.target(x0, eps, t), weight)
        perceptual = self._perceptual(out, x_t, t, x0, g)
        loss = mse + self.train_cfg.perceptual_weight * perceptual

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train_cfg.gradient_clip_norm)
        # decided on the device, agreed by every rank, never read by the host here
        ok = all_ranks(torch.isfinite(grad_norm) & torch.isfinite(loss), self.dist)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_schedule(self.step)
        self.optimizer.found_inf = (~ok).float()  # the fused AdamW skips its whole update where 1
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update()  # on a skipped step it moves towards the unchanged weights
        self.logger.record_bins(t, per_sample.detach(), ok)
        self.skips.record(ok, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss.detach(), mse.detach(), perceptual.detach(), grad_norm.detach(), ~ok)

    def _first_compiled_step(self, batch: dict[str, torch.Tensor]) -> StepResult:
        """The first step of a compiled run, where torch.compile does its work: timed, and on a
        compiler error the run goes on eagerly (the step is redone from the same state)."""
        self._compile_pending = False
        t0 = time.perf_counter()
        try:
            result = self.train_step(batch)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: eager still trains
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            log.warning("torch.compile failed (%s: %s); training eagerly", type(exc).__name__, first[:300])
            self.forward_model = self._eager_forward
            self.optimizer.zero_grad(set_to_none=True)
            return self.train_step(batch)
        if self.dist.is_main:
            log.info("compiled the training step in %.0f s (training.compile=%s, compile_mode=%s)",
                     time.perf_counter() - t0, self.train_cfg.compile, self.train_cfg.compile_mode)
        return result

    def _advance(self, batch: dict[str, torch.Tensor]) -> StepResult:
        """Step ``self.step`` on ``batch`` (the first through the compile fallback), then count it."""
        result = self._first_compiled_step(batch) if self._compile_pending else self.train_step(batch)
        self.step += 1
        return result

    def _perceptual(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, g) -> torch.Tensor:
        if self.perceptual is None:
            return torch.zeros((), device=self.device)
        x0_hat = self.strategy.predict_x0(out.float(), x_t, t)
        with self.autocast():  # volumes: slices drawn from the step's generator g
            return self.perceptual(from_model_space(x0_hat), from_model_space(x0), g).float()

    # ------------------------------------------------------------------ loop
    def fit(self, max_steps: int, on_step: Callable[[StepResult], bool | None] | None = None) -> int:
        """Run up to ``max_steps`` training steps from the current position (``self.step``), with the
        data order, step randomness and LR schedule of :meth:`train`, but without its epochs,
        validation, checkpoints, logs or signal handling. After each step (``self.step`` counts it)
        ``on_step(result)`` is called; a true return stops. Returns the number of steps run."""
        if max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {max_steps}")
        self.model.train()
        batches, done = self._batches(), 0
        while done < max_steps:
            result = self._advance(next(batches))
            done += 1
            if on_step is not None and on_step(result):
                break
        return done

    def train(self, stop: StopRequest | None = None) -> str:
        """Run until ``epochs`` (or ``max_steps``); returns ``"done"``, ``"max_steps"`` or ``"stopped"``
        (SIGTERM, SIGUSR1 or a first Ctrl-C: ``latest.pt`` is saved; a second Ctrl-C interrupts at once).
        ``stop``: a request already being watched since the process started (a signal that came
        while the run was setting up stops it after its first step)."""
        with stop_signals(ctrl_c=True, request=stop) as self._stop:
            return self._train()

    def _train(self) -> str:
        self.logger.open(self.step)
        if self.dist.is_main:
            n_params = sum(p.numel() for p in self.model.parameters())
            log.info("run folder: %s", self.run_dir)
            compiled = self.forward_model is not self._eager_forward
            how = (f"compiled ({self.train_cfg.compile_mode} mode)" if compiled else "eager") + \
                (", channels_last" if self.train_cfg.channels_last else "")
            log.info("%s x %s at %s %s: %.1fM parameters on %s (%s x %d process(es)), %s", self.strategy.name,
                     self.mode.name, " x ".join(map(str, self.space.shape)),
                     self.space.either("px", "voxels"), n_params / 1e6, self.device,
                     effective_precision(self.device, self.train_cfg.precision),
                     self.dist.world_size, how)
            log.info("%d training %s, %d steps/epoch, %d epochs (%d steps)", len(self.data.train_cache),
                     self.space.unit + "s",
                     self.steps_per_epoch, self.train_cfg.epochs, self.total_steps)
        try:
            while self.epoch < self.train_cfg.epochs:
                status = self._run_epoch()
                self.check_skips()
                if status != "epoch":
                    self.save("latest.pt")  # max_steps or stop signal
                    return status
                self.epoch += 1
                if self.epoch % self.train_cfg.val_interval == 0 or self.epoch == self.train_cfg.epochs:
                    self.validate_and_sample()
                self.save("latest.pt")
                self.checkpointer.snapshot(self.epoch, self.state_dict())
            return "done"
        finally:
            self.logger.close()

    def _stop_requested(self) -> bool:
        """A stop signal on any rank. Under DDP the ranks compare notes only every ``log_every``
        steps (all at the same steps), so that no step waits on a collective read by the host."""
        if not self.dist.distributed:
            return self._stop.requested
        return self.step % self.train_cfg.log_every == 0 and any_rank(self._stop.requested, self.dist)

    def epoch_label(self) -> str:
        """``"<e>/<epochs>"``: the epoch in progress (as the progress bar counts, from 1), or the last
        one completed when no step of the next has run."""
        current = self.epoch + 1 if self.step > self.epoch * self.steps_per_epoch else max(self.epoch, 1)
        return f"{min(current, self.train_cfg.epochs)}/{self.train_cfg.epochs}"

    def _run_epoch(self) -> str:
        batches_done = self._position_sampler()
        bar = tqdm(total=self.steps_per_epoch, initial=batches_done,
                   desc=f"epoch {self.epoch + 1}/{self.train_cfg.epochs}", disable=not self.progress or self._log_lines,
                   leave=False, dynamic_ncols=True)
        self.model.train()
        try:
            for batch in self.data.train:
                if self.train_cfg.max_steps is not None and self.step >= self.train_cfg.max_steps:
                    return "max_steps"
                if self._stop_requested():
                    if self.dist.is_main:
                        log.warning("stop requested (signal or Ctrl-C): saving latest.pt at step %d; "
                                    "press Ctrl-C again to abort without saving", self.step)
                    return "stopped"
                self._after_step(self._advance(batch), batch, bar)
            if self.train_cfg.max_steps is not None and self.step >= self.train_cfg.max_steps and \
                    self.step < (self.epoch + 1) * self.steps_per_epoch:
                return "max_steps"
            return "epoch"
        finally:
            bar.close()

    def _after_step(self, r: StepResult, batch: dict[str, torch.Tensor], bar) -> None:
        """Device-side bookkeeping every step; the host reads it only every ``log_every`` steps."""
        images = next(iter(batch.values())).shape[0] * self.dist.world_size
        self.logger.record_step(vars(r), images, ~r.skipped)
        bar.update(1)
        if self.step % self.train_cfg.log_every == 0:
            self.check_skips()
            stats = self.logger.flush(self.step, self.epoch, self.lr_schedule(self.step - 1))
            if stats is not None:
                bar.set_postfix(loss=f"{stats['loss']:.4f}", img_s=f"{stats['images_per_sec']:.1f}")
                if self._log_lines and time.monotonic() - self._last_line >= PROGRESS_LINE_SECONDS:
                    self._last_line = time.monotonic()
                    log.info("epoch %s, step %d/%d: loss %.4f, %.1f %s/s", self.epoch_label(), self.step, self.total_steps,
                             stats["loss"], stats["images_per_sec"], self.space.either("images", "volumes"))

    def check_skips(self) -> None:
        """Report the steps skipped since the last check; :class:`TrainingStopped` after
        ``training.max_nonfinite_steps`` in a row."""
        self.skips.check(self.train_cfg.max_nonfinite_steps)

    # ------------------------------------------------------------------ validation
    def _eval_model(self) -> torch.nn.Module:
        return self.ema.ema_model if self.ema is not None else self.model

    def validation_loss(self) -> float:
        """Unweighted MSE of the EMA (or raw) model over the whole validation split (NaN without one);
        the same value for any number of processes (:func:`medgen.diffusion.validation.validation_loss`)."""
        cache = self.data.val_cache
        if cache is None or len(cache) == 0:
            return math.nan
        return validation.validation_loss(
            self._eval_model(), self.strategy, self.mode, cache, seed=self.cfg.seed,
            batch_size=self.data.train.batch_size, device=self.device, dist=self.dist, autocast=self.autocast)

    def sample_grid(self):
        """EMA samples for fixed validation conditions (rows); columns = condition, real, generated."""
        cache = self.data.val_cache if self.data.val_cache is not None and len(self.data.val_cache) else \
            self.data.train_cache
        batch = validation.fixed_samples(cache, self.train_cfg.num_val_samples, self.mode.lesion_conditioned)
        if batch is None:
            return None
        return validation.sample_grid(self._eval_model(), self.strategy, self.mode, self.space, batch,
                                      num_steps=self.train_cfg.num_sample_steps, seed=self.cfg.seed, device=self.device,
                                      autocast=self.autocast, forward=self._sample_forward)

    def validate_and_sample(self) -> float:
        """Validation loss on every rank, then (main rank) ``best.pt`` bookkeeping and the sample grid."""
        val = self.validation_loss()
        if self.dist.is_main:
            grid = self.sample_grid()
            if grid is not None:
                save_png(grid, self.run_dir / "samples" / f"epoch_{self.epoch:04d}.png")
            self.logger.validation(self.step, self.epoch, val, grid)
            log.info("epoch %d step %d: val loss %.5f (best %.5f)", self.epoch, self.step, val,
                     min(val, self.best_val_loss))
        if math.isfinite(val) and val < self.best_val_loss:
            self.best_val_loss = val
            self.save("best.pt")
        barrier(self.dist)
        return val

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "mode": self.mode.name,
            "strategy": self.strategy.name,
            "network": self.network_kwargs,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "best_val_loss": self.best_val_loss,
            "nonfinite_streak": self.skips.streak_now(),
            "data_fingerprint": self.data.fingerprint,
            # what generated data needs to look like the training data: its shape and voxel size (mm, RAS)
            "space": self.space.with_spacing(self.data.train_cache.spacing).state_dict(),
            # a mask model's training slices with a lesion, their largest lesion (mm) and lesion count: target=real
            "lesion_sizes": self.data.lesion_sizes if self.mode.generates_mask else None,
            "lesion_counts": self.data.lesion_counts if self.mode.generates_mask else None,
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        if self.ema is not None:
            if ckpt.get("ema") is None:
                raise CheckpointError("the checkpoint has no EMA weights but training.use_ema=true")
            self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        match_state_layout(self.optimizer)
        self.step = int(ckpt["step"])
        self.epoch = int(ckpt["epoch"])
        self.best_val_loss = float(ckpt["best_val_loss"])
        self.skips.load(int(ckpt.get("nonfinite_streak", 0)))

    def save(self, name: str) -> Path | None:
        return self.checkpointer.save(name, self.state_dict()) if self.dist.is_main else None

    def resume_from(self, path: str | Path) -> None:
        """Load a checkpoint after checking that its config matches this run's (except RESUME_ALLOWED)."""
        ckpt = load_checkpoint(path, map_location=self.device)
        check_resumable(ckpt, self.cfg, path)
        if ckpt.get("data_fingerprint") != self.data.fingerprint and self.dist.is_main:
            log.warning("the training data changed since %s was written (fingerprint differs)", path)
        self.load_state_dict(ckpt)
        if self.dist.is_main:  # every rank loads it; one line says so
            log.info("resumed from %s at epoch %d, step %d", path, self.epoch, self.step)

