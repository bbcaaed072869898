"""Ray Data glue: score and pseudo-label unlabeled images into Parquet shards.

images (id, path) -> map_batches(Labeler actors holding all checkpoints) -> Parquet.
The shards are written to `<out>.partial` and moved to `<out>` only once every
image is present exactly once, so a half-written stage is never mistaken for a
finished one (on an object store the manifest entry written after the move publishes it).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

import ray
import ray.data

from ..config import Config
from ..image_pool import ImagePool, template_paths
from ..labeling import Labeler
from ..pseudo_labels import SCHEMA, check_complete, read_table
from ..storage import location, publish_tree, remove_tree
from .shard_sink import ShardSink


class ArrowLabeler(Labeler):
    """The `Labeler` returning Arrow tables with the fixed shard schema; a batch without paths
    has them derived from `path_template` (`ImagePool.blocks`)."""

    def __init__(self, *args, path_template: tuple[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.path_template = path_template

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        if "image_path" not in batch:
            paths = template_paths(pa.array(batch["image_id"], pa.string()), self.path_template)
            batch = {**batch, "image_path": paths.to_numpy(zero_copy_only=False)}
        return pa.Table.from_pydict(super().__call__(batch), schema=SCHEMA)


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


def batches_per_block(images: int, batch_size: int, rows_per_file: int, actors: int) -> int:
    """Batches in each input block of the labeling pass: up to a shard's worth, but few enough
    that every actor gets about four blocks. Each block costs the actor pool a scheduling round
    trip: one block per batch of 64 made the pass 1.4x slower at 51,200 images (BENCHMARKS.md)."""
    batches = math.ceil(images / batch_size)
    return max(1, min(rows_per_file // batch_size, batches // (4 * max(actors, 1))))


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
    lower, upper = actor_pool_bounds(cfg, math.ceil(len(images) / batch_size))
    # Ray Data: blocks of whole batches sliced from the pool's columns (no per-image Python object).
    rows = batch_size * batches_per_block(len(images), batch_size, cfg.label.rows_per_file, upper)
    ds = ray.data.from_arrow(images.blocks(rows))
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
            "path_template": images.template,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=lower, max_size=upper),
        num_cpus=0 if gpu else cfg.label.cpus_per_actor,
        num_gpus=cfg.label.gpus_per_actor if gpu else 0,
    )
    # Ray Data: shards in parallel. Writing takes no CPU slot: the actors hold them all, and a
    # writer waiting for a slot would hold finished batches back until the pool shrinks. With no
    # slot, nothing else bounds the writers: unbounded, each wave of them started new worker
    # processes on 2 CPUs (12,800 images: 27.6 s, bounded to one writer per actor: 16.5 s).
    ds.write_datasink(ShardSink(str(partial), cfg.label.rows_per_file), ray_remote_args={"num_cpus": 0},
                      concurrency=upper)
    check_complete(read_table(partial, ["image_id"]), images.ids, str(partial))
    publish_tree(partial, out_dir)
    wall = time.perf_counter() - start
    return {"images": len(images), "wall_s": wall, "images_per_s": len(images) / wall if wall else None,
            "actors": [lower, upper], "shards": len(list(out_dir.glob("*.parquet")))}
