"""ST++ paired image/mask augmentations built on torchvision.transforms.v2.

Inputs are a ``tv_tensors.Image`` (uint8, CxHxW) and a ``tv_tensors.Mask``
(HxW, uint8 class indices with 255 = ignore; other integer dtypes are kept
as given). The mask may be ``None`` (unlabeled image) and is then passed
through. All randomness comes from torch's global RNG, so
``torch.manual_seed(s)`` right before a call reproduces that call.

Behaviour of v2 (torchvision 0.29) that this module relies on or works around:

* ``RandomCrop(fill=0)`` also pads masks with 0 (a real class), so the fill
  is given per type: image 0, mask 255.
* ``RandomCrop(pad_if_needed=True)`` pads the missing amount on *both* sides,
  so a small image would land at a random place inside the crop; the ST++
  reference (dataset/transform.py ``crop``) pads only right and bottom, hence
  ``PadToSize`` before the crop.
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


class PadToSize(v2.Transform):
    """Pad the right and bottom up to `size` (image 0, mask 255), as ST++'s `crop`
    (LiheYoung/ST-PlusPlus dataset/transform.py); larger sides are left alone."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        return {"padding": [0, 0, max(0, self.size - width), max(0, self.size - height)]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not any(params["padding"]) or not isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask)):
            return inpt
        fill = IGNORE_INDEX if isinstance(inpt, tv_tensors.Mask) else 0
        return self._call_kernel(F.pad, inpt, params["padding"], fill=fill)


class RandomRescale(v2.Transform):
    """Resize so that the long side is a random integer in [int(low B), int(high B)] (both
    included), B = `base_size`, or the input's own long side when `base_size` is 0; the short
    side keeps the aspect ratio, rounded half up (bilinear image, nearest mask).

    This is the law of `resize` in LiheYoung/ST-PlusPlus dataset/transform.py (B = 400 for
    Pascal, 2048 for Cityscapes, dataset/semi.py) and, with B = 0, of LiheYoung/UniMatch
    dataset/transform.py `resize` (B = max(h, w) of the image)."""

    def __init__(self, scale_range: Sequence[float] = (0.5, 2.0), base_size: int = 0):
        super().__init__()
        low, high = scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        if base_size < 0:
            raise ValueError(f"base_size must be >= 0 (0 = the image's own long side), got {base_size}")
        self.scale_range = (float(low), float(high))
        self.base_size = int(base_size)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        base = self.base_size or max(height, width)
        low, high = int(base * self.scale_range[0]), int(base * self.scale_range[1])
        long_side = max(1, int(torch.randint(low, high + 1, ())))
        if height > width:
            size = [long_side, int(1.0 * width * long_side / height + 0.5)]
        else:
            size = [int(1.0 * height * long_side / width + 0.5), long_side]
        return {"size": [max(1, size[0]), max(1, size[1])]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            mode = v2.InterpolationMode.NEAREST_EXACT
        else:
            mode = v2.InterpolationMode.BILINEAR
        return self._call_kernel(F.resize, inpt, params["size"], interpolation=mode, antialias=True)


# On square crops a try fits with probability ~0.28 (Cutout), >= 0.06 (a CutMix box of 40% area).
_MAX_BOX_TRIES = 10_000


def _uniform(low: float, high: float) -> float:
    return torch.empty(()).uniform_(low, high).item()


def fitting_box(height: int, width: int, area: Sequence[float] = CUTOUT_AREA, aspect: Sequence[float] = CUTOUT_ASPECT,
                redraw_area: bool = True) -> tuple[int, int, int, int]:
    """(top, left, box_h, box_w) by rejection, as the references: draw the area (a fraction
    in `area` of height x width), the aspect h/w in `aspect`, sides int(sqrt(area*aspect))
    and int(sqrt(area/aspect)), and a top-left corner anywhere in the image, until the box
    lies inside it. `redraw_area`: every try draws a new area (ST++'s Cutout, which so
    favours small boxes); otherwise the area is drawn once (UniMatch's CutMix box). Sides
    may be 0 on tiny images, as there. After `_MAX_BOX_TRIES` (practically never) the last
    box is clamped into the image."""
    size = height * width * _uniform(*area)
    for _ in range(_MAX_BOX_TRIES):
        if redraw_area:
            size = height * width * _uniform(*area)
        ratio = _uniform(*aspect)
        box_w, box_h = int(math.sqrt(size / ratio)), int(math.sqrt(size * ratio))
        left, top = int(torch.randint(0, width, ())), int(torch.randint(0, height, ()))
        if left + box_w <= width and top + box_h <= height:
            return top, left, box_h, box_w
    box_h, box_w = min(box_h, height), min(box_w, width)
    return min(top, height - box_h), min(left, width - box_w), box_h, box_w


class Cutout(v2.Transform):
    """With probability p, fill one random rectangle of the image with random
    pixel values and set the same rectangle to 255 (ignore) in the mask.

    The law of `cutout` in LiheYoung/ST-PlusPlus dataset/transform.py: size and place
    redrawn together until the box fits (`fitting_box`), values uniform in 0..254
    (uniform(0, 255) floats cast to uint8 there)."""

    def __init__(self, p: float = 0.5, area: Sequence[float] = CUTOUT_AREA, aspect: Sequence[float] = CUTOUT_ASPECT):
        super().__init__()
        self.p = p
        self.area = tuple(area)
        self.aspect = tuple(aspect)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        if torch.rand(()).item() >= self.p:
            return {"box": None}
        channels, height, width = v2.query_chw(flat_inputs)
        top, left, box_h, box_w = fitting_box(height, width, self.area, self.aspect)
        values = torch.randint(0, 255, (channels, box_h, box_w), dtype=torch.uint8)
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


def weak_augment(crop_size: int, scale_range: Sequence[float] = (0.5, 2.0), base_size: int = 0) -> PairTransform:
    """Random rescale (`RandomRescale`: long side scale_range x `base_size`, 0 = the image's
    own long side), random crop (pad: image 0, mask 255), horizontal flip p=0.5.

    Returns a callable ``(image, mask) -> (image, mask)``.
    """
    return v2.Compose([
        RandomRescale(scale_range, base_size),
        PadToSize(crop_size),
        v2.RandomCrop(crop_size),
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
    """UniMatch's CutMix region: with probability p one random box set to True in a `size` x
    `size` bool map; the law of `obtain_cutmix_box` (LiheYoung/UniMatch dataset/transform.py):
    area 2-40% of the crop drawn once, then aspect 0.3-3.3 and place redrawn until it fits."""
    box = torch.zeros(size, size, dtype=torch.bool)
    if torch.rand(()).item() >= p:
        return box
    top, left, box_h, box_w = fitting_box(size, size, redraw_area=False)
    box[top:top + box_h, left:left + box_w] = True
    return box


def half_box(size: int, p: float = 0.5) -> torch.Tensor:
    """U2PL's CutMix region: with probability p a box of half the crop's area, width drawn
    in (size/2, size), at a random place (True inside)."""
    box = torch.zeros(size, size, dtype=torch.bool)
    if torch.rand(()).item() >= p or size < 3:
        return box
    width = int(torch.randint(size // 2 + 1, size, ()))
    height = min(size, round(size * size / 2 / width))
    top = int(torch.randint(0, size - height + 1, ()))
    left = int(torch.randint(0, size - width + 1, ()))
    box[top:top + height, left:left + width] = True
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
