"""The demo's five stages: phantoms, the seg and bravo models within a budget of minutes,
generation, evaluation, and the summary (:mod:`medgen.demo.summary`).

Every stage that is already complete in ``<out>`` is reused, so an interrupted demo continues; a
rerun says which settings do not apply to what it reuses (the phantoms' record,
:data:`PHANTOMS_RECORD`, says what they were drawn with).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from medgen.demo.profile import PROBE_STEPS, SLICES, VOLUMES, Profile
from medgen.demo.summary import write_summary
from medgen.data.space import SampleSpace

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger("medgen.demo")

#: what trains a model: medgen-train's run (``cfg``, run folder) -> ``"done"``, ``"max_steps"`` or
#: ``"stopped"``; the entry point hands it down (this layer imports nothing from ``medgen.scripts``)
TrainRun = Callable[["DictConfig", Path], str]

#: what the demo's phantoms were drawn with (subjects, seed, lesions), beside them in ``<out>``
PHANTOMS_RECORD = Path(".medgen") / "phantoms.json"


class DemoStopped(Exception):
    """A signal stopped a stage (``step``: what it was doing); the demo goes no further, and the
    same command continues it."""

    def __init__(self, step: str):
        super().__init__(f"{step} was stopped by a signal")
        self.step = step


def run_demo(out: Path, minutes: float, subjects: int, pairs: int, seed: int, profile: Profile = SLICES, *,
             train_run: TrainRun) -> Path:
    """The demo in ``out``: phantoms, the two models within ``minutes``, ``pairs`` generated pairs,
    their evaluation; returns ``<out>/summary.md``.

    Raises:
        DataError: ``out`` holds the other kind of demo (slices or volumes).
        DemoStopped: a signal stopped training or generation.
    """
    from medgen.generation import generate

    _check_kind(out, profile)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    facts: dict[str, dict] = {}

    t0 = time.perf_counter()
    subjects = _phantoms(out, subjects, seed, profile)  # the summary gives the subjects the demo ran on
    seconds["phantoms"] = time.perf_counter() - t0

    runs = _train_models(out, minutes, seed, profile, seconds, facts, train_run=train_run)
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
        raise DemoStopped("generation")
    shutil.copyfile(result.contact_sheet, out / "contact_sheet.png")
    t0 = time.perf_counter()
    inserted = insert(out, runs["bravo"], seed, profile)
    seconds["insert"] = time.perf_counter() - t0

    log.info("== 5/5 evaluate the synthetic pairs against the phantoms' test split")
    t0 = time.perf_counter()
    evaluation = evaluate(out, seed, profile)
    seconds["evaluate"] = time.perf_counter() - t0
    summary = write_summary(out, subjects, pairs, seconds, facts, runs, result, evaluation, profile, inserted)
    print(f"\ndemo finished in {sum(seconds.values()) / 60:.1f} min: {summary}")
    return summary


def insert(out: Path, bravo: Path, seed: int, profile: Profile = SLICES) -> dict[str, dict]:
    """Stage 4b: one new lesion (of ``profile.insert_sizes``, half each: tiny and small slices, small and
    medium volumes) painted into each of ``profile.pairs // 4``
    real phantom scans of the train split, by the bravo model (``insert.painter=repaint``, no new
    training) and copied from other phantoms (``copy``), into ``<out>/inserted/<painter>/``; the bravo
    model's before | after sheet is ``<out>/insertion_sheet.png``. Returns each run's
    ``lesion_sizes.json`` (classes, seam and contrast figures) by painter.

    Raises:
        DemoStopped: a signal stopped it.
    """
    from medgen.generation import generate

    n = max(4, profile.pairs // 4)
    log.info("== 4/5 (insertion) paint a new lesion into each of %d real phantom %ss: the bravo model, then copies",
             n, profile.item)
    reports = {}
    for painter in INSERT_PAINTERS:
        result = generate(image_checkpoint=str(bravo), num_images=n, out_dir=str(out / "inserted" / painter),
                          cache_dir=str(out / "cache"), seed=seed,
                          insert={"into": str(out / "data"), "painter": painter, "keep_source": True},
                          lesion_sizes={"target": dict.fromkeys(profile.insert_sizes, 1)},
                          lesion_counts={"target": {"1": 1}})
        if result.status == "stopped":
            raise DemoStopped("insertion")
        reports[painter] = result.sizes
    shutil.copyfile(out / "inserted" / INSERT_PAINTERS[0] / "contact_sheet.png", out / "insertion_sheet.png")
    return reports


#: the demo's insertion painters: the bravo model it trained, and the copy-paste yardstick
INSERT_PAINTERS = ("repaint", "copy")


def _check_kind(out: Path, profile: Profile) -> None:
    """A demo folder holds one kind of demo: ``--3d`` in a slice demo's folder (or the reverse) is
    refused, naming the folder, before anything is written or replaced."""
    from medgen.core.checkpoint import load_checkpoint
    from medgen.data.nifti_dataset import DataError

    latest = out / "runs" / "seg" / "demo" / "checkpoints" / "latest.pt"
    if latest.is_file():
        space = SampleSpace.from_state(load_checkpoint(latest)["space"])
        if space.volumetric != (profile is VOLUMES):
            raise DataError(f"{out} holds a {space.unit} demo; give medgen-demo another --out "
                            f"for the {profile.item} demo ({'with' if profile is VOLUMES else 'without'} --3d)")


# ---------------------------------------------------------------------------------- 1/5 phantoms
def _phantoms(out: Path, subjects: int, seed: int, profile: Profile) -> int:
    """Stage 1: draw ``subjects`` phantoms into ``<out>/data`` (recording what with), or reuse the
    ones there; the subjects on disk."""
    from medgen.data.phantom import generate_dataset

    if not (out / "data" / "train").is_dir():
        log.info("== 1/5 phantoms: %d subjects at 128 x 128 x 64 (lesions: %s)", subjects, profile.lesion_sizes)
        _record_phantoms(out, {"subjects": subjects, "seed": seed, "lesion_sizes": profile.lesion_sizes,
                               "max_lesions": profile.max_lesions})
        generate_dataset(out / "data", subjects=subjects, size=128, slices=64, seed=seed, workers=2,
                         lesion_sizes=profile.lesion_sizes, max_lesions=profile.max_lesions)
    else:
        _say_reused_phantoms(out, subjects, seed, profile)
    return phantoms_on_disk(out)


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


# ---------------------------------------------------------------------------------- 2/5 and 3/5 training
def _train_models(out: Path, minutes: float, seed: int, profile: Profile, seconds: dict[str, float],
                  facts: dict[str, dict], *, train_run: TrainRun) -> dict[str, Path]:
    """Steps 2 and 3: the seg model and the bravo model within ``minutes``; their run folders."""
    runs = {}
    budget = {"seg": minutes * profile.seg_share, "bravo": minutes * (1 - profile.seg_share)}
    per_step = None
    for mode in budget:
        log.info("== %d/5 train %s (rectified flow, training=cpu, %s, about %.1f min)", 2 if mode == "seg" else 3,
                 mode, profile.size, budget[mode])
        t0 = time.perf_counter()
        runs[mode], facts[mode] = train(out, mode, budget[mode], seed, profile, per_step, train_run=train_run)
        seconds[f"train {mode}"] = time.perf_counter() - t0
        if mode == "seg" and not facts["seg"].get("reused"):
            # bravo's network is seg's with one more input channel: seg's whole run (probe, validation, checkpoints
            # included) times a step better than a probe of a few steps (4.0 min predicted, 6.3 taken on 2 cores),
            # and bravo gets what seg left of the budget (at least half its share)
            per_step = seconds["train seg"] / facts["seg"]["steps"]
            budget["bravo"] = max(budget["bravo"] / 2, minutes - seconds["train seg"] / 60)
    return runs


def train(out: Path, mode: str, minutes: float, seed: int, profile: Profile = SLICES,
          seconds_per_step: float | None = None, *, train_run: TrainRun) -> tuple[Path, dict]:
    """Train ``mode`` for about ``minutes`` with ``train_run``: as many epochs as the timing probe says
    fit, or as ``seconds_per_step`` (measured on a whole run) says; returns (run folder, facts for the
    summary). A model already trained in ``<out>`` is reused.

    Raises:
        DemoStopped: a signal stopped the training.
    """
    from medgen.core.checkpoint import load_checkpoint
    from medgen.diffusion.config import load_config

    run_dir = out / "runs" / mode / "demo"
    reused = _reuse_trained(run_dir, mode)
    if reused is not None:
        return run_dir, reused
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
        raise DemoStopped(f"training {mode}")
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    return run_dir, {"epochs": epochs, "steps": epochs * steps_per_epoch, "space": SampleSpace.from_config(cfg),
                     "best_val_loss": float(best["best_val_loss"])}


def _reuse_trained(run_dir: Path, mode: str) -> dict | None:
    """The summary's facts of the model ``run_dir`` holds when it finished its epochs (said in one
    line: the flags that do not apply to it); None when there is none, after removing an unfinished one."""
    from medgen.core.checkpoint import load_checkpoint

    latest = run_dir / "checkpoints" / "latest.pt"
    if not latest.is_file():
        return None
    ckpt = load_checkpoint(latest)
    if ckpt["epoch"] >= ckpt["config"]["training"]["epochs"]:
        log.info("%s model already trained: %s (%d epochs, seed %s); --minutes and --seed do not apply to it "
                 "(give another --out to train anew)", mode, run_dir, ckpt["epoch"],
                 ckpt["config"].get("seed", "not recorded"))
        return {"epochs": ckpt["epoch"], "steps": ckpt["step"], "reused": True,
                "space": SampleSpace.from_state(ckpt["space"])}
    shutil.rmtree(run_dir)
    return None



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


# ---------------------------------------------------------------------------------- 5/5 evaluation
def evaluate(out: Path, seed: int, profile: Profile = SLICES) -> dict:
    """medgen-evaluate on the demo's sets with a budget that fits a laptop (200 steps per model)."""
    from medgen.evaluation.config import evaluate_config
    from medgen.evaluation.evaluate import evaluate as run_evaluation

    cfg = evaluate_config({
        "real_dir": str(out / "data"), "synthetic_dir": str(out / "synthetic"), "out_dir": str(out / "evaluation"),
        "cache_dir": str(out / "cache"), "seed": seed, "seeds": [seed, seed + 1, seed + 2],
        "budget": {"steps": 200, "batch_size": profile.eval_batch, "precision": profile.eval_precision}})
    return run_evaluation(cfg)
