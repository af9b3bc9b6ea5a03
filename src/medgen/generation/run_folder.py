"""A generation's output folder: one run at a time, the settings that fix its samples, clean-up.

``<out_dir>/.medgen/lock`` is held by the main rank while a run writes; ``.medgen/settings.json``
records what determines the samples, and a restart with other settings is refused, naming them.
A claimed folder is cleared of the temporaries an interrupted run left (medgen's owner-named
temporary rule, :func:`medgen.core.fs.remove_orphans`). While a run writes, ``.medgen/reserve``
holds back the room that listing the samples done needs, so a disk the samples fill still takes
the manifest and status of an early stop (:func:`reserve_room`).
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from medgen.core.distributed import DistInfo
from medgen.core.fs import FolderLock, atomic_write, remove_orphans
from medgen.core.paths import resolve_path
from medgen.generation import writer
from medgen.generation.models import GenerationError, Stage
from medgen.generation.requests import GenerateRequest

log = logging.getLogger("medgen.generate")

#: settings that change the samples: a restart in the same out_dir must keep them
DETERMINING = ("seg_sha256", "image_sha256", "masks_from", "masks_split", "samples_per_mask", "split", "seed",
               "seg_sampler", "image_sampler", "steps", "guidance_scale", "use_ema", "precision", "gate",
               "lesion_sizes", "lesion_counts", "brain_outline", "insert")


def run_settings(request: GenerateRequest, seg: Stage | None, image: Stage,
                 samplers: dict[str, str | None]) -> dict[str, Any]:
    """What ``.medgen/settings.json`` records of a run (the manifest repeats some of it)."""
    masks, paint, real, loading = request.masks, request.paint, request.real, request.loading
    return {
        "seg_checkpoint": str(seg.path) if seg else None, "seg_sha256": seg.sha256 if seg else None,
        "image_checkpoint": str(image.path), "image_sha256": image.sha256,
        "masks_from": str(resolve_path(real.root)) if real else None,
        "masks_split": real.split if real else None,
        "num_images": masks.num_images, "samples_per_mask": paint.samples_per_mask, "split": paint.split,
        "seed": paint.sampling.seed, "seg_sampler": samplers["seg"], "image_sampler": samplers["image"],
        "steps": paint.sampling.steps, "guidance_scale": paint.guidance_scale, "use_ema": loading.use_ema,
        "precision": loading.precision,
        "gate": masks.gate.settings() if seg else None,
        "lesion_sizes": masks.sizes.settings() if seg else None,
        "lesion_counts": masks.counts.settings() if seg else None,
        "brain_outline": masks.brain_outline if seg else None,
        "image_keys": list(image.mode.image_keys), "image_size": image.space.size,
        "spacing": list(image.space.spacing),
    }


@contextmanager
def exclusive(state: Path, dist: DistInfo) -> Iterator[None]:
    """One generation at a time per out_dir: the main rank holds a lock on ``.medgen/lock``."""
    if not dist.is_main:
        yield
        return
    with FolderLock(state.parent, "generation folder", f"{state.name}/lock"):
        yield


def claim(state: Path, settings: dict[str, Any]) -> None:
    """Record the settings of this out_dir, or check that a restart keeps them."""
    path = state / "settings.json"
    settings = json.loads(json.dumps(settings))  # as the file holds them: {1: 2} of a count target is {"1": 2}
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in DETERMINING if old.get(k) != settings.get(k)]
        if changed:
            raise GenerationError(f"{state.parent} holds a generation with other settings ({'; '.join(changed)}); "
                                  "use another out_dir, or the same settings to continue it")
        log.info("continuing the generation in %s", state.parent)
    state.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(settings, indent=1))


def remove_partial_writes(out: Path) -> list[Path]:
    """Remove the temporary files and folders (``.<name>.tmp-...``: never complete) that an
    interrupted run left under ``out``, by the owner rule of :func:`medgen.core.fs.remove_orphans`;
    returns what was removed."""
    return remove_orphans(sorted(out.glob("**/.*.tmp-*")))


def count_complete(split_dir: Path, keys: Sequence[str]) -> int:
    """Sample folders in ``split_dir`` that hold every one of ``keys``."""
    if not split_dir.is_dir():
        return 0
    return sum(1 for p in split_dir.iterdir() if p.is_dir() and writer.is_complete(p, keys))


#: bytes the reserve holds back per expected sample (a manifest row is about 400) and in all
RESERVE_PER_SAMPLE, RESERVE_BASE = 1024, 64 * 1024


def reserve_room(state: Path, samples: int) -> Path:
    """Allocate ``.medgen/reserve``: room for the manifest and status of ``samples`` samples, which
    :func:`release_room` frees when a stop or an error needs it (a full disk leaves room to say
    what was done). An OSError (no room even for this) is raised naming the file, before any work."""
    path = state / "reserve"
    size = RESERVE_BASE + RESERVE_PER_SAMPLE * max(0, samples)
    try:
        with open(path, "wb") as f:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(f.fileno(), 0, size)
            else:  # pragma: no cover - macOS and Windows: written zeros take the room
                f.write(bytes(size))
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    return path


def release_room(state: Path) -> None:
    """Free what :func:`reserve_room` held back (nothing if there is none)."""
    (state / "reserve").unlink(missing_ok=True)
