"""core/jsonio: every JSON medgen writes is strict JSON, a non-finite number written as null."""

from __future__ import annotations

import json
import math

from medgen.core import jsonio


def _strict_loads(text: str):
    """json.loads that refuses the NaN/Infinity tokens Python would otherwise accept."""
    def refuse(token: str):
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_become_null_at_any_depth():
    value = {"loss": math.nan, "dice": {"small": math.inf, "large": 0.5}, "curve": [1.0, -math.inf, (math.nan, 2)],
             "n": 3, "name": "nan"}
    assert _strict_loads(jsonio.dumps(value, indent=1)) == {
        "loss": None, "dice": {"small": None, "large": 0.5}, "curve": [1.0, None, [None, 2]], "n": 3, "name": "nan"}


def test_append_jsonl_writes_one_strict_line_per_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    jsonio.append_jsonl(path, {"step": 4, "val_loss": math.nan})
    jsonio.append_jsonl(path, {"step": 8, "val_loss": 0.25})
    lines = path.read_text().splitlines()
    assert [_strict_loads(line) for line in lines] == [{"step": 4, "val_loss": None}, {"step": 8, "val_loss": 0.25}]
