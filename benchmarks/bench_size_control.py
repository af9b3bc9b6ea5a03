"""Size control of the mask model: how often a candidate's largest lesion falls in the size class
asked of it, before any gate, for a seg model conditioned on the class (``mode.size_bins=rano_bm``,
``training.cond_dropout=0.1``) against the same recipe unconditioned, in one process.

Both models train with the demo's seg recipe (``training=cpu``, rectified flow, 64 px, the same
seed and number of steps) on a phantom set with lesions of every size (``--lesion-sizes cover``).
Then ``--candidates`` masks are drawn with ``medgen-generate``'s sampler defaults (25 Euler steps,
bf16, EMA), candidate ``j`` asked for the class of slot ``j`` of a ``uniform`` target over the
RANO-BM classes (``--target real``: the classes of the training slices;
:meth:`medgen.generation.sizes.ClassTarget.requested`, exactly what generation asks); the
unconditional model is scored against the same requests (chance).

* ``exact_match_conditioned`` / ``exact_match_unconditional``: share of candidates whose largest
  lesion (Feret diameter at the checkpoint's pixel size) lies in the class asked of it; a candidate
  without lesion is a miss. ``ratio``: conditioned / unconditional. Target for the conditioned
  model: >= 0.5 (the anchor, a model conditioned on per-bin counts, reached 0.015).
* ``per_bin_conditioned`` / ``per_bin_unconditional``: the same per class asked.
* ``by_guidance``: the conditioned model's exact match at each ``--guidance`` scale.

    python benchmarks/bench_size_control.py --out /tmp/sizes [--steps 535] [--candidates 96] [--guidance 1,2,3] [--target uniform|real]
Prints one JSON line (the folder keeps the phantoms and both runs; a second call reuses them).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

RECIPES = {"unconditional": [], "conditioned": ["mode.size_bins=rano_bm", "training.cond_dropout=0.1"]}


def train(out: Path, name: str, steps: int, seed: int) -> Path:
    """The demo's seg recipe for ``steps`` optimizer steps (whole epochs, the cosine schedule over them)."""
    from medgen.core.checkpoint import load_checkpoint
    from medgen.diffusion.config import load_config
    from medgen.diffusion.trainer import DiffusionTrainer
    from medgen.scripts.train import run as train_run

    run_dir = out / "runs" / name
    latest = run_dir / "checkpoints" / "latest.pt"
    if latest.is_file() and load_checkpoint(latest)["step"] >= steps:
        return latest
    base = ["training=cpu", "mode=seg", "strategy=rflow", f"seed={seed}", f"paths.data_dir={out / 'data'}",
            f"paths.model_dir={out / 'runs'}", f"paths.cache_dir={out / 'cache'}", *RECIPES[name]]
    per_epoch = DiffusionTrainer(load_config([*base, "training.epochs=1"]), out / "runs" / ".probe",
                                 progress=False).steps_per_epoch
    epochs = max(1, math.ceil(steps / per_epoch))
    cfg = load_config([*base, f"training.epochs={epochs}", f"training.val_interval={max(1, epochs // 4)}"])
    train_run(cfg, run_dir)
    return latest


def exact_match(checkpoint: Path, candidates: int, guidance: float, seed: int, batch: int,
                target_name: str = "uniform") -> dict:
    """Draw ``candidates`` masks, each asked for its class of a RANO-BM target (``uniform``, or
    ``real``: the classes of the model's training slices); score them."""
    from medgen.core.constants import MASK_KEY
    from medgen.data.lesions import largest_diameter
    from medgen.generation.masks import MASK_STREAM, sample_generators
    from medgen.generation.models import load_stage
    from medgen.generation.sizes import resolve_target

    stage = load_stage(checkpoint, "seg", "seg_checkpoint", device=torch.device("cpu"), compile="false")
    spacing = tuple((stage.spacing or (1.0, 1.0))[:2])
    target = resolve_target(OmegaConf.create({"lesion_sizes": {"target": target_name, "bins": "rano_bm"}}),
                            candidates, stage.image_size, spacing, stage.training_sizes)
    asked = target.requested(range(candidates))
    drawn = []
    for start in range(0, candidates, batch):
        idx = list(range(start, min(candidates, start + batch)))
        cond = None
        if stage.mode.size_conditioned:
            cond = stage.mode.size_condition(torch.from_numpy(1 + asked[idx]), (stage.image_size,) * 2)
        x0 = stage.sample(cond, sample_generators(seed, idx, MASK_STREAM, stage.device), steps=25, sampler="euler",
                          guidance_scale=guidance if cond is not None else 1.0)
        masks = stage.mode.to_outputs(x0)[MASK_KEY][:, 0].numpy().astype(np.uint8)
        drawn += [largest_diameter(m, spacing) for m in masks]
    drawn = np.asarray(drawn)
    hit = (drawn > 0) & (target.bins.index(drawn) == asked)
    return {"exact": float(hit.mean()), "empty": float((drawn == 0).mean()),
            "per_bin": {name: float(hit[asked == b].mean()) for b, name in enumerate(target.bins.names)
                        if (asked == b).any()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=535,
                    help="training steps per model, rounded up to whole epochs (the demo's seg model: 535)")
    ap.add_argument("--subjects", type=int, default=20)
    ap.add_argument("--candidates", type=int, default=96)
    ap.add_argument("--guidance", default="1,2,3", help="guidance scales to score the conditioned model at")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--target", default="uniform", choices=("uniform", "real"),
                    help="the classes asked: uniform over RANO-BM, or real (the training slices' classes)")
    args = ap.parse_args()

    from medgen.core.checkpoint import load_checkpoint
    from medgen.core.precision import configure_backends
    from medgen.data.phantom import generate_dataset

    configure_backends()
    if not (args.out / "data" / "train").is_dir():
        generate_dataset(args.out / "data", subjects=args.subjects, size=128, slices=64, seed=args.seed, workers=2,
                         lesion_sizes="cover")
    ckpts = {name: train(args.out, name, args.steps, args.seed) for name in RECIPES}
    scales = [float(g) for g in args.guidance.split(",")]
    unconditional = exact_match(ckpts["unconditional"], args.candidates, 1.0, args.seed, args.batch, args.target)
    by_guidance = {g: exact_match(ckpts["conditioned"], args.candidates, g, args.seed, args.batch, args.target)
                   for g in scales}
    best = max(scales, key=lambda g: by_guidance[g]["exact"])
    conditioned = by_guidance[scales[0]]
    print(json.dumps({
        "exact_match_conditioned": conditioned["exact"], "exact_match_unconditional": unconditional["exact"],
        "ratio": conditioned["exact"] / max(unconditional["exact"], 1e-9), "guidance": scales[0],
        "per_bin_conditioned": conditioned["per_bin"], "per_bin_unconditional": unconditional["per_bin"],
        "empty_conditioned": conditioned["empty"], "empty_unconditional": unconditional["empty"],
        "by_guidance": {f"{g:g}": r["exact"] for g, r in by_guidance.items()}, "best_guidance": best,
        "steps": {name: int(load_checkpoint(c)["step"]) for name, c in ckpts.items()},
        "candidates": args.candidates, "target": args.target}))


if __name__ == "__main__":
    main()
