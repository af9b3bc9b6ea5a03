"""The demo's ``<out>/summary.md``: the stages (minutes, what each wrote), where the files are, the
evaluation's summary, and the lesion-contrast check of what minutes of CPU training give."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medgen.demo.profile import SLICES, Profile
from medgen.data.space import SampleSpace


def write_summary(out: Path, subjects: int, pairs: int, seconds: dict[str, float], facts: dict[str, dict],
                  runs: dict[str, Path], result, evaluation: dict, profile: Profile = SLICES,
                  inserted: dict[str, dict] | None = None) -> Path:
    """``<out>/summary.md``: the stages (minutes, what each wrote), where the files are, the
    evaluation's summary and the lesion-contrast check."""
    from medgen.evaluation.report import summary_lines

    check = contrast_check(out, [result.out_dir / "train" / sid for sid in result.sample_ids],
                           facts["bravo"]["space"])
    lines = [
        "# medgen demo",
        "",
        f"Phantoms → seg and bravo models (rectified flow, `training=cpu`, "
        f"{profile.size}) → {len(result.sample_ids)} synthetic pairs ({profile.item}s).",
        "",
        *_stage_table(out, subjects, seconds, facts, runs, result, profile),
        "",
        "## Where the files are",
        "",
        "- `synthetic/train/<id>/{seg,bravo}.nii.gz`: the synthetic dataset (medgen layout; "
        "`medgen-data check synthetic` passes, `medgen-train paths.data_dir=synthetic` trains on it)",
        "- `synthetic/manifest.csv`: seeds, checkpoints (SHA-256), sampler, lesion area, components, diameters and "
        "the share of lesion pixels inside the brain per sample",
        "- `contact_sheet.png` (= `synthetic/contact_sheet.png`): bravo as generated, then with the mask outlined "
        "in red" if profile is SLICES else "- `contact_sheet.png` (= `synthetic/contact_sheet.png`): each volume's "
        "axial, coronal and sagittal planes through its largest lesion, the mask outlined in red",
        "- `runs/<mode>/demo/samples/`: the training sample grids (condition | real | generated), "
        "`tensorboard --logdir runs` for the curves",
        "",
        "## Evaluation (`evaluation/report.html`, numbers in `evaluation/metrics.json`)",
        "",
        *[f"- {line}" for line in summary_lines(evaluation)[:-1]],
        "",
        f"The downstream networks train for 200 steps only (a laptop budget) on a few dozen lesion {profile.item}s;",
        "`medgen-evaluate` defaults to 1000 steps. Read the numbers as a check that the pipeline measures",
        "something, not as what these models could do for a segmentation network.",
        "",
        *_contrast_section(check, profile),
        *_insertion_section(inserted or {}, profile),
    ]
    path = out / "summary.md"
    path.write_text("\n".join(lines))
    return path


def _stage_table(out: Path, subjects: int, seconds: dict[str, float], facts: dict[str, dict],
                 runs: dict[str, Path], result, profile: Profile = SLICES) -> list[str]:
    """The summary's table of stages: minutes and what each one wrote."""
    rel = lambda p: Path(p).relative_to(out)  # noqa: E731
    lesions = "lesions" if profile.lesion_sizes == "clinical" else \
        f"lesions of every size, 1 to {profile.max_lesions} per head (`{profile.lesion_sizes}`)"
    lines = [
        "| stage | minutes | what |",
        "|---|---|---|",
        f"| phantoms | {seconds['phantoms'] / 60:.1f} | {subjects} subjects, 128 × 128 × 64, four contrasts and {lesions}: `data/` |",
    ]
    for mode in facts:
        f = facts[mode]
        what = f"{f['epochs']} epochs, {f['steps']} steps" + (" (reused)" if f.get("reused") else
                                                               f", best val loss {f['best_val_loss']:.4f}")
        lines.append(f"| train {mode} | {seconds[f'train {mode}'] / 60:.1f} | {what}: `{rel(runs[mode])}/` |")
    rate = "" if result.acceptance_rate is None else f", quality gate acceptance {100 * result.acceptance_rate:.0f}%"
    inserted = f"| insert | {seconds['insert'] / 60:.1f} | a new lesion in each of some real {profile.item}s, two " \
        "painters: `inserted/`, `insertion_sheet.png` |" if "insert" in seconds else None
    lines += [
        f"| generate | {seconds['generate'] / 60:.1f} | {len(result.sample_ids)} pairs{rate}: `synthetic/` |",
        *([inserted] if inserted else []),
        f"| evaluate | {seconds['evaluate'] / 60:.1f} | FID, conditioning adherence, downstream segmentation: "
        "`evaluation/report.html` |",
        f"| total | {sum(seconds.values()) / 60:.1f} | |",
    ]
    return lines


def _contrast_section(check: dict[str, float], profile: Profile = SLICES) -> list[str]:
    """The summary's last section: :func:`contrast_check`'s numbers and what they show."""
    return [
        "## What minutes of CPU training give",
        "",
        "**Do lesions sit where the masks are?** Mean intensity inside the mask minus the mean in a",
        "3-pixel band around it (bravo in [0, 1]; higher = a brighter lesion at the mask):",
        "",
        "| images | masks | contrast | positive |",
        "|---|---|---|---|",
        f"| synthetic | their own | {check['own']:.3f} | {100 * check['own_positive']:.0f}% |",
        f"| synthetic | another sample's (control) | {check['shuffled']:.3f} | {100 * check['shuffled_positive']:.0f}% |",
        f"| real test {profile.item}s ({check['n_real']}) | their own | {check['real']:.3f} | "
        f"{100 * check['real_positive']:.0f}% |",
        "",
        *(_SLICE_TEXT if profile is SLICES else _VOLUME_TEXT),
    ]


def _insertion_section(reports: dict[str, dict], profile: Profile = SLICES) -> list[str]:
    """The summary's insertion section: per painter the lesions painted, the seam and the contrast."""
    if not reports:
        return []
    lines = ["## New lesions painted into real scans (`insertion_sheet.png`)", "",
             f"One new lesion ({' or '.join(profile.insert_sizes)}) in each of a few real phantom {profile.item}s, "
             "the rest of each scan unchanged (`inserted/<painter>/`, docs: Insertion). Seam: the intensity gradient on the painted "
             "region's border after / before painting (1: no seam). Contrast: mean intensity of the new lesions "
             "over their region's rim (real lesions in the same scans: beside it).", "",
             f"| painter | lesions ({', '.join(profile.insert_sizes)}) | seam | lesion contrast | real lesions' contrast |",
             "|---|---|---|---|---|"]
    for painter, report in reports.items():
        seam, sizes = report["seam"], report["sizes"]
        painted = [sizes["painted"][sizes["bins"].index(name)] for name in profile.insert_sizes]
        fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(f"| {painter} | {', '.join(map(str, painted))} | {fmt(seam['seam'])} | {fmt(seam['lesion_contrast'])} "
                     f"| {fmt(seam['real_lesion_contrast'])} |")
    return [*lines, "", "`repaint` is the demo's bravo model painting with the scan put back outside the region at "
            "every step; `copy` moves real lesions of other phantoms (the yardstick).", ""]


_SLICE_TEXT = [
        "A 64 px model trained for minutes on a laptop learns the layout of a head: a dark background, a",
        "skull ring, gyri-like texture inside, and a bright spot where the mask has a lesion (the table",
        "above). The seg model draws small blob-like lesions together with the brain they lie in; the",
        "quality gate replaces specks, oversized masks and masks with a lesion pixel outside that brain,",
        "and the bravo model paints a head around the brain it is given (the evaluation above gives the",
        "share of lesion pixels inside the brain of their own image, real and synthetic). Sharp anatomy,",
        "grey/white matter contrast and realistic lesion appearance need the specification's network",
        "(`model=default`, 128 px) trained for hours on a GPU (`training=default`). The demo shows that",
        "data, training, the two-stage generation and the output format work end to end; it is not",
        "data to train a segmentation model on.",
        "",
]
_VOLUME_TEXT = [
    "The volume demo trains both models on 32 x 32 x 16 volumes (voxels of about 7 x 7 x 10 mm) of",
    "phantoms with lesions of every size (`lesion_sizes=cover`, 1 to 6 per head): the clinical mix",
    "(median 7 mm) is mostly smaller than one voxel at this shape. The seg model of a few minutes draws",
    "lesions of one to a dozen voxels with a rough brain around them; the quality gate (for volumes: no",
    "lesion under the voxels a 4 mm ball fills, none outside the drawn brain) keeps the share of its",
    "masks the table above gives, and the bravo model paints a head around each. The contact sheet",
    "shows each volume in three planes through its largest lesion. Lesions of realistic shape need the",
    "GPU profile (`model.image_size=[128,128,64]`, `training=default`) and hours. The demo shows that",
    "the volume path (volume cache, 3D training of both models, both stages of generation, 3D",
    "evaluation with 2.5D FID and a 3D downstream network) works end to end.",
    "",
]


def contrast_check(out: Path, sample_dirs: list[Path], space: SampleSpace) -> dict[str, float]:
    """Do lesions sit where the masks are? :func:`lesion_contrast` of the synthetic bravo images with
    their own masks, with the masks of other samples (a pipeline that ignored the mask would score
    the same on both), and of the real test items of ``space`` with lesions."""
    from medgen.data.slices import SliceSpec, open_or_build_cache
    from medgen.data.splits import split_patients
    from medgen.data.volumes import VolumeSpec
    from medgen.evaluation.metrics import lesion_contrast
    from medgen.generation.images import read_sample

    pairs = [(a["bravo"], a["seg"]) for a in (read_sample(d, ("bravo",)) for d in sample_dirs)]
    own = [lesion_contrast(img, m) for img, m in pairs]
    shuffled = [lesion_contrast(img, pairs[(i + len(pairs) // 2) % len(pairs)][1]) for i, (img, _) in enumerate(pairs)]
    spec = space.either(lambda: SliceSpec(keys=("bravo", "seg"), image_size=space.size, selection="lesion"),
                        lambda: VolumeSpec(keys=("bravo", "seg"), volume_shape=space.shape))()
    cache = open_or_build_cache(split_patients(out / "data", "test"), spec, out / "cache", progress=False)
    real = [lesion_contrast(np.asarray(cache.data[i, 0], np.float32), np.asarray(cache.data[i, 1], np.float32))
            for i in range(len(cache)) if cache.lesion_pixels[i] > 0]
    return {"own": float(np.mean(own)), "own_positive": float(np.mean(np.asarray(own) > 0)),
            "shuffled": float(np.mean(shuffled)), "shuffled_positive": float(np.mean(np.asarray(shuffled) > 0)),
            "real": float(np.mean(real)), "real_positive": float(np.mean(np.asarray(real) > 0)), "n_real": len(real)}
