"""Repeated measurements and their median."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def summary(values: list[float]) -> dict:
    """Median of the runs, with every run kept."""
    if not values:
        raise ValueError("no measurements")
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": [round(v, 4) for v in values]}


def repeat(fn: Callable[[], float], runs: int) -> list[float]:
    """Call `fn` (which returns its measured seconds) `runs` times."""
    return [fn() for _ in range(runs)]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
