"""Scale model: a Pascal VOC ST++ run with DeepLabv3+ ResNet-101 on 1, 8 and 32 GPUs, on paper
(`python -m bench.run` writes it too, with the fixed costs it measured).

FLOPs per image are counted (torch's FlopCounterMode on meta tensors, nothing is run);
everything else is an assumption stated in ASSUMPTIONS and printed with the table.

    python -m bench.scale [bench/out/bench.json] [--update-doc BENCHMARKS.md]
"""

from __future__ import annotations

import json
import math
from pathlib import Path

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
    """The scale-model table, with the fixed costs measured in a bench.json dict (0 if absent)."""
    train_start = bench.get("training", {}).get("startup_s", {}).get("median", 0.0)
    label_fixed = bench.get("labeling", {}).get("ray_fixed_s", 0.0)
    train_gf, infer_gf = count_flops()
    return render(project(train_gf, infer_gf, train_start, label_fixed), train_gf, infer_gf, train_start, label_fixed)


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
