"""Shared plumbing of the Hydra entry points: validate once at the boundary, turn the errors a
user can fix into one clear line (no stack trace) and an exit code."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from medgen.core.paths import configs_dir

CONFIG_DIR = str(configs_dir())


def user_errors() -> tuple[type[BaseException], ...]:
    from medgen.core.checkpoint import CheckpointError
    from medgen.core.fs import FolderBusy
    from medgen.core.schema import ConfigError
    from medgen.data.nifti_dataset import DataError
    from medgen.diffusion.radimagenet import RadImageNetWeightsError
    from medgen.diffusion.run.folder import RunFolderError
    from medgen.diffusion.trainer import TrainingStopped
    from medgen.evaluation import EvaluationError
    from medgen.generation.models import GenerationError

    return (ConfigError, DataError, CheckpointError, RadImageNetWeightsError, TrainingStopped, GenerationError,
            EvaluationError, FolderBusy, RunFolderError)


@contextmanager
def exit_on_user_error(prog: str) -> Iterator[None]:
    """Print ``prog: message`` and exit 1 (config errors: 2) for errors the user can fix; file-system
    errors (permissions, a full disk, ...) as the path and the cause, exit 1; Ctrl-C as one line,
    exit 130. The traceback is logged at debug level only."""
    from medgen.core.fs import os_error_line
    from medgen.core.schema import ConfigError

    debug = logging.getLogger("medgen").debug
    errors = user_errors()  # imported now: an except clause evaluated during a Ctrl-C could be interrupted again
    try:
        yield
    except errors as exc:
        debug("user error", exc_info=True)
        print(f"{prog}: {exc}", file=sys.stderr)
        sys.exit(2 if isinstance(exc, ConfigError) else 1)
    except OSError as exc:
        debug("file-system error", exc_info=True)
        print(f"{prog}: {os_error_line(exc)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, _exit_at_once(prog))  # one more Ctrl-C while exiting: no traceback
        debug("interrupted", exc_info=True)
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)


def _exit_at_once(prog: str):
    """A SIGINT handler for a process already exiting on Ctrl-C: say so and leave at once (exit 130),
    skipping the exit handlers a further Ctrl-C would otherwise break with a traceback."""
    def handler(signum, frame):  # noqa: ARG001
        sys.stderr.write(f"{prog}: interrupted\n")
        sys.stderr.flush()
        os._exit(130)

    return handler


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


def output_folder(cfg: Any, key: str = "out_dir") -> Path:
    """Create the folder ``cfg[key]`` names (medgen does this, not Hydra: an error inside Hydra's
    own folder handling is a traceback) and keep the composed config and the command-line overrides
    in its ``.medgen/hydra/``. A path that is a file, or a folder that cannot be written (read-only,
    no permission), is one line naming it."""
    import errno

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from medgen.core.fs import FileSystemError
    from medgen.core.paths import resolve_path
    from medgen.core.schema import ConfigError

    if cfg.get(key) is None:
        raise ConfigError(key, "missing: the folder to write to")
    folder = resolve_path(str(cfg[key]))
    if folder.exists() and not folder.is_dir():
        raise FileSystemError(errno.EEXIST, f"{key} must be a folder, and this is a file (choose another {key}, or "
                              "move the file away)", str(folder))
    try:
        (folder / ".medgen" / "hydra").mkdir(parents=True, exist_ok=True)
        (folder / ".medgen" / "hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
        (folder / ".medgen" / "hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    except OSError as exc:
        raise FileSystemError(exc.errno or errno.EIO, f"cannot write to {key}: {exc.strerror or exc}",
                              str(folder)) from None
    return folder


def command_line(prog: str) -> str:
    """``prog`` with this run's command-line overrides, quoted for a shell: the command that
    continues an interrupted run."""
    import shlex

    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return " ".join([prog, *map(shlex.quote, overrides)])


def given_keys() -> list[str]:
    """The dotted keys this run's command line sets (``training.ema_decay=0.9`` -> ``training.ema_decay``;
    a group choice such as ``mode=seg`` -> ``mode``); none outside a Hydra run."""
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return [o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o]


def warn_unused(prog: str, keys: list[str]) -> None:
    """One warning line per key the run does not use (``"key=value (why)"``)."""
    for key in keys:
        logging.getLogger("medgen").warning("%s: %s has no effect in this run", prog, key)


def run_in_hydra_folder(prog: str, fn: Callable[[Any, Path], Any], cfg: Any) -> None:
    """Inside a ``@hydra.main`` function: create ``out_dir`` (:func:`output_folder`) and call
    ``fn(cfg, out_dir)`` with user errors turned into one line and an exit code, and no empty
    folder left behind when it stops early. A result whose ``status`` is ``"stopped"`` (a signal
    came before the work was done) exits with :data:`~medgen.core.signals.STOPPED_EXIT`."""
    from medgen.core.signals import STOPPED_EXIT

    folder, result = None, None
    try:
        with exit_on_user_error(prog):
            folder = output_folder(cfg)
            result = fn(cfg, folder)
    finally:
        if folder is not None:
            remove_if_only_hydra(folder)
    if getattr(result, "status", None) == "stopped":
        sys.exit(STOPPED_EXIT)
