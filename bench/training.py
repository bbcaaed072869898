"""Training throughput: Ray Train (1 and 2 workers) against a bare single-process loop on
the same model, data and global batch; and the fixed cost of a Ray Train run.

Both sides build everything through `stpp_ray.stage_setup.setup_rank` and train with
`stpp_ray.training.train_one_epoch`; images/s is measured inside the epoch loop. The Ray
side's start-up is the time from calling `TorchTrainer.fit()` to its first epoch starting,
its teardown the time from the end of the last epoch's work to `fit()` returning.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from stpp_ray.config import Config
from stpp_ray.datasets import build_samples
from stpp_ray.training import TrainItem, train_one_epoch
from stpp_ray.stage_setup import setup_rank

TRAIN_SPLIT = "ImageSets/Segmentation/full/labeled.txt"  # the demo training images with their masks
TRAIN_IMAGES = 256  # 16 steps of the global batch per epoch
VAL_IMAGES = 16
TRAIN_SETUPS = (  # result key, Ray Train workers, synchronised BatchNorm
    ("ray_1", 1, True),
    ("ray_2", 2, True),
    ("ray_2_local_bn", 2, False),
)


def _samples(cfg: Config):
    train = build_samples(cfg.data.layout, cfg.data.root, TRAIN_SPLIT, with_masks=True)[:TRAIN_IMAGES]
    val = build_samples(cfg.data.layout, cfg.data.root, cfg.data.val_split, with_masks=True)[:VAL_IMAGES]
    return train, val


def bare_epochs(cfg: Config, epochs: int, threads: int) -> list[float]:
    """images/s of each epoch of plain single-process training."""
    torch.set_num_threads(threads)
    train, _ = _samples(cfg)
    items = [TrainItem(s.image_id, str(s.image_path), str(s.mask_path)) for s in train]
    setup = setup_rank(cfg, items, [], epochs)
    rates = []
    for epoch in range(1, epochs + 1):
        setup.sampler.set_epoch(epoch)
        setup.train_set.set_epoch(epoch)
        stats = train_one_epoch(setup.model, setup.loader, setup.optimizer, setup.scheduler, torch.device("cpu"))
        rates.append(stats["images_per_s"])
    return rates


def ray_run(cfg: Config, epochs: int, storage: Path, name: str) -> dict:
    """One `fit_stage` run of `epochs` epochs: per-epoch images/s, start-up and teardown seconds."""
    from stpp_ray.cluster.train import fit_stage
    from stpp_ray.methods.base import SUPERVISED
    from stpp_ray.stage_setup import StageSpec

    train, val = _samples(cfg)
    stage_dir = storage / name
    shutil.rmtree(stage_dir, ignore_errors=True)
    rows = lambda samples: [[s.image_id, str(s.image_path), str(s.mask_path)] for s in samples]  # noqa: E731
    spec = StageSpec(name="teacher", stage_dir=str(stage_dir), fingerprint=f"{name}-{time.time_ns()}",
                     labeled=rows(train), val=rows(val), method="supervised", kind=SUPERVISED, epochs=cfg.train.epochs)
    called = time.time()
    fit_stage(cfg, spec, storage / "ray_train")
    returned = time.time()
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines() if line]
    last = records[-1]
    work_end = last["started_at"] + last["train_seconds"] + last.get("eval_seconds", 0.0)
    return {
        "images_per_s": [r["images_per_s"] for r in records],
        "startup_s": records[0]["started_at"] - called,
        "teardown_s": returned - work_end,
        "wall_s": returned - called,
    }
