"""Model weight files: the K ST++ checkpoints, final and best models.

A weight file is a plain dict of tensors and primitives, loaded with
``torch.load(weights_only=True)``: no pickled code is ever executed.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from .models import build_model
from .files import atomic_output
from .storage import BucketPath, location

ARCH_KEYS = ("name", "backbone", "output_stride", "aspp_channels", "num_classes", "head", "projection_channels")
# Keys an architecture record may lack (files and records written before the key existed).
ARCH_DEFAULTS = {"head": "stpp", "projection_channels": 0}


class CheckpointError(ValueError):
    """A weight file that cannot be used; the message names the file."""


def architecture(model_cfg, num_classes: int, projection_channels: int = 0) -> dict[str, Any]:
    """The fields that rebuild a model (shape and head), as stored in every weight file;
    `projection_channels`: U2PL's projection head (`Method.projection_channels`)."""
    return {
        "name": model_cfg.name,
        "backbone": model_cfg.backbone,
        "output_stride": model_cfg.output_stride,
        "aspp_channels": model_cfg.aspp_channels,
        "num_classes": num_classes,
        "head": model_cfg.resolved_head(),
        "projection_channels": projection_channels,
    }


def build_from_architecture(arch: dict) -> torch.nn.Module:
    """A freshly initialised model as an architecture record describes it."""
    arch = {**ARCH_DEFAULTS, **arch}
    return build_model(arch["name"], arch["backbone"], arch["num_classes"], output_stride=arch["output_stride"],
                       aspp_channels=arch["aspp_channels"], head=arch["head"],
                       projection_channels=arch["projection_channels"])


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside a DistributedDataParallel wrapper."""
    return getattr(model, "module", model)


def save_weights(path: str | Path, model: torch.nn.Module, arch: dict, **meta: Any) -> None:
    """Write weights atomically (temp file + rename, or one upload), so a crash never leaves half a file."""
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    with atomic_output(path) as f:
        torch.save({"format": "stpp_ray.weights/1", "arch": dict(arch), "meta": meta, "model": state}, f)


def read_weights(path: str | Path) -> dict:
    path = location(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if isinstance(path, BucketPath):
            with path.open("rb") as f:
                blob = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
        else:
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same message
        raise CheckpointError(f"{path}: not a readable stpp_ray checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(blob, dict) or blob.get("format") != "stpp_ray.weights/1":
        raise CheckpointError(f"{path}: not an stpp_ray weight file (no 'format: stpp_ray.weights/1' entry)")
    return blob


def load_model(path: str | Path, expect_arch: dict | None = None) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model a weight file describes; `expect_arch` guards against mix-ups."""
    blob = read_weights(path)
    arch = {**ARCH_DEFAULTS, **blob["arch"]}
    if expect_arch is not None:
        expect_arch = {**ARCH_DEFAULTS, **expect_arch}
        diff = {k: (arch.get(k), expect_arch[k]) for k in ARCH_KEYS if arch.get(k) != expect_arch[k]}
        if diff:
            detail = ", ".join(f"{k}: file has {a!r}, config wants {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(f"{path}: checkpoint is for another model ({detail})")
    model = build_from_architecture(arch)
    try:
        model.load_state_dict(blob["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the architecture it names: {str(err)[:300]}") from None
    model.eval()
    return model, blob
