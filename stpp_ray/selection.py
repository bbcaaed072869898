"""ST++ reliable-image selection: keep the top-R fraction of images by stability."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Mapping


@dataclass(frozen=True)
class Selection:
    reliable: list[str]
    unreliable: list[str]
    scores: dict[str, float]
    reliable_fraction: float


def _rank_key(item: tuple[str, float]) -> tuple[bool, float, str]:
    image_id, score = item
    is_nan = math.isnan(score)
    return (is_nan, 0.0 if is_nan else -score, image_id)


def num_reliable(num_images: int, reliable_fraction: float) -> int:
    """floor(R * |U|), with R read as the decimal it was written as.

    Fraction(repr(R)) avoids float artefacts such as 0.29 * 100 = 28.999999999999996.
    For |U| = 1 and R < 1 this is 0: the paper's rule then selects no image.
    """
    return math.floor(Fraction(repr(float(reliable_fraction))) * num_images)


def select_reliable(scores: Mapping[str, float], reliable_fraction: float) -> Selection:
    """Split images into reliable (top floor(R*|U|) by score) and unreliable.

    Order: score descending, ties by image id ascending, NaN scores last (by id).
    """
    if not 0 < reliable_fraction <= 1:  # also rejects NaN
        raise ValueError(f"reliable_fraction must be in (0, 1], got {reliable_fraction}")
    if not scores:
        raise ValueError("no scores to select from")
    ranked = sorted(((str(k), float(v)) for k, v in scores.items()), key=_rank_key)
    ids = [image_id for image_id, _ in ranked]
    cut = num_reliable(len(ids), reliable_fraction)
    return Selection(
        reliable=ids[:cut],
        unreliable=ids[cut:],
        scores=dict(ranked),
        reliable_fraction=float(reliable_fraction),
    )


def selection_to_json(sel: Selection) -> dict:
    """JSON-safe dict; NaN scores become null."""
    return {
        "reliable": list(sel.reliable),
        "unreliable": list(sel.unreliable),
        "scores": {k: (None if math.isnan(v) else v) for k, v in sel.scores.items()},
        "reliable_fraction": sel.reliable_fraction,
    }


def selection_from_json(d: Mapping) -> Selection:
    """Inverse of selection_to_json; checks that the id lists partition the scores."""
    try:
        reliable, unreliable = [str(i) for i in d["reliable"]], [str(i) for i in d["unreliable"]]
        scores = {str(k): (math.nan if v is None else float(v)) for k, v in d["scores"].items()}
        fraction = float(d["reliable_fraction"])
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"malformed selection JSON: {exc!r}") from exc
    if len(reliable) + len(unreliable) != len(scores) or set(reliable) | set(unreliable) != set(scores):
        raise ValueError("selection JSON: reliable + unreliable ids must partition the scored ids")
    return Selection(reliable, unreliable, scores, fraction)
