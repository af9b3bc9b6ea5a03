"""docs/brain.png and the real-head rows of docs/brain.md: the brain methods on real heads.

Reads the heads ``make real-scans`` extracts into ``.real-scans/`` (3D Slicer's MRBrainTumor2 and
MRHead), derives the brain of each with ``heuristic``, ``deepbet`` and ``bet``
(:func:`medgen.data.brain.brain_of`, as the slice cache does: the heuristic on the volume scaled to
[0, 1], the others on the volume as read) and draws axial levels of each head: the heuristic's
mask in red, deepbet's outline in cyan, BET's in yellow.
Prints one JSON line per head with, per method, the seconds, the mask's volume (mL), the fraction
of its voxels within ``--rim`` mm of the head's outside (scalp and skull) and the axial levels
between its lowest and highest that hold none of it.

    python benchmarks/brain_figure.py [--scans .real-scans] [--out docs/brain.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HEADS = ("MRBrainTumor2", "MRHead")
LEVELS = 5


def load_head(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A NIfTI head as RAS float32 (axial = last axis) and its voxel size in mm."""
    import nibabel as nib

    image = nib.as_closest_canonical(nib.load(str(path)))
    return image.get_fdata(dtype=np.float32), tuple(float(z) for z in image.header.get_zooms()[:3])


def scaled(volume: np.ndarray) -> np.ndarray:
    """Percentiles 0.5 and 99.5 to [0, 1], as the slice cache scales an image."""
    low, high = np.percentile(volume, [0.5, 99.5])
    return np.clip((volume - low) / max(float(high - low), 1e-6), 0.0, 1.0)


def head_mask(volume: np.ndarray) -> np.ndarray:
    """The head: above a tenth of the 99.5th percentile, opened, its largest piece, each axial
    slice's holes filled."""
    from scipy import ndimage

    head = ndimage.binary_opening(volume > 0.1 * np.percentile(volume, 99.5), iterations=2)
    labels, n = ndimage.label(head)
    if n:
        head = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    return np.stack([ndimage.binary_fill_holes(head[..., z]) for z in range(head.shape[-1])], axis=-1)


def measure(brain: np.ndarray, head: np.ndarray, spacing, rim_mm: float) -> dict:
    """The mask's volume, its share within ``rim_mm`` of the head's outside, and its missing levels."""
    from scipy import ndimage

    depth = ndimage.distance_transform_edt(head, sampling=spacing)
    levels = np.flatnonzero(brain.any(axis=(0, 1)))
    span = int(levels[-1] - levels[0] + 1) if levels.size else 0
    return {"volume_ml": round(float(brain.sum() * np.prod(spacing) / 1000), 1),
            "in_rim": round(float((depth[brain] < rim_mm).mean()) if brain.any() else 0.0, 4),
            "levels": [int(levels[0]), int(levels[-1])] if levels.size else [],
            "missing_levels": span - int(levels.size)}


def draw(rows: list[tuple[str, np.ndarray, dict, tuple]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    fig, axes = plt.subplots(len(rows), LEVELS, figsize=(2.2 * LEVELS, 2.4 * len(rows)), squeeze=False)
    for r, (name, image, masks, spacing) in enumerate(rows):
        found = np.flatnonzero(masks["deepbet"].any(axis=(0, 1)))
        for c, z in enumerate(np.linspace(found[0] + 4, found[-1] - 2, LEVELS).round().astype(int)):
            ax = axes[r, c]
            aspect = spacing[1] / spacing[0]  # rot90: rows are y, columns x
            ax.imshow(np.rot90(image[..., z]), cmap="gray", vmin=0, vmax=1, aspect=aspect)
            shown = np.rot90(masks["heuristic"][..., z])
            ax.imshow(np.ma.masked_where(~shown, shown.astype(float)), cmap=ListedColormap(["red"]), alpha=0.35,
                      aspect=aspect)
            for method, colour in (("bet", "yellow"), ("deepbet", "cyan")):
                if masks[method][..., z].any():
                    ax.contour(np.rot90(masks[method][..., z]).astype(float), levels=[0.5], colors=colour,
                               linewidths=0.9)
            ax.set_title(f"{name} z={z}", fontsize=7)
            ax.axis("off")
    fig.suptitle("red: heuristic mask; cyan: deepbet outline; yellow: BET outline", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from medgen.data.brain import brain_of

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", type=Path, default=ROOT / ".real-scans")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "brain.png")
    ap.add_argument("--rim", type=float, default=5.0, help="mm from the head's outside counted as scalp and skull")
    args = ap.parse_args(argv)
    rows = []
    for name in HEADS:
        volume, spacing = load_head(args.scans / f"{name}.nii.gz")
        head, image = head_mask(volume), scaled(volume)
        result: dict = {"head": name, "shape": list(volume.shape), "spacing_mm": spacing}
        masks = {}
        for method, source in (("heuristic", image), ("deepbet", volume), ("bet", volume)):
            t0 = time.perf_counter()
            masks[method] = brain_of(source, method, spacing)
            result[method] = {"seconds": round(time.perf_counter() - t0, 1),
                              **measure(masks[method], head, spacing, args.rim)}
        print(json.dumps(result), flush=True)
        rows.append((name, image, masks, spacing))
    draw(rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
