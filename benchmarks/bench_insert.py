"""Insertion speed: lesions painted per second into real-size scans by a painter that works on
windows, against whole pairs generated per second by the pipeline, same network, in one process.

A lesion needs its neighbourhood, not the whole scan: a painter paints a window of ``--window`` W
around each new lesion into scans of ``--scan`` S, where whole-image generation samples the whole
S twice (mask, then image). Both sides use the same network (``model.channels``, levels, attention,
heads: the ``training=cpu`` network, or the specification's on CUDA), the same strategy
(``--strategy``), sampler (its first: Euler for rectified flow, DPM-Solver++ 2M for DDPM), steps,
batch size and precision. Networks have random weights: speed does not depend on them.

* ``pairs_per_s``: ``medgen.generation.generate`` with a seg checkpoint and a bravo checkpoint at
  S, ``--pairs`` pairs, the quality gate open (``gate.enabled=false``: untrained networks draw
  masks no gate would pass), files and previews written.
* ``lesions_per_s``: ``generate`` with ``insert.into`` a phantom dataset written at S (``medgen-data
  phantom``'s code, in a temp folder), ``--lesions`` scans with one new lesion each
  (``lesion_counts.target={1: 1}``, ``lesion_sizes.target={--size-class: 1}``); the lesions counted
  are those ``lesion_sizes.json`` says were painted. Painter (``painter`` in the JSON): ``inpaint``
  where ``mode=inpaint`` exists (a checkpoint at ``model.image_size=S`` with ``mode.window=W``),
  else ``repaint`` with a bravo checkpoint whose sample is W, scans read at ``insert.image_size=S``.

Timing: the wall time of the whole ``generate()`` call on each side (loading the checkpoints,
sampling, writing NIfTI files, previews, manifest and contact sheet; insertion also reads its scans
from the item cache and places the lesions), so both include model loading. One untimed run of
each side (one sample, one step) first builds the item cache and warms up; then the two sides
alternate ``--repeats`` times and the median rate of each is reported (each run's in ``*_runs``).
``ratio`` = lesions_per_s / pairs_per_s (goal >= 5). Both eager (``compile=false``): a compile
inside every timed call would be timed.

    python benchmarks/bench_insert.py [--scan 256] [--window 64] [--pairs 2] [--lesions 8] [--batch 2] [--steps 25]
                                      [--repeats 3] [--strategy rflow] [--precision fp32] [--size-class small]
    python benchmarks/bench_insert.py --scan 64,64,48 --window 32,32,32 ...   # volumes
    python benchmarks/bench_insert.py --scan 256,256,160 --window 64,64,64    # the issue's case (CUDA)

``--smoke``: the same on 32 px scans (``--3d``: 32 x 32 x 16) with 16 px windows (16 x 16 x 8), a
16 px network, 2 pairs and 2 lesions of 3 steps, one timed run of each. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

import smoke
from bench_sample import CPU_MODEL, SPEC_MODEL, make_checkpoint
from timing import median_time

GOAL = 5
#: phantom subjects written for the scans (all in train/), and their slices when the scans are slices
SUBJECTS = 3
SLICES_2D = 24


def parse_shape(text: str) -> tuple[int, ...]:
    """``"256"`` -> (256, 256) (slices); ``"64,64,48"`` -> (64, 64, 48) (volumes)."""
    shape = tuple(int(n) for n in text.split(","))
    if len(shape) == 1:
        shape = shape * 2
    if len(shape) not in (2, 3) or min(shape) < 8:
        raise SystemExit(f"bench_insert: a shape is one size (slices) or three (volumes), each >= 8; got {text!r}")
    return shape


def _size(shape: tuple[int, ...]) -> str:
    """A shape as ``model.image_size`` and ``insert.image_size`` take it: ``W`` or ``[X,Y,Z]``."""
    return str(shape[0]) if len(shape) == 2 else "[" + ",".join(map(str, shape)) + "]"


def network(model: list[str], shape: tuple[int, ...]) -> list[str]:
    """The model overrides ``model`` (without its image size) at sample shape ``shape``."""
    return [o for o in model if not o.startswith("model.image_size=")] + [f"model.image_size={_size(shape)}"]


def inpaint_available() -> bool:
    from medgen.diffusion.modes import MODES

    return "inpaint" in MODES


def make_checkpoints(tmp: Path, model: list[str], scan: tuple[int, ...], window: tuple[int, ...],
                     strategy: str) -> dict[str, Path | str]:
    """Random-weight checkpoints of one network: seg and bravo at the scan's shape (the pairs), and
    the painter (``inpaint`` at the scan's shape with ``mode.window``, else a bravo model at the window's)."""
    out: dict[str, Path | str] = {
        "seg": make_checkpoint(tmp / "seg.pt", "seg", strategy, network(model, scan), seed=1),
        "bravo": make_checkpoint(tmp / "bravo.pt", "bravo", strategy, network(model, scan), seed=2)}
    if inpaint_available():
        win = window[0] if len(window) == 2 else "[" + ",".join(map(str, window)) + "]"
        out["painter"] = "inpaint"
        out["painter_checkpoint"] = make_checkpoint(tmp / "inpaint.pt", "inpaint", strategy,
                                                    network(model, scan) + [f"mode.window={win}"], seed=3)
    else:
        out["painter"] = "repaint"
        out["painter_checkpoint"] = make_checkpoint(tmp / "window.pt", "bravo", strategy, network(model, window),
                                                    seed=3)
    return out


def write_scans(root: Path, scan: tuple[int, ...]) -> Path:
    """A phantom dataset whose volumes are (about) the scans' shape: ``SUBJECTS`` subjects in train/."""
    from medgen.data.phantom import generate_dataset

    size, slices = (scan[0], SLICES_2D) if len(scan) == 2 else (max(scan[:2]), scan[2])
    generate_dataset(root, subjects=SUBJECTS, size=size, slices=slices, seed=0, split=(1.0, 0.0, 0.0))
    return root


def pairs_run(tmp: Path, ckpts: dict, n: int, common: dict, name: str) -> tuple[float, int]:
    """Seconds of one whole-pair ``generate()`` call of ``n`` pairs, and the pairs it wrote."""
    from medgen.generation import generate

    result = {}

    def run():
        result["r"] = generate(progress=False, out_dir=str(tmp / name), num_images=n, seg_checkpoint=str(ckpts["seg"]),
                               image_checkpoint=str(ckpts["bravo"]), gate={"enabled": False}, **common)

    seconds = median_time(run, torch.device(common["device"]), repeats=1, warmup=False)
    if result["r"].status != "done":
        raise SystemExit(f"bench_insert: the pair run was stopped ({result['r'].status}); no figure")
    return seconds, len(result["r"].sample_ids)


def insert_run(tmp: Path, ckpts: dict, data: Path, scan: tuple[int, ...], n: int, size_class: str, common: dict,
               name: str) -> tuple[float, int]:
    """Seconds of one insertion ``generate()`` call into ``n`` scans (one new lesion each), and the
    lesions it painted (``lesion_sizes.json``)."""
    from medgen.generation import generate

    result = {}

    def run():
        result["r"] = generate(progress=False, out_dir=str(tmp / name), num_images=n,
                               image_checkpoint=str(ckpts["painter_checkpoint"]),
                               insert={"into": str(data), "painter": ckpts["painter"],
                                       "image_size": _insert_size(scan)},
                               lesion_counts={"target": {1: 1}}, lesion_sizes={"target": {size_class: 1}}, **common)

    seconds = median_time(run, torch.device(common["device"]), repeats=1, warmup=False)
    if result["r"].status != "done":
        raise SystemExit(f"bench_insert: the insertion run was stopped ({result['r'].status}); no figure")
    return seconds, int(sum(result["r"].sizes["sizes"]["painted"]))


def _insert_size(scan: tuple[int, ...]) -> int | list[int]:
    return scan[0] if len(scan) == 2 else list(scan)


def measure(tmp: Path, args: argparse.Namespace, model: list[str], device: torch.device) -> dict:
    """Both rates (the median of ``args.repeats`` alternating timed runs after one untimed run each)."""
    scan, window = parse_shape(args.scan), parse_shape(args.window)
    if len(scan) != len(window) or any(w > s for w, s in zip(window, scan)):
        raise SystemExit(f"bench_insert: --window {args.window} must have as many axes as --scan {args.scan} and "
                         "fit inside it")
    ckpts = make_checkpoints(tmp, model, scan, window, args.strategy)
    data = write_scans(tmp / "scans", scan)
    common = {"batch_size": args.batch, "steps": args.steps, "device": str(device), "compile": "false",
              "cache_dir": str(tmp / "cache"), **({"precision": args.precision} if args.precision else {})}
    warm = {**common, "steps": 1}  # untimed, one sample of one step each: first calls, and the item cache built
    pairs_run(tmp, ckpts, 1, warm, "pairs_warmup")
    insert_run(tmp, ckpts, data, scan, 1, args.size_class, warm, "insert_warmup")
    pair_rates, lesion_rates, lesions = [], [], 0
    for r in range(args.repeats):
        seconds, pairs = pairs_run(tmp, ckpts, args.pairs, common, f"pairs_{r}")
        pair_rates.append(pairs / seconds)
        seconds, lesions = insert_run(tmp, ckpts, data, scan, args.lesions, args.size_class, common, f"insert_{r}")
        lesion_rates.append(lesions / seconds)
    from medgen.core.precision import cpu_has_native_bf16
    from medgen.generation import generate_config, load_stage

    precision = generate_config(seg_checkpoint=str(ckpts["seg"]), image_checkpoint=str(ckpts["bravo"]),
                                **common).precision  # both sides ran at it
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        precision = "fp32 (bf16 asked; this CPU has no native bf16)"
    stage = load_stage(ckpts["bravo"], "image", "bench", device=device, compile="false")
    lesions_per_s, pairs_per_s = statistics.median(lesion_rates), statistics.median(pair_rates)
    return {"painter": ckpts["painter"], "scan": list(scan), "window": list(window),
            "sampler": stage.strategy.samplers[0], "precision": precision, "pairs": args.pairs, "lesions": lesions,
            "lesions_per_s": _sig(lesions_per_s), "pairs_per_s": _sig(pairs_per_s),
            "ratio": _sig(lesions_per_s / pairs_per_s), "lesions_per_s_runs": [_sig(v) for v in lesion_rates],
            "pairs_per_s_runs": [_sig(v) for v in pair_rates]}


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scan", default="256", help="scan shape S: one size (slices) or X,Y,Z (volumes)")
    ap.add_argument("--window", default="64", help="painter window W, as --scan")
    ap.add_argument("--3d", dest="three_d", action="store_true", help="with --smoke: volumes")
    ap.add_argument("--pairs", type=int, default=2, help="whole pairs per timed run")
    ap.add_argument("--lesions", type=int, default=8, help="scans per timed insertion run, one new lesion each")
    ap.add_argument("--batch", type=int, default=2, help="generate's batch_size on both sides")
    ap.add_argument("--steps", type=int, default=25, help="sampler steps on both sides")
    ap.add_argument("--strategy", default="rflow", choices=("rflow", "ddpm"), help="every model's strategy")
    ap.add_argument("--precision", default=None, choices=("bf16", "fp32"), help="default: generate.yaml's")
    ap.add_argument("--size-class", default="small", help="RANO-BM class of every new lesion")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each side (alternating); median")
    smoke.add_flag(ap)
    args = ap.parse_args()
    smoke_sizes = {"scan": "32,32,16", "window": "16,16,8"} if args.three_d else {"scan": "32", "window": "16"}
    args = smoke.apply(ap, args, {**smoke_sizes, "pairs": 2, "lesions": 2, "batch": 2, "steps": 3, "repeats": 1})
    from medgen.core.distributed import default_device

    device = default_device()
    model = smoke.TINY_MODEL if args.smoke else SPEC_MODEL if device.type == "cuda" else CPU_MODEL
    result: dict = {"benchmark": "insert", "device": str(device), "threads": torch.get_num_threads(),
                    "network": model[1].split("=")[1], "strategy": args.strategy, "steps": args.steps,
                    "batch_size": args.batch,
                    "size_class": args.size_class, "timed": "whole generate() call"}
    with tempfile.TemporaryDirectory() as tmp:
        result.update(measure(Path(tmp), args, model, device))
    result["goal"] = GOAL
    result["meets_goal"] = result["ratio"] >= GOAL
    print(json.dumps(result))


if __name__ == "__main__":
    main()
