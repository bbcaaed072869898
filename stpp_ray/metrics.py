"""Confusion-matrix segmentation metrics (mIoU, pixel accuracy)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.distributed as dist

from .datasets import IGNORE_INDEX


def _to_numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _check_range(values: np.ndarray, num_classes: int, what: str) -> None:
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        bad = values[(values < 0) | (values >= num_classes)][0]
        raise ValueError(f"{what} value {bad} outside [0, {num_classes})")


class ConfusionMatrix:
    """Counts of (target, prediction) pairs; rows are targets, columns predictions."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def reset(self) -> None:
        self.matrix[:] = 0

    def update(self, pred, target) -> None:
        """Add a batch of integer predictions and targets (same shape, any layout)."""
        pred, target = _to_numpy(pred), _to_numpy(target)
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {pred.shape} != target shape {target.shape}")
        for name, a in (("prediction", pred), ("target", target)):
            if a.dtype.kind not in "iub":
                raise ValueError(f"{name} must hold integers, got dtype {a.dtype}")
        pred, target = pred.astype(np.int64).ravel(), target.astype(np.int64).ravel()
        _check_range(pred, self.num_classes, "prediction")
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        _check_range(target, self.num_classes, "target")
        n = self.num_classes
        self.matrix += np.bincount(target * n + pred, minlength=n * n).reshape(n, n)

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another matrix's counts (same number of classes)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
        self.matrix += other.matrix
        return self

    def all_reduce(self) -> "ConfusionMatrix":
        """Sum counts over torch.distributed ranks; no-op without a process group."""
        if not (dist.is_available() and dist.is_initialized()):
            return self
        device = "cpu"
        if dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
            device = torch.device("cuda", torch.cuda.current_device())
        counts = torch.from_numpy(self.matrix).to(device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        self.matrix = counts.cpu().numpy().astype(np.int64)
        return self

    def iou(self) -> np.ndarray:
        """Per-class IoU; NaN for classes absent from both predictions and targets."""
        inter = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(0) + self.matrix.sum(1) - inter
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, inter / union, np.nan)

    def miou(self) -> float:
        """Mean IoU over classes with a defined IoU (NaN if none)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slice
            return float(np.nanmean(self.iou()))

    def pixel_accuracy(self) -> float:
        """Fraction of counted pixels predicted correctly (NaN if none)."""
        total = self.matrix.sum()
        return float(np.trace(self.matrix) / total) if total else float("nan")
