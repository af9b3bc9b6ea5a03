"""``medgen-score``: score any segmenter's predicted masks against the true masks, case by case,
with the BraTS-METS 2023 lesion-wise rules and medgen's own lesion-wise figures per size bin.

    medgen-score predictions/ data/phantoms/test                 # writes predictions/scores.json
    medgen-score nnUNet_results/.../predictions labelsTs --out scores.json --bins 10,20,30

Cases are matched by name: ``<case>.nii.gz`` (or ``.nii``) files, or ``<case>/seg.nii.gz`` in a
dataset folder of medgen's layout. Different names, shapes or voxel sizes are refused in one line
naming the files. The rules are in the documentation (Evaluation, Scoring).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

DEFAULT_BINS = "10,20,30"  # RANO-BM's diameter edges (mm): tiny, small, medium, large


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medgen-score", description=(
        "Score any segmenter's predicted masks against the true masks, case by case, with the BraTS-METS 2023 "
        "lesion-wise rules and medgen's own lesion-wise figures per size bin."),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pred_dir", type=Path, metavar="PRED_DIR", help="the predicted masks")
    parser.add_argument("truth_dir", type=Path, metavar="TRUTH_DIR", help="the true masks")
    parser.add_argument("--out", type=Path, default=None, help="the JSON file to write (default: PRED_DIR/scores.json)")
    parser.add_argument("--bins", default=DEFAULT_BINS,
                        help=f"lesion-size bin edges, Feret diameter in mm, comma-separated (default: {DEFAULT_BINS}, "
                             "RANO-BM's tiny/small/medium/large)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples over cases (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _bins(text: str):
    from medgen.core.schema import ConfigError
    from medgen.data.lesions import RANO_BM, SizeBins

    try:
        edges = [float(e) for e in text.split(",") if e.strip()]
        return RANO_BM if tuple(edges) == RANO_BM.edges else SizeBins.from_edges(edges)
    except ValueError as exc:
        raise ConfigError("--bins", f"{text!r}: {exc}" if "edges" in str(exc) else
                          f"{text!r}: give increasing diameters in mm separated by commas, e.g. 10,20,30") from None


def run(args: argparse.Namespace) -> dict:
    from medgen.core.fs import atomic_write
    from medgen.core.schema import ConfigError
    from medgen.evaluation.scoring import overall_lines, score_folders

    if args.resamples < 1:
        raise ConfigError("--resamples", f"{args.resamples}: at least 1")
    bins = _bins(args.bins)
    out = args.out if args.out is not None else args.pred_dir / "scores.json"
    result = score_folders(args.pred_dir, args.truth_dir, bins, args.resamples, args.seed, progress=not args.quiet)
    with atomic_write(out) as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    print("\n".join(overall_lines(result)))
    print(f"per case: {out}")
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    from medgen.scripts._cli import exit_on_user_error

    with exit_on_user_error("medgen-score"):
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
