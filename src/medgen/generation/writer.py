"""What a generation run writes: sample folders in medgen's dataset layout, pictures, the
manifest and the nnU-Net v2 export.

Each sample folder holds one axial slice per modality as a NIfTI volume of shape ``[S, S, 1]``
(RAS, the voxel size of the training data's model slices) or, from a volume model, one volume
``[X, Y, Z]`` per modality (RAS, the voxel size of its training volumes), so the set passes
``medgen-data check``, trains with ``medgen-train`` and loads with MONAI ``LoadImage``. A
folder is written under a temporary name and renamed when complete, so an interrupted run
never leaves a half-written sample.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from medgen.core.constants import MASK_KEY, NIFTI_SUFFIX
from medgen.core.fs import atomic_write
from medgen.data.nifti_dataset import modality_path, save_volume
from medgen.data.pictures import plane_centre, render_planes, render_tile, side_by_side
from medgen.data.space import SampleSpace

#: the manifest's columns, in order
#: the files of a sample written as masks (uint8): the lesion mask, an insertion's region and source mask
MASK_FILES = (MASK_KEY, "region", f"source_{MASK_KEY}")
MANIFEST_COLUMNS = ("id", "split", "mask_source", "mask_seed", "image_seed", "seg_checkpoint", "seg_sha256",
                    "image_checkpoint", "image_sha256", "seg_sampler", "image_sampler", "steps", "guidance_scale",
                    "mask_area", "components", "accepted", "lesion_diameters_mm", "lesion_bins", "inside_brain")


def slice_affine(spacing: Sequence[float]) -> np.ndarray:
    """RAS affine of a generated ``[S, S, 1]`` slice or ``[X, Y, Z]`` volume with voxel size
    ``spacing`` (mm, x y z), its first voxel at the origin."""
    return np.diag([*map(float, spacing), 1.0])


def as_volume(array: np.ndarray) -> np.ndarray:
    """What a sample's array is written as: a slice ``[S, S]`` as ``[S, S, 1]``, a volume as it is."""
    return np.atleast_3d(np.asarray(array, dtype=np.float32))


def write_sample(folder: Path, arrays: Mapping[str, np.ndarray], spacing: Sequence[float]) -> Path:
    """Write ``{key: [S, S] or [X, Y, Z]}`` (images in [0, 1], ``seg`` in {0, 1}) as
    ``folder/<key>.nii.gz``, atomically: into a temporary sibling folder, then renamed."""
    folder = Path(folder)
    affine = slice_affine(spacing)
    with atomic_write(folder) as tmp:
        for key, array in arrays.items():
            save_volume(modality_path(tmp, key), as_volume(array), affine, is_mask=key in MASK_FILES)
    return folder


class BackgroundWrites:
    """Writes (compression and disk I/O) in worker threads, so they overlap with sampling the next
    batch; a failed write is raised by :meth:`submit` or on leaving the ``with`` block, which waits
    for every pending write (a stop never leaves a write behind)."""

    def __init__(self, workers: int = 4):
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="medgen-write")
        self._pending: list[Future] = []

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self._raise_failures()
        self._pending.append(self._pool.submit(fn, *args))

    def _raise_failures(self, wait: bool = False) -> None:
        still = []
        for future in self._pending:
            if wait or future.done():
                future.result()  # re-raises the write's exception
            else:
                still.append(future)
        self._pending = still

    def __enter__(self) -> "BackgroundWrites":
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._raise_failures(wait=True)
        finally:
            self._pool.shutdown(wait=True)


def is_complete(folder: Path, keys: Sequence[str]) -> bool:
    return all((Path(folder) / f"{k}{NIFTI_SUFFIX}").is_file() for k in keys)


def render_sample(arrays: Mapping[str, np.ndarray], image_keys: Sequence[str], space: SampleSpace, scale: int = 2,
                  outlined_only: bool = False) -> np.ndarray:
    """A sample of ``space``: its pictures side by side: per image key the image as generated, then the
    same image with the mask outlined in red (so the lesion itself is not hidden by its outline). A
    volume ``[X, Y, Z]`` shows its axial, coronal and sagittal planes through its largest lesion, both
    pictures through the same voxel (:func:`~medgen.data.pictures.render_planes`, voxels in proportion
    to the space's spacing) for each. ``outlined_only``: the outlined pictures alone (a contact sheet's tile)."""
    mask = arrays[MASK_KEY]
    draw = drawer(mask, space, scale)
    tiles = [t for k in image_keys for t in (() if outlined_only else (draw(arrays[k], None),)) + (draw(arrays[k], mask),)]
    return side_by_side(tiles, gap=space.either(2, 4))


Draw = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]


def drawer(mask: np.ndarray, space: SampleSpace, scale: int) -> Draw:
    """``draw(image, outlined)``: a picture of a sample of ``space``: a slice's tile, or a volume's three
    planes, every picture through the largest lesion of ``mask``."""
    return space.either(_tile_drawer, _planes_drawer)(mask, space, scale)


def _tile_drawer(mask: np.ndarray, space: SampleSpace, scale: int) -> Draw:  # noqa: ARG001 - one signature
    """A slice's picture (:func:`~medgen.data.pictures.render_tile`)."""
    return lambda image, m: render_tile(image, m, scale)


def _planes_drawer(mask: np.ndarray, space: SampleSpace, scale: int) -> Draw:
    """A volume's three planes, every picture of the sample through the largest lesion of ``mask``."""
    centre = plane_centre(mask, space.shape)
    return lambda image, m: render_planes(image, m, space.mm, scale, centre)


def write_manifest(path: Path, rows: Sequence[Mapping[str, object]],
                   columns: Sequence[str] = MANIFEST_COLUMNS) -> Path:
    """``manifest.csv`` with ``columns`` (a generation run's :data:`MANIFEST_COLUMNS`), written atomically."""
    path = Path(path)
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in columns})
    return path


def nnunet_dataset_json(image_keys: Sequence[str], cases: int, name: str, description: str) -> dict[str, Any]:
    """nnU-Net v2's ``dataset.json`` of ``cases`` training cases: channel ``c`` is ``image_keys[c]``,
    labels background 0 and lesion 1, NIfTI files."""
    return {"channel_names": {str(c): key for c, key in enumerate(image_keys)},
            "labels": {"background": 0, "lesion": 1}, "numTraining": cases, "file_ending": NIFTI_SUFFIX,
            "name": name, "description": description}


def export_nnunet(out_dir: Path, samples: Sequence[Path], image_keys: Sequence[str], dataset_id: int,
                  name: str, space: SampleSpace) -> Path:
    """nnU-Net v2 raw format under ``out_dir/nnUNet_raw/Dataset<id>_<name>/``: ``imagesTr/<case>_<c>.nii.gz``
    (channel ``c`` = ``image_keys[c]``), ``labelsTr/<case>.nii.gz`` and ``dataset.json``. Files are
    hard links to the sample folders where the file system allows, else copies. Slices are
    ``[S, S, 1]`` volumes (nnU-Net's ``2d`` configuration), the samples of a volume ``space`` whole
    ones (``3d_fullres``)."""
    root = Path(out_dir) / "nnUNet_raw" / f"Dataset{dataset_id:03d}_{name}"
    root.parent.mkdir(parents=True, exist_ok=True)
    dataset = nnunet_dataset_json(image_keys, len(samples), name,
                                  f"synthetic brain-metastasis {space.unit}s generated by medgen (mask + matching MRI)")
    if root.exists():
        shutil.rmtree(root)
    with atomic_write(root) as tmp:
        (tmp / "imagesTr").mkdir(parents=True)
        (tmp / "labelsTr").mkdir()
        for folder in samples:
            case = folder.name
            for c, key in enumerate(image_keys):
                _link(modality_path(folder, key), tmp / "imagesTr" / f"{case}_{c:04d}{NIFTI_SUFFIX}")
            _link(modality_path(folder, MASK_KEY), tmp / "labelsTr" / f"{case}{NIFTI_SUFFIX}")
        (tmp / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return root


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
