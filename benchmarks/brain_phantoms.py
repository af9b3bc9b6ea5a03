"""The phantom rows of docs/brain.md: each brain method's Dice against the phantoms' true brain.

Phantoms ``make_subject(seed, size, slices)`` for seeds 1-3 at 128 x 128 x 64 and seed 5 at
96 x 96 x 32, contrasts bravo, t1_gd and flair; the true brain is grey + white matter +
intracranial CSF > 0.5. ``deepbet`` and ``bet`` run on the volume as rendered (Dice on its grid);
the heuristic on the 128 px slices the slice cache makes (Dice against the true brain resized
alike). Prints one JSON line per volume.

    python benchmarks/brain_phantoms.py [--methods heuristic deepbet bet] [--contrasts bravo t1_gd flair]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SUBJECTS = ((1, 128, 64), (2, 128, 64), (3, 128, 64), (5, 96, 32))
SLICE_SIZE = 128


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return round(2 * float((a & b).sum()) / max(int(a.sum() + b.sum()), 1), 3)


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from medgen.data.brain import brain_of
    from medgen.data.phantom import make_subject
    from medgen.data.transforms import preprocess_image, preprocess_mask

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["heuristic", "deepbet", "bet"])
    ap.add_argument("--contrasts", nargs="+", default=["bravo", "t1_gd", "flair"])
    args = ap.parse_args(argv)
    for seed, size, slices in SUBJECTS:
        subject = make_subject(seed, size=size, slices=slices, return_tissue=True)
        tissue = subject.tissue
        truth = tissue["gm"] + tissue["wm"] + tissue["csf"] > 0.5
        truth_slices = preprocess_mask(truth.astype(np.float32), SLICE_SIZE) > 0
        for contrast in args.contrasts:
            volume = subject.volumes[contrast]
            row: dict = {"seed": seed, "shape": [size, size, slices], "contrast": contrast}
            for method in args.methods:
                t0 = time.perf_counter()
                if method == "heuristic":
                    row[method] = dice(brain_of(preprocess_image(volume, SLICE_SIZE)), truth_slices)
                else:
                    row[method] = dice(brain_of(volume, method, subject.spacing), truth)
                row[f"{method}_s"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
