"""Small files the tests make: seeded stand-in checkpoints and random images."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from stpp_ray.checkpoints import save_weights
from stpp_ray.models import build_model


def write_checkpoints(directory: Path, epochs: Sequence[int], arch: dict,
                      perturb: Callable[[torch.nn.Module], None] | None = None) -> list[str]:
    """One weight file per epoch (`epoch_XXX.pt`), each model initialised with the epoch as seed
    and then changed by `perturb` (under no_grad), e.g. to make predictions vary."""
    paths = []
    for epoch in epochs:
        torch.manual_seed(epoch)
        model = build_model(arch["name"], arch["backbone"], arch["num_classes"],
                            output_stride=arch["output_stride"], aspp_channels=arch["aspp_channels"])
        if perturb is not None:
            with torch.no_grad():
                perturb(model)
        path = Path(directory) / f"epoch_{epoch:03d}.pt"
        save_weights(path, model, arch, epoch=epoch)
        paths.append(str(path))
    return paths


def write_random_images(directory: Path, names: Sequence[str], sizes: Sequence[tuple[int, int]] | tuple[int, int],
                        seed: int) -> list[tuple[str, str]]:
    """Random RGB images (height, width per name, or one size for all); returns (id, path) pairs."""
    rng = np.random.default_rng(seed)
    if isinstance(sizes[0], int):
        sizes = [sizes] * len(names)
    rows = []
    for name, (h, w) in zip(names, sizes, strict=True):
        path = Path(directory) / name
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        rows.append((path.stem, str(path)))
    return rows
