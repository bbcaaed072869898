"""Pseudo-label Parquet shards: schema, reading, and the training items built from them.

Columns (DESIGN.md contract, plus extras): `image_id`, `mask_png` (PNG-encoded uint8
mask), `ckpt_miou` (IoU of each earlier checkpoint's prediction vs the final one),
`ckpt_epochs` (their epochs), `stability` (the score over all of them, NaN for one
checkpoint; the select stage computes its K's score from `ckpt_miou` the same way), `confidence_png`
(PNG of the per-pixel max softmax probability as round(254 p), for DMT), `confidence`
(mean max softmax probability), `entropy` (mean pixel entropy, nats), `height`, `width`.

Students read the masks lazily: a training item holds its row number in a `ShardIndex`, and
the mask is read from its row group (`ROWS_PER_GROUP` rows) when the item is loaded, so no
process holds the pool's masks.
"""

from __future__ import annotations

import bisect
import itertools
import os
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from .storage import BucketPath, location
from .training import TrainItem
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


# A student reading one image's pseudo-label decodes the group holding it: 16 masks, not a shard.
ROWS_PER_GROUP = 16


class PseudoLabelError(ValueError):
    """Pseudo-label shards that are missing, incomplete or inconsistent."""


def _shard_files(parquet_dir: str | Path) -> list:
    files = sorted(location(parquet_dir).glob("*.parquet"))
    if not files:
        raise PseudoLabelError(f"no Parquet shards in {parquet_dir}")
    return files


@lru_cache(maxsize=128)
def _open_shard(path: str, pid: int) -> pq.ParquetFile:
    # Per process (`pid`): DataLoader workers must not share a parent's open file.
    loc = location(path)
    return pq.ParquetFile(loc.open("rb") if isinstance(loc, BucketPath) else path)


class ShardIndex:
    """The rows of one labeling stage's shards, numbered across its files, read one at a time."""

    def __init__(self, parquet_dir: str | Path):
        self.files = [str(f) for f in _shard_files(parquet_dir)]
        self.file_starts: list[int] = []  # global row number of each file's first row
        self.group_starts: list[list[int]] = []  # per file, the local row of each group's first row
        total = 0
        for path in self.files:
            meta = _open_shard(path, os.getpid()).metadata
            sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            self.file_starts.append(total)
            self.group_starts.append([0, *itertools.accumulate(sizes)][:-1])
            total += meta.num_rows

    def rows(self) -> dict[str, int]:
        """Image id -> global row, from one read of each shard's `image_id` column."""
        out: dict[str, int] = {}
        for path, start in zip(self.files, self.file_starts):
            ids = _open_shard(path, os.getpid()).read(columns=["image_id"]).column(0).to_pylist()
            out.update(zip(ids, range(start, start + len(ids))))
        return out

    def read(self, row: int, columns: Sequence[str]) -> list:
        """The values of `columns` in global row `row` (one row group decoded)."""
        f = bisect.bisect_right(self.file_starts, row) - 1
        local = row - self.file_starts[f]
        g = bisect.bisect_right(self.group_starts[f], local) - 1
        group = _open_shard(self.files[f], os.getpid()).read_row_group(g, columns=list(columns))
        return [group.column(c)[local - self.group_starts[f][g]].as_py() for c in columns]


def indexed_rows(parquet_dir: str | Path, image_ids) -> tuple[ShardIndex, dict[str, int]]:
    """The shards' index and the rows of `image_ids`; PseudoLabelError naming any without one."""
    index = ShardIndex(parquet_dir)
    rows = index.rows()
    missing = [i for i in image_ids if i not in rows]
    if missing:
        raise PseudoLabelError(f"{parquet_dir}: no pseudo-label for {len(missing)} images (e.g. {missing[:3]})")
    return index, rows


def _shards(parquet_dir: str | Path) -> pads.Dataset:
    """The shards of one labeling stage, on disk or in an object store."""
    parquet_dir = location(parquet_dir)
    files = _shard_files(parquet_dir)
    if isinstance(parquet_dir, BucketPath):
        return pads.dataset([f.fs_path for f in files], format="parquet", filesystem=parquet_dir.fs)
    return pads.dataset([str(f) for f in files], format="parquet")


def batches(parquet_dir: str | Path, columns: list[str]):
    """The shards' `columns`, streamed a few rows at a time (memory bounded by the batches in flight)."""
    return _shards(parquet_dir).to_batches(columns=columns, batch_size=ROWS_PER_GROUP)


def read_table(parquet_dir: str | Path, columns: list[str] | None = None) -> pa.Table:
    """All shards of one labeling stage as one table."""
    return _shards(parquet_dir).to_table(columns=columns)


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


def read_masks(parquet_dir: str | Path, image_ids: Sequence[str]) -> dict[str, bytes]:
    """The PNG-encoded pseudo-labels of the given images only (a filtered read of the shards)."""
    table = _shards(parquet_dir).to_table(
        columns=["image_id", "mask_png"], filter=pc.field("image_id").isin(list(image_ids)))
    return dict(zip(table.column("image_id").to_pylist(), table.column("mask_png").to_pylist()))


def read_pseudo_items(parquet_dir: str | Path, image_paths: Mapping[str, str]) -> list[TrainItem]:
    """Training items for the given images, each naming its row of the shards (its mask is
    read when the item is loaded); strong augmentation on."""
    index, rows = indexed_rows(parquet_dir, image_paths)
    return [TrainItem(i, path, strong=True, shards=index, row=rows[i]) for i, path in sorted(image_paths.items())]


def scores(parquet_dir: str | Path, checkpoint_epochs: list[int]) -> dict[str, float]:
    """Stability score per image id with the K checkpoints at `checkpoint_epochs` (final last),
    from the stored per-checkpoint IoUs: the teacher may have saved more checkpoints than K."""
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
