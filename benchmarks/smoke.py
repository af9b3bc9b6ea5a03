"""``--smoke``, shared by the benchmark scripts: the same code path at tiny sizes, a check that a
script runs and prints its JSON line (tests/integration/test_benchmarks.py), not a measurement."""

from __future__ import annotations

import argparse

HELP = "a check of the script, not a measurement: the same path at tiny sizes, seconds on the CPU"

#: a tiny 2D network at 16 px (two levels, attention at the lower one): seconds per step on the CPU
TINY_MODEL = ["model.image_size=16", "model.channels=[16,32]", "model.attention_levels=[false,true]",
              "model.num_head_channels=16", "model.norm_num_groups=8", "model.num_res_blocks=1"]


def add_flag(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--smoke", action="store_true", help=HELP)


def apply(ap: argparse.ArgumentParser, args: argparse.Namespace, values: dict) -> argparse.Namespace:
    """With ``--smoke``: each option in ``values`` that the command line left at its default takes
    the smoke value (an option given explicitly keeps it). Without: ``args`` unchanged."""
    if getattr(args, "smoke", False):
        for name, value in values.items():
            if getattr(args, name) == ap.get_default(name):
                setattr(args, name, value)
    return args
