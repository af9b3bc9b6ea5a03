"""Time to the first training batch: medgen's slice cache (cold and warm) vs the specification's
approach (MONAI LoadImage on every volume, whole-volume resize, slices extracted in memory on
every run). 20 phantom subjects at 256x256x64, bravo mode at 128 px, batch 16.

Reference, cold and warm run in one process each (``data.num_workers=0``); a second cold build
uses the default ``data.num_workers=2`` (time only). A cold build reads every file once (checks
and preprocessing on the same arrays). Each measurement runs in a fresh child process (so
imports, page cache of the *cache* and peak memory are not shared between them); the NIfTI
files are read once beforehand so every variant sees a warm OS file cache. Peak memory = the
child's peak RSS minus its RSS after imports. Prints one JSON line. Targets: warm >= 20x
faster, warm peak memory <= 1/4 of the reference, cold build with 2 workers >= 1.8x faster.

    python benchmarks/bench_data.py [--subjects 20] [--size 256] [--slices 64] [--data DIR]
``--smoke``: the same measurements on 3 phantoms of 32 x 32 x 16 at 16 px, batch 2 (a check of the script).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import smoke


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def child(kind: str, data_dir: str, cache_dir: str, image_size: int, batch: int, workers: int) -> None:
    import numpy as np  # noqa: F401
    import torch
    from torch.utils.data import DataLoader

    from medgen.data.splits import split_patients
    from medgen.diffusion.config import load_config

    torch.set_num_threads(1)
    cfg = load_config(["mode=bravo", f"model.image_size={image_size}", f"training.batch_size={batch}",
                       f"paths.data_dir={data_dir}", f"paths.cache_dir={cache_dir}", f"data.num_workers={workers}"])
    import monai.transforms as mt  # imported before the baseline in both variants

    base = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    if kind == "medgen":
        from medgen.data.loading import build_data
        from medgen.diffusion.modes import build_mode

        # the slices the trainer takes for this mode (bravo: every slice with enough brain, as the reference)
        bundle = build_data(cfg, progress=False, selection=build_mode(cfg).slice_selection)
        first = next(iter(bundle.train))
    else:
        patients = split_patients(data_dir, "train", cfg.data.val_fraction)
        load = mt.Compose([mt.LoadImaged(["bravo", "seg"], image_only=True, ensure_channel_first=True),
                           mt.Orientationd(["bravo", "seg"], axcodes="RAS"),
                           mt.ScaleIntensityRangePercentilesd("bravo", 0.5, 99.5, 0.0, 1.0, clip=True),
                           mt.Resized("bravo", (image_size, image_size, -1), mode="area"),
                           mt.Resized("seg", (image_size, image_size, -1), mode="nearest")])
        slices = []
        for p in patients:
            vol = load({"bravo": str(p / "bravo.nii.gz"), "seg": str(p / "seg.nii.gz")})
            img, seg = vol["bravo"], vol["seg"]
            for z in range(img.shape[-1]):
                s = img[..., z]
                if float((s > cfg.data.brain_intensity).float().mean()) >= cfg.data.min_brain_fraction:
                    slices.append({"bravo": s.as_tensor().clone(), "seg": (seg[..., z] > 0.5).float().as_tensor()})
        loader = DataLoader(slices, batch_size=batch, shuffle=True, drop_last=True)
        first = next(iter(loader))
    elapsed = time.perf_counter() - t0
    assert first["bravo"].shape == (batch, 1, image_size, image_size), first["bravo"].shape
    print(json.dumps({"seconds": elapsed, "peak_mb": _rss_mb("VmHWM") - base}))


def measure(kind: str, data_dir: Path, cache_dir: Path, image_size: int, batch: int, workers: int = 0) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--data", str(data_dir), "--cache", str(cache_dir),
                          "--image-size", str(image_size), "--batch", str(batch), "--workers", str(workers)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", type=int, default=20)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--slices", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--data", type=Path, default=None, help="existing dataset (default: make phantoms in a temp dir)")
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--child", default=None)
    ap.add_argument("--workers", type=int, default=0)
    smoke.add_flag(ap)
    args = smoke.apply(ap, ap.parse_args(), {"subjects": 3, "size": 32, "slices": 16, "image_size": 16, "batch": 2})
    if args.child:
        child(args.child, str(args.data), str(args.cache), args.image_size, args.batch, args.workers)
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = args.data
        if data is None:
            from medgen.data.phantom import generate_dataset

            data = tmp / "phantoms"
            generate_dataset(data, subjects=args.subjects, size=args.size, slices=args.slices, seed=0,
                             split=(1.0, 0.0, 0.0), workers=2)
        for f in sorted(data.rglob("*.nii.gz")):  # warm the OS file cache for every variant alike
            f.read_bytes()
        cache = tmp / "cache"
        reference = measure("reference", data, cache, args.image_size, args.batch)
        cold = measure("medgen", data, cache, args.image_size, args.batch)
        warm = measure("medgen", data, cache, args.image_size, args.batch)
        # what a user gets with the default data.num_workers=2: checking and building in 2 processes
        # (time only: the worker processes' memory is not in this process's peak)
        cold2 = measure("medgen", data, tmp / "cache2", args.image_size, args.batch, workers=2)
    result = {
        "benchmark": "data_first_batch",
        "subjects": args.subjects,
        "volume": [args.size, args.size, args.slices],
        "mode": "bravo",
        "image_size": args.image_size,
        "batch_size": args.batch,
        "reference_s": round(reference["seconds"], 4),
        "cold_s": round(cold["seconds"], 4),
        "warm_s": round(warm["seconds"], 4),
        "warm_speedup": round(reference["seconds"] / warm["seconds"], 1),
        "cold_speedup": round(reference["seconds"] / cold["seconds"], 2),
        "cold_2_workers_s": round(cold2["seconds"], 4),
        "cold_2_workers_speedup": round(reference["seconds"] / cold2["seconds"], 2),
        "reference_peak_mb": round(reference["peak_mb"], 1),
        "cold_peak_mb": round(cold["peak_mb"], 1),
        "warm_peak_mb": round(warm["peak_mb"], 1),
        "warm_memory_ratio": round(warm["peak_mb"] / max(reference["peak_mb"], 1e-9), 3),
        "targets": {"warm_speedup": 20, "warm_memory_ratio": 0.25, "cold_2_workers_speedup": 1.8},
    }
    result["meets_targets"] = (result["warm_speedup"] >= 20 and result["warm_memory_ratio"] <= 0.25
                               and result["cold_2_workers_speedup"] >= 1.8)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
