"""Pseudo-label Parquet shards: schema, reading, and the training items built from them.

Columns (DESIGN.md contract, plus extras): `image_id`, `mask_png` (PNG-encoded uint8
mask), `ckpt_miou` (IoU of each earlier checkpoint's prediction vs the final one),
`ckpt_epochs` (their epochs), `stability` (the score over all of them, NaN for one
checkpoint; the select stage computes its K's score from `ckpt_miou` the same way), `confidence_png`
(PNG of the per-pixel max softmax probability as round(254 p), for DMT), `confidence`
(mean max softmax probability), `entropy` (mean pixel entropy, nats), `height`, `width`,
`image_path` (the image labeled).

Students read the pool lazily: the driver names the images a stage trains on, with their rows,
in a selection file (`write_selection`); a worker makes a training item when it is indexed
(`PseudoItems`: an id and a row number), and reads the image path and mask from the row's group
(`ROWS_PER_GROUP` rows) when the item is loaded. No worker holds a per-image Python object.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
from functools import lru_cache
from pathlib import Path
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .files import read_arrow, write_arrow_named
from .image_pool import distinct_sorted, has_duplicates, sorted_ids
from .shard_layout import ROWS_PER_GROUP, SCHEMA, SHARD_FORMAT  # noqa: F401  (re-exported)
from .storage import BucketPath, location
from .training import TrainItem
from .stability import stability_of_rows


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


def _read_metadata(path: str) -> pq.FileMetaData:
    loc = location(path)
    if isinstance(loc, BucketPath):
        with loc.open("rb") as f:
            return pq.read_metadata(f)
    return pq.read_metadata(path)


def _column_names(meta: pq.FileMetaData) -> set[str]:
    # Not `meta.schema.names`: the schema and its metadata form a reference cycle that holds
    # ~170 KB of native memory per file until the garbage collector runs (pyarrow 26).
    return {meta.row_group(0).column(i).path_in_schema for i in range(meta.num_columns)}


def _read_file(path: str, columns: list[str] | None = None) -> pa.Table:
    # One file, one thread, no pre-buffering: the dataset reader's read-ahead across files and
    # `pre_buffer` hold far more than the columns (measured: 173 MB for 2 MB of ids at 200k rows).
    loc = location(path)
    with (loc.open("rb") if isinstance(loc, BucketPath) else open(path, "rb")) as f:
        return pq.ParquetFile(f, pre_buffer=False).read(columns=columns, use_threads=False)


def _read_column(path: str, column: str) -> pa.ChunkedArray:
    return _read_file(path, [column]).column(0)


class ShardIndex:
    """The rows of one labeling stage's shards, numbered across its files, read one at a time."""

    def __init__(self, parquet_dir: str | Path, files: list[str] | None = None,
                 file_starts: list[int] | None = None, group_starts: list[list[int]] | None = None):
        """From the shards' footers, or (`files`, ...) as `to_dict` gave them."""
        self.directory = str(parquet_dir)
        if files is not None:
            self.files, self.file_starts, self.group_starts = files, file_starts, group_starts
            return
        self.files = [str(f) for f in _shard_files(parquet_dir)]
        self.file_starts: list[int] = []  # global row number of each file's first row
        self.group_starts: list[list[int]] = []  # per file, the local row of each group's first row
        total = 0
        for path in self.files:
            meta = _read_metadata(path)
            if meta.num_row_groups and "image_path" not in _column_names(meta):
                raise PseudoLabelError(f"{path}: a shard without image paths (written by an older stpp_ray); "
                                       f"delete {parquet_dir} to label again")
            sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            self.file_starts.append(total)
            self.group_starts.append([0, *itertools.accumulate(sizes)][:-1])
            total += meta.num_rows

    def to_dict(self) -> dict:
        return {"parquet_dir": self.directory, "files": self.files, "file_starts": self.file_starts,
                "group_starts": self.group_starts}

    def rows_of(self, image_ids: pa.Array, rows: np.ndarray | None = None) -> np.ndarray:
        """The global row of each of `image_ids` (sorted, distinct; Arrow, no per-id Python object);
        PseudoLabelError naming the images without one. `rows`: the rows as the select stage
        recorded them, checked against the shards instead of looked up."""
        ids = pa.chunked_array([_read_column(p, "image_id") for p in self.files], pa.string()).combine_chunks()
        if rows is not None:  # no lookup: a take and a comparison
            if len(rows) == len(image_ids) and (not len(rows) or 0 <= rows.min() and rows.max() < len(ids)) \
                    and ids.take(pa.array(rows)).equals(image_ids):
                return rows
            raise PseudoLabelError(f"{self.directory}: the recorded rows of {len(image_ids)} images are not theirs "
                                   "in these shards (labeled again since the selection?)")
        if len(ids) == len(image_ids):  # every row, as a rule: sorted, no hash table
            order = pc.sort_indices(ids)
            if ids.take(order).equals(image_ids):
                return order.to_numpy().astype(np.int64)
        at = pc.index_in(ids, value_set=image_ids)  # each row's place among `image_ids` (a hash of those only)
        hit = pc.is_valid(at)
        rows = np.full(len(image_ids), -1, np.int64)
        rows[at.filter(hit).to_numpy()] = np.flatnonzero(hit.to_numpy(zero_copy_only=False))
        if (rows < 0).any():
            missing = image_ids.filter(pa.array(rows < 0))
            raise PseudoLabelError(f"{self.directory}: no pseudo-label for {len(missing)} images "
                                   f"(e.g. {missing[:3].to_pylist()})")
        return rows

    def read(self, row: int, columns: Sequence[str]) -> list:
        """The values of `columns` in global row `row` (one row group decoded)."""
        f = bisect.bisect_right(self.file_starts, row) - 1
        local = row - self.file_starts[f]
        g = bisect.bisect_right(self.group_starts[f], local) - 1
        group = _open_shard(self.files[f], os.getpid()).read_row_group(g, columns=list(columns))
        return [group.column(c)[local - self.group_starts[f][g]].as_py() for c in columns]


class PseudoItems(Sequence):
    """Training items of the rows of one labeling stage's shards, each made when it is indexed:
    the pool is held as sorted image ids (Arrow) and their row numbers (int64)."""

    def __init__(self, index: ShardIndex, image_ids: pa.Array, rows: np.ndarray, *, strong: bool = True,
                 levels: tuple[int, ...] | None = None):
        self.index, self.image_ids, self.rows, self.strong, self.levels = index, image_ids, rows, strong, levels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        return TrainItem(self.image_ids[k].as_py(), None, strong=self.strong, shards=self.index,
                         row=int(self.rows[k]), levels=self.levels)


def batches(parquet_dir: str | Path, columns: list[str]):
    """The shards' `columns`, streamed a row group at a time, one file after another."""
    for path in _shard_files(parquet_dir):
        loc = location(path)
        with (loc.open("rb") if isinstance(loc, BucketPath) else open(path, "rb")) as f:
            yield from pq.ParquetFile(f, pre_buffer=False).iter_batches(ROWS_PER_GROUP, columns=columns, use_threads=False)


def read_table(parquet_dir: str | Path, columns: list[str] | None = None) -> pa.Table:
    """All shards of one labeling stage as one table (read file by file, see `_read_file`)."""
    return pa.concat_tables([_read_file(str(f), columns) for f in _shard_files(parquet_dir)])


def check_complete(table: pa.Table, expected_ids: Sequence[str] | pa.Array, where: str) -> None:
    """Every expected image exactly once, nothing else (in Arrow: no per-id Python object)."""
    ids = table.column("image_id").combine_chunks()
    expected = expected_ids if isinstance(expected_ids, pa.Array) else pa.array(list(expected_ids), pa.string())
    ordered = sorted_ids(expected)
    if len(ids) == len(expected) and sorted_ids(ids).equals(ordered) and not has_duplicates(ordered):
        return  # sorted, not hashed: the hash tables below held ~10 MiB per 100k images
    counts = pc.value_counts(ids)
    dup = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    missing = expected.filter(pc.invert(pc.is_in(expected, value_set=ids)))
    extra = counts.field("values").filter(pc.invert(pc.is_in(counts.field("values"), value_set=expected)))
    if len(dup) or len(missing) or len(extra):
        shown = [v for found in (missing, dup, extra) for v in sorted(found.to_pylist())][:3]
        raise PseudoLabelError(
            f"{where}: pseudo-labels incomplete: {len(missing)} missing, {len(dup)} duplicated, "
            f"{len(extra)} unexpected (e.g. {shown})"
        )


def read_rows(parquet_dir: str | Path, image_ids: Sequence[str], columns: list[str]) -> dict[str, list]:
    """`columns` of the given images only (the shards streamed, the other rows dropped), by image id."""
    wanted = pa.array(list(image_ids), pa.string())
    out = {}
    for batch in batches(parquet_dir, ["image_id", *columns]):
        batch = batch.filter(pc.is_in(batch.column(0), value_set=wanted))
        out.update({i: values for i, *values in zip(*(c.to_pylist() for c in batch.columns))})
    return out


def write_selection(directory: str | Path, name: str, parquet_dir: str | Path, image_ids: pa.Array | Sequence[str],
                    rows: np.ndarray | None = None) -> str:
    """The pseudo-labels of `image_ids` in `parquet_dir` as one Arrow IPC file in `directory`:
    the sorted, distinct ids with their rows and the shards' index. Run on the driver, once per
    stage, so that no Train worker reads every shard's ids and footer. Named by `name` and its
    content (writing the same selection again is a no-op); returns its path. `rows`: the ids'
    rows as the select stage recorded them (`ShardIndex.rows_of`), the ids then distinct."""
    items = read_pseudo_items(parquet_dir, image_ids, rows=rows)
    table = pa.table({"image_id": items.image_ids, "row": pa.array(items.rows, pa.int64())})
    table = table.replace_schema_metadata({"index": json.dumps(items.index.to_dict())})
    return write_arrow_named(directory, name, table, salt=str(parquet_dir))


def read_selection(path: str | Path, strong: bool = True) -> PseudoItems:
    """The training items of a `write_selection` file. IPC, not Parquet: reading it allocates
    its two columns and little else (Parquet's decoding buffers grew with the pool)."""
    table = read_arrow(path)
    index = ShardIndex(**json.loads(table.schema.metadata[b"index"]))
    rows = table.column("row").combine_chunks().to_numpy()
    return PseudoItems(index, table.column("image_id").combine_chunks(), rows, strong=strong)


def read_pseudo_items(parquet_dir: str | Path, image_ids: pa.Array | Sequence[str], strong: bool = True,
                      rows: np.ndarray | None = None) -> PseudoItems:
    """Training items for the given images, sorted by id and each naming its row of the shards
    (its image path and mask are read when the item is loaded); strong augmentation on."""
    ids = image_ids if isinstance(image_ids, pa.Array) else pa.array(list(map(str, image_ids)), pa.string())
    if len(ids) > 1 and not pc.all(pc.greater(ids[1:], ids[:-1])).as_py():  # a selection's ids come sorted
        if rows is None:
            ids = distinct_sorted(ids)
        else:  # the select stage's ids, distinct: their rows move with them
            order = pc.sort_indices(ids)
            ids, rows = ids.take(order), np.asarray(rows)[order.to_numpy()]
    index = ShardIndex(parquet_dir)
    return PseudoItems(index, ids, index.rows_of(ids, rows), strong=strong)


def scores(parquet_dir: str | Path, checkpoint_epochs: list[int]) -> pa.Table:
    """Stability score per image with the K checkpoints at `checkpoint_epochs` (final last), from
    the stored per-checkpoint IoUs (the teacher may have saved more checkpoints than K): columns
    `image_id`, `score` and `row` (the image's row across the shards, as `ShardIndex` numbers
    them), computed a file at a time in numpy."""
    parts, first = [], 0
    for path in _shard_files(parquet_dir):
        table = _read_file(str(path), ["image_id", "ckpt_miou", "ckpt_epochs"])
        ious, at = (table.column(c).combine_chunks() for c in ("ckpt_miou", "ckpt_epochs"))
        offsets = ious.offsets.to_numpy()
        if not np.array_equal(offsets, at.offsets.to_numpy()):
            raise PseudoLabelError(f"{path}: ckpt_miou and ckpt_epochs differ in length")
        try:
            score = stability_of_rows(ious.values.to_numpy(zero_copy_only=False), at.values.to_numpy(zero_copy_only=False),
                                      offsets, checkpoint_epochs)
        except KeyError as err:
            image, message = err.args
            raise PseudoLabelError(f"{parquet_dir}: image {table.column('image_id')[image]}: {message}; the "
                                   f"teacher's checkpoints do not cover K={len(checkpoint_epochs)}") from None
        parts.append(pa.table({"image_id": table.column("image_id"), "score": pa.array(score, pa.float64()),
                               "row": pa.array(np.arange(first, first + len(table)), pa.int64())}))
        first += len(table)
    return pa.concat_tables(parts)
