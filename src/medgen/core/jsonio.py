"""JSON that strict readers accept: the one rule for numbers JSON cannot hold.

JSON has no NaN or infinity (Python's ``json`` would write the non-standard tokens ``NaN`` and
``Infinity``). Everything medgen writes as JSON (``metrics.jsonl`` of a training run, an
evaluation's ``metrics.json``) writes a non-finite float as ``null``: "no value" (a validation
loss without validation slices, a Dice score of an empty size bin).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping


def finite_or_null(value: Any) -> Any:
    """``value`` with every non-finite float, in nested dicts, lists and tuples too, replaced by ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of ``value`` with non-finite floats as ``null`` (strict JSON)."""
    return json.dumps(finite_or_null(value), allow_nan=False, **kwargs)


def append_jsonl(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append ``record`` to ``path`` as one JSON line (:func:`dumps`)."""
    with open(path, "a") as f:
        f.write(dumps(dict(record)) + "\n")
