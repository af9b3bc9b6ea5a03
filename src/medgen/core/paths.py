"""Path utilities.

Relative paths in configs resolve against the folder the user launched the command
from, never against Hydra's run folder. ``MEDGEN_DATA_DIR``, ``MEDGEN_RUNS_DIR`` and
``MEDGEN_CACHE_DIR`` override the configured defaults (see ``configs/paths/*.yaml``).
"""

from __future__ import annotations

import os
from pathlib import Path

from medgen.core.constants import ENV_CACHE_DIR, ENV_DATA_DIR, ENV_RUNS_DIR


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


def default_cache_dir() -> Path:
    """``$MEDGEN_CACHE_DIR`` or ``$XDG_CACHE_HOME/medgen`` or ``~/.cache/medgen``."""
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return resolve_path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return resolve_path(Path(xdg) / "medgen" if xdg else "~/.cache/medgen")


def default_data_dir() -> Path:
    return resolve_path(os.environ.get(ENV_DATA_DIR, "./data/brainmetshare-3"))


def default_runs_dir() -> Path:
    return resolve_path(os.environ.get(ENV_RUNS_DIR, "./runs"))


def configs_dir() -> Path:
    """The shipped ``configs/`` folder (repository checkout or installed package data)."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[3] / "configs", here.parents[1] / "configs"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"medgen's configs/ folder was not found next to {here.parents[3]}; "
        "install medgen from a checkout with `pip install -e .`"
    )
