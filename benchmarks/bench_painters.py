"""Insertion's painters compared on phantoms: ``inpaint`` (a model trained to fill hidden regions),
``repaint`` (the bravo model, the scan put back outside the region at every step; no new training)
and ``copy`` (real lesions of other patients, feathered), in one process.

1. Phantoms (``--subjects`` at 128 x 128 x 64), slices at ``--size`` px; a bravo model and an inpaint
   model (``mode.window=--window``), each the ``training=cpu`` network, rectified flow, ``--steps``
   steps from the same seed, on the train split.
2. **Repainting real lesions** (a ground truth exists): around each of ``--lesions`` real lesions of
   ``--heldout`` phantoms no model saw (another seed, lesions of every size: ``cover``), the region (the lesion grown by ``--margin`` voxels as insertion grows it) is
   hidden and painted again given the real mask, by inpaint and by repaint (same seeds and windows);
   ``mae``: mean absolute error against the real scan inside the regions (bravo in [0, 1]), and the
   lesions' contrast (mean in the lesion / mean on the region's rim) against the real one.
3. **Insertion**: one new lesion into each of ``--lesions`` held-out scans by each painter (the same
   scans, shapes and places: one seed), and each run's ``lesion_sizes.json`` figures: ``seam``
   (gradient on the region's border after / before painting, 1 = none), the new lesions' contrast,
   and ``lesions_per_s`` (whole ``medgen-generate`` runs, model loading included).

    python benchmarks/bench_painters.py [--work /tmp/medgen-painters] [--steps 400] [--lesions 48]
``--smoke``: 8 subjects, 32 px, 4 steps, 4 lesions. ``--work`` keeps the phantoms and models for a rerun.
Prints one JSON line; ``mae_repaint_vs_inpaint`` > 1 means the inpaint model paints closer to the truth.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

PAINTERS = ("inpaint", "repaint", "copy")


def _train(work: Path, mode: str, size: int, steps: int, window: int, subjects: int) -> Path:
    """A ``training=cpu`` model of ``mode`` on the phantoms, ``steps`` steps (reused when trained)."""
    from medgen.core.distributed import DistInfo
    from medgen.diffusion.config import load_config
    from medgen.diffusion.trainer import DiffusionTrainer

    run = work / "runs" / mode
    if (run / "checkpoints" / "latest.pt").is_file():
        return run / "checkpoints" / "latest.pt"
    extra = [f"mode.window={window}"] if mode == "inpaint" else []
    cfg = load_config(["training=cpu", f"mode={mode}", "strategy=rflow", "seed=0", f"model.image_size={size}",
                       f"paths.data_dir={work / 'data'}", f"paths.model_dir={work / 'runs'}",
                       f"paths.cache_dir={work / 'cache'}", f"training.max_steps={steps}", "training.val_interval=1000",
                       "data.num_workers=0", *(["model.channels=[16,32]", "model.attention_levels=[false,false]",
                                                "model.norm_num_groups=8"] if steps < 50 else []), *extra])
    DiffusionTrainer(cfg, run, DistInfo(device=torch.device("cpu")), progress=False).train()
    return run / "checkpoints" / "latest.pt"


def repaint_real_lesions(checkpoints: dict[str, Path], work: Path, n: int, margin: int, steps: int,
                         split: str) -> dict:
    """Step 2: real test lesions hidden and painted again by each model painter."""
    from medgen.generation.insert_paint import Window, paint_windows, painter_window
    from medgen.generation.insert_place import grow
    from medgen.generation.insert_sources import open_scans
    from medgen.generation.models import load_stage
    from medgen.generation.requests import InsertRequest

    out = {}
    for painter in ("inpaint", "repaint"):
        stage = load_stage(checkpoints["inpaint" if painter == "inpaint" else "bravo"], "image", "image_checkpoint", device=torch.device("cpu"),
                           precision="fp32")
        request = InsertRequest(str(work / "heldout"), split, painter, False, margin, "real", None, None, ("bravo",), None,
                                str(work / "cache"))
        scans = open_scans(request, stage)
        window = painter_window(stage)
        items = [int(i) for i in np.flatnonzero(scans.cache.lesion_pixels > 0)][:n]
        images, masks, brains, windows = [], [], [], []
        for k, i in enumerate(items):
            seg, brain = scans.masks(i)
            region = grow(seg, margin) & brain
            box = _window(np.argwhere(seg).mean(0).round().astype(int), seg.shape, window)
            images.append(scans.images(i)), masks.append(seg), brains.append(brain)
            windows.append(Window(k, box, region[box], 1000 + k))
        painted = paint_windows(stage, painter, images, masks, brains, windows, steps, stage.strategy.samplers[0],
                                1.0, 16)
        errors, contrast, real_contrast = [], [], []
        for w, p in zip(windows, painted):
            truth = images[w.sample][0][w.box]
            errors.append(np.abs(p[0] - truth)[w.region])
            lesion = masks[w.sample][w.box]
            rim = w.region & ~_eroded(w.region)
            contrast.append(p[0][lesion].mean() / max(1e-6, p[0][rim & ~lesion].mean()))
            real_contrast.append(truth[lesion].mean() / max(1e-6, truth[rim & ~lesion].mean()))
        out[painter] = {"mae": float(np.concatenate(errors).mean()), "lesion_contrast": float(np.mean(contrast)),
                        "real_lesion_contrast": float(np.mean(real_contrast)), "lesions": len(windows)}
    return out


def _eroded(region: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_erosion(region, np.ones((3,) * region.ndim, bool), border_value=1)


def _window(centre: np.ndarray, shape, window) -> tuple[slice, ...]:
    starts = [int(np.clip(c - w // 2, 0, n - w)) for c, n, w in zip(centre, shape, window)]
    return tuple(slice(s, s + w) for s, w in zip(starts, window))


def insert_lesions(checkpoints: dict[str, Path], work: Path, n: int, margin: int, steps: int, split: str) -> dict:
    """Step 3: one new lesion into each of ``n`` test scans, by each painter."""
    from medgen.generation import generate

    out = {}
    for painter in PAINTERS:
        t0 = time.perf_counter()
        result = generate(progress=False, out_dir=str(work / "inserted" / painter), num_images=n, steps=steps,
                          image_checkpoint=str(checkpoints["inpaint" if painter == "inpaint" else "bravo"]),
                          cache_dir=str(work / "cache"), precision="fp32", batch_size=16,
                          insert={"into": str(work / "heldout"), "split": split, "painter": painter, "margin": margin},
                          lesion_sizes={"target": {"tiny": 1, "small": 1}}, lesion_counts={"target": {"1": 1}})
        seconds = time.perf_counter() - t0
        out[painter] = {**result.sizes["seam"], "lesions_per_s": n / seconds}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/medgen-painters"))
    ap.add_argument("--subjects", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--steps", type=int, default=400, help="training steps per model")
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--lesions", type=int, default=48)
    ap.add_argument("--margin", type=int, default=2)
    ap.add_argument("--heldout", type=int, default=8, help="phantoms no model saw (all in test/), painted into")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        args.subjects, args.size, args.window, args.steps, args.sample_steps, args.lesions = 8, 32, 16, 4, 3, 4
        args.heldout = 4
    from medgen.data.phantom import generate_dataset

    torch.manual_seed(0)
    if not (args.work / "data" / "test").is_dir():
        generate_dataset(args.work / "data", subjects=args.subjects, size=128 if not args.smoke else 64,
                         slices=64 if not args.smoke else 32, seed=0, workers=2)
    if not (args.work / "heldout").is_dir():  # unseen subjects (another seed), lesions of every size
        generate_dataset(args.work / "heldout", subjects=args.heldout, size=128 if not args.smoke else 64,
                         slices=64 if not args.smoke else 32, seed=1, workers=2, split=(0.0, 0.0, 1.0),
                         lesion_sizes="cover")
    checkpoints = {mode: _train(args.work, mode, args.size, args.steps, args.window, args.subjects)
                   for mode in ("bravo", "inpaint")}
    real = repaint_real_lesions(checkpoints, args.work, args.lesions, args.margin, args.sample_steps, "test")
    inserted = insert_lesions(checkpoints, args.work, args.lesions, args.margin, args.sample_steps, "test")
    result = {"benchmark": "painters", "size": args.size, "window": args.window, "train_steps": args.steps,
              "sample_steps": args.sample_steps, "margin": args.margin, "subjects": args.subjects, "heldout": args.heldout,
              "repainted_real_lesions": real, "inserted": inserted,
              "mae_repaint_vs_inpaint": real["repaint"]["mae"] / real["inpaint"]["mae"],
              "seam_repaint_vs_inpaint": inserted["repaint"]["seam"] / inserted["inpaint"]["seam"]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
