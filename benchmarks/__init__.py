"""The benchmarks: make bench (bench.py), make bench-replica (replica.py), make soak (soak.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path


def results_dir(base: Path, kind: str = "") -> Path:
    """A new folder for one run's results: base/<UTC date-time>[-kind]."""
    out = base / f"{datetime.now(UTC):%Y%m%d-%H%M%S}{'-' + kind if kind else ''}"
    out.mkdir(parents=True, exist_ok=True)
    return out
