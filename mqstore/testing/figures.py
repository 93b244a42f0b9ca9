"""What the benchmarks write with ``--json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def no_nan(value: Any) -> Any:
    """``value`` with every NaN (a figure with no samples) as None: JSON has no NaN."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: no_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [no_nan(v) for v in value]
    return value


def write_json(path: str | Path, report: dict[str, Any]) -> None:
    """Write a benchmark's figures to ``path`` as strict JSON (figures without samples: null)."""
    Path(path).write_text(json.dumps(no_nan(report), indent=2, allow_nan=False))
