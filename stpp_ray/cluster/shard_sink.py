"""The labeling pass's Parquet sink, in a module that does not import torch.

Ray Data's write tasks unpickle the sink, which imports its module in each worker process that
runs one. Ray started new worker processes for the writes as the pass went on (its warning
counted 10 on 2 CPUs), so a sink beside the labeler (torch, the models) cost seconds of imports
again and again: about 0.8 s per batch of 64 images at 200k images on 2 CPUs (BENCHMARKS.md).
"""

from __future__ import annotations

import uuid
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import BlockAccessor

from ..shard_layout import ROWS_PER_GROUP
from ..storage import location


class ShardSink(Datasink):
    """Ray Data sink of the labeling pass: Parquet shards of at least `rows_per_file` rows (one
    per write task) in row groups of `ROWS_PER_GROUP` rows, so that a student reads one image's
    pseudo-label by decoding one small group. (`write_parquet` raises the row-group size to
    `min_rows_per_file`.)"""

    def __init__(self, directory: str, rows_per_file: int):
        self.directory, self.rows_per_file = directory, rows_per_file
        self.write_id = uuid.uuid4().hex[:12]  # set here: the tasks get the sink as it is now

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file  # Ray Data: blocks are bundled until a task has this many rows

    def write(self, blocks: Iterable, ctx) -> None:
        tables = [t for t in (BlockAccessor.for_block(b).to_arrow() for b in blocks) if t.num_rows]
        if not tables:
            return
        location(self.directory).mkdir(parents=True, exist_ok=True)
        # Named by the task: a retried task writes over its failed attempt's file.
        with (location(self.directory) / f"{self.write_id}_{ctx.task_idx:06d}.parquet").open("wb") as f:
            pq.write_table(pa.concat_tables(tables), f, row_group_size=ROWS_PER_GROUP)
