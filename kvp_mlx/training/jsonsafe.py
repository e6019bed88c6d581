"""JSON without NaN: the training files (summary, checkpoints, training.json) stay standard JSON."""

from __future__ import annotations

import json
import math
from typing import Any


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) as None: JSON has no NaN, so never write one."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps_json(value: Any, **options: Any) -> str:
    """`json.dumps` that writes non-finite floats as null (and fails rather than write NaN)."""
    return json.dumps(json_safe(value), allow_nan=False, **options)
