"""The evaluation report: ``report.md`` and ``report.html`` with PNG figures, from ``metrics.json``.

Figures (matplotlib's Agg canvas, no pyplot): ``contact_sheets.png`` (real | synthetic; for a 3D
set ``planes_real.png`` and ``planes_synthetic.png`` instead: volumes as their three planes),
``intensity_histograms.png``, ``mask_statistics.png`` and, when the downstream experiment ran,
``downstream.png`` (Dice per training set, one dot per seed) and ``lesions.png`` (lesion-wise figures
per size bin and training set). Both report files reference exactly the figures written.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from medgen.core.constants import MASK_KEY
from medgen.core.fs import atomic_write
from medgen.data import pictures
from medgen.data.space import SampleSpace
from medgen.evaluation import metrics
from medgen.evaluation.downstream import SETS, SIZE_BINS, SIZE_BINS_3D
from medgen.evaluation.lesionwise import bin_entry
from medgen.evaluation.nnunet import segmenter_text
from medgen.evaluation.scoring import brats_summary_lines, brats_table

SHEET_TILES = 16
#: volumes per set in the three-plane sheets of a 3D set
SHEET_VOLUMES = 8
_COLOURS = {"real": "#4c72b0", "synthetic": "#dd8452", "real+synthetic": "#55a868"}
#: training sets of other names (the targeted-augmentation experiment's)
_EXTRA_COLOURS = ("#55a868", "#c44e52", "#8172b3", "#937860")


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def recorded_space(result: dict) -> SampleSpace:
    """The sample space a result (``metrics.json``, ``augmentation.json``) records."""
    return SampleSpace.from_state(result["space"])


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# ============================================================================ figures
def contact_sheets(sets, out: Path) -> Path:
    """Real test slices (left) and synthetic samples (right), each image with its mask outlined."""
    def tiles(cache, seed):
        idx = np.sort(np.random.default_rng(seed).choice(len(cache), min(SHEET_TILES, len(cache)), replace=False))
        data = np.asarray(cache.data[idx], np.float32)
        seg = cache.keys.index(MASK_KEY)
        image = next(i for i, k in enumerate(cache.keys) if k != MASK_KEY)  # the first image modality
        scale = max(1, 128 // data.shape[-1])
        return [pictures.render_tile(d[image], d[seg], scale) for d in data]

    sheets = [pictures.contact_sheet(tiles(cache, seed), columns=4)
              for cache, seed in ((sets.test, 0), (sets.synthetic, 1))]
    return pictures.save_png(pictures.side_by_side(sheets, gap=16), out / "contact_sheets.png")


def plane_sheets(sets, out: Path) -> list[tuple[str, Path]]:
    """3D sets: ``planes_real.png`` and ``planes_synthetic.png``, up to :data:`SHEET_VOLUMES` volumes
    of each set (seeded choice), each drawn as its axial, coronal and sagittal planes through its
    largest lesion (:func:`~medgen.data.pictures.render_planes`, the first image modality, the mask
    outlined, voxels in proportion to the set's spacing), two volumes per row."""
    figures = []
    for name, cache, seed, caption in (
            ("real", sets.test, 0, f"Real {sets.reference_split} volumes"), ("synthetic", sets.synthetic, 1, "Synthetic volumes")):
        idx = np.sort(np.random.default_rng(seed).choice(len(cache), min(SHEET_VOLUMES, len(cache)), replace=False))
        data = np.asarray(cache.data[idx], np.float32)
        seg = cache.keys.index(MASK_KEY)
        image = next(i for i, k in enumerate(cache.keys) if k != MASK_KEY)
        scale = max(1, 128 // max(data.shape[2:]))
        tiles = [pictures.render_planes(d[image], d[seg], sets.spacing(name), scale) for d in data]
        path = pictures.save_png(pictures.contact_sheet(tiles, columns=2), out / f"planes_{name}.png")
        figures.append((f"{caption}: axial, coronal and sagittal planes through the largest lesion, mask outlined", path))
    return figures


def intensity_figure(result: dict, out: Path) -> Path:
    keys = list(result["distribution"]["intensity"])
    fig = Figure(figsize=(5 * len(keys), 3.5))
    for i, key in enumerate(keys):
        d = result["distribution"]["intensity"][key]
        ax = fig.add_subplot(1, len(keys), i + 1)
        edges = np.asarray(d["histogram_edges"])
        centres = (edges[1:] + edges[:-1]) / 2
        for name in ("real", "synthetic"):
            ax.plot(centres, d[f"{name}_histogram"], color=_COLOURS[name], label=name)
        ax.set_title(f"{key}: brain intensities (W1 {_fmt(d['wasserstein'])})")
        ax.set_xlabel("intensity (0-1)")
        ax.set_ylabel("density")
        ax.legend()
    return _save(fig, out / "intensity_histograms.png")


#: the panels of the mask figure: (slices, volumes)
_MASK_PANELS = ((("lesions", "lesions per slice", None), ("area", "lesion area (fraction of slice)", None),
                 ("component_size", "lesion size (fraction of slice)", "log")),
                (("lesions", "lesions per volume", None), ("volume_fraction", "lesion volume (fraction of volume)", None),
                 ("largest_diameter_mm", "largest lesion Feret diameter (mm)", None),
                 ("lesion_volume_mm3", "lesion volume (mm³)", "log")))


def mask_figure(sets, out: Path) -> Path:
    """Histograms of the mask statistics of both sets (:func:`~medgen.evaluation.metrics.mask_statistics`:
    per slice, or per volume and lesion in 3D)."""
    space = sets.space
    real = metrics.mask_statistics(sets.test.data[:, sets.test.keys.index(MASK_KEY)],  # binarised there
                                   space.with_spacing(sets.spacing("real")))
    syn = metrics.mask_statistics(sets.synthetic.data[:, sets.synthetic.keys.index(MASK_KEY)],
                                  space.with_spacing(sets.spacing("synthetic")))
    panels = space.either(*_MASK_PANELS)
    fig = Figure(figsize=(4.7 * len(panels), 3.5))
    for i, (key, label, scale) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        both = np.concatenate([real[key], syn[key]]).astype(np.float64)
        if key == "lesions":
            bins = np.arange(0, both.max() + 2) - 0.5
        elif scale == "log":
            bins = np.geomspace(max(both[both > 0].min(), 1e-6), both.max() * 1.01, 30)
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # decade labels only: minor ones overlap
        else:
            bins = np.linspace(0, both.max() * 1.01, 30)
        for name, values in (("real", real[key]), ("synthetic", syn[key])):
            if len(values) == 0:  # no lesion in the set: nothing to draw (a density of nothing is 0/0)
                ax.plot([], [], color=_COLOURS[name], label=f"{name} (none)")
                continue
            ax.hist(values, bins=bins, density=True, histtype="step", linewidth=1.6, color=_COLOURS[name], label=name)
        ax.set_xlabel(label)
        ax.legend()
    return _save(fig, out / "mask_statistics.png")


def downstream_figure(result: dict, out: Path) -> Path:
    d = result["downstream"]
    fig = Figure(figsize=(6, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    for i, name in enumerate(SETS):
        dice = [r["overall"] for r in d[name]["per_seed"]]
        ax.bar(i, d[name]["mean"], yerr=d[name]["std"], color=_COLOURS[name], alpha=0.6, capsize=6)
        ax.scatter([i] * len(dice), dice, color="black", s=14, zorder=3)
    unit = result.get("unit", "slice")
    ax.set_xticks(range(len(SETS)), [f"{n}\n({d[n]['train_items']} {unit}s)" for n in SETS])
    ax.set_ylabel(f"Dice on real test {unit}s")
    ax.set_ylim(0, 1)
    ax.set_title(f"downstream segmentation ({len(d['real']['per_seed'])} seeds, {d['budget']['steps']} steps)")
    return _save(fig, out / "downstream.png")


_LESION_FIGURES = (("sensitivity", "lesion-wise sensitivity"), ("dice", "lesion Dice"),
                   ("false_positives_per_item", "false-positive lesions per slice"))


def _test_lesions(les: dict) -> dict[str, int]:
    """True lesions per bin of the real test split, and ``all`` of them."""
    return {**les["test_lesions"], "all": sum(les["test_lesions"].values())}


def _colour(name: str, j: int) -> str:
    return _COLOURS.get(name, _EXTRA_COLOURS[j % len(_EXTRA_COLOURS)])


def lesion_figure(les: dict, path: Path) -> Path:
    """Lesion-wise figures per size bin of every training set in ``les["sets"]`` (bars: mean ± std
    over seeds; dots: seeds)."""
    counts = _test_lesions(les)
    names, sets = list(counts), list(les["sets"])
    fig = Figure(figsize=(4.2 * len(_LESION_FIGURES), 3.8))
    width = 0.8 / len(sets)
    for k, (figure, label) in enumerate(_LESION_FIGURES):
        ax = fig.add_subplot(1, len(_LESION_FIGURES), k + 1)
        for j, name in enumerate(sets):
            s = les["sets"][name]
            x = np.arange(len(names)) + (j - (len(sets) - 1) / 2) * width
            mean = [np.nan if s["mean"][b][figure] is None else s["mean"][b][figure] for b in names]
            std = [0.0 if s["std"][b][figure] is None else s["std"][b][figure] for b in names]
            ax.bar(x, mean, width, yerr=std, color=_colour(name, j), alpha=0.7, capsize=3, label=name)
            for seed in s["per_seed"]:
                v = [bin_entry(seed, b)[figure]["value"] for b in names]
                ax.scatter(x, [np.nan if a is None else a for a in v], color="black", s=6, zorder=3)
        ax.set_xticks(range(len(names)), [f"{b}\n({n})" for b, n in counts.items()])
        ax.set_title(label.replace("slice", les.get("unit", "slice")))
        if figure != "false_positives_per_item":
            ax.set_ylim(0, 1.2)  # room above 1 for the legend
            ax.set_yticks(np.linspace(0, 1, 6))
        if k == 0:
            ax.set_ylabel("real test split (lesions per bin)")
            ax.legend(fontsize=7, ncol=len(sets), loc="upper center")
    return _save(fig, path)


# ============================================================================ tables
def _mean_std(s: dict, b: str, figure: str, digits: int = 3) -> str:
    mean, std = s["mean"][b][figure], s["std"][b][figure]
    if mean is None:
        return "—"
    first = bin_entry(s["per_seed"][0], b)[figure]["ci95"]
    return f"{mean:.{digits}f} ± {std:.{digits}f}" + (f" [{first[0]:.{digits}f}, {first[1]:.{digits}f}]" if first else "")


def lesion_table(les: dict, space: SampleSpace) -> tuple[str, list[str], list[list[str]], str]:
    """The lesion-wise table of ``les`` (``metrics.json``'s ``lesions``, or ``augmentation.json``),
    figures of samples of ``space``."""
    rows = [[name, b, str(n), *[_mean_std(les["sets"][name], b, figure) for figure, _ in _LESION_FIGURES]]
            for name in les["sets"] for b, n in _test_lesions(les).items()]
    unit, voxels, brain = space.unit, f"{space.element}s", space.either("brain ", "")
    note = (f"The whole real test split: {les['lesion_items']} lesion {unit}s and {les['lesion_free_items']} "
            f"lesion-free {brain}{unit}s; lesions binned by Feret diameter (edges {les['edges_mm']} mm, {voxels} "
            f"{les['spacing_mm']} mm). A true lesion is found when the prediction overlaps it; its lesion Dice "
            "counts the predicted lesions that touch it; a predicted lesion touching none is a false positive, "
            f"binned by its own diameter. Mean ± std over seeds, [bootstrap 95% interval over {unit}s, first seed]. "
            f"Yardstick rule: {les['yardstick']['rule']}.")
    note = space.either("", "Lesions are 3D (26-connected components, diameters over the three axes). ") + note
    return ("Lesion-wise segmentation (real test split, by lesion size" + space.either(")", ", 3D lesions)"),
            ["trained on", "size", "test lesions", "sensitivity", "lesion Dice", f"false positives / {unit}"], rows, note)


def _mask_table(result: dict) -> tuple[str, list[str], list[list[str]], str]:
    m, anatomy = result["distribution"]["masks"], result.get("anatomy", {})
    rows = [[k.replace("_", " "), _fmt(m[k]["real_mean"], 4), _fmt(m[k]["synthetic_mean"], 4), _fmt(m[k]["wasserstein"], 4),
             _fmt(m[k]["ks"])] for k in m if k != "empty_fraction"]
    rows.append(["empty fraction", _fmt(m["empty_fraction"]["real"]), _fmt(m["empty_fraction"]["synthetic"]), "", ""])
    space = recorded_space(result)
    element = f"{space.element}s"
    if anatomy.get("inside_brain"):
        rows.append([f"lesion {element} inside the brain", _fmt(anatomy["inside_brain"]["real"]),
                     _fmt(anatomy["inside_brain"]["synthetic"]), "", ""])
    brain = (f"the fraction of lesion {element} inside the brain of their own image (the brain derived from "
             f"{anatomy.get('brain_from', 'the image')} as for training data"
             + space.either(").", ", axial slice by axial slice)."))
    if not space.volumetric:
        return ("Masks", ["statistic", "real mean", "synthetic mean", "Wasserstein-1", "KS"], rows,
                "Lesions per slice, lesion area and size of each lesion (areas as fractions of the slice); " + brain)
    spacing = result.get("spacing_mm", {})
    return ("Masks (3D, per volume)", ["statistic", "real mean", "synthetic mean", "Wasserstein-1", "KS"], rows,
            "Lesions per volume (26-connected components), lesion volume fraction, Feret diameter of each volume's "
            "largest lesion over the three axes and volume of each lesion (voxels of "
            + ", ".join(f"{n} {' x '.join(f'{v:.2f}' for v in sp)} mm" for n, sp in spacing.items()) + "); " + brain)


def _feature_table(result: dict) -> tuple[str, list[str], list[list[str]], str]:
    f = result["features"]
    if "skipped" in f:
        return ("FID and KID", ["note"], [[f["skipped"]]], "")
    header = ["modality", "FID synthetic vs real", "KID synthetic vs real", "FID real val vs real test (floor)",
              "KID floor"]
    entries = {k: v for k, v in f.items() if isinstance(v, dict)}
    if not recorded_space(result).volumetric:
        rows = [_feature_row(k, v, "") for k, v in entries.items()]
        return (f"FID and KID ({f['network']} features)", header, rows,
                "The floor is what two real samples of this size score against each other.")
    rows = [row for k, v in entries.items() for row in
            [_feature_row(f"{k} (2.5D: mean of planes)", v, "_2.5d")]
            + [_feature_row(f"{k} {plane}", e, "") for plane, e in v["planes"].items()]]
    return (f"FID and KID, 2.5D ({f['network']} features)", header, rows,
            f"2.5D: {f['slices_per_plane']} slices per volume in each plane (axial, coronal, sagittal), evenly spaced "
            f"through the middle {f['plane_fraction']:.0%} of the axis across it; FID and KID per plane and their "
            "mean. The floor is what two real samples of this size score against each other.")


def _feature_row(name: str, v: dict, suffix: str) -> list[str]:
    return [name, _fmt(v[f"fid{suffix}"], 2), f"{_fmt(v[f'kid_mean{suffix}'], 4)} ± {_fmt(v[f'kid_std{suffix}'], 4)}",
            _fmt(v.get(f"fid_real_val_vs_test{suffix}"), 2), _fmt(v.get(f"kid_real_val_vs_test{suffix}"), 4)]


def _segmentation_tables(result: dict) -> list[tuple[str, list[str], list[list[str]], str]]:
    space, tables = recorded_space(result), []
    unit = space.unit
    a = result.get("adherence", {})
    if "skipped" not in a and a:
        tables.append(("Conditioning adherence", ["images", f"{unit}s", "Dice against their masks",
                                                  f"{unit}s with a false lesion", "false lesion area"],
                       [["synthetic, mask with a lesion", str(a["lesion_items"]), _fmt(a["synthetic_dice"]), "", ""],
                        ["synthetic, lesion-free mask", str(a["empty_items"]), "",
                         _fmt(a["false_positive_fraction"]), _fmt(a["false_positive_area"], 4)],
                        ["real test (reference level)", str(a["real_test_items"]), _fmt(a["real_test_dice"]), "", ""]],
                       "A segmentation network trained on real data segments each set. Dice is measured where the "
                       "mask has a lesion; lesion-free masks are scored by false positives (the fraction of them "
                       "where the network marks a lesion, and the mean marked area)."))
    d = result.get("downstream", {})
    if d and "skipped" not in d:
        rows = [[n, str(d[n]["train_items"]), f"{_fmt(d[n]['mean'])} ± {_fmt(d[n]['std'])}",
                 *[_fmt(d[n]["bins"][b]) for b, _ in SIZE_BINS]] for n in SETS]
        g = d["gain"]
        note = (f"Gain of real+synthetic over real: {g['value']:+.3f} Dice; seed-to-seed spread (largest standard "
                f"deviation) {g['spread']:.3f}: {g['verdict']}.")
        if space.volumetric:
            note = ("Dice per test volume, lesion sizes binned by lesion volume fraction ("
                    + ", ".join(f"{b} < {e:g}" for b, e in SIZE_BINS_3D[:-1]) + "). " + note)
        note = segmenter_text(d, space) + note
        tables.append((f"Downstream segmentation (Dice on real test {unit}s)",
                       ["trained on", f"{unit}s", "Dice mean ± std over seeds", *[f"{b} lesions" for b, _ in SIZE_BINS]],
                       rows, note))
    if result.get("lesions") and "skipped" not in result["lesions"]:
        tables += [lesion_table(result["lesions"], space), brats_table(result["lesions"]["sets"], unit)]
    return tables


def _tables(result: dict) -> list[tuple[str, list[str], list[list[str]], str]]:
    """(title, header, rows, note) of every table in the report."""
    dist = result["distribution"]
    space = recorded_space(result)
    element = f"{space.element}s"
    rows = [[k, _fmt(v["real_mean"]), _fmt(v["synthetic_mean"]), _fmt(v["wasserstein"], 4), _fmt(v["ks"]),
             _fmt(dist["diversity"][k]["real_ms_ssim"]), _fmt(dist["diversity"][k]["synthetic_ms_ssim"])]
            for k, v in dist["intensity"].items()]
    tables = [_mask_table(result),
              ("Intensities and diversity", ["modality", "real mean", "synthetic mean", "Wasserstein-1", "KS",
                                             "MS-SSIM real pairs", "MS-SSIM synthetic pairs"], rows,
               f"Intensities of brain {element}; MS-SSIM between random pairs within a set (lower = more diverse"
               + space.either(").", "; 3D MS-SSIM of whole volumes).")),
              _feature_table(result)]
    p = result["paired"]
    if "skipped" not in p:
        rows = [[k, _fmt(v["psnr"], 2), _fmt(v["ssim"]), str(v["pairs"])] for k, v in p.items()]
        tables.append(("Paired fidelity (same masks)", ["modality", "PSNR (dB)", "SSIM", "pairs"], rows,
                       "Synthetic images against the real images whose masks they were generated for."))
    return tables + _segmentation_tables(result)


def skipped_metrics(result: dict, where: str = "") -> list[tuple[str, str]]:
    """``(where, reason)`` of every metric the evaluation skipped (a ``"skipped"`` entry anywhere in
    the result, e.g. ``("features", "FID/KID needs at least 2 slices per set (synthetic 1)")``)."""
    out = []
    for key, value in result.items():
        if key == "skipped" and isinstance(value, str):
            out.append((where or "evaluation", value))
        elif isinstance(value, dict):
            out += skipped_metrics(value, f"{where}.{key}" if where else key)
    return out


def summary_lines(result: dict) -> list[str]:
    """The headline numbers, for the console and the demo's summary."""
    lines = [f"warning: {w}" for w in result.get("warnings", [])]
    lines += [f"skipped: {where}: {reason}" for where, reason in skipped_metrics(result)]
    for key, v in result["features"].items():
        if isinstance(v, dict):
            suffix = "_2.5d" if "fid_2.5d" in v else ""  # a 3D set's entries are the means over the planes
            floor = v.get(f"fid_real_val_vs_test{suffix}")
            lines.append(f"FID{' 2.5D' if suffix else ''} {key} ({result['features']['network']}): "
                         f"{v['fid' + suffix]:.2f} synthetic vs real"
                         + (f", {floor:.2f} real val vs real test (floor)" if floor is not None else ""))
    inside = result.get("anatomy", {}).get("inside_brain", {})
    if inside.get("synthetic") is not None:
        lines.append(f"lesion pixels inside the brain of their image: {100 * inside['synthetic']:.1f}% synthetic, "
                     + (f"{100 * inside['real']:.1f}% real" if inside.get("real") is not None else "real: no lesion"))
    a = result.get("adherence", {})
    if a and "skipped" not in a:
        if a["synthetic_dice"] is not None:
            lines.append(f"conditioning Dice: {a['synthetic_dice']:.3f} on synthetic images ({a['lesion_items']} with "
                         f"a lesion), {a['real_test_dice']:.3f} on real test images (same real-trained network)")
        if a["false_positive_fraction"] is not None:
            lines.append(f"false lesions on {100 * a['false_positive_fraction']:.1f}% of the {a['empty_items']} "
                         "lesion-free synthetic slices")
    d = result.get("downstream", {})
    if d and "skipped" not in d:
        for name in SETS:
            lines.append(f"downstream Dice, trained on {name:<15} {d[name]['mean']:.3f} ± {d[name]['std']:.3f}")
        g = d["gain"]
        lines.append(f"gain of real+synthetic over real: {g['value']:+.3f} Dice (seed spread {g['spread']:.3f}): "
                     f"{g['verdict']}")
    les = result.get("lesions", {})
    if les and "skipped" not in les:
        for name in SETS:
            m = les["sets"][name]["mean"]
            per_bin = ", ".join(f"{b} {_fmt(m[b]['sensitivity'], 2)}" for b in les["bins"])
            lines.append(f"lesion-wise sensitivity, trained on {name:<15} {_fmt(m['all']['sensitivity'])} "
                         f"({per_bin}); false positives per {result.get('unit', 'slice')} "
                         f"{_fmt(m['all']['false_positives_per_item'])}")
        lines += brats_summary_lines(les["sets"])
    lines.append(f"report: {Path(result['out_dir']) / 'report.html'}")
    return lines


def _intro(result: dict) -> str:
    space = recorded_space(result)
    if not space.volumetric:
        return (f"Synthetic set `{result['synthetic_dir']}` against the lesion slices of the real "
                f"{result['reference_split']} split of `{result['real_dir']}`, at {space.size} px, modalities "
                f"{', '.join(result['modalities'])}. All numbers are in `metrics.json`.")
    return (f"A 3D synthetic set: `{result['synthetic_dir']}`, volumes of {space.tag} "
            f"voxels, against the real volumes with a lesion of the {result['reference_split']} split of "
            f"`{result['real_dir']}` at that shape, modalities {', '.join(result['modalities'])}. Mask statistics, "
            "intensities, diversity (3D MS-SSIM), anatomy and lesion-wise figures are 3D (lesions are 26-connected "
            "components, diameters in mm over the three axes); FID and KID are 2.5D (slices of the axial, coronal and "
            "sagittal planes); the downstream segmenter is a 3D DynUNet scored per volume. All numbers are in "
            "`metrics.json`.")


def write_report(out: Path, result: dict, sets) -> tuple[Path, Path]:
    """``report.md`` and ``report.html`` with their figures, for ``result`` (``metrics.json``) of ``sets``."""
    sheets = plane_sheets(sets, out) if sets.space.volumetric else \
        [("Real (left) and synthetic (right) slices, mask outlined", contact_sheets(sets, out))]
    figures = sheets + [("Brain intensities", intensity_figure(result, out)),
                           ("Mask statistics", mask_figure(sets, out))]
    if result.get("downstream") and "skipped" not in result["downstream"]:
        figures.append(("Downstream segmentation", downstream_figure(result, out)))
    if result.get("lesions") and "skipped" not in result["lesions"]:
        figures.append(("Lesion-wise segmentation by lesion size", lesion_figure(result["lesions"], out / "lesions.png")))
    title = f"medgen evaluation: {Path(result['synthetic_dir']).name} vs {Path(result['real_dir']).name}"
    intro = _intro(result)
    notes = [f"Warning: {w}" for w in result.get("warnings", [])] + \
        [f"Skipped ({where}): {reason}" for where, reason in skipped_metrics(result)]
    return write_pages(out, "report", title, intro, notes, _tables(result), figures)


def write_pages(out: Path, stem: str, title: str, intro: str, notes: list[str],
                tables: list[tuple[str, list[str], list[list[str]], str]],
                figures: list[tuple[str, Path]]) -> tuple[Path, Path]:
    """``<stem>.md`` and ``<stem>.html`` in ``out``: title, intro, notes, tables (title, header, rows,
    note) and figures (caption, PNG in ``out``)."""
    md = [f"# {title}", "", intro, ""]
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(intro)}</p>"]
    if notes:
        md += [f"- {n}" for n in notes] + [""]
        body.append("<ul class=\"notes\">" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    for name, header, rows, note in tables:
        md += [f"## {name}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(r) + " |" for r in rows]
        md += ["", note, ""] if note else [""]
        body.append(f"<h2>{html.escape(name)}</h2><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
        body += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows]
        body.append("</table>" + (f"<p>{html.escape(note)}</p>" if note else ""))
    for caption, path in figures:
        md += [f"## {caption}", "", f"![{caption}]({path.name})", ""]
        body.append(f"<h2>{html.escape(caption)}</h2><img src=\"{path.name}\" alt=\"{html.escape(caption)}\">")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%}")
    with atomic_write(out / f"{stem}.md") as tmp:
        tmp.write_text("\n".join(md))
    with atomic_write(out / f"{stem}.html") as tmp:
        tmp.write_text(f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
                       f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
    return out / f"{stem}.md", out / f"{stem}.html"
