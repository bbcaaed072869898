"""`stpp-ray predict`: segment image files with a saved model.

For each image it writes ``<stem>_mask.png`` (a palette PNG whose pixel values are the
class ids, shown in VOC colours) and ``<stem>_overlay.png`` (the image with the mask
blended in).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .augment import normalize
from .config import TTA_SCALES
from .weights import load_model
from .datasets import read_image
from .evaluation import predict_probs
from .datasets import VOC_COLORS
from .plots import overlay



def tta_settings(tta: bool) -> tuple[tuple[float, ...], bool]:
    """(scales, flip) for plain or test-time-augmented inference."""
    return (TTA_SCALES, True) if tta else ((1.0,), False)


def predict_mask(model: torch.nn.Module, image: np.ndarray, device: torch.device, *, tta: bool = False,
                 window: int = 0) -> np.ndarray:
    """HxWx3 uint8 RGB image -> HxW uint8 class ids; `window` > 0: by sliding windows of that size
    (as `eval.mode=sliding`)."""
    x = normalize(torch.from_numpy(image).permute(2, 0, 1).contiguous()).unsqueeze(0).to(device)
    scales, flip = tta_settings(tta)
    probs = predict_probs(model, x, scales, flip, window=window)
    return probs.argmax(1)[0].to(torch.uint8).cpu().numpy()


def save_palette_mask(mask: np.ndarray, path: str | Path) -> Path:
    """Write class ids as a palette ("P") PNG with the VOC colours."""
    img = Image.fromarray(np.asarray(mask, dtype=np.uint8))  # mode L
    img.putpalette(VOC_COLORS.tobytes())  # L -> P, pixel values unchanged
    img.save(path, format="PNG")
    return Path(path)


def _output_stems(images: Sequence[Path]) -> list[str]:
    """File stems, made unique (`x`, `x_2`, ...) so same-named inputs do not overwrite each other."""
    seen: dict[str, int] = {}
    stems = []
    for path in images:
        n = seen.get(path.stem, 0) + 1
        seen[path.stem] = n
        stems.append(path.stem if n == 1 else f"{path.stem}_{n}")
    return stems


def _check_inputs(images: Sequence[Path]) -> None:
    """Fail before loading the model when an input file is missing (read_image names it)."""
    for path in images:
        if not path.is_file():
            read_image(path)  # raises DatasetError naming the file


def _predict_one(model, image_path: Path, stem: str, out_dir: Path, device: torch.device, tta: bool,
                 window: int) -> dict:
    start = time.perf_counter()
    image = read_image(image_path)  # any mode (gray, palette, RGBA, ...) as RGB; each image at its own size
    mask = predict_mask(model, image, device, tta=tta, window=window)
    mask_path = save_palette_mask(mask, out_dir / f"{stem}_mask.png")
    overlay_path = out_dir / f"{stem}_overlay.png"
    Image.fromarray(overlay(image, mask)).save(overlay_path, format="PNG")
    return {
        "image": str(image_path),
        "mask": str(mask_path),
        "overlay": str(overlay_path),
        "classes_present": [int(c) for c in np.unique(mask)],
        "seconds": time.perf_counter() - start,
    }


def predict_images(checkpoint: str | Path, images: Sequence[str | Path], out_dir: str | Path, *,
                   tta: bool = False, device: str = "cpu", window: int = 0) -> list[dict]:
    """Segment each image with the checkpoint's model; one result dict per image, in order.
    `window` > 0: sliding-window inference with windows of that many pixels."""
    paths = [Path(p) for p in images]
    _check_inputs(paths)
    dev = torch.device(device)
    model, _ = load_model(checkpoint)
    model = model.to(dev).eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [_predict_one(model, p, stem, out, dev, tta, window) for p, stem in zip(paths, _output_stems(paths))]
