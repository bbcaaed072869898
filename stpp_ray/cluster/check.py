"""Ray Data glue: the data check of a large unlabeled pool, spread across the cluster."""

from __future__ import annotations

import math
import time

import pyarrow as pa

import ray
import ray.data

from ..datasets import Sample, raise_if_check_failed, sample_problems
from ..image_pool import ImagePool, with_paths
from ..storage import location

# A task's images: about four tasks per CPU, within these bounds (a task costs tens of ms of
# Ray Data overhead: 256 tiny images a task ran at 0.6x the driver's loop on 2 CPUs, 8192 at 1.6x).
MIN_IMAGES_PER_TASK, MAX_IMAGES_PER_TASK = 256, 8192


def images_per_task(images: int, cpus: int) -> int:
    return min(MAX_IMAGES_PER_TASK, max(MIN_IMAGES_PER_TASK, math.ceil(images / (4 * max(cpus, 1)))))


def _batch_problems(batch: pa.Table, layout: str, template: tuple[str, str] | None) -> pa.Table:
    batch, problems = with_paths(batch, template), []
    for image_id, path in zip(batch.column("image_id").to_pylist(), batch.column("image_path").to_pylist()):
        problems.extend(sample_problems(Sample(image_id, location(path)), 0, layout))  # no mask: 0 classes unread
    return pa.table({"problem": pa.array(problems, pa.string())})


def check_pool_on_cluster(pool: ImagePool, layout: str) -> dict:
    """Read and validate every image of `pool` in Ray Data tasks (one CPU each, anywhere on the
    cluster); raise one DatasetError listing every problem. Returns the pass's images/s."""
    start = time.perf_counter()
    per_task = images_per_task(len(pool), int(ray.cluster_resources().get("CPU", 1)))
    blocks = pool.blocks(per_task)
    ds = ray.data.from_arrow(blocks).map_batches(_batch_problems, fn_kwargs={"layout": layout, "template": pool.template},
                                                  batch_format="pyarrow", batch_size=per_task, num_cpus=1)
    raise_if_check_failed([row["problem"] for row in ds.iter_rows()])
    wall = time.perf_counter() - start
    return {"checked_on": "cluster", "check_wall_s": wall, "check_images_per_s": len(pool) / wall if wall else None,
            "check_tasks": len(blocks)}
