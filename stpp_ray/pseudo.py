"""Pseudo-label Parquet shards: schema, reading, and the training items built from them.

Columns (DESIGN.md contract, plus extras): `image_id`, `mask_png` (PNG-encoded uint8
mask), `stability` (NaN where not computed), `ckpt_miou` (IoU of each earlier
checkpoint's prediction vs the final one), `ckpt_epochs` (their epochs), `confidence_png`
(PNG of the per-pixel max softmax probability as round(254 p), for DMT), `confidence`
(mean max softmax probability), `entropy` (mean pixel entropy, nats), `height`, `width`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from .datasets import IGNORE_INDEX, decode_mask_png, encode_mask_png
from .engine import TrainItem
from .semi_losses import class_balanced_thresholds
from .stability import stability_for_checkpoints

SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("mask_png", pa.binary()),
    ("confidence_png", pa.binary()),
    ("stability", pa.float64()),
    ("ckpt_miou", pa.list_(pa.float64())),
    ("ckpt_epochs", pa.list_(pa.int32())),
    ("confidence", pa.float64()),
    ("entropy", pa.float64()),
    ("height", pa.int32()),
    ("width", pa.int32()),
])


class PseudoLabelError(ValueError):
    """Pseudo-label shards that are missing, incomplete or inconsistent."""


def read_table(parquet_dir: str | Path, columns: list[str] | None = None) -> pa.Table:
    """All shards of one labeling stage as one table."""
    parquet_dir = Path(parquet_dir)
    files = sorted(parquet_dir.glob("*.parquet"))
    if not files:
        raise PseudoLabelError(f"no Parquet shards in {parquet_dir}")
    return pads.dataset([str(f) for f in files], format="parquet").to_table(columns=columns)


def check_complete(table: pa.Table, expected_ids: list[str], where: str) -> None:
    """Every expected image exactly once, nothing else."""
    ids = table.column("image_id").to_pylist()
    seen: dict[str, int] = {}
    for i in ids:
        seen[i] = seen.get(i, 0) + 1
    dup = sorted(i for i, n in seen.items() if n > 1)
    missing = sorted(set(expected_ids) - seen.keys())
    extra = sorted(seen.keys() - set(expected_ids))
    if dup or missing or extra:
        raise PseudoLabelError(
            f"{where}: pseudo-labels incomplete: {len(missing)} missing, {len(dup)} duplicated, "
            f"{len(extra)} unexpected (e.g. {(missing + dup + extra)[:3]})"
        )


def read_pseudo_items(parquet_dir: str | Path, image_paths: Mapping[str, str]) -> list[TrainItem]:
    """Training items for the given images, masks taken from the shards; strong augmentation on."""
    table = read_table(parquet_dir, ["image_id", "mask_png"])
    masks = dict(zip(table.column("image_id").to_pylist(), table.column("mask_png").to_pylist()))
    missing = [i for i in image_paths if i not in masks]
    if missing:
        raise PseudoLabelError(f"{parquet_dir}: no pseudo-label for {len(missing)} images (e.g. {missing[:3]})")
    return [TrainItem(i, path, mask_png=masks[i], strong=True) for i, path in sorted(image_paths.items())]


def scores(parquet_dir: str | Path, checkpoint_epochs: list[int] | None = None) -> dict[str, float]:
    """Stability score per image id: the `stability` column, or with `checkpoint_epochs` (the
    K epochs, final last) the score of that K from the stored per-checkpoint IoUs."""
    if checkpoint_epochs is None:
        table = read_table(parquet_dir, ["image_id", "stability"])
        return dict(zip(table.column("image_id").to_pylist(), table.column("stability").to_pylist()))
    table = read_table(parquet_dir, ["image_id", "ckpt_miou", "ckpt_epochs"])
    out = {}
    for image_id, ious, epochs in zip(table.column("image_id").to_pylist(), table.column("ckpt_miou").to_pylist(),
                                      table.column("ckpt_epochs").to_pylist()):
        try:
            out[image_id] = stability_for_checkpoints(dict(zip(epochs, ious)), checkpoint_epochs)
        except KeyError as err:
            raise PseudoLabelError(f"{parquet_dir}: image {image_id}: {err.args[0]}; the teacher's checkpoints "
                                   f"do not cover K={len(checkpoint_epochs)}") from None
    return out


def read_curriculum_items(parquet_dir: str | Path, image_paths: Mapping[str, str], ratio: float,
                          num_classes: int) -> tuple[list[TrainItem], list[int]]:
    """DMT's training items: pseudo-labels below their class's confidence level (the top
    `ratio` of each class kept, `class_balanced_thresholds` over all these images) set to
    255, with their confidence maps. Returns the items and the per-class levels (0-254)."""
    table = read_table(parquet_dir, ["image_id", "mask_png", "confidence_png"])
    rows = {i: (m, c) for i, m, c in zip(table.column("image_id").to_pylist(), table.column("mask_png").to_pylist(),
                                          table.column("confidence_png").to_pylist())}
    missing = [i for i in image_paths if i not in rows]
    if missing:
        raise PseudoLabelError(f"{parquet_dir}: no pseudo-label for {len(missing)} images (e.g. {missing[:3]})")
    decoded = {i: (decode_mask_png(rows[i][0]), decode_mask_png(rows[i][1])) for i in image_paths}
    histogram = np.zeros((num_classes, 256), dtype=np.int64)
    for mask, conf in decoded.values():
        np.add.at(histogram, (mask.ravel(), conf.ravel()), 1)
    levels = class_balanced_thresholds(histogram, ratio)
    items = []
    for image_id, path in sorted(image_paths.items()):
        mask, conf = decoded[image_id]
        kept = np.where(conf >= levels[mask], mask, IGNORE_INDEX).astype(np.uint8)
        items.append(TrainItem(image_id, path, mask_png=encode_mask_png(kept), conf_png=rows[image_id][1]))
    return items, levels.tolist()
