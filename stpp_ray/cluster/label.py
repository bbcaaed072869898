"""Ray Data glue: score and pseudo-label unlabeled images into Parquet shards.

images (id, path) -> map_batches(Labeler actors holding all checkpoints) -> Parquet.
The shards are written to `<out>.partial` and moved to `<out>` only once every
image is present exactly once, so a half-written stage is never mistaken for a
finished one (on an object store the manifest entry written after the move publishes it).
"""

from __future__ import annotations

import math
import time
import uuid
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import ray
import ray.data
from ray.data import Datasink
from ray.data.block import BlockAccessor

from ..config import Config
from ..image_pool import ImagePool
from ..labeling import Labeler
from ..pseudo_labels import ROWS_PER_GROUP, SCHEMA, check_complete, read_table
from ..storage import location, publish_tree, remove_tree


class ArrowLabeler(Labeler):
    """The `Labeler` returning Arrow tables with the fixed shard schema."""

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        return pa.Table.from_pydict(super().__call__(batch), schema=SCHEMA)


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


def actor_pool_bounds(cfg: Config, batches: int) -> tuple[int, int]:
    """Bounds of the labeling actor pool: at most what the cluster holds (and one actor per
    batch); at least as many as fit in the resources free right now, so the pass does not
    start on one actor and wait for the pool to grow."""
    def fit(resources: dict) -> int:
        if cfg.ray.use_gpu:
            return int(resources.get("GPU", 0) // max(cfg.label.gpus_per_actor, 1e-6))
        return int(resources.get("CPU", 0) // cfg.label.cpus_per_actor)

    upper = max(1, min(cfg.label.max_actors or fit(ray.cluster_resources()), batches))  # Ray: all nodes' totals
    free_now = fit(ray.available_resources())  # Ray: what no task or actor holds at this moment
    lower = min(upper, max(cfg.label.min_actors, free_now))
    return lower, upper


def run_labeling(cfg: Config, images: ImagePool | Sequence[tuple[str, str]], checkpoint_paths: Sequence[str],
                 label_checkpoint: str, out_dir: Path, expect_arch: dict | None = None) -> dict:
    """Label `images` (a pool, or (id, path) pairs) into `out_dir`; returns timing and counts."""
    out_dir = location(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    remove_tree(partial)
    batch_size = cfg.label.batch_size
    start = time.perf_counter()
    if not isinstance(images, ImagePool):
        images = ImagePool(pa.array([i for i, _ in images], pa.string()), pa.array([p for _, p in images], pa.string()))
    table = images.table()
    # Ray Data: one block per batch, sliced from the pool's columns (no per-image Python object).
    blocks = [table.slice(lo, batch_size) for lo in range(0, len(table), batch_size)] or [table]
    lower, upper = actor_pool_bounds(cfg, len(blocks))
    ds = ray.data.from_arrow(blocks)
    gpu = cfg.ray.use_gpu
    ds = ds.map_batches(  # Ray Data: an autoscaling pool of actors, each loading the checkpoints once
        ArrowLabeler,
        fn_constructor_kwargs={
            "checkpoint_paths": list(checkpoint_paths),
            "label_checkpoint": label_checkpoint,
            "tta": cfg.label.tta,
            "tta_scales": cfg.label.tta_scales,
            "device": "cuda" if gpu else "cpu",
            "num_threads": 0 if gpu else max(1, round(cfg.label.cpus_per_actor)),
            "expect_arch": expect_arch,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=lower, max_size=upper),
        num_cpus=0 if gpu else cfg.label.cpus_per_actor,
        num_gpus=cfg.label.gpus_per_actor if gpu else 0,
    )
    # Ray Data: shards in parallel. Writing takes no CPU slot: the actors hold them all, and a
    # writer waiting for a slot would hold finished batches back until the pool shrinks.
    ds.write_datasink(ShardSink(str(partial), cfg.label.rows_per_file), ray_remote_args={"num_cpus": 0})
    check_complete(read_table(partial, ["image_id"]), images.ids, str(partial))
    publish_tree(partial, out_dir)
    wall = time.perf_counter() - start
    return {"images": len(images), "wall_s": wall, "images_per_s": len(images) / wall if wall else None,
            "actors": [lower, upper], "shards": len(list(out_dir.glob("*.parquet")))}
