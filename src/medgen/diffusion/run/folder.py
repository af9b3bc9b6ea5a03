"""Which folder a training run writes to (docs/architecture.md, "Run folders").

Every run gets a folder of its own, ``<paths.model_dir>/<mode>/<strategy>_<size>_<timestamp>[_job<id>]``,
created with an exclusive ``mkdir`` (a second run that starts in the same second, as SLURM arrays
and sweeps do, gets ``..._2``). The main rank decides and the other ranks are told, so a torchrun
job has one folder. While a run lasts it holds a lock on its folder: a second process that tries
to train into it (a resume, a run started with the same explicit folder) is refused.

Resuming continues in the checkpoint's run folder only when the checkpoint is that run's newest
state. Resuming from anything older (a snapshot, ``best.pt``, a copied file) branches into a new
run folder that records its parent in ``parent.json``: newer work is never overwritten.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from medgen.core.checkpoint import CheckpointError
from medgen.core.fs import FileSystemError, FolderBusy, FolderLock, remove_orphans
from medgen.core.paths import resolve_path
from medgen.data.space import SampleSpace
from medgen.diffusion.run.checkpointer import check_resumable

log = logging.getLogger("medgen.train")

LOCK_FILE = ".medgen.lock"
PARENT_FILE = "parent.json"


class RunFolderError(RuntimeError):
    """A run folder cannot be used as asked; the message says what to do instead."""


def job_tag(env: dict[str, str] | None = None) -> str:
    """``job<array job>_<task>`` in a SLURM array task, ``job<id>`` in any other SLURM job, else ``""``."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"job{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if env.get("SLURM_JOB_ID"):
        return f"job{env['SLURM_JOB_ID']}"
    return ""


def size_tag(cfg: DictConfig) -> str:
    """The size in a run folder's name: ``128`` (slices of model.image_size), ``64x64x32`` (volumes)."""
    return SampleSpace.from_config(cfg).tag


def run_stem(cfg: DictConfig, now: float | None = None, env: dict[str, str] | None = None) -> str:
    """``<strategy>_<size>_<YYYYmmdd-HHMMSS>[_<job tag>]`` (size: :func:`size_tag`)."""
    stem = f"{cfg.strategy.name}_{size_tag(cfg)}_{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}"
    tag = job_tag(env)
    return f"{stem}_{tag}" if tag else stem


def runs_root(cfg: DictConfig) -> Path:
    """``<paths.model_dir>/<mode>``: where this mode's run folders live."""
    return resolve_path(cfg.paths.model_dir) / cfg.mode.name


def make_folder(path: Path, exist_ok: bool) -> None:
    """``mkdir -p`` whose failure is one line naming the folder and the cause."""
    try:
        path.mkdir(parents=True, exist_ok=exist_ok)
    except FileExistsError:
        raise
    except OSError as exc:
        cause = exc.strerror
        if exc.errno == errno.ENOENT:  # e.g. under /proc: the parent exists but takes no new folders
            ancestor = next((a for a in path.parents if a.exists()), None)
            cause = f"{ancestor} does not take new folders ({exc.strerror})"
        raise FileSystemError(exc.errno, f"cannot create this folder: {cause}", str(path)) from None


def claim_new_folder(parent: Path, stem: str, max_tries: int = 10000) -> Path:
    """Create and return ``parent/stem`` or, if taken, ``parent/stem_2``, ``_3``, ...: an exclusive
    ``mkdir`` decides, so two processes never get the same folder."""
    make_folder(parent, exist_ok=True)
    for i in range(1, max_tries + 1):
        path = parent / (stem if i == 1 else f"{stem}_{i}")
        try:
            make_folder(path, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise RunFolderError(f"{parent}: {max_tries} run folders named {stem}*; clean up or set paths.model_dir")


def holds_run(folder: Path) -> bool:
    """True if ``folder`` holds (part of) a training run."""
    return (folder / "checkpoints").is_dir() or (folder / "metrics.jsonl").is_file() or (folder / "config.yaml").is_file()


def peek_checkpoint(path: Path) -> dict:
    """A checkpoint memory-mapped: its counters and config, without reading the weights."""
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def checkpoint_step(path: Path) -> int | None:
    """The step stored in a checkpoint, None if it cannot be read."""
    try:
        return int(peek_checkpoint(path)["step"])
    except Exception:  # noqa: BLE001 - an unreadable file is simply not a newer state
        return None


def newest_state(ckpt: Path) -> tuple[Path, int] | None:
    """The newest other checkpoint of ``ckpt``'s run and its step, if one is newer than ``ckpt``."""
    own = checkpoint_step(ckpt)
    newest = None
    for other in ckpt.parent.glob("*.pt"):
        if other.resolve() == ckpt.resolve():
            continue
        step = checkpoint_step(other)
        if step is not None and own is not None and step > own and (newest is None or step > newest[1]):
            newest = (other, step)
    return newest


@dataclass
class RunPlan:
    """Where this run writes and what it starts from."""

    run_dir: Path
    checkpoint: Path | None = None  # resume from it
    parent: dict | None = None  # set when the run branches from an older checkpoint
    created: bool = False  # the folder was created for this run (removed again if nothing is written)


def _tagged(name: str, tag: str) -> bool:
    """Whether run folder ``name`` (``<strategy>_<size>_<time>_<tag>[_<n>]``) carries job ``tag``."""
    rest = name.split("_", 3)[-1]
    return rest == tag or rest.startswith(tag + "_")


def find_auto_checkpoint(cfg: DictConfig) -> Path | None:
    """``training.resume=auto``: the newest ``latest.pt`` of this mode/strategy/size under
    ``paths.model_dir`` whose config fits this run and that no live process is training.

    In a SLURM job only the runs of this job count (a requeued job continues its own run; an array
    task, its own): the job templates always pass ``resume=auto``, and a new job must not take over
    another job's run, finished or waiting for its requeue. The log names the newest run of another
    job that would fit, for ``training.resume=<folder>``."""
    root = runs_root(cfg)
    pattern = f"{cfg.strategy.name}_{size_tag(cfg)}_*/checkpoints/latest.pt"
    found = sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
    tag = job_tag()
    if not tag:
        return _first_resumable(found, cfg)
    own = [p for p in found if _tagged(p.parent.parent.name, tag)]
    chosen = _first_resumable(own, cfg)
    if chosen is None:
        other = _first_resumable([p for p in found if p not in own], cfg, quiet=True)
        if other is not None:
            log.info("training.resume=auto: SLURM job %s has no run to continue yet; the newest run of another "
                     "job that fits is %s (training.resume=<that folder> continues it)", tag.removeprefix("job"),
                     other.parent.parent)
    return chosen


def _first_resumable(found: list[Path], cfg: DictConfig, quiet: bool = False) -> Path | None:
    """The first of ``found`` (``latest.pt`` files) that no live process is training and whose
    config fits ``cfg``; what is skipped is logged unless ``quiet``."""
    say = (lambda *a: None) if quiet else log.info
    for path in found:
        run = path.parent.parent
        try:
            FolderLock(run, "run folder", LOCK_FILE).acquire().release()
        except FolderBusy:
            say("training.resume=auto: skipping %s, another process is training it", run)
            continue
        try:
            check_resumable(peek_checkpoint(path), cfg, path)
        except CheckpointError as exc:
            say("training.resume=auto: skipping %s (%s)", run, str(exc).splitlines()[0])
            continue
        except Exception as exc:  # noqa: BLE001 - a damaged file is skipped, not fatal
            if not quiet:
                log.warning("training.resume=auto: skipping %s, its latest.pt cannot be read (%s)", run,
                            type(exc).__name__)
            continue
        return path
    return None


def find_checkpoint(resume: str | None, cfg: DictConfig) -> Path | None:
    """``training.resume``: null -> None; ``auto`` -> :func:`find_auto_checkpoint`; otherwise a
    checkpoint file or a run folder (its ``checkpoints/latest.pt``)."""
    if resume is None or resume == "":
        return None
    if resume == "auto":
        return find_auto_checkpoint(cfg)
    path = resolve_path(resume)
    if path.is_dir():
        path = path / "checkpoints" / "latest.pt" if (path / "checkpoints").is_dir() else path / "latest.pt"
    if not path.is_file():
        raise CheckpointError(f"training.resume={resume}: no checkpoint at {path}")
    return path


def plan_run(cfg: DictConfig, explicit_dir: Path | None = None) -> RunPlan:
    """Decide (main rank only) the run folder: the resumed run's own folder, a new branch, the
    explicit folder (``hydra.run.dir=...``) or a new unique folder. Nothing is locked yet."""
    ckpt = find_checkpoint(cfg.training.resume, cfg)
    if ckpt is None and cfg.training.resume == "auto":
        log.info("training.resume=auto: no earlier run to continue, starting fresh")
    if ckpt is not None:
        in_run = ckpt.parent.name == "checkpoints"
        newer = newest_state(ckpt) if in_run else None
        if in_run and newer is None:
            return RunPlan(ckpt.parent.parent, ckpt)
        step = checkpoint_step(ckpt)
        parent = {"checkpoint": str(ckpt), "step": step,
                  "run": str(ckpt.parent.parent) if in_run else None}
        why = (f"{newer[0].name} of that run is newer (step {newer[1]})" if newer is not None
               else "it is not inside a run's checkpoints/ folder")
        target = explicit_dir if explicit_dir is not None else claim_new_folder(runs_root(cfg), run_stem(cfg))
        log.warning("resuming from %s (step %s) branches into a new run folder, %s, because %s; "
                    "the original run is left as it is", ckpt, step, target, why)
        return RunPlan(target, ckpt, parent, created=explicit_dir is None)
    if explicit_dir is not None:
        if holds_run(explicit_dir):
            raise RunFolderError(
                f"run folder {explicit_dir} already holds a run; continue it with training.resume={explicit_dir}, "
                "or choose another folder")
        return RunPlan(explicit_dir)
    return RunPlan(claim_new_folder(runs_root(cfg), run_stem(cfg)), created=True)


def lock_run_folder(run_dir: Path) -> FolderLock:
    """Take the run folder's lock and remove the checkpoint temporaries a killed run left in it."""
    make_folder(run_dir, exist_ok=True)
    try:
        lock = FolderLock(run_dir, "run folder", LOCK_FILE).acquire()
    except FolderBusy as exc:
        raise RunFolderError(f"{exc}") from None
    remove_orphans((run_dir / "checkpoints").glob(".*.tmp-*"))
    return lock


def start_branch(plan: RunPlan) -> None:
    """Record the parent of a branched run and copy its ``metrics.jsonl``; the run logger trims the
    copy to the branch step when it opens (:meth:`~medgen.diffusion.run.logger.RunLogger.open`),
    so the curves start where the parent's were."""
    if plan.parent is None:
        return
    (plan.run_dir / PARENT_FILE).write_text(json.dumps(plan.parent, indent=1) + "\n")
    if plan.parent.get("run"):
        source = Path(plan.parent["run"]) / "metrics.jsonl"
        if source.is_file():
            shutil.copyfile(source, plan.run_dir / "metrics.jsonl")


def remove_if_unused(plan: RunPlan) -> None:
    """Delete a folder created for this run when the run wrote nothing into it (it stopped early)."""
    if not plan.created or not plan.run_dir.is_dir():
        return
    if {p.name for p in plan.run_dir.iterdir()} <= {LOCK_FILE, PARENT_FILE, "metrics.jsonl"} and \
            not (plan.run_dir / "checkpoints").exists():
        for p in plan.run_dir.iterdir():
            p.unlink()
        plan.run_dir.rmdir()
