"""Training, evaluation and prediction over plain PyTorch iterables (no Ray here).

Distribution is visible in two places only: the `GlobalBatchSampler`, which gives each
rank its slice of the same global batch, and the loss normalisation, which divides by
the pixel count of the whole global batch. Together they make a step with W workers
equal to a step with one worker at the same global batch size.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler
from torchvision import tv_tensors

from .augment import normalize, strong_augment, to_tv, weak_augment
from .datasets import IGNORE_INDEX, decode_mask_png, read_image, read_mask
from .losses import cross_entropy_sum
from .metrics import ConfusionMatrix
from .semi_losses import dmt_weights


@dataclass(frozen=True)
class TrainItem:
    """One training image: a labeled mask on disk or a pseudo-label as PNG bytes."""

    image_id: str
    image_path: str
    mask_path: str | None = None
    mask_png: bytes | None = None
    strong: bool = False
    conf_png: bytes | None = None  # DMT: per-pixel pseudo-label confidence, round(254 p)


def sample_seed(seed: int, epoch: int, index: int, *stream: int) -> int:
    """Per-sample augmentation seed: independent of which worker loads the sample. `stream`
    tells apart several independent draws for the same sample (e.g. unlabeled views)."""
    return int(np.random.SeedSequence([seed, epoch, index, *stream]).generate_state(1)[0])


def split_key(key: int | tuple[int, int], default_epoch: int) -> tuple[int, int]:
    """(epoch, index) of a dataset key: an `(epoch, index)` pair from a `GlobalBatchSampler`
    with `with_epoch`, or a plain index read at `default_epoch` (the dataset's `set_epoch`).
    DataLoader worker processes hold copies of the dataset that `set_epoch` in the main
    process never reaches, so training loaders pass the epoch with every index."""
    if isinstance(key, tuple):
        epoch, index = key
        return int(epoch), int(index)
    return default_epoch, int(key)


SMALL_LABELED_SET = 200


def supervised_repeats(num_labeled: int) -> int:
    """How often a supervised stage lists its labeled set per epoch: twice below
    `SMALL_LABELED_SET` images, as LiheYoung/ST-PlusPlus main.py (SupOnly mode)."""
    return 2 if num_labeled < SMALL_LABELED_SET else 1


NO_CONFIDENCE = 255  # confidence-map value of pixels whose label is not a pseudo-label


class TrainSet(Dataset):
    """Weak augmentation for every item, strong augmentation on top for pseudo-labeled ones.

    With `with_confidence` (DMT) items are (image, mask, confidence) where confidence is a
    uint8 map: round(254 p) for pseudo-labels, `NO_CONFIDENCE` for ground truth.

    Keys are `(epoch, index)` pairs (`GlobalBatchSampler(with_epoch=True)`) or plain indices
    read at the epoch of `set_epoch`. `base_size`: see `augment.RandomRescale`."""

    def __init__(self, items: Sequence[TrainItem], layout: str, crop_size: int, seed: int,
                 with_confidence: bool = False, base_size: int = 0):
        self.items = list(items)
        self.with_confidence = with_confidence
        self.layout = layout
        self.seed = seed
        self.epoch = 0
        self.weak = weak_augment(crop_size, base_size=base_size)
        self.strong = strong_augment(crop_size)

    def set_epoch(self, epoch: int) -> None:
        """The epoch of plain-index keys (in this process only)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def _mask(self, item: TrainItem) -> np.ndarray:
        if item.mask_png is not None:
            return decode_mask_png(item.mask_png)
        return read_mask(item.mask_path, self.layout)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, ...]:
        epoch, index = split_key(key, self.epoch)
        item = self.items[index]
        image, mask = to_tv(read_image(item.image_path), self._mask(item))
        extra = ()
        if self.with_confidence:
            conf = decode_mask_png(item.conf_png) if item.conf_png is not None else None
            extra = (tv_tensors.Mask(torch.from_numpy(conf) if conf is not None
                                     else torch.full(mask.shape, NO_CONFIDENCE, dtype=torch.uint8)),)
        with torch.random.fork_rng(devices=[]):  # augmentation must not disturb the model's RNG
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            image, mask, *extra = self.weak(image, mask, *extra)
            if item.strong:
                image, mask, *extra = self.strong(image, mask, *extra)
        out = (normalize(image.as_subclass(torch.Tensor)), mask.as_subclass(torch.Tensor).long())
        return out + tuple(e.as_subclass(torch.Tensor) for e in extra)


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


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this rank's share of each global batch of one seeded permutation.

    The permutation and the cut into global batches depend only on (seed, epoch,
    dataset size, global batch), so the union over ranks is the same global batch
    whatever the world size. Incomplete last batches are dropped, as in ST++.

    With `with_epoch` every index comes as an `(epoch, index)` pair: the sampler runs in
    the main process, so this carries `set_epoch` to the datasets' copies in DataLoader
    worker processes (`TrainSet`, `online.UnlabeledSet` seed augmentations with it).
    """

    def __init__(self, size: int, global_batch: int, rank: int, world_size: int, seed: int,
                 with_epoch: bool = False):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} workers")
        if size < global_batch:
            raise ValueError(f"{size} training images are fewer than one global batch of {global_batch}")
        self.size, self.global_batch = size, global_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.with_epoch = with_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.global_batch

    def __iter__(self) -> Iterator[list]:
        # Built at once, so a later set_epoch cannot change an iteration already begun.
        epoch = self.epoch
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        if self.with_epoch:
            order = [(epoch, i) for i in order]
        per_rank = self.global_batch // self.world_size
        starts = (b * self.global_batch + self.rank * per_rank for b in range(len(self)))
        return iter([order[start:start + per_rank] for start in starts])


def build_optimizer(backbone_params, head_params, lr: float, head_lr_multiplier: float,
                    momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD with the paper's 10x learning rate on the head."""
    groups = [
        {"params": list(backbone_params), "lr": lr, "initial_lr": lr},
        {"params": list(head_params), "lr": lr * head_lr_multiplier, "initial_lr": lr * head_lr_multiplier},
    ]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def poly_scheduler(optimizer: torch.optim.Optimizer, total_iters: int, power: float) -> torch.optim.lr_scheduler.LambdaLR:
    """lr = initial_lr * (1 - it / total) ** power, stepped once per iteration."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: max(0.0, 1.0 - it / max(1, total_iters)) ** power
    )


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_sum(value: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        value = value.clone()
        dist.all_reduce(value)
    return value


def dmt_loss_sum(logits: torch.Tensor, mask: torch.Tensor, confidence: torch.Tensor,
                 gammas: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """DMT's dynamically weighted CE, summed over valid pixels, and their count: pseudo-labeled
    pixels weighted by `semi_losses.dmt_weights`, ground-truth pixels by 1."""
    valid = mask != IGNORE_INDEX
    per_pixel = F.cross_entropy(logits.float(), mask.masked_fill(~valid, 0), reduction="none")
    weights = dmt_weights(logits.detach().float().softmax(1), mask, confidence.float() / (NO_CONFIDENCE - 1), *gammas)
    weights = torch.where(confidence == NO_CONFIDENCE, torch.ones_like(weights), weights)
    return (per_pixel * weights * valid).sum(), valid.sum()


def train_one_epoch(model, loader: Iterable, optimizer, scheduler, device: torch.device,
                    amp: bool = False, dmt_gammas: tuple[float, float] | None = None) -> dict[str, float]:
    """One pass over `loader`; the loss is the mean over the valid pixels of the global batch.
    With `dmt_gammas` batches carry confidences and the loss is DMT's weighted CE."""
    model.train()
    world = dist.get_world_size() if is_distributed() else 1
    loss_total = torch.zeros((), dtype=torch.float64)
    pixels_total = torch.zeros((), dtype=torch.float64)
    images = 0
    start = time.perf_counter()
    for image, mask, *confidence in loader:
        image = image.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        mask = mask.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            logits = model(image)
        if dmt_gammas is not None:
            loss_sum, count = dmt_loss_sum(logits, mask, confidence[0].to(device), dmt_gammas)
        else:
            loss_sum, count = cross_entropy_sum(logits, mask)
        global_count = global_sum(count.to(torch.float64)).clamp_min(1.0)
        # DDP averages gradients over ranks, hence the world factor: the result is
        # the gradient of (sum of all ranks' pixel losses) / (global pixel count).
        loss = loss_sum * (world / global_count.to(loss_sum.dtype))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_total += loss_sum.detach().double().cpu()
        pixels_total += count.detach().double().cpu()
        images += image.shape[0]
    seconds = time.perf_counter() - start
    stats = torch.stack([loss_total, pixels_total, torch.tensor(float(images), dtype=torch.float64)])
    stats = global_sum(stats.to(device)).cpu()
    return {
        "loss": float(stats[0] / stats[1].clamp_min(1.0)),
        "images": int(stats[2]),
        "seconds": seconds,
        "images_per_s": float(stats[2]) / seconds if seconds > 0 else math.nan,
        "lr": optimizer.param_groups[0]["lr"],
    }


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
