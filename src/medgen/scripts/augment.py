"""``medgen-augment``: the targeted-augmentation experiment (see medgen.evaluation.augmentation).

One synthetic set per size target from the same two checkpoints (made with ``medgen-generate``'s
defaults and resumed when the folder exists), then the downstream segmenter trained on real, and
on real + each set, over seeds, scored lesion by lesion per size bin on the real test split:

    medgen-augment --real data/phantoms --seg runs/seg/<run> --image runs/bravo/<run> --out augment
    medgen-augment ... --target real=real --target small=tiny:4,small:2,medium:1,large:1 --num-images 200
    medgen-augment ... --generate steps=50 --generate 'lesion_sizes.bins=[3,6,10,20]' --target real=real \
        --target 'small=<3mm:4,3-6mm:2,6-10mm:1'    # other bins: targets by their names, scored by them
    medgen-augment --real data/phantoms --synthetic real=synth_a --synthetic small=synth_b --out augment

The four arms (real only; real + copy-paste; real + diffusion insertion; real + whole-image synthesis),
each set adding one lesion per image, so N images add N lesions in every arm:

    medgen-augment --real data/phantoms --seg runs/seg/<run> --image runs/bravo/<run> --out arms \
        --target synthesis=tiny:1,small:1 --insert copy=copy --insert repaint=repaint \
        --insert-target tiny:1,small:1 --num-images 96
    medgen-augment ... --insert inpaint=inpaint:runs/inpaint/<run>   # a painter's own checkpoint

--insert NAME=PAINTER[:CHECKPOINT] paints new lesions into the real train scans of --real (copy, repaint
or inpaint; the checkpoint defaults to --image) at the sizes of --insert-target (default real).
--synthetic takes ready-made sets instead of generating them: the generation flags (--seg, --image,
--target, --insert, --insert-target, --num-images, --guidance, --seed, --generate) are refused beside it. Every setting is
checked before anything is generated or trained; a bad one is one line naming its flag.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import sys
from pathlib import Path

#: the default targets: the training classes, and tiny and small lesions oversampled
DEFAULT_TARGETS = ("real=real", "small=tiny:4,small:2,medium:1,large:1")
#: the generation flags and their defaults (None in the parsed arguments: not given)
GENERATION_DEFAULTS = {"num_images": 200, "guidance": 1.0, "seed": 0}
#: medgen-generate keys that a flag of medgen-augment sets (``--generate KEY=...`` is refused for them)
FLAG_OF_GENERATE_KEY = {"seg_checkpoint": "--seg", "image_checkpoint": "--image", "num_images": "--num-images",
                        "seed": "--seed", "lesion_sizes.target": "--target", "lesion_sizes.guidance": "--guidance",
                        "out_dir": "--out", "cache_dir": "--cache-dir", "insert.into": "--insert",
                        "insert.painter": "--insert"}
#: --generate keys of the whole-image sets only (their masks: real ones with masks_from instead of --seg's)
WHOLE_IMAGE_KEYS = ("masks_from", "masks_split")
#: the painters of --insert (insert.painter); copy is the copy-paste baseline
PAINTERS = ("copy", "repaint", "inpaint")
#: lesion_counts.target of every set when --insert is given: one lesion per image, so the arms add equal numbers
ONE_LESION = {"1": 1}  # one lesion per image (lesion_counts.target)
#: medgen-evaluate keys that a flag of medgen-augment sets
FLAG_OF_EVALUATE_KEY = {"real_dir": "--real", "seeds": "--seeds", "budget.steps": "--steps", "budget.precision": "--precision",
                        "cache_dir": "--cache-dir", "lesions.bins": "--generate lesion_sizes.bins"}
#: a set's name: a label and part of a folder name
NAME = re.compile(r"[\w.+-]+")


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


def default_cache_dir() -> str:
    """``$MEDGEN_CACHE_DIR`` when set (as the shipped configs' ``${oc.env:MEDGEN_CACHE_DIR,...}``), else ``~/.cache/medgen``."""
    return os.environ.get("MEDGEN_CACHE_DIR") or "~/.cache/medgen"


def build_parser() -> argparse.ArgumentParser:
    """medgen-augment's arguments."""
    ap = argparse.ArgumentParser(prog="medgen-augment", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", type=Path, required=True, help="the real medgen dataset (train/ and test/)")
    ap.add_argument("--out", type=Path, required=True, help="folder for the synthetic sets and the results")
    ap.add_argument("--seg", help="seg checkpoint or run folder (to generate the sets)")
    ap.add_argument("--image", help="image (bravo/dual) checkpoint or run folder (to generate the sets)")
    ap.add_argument("--target", action="append", metavar="NAME=SPEC",
                    help=f"a synthetic set: NAME=real|uniform or NAME=BIN:WEIGHT,... (default: {' '.join(DEFAULT_TARGETS)})")
    ap.add_argument("--insert", action="append", metavar="NAME=PAINTER[:CHECKPOINT]",
                    help="a set of real train scans with new lesions painted in (copy, repaint or inpaint; checkpoint: "
                         "--image unless given); with it every set adds one lesion per image")
    ap.add_argument("--insert-target", metavar="SPEC",
                    help="lesion_sizes.target of the --insert sets: real|uniform or BIN:WEIGHT,... (default real)")
    ap.add_argument("--synthetic", action="append", metavar="NAME=DIR",
                    help="use an existing synthetic set instead of generating (all of one kind: 2D or 3D, one size)")
    ap.add_argument("--num-images", type=int, help=f"masks per generated set (default {GENERATION_DEFAULTS['num_images']})")
    ap.add_argument("--guidance", type=float, help="lesion_sizes.guidance of a size-conditioned seg model (default 1: off)")
    ap.add_argument("--seed", type=int, help=f"generation seed (default {GENERATION_DEFAULTS['seed']})")
    ap.add_argument("--generate", action="append", metavar="KEY=VALUE",
                    help="a medgen-generate setting for every set, e.g. --generate steps=50 --generate gate.max_area=0.2")
    ap.add_argument("--seeds", default="0,1,2", help="downstream seeds (default 0,1,2)")
    ap.add_argument("--steps", type=int, default=1000, help="downstream training steps per network (default 1000)")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="the downstream segmenters' training: fp32 (default) or bf16 autocast (about twice as fast "
                         "on a CPU with AMX or a GPU), as medgen-evaluate's budget.precision; generation's own "
                         "precision is --generate precision=...")
    ap.add_argument("--cache-dir", default=default_cache_dir(),
                    help="slice caches (default: $MEDGEN_CACHE_DIR when set, else ~/.cache/medgen)")
    return ap


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    from medgen.scripts._cli import exit_on_user_error

    with exit_on_user_error("medgen-augment"):
        run(args)
    return 0


def run(args: argparse.Namespace) -> dict:
    from medgen.core.distributed import default_device
    from medgen.core.schema import ConfigError
    from medgen.evaluation.augmentation import run_experiment

    out = args.out.resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", f"{args.out}: a file, and the results need a folder")
    seeds = _seeds(args.seeds)
    if args.synthetic:
        _refuse_generation_flags(args)
        sets = _synthetic_sets(args.synthetic)
        cfg = _evaluate_config(args, seeds, out, next(iter(sets.values())), bins=None)
    else:
        settings = _generate_settings(args, out)  # every set's, checked before the first is generated
        bins = next(iter(settings.values())).lesion_sizes.bins
        cfg = _evaluate_config(args, seeds, out, out / f"synthetic_{next(iter(settings))}", bins=bins)
        sets = {name: _generate(s, args) for name, s in settings.items()}
    result = run_experiment(cfg, sets, out, default_device(), progress=True)
    print(f"\nmedgen-augment: {out / 'augmentation.md'}")
    for name, s in result["sets"].items():
        print(f"  trained on {name:<16} sensitivity " + ", ".join(
            f"{b} {v['sensitivity']:.2f}" if v["sensitivity"] is not None else f"{b} -" for b, v in s["mean"].items()))
    return result


def _seeds(text: str) -> list[int]:
    from medgen.core.schema import ConfigError

    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0:
        raise ConfigError("--seeds", f"{text!r}: use integers >= 0 separated by commas, e.g. 0,1,2")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise ConfigError("--seeds", f"{text!r}: seed {twice[0]} is given twice (it would train the same network again)")
    return seeds


def _named(flag: str, items: list[tuple[str, object]]) -> dict[str, object]:
    """``items`` as a dict, every name a valid one and given once."""
    from medgen.core.schema import ConfigError

    out: dict[str, object] = {}
    for name, value in items:
        if not NAME.fullmatch(name):
            raise ConfigError(flag, f"{name!r}: a set's name is letters, digits and _ . + - (it names a folder)")
        if name in out:
            raise ConfigError(flag, f"the name {name!r} is given twice")
        out[name] = value
    return out


def _synthetic_sets(texts: list[str]) -> dict[str, Path]:
    from medgen.core.paths import resolve_path
    from medgen.core.schema import ConfigError

    items = []
    for text in texts:
        name, eq, folder = text.partition("=")
        if not eq or not name or not folder:
            raise ConfigError("--synthetic", f"{text!r}: use NAME=DIR, e.g. --synthetic small=synthetic_small")
        items.append((name, folder))
    sets = _named("--synthetic", items)
    for name, folder in sets.items():
        if not resolve_path(folder).is_dir():
            raise ConfigError("--synthetic", f"{name}={folder}: no such folder")
    return {name: resolve_path(folder) for name, folder in sets.items()}


def _refuse_generation_flags(args: argparse.Namespace) -> None:
    """With ``--synthetic`` nothing is generated: a generation flag beside it would be dropped."""
    from medgen.core.schema import ConfigError

    given = [flag for flag, value in (("--target", args.target), ("--insert", args.insert),
                                      ("--insert-target", args.insert_target), ("--seg", args.seg), ("--image", args.image),
                                      ("--num-images", args.num_images), ("--guidance", args.guidance),
                                      ("--seed", args.seed), ("--generate", args.generate)) if value is not None]
    if given:
        raise ConfigError(", ".join(given), f"{'these generate' if len(given) > 1 else 'it generates'} the synthetic "
                          "sets, and --synthetic gives them ready-made: give one or the other")


def _evaluate_config(args: argparse.Namespace, seeds: list[int], out: Path, first: Path, bins):
    """The validated medgen-evaluate config of the experiment; a bad value names its flag."""
    from medgen.core.paths import resolve_path
    from medgen.core.schema import ConfigError
    from medgen.evaluation.config import evaluate_config

    if not resolve_path(args.real).is_dir():
        raise ConfigError("--real", f"{args.real}: no such folder")
    settings = {"real_dir": str(args.real), "synthetic_dir": str(first), "out_dir": str(out), "seeds": seeds,
                "budget": {"steps": args.steps, "precision": args.precision}, "cache_dir": args.cache_dir}
    if bins is not None:  # the sets are generated by these bins: score them by the same
        settings["lesions"] = {"bins": bins}
    try:
        return evaluate_config(settings)
    except ConfigError as exc:
        raise ConfigError(FLAG_OF_EVALUATE_KEY.get(exc.key, exc.key), exc.reason) from None


def _generate_settings(args: argparse.Namespace, out: Path) -> dict:
    """Each set's validated medgen-generate config (``configs/generate.yaml``, ``--generate``, then
    the flags): the whole-image sets of ``--target``, then the insertion sets of ``--insert``, all
    checked before anything is generated: a bad key or value is one line naming its flag
    (``--generate KEY`` for a key of ``--generate``)."""
    from omegaconf import OmegaConf

    from medgen.core.schema import ConfigError, compose_config
    from medgen.generation.models import checkpoint_file

    targets, inserts = _arms(args)
    extra = _extra_settings(args)
    real_masks = OmegaConf.select(extra, "masks_from", default=None) is not None  # images painted on real masks
    if targets and not ((args.seg or real_masks) and args.image):
        raise ConfigError("--seg" if not (args.seg or real_masks) else "--image",
                          "give --seg and --image to generate the synthetic sets, or --synthetic NAME=DIR")
    shapes_from_seg = OmegaConf.select(extra, "insert.shapes", default=None) == "seg"
    if not targets:
        for flag, value in (("--guidance", args.guidance), ("--seg", None if shapes_from_seg else args.seg)):
            if value is not None:
                raise ConfigError(flag, "it is for the --target sets (whole images), and there are none: give "
                                        "--target NAME=SPEC too, or leave it out")
    if not inserts and OmegaConf.select(extra, "insert", default=None) is not None:
        raise ConfigError("--generate insert", "it is for the --insert sets, and there are none: give --insert "
                                               "NAME=PAINTER too, or leave it out")
    for flag, path in (("--seg", args.seg), ("--image", args.image),
                       *((f"--insert {n}", c) for n, (_, c) in inserts.items() if c != args.image)):
        if path is not None:
            checkpoint_file(path, flag)  # a missing file or run folder, before the models are loaded
    base = compose_config([], config_name="generate")
    OmegaConf.set_struct(base, False)  # an unknown key fails in the schema, naming it
    flags = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in GENERATION_DEFAULTS.items()}
    common = {"num_images": flags["num_images"], "cache_dir": args.cache_dir, "seed": flags["seed"]}
    counts = {"target": ONE_LESION if inserts else "model"}  # model: as drawn (the experiment varies sizes)
    settings = {}
    for name, target in targets.items():
        given = OmegaConf.merge(base, {"lesion_counts": counts}, extra, common, {
            "seg_checkpoint": args.seg, "image_checkpoint": args.image, "out_dir": str(out / f"synthetic_{name}"),
            "lesion_sizes": {"target": target, "guidance": flags["guidance"]}})
        settings[name] = _validated(given, f"--target {name}" + ("" if args.target else " (a default target)"),
                                    "--image")
    insert_target = _insert_target(args)
    own = OmegaConf.create({k: v for k, v in extra.items() if k not in WHOLE_IMAGE_KEYS})
    for name, (painter, checkpoint) in inserts.items():
        given = OmegaConf.merge(base, own, common, {
            "seg_checkpoint": args.seg if shapes_from_seg else None, "image_checkpoint": checkpoint,
            "out_dir": str(out / f"synthetic_{name}"), "insert": {"into": str(args.real), "painter": painter},
            "lesion_sizes": {"target": insert_target}, "lesion_counts": counts})
        settings[name] = _validated(given, "--insert-target", f"--insert {name}")
    return settings


def _arms(args: argparse.Namespace) -> tuple[dict, dict]:
    """The whole-image targets (name -> lesion_sizes.target; the defaults when neither --target nor
    --insert is given) and the insertion sets (name -> (painter, checkpoint)), every name once."""
    from medgen.core.schema import ConfigError

    if args.insert_target is not None and not args.insert:
        raise ConfigError("--insert-target", "it sets the sizes of the --insert sets, and there are none: give "
                                             "--insert NAME=PAINTER too, or leave it out")
    try:
        parsed = [parse_target(t) for t in (args.target or ([] if args.insert else DEFAULT_TARGETS))]
    except ValueError as exc:
        raise ConfigError("--target", str(exc)) from None
    targets = _named("--target", parsed)
    items = []
    for text in args.insert or []:
        name, eq, spec = text.partition("=")
        painter, _, checkpoint = spec.partition(":")
        if not eq or not name or painter not in PAINTERS:
            raise ConfigError("--insert", f"{text!r}: use NAME=PAINTER or NAME=PAINTER:CHECKPOINT, the painter one "
                                          f"of {', '.join(PAINTERS)}, e.g. --insert paste=copy")
        if name in targets:
            raise ConfigError("--insert", f"the name {name!r} is given twice (also a --target)")
        checkpoint = checkpoint or args.image
        if painter != "copy" and checkpoint is None:
            raise ConfigError(f"--insert {name}", f"the {painter} painter needs the checkpoint that paints: give "
                                                  f"--image or {name}={painter}:CHECKPOINT")
        items.append((name, (painter, checkpoint)))
    return targets, _named("--insert", items)


def _insert_target(args: argparse.Namespace):
    """``--insert-target`` as a lesion_sizes.target (default real)."""
    from medgen.core.schema import ConfigError

    try:
        return parse_target(f"insert={args.insert_target or 'real'}")[1]
    except ValueError:
        raise ConfigError("--insert-target", f"{args.insert_target!r}: use real|uniform or BIN:WEIGHT,... "
                                             "e.g. tiny:1,small:1") from None


def _extra_settings(args: argparse.Namespace):
    """``--generate KEY=VALUE`` as one config; a key that a flag sets is refused naming the flag."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from medgen.core.schema import ConfigError

    extra = OmegaConf.create()
    for item in args.generate or []:
        key, eq, _ = item.partition("=")
        if not eq or not key:
            raise ConfigError("--generate", f"{item!r}: use KEY=VALUE, e.g. --generate steps=50")
        try:
            extra = OmegaConf.merge(extra, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"--generate {key}", str(exc).splitlines()[0]) from None
    flag_of = {**FLAG_OF_GENERATE_KEY, **({"lesion_counts.target": "--insert (one lesion per image in every set, so "
                                                                    "the arms add equal numbers)"} if args.insert else {})}
    for key, flag in flag_of.items():  # also when given as part of a parent, lesion_sizes={...}
        if OmegaConf.select(extra, key, default=extra, throw_on_missing=False) is not extra:
            raise ConfigError(f"--generate {key}", f"set by {flag}: use that flag")
    return extra


def _validated(given, target_flag: str, checkpoint_flag: str):
    """``validate_generate_config(given)``, a bad value naming its flag: ``target_flag`` for the size
    target, ``checkpoint_flag`` for the image checkpoint, ``--generate KEY`` for the rest."""
    from medgen.core.schema import ConfigError
    from medgen.generation import GenerationError
    from medgen.generation.config import validate_generate_config

    flag_of = {**FLAG_OF_GENERATE_KEY, "image_checkpoint": checkpoint_flag}
    try:
        cfg = validate_generate_config(given)
    except ConfigError as exc:
        raise ConfigError(flag_of.get(exc.key, f"--generate {exc.key}"), exc.reason) from None
    except GenerationError as exc:  # "KEY: why" or "KEY=VALUE: why" (sizes and counts)
        key = re.match(r"[\w.]*", str(exc)).group()
        if key == "lesion_sizes.target":
            raise ConfigError(target_flag, str(exc)) from None
        raise ConfigError(f"--generate {key}".strip(), str(exc)) from None
    if cfg.format != "medgen":
        raise ConfigError("--generate format", f"{cfg.format}: medgen-augment reads its sets in "
                          "medgen's layout (leave format=medgen)")
    return cfg


def _generate(cfg, args: argparse.Namespace) -> Path:
    from medgen.core.paths import resolve_path
    from medgen.generation.pipeline import run_generation

    command = " ".join(["medgen-augment", *map(shlex.quote, args.argv)])
    result = run_generation(cfg, progress=True, command=command)
    if result.status != "done":
        raise KeyboardInterrupt
    return resolve_path(cfg.out_dir)


if __name__ == "__main__":
    sys.exit(main())
