"""Repeated measurements and their median."""

from __future__ import annotations

import statistics


def summary(values: list[float]) -> dict:
    """Median of the runs, with every run kept."""
    if not values:
        raise ValueError("no measurements")
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": [round(v, 4) for v in values]}
