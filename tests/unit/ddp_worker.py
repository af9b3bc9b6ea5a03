"""Run by test_train_cli.py under torchrun: train a few steps with DDP (gloo, CPU), then each
rank saves its own weights so the test can compare ranks."""

import sys
from pathlib import Path

import torch

from medgen.core.config import load_config
from medgen.core.distributed import cleanup, setup_distributed
from medgen.diffusion.trainer import DiffusionTrainer

out = Path(sys.argv[1])
cfg = load_config(sys.argv[2:], world_size=2)
info = setup_distributed(cfg.training.use_multi_gpu)
trainer = DiffusionTrainer(cfg, out / "run", info, progress=False)
assert trainer.data.train.batch_size == cfg.training.batch_size // 2
status = trainer.train()
torch.save({"status": status, "step": trainer.step, "model": trainer.model.state_dict(),
            "ema": trainer.ema.ema_model.state_dict()}, out / f"rank{info.rank}.pt")
cleanup()
