"""The data check of a large unlabeled pool: the driver's single-process loop against the Ray
Data pass across the cluster (`cluster.check.check_pool_on_cluster`), on the same images.

The pool is `bench.memory.make_pool`'s: |U| copies of one small JPEG under the VOC layout.
Each figure is images/s of the check alone, the pool's listing (`ImagePool.read`) timed apart.
"""

from __future__ import annotations

import time
from pathlib import Path

from . import memory


def run(scratch: Path, n: int, say=print) -> dict:
    from stpp_ray.cluster.check import check_pool_on_cluster
    from stpp_ray.datasets import check_samples
    from stpp_ray.image_pool import ImagePool

    import ray

    root = scratch / "check_pool"
    t0 = time.perf_counter()
    memory.make_pool(root, n)
    out: dict = {"images": n, "image_size": memory.MASK_SIZE, "generate_s": time.perf_counter() - t0,
                 "cluster_cpus": int(ray.cluster_resources().get("CPU", 0))}
    t0 = time.perf_counter()
    pool = ImagePool.read("voc", root, "unlabeled.txt")
    out["listing_s"] = time.perf_counter() - t0
    say(f"data check of {n} images: the driver's loop")
    t0 = time.perf_counter()
    check_samples(pool, 21, "voc")
    out["loop_s"] = time.perf_counter() - t0
    say(f"data check of {n} images: the Ray Data pass on {out['cluster_cpus']} CPUs")
    t0 = time.perf_counter()
    check_pool_on_cluster(pool, "voc")
    out["ray_s"] = time.perf_counter() - t0
    out["loop_images_per_s"], out["ray_images_per_s"] = n / out["loop_s"], n / out["ray_s"]
    return out


def markdown(m: dict) -> str:
    return "\n".join([
        f"Data check of |U| = {m['images']:,} unlabeled images ({m['image_size']} px JPEGs; listing the split "
        f"{m['listing_s']:.1f} s, apart):", "",
        "| how | seconds | images/s | vs the loop |", "|---|---|---|---|",
        f"| the driver's loop (`datasets.check_samples`) | {m['loop_s']:.1f} | {m['loop_images_per_s']:,.0f} | 1.00x |",
        f"| Ray Data pass on {m['cluster_cpus']} CPUs (`cluster.check`) | {m['ray_s']:.1f} | {m['ray_images_per_s']:,.0f} "
        f"| {m['ray_images_per_s'] / m['loop_images_per_s']:.2f}x |", ""])
