"""Run by test_train_cli.py under torchrun: train a few steps with DDP (gloo, CPU), then each
rank saves its own weights so the test can compare ranks. With MEDGEN_TEST_NAN_RANK=r, rank r
alone gets a NaN target at step 1."""

import os
import sys
from pathlib import Path

import torch

from medgen.core.distributed import cleanup, setup_distributed
from medgen.diffusion.config import load_config
from medgen.diffusion.trainer import DiffusionTrainer

out = Path(sys.argv[1])
cfg = load_config(sys.argv[2:], world_size=2)
info = setup_distributed(cfg.training.use_multi_gpu)
trainer = DiffusionTrainer(cfg, out / "run", info, progress=False)
assert trainer.data.train.batch_size == cfg.training.batch_size // 2
real_target, real_step = trainer.strategy.target, trainer.train_step
skipped = []
if os.environ.get("MEDGEN_TEST_NAN_RANK") == str(info.rank):
    trainer.strategy.target = lambda x0, eps, t: real_target(x0, eps, t) * (float("nan") if trainer.step == 1 else 1.0)


def recording_step(batch):
    result = real_step(batch)
    if result.skipped:
        skipped.append(trainer.step)
    return result


trainer.train_step = recording_step
status = trainer.train()
torch.save({"status": status, "step": trainer.step, "skipped": skipped, "model": trainer.model.state_dict(),
            "ema": trainer.ema.ema_model.state_dict(), "val_loss": trainer.validation_loss()},
           out / f"rank{info.rank}.pt")
cleanup()
