"""Shared plumbing of the Hydra entry points: validate once at the boundary, turn the errors a
user can fix into one clear line (no stack trace) and an exit code."""

from __future__ import annotations

import logging
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from medgen.core.paths import configs_dir

CONFIG_DIR = str(configs_dir())


def user_errors() -> tuple[type[BaseException], ...]:
    from medgen.core.checkpoint import CheckpointError
    from medgen.core.config import ConfigError
    from medgen.core.fs import FolderBusy
    from medgen.data.nifti_dataset import DataError
    from medgen.diffusion.perceptual import PerceptualWeightsError
    from medgen.diffusion.run_folder import RunFolderError
    from medgen.diffusion.trainer import TrainingStopped
    from medgen.evaluation import EvaluationError
    from medgen.generation.models import GenerationError

    return (ConfigError, DataError, CheckpointError, PerceptualWeightsError, TrainingStopped, GenerationError,
            EvaluationError, FolderBusy, RunFolderError)


@contextmanager
def exit_on_user_error(prog: str) -> Iterator[None]:
    """Print ``prog: message`` and exit 1 (config errors: 2) for errors the user can fix; file-system
    errors (permissions, a full disk, ...) as the path and the cause, exit 1; Ctrl-C as one line,
    exit 130. The traceback is logged at debug level only."""
    from medgen.core.config import ConfigError
    from medgen.core.fs import os_error_line

    debug = logging.getLogger("medgen").debug
    try:
        yield
    except user_errors() as exc:
        debug("user error", exc_info=True)
        print(f"{prog}: {exc}", file=sys.stderr)
        sys.exit(2 if isinstance(exc, ConfigError) else 1)
    except OSError as exc:
        debug("file-system error", exc_info=True)
        print(f"{prog}: {os_error_line(exc)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        debug("interrupted", exc_info=True)
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)


def remove_if_only_hydra(run_dir: Path) -> None:
    """Delete a run folder that holds nothing but Hydra's config copy (``.hydra/`` for training,
    ``.medgen/hydra/`` for generation and evaluation, maybe beside their ``.medgen/lock``): a run
    that stopped before writing anything, a bad command line, or a resume that continued in its own
    folder. A folder whose lock another process holds is in use, and is kept."""
    from medgen.core.fs import FolderBusy, FolderLock

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    entries = list(run_dir.iterdir())
    if all(p.name == ".hydra" for p in entries):
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    if [p.name for p in entries] != [".medgen"] or not {p.name for p in entries[0].iterdir()} <= {"hydra", "lock"}:
        return
    if (entries[0] / "lock").exists():
        try:
            lock = FolderLock(run_dir, "folder", ".medgen/lock").acquire()
        except FolderBusy:
            return
        try:
            shutil.rmtree(run_dir, ignore_errors=True)
        finally:
            lock.release()
        return
    shutil.rmtree(run_dir, ignore_errors=True)


def run_in_hydra_folder(prog: str, fn: Callable[[Any, Path], Any], cfg: Any) -> None:
    """Inside a ``@hydra.main`` function: call ``fn(cfg, run_folder)`` with user errors turned into
    one line and an exit code, and no empty run folder left behind when it stops early."""
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        with exit_on_user_error(prog):
            fn(cfg, run_dir)
    finally:
        remove_if_only_hydra(run_dir)
