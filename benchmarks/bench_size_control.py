"""Size control of the mask model: how often a candidate's largest lesion falls in the size class
asked of it, before any gate, for a seg model conditioned on the class (``mode.size_bins=rano_bm``,
``training.cond_dropout=0.1``) against the same recipe unconditioned, in one process.

Both models train with the demo's seg recipe (``training=cpu``, rectified flow, 64 px, the same
seed and number of steps) on a phantom set with lesions of every size (``--lesion-sizes cover``).
Then ``--candidates`` masks are drawn with ``medgen-generate``'s sampler defaults (25 Euler steps:
``--sample-steps``, bf16, EMA), candidate ``j`` asked for the class of slot ``j`` of a ``uniform`` target over the
RANO-BM classes (``--target real``: the classes of the training slices;
:meth:`medgen.generation.sizes.ClassTarget.requested`, exactly what generation asks); the
unconditional model is scored against the same requests (chance).

* ``exact_match_conditioned`` / ``exact_match_unconditional``: share of candidates whose largest
  lesion (Feret diameter at the checkpoint's pixel size) lies in the class asked of it; a candidate
  without lesion is a miss. ``ratio``: conditioned / unconditional. Target for the conditioned
  model: >= 0.5 (the anchor, a model conditioned on per-bin counts, reached 0.015).
* ``per_bin_conditioned`` / ``per_bin_unconditional``: the same per class asked.
* ``by_guidance``: the conditioned model's exact match at each ``--guidance`` scale.
* ``--counts``: the conditioned model is conditioned on the lesion-count class too
  (``mode.count_classes=[1,2,3,4]``), every candidate is also asked for a count class (of the same
  ``--target``), and ``count_exact_match_*``, ``count_per_class_*``, ``count_by_guidance`` score the
  number of lesions (connected components) drawn against it.

    python benchmarks/bench_size_control.py --out /tmp/sizes [--steps 535] [--candidates 96] [--guidance 1,2,3] [--target uniform|real] [--counts]
Prints one JSON line (the folder keeps the phantoms and both runs; a second call reuses them).
``--smoke``: the same on 4 phantoms of 32 x 32 x 16, a 16 px network, one epoch, 4 candidates of 5 steps (a fresh ``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from medgen.generation.requests import CountRequest, SizeRequest
from medgen.generation.sizes import Targets, resolve_count_target, resolve_target

import smoke

RECIPES = {"unconditional": [], "conditioned": ["mode.size_bins=rano_bm", "training.cond_dropout=0.1"],
           "conditioned_counts": ["mode.size_bins=rano_bm", "mode.count_classes=[1,2,3,4]", "training.cond_dropout=0.1"]}
#: --smoke: the tiny network, batches of 4, few validation samples, no loader workers (after the recipe's overrides)
SMOKE = [*smoke.TINY_MODEL, "training.batch_size=4", "training.num_val_samples=2", "training.num_sample_steps=2",
         "data.num_workers=0"]


def train(out: Path, name: str, steps: int, seed: int, extra: list[str] = ()) -> Path:
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
            f"paths.model_dir={out / 'runs'}", f"paths.cache_dir={out / 'cache'}", *RECIPES[name], *extra]
    per_epoch = DiffusionTrainer(load_config([*base, "training.epochs=1"]), out / "runs" / ".probe",
                                 progress=False).steps_per_epoch
    epochs = max(1, math.ceil(steps / per_epoch))
    cfg = load_config([*base, f"training.epochs={epochs}", f"training.val_interval={max(1, epochs // 4)}"])
    train_run(cfg, run_dir)
    return latest


def requests(checkpoint: Path, candidates: int, target_name: str, counts: bool) -> Targets:
    """The classes asked of candidates ``0 .. candidates-1``: RANO-BM size classes (and with
    ``counts`` the lesion-count classes 1, 2, 3, 4+) of a ``uniform`` or ``real`` target, ``real``
    from the training slices that ``checkpoint`` records."""
    from medgen.generation.models import load_stage

    stage = load_stage(checkpoint, "seg", "seg_checkpoint", device=torch.device("cpu"), compile="false")
    sizes, classes = SizeRequest(target_name, "rano_bm", guidance=1.0), CountRequest(target_name, [1, 2, 3, 4])
    return Targets(resolve_target(sizes, candidates, stage.space, stage.training_sizes),
                   resolve_count_target(classes, candidates, stage.training_counts, 10) if counts else None)


def exact_match(checkpoint: Path, targets: Targets, candidates: int, guidance: float, seed: int, batch: int,
                steps: int = 25) -> dict:
    """Draw ``candidates`` masks, candidate ``j`` asked for its classes of ``targets`` (a model
    conditioned on them is given them; any other is scored against the same requests: chance)."""
    from medgen.core.constants import MASK_KEY
    from medgen.data.lesions import feret_diameters
    from medgen.generation.masks import MASK_STREAM, sample_generators
    from medgen.generation.models import load_stage

    stage = load_stage(checkpoint, "seg", "seg_checkpoint", device=torch.device("cpu"), compile="false")
    spacing = stage.space.mm
    asked = {name: t.requested(range(candidates)) for name, t in targets.items()}
    largest, lesions = [], []
    for start in range(0, candidates, batch):
        idx = list(range(start, min(candidates, start + batch)))
        cond = None
        if stage.mode.lesion_conditioned:
            classes = {name: torch.from_numpy(1 + a[idx]) for name, a in asked.items()}
            cond = stage.mode.lesion_condition(stage.space.shape, classes.get("sizes"), classes.get("counts"))
        x0 = stage.sample(cond, sample_generators(seed, idx, MASK_STREAM, stage.device), steps=steps, sampler="euler",
                          guidance_scale=guidance if cond is not None else 1.0)
        for m in stage.mode.to_outputs(x0)[MASK_KEY][:, 0].numpy().astype(np.uint8):
            d = feret_diameters(m, spacing)
            largest.append(max(d, default=0.0))
            lesions.append(len(d))
    drawn = {"sizes": np.asarray(largest), "counts": np.asarray(lesions, dtype=np.float64)}
    out = {"empty": float((drawn["counts"] == 0).mean())}
    for name, t in targets.items():
        hit = (drawn[name] > 0) & (t.bins.index(drawn[name]) == asked[name])
        out[name] = {"exact": float(hit.mean()), "per_bin": {c: float(hit[asked[name] == b].mean())
                                                             for b, c in enumerate(t.bins.names) if (asked[name] == b).any()}}
    return out


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
    ap.add_argument("--sample-steps", type=int, default=25, help="Euler steps per candidate (medgen-generate's 25)")
    ap.add_argument("--target", default="uniform", choices=("uniform", "real"),
                    help="the classes asked: uniform over RANO-BM, or real (the training slices' classes)")
    ap.add_argument("--counts", action="store_true",
                    help="condition on the lesion-count class (1, 2, 3, 4+) too, and score the count match")
    smoke.add_flag(ap)
    args = smoke.apply(ap, ap.parse_args(), {"steps": 2, "subjects": 4, "candidates": 4, "guidance": "1,2", "batch": 4,
                                             "sample_steps": 5})

    from medgen.core.checkpoint import load_checkpoint
    from medgen.core.precision import configure_backends
    from medgen.data.phantom import generate_dataset

    configure_backends()
    if not (args.out / "data" / "train").is_dir():
        size, slices = (32, 16) if args.smoke else (128, 64)
        generate_dataset(args.out / "data", subjects=args.subjects, size=size, slices=slices, seed=args.seed, workers=2,
                         lesion_sizes="cover")
    names = ["unconditional", "conditioned_counts" if args.counts else "conditioned"]
    ckpts = {name: train(args.out, name, args.steps, args.seed, SMOKE if args.smoke else []) for name in names}
    scales = [float(g) for g in args.guidance.split(",")]
    targets = requests(ckpts[names[1]], args.candidates, args.target, args.counts)
    unconditional = exact_match(ckpts["unconditional"], targets, args.candidates, 1.0, args.seed, args.batch,
                                args.sample_steps)
    by_guidance = {g: exact_match(ckpts[names[1]], targets, args.candidates, g, args.seed, args.batch, args.sample_steps)
                   for g in scales}
    best = max(scales, key=lambda g: by_guidance[g]["sizes"]["exact"])
    conditioned = by_guidance[scales[0]]
    result = {
        "exact_match_conditioned": conditioned["sizes"]["exact"],
        "exact_match_unconditional": unconditional["sizes"]["exact"],
        "ratio": conditioned["sizes"]["exact"] / max(unconditional["sizes"]["exact"], 1e-9), "guidance": scales[0],
        "per_bin_conditioned": conditioned["sizes"]["per_bin"], "per_bin_unconditional": unconditional["sizes"]["per_bin"],
        "empty_conditioned": conditioned["empty"], "empty_unconditional": unconditional["empty"],
        "by_guidance": {f"{g:g}": r["sizes"]["exact"] for g, r in by_guidance.items()}, "best_guidance": best}
    if args.counts:
        result.update({
            "count_exact_match_conditioned": conditioned["counts"]["exact"],
            "count_exact_match_unconditional": unconditional["counts"]["exact"],
            "count_per_class_conditioned": conditioned["counts"]["per_bin"],
            "count_per_class_unconditional": unconditional["counts"]["per_bin"],
            "count_by_guidance": {f"{g:g}": r["counts"]["exact"] for g, r in by_guidance.items()}})
    print(json.dumps({**result, "steps": {name: int(load_checkpoint(c)["step"]) for name, c in ckpts.items()},
                      "candidates": args.candidates, "target": args.target, "model": names[1]}))


if __name__ == "__main__":
    main()
