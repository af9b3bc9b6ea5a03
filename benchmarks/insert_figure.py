"""docs/insertion_real.png: new lesions painted into real heads by painters trained on phantoms.

The heads: 3D Slicer's MRHead (T1, a healthy volunteer) and MRBrainTumor2 (T1 post-contrast, a
patient with a tumour), which ``make real-scans`` extracts into ``.real-scans/``, and the MNI152 2009
T1 template that nilearn's wheel ships (skull-stripped: its brain only). :func:`heads_dataset` writes
them as a medgen dataset, ``test/<head>/bravo.nii.gz`` with an all-zero ``seg.nii.gz`` of the same
grid: these heads come without lesion labels (MRBrainTumor2's tumour is not labelled either).

:func:`train_painters` trains a seg model (DDPM; it draws the new lesions' shapes, ``insert.shapes=seg``:
heads without a lesion have none to take shapes from) and a bravo model (rectified flow; the
``repaint`` painter) for ``--steps`` steps each on phantoms (``medgen-data phantom``) at 64 px, and
:func:`insert` paints one new lesion into an axial slice of each head (``insert.brain_method=deepbet``,
``insert.keep_source=true``). The figure shows each slice before | after, the new lesion outlined in
red and the region the painter was allowed to change in yellow.
Prints one JSON line: the seconds of each stage and, per head, the slice, the new lesion's class and
diameter, and its share inside the brain.

    python benchmarks/insert_figure.py [--scans .real-scans] [--out docs/insertion_real.png] [--steps 300]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HEADS = ("MRHead", "MRBrainTumor2")
MNI = "MNI152"
#: the painters' sample size (px) and the phantoms they learn from
IMAGE_SIZE = 64
PHANTOMS = dict(subjects=8, size=128, slices=48, lesion_sizes="cover", max_lesions=6)
#: the overrides of both painters (training=cpu's network at 64 px)
TRAINING = ("training=cpu", "training.precision=fp32", "training.val_interval=1000", "training.batch_size=8",
            "training.num_sample_steps=3", "data.num_workers=0", "training.epochs=100000", "training.warmup_steps=10",
            "training.ema_update_after_step=0")
MODELS = {"seg": "ddpm", "bravo": "rflow"}
#: the split the heads are written to: test/ is read as it is (a train/ without val/ loses the patients
#: that medgen's patient-level split sends to validation, and a lone head may be one of them)
SPLIT = "test"


def heads_dataset(scans: Path, out: Path, names: tuple[str, ...] = (*HEADS, MNI)) -> Path:
    """``out/<SPLIT>/<head>/{bravo,seg}.nii.gz`` for each of ``names`` (a head in ``scans``, or
    :data:`MNI`: nilearn's MNI152 T1), the image as read, ``seg`` all zero on its grid. Returns ``out``."""
    import nibabel as nib

    from medgen.data.nifti_dataset import save_volume

    for name in names:
        if name == MNI:
            from nilearn import datasets

            image = datasets.load_mni152_template(resolution=1)
        else:
            image = nib.load(str(scans / f"{name}.nii.gz"))
        volume = np.asarray(image.get_fdata(dtype=np.float32))
        save_volume(out / SPLIT / name / "bravo.nii.gz", volume, image.affine)
        save_volume(out / SPLIT / name / "seg.nii.gz", np.zeros(volume.shape, np.float32), image.affine, is_mask=True)
    return out


def train_painters(work: Path, steps: int, seed: int = 0, modes: dict[str, str] = MODELS) -> dict[str, Path]:
    """Phantoms under ``work/phantoms`` and a model of each of ``modes`` (mode -> strategy) trained
    ``steps`` steps on them at :data:`IMAGE_SIZE` px; returns ``{mode: checkpoint}``."""
    import torch

    from medgen.core.distributed import DistInfo
    from medgen.data.phantom import generate_dataset
    from medgen.diffusion.config import load_config
    from medgen.diffusion.trainer import DiffusionTrainer

    data = work / "phantoms"
    if not data.exists():
        generate_dataset(data, seed=seed, workers=2, **PHANTOMS)
    out = {}
    for mode, strategy in modes.items():
        run = work / mode
        ckpt = run / "checkpoints" / "latest.pt"
        if not ckpt.exists():
            cfg = load_config([f"paths.data_dir={data}", f"paths.cache_dir={work / 'cache'}",
                               f"paths.model_dir={work / 'runs'}", f"mode={mode}", f"strategy={strategy}", *TRAINING,
                               f"model.image_size={IMAGE_SIZE}", f"training.max_steps={steps}", f"seed={seed}"])
            DiffusionTrainer(cfg, run, DistInfo(device=torch.device("cpu")), progress=False).train()
        out[mode] = ckpt
    return out


def insert(dataset: Path, checkpoints: dict[str, Path], out: Path, cache: Path, painter: str = "repaint",
           num_images: int = 3, steps: int = 20, size_class: str = "small", seed: int = 0):
    """``num_images`` slices of ``dataset``'s heads, each with one new lesion of ``size_class``
    painted by ``painter`` (its ``image_checkpoint``: ``checkpoints[painter]``, else the bravo model);
    the GenerationResult."""
    from medgen.generation import generate

    return generate(progress=False, out_dir=str(out), num_images=num_images, batch_size=4, steps=steps,
                    precision="fp32", cache_dir=str(cache), seed=seed,
                    image_checkpoint=str(checkpoints.get(painter, checkpoints["bravo"])),
                    seg_checkpoint=str(checkpoints["seg"]),
                    insert={"into": str(dataset), "split": SPLIT, "painter": painter, "keep_source": True,
                            "shapes": "seg", "brain_method": "deepbet"},
                    lesion_sizes={"target": {size_class: 1}}, lesion_counts={"target": {1: 1}})


def manifest(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def read_sample(folder: Path) -> dict[str, np.ndarray]:
    """A written sample's 2D arrays: bravo, seg, region, source_bravo, source_seg."""
    import nibabel as nib

    return {k: np.asarray(nib.load(str(folder / f"{k}.nii.gz")).dataobj).squeeze()
            for k in ("bravo", "seg", "region", "source_bravo", "source_seg")}


def draw(rows: list[tuple[str, dict[str, np.ndarray]]], out: Path, caption: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 2, figsize=(4.4, 2.25 * len(rows)), squeeze=False)
    for r, (title, s) in enumerate(rows):
        new = (s["seg"] > 0) & ~(s["source_seg"] > 0)
        for c, (key, name) in enumerate((("source_bravo", "before"), ("bravo", "after"))):
            ax = axes[r, c]
            ax.imshow(np.rot90(s[key]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            if c:
                ax.contour(np.rot90(new).astype(float), levels=[0.5], colors="red", linewidths=0.8)
                ax.contour(np.rot90(s["region"] > 0).astype(float), levels=[0.5], colors="yellow", linewidths=0.5)
            ax.set_title(f"{title}: {name}", fontsize=7)
            ax.axis("off")
    fig.suptitle(caption, fontsize=6.5)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT / "src"))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", type=Path, default=ROOT / ".real-scans")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "insertion_real.png")
    ap.add_argument("--work", type=Path, default=ROOT / ".insert-figure")
    ap.add_argument("--steps", type=int, default=300, help="training steps of each painter on phantoms")
    ap.add_argument("--sample-steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    checkpoints = train_painters(args.work, args.steps, args.seed)
    seconds["train"] = round(time.perf_counter() - t0, 1)
    rows, report = [], []
    for name in (*HEADS, MNI):  # one head per dataset: each row shows its own head
        dataset = args.work / "heads" / name
        if not dataset.exists():
            heads_dataset(args.scans, dataset, (name,))
        t1 = time.perf_counter()
        out = args.work / "out" / name
        insert(dataset, checkpoints, out, args.work / "cache", num_images=1, steps=args.sample_steps, seed=args.seed)
        seconds[name] = round(time.perf_counter() - t1, 1)
        row = manifest(out)[0]
        rows.append((f"{name} {row['source'].rsplit('/', 1)[-1]}", read_sample(out / "train" / row["id"])))
        report.append({k: row[k] for k in ("source", "lesion_bins", "lesion_diameters_mm", "inside_brain")})
    caption = (f"painters trained {args.steps} steps on phantoms (seg: the shape; bravo: RePaint, {args.sample_steps} "
               f"steps)\nred: new lesion, yellow: painted region; the rest is the real scan")
    draw(rows, args.out, caption)
    print(json.dumps({"seconds": seconds, "samples": report, "out": str(args.out)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
