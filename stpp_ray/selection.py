"""ST++ reliable-image selection: keep the top-R fraction of images by stability.

The ranking is held in Arrow (ids and scores, no per-image Python object) and stored beside
`selection.json` as an IPC file (`write_ranking`), from which the later stages read their ids.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Mapping

import pyarrow as pa
import pyarrow.compute as pc

from .files import atomic_output, read_arrow, write_arrow_atomic

CHUNK = 4096  # images converted to Python at a time while `selection.json` is written


@dataclass(frozen=True, eq=False)
class Selection:
    """Every scored image best first (`ranked`: `image_id`, `score` and, scored from shards, each
    image's `row` in them); the first `num_reliable` are reliable."""

    ranked: pa.Table
    num_reliable: int
    reliable_fraction: float

    def part(self, reliable: bool) -> pa.Table:
        """The reliable (or unreliable) images: `image_id` and, where known, `row`."""
        table = self.ranked.select([c for c in ("image_id", "row") if c in self.ranked.column_names])
        table = table.slice(0, self.num_reliable) if reliable else table.slice(self.num_reliable)
        return table.combine_chunks()

    def ids(self, reliable: bool) -> pa.Array:
        return self.part(reliable).column("image_id").combine_chunks()

    @property
    def reliable(self) -> list[str]:
        return self.ids(True).to_pylist()

    @property
    def unreliable(self) -> list[str]:
        return self.ids(False).to_pylist()

    @property
    def scores(self) -> dict[str, float]:
        return dict(zip(self.ranked.column("image_id").to_pylist(), self.ranked.column("score").to_pylist()))


def num_reliable(num_images: int, reliable_fraction: float) -> int:
    """floor(R * |U|), with R read as the decimal it was written as.

    Fraction(repr(R)) avoids float artefacts such as 0.29 * 100 = 28.999999999999996.
    For |U| = 1 and R < 1 this is 0: the paper's rule then selects no image.
    """
    return math.floor(Fraction(repr(float(reliable_fraction))) * num_images)


def _score_table(scores: Mapping[str, float]) -> pa.Table:
    return pa.table({"image_id": pa.array([str(k) for k in scores], pa.string()),
                     "score": pa.array([float(v) for v in scores.values()], pa.float64())})


def select_reliable(scores: Mapping[str, float] | pa.Table, reliable_fraction: float) -> Selection:
    """Split images into reliable (top floor(R*|U|) by score) and unreliable; `scores` by id, or
    a table of `image_id`, `score` and optionally `row` (`pseudo_labels.scores`), kept alongside.

    Order: score descending, ties by image id ascending (code points: UTF-8 bytes sort alike),
    NaN scores last (by id).
    """
    if not 0 < reliable_fraction <= 1:  # also rejects NaN
        raise ValueError(f"reliable_fraction must be in (0, 1], got {reliable_fraction}")
    table = scores if isinstance(scores, pa.Table) else _score_table(scores)
    if not len(table):
        raise ValueError("no scores to select from")
    score = table.column("score").cast(pa.float64())
    columns = {"image_id": table.column("image_id").cast(pa.string()),
               "score": pc.fill_null(score, math.nan) if score.null_count else score}  # null: NaN, ranked alike
    if "row" in table.column_names:
        columns["row"] = table.column("row").cast(pa.int64())
    table = pa.table(columns)
    # Arrow places NaN with the nulls ("at_end"), in either order: no negated copy or NaN mask.
    order = pc.sort_indices(table, sort_keys=[("score", "descending", "at_end"), ("image_id", "ascending", "at_end")])
    return Selection(table.take(order), num_reliable(len(table), reliable_fraction), float(reliable_fraction))


def write_ranking(sel: Selection, path: str | Path) -> str:
    """`sel` as one Arrow IPC file (the ranked ids, scores and rows; the cut in its metadata)."""
    table = sel.ranked.replace_schema_metadata(
        {"num_reliable": str(sel.num_reliable), "reliable_fraction": repr(sel.reliable_fraction)})
    write_arrow_atomic(path, table)
    return str(path)


def read_ranking(path: str | Path) -> Selection:
    """The `Selection` of a `write_ranking` file."""
    table = read_arrow(path)
    meta = table.schema.metadata
    return Selection(table.replace_schema_metadata(None), int(meta[b"num_reliable"]), float(meta[b"reliable_fraction"]))


def write_selection_json(sel: Selection, path: str | Path) -> None:
    """`selection.json`: the reliable and unreliable ids, the scores by id (NaN as null) and R,
    made `CHUNK` images at a time (the whole document as Python objects took 47 MiB per 100k images)."""
    ids, values = sel.ranked.column("image_id"), sel.ranked.column("score")

    def lines(lo: int, hi: int, with_scores: bool):
        for start in range(lo, hi, CHUNK):
            chunk = ids.slice(start, min(CHUNK, hi - start)).to_pylist()
            if with_scores:
                chunk = [f"{json.dumps(i)}: {'null' if math.isnan(v) else json.dumps(v)}"
                         for i, v in zip(chunk, values.slice(start, len(chunk)).to_pylist())]
            else:
                chunk = [json.dumps(i) for i in chunk]
            yield ("," if start > lo else "") + ",".join(f"\n    {item}" for item in chunk)

    n, cut = len(sel.ranked), sel.num_reliable
    with atomic_output(path) as f:
        parts = (("reliable", "[]", 0, cut), ("unreliable", "[]", cut, n), ("scores", "{}", 0, n))
        for k, (key, (opening, closing), lo, hi) in enumerate(parts):
            f.write(f'{"," if k else "{"}\n  "{key}": {opening}'.encode())
            for text in lines(lo, hi, key == "scores"):
                f.write(text.encode())
            f.write(f"\n  {closing}".encode())
        f.write(f',\n  "reliable_fraction": {json.dumps(sel.reliable_fraction)}\n}}\n'.encode())


def selection_from_json(d: Mapping) -> Selection:
    """The `Selection` of a parsed `selection.json`; checks that the id lists partition the scores."""
    try:
        reliable, unreliable = [str(i) for i in d["reliable"]], [str(i) for i in d["unreliable"]]
        scores = {str(k): (math.nan if v is None else float(v)) for k, v in d["scores"].items()}
        fraction = float(d["reliable_fraction"])
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"malformed selection JSON: {exc!r}") from exc
    if len(reliable) + len(unreliable) != len(scores) or set(reliable) | set(unreliable) != set(scores):
        raise ValueError("selection JSON: reliable + unreliable ids must partition the scored ids")
    ranked = _score_table({i: scores[i] for i in reliable + unreliable})
    return Selection(ranked, len(reliable), fraction)
