"""``medgen-augment``: the targeted-augmentation experiment (see medgen.evaluation.augmentation).

One synthetic set per size target from the same two checkpoints (made with ``medgen-generate``'s
defaults and resumed when the folder exists), then the downstream segmenter trained on real, and
on real + each set, over seeds, scored lesion by lesion per size bin on the real test split:

    medgen-augment --real data/phantoms --seg runs/seg/<run> --image runs/bravo/<run> --out augment
    medgen-augment ... --target real=real --target small=tiny:4,small:2,medium:1,large:1 --num-images 200
    medgen-augment ... --generate lesion_sizes.bins=[3,6,10,20] --generate steps=50
    medgen-augment --real data/phantoms --synthetic real=synth_a --synthetic small=synth_b --out augment
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

#: the default targets: the training classes, and tiny and small lesions oversampled
DEFAULT_TARGETS = ("real=real", "small=tiny:4,small:2,medium:1,large:1")


def parse_target(text: str) -> tuple[str, object]:
    """``name=preset`` or ``name=bin:weight,bin:weight`` -> (name, lesion_sizes.target)."""
    name, _, spec = text.partition("=")
    if not name or not spec:
        raise ValueError(f"--target {text!r}: use NAME=real|uniform or NAME=tiny:4,small:2,...")
    if ":" not in spec:
        return name, spec
    try:
        return name, {k: float(v) for k, v in (part.split(":") for part in spec.split(","))}
    except ValueError:
        raise ValueError(f"--target {text!r}: weights are BIN:NUMBER pairs separated by commas") from None


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="medgen-augment", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", type=Path, required=True, help="the real medgen dataset (train/ and test/)")
    ap.add_argument("--out", type=Path, required=True, help="folder for the synthetic sets and the results")
    ap.add_argument("--seg", help="seg checkpoint or run folder (to generate the sets)")
    ap.add_argument("--image", help="image (bravo/dual) checkpoint or run folder (to generate the sets)")
    ap.add_argument("--target", action="append", metavar="NAME=SPEC",
                    help=f"a synthetic set: NAME=real|uniform or NAME=BIN:WEIGHT,... (default: {' '.join(DEFAULT_TARGETS)})")
    ap.add_argument("--synthetic", action="append", metavar="NAME=DIR", help="use an existing synthetic set instead")
    ap.add_argument("--num-images", type=int, default=200, help="masks per generated set (default 200)")
    ap.add_argument("--guidance", type=float, default=1.0, help="lesion_sizes.guidance of a size-conditioned seg model")
    ap.add_argument("--seeds", default="0,1,2", help="downstream seeds (default 0,1,2)")
    ap.add_argument("--steps", type=int, default=1000, help="downstream training steps per network (default 1000)")
    ap.add_argument("--generate", action="append", default=[], metavar="KEY=VALUE",
                    help="a medgen-generate setting for every set, e.g. --generate steps=50 --generate gate.max_area=0.2")
    ap.add_argument("--cache-dir", default="~/.cache/medgen")
    ap.add_argument("--seed", type=int, default=0, help="generation seed")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    from medgen.scripts._cli import exit_on_user_error

    with exit_on_user_error("medgen-augment"):
        run(args)
    return 0


def run(args: argparse.Namespace) -> dict:
    from omegaconf import OmegaConf

    from medgen.core.distributed import default_device
    from medgen.core.schema import ConfigError
    from medgen.evaluation.augmentation import run_experiment
    from medgen.evaluation.config import validate_evaluate_config

    out = args.out.resolve()
    try:
        sets = dict(s.split("=", 1) for s in args.synthetic) if args.synthetic else None
        targets = dict(parse_target(t) for t in (args.target or DEFAULT_TARGETS)) if not sets else {}
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError as exc:
        raise ConfigError("--synthetic" if args.synthetic else "--target", str(exc)) from None
    if sets is None:
        if not (args.seg and args.image):
            raise ConfigError("--seg", "give --seg and --image to generate the synthetic sets, or --synthetic NAME=DIR")
        sets = {name: _generate(args, name, target, out) for name, target in targets.items()}
    cfg = validate_evaluate_config(OmegaConf.create({
        "real_dir": str(args.real), "synthetic_dir": str(next(iter(sets.values()))), "out_dir": str(out),
        "seeds": seeds, "budget": {"steps": args.steps}, "cache_dir": args.cache_dir}))
    result = run_experiment(cfg, {k: Path(v) for k, v in sets.items()}, out, default_device(), progress=True)
    print(f"\nmedgen-augment: {out / 'augmentation.md'}")
    for name, s in result["sets"].items():
        print(f"  trained on {name:<16} sensitivity " + ", ".join(
            f"{b} {v['sensitivity']:.2f}" if v["sensitivity"] is not None else f"{b} -" for b, v in s["mean"].items()))
    return result


def _generate(args: argparse.Namespace, name: str, target: object, out: Path) -> Path:
    from omegaconf import OmegaConf

    from medgen.generation import generate

    folder = out / f"synthetic_{name}"
    # lesion counts as the model draws them: the experiment varies sizes (--generate lesion_counts.target=real targets both)
    settings = OmegaConf.merge({"lesion_counts": {"target": "model"}}, OmegaConf.from_dotlist(args.generate), {
        "seg_checkpoint": args.seg, "image_checkpoint": args.image, "num_images": args.num_images,
        "out_dir": str(folder), "cache_dir": args.cache_dir, "seed": args.seed,
        "lesion_sizes": {"target": target, "guidance": args.guidance}})
    result = generate(**OmegaConf.to_container(settings))
    if result.status != "done":
        raise KeyboardInterrupt
    return folder


if __name__ == "__main__":
    sys.exit(main())
