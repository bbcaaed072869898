"""Labeling + stability scoring of N unlabeled images with K checkpoints, three ways.

- `ray_pass`: the product's Ray Data pass (actor pool, Parquet shards).
- `bare_loop`: one process, all cores, the same `Labeler` in batches, Parquet written by
  pyarrow: the practical limit on the machine.
- `reference_procedure`: the ST++ reference code's procedure: one image at a time through
  the K checkpoints to score it (IoU of each earlier prediction against the last, in
  numpy), then a second, separate pass with the labeling model writing one palette PNG per
  image.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from stpp_ray.augment import normalize
from stpp_ray.weights import load_model
from stpp_ray.config import Config
from stpp_ray.datasets import read_image
from stpp_ray.labeling import Labeler
from stpp_ray.pseudo_labels import SCHEMA
from stpp_ray.stability import checkpoint_ious


def ray_pass(cfg: Config, images: Sequence[tuple[str, str]], checkpoints: Sequence[str], out_dir: Path) -> float:
    """Seconds of one `run_labeling` call (actor start-up included)."""
    from stpp_ray.cluster.label import run_labeling

    shutil.rmtree(out_dir, ignore_errors=True)
    return run_labeling(cfg, images, checkpoints, checkpoints[-1], out_dir)["wall_s"]


def bare_loop(cfg: Config, images: Sequence[tuple[str, str]], checkpoints: Sequence[str], out_dir: Path,
              threads: int) -> float:
    """Seconds for the same work in this process: load, label in batches, write Parquet."""
    torch.set_num_threads(threads)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    start = time.perf_counter()
    labeler = Labeler(checkpoints, checkpoints[-1], tta=cfg.label.tta, tta_scales=cfg.label.tta_scales)
    size, per_file = cfg.label.batch_size, cfg.label.rows_per_file
    tables, rows, files = [], 0, 0
    for lo in range(0, len(images), size):
        chunk = images[lo:lo + size]
        batch = {"image_id": np.array([i for i, _ in chunk]), "image_path": np.array([p for _, p in chunk])}
        tables.append(pa.Table.from_pydict(labeler(batch), schema=SCHEMA))
        rows += len(chunk)
        if rows >= per_file or lo + size >= len(images):
            pq.write_table(pa.concat_tables(tables), out_dir / f"part_{files:05d}.parquet")
            tables, rows, files = [], 0, files + 1
    return time.perf_counter() - start


def _palette() -> list[int]:
    return [v for i in range(256) for v in (i, i, i)]


@torch.no_grad()
def reference_procedure(images: Sequence[tuple[str, str]], checkpoints: Sequence[str], label_checkpoint: str,
                        out_dir: Path, threads: int) -> tuple[float, dict[str, float]]:
    """Seconds of the reference procedure, and each image's stability score."""
    torch.set_num_threads(threads)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    start = time.perf_counter()
    loaded = [load_model(p) for p in checkpoints]
    models = [model.eval() for model, _ in loaded]
    num_classes = int(loaded[-1][1]["arch"]["num_classes"])
    scores: dict[str, float] = {}
    for image_id, path in images:  # pass 1: selection, batch size 1
        x = normalize(torch.from_numpy(read_image(path)).permute(2, 0, 1).unsqueeze(0).contiguous())
        preds = [m(x).argmax(1)[0].numpy() for m in models]
        scores[image_id] = float(np.mean(checkpoint_ious(preds, num_classes)))
    ranked = sorted(scores, key=scores.get, reverse=True)
    (out_dir / "reliable_ids.txt").write_text("\n".join(ranked[:len(ranked) // 2]) + "\n")
    label_model = load_model(label_checkpoint)[0].eval()
    palette = _palette()
    for image_id, path in images:  # pass 2: pseudo-labels, batch size 1, one PNG per image
        x = normalize(torch.from_numpy(read_image(path)).permute(2, 0, 1).unsqueeze(0).contiguous())
        pred = label_model(x).argmax(1)[0].numpy().astype(np.uint8)
        png = Image.fromarray(pred, mode="P")
        png.putpalette(palette)
        png.save(out_dir / f"{image_id}.png")
    return time.perf_counter() - start, scores
