"""Training throughput: medgen's training step vs a plain reference loop, same process.

On the CPU: medgen's ``DiffusionTrainer.train_step`` with the ``training=cpu`` profile (bravo mode,
64 px, the cpu network, bf16 autocast, SDPA attention, Min-SNR, EMA every step, gradient
clipping) against the reference: the way MONAI's tutorials train, the same MONAI
``DiffusionModelUNet`` architecture (MONAI's default attention), ``DDPMScheduler.add_noise``,
AdamW, fp32, eager, MSE on the noise. Both consume the same in-memory batches (no data loading in
the timed region). Blocks of steps alternate between the two so that drift in machine load hits
both alike. Target: medgen at least 1.8x the reference. ``--3d``: the same on volumes
(``model.image_size=[64,64,32]``, batch 2; the reference a 3D MONAI-tutorial loop), target
1.5x, plus the peak memory of training steps above the memory before them (Linux ``VmHWM``, reset
before the first step; each setting in a fresh process) without and with ``training.gradient_checkpointing``
(``memory_ratio_checkpointing``).

On CUDA (or anywhere with ``--table``): a table for the specification's network (bravo,
``model=default``: 128 px, channels [128, 256, 256]; ``training=default`` with
``training.perceptual_weight=0``), one row per configuration, each built, measured and freed in
turn (a configuration that runs out of memory is a row saying so). With ``--3d`` the same table on
volumes of the GPU profile (``model.image_size=[128,128,64]``; the
batches default to 1, 2 and 4 volumes, and ``--variants checkpointing`` adds
``training.gradient_checkpointing``); an "image" in its columns is then one volume:

* ``train_step`` eager and compiled (``training.compile=false`` / ``true``) at ``--batches``;
* the MONAI-tutorial loop at ``--reference-batches``: fp32 with TF32 on, and bf16 autocast;
* ``--variants``: candidate settings (``VARIANTS``: channels_last, CUDA graphs, max-autotune, heads of
  64), each the default configuration plus its overrides, compiled, at ``--variant-batch``. They
  are for deciding what pays; they never count as the default configuration.

Each row: images/s, MFU = FLOPs per image (torch ``FlopCounterMode`` on the network, forward +
backward, attention included; the same network FLOPs for every row) x images/s / the card's peak
dense bf16 FLOP/s, and peak GPU memory. The peak comes from the card's name (H100 and H200 989
TFLOP/s, their PCIe/NVL versions 756/835, A100 312) or ``--peak-tflops``; for another card without
``--peak-tflops`` the MFU columns are null and ``note`` says so. ``"mfu"`` is the best MFU among
the rows that train as ``training=default`` does on that card (its batch size, its
``training.compile`` resolved for the device); that configuration is always measured. Target:
``"mfu"`` >= 0.35. The default table (3 batch sizes, eager and compiled, reference at 3 sizes) takes
about 5 minutes on an H100 (three compilations of ~45 s each); ``--batches``,
``--reference-batches none`` and ``--compile`` make it shorter.

    python benchmarks/bench_train.py [--steps 20] [--blocks 3] [config overrides ...]          # CPU
    python benchmarks/bench_train.py --3d [--steps 20] [--blocks 3]                              # CPU, volumes
    python benchmarks/bench_train.py --3d [--batches 1,2,4] [--variants checkpointing] [...]    # CUDA, volumes
    python benchmarks/bench_train.py [--batches 16,64,128] [--reference-batches 64] [--compile both]
                                     [--steps 20] [--warmup 5] [--peak-tflops N] [--variants a,b]
                                     [--variant-batch 64] [overrides ...]                       # CUDA
``--smoke`` (with or without ``--3d``/``--table``): the same path on 3 phantoms of 32 x 32 x 16, a 16 px network, 2 steps.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import smoke
from timing import sync
from train_table import VARIANTS, best_default_mfu, is_default, mfu, parse_batches, peak_tflops, plan

#: the specification's network and training profile, perceptual loss off (the table's medgen rows)
SPEC = ["mode=bravo", "model=default", "training=default", "training.perceptual_weight=0"]
#: the table's trainers load one slice or volume at a time: their loader only supplies the data, and each
#: row assembles its own batches from it (``_fixed_batches``), also when the data hold fewer than a batch
LOADER = "training.batch_size=1"


def _phantom_data(root: Path, subjects: int = 3, size: int = 64, slices: int = 32) -> Path:
    from medgen.data.phantom import generate_dataset

    generate_dataset(root, subjects=subjects, size=size, slices=slices, seed=0, split=(1.0, 0.0, 0.0))
    return root


def _trainer(overrides: list[str], tmp: Path):
    from medgen.core.distributed import setup_distributed
    from medgen.diffusion.config import load_config
    from medgen.diffusion.trainer import DiffusionTrainer

    cfg = load_config([f"paths.data_dir={tmp / 'data'}", f"paths.cache_dir={tmp / 'cache'}",
                       f"paths.model_dir={tmp / 'runs'}", "data.num_workers=0", *overrides])
    return DiffusionTrainer(cfg, tmp / "run", setup_distributed(False), progress=False)


class ReferenceLoop:
    """The MONAI-tutorial training step: eager, no EMA, no weighting; fp32 (TF32 where the backend
    allows it), or with ``precision="bf16"`` the forward under bf16 autocast."""

    def __init__(self, network_kwargs: dict, lr: float, device: torch.device, precision: str = "fp32"):
        from monai.networks.nets import DiffusionModelUNet
        from monai.networks.schedulers import DDPMScheduler

        kw = {k: v for k, v in network_kwargs.items() if k != "use_flash_attention"}
        kw["channels"], kw["attention_levels"] = tuple(kw["channels"]), tuple(kw["attention_levels"])
        torch.manual_seed(0)
        self.model = DiffusionModelUNet(**kw).to(device)
        self.scheduler = DDPMScheduler(num_train_timesteps=1000, schedule="cosine")
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr)
        self.device = device
        self.bf16 = precision == "bf16"
        #: the conditions bravo mode gives the network: the mask, and the brain where the mode has it
        self.cond_keys = ("seg", "brain")[: kw["in_channels"] - kw["out_channels"]]

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        images = batch["bravo"].to(self.device) * 2 - 1
        cond = [batch[k].to(self.device) * 2 - 1 for k in self.cond_keys]
        noise = torch.randn_like(images)
        t = torch.randint(0, 1000, (images.shape[0],), device=self.device)
        noisy = self.scheduler.add_noise(images, noise, t)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            pred = self.model(torch.cat([noisy, *cond], dim=1), t)
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def _time(fn, batches, steps: int, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        fn(batches[i % len(batches)])
    sync(device)
    return time.perf_counter() - t0


def compare(trainer, steps: int, blocks: int, warmup: int = 3) -> dict:
    device = trainer.device
    batches = [b for _, b in zip(range(4), trainer.data.train)]
    bsz = batches[0]["bravo"].shape[0]
    ref = ReferenceLoop(trainer.network_kwargs, trainer.train_cfg.learning_rate, device)

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


# ---------------------------------------------------------------------------------------- the table
# The pure helpers are in train_table.py (unit-tested on the CPU: tests/unit/test_bench_helpers.py).

def default_training(device: torch.device, overrides: list[str] = ()) -> tuple[int | None, bool]:
    """(batch size, compiled) of ``training=default`` (with ``overrides``) on ``device``: what a
    user's run does there."""
    from medgen.diffusion.config import load_config
    from medgen.diffusion.utils import compile_enabled

    t = load_config([*SPEC, *overrides]).training
    try:
        batch = int(t.batch_size)
    except (TypeError, ValueError):  # a batch size decided at run time: any batch counts
        batch = None
    return batch, compile_enabled(str(t.compile), device)


def _fixed_batches(loader, batch: int, n: int = 2) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of ``batch`` slices from ``loader`` (slices repeat when it holds fewer)."""
    slices: dict[str, list[torch.Tensor]] = {}
    for b in loader:
        for k, v in b.items():
            slices.setdefault(k, []).append(v)
        if sum(len(v) for v in next(iter(slices.values()))) >= batch * n:
            break
    pool = {k: torch.cat(v) for k, v in slices.items()}
    size = len(next(iter(pool.values())))
    return [{k: v[torch.arange(i * batch, (i + 1) * batch) % size] for k, v in pool.items()} for i in range(n)]


def flops_per_image(trainer) -> int:
    """FLOPs of one image (or volume) through the network, forward + backward, under the run's autocast."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, trainer.mode.in_channels, *trainer.space.shape, device=trainer.device)
    t = torch.zeros(1, dtype=torch.long, device=trainer.device)
    with FlopCounterMode(display=False) as counter:
        with trainer.autocast():
            trainer.model(x, t).float().sum().backward()
    trainer.model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _medgen_row(tmp: Path, overrides: list[str], cfg: dict, steps: int, warmup: int) -> dict:
    trainer = _trainer([*SPEC, LOADER, f"training.compile={'true' if cfg['compile'] else 'false'}", *overrides,
                        *VARIANTS.get(cfg.get("variant"), [])], tmp)
    device = trainer.device
    batches = _fixed_batches(trainer.data.train, cfg["batch"])

    def step(batch):
        trainer.train_step(batch)
        trainer.step += 1

    t0 = time.perf_counter()
    if trainer._compile_pending:  # compiling happens here, timed on its own (a failure falls back to eager)
        trainer._first_compiled_step(batches[0])
        trainer.step += 1
        sync(device)
        cfg["compile_s"] = round(time.perf_counter() - t0, 1)
        cfg["compile_failed"] = trainer.forward_model is trainer._eager_forward
    for _ in range(warmup):
        step(batches[0])
    elapsed = _time(step, batches, steps, device)
    return {"images_per_s": round(steps * cfg["batch"] / elapsed, 1)}


def _reference_row(tmp: Path, overrides: list[str], cfg: dict, steps: int, warmup: int) -> dict:
    trainer = _trainer([*SPEC, LOADER, "training.compile=false", *overrides], tmp)  # for its data and network kwargs
    batches = _fixed_batches(trainer.data.train, cfg["batch"])
    kwargs, lr, device = trainer.network_kwargs, trainer.train_cfg.learning_rate, trainer.device
    del trainer
    gc.collect()
    ref = ReferenceLoop(kwargs, lr, device, cfg["precision"])
    for _ in range(warmup):
        ref.step(batches[0])
    elapsed = _time(ref.step, batches, steps, device)
    return {"images_per_s": round(steps * cfg["batch"] / elapsed, 1)}


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def measure(run, cfg: dict, device: torch.device) -> dict:
    """One row: ``run(cfg) -> {"images_per_s": ...}`` with its peak memory, or the error that stopped
    it (``"out of memory"``, or the exception's first line); memory is freed afterwards either way."""
    row = dict(cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        row.update(run(row))
    except Exception as exc:  # noqa: BLE001 - one configuration failing is a row, not a dead benchmark
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        row["error"] = "out of memory" if _out_of_memory(exc) else f"{type(exc).__name__}: {first}"
    if device.type == "cuda":
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
    free_memory(device)
    return row


def free_memory(device: torch.device) -> None:
    torch._dynamo.reset()  # compiled graphs hold the last network's buffers; each configuration compiles afresh
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def table(tmp: Path, args, overrides: list[str]) -> dict:
    """The table (see the module docstring) as one JSON-able dict."""
    trainer = _trainer([*SPEC, LOADER, "training.compile=false", *overrides], tmp)
    device = trainer.device
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU)"
    peak = peak_tflops(gpu, args.peak_tflops)
    flops = flops_per_image(trainer)
    result = {"benchmark": "train_step_3d" if args.three_d else "train_step", "mode": "bravo",
              "shape": list(trainer.space.shape), "network": trainer.network_kwargs["channels"], "device": str(device), "gpu": gpu,
              "peak_tflops": peak, "flops_per_image": flops, "gflops_per_image": round(flops / 1e9, 1),
              "steps": args.steps}
    del trainer
    free_memory(device)
    if peak is None:
        result["note"] = (f"no peak bf16 TFLOP/s known for {gpu!r}: MFU not computed; "
                          "pass --peak-tflops N (dense bf16 TFLOP/s of this card)")
        print(f"bench_train: {result['note']}", file=sys.stderr)
    default = default_training(device, overrides)
    result["default"] = {"batch_size": default[0], "compile": default[1]}
    compile_modes = {"both": [False, True], "true": [True], "false": [False]}[args.compile]
    precisions = [p for p in args.reference_precision.split(",") if p]
    variants = [v.strip() for v in args.variants.split(",") if v.strip() and v.strip() != "none"]
    batches = args.batches or ("1,2,4" if args.three_d else "16,64,128")
    configs = plan(parse_batches(batches), compile_modes,
                   parse_batches(args.reference_batches if args.reference_batches is not None else batches),
                   precisions, default, variants, args.variant_batch)
    warmup = 5 if args.warmup is None else args.warmup
    t_start = time.perf_counter()
    rows = []
    for cfg in configs:
        run = _medgen_row if cfg["step"] == "medgen" else _reference_row
        row = measure(lambda c: run(tmp, overrides, c, args.steps, warmup), cfg, device)
        row["mfu"] = mfu(flops, row.get("images_per_s"), peak)
        row["default"] = is_default(row, default)
        rows.append(row)
        print(f"bench_train: {json.dumps(row)}", file=sys.stderr, flush=True)
    result["rows"] = rows
    result["mfu"], best = best_default_mfu(rows, default)
    result["mfu_row"] = best
    result["target_mfu"] = 0.35
    result["meets_target"] = result["mfu"] is not None and result["mfu"] >= 0.35
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20, help="timed steps (per block on the CPU, per row in the table)")
    ap.add_argument("--blocks", type=int, default=3, help="CPU comparison: alternating blocks of --steps steps")
    ap.add_argument("--table", action="store_true", help="the table even without CUDA (a check of the script)")
    ap.add_argument("--batches", default=None, help="table: batch sizes of the medgen rows (16,64,128; 1,2,4 with --3d)")
    ap.add_argument("--compile", choices=("both", "true", "false"), default="both",
                    help="table: medgen rows compiled, eager or both")
    ap.add_argument("--reference-batches", default=None,
                    help="table: batch sizes of the MONAI-tutorial rows (default: --batches; 'none': no reference)")
    ap.add_argument("--reference-precision", default="fp32,bf16", help="table: fp32 (TF32 on) and/or bf16 autocast")
    ap.add_argument("--variants", default="none",
                    help=f"table: candidate settings measured as extra rows, comma-separated: {', '.join(VARIANTS)}")
    ap.add_argument("--variant-batch", type=int, default=64, help="table: batch size of the --variants rows")
    ap.add_argument("--warmup", type=int, default=None, help="table: untimed steps per row after compiling (5)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the card's peak dense bf16 TFLOP/s (default: from its name: H100/H200 989, A100 312)")
    ap.add_argument("--3d", dest="three_d", action="store_true",
                    help="CPU: volumes (model.image_size=[64,64,32], batch 2), target 1.5x; "
                         "also the peak memory of a step with and without training.gradient_checkpointing. "
                         "CUDA / --table: the table at 128 x 128 x 64 volumes")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    smoke.add_flag(ap)
    ap.add_argument("overrides", nargs="*", help="extra config overrides for the medgen run, e.g. model.channels=[64,128,128]")
    args = smoke.apply(ap, ap.parse_args(), {"steps": 2, "blocks": 1, "warmup": 1, "batches": "2", "compile": "false",
                                             "reference_batches": "2", "variant_batch": 2})
    if args.smoke:  # after the profile's overrides, before the user's: a 16 px network (16 x 16 x 8 volumes)
        args.overrides = [*SMOKE, *(SMOKE_VOLUMES if args.three_d else []), *args.overrides]
    if args.memory_child is not None:
        print(json.dumps(_memory_child(Path(args.memory_child), args.steps, args.overrides)))
        return
    from medgen.core.precision import configure_backends

    configure_backends()  # TF32 on CUDA, as medgen-train sets it
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _phantom_data(tmp / "data", *((3, 32, 16) if args.smoke else ()))
        if args.table or torch.cuda.is_available():  # --3d: the table at the GPU profile's volumes
            print(json.dumps(table(tmp, args, [*(VOLUMES_GPU if args.three_d else []), *args.overrides])))
            return
        overrides = [*(VOLUMES if args.three_d else []), *args.overrides]
        trainer = _trainer(["mode=bravo", "training=cpu", *overrides], tmp)
        result = {"benchmark": "train_step_3d" if args.three_d else "train_step", "mode": "bravo",
                  "shape": list(trainer.space.shape),
                  "network": trainer.network_kwargs["channels"], "device": str(trainer.device),
                  "threads": torch.get_num_threads(), "precision": trainer.train_cfg.precision}
        result.update(compare(trainer, args.steps, args.blocks, warmup=1 if args.smoke else 3))
        target = 1.5 if args.three_d else 1.8
        result["target_speedup"], result["meets_target"] = target, result["speedup"] >= target
        if args.three_d:
            del trainer
            result.update(memory(tmp, overrides, steps=1 if args.smoke else 3))
    print(json.dumps(result))


#: the CPU profile of the 3D benchmark: volumes of 64 x 64 x 32, two per batch
VOLUMES = ["model.image_size=[64,64,32]", "training.batch_size=2"]
#: --smoke: the tiny network, after the profile's overrides (the batch sizes stay the profile's)
SMOKE = smoke.TINY_MODEL
#: --smoke --3d: volumes of 16 x 16 x 8 (after VOLUMES / VOLUMES_GPU, so these win)
SMOKE_VOLUMES = ["model.image_size=[16,16,8]"]
#: the table's volumes with --3d: the GPU profile's 128 x 128 x 64 (batch sizes from --batches)
VOLUMES_GPU = ["model.image_size=[128,128,64]"]


def memory(tmp: Path, overrides: list[str], steps: int = 3) -> dict:
    """Peak resident memory of training steps (MiB above the process's memory before its first
    step), without and with ``training.gradient_checkpointing``, each in a fresh process."""
    import subprocess

    peak = {}
    for name, extra in (("plain", []), ("checkpointing", ["training.gradient_checkpointing=true"])):
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(tmp), "--steps", str(steps), *overrides,
                              *extra], capture_output=True, text=True, check=True)
        peak[name] = json.loads(out.stdout.strip().splitlines()[-1])["step_peak_mib"]
    return {"step_peak_mib": peak["plain"], "step_peak_mib_checkpointing": peak["checkpointing"],
            "memory_ratio_checkpointing": round(peak["checkpointing"] / peak["plain"], 3)}


def _memory_child(tmp: Path, steps: int, overrides: list[str]) -> dict:
    trainer = _trainer(["mode=bravo", "training=cpu", *overrides], tmp)
    batches = _fixed_batches(trainer.data.train, trainer.train_cfg.batch_size)
    gc.collect()
    before = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # Linux: the peak (VmHWM) starts again from now
        f.write("5")
    for i in range(steps):
        trainer.train_step(batches[i % len(batches)])
        trainer.step += 1
    return {"step_peak_mib": round(_status_mib("VmHWM") - before, 1)}


def _status_mib(field: str) -> float:
    """A memory figure of this process from ``/proc/self/status``, in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:")) / 1024


if __name__ == "__main__":
    main()
