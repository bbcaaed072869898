"""Labeling at scale: the product's Ray Data pass over a pool of |U| tiny images against the
bare batched loop on the same images, the ST++ reference procedure, and where the loop's time goes.

The pool is `bench.memory.make_pool`'s (|U| copies of one JPEG under the VOC layout), read as the
pipeline reads it (`ImagePool.read`). The models are the demo config's K checkpoints
(`bench.workload.make_checkpoints`). The bare loop labels the same pool (or, when asked, its
first images); the reference procedure, one image at a time, labels its first few thousand.
"""

from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import labeling, memory, workload


@contextmanager
def _timed(module, names: list[str], totals: dict[str, float]):
    """Wrap `module.<name>` for each name so that its calls add their seconds to `totals[name]`."""
    saved = {n: getattr(module, n) for n in names}

    def wrap(name, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - t0
        return timed

    for n in names:
        setattr(module, n, wrap(n, saved[n]))
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(module, n, fn)


def breakdown(cfg, images: list[tuple[str, str]], checkpoints: list[str], out: Path) -> dict[str, float]:
    """Seconds of the bare loop's parts over `images`: decode, forward (the K checkpoints and the
    scores), PNG encoding, Arrow conversion, Parquet writing."""
    import stpp_ray.labeling as module
    from stpp_ray.labeling import Labeler
    from stpp_ray.pseudo_labels import SCHEMA

    labeler = Labeler(checkpoints, checkpoints[-1], tta=cfg.label.tta, tta_scales=cfg.label.tta_scales)
    totals = {"read_image": 0.0, "encode_mask_png": 0.0, "labeler": 0.0, "arrow": 0.0, "parquet": 0.0}
    with _timed(module, ["read_image", "encode_mask_png"], totals):
        for lo in range(0, len(images), cfg.label.batch_size):
            chunk = images[lo:lo + cfg.label.batch_size]
            batch = {"image_id": np.array([i for i, _ in chunk]), "image_path": np.array([p for _, p in chunk])}
            t0 = time.perf_counter()
            result = labeler(batch)
            t1 = time.perf_counter()
            table = pa.Table.from_pydict(result, schema=SCHEMA)
            t2 = time.perf_counter()
            pq.write_table(table, out)
            totals["labeler"] += t1 - t0
            totals["arrow"] += t2 - t1
            totals["parquet"] += time.perf_counter() - t2
    return {"decode": totals["read_image"], "forward": totals["labeler"] - totals["read_image"] - totals["encode_mask_png"],
            "png_encode": totals["encode_mask_png"], "arrow": totals["arrow"], "parquet_write": totals["parquet"]}


def run(cfg, scratch: Path, n: int, image_size: int, bare_images: int, reference_images: int, cores: int,
        say=print) -> dict:
    from stpp_ray.cluster.label import run_labeling
    from stpp_ray.image_pool import ImagePool

    root = scratch / f"label_scale_pool_{image_size}"
    t0 = time.perf_counter()
    memory.make_pool(root, n, image_size)
    pool = ImagePool.read("voc", root, "unlabeled.txt")
    checkpoints = workload.make_checkpoints(cfg, scratch / "label_scale_checkpoints")
    out: dict = {"images": n, "image_size": image_size, "checkpoints": len(checkpoints), "batch_size": cfg.label.batch_size,
                 "model": f"{cfg.model.name}/{cfg.model.backbone}", "generate_s": time.perf_counter() - t0}
    first = list(zip(pool.ids[:bare_images].to_pylist(), pool.paths[:bare_images].to_pylist()))
    say(f"labeling at scale: the Ray Data pass over {n:,} images")
    shutil.rmtree(scratch / "label_scale_ray", ignore_errors=True)
    ray_stats = run_labeling(cfg, pool, checkpoints, checkpoints[-1], scratch / "label_scale_ray")
    out["ray_s"], out["shards"] = ray_stats["wall_s"], ray_stats["shards"]
    say(f"labeling at scale: the bare loop over the first {len(first):,}, the reference over {reference_images:,}")
    out["bare_images"], out["bare_s"] = len(first), labeling.bare_loop(cfg, first, checkpoints, scratch / "label_scale_bare", cores)
    out["reference_images"] = min(reference_images, len(first))
    out["reference_s"], _ = labeling.reference_procedure(first[:out["reference_images"]], checkpoints, checkpoints[-1],
                                                         scratch / "label_scale_reference", cores)
    sample = first[:min(4096, len(first))]
    out["breakdown_images"], out["breakdown_s"] = len(sample), breakdown(cfg, sample, checkpoints, scratch / "breakdown.parquet")
    out["images_per_s"] = {"ray": n / out["ray_s"], "bare": len(first) / out["bare_s"],
                           "reference": out["reference_images"] / out["reference_s"]}
    for name in ("label_scale_ray", "label_scale_bare", "label_scale_reference"):
        shutil.rmtree(scratch / name, ignore_errors=True)
    return out


def markdown(m: dict) -> str:
    rate = m["images_per_s"]
    rows = [("Ray Data pass (the product: actor pool, Parquet shards, completeness check)", m["images"], m["ray_s"], rate["ray"]),
            ("bare batched loop, one process, all cores (the pool's first images)", m["bare_images"], m["bare_s"], rate["bare"]),
            ("reference procedure (batch 1, K checkpoints, then a 2nd pass labeling)", m["reference_images"], m["reference_s"],
             rate["reference"])]
    lines = [f"|U| = {m['images']:,} unlabeled {m['image_size']}x{m['image_size']} JPEGs, K = {m['checkpoints']} checkpoints of "
             f"{m['model']} (the last one labels), batch {m['batch_size']}; {m['shards']:,} shards written; the pool generated "
             f"in {m['generate_s']:.0f} s.", "",
             "| how | images | seconds | images/s | vs bare | vs reference |", "|---|---|---|---|---|---|"]
    for name, count, seconds, r in rows:
        lines.append(f"| {name} | {count:,} | {seconds:.1f} | {r:,.0f} | {r / rate['bare']:.2f} | {r / rate['reference']:.2f} |")
    parts = m["breakdown_s"]
    total = sum(parts.values())
    lines += ["", f"Where the bare loop's time goes ({m['breakdown_images']:,} images, {total:.1f} s):", "",
              "| part | seconds | share |", "|---|---|---|"]
    names = {"decode": "JPEG decode (`read_image`)", "forward": "forward of the K checkpoints, IoUs, scores",
             "png_encode": "PNG encoding of masks and confidence maps", "arrow": "conversion to an Arrow table",
             "parquet_write": "Parquet write"}
    for key, seconds in parts.items():
        lines.append(f"| {names[key]} | {seconds:.2f} | {seconds / total:.0%} |")
    return "\n".join(lines) + "\n"
