"""``medgen-data``: make, import, check and preview datasets in medgen's layout.

    medgen-data phantom --out DIR --subjects N [--size 128] [--slices 64] [--seed 0] [--split 0.7,0.15,0.15]
                        [--lesion-sizes clinical|cover] [--max-lesions 15]
    medgen-data import --format brainmetshare-png|nnunet SRC DST [--map 0=bravo,1=t1_pre,...]
                       [--spacing 0.94,0.94,1.0 (PNG only)] [--split 0.8,0.1,0.1 [--seed 0]]
    medgen-data check DIR [--json] [--workers 2] [--keys bravo,seg]
    medgen-data preview DIR --out FILE.png [--patients 4]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from medgen.core.constants import DEFAULT_SPLIT


def _split_arg(text: str) -> tuple[float, float, float]:
    from medgen.data.splits import parse_split

    try:
        return parse_split(text, "--split")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _keys_arg(text: str) -> list[str]:
    from medgen.core.constants import MODALITIES

    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in MODALITIES]
    if not keys or unknown:
        raise argparse.ArgumentTypeError(f"--keys wants modalities from {','.join(MODALITIES)}, got {text!r}")
    return keys


def _map_arg(text: str) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for item in text.split(","):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"--map wants entries like 0=bravo, got {item!r}")
        k, v = item.split("=", 1)
        mapping[k.strip()] = v.strip()
    return mapping


def _spacing(text: str | None) -> tuple[float, ...] | None:
    from medgen.data.importers import ImportFormatError

    if not text:
        return None
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ImportFormatError(f"--spacing wants numbers in mm like 0.94,0.94,1.0, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medgen-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    ph = sub.add_parser("phantom", help="write a synthetic brain-MRI dataset with metastases (MNI152-based phantoms)")
    ph.add_argument("--out", required=True, type=Path, help="dataset root to create (train/, val/, test/)")
    ph.add_argument("--subjects", required=True, type=int, help="number of subjects")
    ph.add_argument("--size", type=int, default=128, help="in-plane size in voxels (default 128)")
    ph.add_argument("--slices", type=int, default=64, help="number of axial slices (default 64)")
    ph.add_argument("--seed", type=int, default=0, help="random seed (same seed, same data)")
    ph.add_argument("--split", type=_split_arg, default=DEFAULT_SPLIT,
                    help=f"train,val,test fractions (default {','.join(f'{f:g}' for f in DEFAULT_SPLIT)})")
    ph.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    ph.add_argument("--lesion-sizes", default="clinical", metavar="{clinical,cover}",
                    help="clinical (default: mostly small metastases, median 7 mm, 10%% of subjects without) or "
                         "cover (a benchmark: 1 to --max-lesions lesions per subject, each size class of RANO-BM "
                         "equally likely: 3-10, 10-20, 20-30, 30-40 mm)")
    ph.add_argument("--max-lesions", type=int, default=None,
                    help="most lesions per subject (default: the phantom model's cap, 15)")

    im = sub.add_parser("import", help="convert BrainMetShare PNG slices or an nnU-Net folder into medgen's layout")
    im.add_argument("--format", required=True, choices=["brainmetshare-png", "nnunet"])
    im.add_argument("src", type=Path)
    im.add_argument("dst", type=Path)
    im.add_argument("--map", type=_map_arg, default=None,
                    help="channel -> modality, e.g. 0=bravo,1=t1_pre,2=t1_gd,3=flair")
    im.add_argument("--spacing", type=str, default=None,
                    help="voxel spacing in mm for PNG imports, e.g. 0.94,0.94,1.0 (default 1,1,1); refused with "
                         "--format nnunet, whose files carry their own spacing")
    im.add_argument("--split", type=_split_arg, default=None,
                    help="train,val,test fractions for the imported patients (default: all into train/)")
    im.add_argument("--seed", type=int, default=None,
                    help="seed of the patient-level split (default 0); only with --split, refused without it")

    ck = sub.add_parser("check", help="read every file of a dataset and report every problem")
    ck.add_argument("dir", type=Path)
    ck.add_argument("--json", action="store_true", help="print the report as JSON")
    ck.add_argument("--workers", type=int, default=2, help="parallel processes (default 2)")
    ck.add_argument("--keys", type=_keys_arg, default=None,
                    help="modalities every patient must have, e.g. bravo,seg (default: every modality any patient has)")

    pv = sub.add_parser("preview", help="montage of a few patients' middle slices, mask outlined")
    pv.add_argument("dir", type=Path)
    pv.add_argument("--out", required=True, type=Path)
    pv.add_argument("--patients", type=int, default=4,
                    help="patients to show, the first of train/, val/, test/ (default 4; a dataset of fewer shows "
                         "them all, with a warning)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; what a user can fix (bad data, a folder in use, a file-system error) is one
    line ``medgen-data <command>: message`` on stderr and exit code 1, never a traceback."""
    from medgen.core.fs import FolderBusy, os_error_line
    from medgen.data.nifti_dataset import DataError

    args = build_parser().parse_args(argv)
    # warnings (skipped patients, removed leftovers) as one line each, without Python source lines
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return _run(args)
    except (DataError, FolderBusy) as exc:
        print(f"medgen-data {args.command}: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"medgen-data {args.command}: {os_error_line(exc)}", file=sys.stderr)
    return 1


def _phantom(args: argparse.Namespace) -> int:
    from medgen.data.lesions import census_line, lesion_census
    from medgen.data.phantom import LESION_SIZES, MAX_LESIONS, generate_dataset

    max_lesions = MAX_LESIONS if args.max_lesions is None else args.max_lesions
    bad = [msg for ok, msg in [(args.subjects >= 1, "--subjects must be >= 1"),
                               (args.size >= 8, "--size must be >= 8"),
                               (args.slices >= 4, "--slices must be >= 4"),
                               (args.seed >= 0, "--seed must be >= 0"),
                               (args.workers >= 1, "--workers must be >= 1"),
                               (max_lesions >= 1, "--max-lesions must be >= 1"),
                               (args.lesion_sizes in LESION_SIZES,
                                f"--lesion-sizes must be one of {', '.join(LESION_SIZES)}, "
                                f"got {args.lesion_sizes!r}")] if not ok]
    if bad:
        print("medgen-data phantom: " + "; ".join(bad), file=sys.stderr)
        return 2
    if args.out.exists() and not args.out.is_dir():
        print(f"medgen-data phantom: --out {args.out} is a file, not a folder; choose a new folder",
              file=sys.stderr)
        return 1
    try:
        patients = generate_dataset(args.out, subjects=args.subjects, size=args.size, slices=args.slices,
                                    seed=args.seed, split=args.split, workers=args.workers,
                                    lesion_sizes=args.lesion_sizes, max_lesions=max_lesions)
    except ValueError as exc:
        print(f"medgen-data phantom: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.subjects} phantom subjects to {args.out}")
    print(census_line(lesion_census(patients)))
    return 0


def _import_flags_refused(args: argparse.Namespace) -> list[str]:
    """Flags of ``import`` given where the import would not read them: one clause each, naming it."""
    refused = []
    if args.spacing is not None and args.format != "brainmetshare-png":
        refused.append(f"--spacing applies to --format brainmetshare-png only: {args.format} files carry their own "
                       "voxel spacing in their headers (leave --spacing out)")
    if args.seed is not None and args.split is None:
        refused.append("--seed seeds the patient-level split and is read only with --split (without it every "
                       "patient goes to train/): give --split too, or leave --seed out")
    return refused


def _run(args: argparse.Namespace) -> int:
    if args.command == "phantom":
        return _phantom(args)
    if args.command == "import":
        from medgen.data import importers

        refused = _import_flags_refused(args)
        if refused:
            print("medgen-data import: " + "; ".join(refused), file=sys.stderr)
            return 1
        seed = 0 if args.seed is None else args.seed
        try:
            if args.format == "brainmetshare-png":
                spacing = _spacing(args.spacing)  # None: the importer's 1,1,1
                n = importers.import_brainmetshare_png(args.src, args.dst, mapping=args.map, spacing=spacing,
                                                       split=args.split, seed=seed)
            else:
                n = importers.import_nnunet(args.src, args.dst, mapping=args.map, split=args.split, seed=seed)
        except importers.ImportFormatError as exc:
            print(f"medgen-data import: {exc}", file=sys.stderr)
            return 1
        print(f"imported {n} patients into {args.dst}")
        return 0
    if args.command == "check":
        from medgen.data.validate import check_dataset

        report = check_dataset(args.dir, keys=args.keys, workers=args.workers)
        if args.json:
            print(json.dumps(report.to_dict(), indent=2))
        else:
            print(report.format())
        return 0 if report.ok else 1
    if args.command == "preview":
        from medgen.data.nifti_dataset import DataError
        from medgen.data.preview import make_preview

        try:
            out = make_preview(args.dir, args.out, n_patients=args.patients)
        except (DataError, ValueError) as exc:
            print(f"medgen-data preview: {exc}", file=sys.stderr)
            return 1
        print(f"wrote {out}")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
