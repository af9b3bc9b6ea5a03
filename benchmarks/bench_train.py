"""Training throughput: medgen's training step vs a plain reference loop, same process.

medgen: ``DiffusionTrainer.train_step`` with the ``training=cpu`` profile (bravo mode, 64 px,
the cpu network, bf16 autocast, SDPA attention, Min-SNR, EMA every step, gradient clipping).
Reference: the way MONAI's tutorials train — the same MONAI ``DiffusionModelUNet`` architecture
(MONAI's default attention), ``DDPMScheduler.add_noise``, AdamW, fp32, eager, MSE on the noise.
Both consume the same in-memory batches (no data loading in the timed region). Blocks of steps
alternate between the two so that drift in machine load hits both alike.

With a CUDA device, also the specification's network at 128 px (``model=default``): images/s
and model FLOP utilisation = FLOPs per image (torch FlopCounterMode, forward + backward) x
images/s / peak dense bf16 FLOP/s of the card (``--peak-tflops``, default 989 for H100 SXM).

    python benchmarks/bench_train.py [--steps 20] [--blocks 3] [config overrides ...]
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def _phantom_data(root: Path, subjects: int = 3) -> Path:
    from medgen.data.phantom import generate_dataset

    generate_dataset(root, subjects=subjects, size=64, slices=32, seed=0, split=(1.0, 0.0, 0.0))
    return root


def _trainer(overrides: list[str], tmp: Path):
    from medgen.core.config import load_config
    from medgen.core.distributed import setup_distributed
    from medgen.diffusion.trainer import DiffusionTrainer

    cfg = load_config([f"paths.data_dir={tmp / 'data'}", f"paths.cache_dir={tmp / 'cache'}",
                       f"paths.model_dir={tmp / 'runs'}", "data.num_workers=0", *overrides])
    return DiffusionTrainer(cfg, tmp / "run", setup_distributed(False), progress=False)


class ReferenceLoop:
    """The MONAI-tutorial training step: fp32, eager, no EMA, no weighting."""

    def __init__(self, network_kwargs: dict, lr: float, device: torch.device):
        from monai.networks.nets import DiffusionModelUNet
        from monai.networks.schedulers import DDPMScheduler

        kw = {k: v for k, v in network_kwargs.items() if k != "use_flash_attention"}
        kw["channels"], kw["attention_levels"] = tuple(kw["channels"]), tuple(kw["attention_levels"])
        torch.manual_seed(0)
        self.model = DiffusionModelUNet(**kw).to(device)
        self.scheduler = DDPMScheduler(num_train_timesteps=1000, schedule="cosine")
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr)
        self.device = device

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        images = batch["bravo"].to(self.device) * 2 - 1
        mask = batch["seg"].to(self.device) * 2 - 1
        noise = torch.randn_like(images)
        t = torch.randint(0, 1000, (images.shape[0],), device=self.device)
        noisy = self.scheduler.add_noise(images, noise, t)
        pred = self.model(torch.cat([noisy, mask], dim=1), t)
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def _time(fn, batches, steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        fn(batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def compare(trainer, steps: int, blocks: int, warmup: int = 3) -> dict:
    device = trainer.device
    batches = [b for _, b in zip(range(4), trainer.data.train)]
    bsz = batches[0]["bravo"].shape[0]
    ref = ReferenceLoop(trainer.network_kwargs, trainer.t.learning_rate, device)

    def medgen_step(batch):
        trainer.train_step(batch)
        trainer.step += 1

    for _ in range(warmup):
        medgen_step(batches[0])
        ref.step(batches[0])
    t_m = t_r = 0.0
    for _ in range(blocks):
        t_r += _time(ref.step, batches, steps, device)
        t_m += _time(medgen_step, batches, steps, device)
    n = steps * blocks * bsz
    return {"medgen_images_per_s": round(n / t_m, 2), "reference_images_per_s": round(n / t_r, 2),
            "speedup": round(t_r / t_m, 3), "batch_size": bsz}


def gpu_mfu(tmp: Path, steps: int, peak_tflops: float) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    trainer = _trainer(["mode=bravo", "model=default", "training=default", "training.perceptual_weight=0",
                        "training.batch_size=32"], tmp)
    batch = next(iter(trainer.data.train))
    x = torch.randn(1, trainer.mode.in_channels, 128, 128, device=trainer.device)
    t = torch.zeros(1, dtype=torch.long, device=trainer.device)
    with FlopCounterMode(display=False) as counter:
        with trainer.autocast():
            trainer.model(x, t).float().sum().backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    flops_per_image = counter.get_total_flops()
    for _ in range(5):
        trainer.train_step(batch)
    torch.cuda.synchronize()
    elapsed = _time(trainer.train_step, [batch], steps, trainer.device)
    ips = steps * batch["bravo"].shape[0] / elapsed
    return {"gpu": torch.cuda.get_device_name(), "spec_128px_images_per_s": round(ips, 1),
            "flops_per_image": flops_per_image,
            "mfu": round(flops_per_image * ips / (peak_tflops * 1e12), 4), "peak_tflops": peak_tflops}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("overrides", nargs="*", help="extra config overrides for the medgen run, e.g. model.channels=[64,128,128]")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _phantom_data(tmp / "data")
        trainer = _trainer(["mode=bravo", "training=cpu", *args.overrides], tmp)
        result = {"benchmark": "train_step", "mode": "bravo", "image_size": trainer.cfg.model.image_size,
                  "network": trainer.network_kwargs["channels"], "device": str(trainer.device),
                  "threads": torch.get_num_threads(), "precision": trainer.t.precision}
        result.update(compare(trainer, args.steps, args.blocks))
        result["target_speedup"] = 1.8
        result["meets_target"] = result["speedup"] >= 1.8
        if torch.cuda.is_available():
            result.update(gpu_mfu(tmp, args.steps, args.peak_tflops))
            result["target_mfu"] = 0.35
    print(json.dumps(result))


if __name__ == "__main__":
    main()
