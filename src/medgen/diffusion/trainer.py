"""``DiffusionTrainer``: one training loop for every strategy x mode (DESIGN.md section 4).

The step (:meth:`DiffusionTrainer.train_step`) fits on one screen; logging, validation,
checkpoints and signals are called around it. The randomness of step ``k`` (timesteps,
noise, condition dropout) comes from a generator seeded with (seed, k, rank), the LR is a
pure function of ``k``, and the data order is a function of (seed, epoch): so a run that
is resumed from a checkpoint draws exactly what an uninterrupted run would have drawn.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from medgen.core.checkpoint import CheckpointError, config_diff, load_checkpoint, save_checkpoint
from medgen.core.distributed import DistInfo, any_rank, barrier
from medgen.data.slices import DataBundle, build_data
from medgen.data.transforms import from_model_space, ras_to_display
from medgen.diffusion.losses import diffusion_loss, per_sample_mse
from medgen.diffusion.modes import build_mode
from medgen.diffusion.perceptual import build_perceptual_loss
from medgen.diffusion.strategies import build_strategy
from medgen.diffusion.utils import append_jsonl, build_network, make_grid, network_kwargs, save_png, step_seed

log = logging.getLogger("medgen.train")

#: config keys that may change when resuming (everything else must match the checkpoint)
RESUME_ALLOWED = (
    "training.epochs", "training.max_steps", "training.val_interval", "training.log_every",
    "training.resume", "training.num_val_samples", "training.num_sample_steps", "training.checkpoint_keep",
    "paths", "data.num_workers",
)
N_TIMESTEP_BINS = 10


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many non-finite losses in a row)."""


@dataclass
class StepResult:
    loss: torch.Tensor  # scalar total loss (device)
    mse: torch.Tensor  # scalar weighted diffusion loss (device)
    perceptual: torch.Tensor  # scalar (device)
    grad_norm: torch.Tensor  # scalar (device)
    skipped: bool


class DiffusionTrainer:
    """Trains a MONAI ``DiffusionModelUNet`` for the configured strategy and mode."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path, dist: DistInfo | None = None,
                 data: DataBundle | None = None, progress: bool = True):
        self.cfg = cfg
        self.t = cfg.training
        self.run_dir = Path(run_dir)
        self.dist = dist or DistInfo()
        self.device = self.dist.device
        self.progress = progress and self.dist.is_main
        torch.manual_seed(cfg.seed)  # network initialisation is the same on every rank

        self.mode = build_mode(cfg)
        self.strategy = build_strategy(cfg)
        self.network_kwargs = network_kwargs(cfg)
        self.model = build_network(self.network_kwargs).to(self.device)
        self.ema = self._build_ema()
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.t.learning_rate,
                                           weight_decay=self.t.weight_decay, fused=fused)
        # before any step: a missing-weights error must reach the user now, not after hours
        self.perceptual = None
        if self.mode.supports_perceptual and self.t.perceptual_weight > 0:
            self.perceptual = build_perceptual_loss(self.t.perceptual_weight, self.t.perceptual_weights_path,
                                                    self.t.perceptual_allow_download, device=self.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        self.data = data or build_data(cfg, self.dist.rank, self.dist.world_size, progress=self.progress,
                                       barrier=lambda: barrier(self.dist))
        self.steps_per_epoch = len(self.data.train)
        self.total_steps = self.t.epochs * self.steps_per_epoch
        self.warmup_steps = self.t.warmup_epochs * self.steps_per_epoch

        self.forward_model: torch.nn.Module = self.model
        if self.dist.distributed:
            self.forward_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.t.compile:
            self.forward_model = torch.compile(self.forward_model)

        self.step = 0
        self.epoch = 0
        self.best_val_loss = math.inf
        self.nonfinite_streak = 0
        self._stop_requested = False
        self._val_fixed: dict[str, torch.Tensor] | None = None
        self.writer: SummaryWriter | None = None
        self._reset_window()

    # ------------------------------------------------------------------ building blocks
    def _build_ema(self):
        if not self.t.use_ema:
            return None
        from ema_pytorch import EMA

        return EMA(self.model, beta=self.t.ema_decay, update_after_step=self.t.ema_update_after_step,
                   update_every=self.t.ema_update_every, include_online_model=False)

    def autocast(self):
        enabled = self.t.precision == "bf16"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def lr_at(self, step: int) -> float:
        """Linear warm-up over ``warmup_epochs`` then cosine decay to 0 at ``epochs`` (per optimizer step)."""
        base = self.t.learning_rate
        if step < self.warmup_steps:
            return base * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return base * 0.5 * (1.0 + math.cos(math.pi * progress))

    def generator(self, step: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(step_seed(self.cfg.seed, step, self.dist.rank))

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    # ------------------------------------------------------------------ the step
    def train_step(self, batch: dict[str, torch.Tensor]) -> StepResult:
        g = self.generator(self.step)
        x0, cond = self.mode.split(self._to_device(batch))  # [B, C, H, W] in [-1, 1]
        if cond is not None and self.t.cond_dropout > 0:
            cond = self.mode.drop_cond(cond, self.t.cond_dropout, g)  # classifier-free guidance training
        t = self.strategy.sample_timesteps(x0.shape[0], g, self.device)
        eps = torch.randn(x0.shape, generator=g, device=self.device)
        x_t = self.strategy.add_noise(x0, eps, t)
        with self.autocast():
            out = self.forward_model(self.mode.model_input(x_t, cond), t)
        weight = self.strategy.loss_weight(t, self.t.min_snr_gamma) if self.t.use_min_snr else None
        mse, per_sample = diffusion_loss(out, self.strategy.target(x0, eps, t), weight)
        perceptual = self._perceptual(out, x_t, t, x0)
        loss = mse + self.t.perceptual_weight * perceptual

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.t.gradient_clip_norm)
        skipped = any_rank(not bool(torch.isfinite(grad_norm) & torch.isfinite(loss)), self.dist)
        if not skipped:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_at(self.step)
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update()
            self._record_bins(t, per_sample.detach())
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss.detach(), mse.detach(), perceptual.detach(), grad_norm.detach(), skipped)

    def _perceptual(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        if self.perceptual is None:
            return torch.zeros((), device=self.device)
        x0_hat = self.strategy.predict_x0(out.float(), x_t, t)
        with self.autocast():
            return self.perceptual(from_model_space(x0_hat), from_model_space(x0)).float()

    # ------------------------------------------------------------------ loop
    def train(self) -> str:
        """Run until ``epochs`` (or ``max_steps``); returns ``"done"``, ``"max_steps"`` or ``"stopped"``."""
        self._install_signal_handlers()
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.step or None)
            n_params = sum(p.numel() for p in self.model.parameters())
            log.info("run folder: %s", self.run_dir)
            log.info("%s x %s at %d px: %.1fM parameters on %s (%s x %d process(es))", self.strategy.name,
                     self.mode.name, self.cfg.model.image_size, n_params / 1e6, self.device, self.t.precision,
                     self.dist.world_size)
            log.info("%d training slices, %d steps/epoch, %d epochs (%d steps)", len(self.data.train_cache),
                     self.steps_per_epoch, self.t.epochs, self.total_steps)
        try:
            while self.epoch < self.t.epochs:
                status = self._run_epoch()
                if status != "epoch":
                    self.save("latest.pt")  # max_steps or stop signal
                    return status
                self.epoch += 1
                if self.epoch % self.t.val_interval == 0 or self.epoch == self.t.epochs:
                    self.validate_and_sample()
                self.save("latest.pt")
                self._snapshot()
            return "done"
        finally:
            if self.writer is not None:
                self.writer.flush()
                self.writer.close()

    def _run_epoch(self) -> str:
        batches_done = self.step - self.epoch * self.steps_per_epoch
        sampler = self.data.train.sampler
        sampler.set_epoch(self.epoch, skip=batches_done * self.data.train.batch_size)
        bar = tqdm(total=self.steps_per_epoch, initial=batches_done, desc=f"epoch {self.epoch + 1}/{self.t.epochs}",
                   disable=not self.progress, leave=False, dynamic_ncols=True)
        self.model.train()
        try:
            for batch in self.data.train:
                if self.t.max_steps is not None and self.step >= self.t.max_steps:
                    return "max_steps"
                if any_rank(self._stop_requested, self.dist):
                    log.warning("stop signal received: saving latest.pt at step %d", self.step)
                    return "stopped"
                result = self.train_step(batch)
                self.step += 1
                self._after_step(result, batch, bar)
            if self.t.max_steps is not None and self.step >= self.t.max_steps and \
                    self.step < (self.epoch + 1) * self.steps_per_epoch:
                return "max_steps"
            return "epoch"
        finally:
            bar.close()

    def _after_step(self, r: StepResult, batch: dict[str, torch.Tensor], bar) -> None:
        if r.skipped:
            self.nonfinite_streak += 1
            log.warning("non-finite loss or gradient at step %d: step skipped (%d in a row)",
                        self.step - 1, self.nonfinite_streak)
            if self.nonfinite_streak >= self.t.max_nonfinite_steps:
                raise TrainingStopped(
                    f"{self.nonfinite_streak} non-finite losses in a row, the last at step {self.step - 1}; "
                    "lower training.learning_rate, keep gradient clipping on, or check the data "
                    "(medgen-data check)")
            return
        self.nonfinite_streak = 0
        w = self._window
        w["loss"] += r.loss
        w["mse"] += r.mse
        w["perceptual"] += r.perceptual
        w["grad_norm"] += r.grad_norm
        w["n"] += 1
        w["images"] += next(iter(batch.values())).shape[0] * self.dist.world_size
        bar.update(1)
        if self.step % self.t.log_every == 0:
            self._log_window(bar)

    # ------------------------------------------------------------------ logging
    def _reset_window(self) -> None:
        z = lambda: torch.zeros((), device=self.device)  # noqa: E731
        self._window: dict[str, Any] = {"loss": z(), "mse": z(), "perceptual": z(), "grad_norm": z(),
                                        "n": 0, "images": 0, "t0": time.perf_counter()}
        self._bin_sum = torch.zeros(N_TIMESTEP_BINS, device=self.device)
        self._bin_count = torch.zeros(N_TIMESTEP_BINS, device=self.device)

    def _record_bins(self, t: torch.Tensor, per_sample: torch.Tensor) -> None:
        """Accumulate per-sample loss by timestep bin on the device (no host sync)."""
        bins = (t.float() / self.strategy.num_train_timesteps * N_TIMESTEP_BINS).long().clamp(0, N_TIMESTEP_BINS - 1)
        self._bin_sum.index_add_(0, bins, per_sample.float())
        self._bin_count.index_add_(0, bins, torch.ones_like(per_sample, dtype=torch.float32))

    def _log_window(self, bar) -> None:
        w = self._window
        if w["n"] == 0:
            return
        elapsed = max(1e-9, time.perf_counter() - w["t0"])
        stats = {k: float(w[k]) / w["n"] for k in ("loss", "mse", "perceptual", "grad_norm")}
        stats["lr"] = self.lr_at(self.step - 1)
        stats["images_per_sec"] = w["images"] / elapsed
        stats["peak_memory_mb"] = self._peak_memory_mb()
        bins = (self._bin_sum / self._bin_count.clamp(min=1)).tolist()
        counts = self._bin_count.tolist()
        if self.dist.is_main:
            bar.set_postfix(loss=f"{stats['loss']:.4f}", img_s=f"{stats['images_per_sec']:.1f}")
            if self.writer is not None:
                wr, s = self.writer, self.step
                wr.add_scalar("loss/total", stats["loss"], s)
                wr.add_scalar("loss/mse", stats["mse"], s)
                wr.add_scalar("loss/perceptual", stats["perceptual"], s)
                wr.add_scalar("train/lr", stats["lr"], s)
                wr.add_scalar("train/grad_norm", stats["grad_norm"], s)
                wr.add_scalar("perf/images_per_sec", stats["images_per_sec"], s)
                wr.add_scalar("perf/peak_memory_mb", stats["peak_memory_mb"], s)
                for i, (v, c) in enumerate(zip(bins, counts)):
                    if c > 0:
                        wr.add_scalar(f"loss_by_timestep/bin_{i:02d}", v, s)
            append_jsonl(self.run_dir / "metrics.jsonl", {"step": self.step, "epoch": self.epoch, **stats})
        self._reset_window()

    def _peak_memory_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    # ------------------------------------------------------------------ validation
    def _eval_model(self) -> torch.nn.Module:
        return self.ema.ema_model if self.ema is not None else self.model

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Unweighted MSE of the EMA (or raw) model on the validation split at fixed timesteps and
        noise (the same every time, so values are comparable between epochs)."""
        if self.data.val is None:
            return math.nan
        model = self._eval_model()
        was_training = model.training
        model.eval()
        g = torch.Generator(device=self.device).manual_seed(step_seed(self.cfg.seed, -1, 0))
        total = torch.zeros((), device=self.device)
        n = 0
        for batch in self.data.val:
            x0, cond = self.mode.split(self._to_device(batch))
            t = self.strategy.sample_timesteps(x0.shape[0], g, self.device)
            eps = torch.randn(x0.shape, generator=g, device=self.device)
            x_t = self.strategy.add_noise(x0, eps, t)
            with self.autocast():
                out = model(self.mode.model_input(x_t, cond), t)
            total += per_sample_mse(out, self.strategy.target(x0, eps, t)).sum()
            n += x0.shape[0]
        model.train(was_training)
        return float(total) / max(1, n)

    def _fixed_validation_batch(self) -> dict[str, torch.Tensor] | None:
        """``num_val_samples`` validation slices with the most lesion, one per patient where possible."""
        if self._val_fixed is None:
            cache = self.data.val_cache if self.data.val_cache is not None and len(self.data.val_cache) else self.data.train_cache
            n = min(self.t.num_val_samples, len(cache))
            if n == 0:
                return None
            order = np.lexsort((np.arange(len(cache)), -cache.lesion_pixels))
            chosen, seen = [], set()
            for i in order:
                if cache.patient_index[i] not in seen:
                    chosen.append(int(i))
                    seen.add(cache.patient_index[i])
                if len(chosen) == n:
                    break
            for i in order:
                if len(chosen) == n:
                    break
                if int(i) not in chosen:
                    chosen.append(int(i))
            arr = torch.from_numpy(np.asarray(cache.data[sorted(chosen)], dtype=np.float32))
            self._val_fixed = {k: arr[:, c : c + 1] for c, k in enumerate(cache.keys)}
        return self._val_fixed

    @torch.no_grad()
    def sample_grid(self) -> np.ndarray | None:
        """EMA samples for the fixed validation masks: rows = samples; columns = mask, real, generated."""
        batch = self._fixed_validation_batch()
        if batch is None:
            return None
        model = self._eval_model()
        was_training = model.training
        model.eval()
        x0, cond = self.mode.split(self._to_device(batch))
        g = torch.Generator(device=self.device).manual_seed(step_seed(self.cfg.seed, -2, 0))
        x_T = torch.randn(x0.shape, generator=g, device=self.device)

        def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with self.autocast():
                return model(self.mode.model_input(x_t, cond), t).float()

        x0_gen = self.strategy.sample(denoise, x_T, self.t.num_sample_steps, generator=g)
        model.train(was_training)
        real = self.mode.to_outputs(x0)
        gen = self.mode.to_outputs(x0_gen)
        rows = []
        for i in range(x0.shape[0]):
            row = [batch[k][i, 0].numpy() for k in self.mode.cond_keys]
            row += [real[k][i, 0].float().cpu().numpy() for k in self.mode.image_keys]
            row += [gen[k][i, 0].float().cpu().numpy() for k in self.mode.image_keys]
            rows.append([ras_to_display(tile) for tile in row])
        labels = [*self.mode.cond_keys, *(f"{k} real" for k in self.mode.image_keys),
                  *(f"{k} gen" for k in self.mode.image_keys)]
        return make_grid(rows, labels=labels, scale=2)

    def validate_and_sample(self) -> float:
        """Validation loss, ``best.pt`` bookkeeping and the sample grid (rank 0 only; others wait)."""
        val = math.nan
        if self.dist.is_main:
            val = self.validation_loss()
            grid = self.sample_grid()
            if self.writer is not None:
                if math.isfinite(val):
                    self.writer.add_scalar("val/loss", val, self.step)
                if grid is not None:
                    self.writer.add_image("samples", grid[None], self.step)
            if grid is not None:
                save_png(grid, self.run_dir / "samples" / f"epoch_{self.epoch:04d}.png")
            append_jsonl(self.run_dir / "metrics.jsonl", {"step": self.step, "epoch": self.epoch, "val_loss": val})
            if math.isfinite(val) and val < self.best_val_loss:
                self.best_val_loss = val
                self.save("best.pt")
            log.info("epoch %d step %d: val loss %.5f (best %.5f)", self.epoch, self.step, val, self.best_val_loss)
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
            "lr_schedule": {"step": self.step, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps},
            "step": self.step,
            "epoch": self.epoch,
            "best_val_loss": self.best_val_loss,
            "nonfinite_streak": self.nonfinite_streak,
            "data_fingerprint": self.data.fingerprint,
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        if self.ema is not None:
            if ckpt.get("ema") is None:
                raise CheckpointError("the checkpoint has no EMA weights but training.use_ema=true")
            self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step = int(ckpt["step"])
        self.epoch = int(ckpt["epoch"])
        self.best_val_loss = float(ckpt["best_val_loss"])
        self.nonfinite_streak = int(ckpt.get("nonfinite_streak", 0))

    def save(self, name: str) -> Path | None:
        if not self.dist.is_main:
            return None
        return save_checkpoint(self.run_dir / "checkpoints" / name, self.state_dict())

    def _snapshot(self) -> None:
        if not self.dist.is_main or self.t.checkpoint_keep == 0:
            return
        ckdir = self.run_dir / "checkpoints"
        save_checkpoint(ckdir / f"epoch_{self.epoch:04d}.pt", self.state_dict())
        snaps = sorted(ckdir.glob("epoch_*.pt"))
        for old in snaps[: -self.t.checkpoint_keep]:
            old.unlink()

    def resume_from(self, path: str | Path) -> None:
        """Load a checkpoint after checking that its config matches this run's (except RESUME_ALLOWED)."""
        ckpt = load_checkpoint(path, map_location=self.device)
        changes = config_diff(ckpt["config"], OmegaConf.to_container(self.cfg, resolve=True), RESUME_ALLOWED)
        if changes:
            raise CheckpointError(
                f"cannot resume from {path}: the config differs from the checkpoint's in\n  "
                + "\n  ".join(changes)
                + "\nrun with the checkpoint's values, or start a new run (training.resume=null)")
        if ckpt.get("data_fingerprint") != self.data.fingerprint:
            log.warning("the training data changed since %s was written (fingerprint differs)", path)
        self.load_state_dict(ckpt)
        self._drop_metrics_after(self.step)
        log.info("resumed from %s at epoch %d, step %d", path, self.epoch, self.step)

    def _drop_metrics_after(self, step: int) -> None:
        """After a crash, metrics.jsonl may hold steps past the checkpoint; they are redone, so drop them
        (TensorBoard does the same through ``purge_step``)."""
        path = self.run_dir / "metrics.jsonl"
        if not self.dist.is_main or not path.is_file():
            return
        lines = path.read_text().splitlines()
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
        if len(kept) != len(lines):
            path.write_text("".join(line + "\n" for line in kept))

    # ------------------------------------------------------------------ signals
    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):  # noqa: ARG001
            self._stop_requested = True

        with contextlib.suppress(ValueError):  # not in the main thread
            signal.signal(signal.SIGTERM, handler)
            signal.signal(signal.SIGUSR1, handler)
