"""``medgen-demo``: the whole pipeline on phantoms, on a laptop CPU, in about 20 minutes.

    medgen-demo --out demo [--minutes 12] [--subjects 20] [--pairs 64]
    medgen-demo --out demo3d --3d      # volumes: 32 x 32 x 16 models, 16 volumes, three-plane pictures

1. writes a phantom dataset (``<out>/data``);
2. trains a seg model and a bravo model with the ``training=cpu`` profile (rectified flow) for
   ``--minutes`` together: seg's epochs from a timing probe, bravo's from the rate the seg run
   measured, for what seg left of the budget;
3. generates ``--pairs`` mask/image pairs (``<out>/synthetic``, a medgen dataset);
4. evaluates them against the phantoms' test split (``<out>/evaluation``: FID, conditioning
   adherence, downstream segmentation over 3 seeds with a short budget, the report);
5. writes ``<out>/summary.md`` (what ran, how long, where the files are, what it shows) and
   ``<out>/contact_sheet.png``.

Every stage that is already complete in ``<out>`` is reused, so an interrupted demo continues. A rerun
says which flags do not apply to what it reuses: ``--subjects`` and ``--seed`` to the phantoms (drawn
with the values recorded in ``<out>/.medgen/phantoms.json``), ``--minutes`` and ``--seed`` to a model
already trained; give another ``--out`` to run with new values.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medgen.data.phantom_lesions import MAX_LESIONS

log = logging.getLogger("medgen.demo")

#: share of the training budget that goes to the seg model (the rest trains bravo): it draws the brain
#: with the lesions, and with 35% (330 steps) 58% of its masks had no lesion (gate acceptance 7%)
SEG_SHARE = 0.5
#: fewest steps per model, whatever the budget: a seg model of 150 steps made masks full of specks
#: (the quality gate kept 1% of them), one of 300 steps masks it kept 89% of (phantoms, 64 px, fp32);
#: a CPU that computes bf16 natively fits about 345 seg steps into its share anyway
MIN_STEPS = {"seg": 300, "bravo": 200}
#: measured steps of the timing probe (after 2 warm-up steps)
PROBE_STEPS = 6


@dataclass(frozen=True)
class Profile:
    """What differs between the slice demo and the volume demo (``--3d``)."""

    #: overrides added to every training run
    training: tuple[str, ...]
    #: fewest training steps per model (see :data:`MIN_STEPS`)
    min_steps: dict[str, int]
    #: defaults of --minutes and --pairs
    minutes: float
    pairs: int
    #: the downstream segmenters' batch (slices or whole volumes)
    eval_batch: int
    #: "64 px" or "32 x 32 x 16", and what one sample is
    size: str
    item: str
    #: share of the training budget that goes to the seg model (the rest trains bravo)
    seg_share: float = SEG_SHARE
    #: the phantoms' lesions (:func:`medgen.data.phantom.generate_dataset`'s lesion_sizes, max_lesions)
    lesion_sizes: str = "clinical"
    max_lesions: int = MAX_LESIONS
    #: the downstream segmenters' budget.precision
    eval_precision: str = "fp32"


SLICES = Profile(training=(), min_steps=MIN_STEPS, minutes=12.0, pairs=64, eval_batch=16, size="64 px", item="slice")
#: 32 x 32 x 16 volumes (voxels of about 7 x 7 x 10 mm) in batches of 2, about 4 volumes/s of training on 2
#: cores (64 x 64 x 32 trains at 0.5 volumes/s, too slow for minutes). The phantoms' lesions are of every size,
#: up to 6 per head (``cover``): the clinical mix (median 7 mm) is mostly under one voxel at this shape, and
#: a seg model of 600 steps on it drew empty masks. On ``cover`` phantoms, 10 minutes split evenly (seg 540
#: steps, gate acceptance 32%) made a demo of 19.3 minutes; 9 minutes with 55% for seg (550 and 460 steps,
#: acceptance 41%) one of 17.5, and of 20.1 in CI and at a slow hour here (a probe of 6 steps said 4.0 minutes
#: for bravo's 728 steps, which took 6.3). Now 8 minutes (seg 553 and bravo 343 steps, acceptance 34%): 13.4, and
#: the downstream segmenters train in bf16 (evaluation 3.9 minutes instead of 6.1)
VOLUMES = Profile(training=("model.spatial_dims=3", "data.volume_shape=[32,32,16]", "training.batch_size=2"),
                  min_steps={"seg": 400, "bravo": 300}, minutes=8.0, pairs=16, eval_batch=4,
                  size="32 x 32 x 16 voxels", item="volume", seg_share=0.55, lesion_sizes="cover", max_lesions=6,
                  eval_precision="bf16")


def _overrides(out: Path, mode: str, seed: int, profile: Profile = SLICES) -> list[str]:
    return ["training=cpu", f"mode={mode}", "strategy=rflow", f"seed={seed}", f"paths.data_dir={out / 'data'}",
            f"paths.model_dir={out / 'runs'}", f"paths.cache_dir={out / 'cache'}", *profile.training]


def _seconds_per_epoch(overrides: list[str], out: Path) -> tuple[float, int]:
    """Time a few real training steps of this run (the slice cache is built on the way)."""
    from medgen.diffusion.config import load_config
    from medgen.diffusion.trainer import DiffusionTrainer

    probe_dir = out / "runs" / ".probe"
    quiet = logging.getLogger("medgen.train")
    level, quiet.level = quiet.level, logging.WARNING
    try:
        trainer = DiffusionTrainer(load_config(overrides), probe_dir, progress=False)
    finally:
        quiet.setLevel(level)
    trainer.fit(2)  # warm-up, untimed
    t0 = time.perf_counter()
    trainer.fit(PROBE_STEPS)
    per_step = (time.perf_counter() - t0) / PROBE_STEPS
    shutil.rmtree(probe_dir, ignore_errors=True)
    # validation (forward passes over the val split, a sample grid) every few epochs: ~10% on top
    return 1.1 * per_step * trainer.steps_per_epoch, trainer.steps_per_epoch


def train(out: Path, mode: str, minutes: float, seed: int, profile: Profile = SLICES,
          seconds_per_step: float | None = None) -> tuple[Path, dict]:
    """Train ``mode`` for about ``minutes``: as many epochs as the timing probe says fit, or as
    ``seconds_per_step`` (measured on a whole run) says; returns (run folder, facts for the summary)."""
    from omegaconf import OmegaConf

    from medgen.core.checkpoint import load_checkpoint
    from medgen.diffusion.config import load_config, sample_shape
    from medgen.scripts.train import run as train_run

    run_dir = out / "runs" / mode / "demo"
    latest = run_dir / "checkpoints" / "latest.pt"
    if latest.is_file():
        ckpt = load_checkpoint(latest)
        if ckpt["epoch"] >= ckpt["config"]["training"]["epochs"]:
            log.info("%s model already trained: %s (%d epochs, seed %s); --minutes and --seed do not apply to it "
                     "(give another --out to train anew)", mode, run_dir, ckpt["epoch"],
                     ckpt["config"].get("seed", "not recorded"))
            return run_dir, {"epochs": ckpt["epoch"], "steps": ckpt["step"], "reused": True,
                             "shape": sample_shape(OmegaConf.create(ckpt["config"]))}
        shutil.rmtree(run_dir)
    overrides = _overrides(out, mode, seed, profile)
    per_epoch, steps_per_epoch = _seconds_per_epoch(overrides, out)
    if seconds_per_step is not None:
        log.info("%s: %.2f s/step as the seg run measured (the probe said %.2f)", mode, seconds_per_step,
                 per_epoch / steps_per_epoch)
        per_epoch = seconds_per_step * steps_per_epoch
    epochs = max(1, math.floor(minutes * 60 / per_epoch))
    fewest = math.ceil(profile.min_steps[mode] / steps_per_epoch)
    if epochs < fewest:
        log.info("%s: this CPU fits %d steps into %.1f min; training the %d steps the model needs at least (about "
                 "%.1f min)", mode, epochs * steps_per_epoch, minutes, fewest * steps_per_epoch, fewest * per_epoch / 60)
        epochs = fewest
    val_interval = max(1, epochs // 4)
    log.info("%s: %d steps/epoch at %.1f s/epoch -> %d epochs in %.1f min", mode, steps_per_epoch, per_epoch,
             epochs, epochs * per_epoch / 60)
    cfg = load_config([*overrides, f"training.epochs={epochs}", f"training.val_interval={val_interval}"])
    if train_run(cfg, run_dir) == "stopped":
        _stopped(f"training {mode}")
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    return run_dir, {"epochs": epochs, "steps": epochs * steps_per_epoch, "shape": sample_shape(cfg),
                     "best_val_loss": float(best["best_val_loss"])}


def _stopped(step: str) -> None:
    """A signal stopped ``step``: leave with the exit code of a stopped run, not on to the next step."""
    from medgen.core.signals import STOPPED_EXIT

    log.info("medgen-demo: %s was stopped by a signal; run the same command again to go on (a stopped "
             "training starts again, the phantoms and a finished model are kept)", step)
    sys.exit(STOPPED_EXIT)


def build_parser() -> argparse.ArgumentParser:
    """medgen-demo's arguments."""
    ap = argparse.ArgumentParser(prog="medgen-demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for everything the demo writes")
    ap.add_argument("--3d", dest="volumes", action="store_true",
                    help="the volume pipeline: 3D models of 32 x 32 x 16 voxels, volumes generated and evaluated in 3D")
    ap.add_argument("--minutes", type=float, default=None,
                    help=f"training budget of the two models together (default {SLICES.minutes:g}; "
                         f"{VOLUMES.minutes:g} with --3d)")
    ap.add_argument("--subjects", type=int, default=20,
                    help="phantom subjects (default 20; phantoms already in --out are reused, with a warning when "
                         "they differ)")
    ap.add_argument("--pairs", type=int, default=None,
                    help=f"mask/image pairs to generate (default {SLICES.pairs}; {VOLUMES.pairs} volumes with --3d)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the phantoms, the models, generation and evaluation (default 0; what --out already "
                         "holds is reused, saying --seed does not apply to it)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    profile = VOLUMES if args.volumes else SLICES
    args.minutes = profile.minutes if args.minutes is None else args.minutes
    args.pairs = profile.pairs if args.pairs is None else args.pairs
    bad = [m for ok, m in [(args.minutes > 0, "--minutes must be > 0"), (args.subjects >= 4, "--subjects must be >= 4"),
                           (args.pairs >= 1, "--pairs must be >= 1")] if not ok]
    if bad:
        print("medgen-demo: " + "; ".join(bad), file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    from medgen.scripts._cli import exit_on_user_error

    with exit_on_user_error("medgen-demo"):
        run_demo(args.out.resolve(), args.minutes, args.subjects, args.pairs, args.seed, profile)
    return 0


def run_demo(out: Path, minutes: float, subjects: int, pairs: int, seed: int, profile: Profile = SLICES) -> Path:
    from medgen.core.precision import configure_backends
    from medgen.data.phantom import generate_dataset
    from medgen.generation import generate

    configure_backends()
    _check_kind(out, profile)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    facts: dict[str, dict] = {}

    t0 = time.perf_counter()
    if not (out / "data" / "train").is_dir():
        log.info("== 1/5 phantoms: %d subjects at 128 x 128 x 64 (lesions: %s)", subjects, profile.lesion_sizes)
        _record_phantoms(out, {"subjects": subjects, "seed": seed, "lesion_sizes": profile.lesion_sizes,
                               "max_lesions": profile.max_lesions})
        generate_dataset(out / "data", subjects=subjects, size=128, slices=64, seed=seed, workers=2,
                         lesion_sizes=profile.lesion_sizes, max_lesions=profile.max_lesions)
    else:
        _say_reused_phantoms(out, subjects, seed, profile)
    subjects = phantoms_on_disk(out)  # the summary gives the subjects the demo ran on
    seconds["phantoms"] = time.perf_counter() - t0

    runs = _train_models(out, minutes, seed, profile, seconds, facts)
    log.info("== 4/5 generate %d pairs (%ss)", pairs, profile.item)
    t0 = time.perf_counter()
    # sizes and counts as the model draws them: at 64 px a tiny lesion (< 10 mm) spans under 3 pixels, which a
    # seg model of minutes rarely draws, so the default (lesion_sizes.target=real: exactly the training
    # classes) would need thousands of candidates
    result = generate(seg_checkpoint=str(runs["seg"]), image_checkpoint=str(runs["bravo"]), num_images=pairs,
                      out_dir=str(out / "synthetic"), cache_dir=str(out / "cache"), seed=seed,
                      lesion_sizes={"target": "model"}, lesion_counts={"target": "model"})
    seconds["generate"] = time.perf_counter() - t0
    if result.status == "stopped":
        _stopped("generation")
    shutil.copyfile(result.contact_sheet, out / "contact_sheet.png")

    log.info("== 5/5 evaluate the synthetic pairs against the phantoms' test split")
    t0 = time.perf_counter()
    evaluation = evaluate(out, seed, profile)
    seconds["evaluate"] = time.perf_counter() - t0
    summary = write_summary(out, subjects, pairs, seconds, facts, runs, result, evaluation, profile)
    print(f"\ndemo finished in {sum(seconds.values()) / 60:.1f} min: {summary}")
    return summary


#: what the demo's phantoms were drawn with (subjects, seed, lesions), beside them in ``<out>``
PHANTOMS_RECORD = Path(".medgen") / "phantoms.json"


def _record_phantoms(out: Path, settings: dict) -> None:
    from medgen.core.fs import atomic_write

    path = out / PHANTOMS_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(settings, indent=2) + "\n")


def phantoms_on_disk(out: Path) -> int:
    """The phantom subjects in ``<out>/data`` (patient folders of every split)."""
    from medgen.core.constants import SPLITS
    from medgen.data.nifti_dataset import list_patients

    return sum(len(list_patients(out / "data" / split)) for split in SPLITS)


def _say_reused_phantoms(out: Path, subjects: int, seed: int, profile: Profile) -> None:
    """The phantoms in ``<out>/data`` are reused: a warning naming each flag whose value differs from
    what they were drawn with (:data:`PHANTOMS_RECORD`; without it the seed is unknown, and --seed
    and --subjects are said not to apply), else one line saying they are reused."""
    on_disk = phantoms_on_disk(out)
    try:
        made = json.loads((out / PHANTOMS_RECORD).read_text())
    except (OSError, ValueError):
        made = None
    where = f"the {on_disk} phantom subjects in {out / 'data'}"
    if not isinstance(made, dict) or "seed" not in made:
        log.warning("== 1/5 phantoms: reusing %s, drawn with a seed not recorded: --seed and --subjects do not apply "
                    "to existing phantoms (give another --out to draw new ones)", where)
        return
    differ = []
    if on_disk != subjects:
        differ.append(f"--subjects {subjects} ({on_disk} on disk)")
    if made["seed"] != seed:
        differ.append(f"--seed {seed} (drawn with seed {made['seed']})")
    if (made.get("lesion_sizes"), made.get("max_lesions")) != (profile.lesion_sizes, profile.max_lesions):
        drawn_for = "volume demo (--3d)" if made.get("lesion_sizes") == VOLUMES.lesion_sizes else "slice demo"
        differ.append(f"{'--3d' if profile is VOLUMES else 'the slice demo (no --3d)'} (their lesions were drawn "
                      f"for the {drawn_for}: {made.get('lesion_sizes')}, at most {made.get('max_lesions')} per head)")
    if differ:
        log.warning("== 1/5 phantoms: reusing %s; %s %s not apply to them (give another --out to draw phantoms "
                    "with these values)", where, " and ".join(differ), "does" if len(differ) == 1 else "do")
    else:
        log.info("== 1/5 phantoms: reusing %s (seed %s)", where, made["seed"])


def _train_models(out: Path, minutes: float, seed: int, profile: Profile, seconds: dict[str, float],
                  facts: dict[str, dict]) -> dict[str, Path]:
    """Steps 2 and 3: the seg model and the bravo model within ``minutes``; their run folders."""
    runs = {}
    budget = {"seg": minutes * profile.seg_share, "bravo": minutes * (1 - profile.seg_share)}
    per_step = None
    for mode in budget:
        log.info("== %d/5 train %s (rectified flow, training=cpu, %s, about %.1f min)", 2 if mode == "seg" else 3,
                 mode, profile.size, budget[mode])
        t0 = time.perf_counter()
        runs[mode], facts[mode] = train(out, mode, budget[mode], seed, profile, per_step)
        seconds[f"train {mode}"] = time.perf_counter() - t0
        if mode == "seg" and not facts["seg"].get("reused"):
            # bravo's network is seg's with one more input channel: seg's whole run (probe, validation, checkpoints
            # included) times a step better than a probe of a few steps (4.0 min predicted, 6.3 taken on 2 cores),
            # and bravo gets what seg left of the budget (at least half its share)
            per_step = seconds["train seg"] / facts["seg"]["steps"]
            budget["bravo"] = max(budget["bravo"] / 2, minutes - seconds["train seg"] / 60)
    return runs


def _check_kind(out: Path, profile: Profile) -> None:
    """A demo folder holds one kind of demo: ``--3d`` in a slice demo's folder (or the reverse) is
    refused, naming the folder, before anything is written or replaced."""
    from medgen.core.checkpoint import load_checkpoint
    from medgen.data.nifti_dataset import DataError

    latest = out / "runs" / "seg" / "demo" / "checkpoints" / "latest.pt"
    if latest.is_file():
        volumes = load_checkpoint(latest)["config"]["model"].get("spatial_dims", 2) == 3
        if volumes != (profile is VOLUMES):
            raise DataError(f"{out} holds a {'volume' if volumes else 'slice'} demo; give medgen-demo another --out "
                            f"for the {profile.item} demo ({'with' if profile is VOLUMES else 'without'} --3d)")


def contrast_check(out: Path, sample_dirs: list[Path], shape: tuple[int, ...]) -> dict[str, float]:
    """Do lesions sit where the masks are? :func:`lesion_contrast` of the synthetic bravo images with
    their own masks, with the masks of other samples (a pipeline that ignored the mask would score
    the same on both), and of the real test slices (volumes, ``shape`` of three sizes) with lesions."""
    from medgen.data.slices import SliceSpec, open_or_build_cache
    from medgen.data.splits import split_patients
    from medgen.data.volumes import VolumeSpec
    from medgen.evaluation.metrics import lesion_contrast
    from medgen.generation.images import read_sample

    pairs = [(a["bravo"], a["seg"]) for a in (read_sample(d, ("bravo",)) for d in sample_dirs)]
    own = [lesion_contrast(img, m) for img, m in pairs]
    shuffled = [lesion_contrast(img, pairs[(i + len(pairs) // 2) % len(pairs)][1]) for i, (img, _) in enumerate(pairs)]
    spec = VolumeSpec(keys=("bravo", "seg"), volume_shape=shape) if len(shape) == 3 else \
        SliceSpec(keys=("bravo", "seg"), image_size=shape[0], selection="lesion")
    cache = open_or_build_cache(split_patients(out / "data", "test"), spec, out / "cache", progress=False)
    real = [lesion_contrast(np.asarray(cache.data[i, 0], np.float32), np.asarray(cache.data[i, 1], np.float32))
            for i in range(len(cache)) if cache.lesion_pixels[i] > 0]
    return {"own": float(np.mean(own)), "own_positive": float(np.mean(np.asarray(own) > 0)),
            "shuffled": float(np.mean(shuffled)), "shuffled_positive": float(np.mean(np.asarray(shuffled) > 0)),
            "real": float(np.mean(real)), "real_positive": float(np.mean(np.asarray(real) > 0)), "n_real": len(real)}


def evaluate(out: Path, seed: int, profile: Profile = SLICES) -> dict:
    """medgen-evaluate on the demo's sets with a budget that fits a laptop (200 steps per model)."""
    from omegaconf import OmegaConf

    from medgen.evaluation.config import validate_evaluate_config
    from medgen.evaluation.evaluate import evaluate as run_evaluation

    cfg = validate_evaluate_config(OmegaConf.create({
        "real_dir": str(out / "data"), "synthetic_dir": str(out / "synthetic"), "out_dir": str(out / "evaluation"),
        "cache_dir": str(out / "cache"), "seed": seed, "seeds": [seed, seed + 1, seed + 2],
        "budget": {"steps": 200, "batch_size": profile.eval_batch, "precision": profile.eval_precision}}))
    return run_evaluation(cfg)


def write_summary(out: Path, subjects: int, pairs: int, seconds: dict[str, float], facts: dict[str, dict],
                  runs: dict[str, Path], result, evaluation: dict, profile: Profile = SLICES) -> Path:
    """``<out>/summary.md``: the stages (minutes, what each wrote), where the files are, the
    evaluation's summary and the lesion-contrast check."""
    from medgen.evaluation.report import summary_lines

    check = contrast_check(out, [result.out_dir / "train" / sid for sid in result.sample_ids],
                           tuple(facts["bravo"]["shape"]))
    lines = [
        "# medgen demo",
        "",
        f"Phantoms → seg and bravo models (rectified flow, `training=cpu`, "
        f"{profile.size}) → {len(result.sample_ids)} synthetic pairs ({profile.item}s).",
        "",
        *_stage_table(out, subjects, seconds, facts, runs, result, profile),
        "",
        "## Where the files are",
        "",
        "- `synthetic/train/<id>/{seg,bravo}.nii.gz`: the synthetic dataset (medgen layout; "
        "`medgen-data check synthetic` passes, `medgen-train paths.data_dir=synthetic` trains on it)",
        "- `synthetic/manifest.csv`: seeds, checkpoints (SHA-256), sampler, lesion area, components, diameters and "
        "the share of lesion pixels inside the brain per sample",
        "- `contact_sheet.png` (= `synthetic/contact_sheet.png`): bravo as generated, then with the mask outlined "
        "in red" if profile is SLICES else "- `contact_sheet.png` (= `synthetic/contact_sheet.png`): each volume's "
        "axial, coronal and sagittal planes through its largest lesion, the mask outlined in red",
        "- `runs/<mode>/demo/samples/`: the training sample grids (condition | real | generated), "
        "`tensorboard --logdir runs` for the curves",
        "",
        "## Evaluation (`evaluation/report.html`, numbers in `evaluation/metrics.json`)",
        "",
        *[f"- {line}" for line in summary_lines(evaluation)[:-1]],
        "",
        f"The downstream networks train for 200 steps only (a laptop budget) on a few dozen lesion {profile.item}s;",
        "`medgen-evaluate` defaults to 1000 steps. Read the numbers as a check that the pipeline measures",
        "something, not as what these models could do for a segmentation network.",
        "",
        *_contrast_section(check, profile),
    ]
    path = out / "summary.md"
    path.write_text("\n".join(lines))
    return path


def _stage_table(out: Path, subjects: int, seconds: dict[str, float], facts: dict[str, dict],
                 runs: dict[str, Path], result, profile: Profile = SLICES) -> list[str]:
    """The summary's table of stages: minutes and what each one wrote."""
    rel = lambda p: Path(p).relative_to(out)  # noqa: E731
    lesions = "lesions" if profile.lesion_sizes == "clinical" else \
        f"lesions of every size, 1 to {profile.max_lesions} per head (`{profile.lesion_sizes}`)"
    lines = [
        "| stage | minutes | what |",
        "|---|---|---|",
        f"| phantoms | {seconds['phantoms'] / 60:.1f} | {subjects} subjects, 128 × 128 × 64, four contrasts and {lesions}: `data/` |",
    ]
    for mode in facts:
        f = facts[mode]
        what = f"{f['epochs']} epochs, {f['steps']} steps" + (" (reused)" if f.get("reused") else
                                                               f", best val loss {f['best_val_loss']:.4f}")
        lines.append(f"| train {mode} | {seconds[f'train {mode}'] / 60:.1f} | {what}: `{rel(runs[mode])}/` |")
    rate = "" if result.acceptance_rate is None else f", quality gate acceptance {100 * result.acceptance_rate:.0f}%"
    lines += [
        f"| generate | {seconds['generate'] / 60:.1f} | {len(result.sample_ids)} pairs{rate}: `synthetic/` |",
        f"| evaluate | {seconds['evaluate'] / 60:.1f} | FID, conditioning adherence, downstream segmentation: "
        "`evaluation/report.html` |",
        f"| total | {sum(seconds.values()) / 60:.1f} | |",
    ]
    return lines


def _contrast_section(check: dict[str, float], profile: Profile = SLICES) -> list[str]:
    """The summary's last section: :func:`contrast_check`'s numbers and what they show."""
    return [
        "## What minutes of CPU training give",
        "",
        "**Do lesions sit where the masks are?** Mean intensity inside the mask minus the mean in a",
        "3-pixel band around it (bravo in [0, 1]; higher = a brighter lesion at the mask):",
        "",
        "| images | masks | contrast | positive |",
        "|---|---|---|---|",
        f"| synthetic | their own | {check['own']:.3f} | {100 * check['own_positive']:.0f}% |",
        f"| synthetic | another sample's (control) | {check['shuffled']:.3f} | {100 * check['shuffled_positive']:.0f}% |",
        f"| real test {profile.item}s ({check['n_real']}) | their own | {check['real']:.3f} | "
        f"{100 * check['real_positive']:.0f}% |",
        "",
        *(_SLICE_TEXT if profile is SLICES else _VOLUME_TEXT),
    ]


_SLICE_TEXT = [
        "A 64 px model trained for minutes on a laptop learns the layout of a head: a dark background, a",
        "skull ring, gyri-like texture inside, and a bright spot where the mask has a lesion (the table",
        "above). The seg model draws small blob-like lesions together with the brain they lie in; the",
        "quality gate replaces specks, oversized masks and masks with a lesion pixel outside that brain,",
        "and the bravo model paints a head around the brain it is given (the evaluation above gives the",
        "share of lesion pixels inside the brain of their own image, real and synthetic). Sharp anatomy,",
        "grey/white matter contrast and realistic lesion appearance need the specification's network",
        "(`model=default`, 128 px) trained for hours on a GPU (`training=default`). The demo shows that",
        "data, training, the two-stage generation and the output format work end to end; it is not",
        "data to train a segmentation model on.",
        "",
]
_VOLUME_TEXT = [
    "The volume demo trains both models on 32 x 32 x 16 volumes (voxels of about 7 x 7 x 10 mm) of",
    "phantoms with lesions of every size (`lesion_sizes=cover`, 1 to 6 per head): the clinical mix",
    "(median 7 mm) is mostly smaller than one voxel at this shape. The seg model of a few minutes draws",
    "lesions of one to a dozen voxels with a rough brain around them; the quality gate (for volumes: no",
    "lesion under the voxels a 4 mm ball fills, none outside the drawn brain) keeps the share of its",
    "masks the table above gives, and the bravo model paints a head around each. The contact sheet",
    "shows each volume in three planes through its largest lesion. Lesions of realistic shape need the",
    "GPU profile (`data.volume_shape=[128,128,64]`, `training=default`) and hours. The demo shows that",
    "the volume path (volume cache, 3D training of both models, both stages of generation, 3D",
    "evaluation with 2.5D FID and a 3D downstream network) works end to end.",
    "",
]


if __name__ == "__main__":
    sys.exit(main())
