"""A PNG montage to eyeball a dataset: rows = patients, columns = image modalities, each image at
the axial slice with the most lesion voxels, the mask outlined.

Slices are shown in radiological convention (patient right on the image left, anterior at the
top), the inverse of :func:`medgen.data.importers.png_slice_to_ras`, so an imported BrainMetShare
slice looks like its source PNG. Pixel aspect follows the voxel spacing in the affine.
The figure is drawn with matplotlib's Agg canvas directly (no pyplot, no global backend change).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from medgen.core.constants import IMAGE_MODALITIES, MASK_KEY, SPLITS
from medgen.data.nifti_dataset import (DataError, folder_problem, list_patients, load_volume, modality_path,
                                       present_modalities, volume_shape_problem)
from medgen.data.masks import binarize_mask
from medgen.data.nifti_files import read_failure
from medgen.data.transforms import ras_to_display

log = logging.getLogger("medgen.data")

__all__ = ["CELL_HEIGHT_IN", "CELL_WIDTH_IN", "DPI", "CONTOUR_COLOUR", "make_preview", "preview_size", "ras_to_display"]

#: size of one montage cell in inches, and the resolution: a cell is 250 x 275 pixels
CELL_WIDTH_IN: float = 2.5
CELL_HEIGHT_IN: float = 2.75
DPI: int = 100
#: colour of the mask outline
CONTOUR_COLOUR: str = "#ff2a2a"


def preview_size(n_rows: int, n_cols: int) -> tuple[int, int]:
    """Pixel size ``(width, height)`` of a montage with this many rows (patients) and columns."""
    return round(n_cols * CELL_WIDTH_IN * DPI), round(n_rows * CELL_HEIGHT_IN * DPI)


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        volume, affine = load_volume(path)
    except DataError as exc:  # names the file already
        raise DataError(f"{exc}; run `medgen-data check`") from None
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types; name the file
        raise DataError(f"{path}: {read_failure(path, exc)}; run `medgen-data check`") from None
    if volume.ndim not in (2, 3):  # a single 2D slice still makes a picture
        raise DataError(f"{path}: {volume_shape_problem(volume.shape)}; run `medgen-data check`")
    return np.atleast_3d(volume), affine  # a 2D file as one axial slice [X, Y, 1]


def _pick_slice(mask: np.ndarray | None, depth: int) -> int:
    """Axial slice with the most lesion voxels; the middle slice when there is no lesion."""
    if mask is not None:
        per_slice = mask.reshape(-1, mask.shape[-1]).sum(axis=0)
        if per_slice.max() > 0:
            return int(np.argmax(per_slice))
    return depth // 2


def _plane(volume: np.ndarray, k: int) -> np.ndarray:
    return volume[..., k]


def _patients(root: Path, n_patients: int) -> list[Path]:
    problem = folder_problem(root, "dataset folder")
    if problem:
        raise DataError(f"{root}: {problem}")
    found = [p for split in SPLITS for p in list_patients(root / split)]
    if not found:
        raise DataError(f"{root}: no patient folders in {', '.join(s + '/' for s in SPLITS)}; nothing to preview")
    if len(found) < n_patients:
        log.warning("%s holds %d patient(s), fewer than the %d asked for (--patients): the montage shows %d row(s)",
                    root, len(found), n_patients, len(found))
    return found[:n_patients]


def make_preview(root: str | Path, out_png: str | Path, n_patients: int = 4) -> Path:
    """Write a montage PNG of the first ``n_patients`` patients (train/, then val/, test/); a dataset
    of fewer shows them all, with a warning naming ``--patients``.

    Rows are patients; columns are the image modalities present in any of them (in the order
    bravo, t1_pre, t1_gd, flair; a ``seg`` column only when no image modality exists). Each
    cell shows the axial slice with the most lesion voxels (middle slice without lesion) with
    the ``seg`` outline drawn in :data:`CONTOUR_COLOUR`. The PNG is :func:`preview_size` pixels.

    Raises:
        ValueError: ``n_patients < 1``.
        DataError: no patients, an unreadable file, or a mask whose shape differs from the image.
    """
    if n_patients < 1:
        raise ValueError(f"n_patients must be >= 1, got {n_patients}")
    root, out_png = Path(root), Path(out_png)
    patients = _patients(root, n_patients)
    columns = present_modalities(patients, IMAGE_MODALITIES)
    if not columns:
        if not present_modalities(patients, [MASK_KEY]):
            raise DataError(f"{root}: the first {len(patients)} patient folder(s) hold no modality files")
        columns = [MASK_KEY]

    width, height = preview_size(len(patients), len(columns))
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="black")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(patients), len(columns), squeeze=False)
    for row, patient in enumerate(patients):
        seg_path = modality_path(patient, MASK_KEY)
        mask = binarize_mask(_read(seg_path)[0]) if seg_path.is_file() else None
        for col, key in enumerate(columns):
            ax = axes[row, col]
            ax.set_axis_off()
            path = modality_path(patient, key)
            if not path.is_file():
                ax.set_title(f"{patient.name} | {key}", color="white", fontsize=8)
                ax.text(0.5, 0.5, "missing", color="orange", ha="center", va="center", transform=ax.transAxes)
                continue
            volume, affine = _read(path)
            if mask is not None and mask.shape != volume.shape:
                raise DataError(f"{path}: shape {volume.shape} differs from {seg_path.name} {mask.shape}; "
                                "run `medgen-data check`")
            k = _pick_slice(mask, volume.shape[-1])
            image = ras_to_display(_plane(volume, k))
            spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
            aspect = float(spacing[1] / spacing[0]) if spacing[0] > 0 else 1.0
            finite = image[np.isfinite(image)]
            lo, hi = (np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0))
            ax.imshow(image, cmap="gray", vmin=float(lo), vmax=float(hi) if hi > lo else float(lo) + 1.0,
                      aspect=aspect, interpolation="nearest")
            if mask is not None:
                outline = ras_to_display(_plane(mask, k))
                if outline.any():
                    ax.contour(outline, levels=[0.5], colors=CONTOUR_COLOUR, linewidths=1.0)
            where = f" z={k}" if volume.shape[-1] > 1 else ""
            ax.set_title(f"{patient.name} | {key}{where}", color="white", fontsize=8)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.3 / (len(patients) * CELL_HEIGHT_IN),
                        wspace=0.04, hspace=0.15)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=DPI, facecolor=fig.get_facecolor())
    return out_png


def render_phantom_figure(out_png: str | Path, n_subjects: int = 3, size: int = 128, slices: int = 64,
                  seed: int = 0) -> Path:
    """PNG of ``n_subjects`` subjects (those of ``generate_dataset(seed=seed)``) x (bravo,
    t1_pre, t1_gd, flair, t1_gd with the seg outline): the axial slice through the largest
    lesion (the mid-brain slice for a subject without lesions), in the radiological display of
    ``medgen-data preview`` and the training sample grids (subject's right on the left)."""
    from medgen.data.phantom import make_subject, subject_seed

    out_png = Path(out_png)
    columns = list(IMAGE_MODALITIES) + ["t1_gd + seg"]
    fig = Figure(figsize=(2.4 * len(columns), 2.5 * n_subjects), facecolor="black")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_subjects, len(columns), squeeze=False)
    for row in range(n_subjects):
        subject = make_subject(subject_seed(seed, row), size=size, slices=slices)
        vox_from_world = np.linalg.inv(subject.affine)
        if subject.lesions:
            largest = max(subject.lesions, key=lambda les: les.diameter_mm)
            k = int(np.rint(vox_from_world[2, :3] @ np.asarray(largest.centre_mm) + vox_from_world[2, 3]))
            note = f"{len(subject.lesions)} lesion(s), largest {largest.diameter_mm:.0f} mm"
        else:
            k = int(round(0.55 * (slices - 1)))
            note = "no lesions"
        k = int(np.clip(k, 0, slices - 1))
        for col, name in enumerate(columns):
            ax = axes[row, col]
            key = "t1_gd" if col == len(IMAGE_MODALITIES) else name
            volume = subject.volumes[key]
            lo, hi = np.percentile(volume, [0.5, 99.5])
            ax.imshow(ras_to_display(volume[:, :, k]), cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            if col == len(IMAGE_MODALITIES) and subject.volumes[MASK_KEY][:, :, k].any():
                ax.contour(ras_to_display(subject.volumes[MASK_KEY][:, :, k]), levels=[0.5], colors="red",
                           linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, color="white", fontsize=11)
            if col == 0:
                ax.set_ylabel(f"phantom_{row:04d}\n{note}\nslice {k}", color="white", fontsize=8)
    fig.suptitle(f"medgen phantoms (MNI152 2009 based), {size}x{size}x{slices}, seed {seed}",
                 color="white", fontsize=11)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110, facecolor="black")
    return out_png
