"""Scale model: a Pascal VOC ST++ run with DeepLabv3+ ResNet-101 on 1, 8 and 32 GPUs, and a pool of
one million unlabeled images on 8 and 32 GPUs, on paper (`python -m bench.run` writes it too, with
the fixed costs and memory slopes it measured).

FLOPs per image are counted (torch's FlopCounterMode on meta tensors, nothing is run);
everything else is an assumption stated in ASSUMPTIONS and printed with the table.

    python -m bench.scale [bench/out/bench.json] [--update-doc BENCHMARKS.md]
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from stpp_ray.config import LabelConfig

ASSUMPTIONS = {
    "labeled": 662, "unlabeled": 9920, "val": 1449,        # VOC blended 1/16 (10582 train images)
    "epochs": 80, "eval_interval": 5, "global_batch": 16,   # the paper's recipe, students as the teacher
    "crop": 321, "image_hw": (375, 500),                    # training crop; typical VOC image for inference
    "k": 3, "reliable_fraction": 0.5,
    "tta_views": 2 * (0.25 + 0.5625 + 1 + 2.25 + 4),        # scales 0.5..2.0 x {identity, flip}, relative area
    "gpu_tflops": 25.0,        # sustained bf16 TFLOP/s per GPU (A10G-class GPU with AMP), not measured here
    "ddp_efficiency": {1: 1.0, 8: 0.85, 16: 0.8},           # training scaling across nodes, assumed
    "label_efficiency": 0.95,  # labeling actors are independent; loading and Parquet writes cost the rest
    "node_start_s": 300,       # autoscaler bringing GPU nodes up once, assumed
}

# The million-image pool: the recipe above, |U| = 1M. Memory lines come from bench/memory.py (a
# bench.json with its section, or the figures of BENCHMARKS.md below).
POOL = {
    "unlabeled": 1_000_000, "gpus": (8, 32),
    "mask_png_bytes": 8_000,   # a 500x375 label map of a few ragged regions as PNG, assumed; read your first shard's
    "row_overhead_bytes": 120,  # id, K stability scores, confidence, entropy, sizes (Parquet, before compression)
    "rows_per_file": LabelConfig.model_fields["rows_per_file"].default,
    "id_bytes": 11,  # a VOC id such as 2007_000032
    "list_page_keys": 1000, "list_page_s": 0.05,  # S3 ListObjectsV2: 1000 keys a page, ~50 ms a page, assumed
    "selection_s_per_million": 2.0,  # reading |U| x K scores from the shards and sorting them, assumed
}
MEASURED_MEMORY = {  # bench.run --sections memory at 394d6e7 (BENCHMARKS.md): MiB at |U| = 10k, MiB per 100k
    "sizes": [10_000], "peak_mib": {"worker": [808.0], "worker_eager": [778.0], "driver": [778.0]},
    "slope_mib_per_100k": {"worker": 4.3, "worker_eager": 90.2, "driver": 12.3}, "mask_png_bytes": 155.0,
}
# The fixed costs where a bench.json lacks the sections measuring them: bench.run --sections
# labeling training at 9ed1b00 (BENCHMARKS.md): Ray Train start-up per stage (median), a labeling pass's.
MEASURED_FIXED_S = {"train_startup": 13.8, "label_pass": 6.8}


def count_flops() -> tuple[float, float]:
    """GFLOPs per training image (forward + backward at the crop) and per inference image."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from stpp_ray.models import build_model

    a = ASSUMPTIONS
    with torch.device("meta"):
        model = build_model("deeplabv3plus", "resnet101", 21, output_stride=16, pretrained="none", aspp_channels=256)
    with FlopCounterMode(display=False) as fc:  # a batch of 2: training-mode BatchNorm refuses one 1x1 map (ASPP pooling)
        model(torch.empty(2, 3, a["crop"], a["crop"], device="meta")).sum().backward()
    train = fc.get_total_flops() / 2 / 1e9
    model.eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.empty(1, 3, *a["image_hw"], device="meta"))
    return train, fc.get_total_flops() / 1e9


def project(train_gf: float, infer_gf: float, train_start_s: float, label_fixed_s: float) -> list[dict]:
    """Hours per stage on 1, 8 and 32 GPUs."""
    a = ASSUMPTIONS
    reliable = math.floor(a["unlabeled"] * a["reliable_fraction"])
    unreliable = a["unlabeled"] - reliable
    evals = a["epochs"] // a["eval_interval"]
    stages = [  # name, GFLOP of training, GFLOP of validation/labeling, kind
        ("teacher", a["epochs"] * a["labeled"] * train_gf, evals * a["val"] * infer_gf, "train"),
        ("label_teacher", 0.0, a["unlabeled"] * (a["k"] + a["tta_views"]) * infer_gf, "label"),
        ("student1", a["epochs"] * 2 * reliable * train_gf, evals * a["val"] * infer_gf, "train"),
        ("label_student1", 0.0, unreliable * a["tta_views"] * infer_gf, "label"),
        ("student2", a["epochs"] * 2 * a["unlabeled"] * train_gf, evals * a["val"] * infer_gf, "train"),
    ]
    rows = []
    for gpus in (1, 8, 32):
        workers = min(gpus, a["global_batch"])  # the global batch of 16 cannot be split over more workers
        eff = a["ddp_efficiency"][workers]
        total = a["node_start_s"] if gpus > 1 else 0.0
        row = {"gpus": gpus, "train_workers": workers}
        for name, train, other, kind in stages:
            if kind == "train":
                seconds = train / (a["gpu_tflops"] * 1e3 * workers * eff) + other / (a["gpu_tflops"] * 1e3 * workers)
                seconds += train_start_s
            else:
                seconds = other / (a["gpu_tflops"] * 1e3 * gpus * a["label_efficiency"]) + label_fixed_s
            row[name] = seconds / 3600
            total += seconds
        row["total_h"] = total / 3600
        rows.append(row)
    return rows


def _peak_at(memory: dict, kind: str, n: int) -> float:
    """MiB at |U| = n on the measured line of `kind` (from its smallest measured pool)."""
    n0, mib0 = memory["sizes"][0], memory["peak_mib"][kind][0]
    return mib0 + memory["slope_mib_per_100k"][kind] * (n - n0) / 100_000


def project_pool(train_gf: float, infer_gf: float, memory: dict = MEASURED_MEMORY) -> list[dict]:
    """The million-image pool on POOL's GPU counts: labeling hours, student hours per epoch,
    per-process peak memory, the shards and the driver's work."""
    a, p = ASSUMPTIONS, POOL
    n = p["unlabeled"]
    reliable = math.floor(n * a["reliable_fraction"])
    shards = math.ceil(n / p["rows_per_file"])
    row_bytes = p["mask_png_bytes"] + p["row_overhead_bytes"]
    # Holding every mask (before the lazy reads) also holds their bytes: the measured line had 155-byte masks.
    eager = _peak_at(memory, "worker_eager", n) + n * (p["mask_png_bytes"] - memory["mask_png_bytes"]) / 2**20
    listing_s = math.ceil(n / p["list_page_keys"]) * p["list_page_s"]  # datasets lists the image folder once
    rows = []
    for gpus in p["gpus"]:
        workers = min(gpus, a["global_batch"])
        eff = a["ddp_efficiency"][workers]
        per_view = infer_gf / (a["gpu_tflops"] * 1e3 * gpus * a["label_efficiency"])  # seconds per image view
        label = n * (a["k"] + a["tta_views"]) * per_view
        relabel = (n - reliable) * a["tta_views"] * per_view
        epoch2 = 2 * n * train_gf / (a["gpu_tflops"] * 1e3 * workers * eff)  # student 2: |L| repeated to |U|, + |U|
        rows.append({
            "gpus": gpus, "train_workers": workers, "label_teacher_h": label / 3600, "label_student1_h": relabel / 3600,
            "student2_epoch_h": epoch2 / 3600, "student2_h": a["epochs"] * epoch2 / 3600,
            "worker_mib": _peak_at(memory, "worker", n), "worker_eager_mib": eager,
            "driver_mib": _peak_at(memory, "driver", n), "shards": shards,
            "shard_mib": p["rows_per_file"] * row_bytes / 2**20, "shards_gib": n * row_bytes / 2**30,
            "driver_listing_s": listing_s,
            "driver_selection_s": p["selection_s_per_million"] * n / 1e6,
        })
    return rows


def render_pool(rows: list[dict], memory: dict) -> str:
    p, a = POOL, ASSUMPTIONS
    lines = [f"A pool of |U| = {p['unlabeled']:,} unlabeled images, the same recipe (K = {a['k']}, R = "
             f"{a['reliable_fraction']}, {a['epochs']} epochs, global batch {a['global_batch']}):", "",
             "| GPUs | label teacher (h) | label student 1 (h) | student 2: one epoch (h) | student 2: "
             f"{a['epochs']} epochs (h) | Train worker peak (MiB) | same, every mask held | driver peak (MiB) "
             "| shards | MiB a shard | shards in all (GiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['gpus']} | {r['label_teacher_h']:.2f} | {r['label_student1_h']:.2f} | {r['student2_epoch_h']:.2f} "
                     f"| {r['student2_h']:.0f} | {r['worker_mib']:,.0f} | {r['worker_eager_mib']:,.0f} "
                     f"| {r['driver_mib']:,.0f} | {r['shards']:,} | {r['shard_mib']:.1f} | {r['shards_gib']:.1f} |")
    r = rows[0]
    lines += ["", f"The driver's work: listing the pool {r['driver_listing_s']:.0f} s on S3 "
              f"({p['list_page_keys']} keys a page, {p['list_page_s'] * 1000:.0f} ms a page), reading the scores and "
              f"selecting {r['driver_selection_s']:.0f} s; it writes each student stage one selection file (ids and "
              f"shard rows, {p['id_bytes'] + 12} bytes an image: {p['unlabeled'] * (p['id_bytes'] + 12) / 2**20:.0f} MiB "
              "for student 2's pool) that each worker reads once. Memory lines: peak at |U| = "
              f"{memory['sizes'][0]:,} plus the measured slope (" + ", ".join(
                  f"{k} {v:.1f}" for k, v in memory["slope_mib_per_100k"].items() if k in ("worker", "worker_eager", "driver"))
              + " MiB per 100k images); the every-mask-held line adds the masks' bytes beyond the measured "
              f"{memory['mask_png_bytes']:.0f}. Assumptions: " + "; ".join(f"{k} = {v}" for k, v in p.items()) + ".", ""]
    return "\n".join(lines)


def render(rows: list[dict], train_gf: float, infer_gf: float, train_start_s: float, label_fixed_s: float) -> str:
    a = ASSUMPTIONS
    names = ["teacher", "label_teacher", "student1", "label_student1", "student2"]
    lines = [f"DeepLabv3+ ResNet-101 (output stride 16): {train_gf:.0f} GFLOP per training image "
             f"({a['crop']}x{a['crop']} crop, forward + backward), {infer_gf:.0f} GFLOP per "
             f"{a['image_hw'][1]}x{a['image_hw'][0]} inference (counted, FlopCounterMode). Hours per stage:", "",
             "| GPUs | Train workers | " + " | ".join(names) + " | total (h) |",
             "|" + "---|" * (len(names) + 3)]
    for r in rows:
        lines.append(f"| {r['gpus']} | {r['train_workers']} | " + " | ".join(f"{r[n]:.2f}" for n in names)
                     + f" | **{r['total_h']:.1f}** |")
    lines += ["", "Assumptions: " + "; ".join(f"{k} = {v}" for k, v in a.items())
              + f"; Ray Train start-up per stage {train_start_s:.0f} s and labeling pass fixed cost "
              f"{label_fixed_s:.0f} s (as measured on this CPU machine).", ""]
    return "\n".join(lines)


def markdown_from(bench: dict) -> str:
    """The scale-model table, with the fixed costs and memory measured in a bench.json dict (where
    absent, those of `MEASURED_FIXED_S` and `MEASURED_MEMORY`)."""
    train_start = bench.get("training", {}).get("startup_s", {}).get("median", MEASURED_FIXED_S["train_startup"])
    label_fixed = bench.get("labeling", {}).get("ray_fixed_s", MEASURED_FIXED_S["label_pass"])
    memory = bench.get("memory") or MEASURED_MEMORY
    train_gf, infer_gf = count_flops()
    return (render(project(train_gf, infer_gf, train_start, label_fixed), train_gf, infer_gf, train_start, label_fixed)
            + "\n" + render_pool(project_pool(train_gf, infer_gf, memory), memory))


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .render import update_doc

    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[0])
    p.add_argument("bench_json", nargs="?", type=Path, help="bench.json whose measured fixed costs to use")
    p.add_argument("--update-doc", type=Path, help="rewrite the scale block of this markdown file")
    args = p.parse_args(argv)
    markdown = markdown_from(json.loads(args.bench_json.read_text()) if args.bench_json else {})
    if args.update_doc:
        update_doc(args.update_doc, markdown, block="scale")
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
