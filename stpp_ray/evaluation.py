"""Validation and prediction of full images over plain PyTorch iterables (no Ray here)."""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .augment import normalize
from .datasets import read_image, read_mask
from .metrics import ConfusionMatrix


class EvalSet(Dataset):
    """Full-size validation images with their masks (batch them with `collate_pairs`: a split
    may mix sizes)."""

    def __init__(self, samples: Sequence, layout: str):
        self.samples = list(samples)
        self.layout = layout

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.samples[index]
        image = torch.from_numpy(read_image(s.image_path)).permute(2, 0, 1).contiguous()
        mask = torch.from_numpy(read_mask(s.mask_path, self.layout)).long()
        return normalize(image), mask


def collate_pairs(batch: list) -> list:
    """DataLoader collate of validation items: the list of (image, mask) pairs as they are, any
    sizes (`evaluate` runs each size as one forward pass)."""
    return list(batch)


def same_size_groups(batch) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images B x C x H x W, masks B x H x W) of one loader batch, per image size: a default-
    collated [images, masks] batch as it is, a `collate_pairs` list stacked per size."""
    if isinstance(batch[0], torch.Tensor):
        yield batch[0], batch[1]
        return
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (image, _) in enumerate(batch):
        groups.setdefault(tuple(image.shape), []).append(i)
    for indices in groups.values():
        yield torch.stack([batch[i][0] for i in indices]), torch.stack([batch[i][1] for i in indices])


EVAL_MODES = ("whole", "sliding", "center_crop")


def window_stride(window: int) -> int:
    """UniMatch's sliding-window stride: int(2/3 window)."""
    return max(1, int(window * 2 / 3))


def window_starts(size: int, window: int) -> list[int]:
    """Window origins along one axis as UniMatch's sliding-window evaluation (LiheYoung/UniMatch
    supervised.py `evaluate`): 0, s, 2s, ... below `size` with s = `window_stride`; each window
    ends at min(size, start + window), so edge windows are smaller and an image smaller than
    the window is one window, the image itself (no padding)."""
    return list(range(0, size, window_stride(window)))


@torch.inference_mode()
def sliding_window_probs(model, image: torch.Tensor, window: int) -> torch.Tensor:
    """Softmax B x C x H x W averaged over the `window_starts` windows covering each pixel.

    UniMatch sums the windows' softmax and takes the argmax; dividing by the per-pixel window
    count keeps that argmax and makes the result probabilities."""
    h, w = image.shape[-2:]
    total, count = None, torch.zeros((h, w), device=image.device)
    for top in window_starts(h, window):
        for left in window_starts(w, window):
            rows, cols = slice(top, top + window), slice(left, left + window)
            logits = model(image[:, :, rows, cols].contiguous(memory_format=torch.channels_last))
            if total is None:
                total = torch.zeros((image.shape[0], logits.shape[1], h, w), device=image.device)
            total[:, :, rows, cols] += logits.float().softmax(1)
            count[rows, cols] += 1
    return total / count


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The central size x size region of the last two dimensions (a dimension shorter than
    `size` is kept whole)."""
    h, w = x.shape[-2:]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return x[..., top:top + size, left:left + size]


@torch.inference_mode()
def evaluate(model, loader: Iterable, num_classes: int, device: torch.device, mode: str = "whole",
             window: int = 0) -> ConfusionMatrix:
    """Confusion matrix over `loader`, summed across ranks when distributed.

    `mode` (`eval.mode`): `whole` forwards each full image, `sliding` predicts it by
    `sliding_window_probs` with `window`-pixel windows, `center_crop` scores only its central
    `window` x `window` crop. Batches are [images, masks] tensors or `collate_pairs` lists of
    any sizes; each size is one forward pass, so the batch size does not change the result."""
    if mode not in EVAL_MODES:
        raise ValueError(f"unknown evaluation mode {mode!r}; expected one of {EVAL_MODES}")
    if mode != "whole" and window < 1:
        raise ValueError(f"evaluation mode {mode!r} needs a window of at least 1 pixel, got {window}")
    model.eval()
    cm = ConfusionMatrix(num_classes)
    for batch in loader:
        for image, mask in same_size_groups(batch):
            if mode == "center_crop":
                image, mask = center_crop(image, window), center_crop(mask, window)
            image = image.to(device)
            if mode == "sliding":
                pred = sliding_window_probs(model, image, window).argmax(1)
            else:
                pred = model(image.contiguous(memory_format=torch.channels_last)).argmax(1)
            cm.update(pred.cpu(), mask)
    cm.all_reduce()
    return cm


@torch.inference_mode()
def predict_probs(model, image: torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = False,
                  window: int = 0) -> torch.Tensor:
    """Softmax probabilities B x C x H x W, summed over scales (and horizontal flips).

    As ST++'s test-time augmentation (LiheYoung/ST-PlusPlus model/semseg/base.py, `forward`
    with tta=True): the input is resized to int(h*s) x int(w*s), the softmax is taken at that
    scale (the flipped view's flipped back) and the probabilities are resized to h x w,
    bilinear with align_corners=True. `window` > 0 predicts each view by sliding windows."""
    model.eval()
    h, w = image.shape[-2:]
    total = None
    for scale in scales:
        size = (max(1, int(h * scale)), max(1, int(w * scale)))
        x = image if size == (h, w) else F.interpolate(image, size=size, mode="bilinear", align_corners=True)
        for flipped in (False, True) if flip else (False,):
            view = x.flip(-1) if flipped else x
            if window > 0:
                probs = sliding_window_probs(model, view, window)
            else:
                probs = model(view.contiguous(memory_format=torch.channels_last)).float().softmax(1)
            if flipped:
                probs = probs.flip(-1)
            if probs.shape[-2:] != (h, w):
                probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=True)
            total = probs if total is None else total + probs
    return total
