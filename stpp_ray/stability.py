"""ST++ image-level stability: agreement of earlier checkpoints with the final one."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def _as_int_array(a, num_classes: int) -> np.ndarray:
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    if a.dtype.kind not in "iu":
        raise ValueError(f"predictions must hold integers, got dtype {a.dtype}")
    if a.size and (a.min() < 0 or a.max() >= num_classes):
        raise ValueError(f"prediction values must lie in [0, {num_classes})")
    return a.astype(np.int64)


def image_miou(pred, ref, num_classes: int) -> float:
    """Mean IoU of `pred` against `ref` over classes present in either (NaN if none)."""
    pred, ref = _as_int_array(pred, num_classes), _as_int_array(ref, num_classes)
    if pred.shape != ref.shape:
        raise ValueError(f"shape mismatch: {pred.shape} vs {ref.shape}")
    n = num_classes
    hist = np.bincount(pred.ravel() * n + ref.ravel(), minlength=n * n).reshape(n, n)
    inter = np.diag(hist).astype(np.float64)
    union = hist.sum(0) + hist.sum(1) - inter
    present = union > 0
    return float(np.mean(inter[present] / union[present])) if present.any() else float("nan")


def checkpoint_ious(preds: Sequence, num_classes: int) -> list[float]:
    """image_miou of each earlier checkpoint's prediction against the last one."""
    if len(preds) == 0:
        raise ValueError("need at least one prediction")
    return [image_miou(p, preds[-1], num_classes) for p in preds[:-1]]


def stability_score(preds: Sequence, num_classes: int) -> float:
    """Mean of checkpoint_ious (higher = more stable = more reliable); NaN for one checkpoint."""
    values = checkpoint_ious(preds, num_classes)
    if not values:
        return float("nan")
    return float(np.mean(values))


def stability_for_checkpoints(ious_by_epoch: dict[int, float], epochs: Sequence[int]) -> float:
    """The stability score with the K checkpoints at `epochs` (the last the final one), from
    stored IoUs of earlier checkpoints vs the final one: equals `stability_score` of those K
    checkpoints' predictions, so one labeling pass over a union of checkpoints serves every K."""
    stored = np.fromiter(ious_by_epoch.values(), np.float64, len(ious_by_epoch))
    at = np.fromiter(ious_by_epoch.keys(), np.int64, len(ious_by_epoch))
    try:
        return float(stability_of_rows(stored, at, np.array([0, len(stored)]), epochs)[0])
    except KeyError as err:
        raise KeyError(err.args[1]) from None


def stability_of_rows(ious: np.ndarray, at: np.ndarray, offsets: np.ndarray, epochs: Sequence[int]) -> np.ndarray:
    """`stability_for_checkpoints` of many images at once: image i stored the IoUs
    `ious[offsets[i]:offsets[i + 1]]` of its checkpoints at epochs `at[...]` (the same slice).
    KeyError(image, message) for the first image without an IoU for one of `epochs`."""
    earlier = list(epochs)[:-1]
    n = len(offsets) - 1
    if not earlier:
        return np.full(n, np.nan)
    image = np.repeat(np.arange(n), np.diff(offsets))
    values, stored_at = ious[offsets[0]:offsets[-1]], at[offsets[0]:offsets[-1]]
    table = np.full((n, len(earlier)), np.nan)
    found = np.zeros((n, len(earlier)), bool)
    for j, epoch in enumerate(earlier):
        hit = stored_at == epoch
        table[image[hit], j] = values[hit]
        found[image[hit], j] = True
    complete = found.all(axis=1)
    if not complete.all():
        i = int(np.argmin(complete))
        missing = [e for j, e in enumerate(earlier) if not found[i, j]]
        raise KeyError(i, f"no stored IoU for checkpoint epoch(s) {missing} "
                          f"(stored: {sorted(at[offsets[i]:offsets[i + 1]].tolist())})")
    return table.mean(axis=1)  # per row as np.mean of its list: the same pairwise sum


def batched_checkpoint_ious(preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """K x B x H x W int predictions -> B x (K-1) float64 checkpoint IoUs, one bincount."""
    if preds.dim() != 4:
        raise ValueError(f"expected K x B x H x W predictions, got shape {tuple(preds.shape)}")
    if preds.dtype.is_floating_point or preds.dtype == torch.bool:
        raise ValueError(f"predictions must hold integers, got dtype {preds.dtype}")
    k, b = preds.shape[:2]
    n = num_classes
    preds = preds.long()
    if preds.numel() and (preds.min() < 0 or preds.max() >= n):
        raise ValueError(f"prediction values must lie in [0, {n})")
    # Each (checkpoint, image) pair gets its own n x n block of the histogram.
    pair = torch.arange((k - 1) * b, device=preds.device).view(k - 1, b, 1, 1)
    index = (pair * n + preds[:-1]) * n + preds[-1:]
    hist = torch.bincount(index.flatten(), minlength=(k - 1) * b * n * n).view(k - 1, b, n, n)
    hist = hist.double()
    inter = hist.diagonal(dim1=-2, dim2=-1)
    union = hist.sum(-1) + hist.sum(-2) - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.nan)
    return iou.nanmean(dim=-1).T.contiguous()
