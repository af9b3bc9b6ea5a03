"""``medgen-demo``: the whole pipeline on phantoms, on a laptop CPU, in about 20 minutes.

    medgen-demo --out demo [--minutes 12] [--subjects 20] [--pairs 64]
    medgen-demo --out demo3d --3d      # volumes: 32 x 32 x 16 models, 16 volumes, three-plane pictures

1. writes a phantom dataset (``<out>/data``);
2. trains a seg model and a bravo model with the ``training=cpu`` profile (rectified flow) for
   ``--minutes`` together: seg's epochs from a timing probe, bravo's from the rate the seg run
   measured, for what seg left of the budget;
3. generates ``--pairs`` mask/image pairs (``<out>/synthetic``, a medgen dataset);
4. evaluates them against the phantoms' test split (``<out>/evaluation``: FID, conditioning
   adherence, downstream segmentation over 3 seeds with a short budget, the report);
5. writes ``<out>/summary.md`` (what ran, how long, where the files are, what it shows) and
   ``<out>/contact_sheet.png``.

Every stage that is already complete in ``<out>`` is reused, so an interrupted demo continues. A rerun
says which flags do not apply to what it reuses: ``--subjects`` and ``--seed`` to the phantoms (drawn
with the values recorded in ``<out>/.medgen/phantoms.json``), ``--minutes`` and ``--seed`` to a model
already trained; give another ``--out`` to run with new values.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from medgen.demo.profile import SLICES, VOLUMES

log = logging.getLogger("medgen.demo")


def build_parser() -> argparse.ArgumentParser:
    """medgen-demo's arguments."""
    ap = argparse.ArgumentParser(prog="medgen-demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for everything the demo writes")
    ap.add_argument("--3d", dest="volumes", action="store_true",
                    help="the volume pipeline: 3D models of 32 x 32 x 16 voxels, volumes generated and evaluated in 3D")
    ap.add_argument("--minutes", type=float, default=None,
                    help=f"training budget of the two models together (default {SLICES.minutes:g}; "
                         f"{VOLUMES.minutes:g} with --3d)")
    ap.add_argument("--subjects", type=int, default=20,
                    help="phantom subjects (default 20; phantoms already in --out are reused, with a warning when "
                         "they differ)")
    ap.add_argument("--pairs", type=int, default=None,
                    help=f"mask/image pairs to generate (default {SLICES.pairs}; {VOLUMES.pairs} volumes with --3d)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the phantoms, the models, generation and evaluation (default 0; what --out already "
                         "holds is reused, saying --seed does not apply to it)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    profile = VOLUMES if args.volumes else SLICES
    args.minutes = profile.minutes if args.minutes is None else args.minutes
    args.pairs = profile.pairs if args.pairs is None else args.pairs
    bad = [m for ok, m in [(args.minutes > 0, "--minutes must be > 0"), (args.subjects >= 4, "--subjects must be >= 4"),
                           (args.pairs >= 1, "--pairs must be >= 1")] if not ok]
    if bad:
        print("medgen-demo: " + "; ".join(bad), file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    from medgen.core.precision import configure_backends
    from medgen.core.signals import STOPPED_EXIT
    from medgen.demo.run import DemoStopped, run_demo
    from medgen.scripts._cli import exit_on_user_error
    from medgen.scripts.train import run as train_run

    try:
        with exit_on_user_error("medgen-demo"):
            configure_backends()
            run_demo(args.out.resolve(), args.minutes, args.subjects, args.pairs, args.seed, profile,
                     train_run=train_run)
    except DemoStopped as stopped:  # leave with the exit code of a stopped run, not on to the next step
        log.info("medgen-demo: %s was stopped by a signal; run the same command again to go on (a stopped "
                 "training starts again, the phantoms and a finished model are kept)", stopped.step)
        sys.exit(STOPPED_EXIT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
