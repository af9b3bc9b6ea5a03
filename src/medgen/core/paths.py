"""Path utilities.

Relative paths in configs resolve against the folder the user launched the command
from, never against Hydra's run folder. ``MEDGEN_DATA_DIR``, ``MEDGEN_RUNS_DIR`` and
``MEDGEN_CACHE_DIR`` override the configured defaults (see ``configs/paths/*.yaml``).
"""

from __future__ import annotations

import os
from pathlib import Path


def launch_dir() -> Path:
    """The folder the command was started from (Hydra's original cwd when inside a Hydra job)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return Path(HydraConfig.get().runtime.cwd)
    except Exception:  # hydra not initialised or not installed
        pass
    return Path.cwd()


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """Expand ``~`` and environment variables; make relative paths absolute w.r.t. :func:`launch_dir`."""
    p = Path(os.path.expandvars(os.path.expanduser(str(path))))
    if not p.is_absolute():
        p = launch_dir() / p
    return p


def configs_dir() -> Path:
    """The shipped Hydra configs: ``medgen/configs`` inside the installed package (the repository's
    top-level ``configs/`` is a link to it)."""
    folder = Path(__file__).resolve().parents[1] / "configs"
    if not (folder / "config.yaml").is_file():
        raise FileNotFoundError(f"medgen's configs are missing from {folder}; reinstall medgen")
    return folder
