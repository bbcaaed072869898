"""Does the ST++ premise hold on a finished demo run? (The demo has masks for every image.)

Compares each unlabeled image's teacher pseudo-label with its true mask and reports how
much the quality varies, how well the stability score ranks it, and how much better the
reliable half is than the unreliable half.

    python bench/demo_premise.py RUN_DIR [DATA_ROOT]      # e.g. runs/demo data/demo
"""

import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from stpp_ray.datasets import decode_mask_png, read_mask
from stpp_ray.metrics import ConfusionMatrix
from stpp_ray.pseudo_labels import read_table
from stpp_ray.stability import image_miou


def main(run: Path, root: Path) -> None:
    cfg = json.loads((run / "report.json").read_text())["config"]
    n = cfg["data"]["num_classes"]
    reliable = set(json.loads((run / "selection.json").read_text())["reliable"])
    level = {r["id"]: r["difficulty"] for r in json.loads((root / "demo_info.json").read_text())["train"]}
    quality, scores, by_level = [], [], {}
    groups = {"reliable": ConfusionMatrix(n), "unreliable": ConfusionMatrix(n)}
    for row in read_table(run / "pseudo_labels" / "teacher").to_pylist():
        truth = read_mask(root / "SegmentationClass" / f"{row['image_id']}.png", "voc")
        label = decode_mask_png(row["mask_png"])
        valid = truth != 255
        quality.append(image_miou(label[valid], truth[valid], n))
        scores.append(row["stability"])
        groups["reliable" if row["image_id"] in reliable else "unreliable"].update(label, truth)
        by_level.setdefault(level[row["image_id"]], []).append(quality[-1])
    p10, p50, p90 = np.percentile(quality, [10, 50, 90])
    print(f"per-image pseudo-label mIoU vs truth: p10 {p10:.2f}, median {p50:.2f}, p90 {p90:.2f}")
    print(f"Spearman(stability, true quality) = {spearmanr(scores, quality).statistic:.3f}")
    for name, cm in groups.items():
        print(f"{name} set: pseudo-label mIoU vs truth {100 * cm.miou():.2f}")
    for name, values in sorted(by_level.items()):
        print(f"{name}: {len(values)} images, mean per-image mIoU {np.mean(values):.2f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2] if len(sys.argv) > 2 else "data/demo"))
