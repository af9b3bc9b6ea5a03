"""Self-describing, atomically written checkpoints (docs/architecture.md, "Checkpoints").

A checkpoint is one file holding a format version, the resolved config, mode/strategy
names, the network kwargs, and the ``state_dict`` of every stateful component (model,
EMA, optimizer, LR schedule, trainer counters). It is written to a temporary name in
the same folder, flushed to disk and renamed, so a crash never leaves a half-written
``latest.pt``, and a failed write (a full disk) leaves the previous one as it was.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from medgen.core.fs import temporary_path, write_error

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "config", "mode", "strategy", "network", "model", "step")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the run; the message says why."""


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` (plus ``format_version``) to ``path`` atomically."""
    path = Path(path)
    tmp = temporary_path(path)
    data = {"format_version": FORMAT_VERSION, **payload}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        # a full disk reaches us as torch's "RuntimeError: [enforce fail at inline_container.cc]"
        cause = write_error(exc, path)
        if cause is None:
            raise
        raise cause from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; clear errors for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # truncated / not a torch file
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or "format_version" not in data:
        raise CheckpointError(f"{path} is not a medgen checkpoint (no format_version)")
    if data["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {data['format_version']}, newer than this medgen "
            f"understands ({FORMAT_VERSION}); upgrade medgen"
        )
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise CheckpointError(f"{path} is missing {missing}")
    return data


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> {dotted.key: value}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], allowed: Iterable[str] = ()) -> list[str]:
    """Dotted keys whose values differ between two resolved configs, except those under ``allowed``
    prefixes. Each entry reads ``key: old -> new``."""
    a, b = flatten(old), flatten(new)
    allowed = tuple(allowed)
    changes = []
    for key in sorted(set(a) | set(b)):
        if any(key == p or key.startswith(p + ".") for p in allowed):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            changes.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return changes
