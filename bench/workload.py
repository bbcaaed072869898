"""The benchmark's inputs: the demo dataset, its config, and K+1 checkpoints of the demo model."""

from __future__ import annotations

from pathlib import Path

import torch

from stpp_ray.weights import architecture, build_from_architecture, save_weights
from stpp_ray.config import Config, load_config
from stpp_ray.datasets import build_samples
from stpp_ray.demo_data import ensure_demo_dataset

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "jobs" / "demo.yaml"


def bench_config(data_root: Path, overrides: list[str] = ()) -> Config:
    """The demo config with its data under `data_root` (absolute: Ray workers change directory)."""
    return load_config(DEMO_CONFIG, [f"data.root={data_root.resolve()}", *overrides])


def prepare_data(cfg: Config) -> Path:
    root = Path(cfg.data.root)
    return ensure_demo_dataset(root, seed=cfg.data.demo_seed, num_train=cfg.data.demo_num_train,
                               num_val=cfg.data.demo_num_val, image_size=cfg.data.demo_image_size)


def unlabeled_images(cfg: Config, count: int) -> list[tuple[str, str]]:
    """(id, path) of `count` training images (repeated under new ids when the split is smaller)."""
    samples = build_samples(cfg.data.layout, cfg.data.root, "ImageSets/Segmentation/train.txt", with_masks=False)
    return [(f"{samples[i % len(samples)].image_id}_{i // len(samples)}", str(samples[i % len(samples)].image_path))
            for i in range(count)]


def make_checkpoints(cfg: Config, out_dir: Path) -> list[str]:
    """K ST++ checkpoints of the demo model (differently seeded, untrained): the last is the
    labeling model. The labeling cost does not depend on what the weights learned."""
    arch = architecture(cfg.model, cfg.data.num_classes)
    paths = []
    for i, epoch in enumerate(cfg.checkpoint_epochs()):
        torch.manual_seed(1000 + i)
        model = build_from_architecture(arch).eval()
        path = out_dir / f"epoch_{int(epoch):03d}.pt"
        save_weights(path, model, arch, epoch=int(epoch), stage="bench")
        paths.append(str(path))
    return paths
