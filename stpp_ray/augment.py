"""ST++ paired image/mask augmentations built on torchvision.transforms.v2.

Inputs are a ``tv_tensors.Image`` (uint8, CxHxW) and a ``tv_tensors.Mask``
(HxW, uint8 class indices with 255 = ignore; other integer dtypes are kept
as given). The mask may be ``None`` (unlabeled image) and is then passed
through. All randomness comes from torch's global RNG, so
``torch.manual_seed(s)`` right before a call reproduces that call.

Behaviour of v2 (torchvision 0.29) that this module relies on or works around:

* ``RandomCrop(fill=0)`` also pads masks with 0 (a real class), so the fill
  is given per type: image 0, mask 255.
* ``RandomCrop(pad_if_needed=True)`` pads the missing amount on *both* sides
  and then crops at a random offset, so a small image lands at a random place
  inside the crop (the ST++ reference pads only right/bottom).
* ``resize`` always uses nearest-neighbour for masks; we ask for
  NEAREST_EXACT, which samples pixel centres like bilinear does and so keeps
  mask and image aligned.
* Colour ops and ``GaussianBlur`` pass masks through unchanged.
* ``RandomErasing`` passes masks through (with a warning) and its random
  fill is float noise, so Cutout is a small custom transform.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .datasets import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PairTransform = Callable[[tv_tensors.Image, "tv_tensors.Mask | None"], tuple[tv_tensors.Image, "tv_tensors.Mask | None"]]

BLUR_SIGMA = (0.1, 2.0)
CUTOUT_AREA = (0.02, 0.4)
CUTOUT_ASPECT = (0.3, 1 / 0.3)


class RandomRescale(v2.Transform):
    """Resize by a random ratio of the input's own size (bilinear image, nearest mask)."""

    def __init__(self, scale_range: Sequence[float] = (0.5, 2.0)):
        super().__init__()
        low, high = scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        self.scale_range = (float(low), float(high))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        ratio = torch.empty(()).uniform_(*self.scale_range).item()
        return {"size": [max(1, round(height * ratio)), max(1, round(width * ratio))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            mode = v2.InterpolationMode.NEAREST_EXACT
        else:
            mode = v2.InterpolationMode.BILINEAR
        return self._call_kernel(F.resize, inpt, params["size"], interpolation=mode, antialias=True)


class Cutout(v2.Transform):
    """With probability p, fill one random rectangle of the image with random
    pixel values and set the same rectangle to 255 (ignore) in the mask."""

    def __init__(self, p: float = 0.5, area: Sequence[float] = CUTOUT_AREA, aspect: Sequence[float] = CUTOUT_ASPECT):
        super().__init__()
        self.p = p
        self.area = tuple(area)
        self.aspect = tuple(aspect)

    def _box_size(self, height: int, width: int) -> tuple[int, int]:
        # Redraw until the box fits (as the ST++ reference does); clamp as a fallback.
        for _ in range(10):
            area = height * width * torch.empty(()).uniform_(*self.area).item()
            aspect = torch.empty(()).uniform_(*self.aspect).item()
            box_h = int(math.sqrt(area * aspect))
            box_w = int(math.sqrt(area / aspect))
            if box_h <= height and box_w <= width:
                break
        return max(1, min(box_h, height)), max(1, min(box_w, width))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        if torch.rand(()).item() >= self.p:
            return {"box": None}
        channels, height, width = v2.query_chw(flat_inputs)
        box_h, box_w = self._box_size(height, width)
        top = int(torch.randint(0, height - box_h + 1, ()))
        left = int(torch.randint(0, width - box_w + 1, ()))
        values = torch.randint(0, 256, (channels, box_h, box_w), dtype=torch.uint8)
        return {"box": (top, left, box_h, box_w), "values": values}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["box"] is None:
            return inpt
        if isinstance(inpt, tv_tensors.Mask):
            fill = torch.tensor(IGNORE_INDEX, dtype=inpt.dtype)
        elif isinstance(inpt, tv_tensors.Image):
            fill = params["values"].to(inpt.dtype)
        else:
            return inpt
        top, left, box_h, box_w = params["box"]
        # F.erase has no Mask kernel, so erase the plain tensor and re-wrap it.
        out = F.erase(inpt.as_subclass(torch.Tensor), top, left, box_h, box_w, fill)
        return tv_tensors.wrap(out, like=inpt)


def blur_kernel_size(crop_size: int, max_sigma: float = BLUR_SIGMA[1]) -> int:
    """Odd Gaussian kernel size: +-3 sigma at the largest sigma, capped by the crop.

    sigma is in pixels (like the reference's PIL ``GaussianBlur(radius=sigma)``),
    so the kernel must cover the Gaussian, not a fraction of the crop: 13 taps
    hold 99.7% of the weight at sigma 2.0. A crop-proportional kernel (SimCLR's
    10% rule) would only add zero-weight taps at ST++ crop sizes (321-769).
    The cap keeps the kernel within the crop, as reflect padding requires.
    """
    size = 2 * math.ceil(3 * max_sigma) + 1
    largest_odd = crop_size if crop_size % 2 else crop_size - 1
    return max(1, min(size, largest_odd))


def weak_augment(crop_size: int, scale_range: Sequence[float] = (0.5, 2.0)) -> PairTransform:
    """Random rescale, random crop (pad: image 0, mask 255), horizontal flip p=0.5.

    Returns a callable ``(image, mask) -> (image, mask)``.
    """
    return v2.Compose([
        RandomRescale(scale_range),
        v2.RandomCrop(
            crop_size,
            pad_if_needed=True,
            fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX},
        ),
        v2.RandomHorizontalFlip(p=0.5),
    ])


def strong_augment(crop_size: int, cutout: bool = True) -> PairTransform:
    """Colour jitter, grayscale, blur and (unless `cutout` is off, as in UniMatch, which
    uses CutMix instead) Cutout; applied after ``weak_augment``.

    Returns a callable ``(image, mask) -> (image, mask)``; only Cutout changes the mask.
    """
    ops = [
        v2.RandomApply([v2.ColorJitter(0.5, 0.5, 0.5, 0.25)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(blur_kernel_size(crop_size), sigma=BLUR_SIGMA)], p=0.5),
    ]
    return v2.Compose(ops + [Cutout(p=0.5)] if cutout else ops)


def cutmix_box(size: int, p: float = 0.5) -> torch.Tensor:
    """UniMatch's CutMix region: with probability p one random box (area 2-40% of the square
    crop, aspect 0.3-3.3, drawn as Cutout's) set to True in a `size` x `size` bool map."""
    box = torch.zeros(size, size, dtype=torch.bool)
    if torch.rand(()).item() >= p:
        return box
    box_h, box_w = Cutout()._box_size(size, size)
    top = int(torch.randint(0, size - box_h + 1, ()))
    left = int(torch.randint(0, size - box_w + 1, ()))
    box[top:top + box_h, left:left + box_w] = True
    return box


def normalize(image: torch.Tensor) -> torch.Tensor:
    """uint8 CxHxW or BxCxHxW -> float32 normalized with the ImageNet mean/std."""
    if image.dtype != torch.uint8 or image.ndim not in (3, 4):
        raise ValueError(f"expected a uint8 CxHxW or BxCxHxW tensor, got {image.dtype} {tuple(image.shape)}")
    image = image.as_subclass(torch.Tensor)
    scaled = F.to_dtype(image, torch.float32, scale=True)
    return F.normalize(scaled, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))


def to_tv(image_np: np.ndarray, mask_np: np.ndarray | None) -> tuple[tv_tensors.Image, tv_tensors.Mask | None]:
    """HxWx3 uint8 image and HxW uint8 mask (or None) -> tv_tensors (copies)."""
    if image_np.ndim != 3 or image_np.shape[2] != 3 or image_np.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got {image_np.dtype} {image_np.shape}")
    image = tv_tensors.Image(torch.tensor(image_np).permute(2, 0, 1).contiguous())
    if mask_np is None:
        return image, None
    if mask_np.ndim != 2 or mask_np.dtype != np.uint8:
        raise ValueError(f"expected an HxW uint8 mask, got {mask_np.dtype} {mask_np.shape}")
    if mask_np.shape != image_np.shape[:2]:
        raise ValueError(f"mask shape {mask_np.shape} differs from image shape {image_np.shape[:2]}")
    return image, tv_tensors.Mask(torch.tensor(mask_np))
