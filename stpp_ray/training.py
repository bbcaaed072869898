"""Training over plain PyTorch iterables (no Ray here): datasets, sampler, optimiser, one epoch.

Distribution is visible in two places only: the `GlobalBatchSampler`, which gives each
rank its slice of the same global batch, and the loss normalisation, which divides by
the pixel count of the whole global batch. Together they make a step with W workers
equal to a step with one worker at the same global batch size.
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler
from torchvision import tv_tensors

from .augment import normalize, strong_augment, to_tv, weak_augment
from .datasets import IGNORE_INDEX, decode_mask_png, read_image, read_mask
from .losses import cross_entropy_sum


@dataclass(frozen=True, slots=True)  # slots: a pool of 10^6 items holds no per-item dict
class TrainItem:
    """One training image: a labeled mask on disk, or a pseudo-label as PNG bytes or as a row
    of the labeling stage's shards (`pseudo_labels.ShardIndex`), read with the image's path
    (`image_path` None) when the item is loaded."""

    image_id: str
    image_path: str | None
    mask_path: str | None = None
    mask_png: bytes | None = None
    strong: bool = False
    conf_png: bytes | None = None  # DMT: per-pixel pseudo-label confidence, round(254 p)
    shards: Any = None  # the ShardIndex holding `row`
    row: int = -1
    levels: tuple[int, ...] | None = None  # DMT's curriculum: per-class confidence levels kept


def item_data(item: TrainItem, layout: str, with_confidence: bool = False) -> tuple[str, np.ndarray, np.ndarray | None]:
    """The item's image path, its mask and, with `with_confidence`, its confidence map (None for
    ground truth). Under DMT's curriculum `levels`, pixels below their class's level are 255 (ignored)."""
    image_path, mask_png, conf_png = item.image_path, item.mask_png, item.conf_png
    if item.shards is not None:
        wanted = ["image_path", "mask_png"] + (["confidence_png"] if with_confidence or item.levels else [])
        image_path, mask_png, *rest = item.shards.read(item.row, wanted)
        conf_png = rest[0] if rest else None
    if mask_png is None:
        return image_path, read_mask(item.mask_path, layout), None
    mask = decode_mask_png(mask_png)
    conf = decode_mask_png(conf_png) if conf_png is not None else None
    if item.levels is not None:
        mask = np.where(conf >= np.asarray(item.levels, dtype=np.uint8)[mask], mask, IGNORE_INDEX).astype(np.uint8)
    return image_path, mask, conf if with_confidence else None


class ItemSequence(Sequence):
    """Training items as parts, each a sequence listed some number of times, indexed without a
    list of them all (a student's labeled set repeated to match a pool of pseudo-labels)."""

    def __init__(self, *parts: tuple[Sequence[TrainItem], int]):
        self.parts = [(items, times) for items, times in parts if len(items) and times]
        self.starts = [0, *itertools.accumulate(len(items) * times for items, times in self.parts)]

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(k)
        p = bisect.bisect_right(self.starts, k) - 1
        items, _ = self.parts[p]
        return items[(k - self.starts[p]) % len(items)]


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
        self.items = items if isinstance(items, Sequence) else list(items)  # lazy sequences stay lazy
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

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, ...]:
        epoch, index = split_key(key, self.epoch)
        item = self.items[index]
        image_path, mask, conf = item_data(item, self.layout, self.with_confidence)
        image, mask = to_tv(read_image(image_path), mask)
        extra = ()
        if self.with_confidence:
            extra = (tv_tensors.Mask(torch.from_numpy(conf) if conf is not None
                                     else torch.full(mask.shape, NO_CONFIDENCE, dtype=torch.uint8)),)
        with torch.random.fork_rng(devices=[]):  # augmentation must not disturb the model's RNG
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            image, mask, *extra = self.weak(image, mask, *extra)
            if item.strong:
                image, mask, *extra = self.strong(image, mask, *extra)
        out = (normalize(image.as_subclass(torch.Tensor)), mask.as_subclass(torch.Tensor).long())
        return out + tuple(e.as_subclass(torch.Tensor) for e in extra)


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this rank's share of each global batch of one seeded permutation.

    The permutation and the cut into global batches depend only on (seed, epoch,
    dataset size, global batch), so the union over ranks is the same global batch
    whatever the world size (`rank_share`: it need not divide the batch). Incomplete
    last batches are dropped, as in ST++.

    With `with_epoch` every index comes as an `(epoch, index)` pair: the sampler runs in
    the main process, so this carries `set_epoch` to the datasets' copies in DataLoader
    worker processes (`TrainSet`, `online.UnlabeledSet` seed augmentations with it).
    """

    def __init__(self, size: int, global_batch: int, rank: int, world_size: int, seed: int,
                 with_epoch: bool = False):
        if global_batch < world_size:
            raise ValueError(f"a global batch of {global_batch} leaves some of {world_size} workers without an image")
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
        lo, hi = rank_share(self.global_batch, self.rank, self.world_size)
        return iter([order[b * self.global_batch + lo:b * self.global_batch + hi] for b in range(len(self))])


def rank_share(batch: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of `rank`'s slice of a batch: consecutive, sizes differing by at most one
    where `world_size` does not divide `batch` (an elastic group of any size)."""
    return batch * rank // world_size, batch * (rank + 1) // world_size


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


def train_one_epoch(model, loader: Iterable, optimizer, scheduler, device: torch.device,
                    amp: bool = False, criterion: Callable = cross_entropy_sum) -> dict[str, float]:
    """One pass over `loader`; the loss is the mean over the valid pixels of the global batch.
    `criterion(logits, mask, *extras)` returns the summed loss and its pixel count, the extras
    being what the batches carry after the mask (DMT's confidences)."""
    model.train()
    world = dist.get_world_size() if is_distributed() else 1
    loss_total = torch.zeros((), dtype=torch.float64)
    pixels_total = torch.zeros((), dtype=torch.float64)
    images = steps = 0
    start = time.perf_counter()
    for image, mask, *extras in loader:
        image = image.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        mask = mask.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            logits = model(image)
        loss_sum, count = criterion(logits, mask, *(e.to(device) for e in extras))
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
        steps += 1
    seconds = time.perf_counter() - start
    stats = torch.stack([loss_total, pixels_total, torch.tensor(float(images), dtype=torch.float64)])
    stats = global_sum(stats.to(device)).cpu()
    return {
        "loss": float(stats[0] / stats[1].clamp_min(1.0)),
        "images": int(stats[2]),
        "steps": steps,
        "seconds": seconds,
        "images_per_s": float(stats[2]) / seconds if seconds > 0 else math.nan,
        "lr": optimizer.param_groups[0]["lr"],
    }
