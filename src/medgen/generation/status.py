"""Whether a generation folder is complete: ``<out_dir>/.medgen/status.json``.

``medgen-generate`` writes it when it claims a folder (``complete: false``), again when it stops
early (by a signal or an error: how many samples are done), and once every sample, preview and the
manifest are written (``complete: true``). ``medgen-evaluate`` reads it and refuses a set whose
generation is not complete, naming the command that completes it.

A folder without the file but with ``.medgen/settings.json`` was written by a medgen from before
the file existed: it counts as complete when it has its ``manifest.csv`` (those runs wrote it last).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from medgen.core.fs import atomic_write

STATUS_FILE = Path(".medgen") / "status.json"
SETTINGS_FILE = Path(".medgen") / "settings.json"


@dataclass
class GenerationStatus:
    """``expected``: samples the run makes (None until its masks are known); ``done``: sample
    folders complete on disk; ``command``: the command line that continues the run."""

    complete: bool
    done: int
    expected: int | None = None
    command: str | None = None
    updated: str = ""


def write_status(out_dir: Path, status: GenerationStatus) -> Path:
    path = Path(out_dir) / STATUS_FILE
    status.updated = time.strftime("%Y-%m-%d %H:%M:%S")
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(asdict(status), indent=1))
    return path


def read_status(out_dir: Path) -> GenerationStatus | None:
    """The folder's status; None when it is no medgen-generate output (no ``.medgen/settings.json``).
    ``expected``, when the run did not record it, comes from the settings where they fix it."""
    out_dir = Path(out_dir)
    path = out_dir / STATUS_FILE
    status = None
    if path.is_file():
        try:
            status = GenerationStatus(**json.loads(path.read_text()))
        except (ValueError, TypeError):  # unreadable: as an interrupted run left it
            status = GenerationStatus(complete=False, done=0)
    elif (out_dir / SETTINGS_FILE).is_file():  # written before status.json existed
        status = GenerationStatus(complete=(out_dir / "manifest.csv").is_file(), done=0)
    if status is not None and status.expected is None:
        try:
            settings = json.loads((out_dir / SETTINGS_FILE).read_text())
            if settings.get("num_images") is not None:
                status.expected = int(settings["num_images"]) * int(settings.get("samples_per_mask") or 1)
        except (OSError, ValueError, TypeError):
            pass
    return status


def incomplete_message(out_dir: Path, status: GenerationStatus, done: int) -> str:
    """Why ``out_dir`` is not a finished set (``done`` samples are there), and the command that
    finishes it."""
    count = f"{done} of {status.expected} samples" if status.expected is not None else f"{done} samples"
    command = status.command or "the medgen-generate command that wrote it"
    return (f"{out_dir} holds an unfinished generation ({count} done): run {command} again to complete it, "
            f"or pass allow_partial=true to evaluate what is there")
