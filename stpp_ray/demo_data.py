"""Deterministic embedded demo dataset in the Pascal VOC segmentation layout.

Images are 64x64 (by default) scenes of handwritten digit glyphs taken from
scikit-learn's bundled ``load_digits`` set, pasted onto textured, cluttered
backgrounds.  Digits 0-4 are the five object classes; digits 5-9 are pasted
as well but labeled background (distractors), so a model has to recognise
shapes rather than "anything that stands out".  Train and val scenes use
disjoint glyph instances.

Every scene has a difficulty level (easy / medium / hard) that controls
object size and count, distractors, clutter, contrast, occlusion, blur and
noise; levels and factors are recorded in ``demo_info.json``.  Class "four"
is deliberately rare.

Label conventions:

* ``SegmentationClass/*.png`` are palette PNGs with the VOC colormap; pixel
  values are class indices.  Like VOC, a 1-px ignore band (255) outlines
  objects: it covers background pixels 4-adjacent to an object, and one side
  (the lower class index) of interfaces between two touching object classes,
  so it never eats into an object except where two objects touch.
* ``ImageSets/Segmentation/{1_16,1_8}/labeled.txt`` are nested,
  class-balanced-ish subsets of the training pool (N/16 and N/8 images);
  ``unlabeled.txt`` is the rest of the pool.  ``full/labeled.txt`` lists the
  whole pool (the fully supervised oracle) and ``full/unlabeled.txt`` repeats
  ``1_16/unlabeled.txt`` so tools that refuse empty splits still work.
  ``train.txt`` (whole pool) and ``val.txt`` are written as well.
* ``.demo_complete`` is written last; ``ensure_demo_dataset`` trusts a
  directory only when that marker matches the requested parameters.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from .datasets import IGNORE_INDEX, VOC_PALETTE
from .files import locked, write_text_atomic

__all__ = [
    "DEMO_CLASSES",
    "DEMO_NUM_CLASSES",
    "VOC_PALETTE",
    "generate_demo_dataset",
    "ensure_demo_dataset",
]

GENERATOR_VERSION = 4
DEMO_CLASSES: tuple[str, ...] = ("background", "zero", "one", "two", "three", "four")
DEMO_NUM_CLASSES: int = len(DEMO_CLASSES)
OBJECT_DIGITS = (0, 1, 2, 3, 4)  # class k (1..5) is digit k-1
DISTRACTOR_DIGITS = (5, 6, 7, 8, 9)  # pasted, labeled background
# Sampling weight of each object class; "four" is the rare class.
CLASS_WEIGHTS = (1.0, 1.0, 1.0, 1.0, 0.4)
RARE_CLASS = "four"
# Typical hue of each object class (used with probability hue_cue_p per level): a
# colour cue that a model can pick up from few labels on clear images, while shape
# remains the only cue on the rest and against distractors, whose hue is random.
CLASS_HUES = (0.0, 0.2, 0.4, 0.6, 0.8)
DIFFICULTY_LEVELS = ("easy", "medium", "hard")
DIFFICULTY_PROBS = (0.45, 0.35, 0.20)
GLYPH_TRAIN_FRACTION = 0.7
MARKER_NAME = ".demo_complete"
INFO_NAME = "demo_info.json"

# Sizes are fractions of the image side; ranges are inclusive (lo, hi).
_LEVELS = {
    "easy": dict(
        objects=(1, 2), distractors=(0, 0), size=(0.5, 0.65),
        contrast=(0.7, 1.0), clutter=(0, 0), clutter_amp=(0.1, 0.2),
        blur=(0.0, 0.2), noise=(0.0, 0.01), texture_p=0.0, cluster_p=0.0, hue_cue_p=0.9,
    ),
    "medium": dict(
        objects=(1, 2), distractors=(0, 1), size=(0.38, 0.52),
        contrast=(0.45, 0.7), clutter=(0, 1), clutter_amp=(0.2, 0.4),
        blur=(0.2, 0.5), noise=(0.01, 0.03), texture_p=0.2, cluster_p=0.2, hue_cue_p=0.6,
    ),
    "hard": dict(
        objects=(2, 4), distractors=(1, 3), size=(0.25, 0.4),
        contrast=(0.15, 0.35), clutter=(1, 3), clutter_amp=(0.4, 0.8),
        blur=(0.4, 0.9), noise=(0.03, 0.07), texture_p=0.6, cluster_p=0.7, hue_cue_p=0.2,
    ),
}
_CLUTTER_KINDS = ("noise", "grating", "blobs", "strokes", "checker")




# --------------------------------------------------------------------------
# Glyph bank
# --------------------------------------------------------------------------


def _digits_csv() -> Path | None:
    """Path of scikit-learn's bundled digits file, located without importing sklearn."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    return path if path.is_file() else None


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 1797 8x8 digits scaled to [0, 1], and their labels."""
    # Reading the bundled CSV directly (what load_digits does) avoids the
    # multi-second `import sklearn` on a cold start.
    path = _digits_csv()
    if path is not None:
        raw = np.loadtxt(path, delimiter=",")
        pixels, target = raw[:, :-1], raw[:, -1].astype(int)
    else:  # pragma: no cover - unusual installs
        from sklearn.datasets import load_digits

        data = load_digits()
        pixels, target = data.data, data.target
    images = (pixels.reshape(-1, 8, 8) / 16.0).astype(np.float64)
    images.setflags(write=False)
    return images, target


def _glyph_indices(seed: int) -> dict[str, dict[int, np.ndarray]]:
    """Per digit, split the sklearn instance indices into disjoint train/val sets."""
    _, target = _load_digits()
    rng = np.random.default_rng([seed, 0x6A1F])
    split: dict[str, dict[int, np.ndarray]] = {"train": {}, "val": {}}
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(target == digit))
        cut = int(round(len(idx) * GLYPH_TRAIN_FRACTION))
        split["train"][digit], split["val"][digit] = idx[:cut], idx[cut:]
    return split


def _glyph_bank(seed: int) -> dict[str, dict[int, np.ndarray]]:
    """Glyph images per split and digit, zero-padded to 12x12 for the warp."""
    images, _ = _load_digits()
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    return {
        split: {digit: padded[idx] for digit, idx in per_digit.items()}
        for split, per_digit in _glyph_indices(seed).items()
    }


def _warp_glyph(src: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Smoothly upsample a padded 12x12 glyph to ``size`` px with a random affine jitter."""
    angle = np.deg2rad(rng.uniform(-20.0, 20.0))
    shear = rng.uniform(-0.2, 0.2)
    aspect = rng.uniform(0.85, 1.15)
    # Maps output pixel coordinates to source coordinates (row, col).
    scale = 8.0 * 1.1 / size
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    shear_m = np.array([[1.0, shear], [0.0, 1.0]])
    matrix = rot @ shear_m @ np.diag([scale * aspect, scale / aspect])
    c_src = (np.array(src.shape) - 1) / 2.0
    c_out = (size - 1) / 2.0
    offset = c_src - matrix @ np.array([c_out, c_out])
    out = ndimage.affine_transform(
        src, matrix, offset=offset, output_shape=(size, size), order=3, mode="constant"
    )
    return np.clip(out, 0.0, 1.0)


# --------------------------------------------------------------------------
# Textures and backgrounds
# --------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Bicubic-upsampled uniform noise in [0, 1] with about ``cells`` features per side."""
    low = rng.random((cells + 1, cells + 1)).astype(np.float32)
    field = np.asarray(Image.fromarray(low, "F").resize((size, size), Image.Resampling.BICUBIC))
    lo, hi = field.min(), field.max()
    return ((field - lo) / max(hi - lo, 1e-6)).astype(np.float64)


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _grating(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = _grid(size)
    theta = rng.uniform(0, np.pi)
    period = rng.uniform(3.0, 14.0)
    phase = rng.uniform(0, 2 * np.pi)
    wave = np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period + phase)
    if rng.random() < 0.5:  # square-ish stripes
        wave = np.tanh(3.0 * wave)
    return (wave + 1.0) / 2.0


def _checker(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = _grid(size)
    cell = rng.uniform(3.0, 10.0)
    theta = rng.uniform(0, np.pi / 2)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = -xx * np.sin(theta) + yy * np.cos(theta)
    return ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float64)


def _blobs(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = _grid(size)
    out = np.zeros((size, size))
    for _ in range(rng.integers(2, 7)):
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(0.05, 0.25, 2) * size
        d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        out = np.maximum(out, np.clip(1.5 - d, 0.0, 1.0))
    return out


def _strokes(rng: np.random.Generator, size: int) -> np.ndarray:
    """Digit-like clutter: thick line segments and circular arcs."""
    yy, xx = _grid(size)
    out = np.zeros((size, size))
    for _ in range(rng.integers(2, 6)):
        width = rng.uniform(0.8, 2.2)
        if rng.random() < 0.5:
            p0 = rng.uniform(0, size, 2)
            p1 = p0 + rng.uniform(-0.35, 0.35, 2) * size
            d = p1 - p0
            t = ((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / max(d @ d, 1e-6)
            t = np.clip(t, 0.0, 1.0)
            dist = np.hypot(yy - p0[0] - t * d[0], xx - p0[1] - t * d[1])
        else:
            cy, cx = rng.uniform(0, size, 2)
            radius = rng.uniform(0.06, 0.2) * size
            start, span = rng.uniform(0, 2 * np.pi), rng.uniform(1.0, 5.0)
            ang = (np.arctan2(yy - cy, xx - cx) - start) % (2 * np.pi)
            dist = np.abs(np.hypot(yy - cy, xx - cx) - radius)
            dist = np.where(ang < span, dist, np.inf)
        out = np.maximum(out, np.clip(width + 0.5 - dist, 0.0, 1.0))
    return out


def _clutter_pattern(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    if kind == "noise":
        return _smooth_noise(rng, size, int(rng.integers(4, 16)))
    if kind == "grating":
        return _grating(rng, size)
    if kind == "blobs":
        return _blobs(rng, size)
    if kind == "strokes":
        return _strokes(rng, size)
    return _checker(rng, size)


def _background(rng: np.random.Generator, size: int, params: dict) -> tuple[np.ndarray, list[str]]:
    """Colour field (smooth noise or gradient) plus random clutter layers."""
    c0, c1 = rng.random(3), rng.random(3)
    if rng.random() < 0.5:
        mix = _smooth_noise(rng, size, int(rng.integers(1, 4)))
    else:
        yy, xx = _grid(size)
        theta = rng.uniform(0, 2 * np.pi)
        mix = xx * np.cos(theta) + yy * np.sin(theta)
        mix = (mix - mix.min()) / max(np.ptp(mix), 1e-6)
    img = c0 * (1.0 - mix[..., None]) + c1 * mix[..., None]
    kinds = []
    for _ in range(rng.integers(params["clutter"][0], params["clutter"][1] + 1)):
        kind = _CLUTTER_KINDS[rng.integers(len(_CLUTTER_KINDS))]
        amp = rng.uniform(*params["clutter_amp"])
        weight = amp * _clutter_pattern(kind, rng, size)[..., None]
        img = img * (1.0 - weight) + rng.random(3) * weight
        kinds.append(kind)
    return img, kinds


# --------------------------------------------------------------------------
# Scene composition
# --------------------------------------------------------------------------


def _pick_colour(rng: np.random.Generator, reference: np.ndarray, target: float) -> np.ndarray:
    """Random colour whose normalised RGB distance to ``reference`` is near ``target``."""
    candidates = rng.random((32, 3))
    dist = np.linalg.norm(candidates - reference, axis=1) / np.sqrt(3.0)
    return candidates[np.argmin(np.abs(dist - target))]


def _hsv_to_rgb(h: np.ndarray, sat: np.ndarray, val: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB for arrays of hues in [0, 1)."""
    k = (np.array([5.0, 3.0, 1.0]) + h[:, None] * 6.0) % 6.0
    return val[:, None] - val[:, None] * sat[:, None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _class_colour(rng: np.random.Generator, cls: int, reference: np.ndarray, target: float) -> np.ndarray:
    """A colour of the class's characteristic hue, as real categories have typical colours."""
    hue = (CLASS_HUES[cls - 1] + rng.uniform(-0.04, 0.04, 32)) % 1.0
    candidates = _hsv_to_rgb(hue, rng.uniform(0.55, 1.0, 32), rng.uniform(0.35, 1.0, 32))
    dist = np.linalg.norm(candidates - reference, axis=1) / np.sqrt(3.0)
    return candidates[np.argmin(np.abs(dist - target))]


def _fill(rng: np.random.Generator, colour: np.ndarray, size: int, texture_p: float) -> np.ndarray:
    """Object fill: flat colour, sometimes modulated by a texture."""
    fill = np.broadcast_to(colour, (size, size, 3))
    if rng.random() < texture_p:
        pattern = _grating(rng, size) if rng.random() < 0.5 else _smooth_noise(rng, size, 3)
        other = np.clip(colour + rng.uniform(-0.3, 0.3, 3), 0.0, 1.0)
        fill = fill * (1.0 - pattern[..., None]) + other * pattern[..., None]
    return fill


def _place(rng: np.random.Generator, size: int, glyph_size: int, centres: list, cluster_p: float):
    """Top-left corner; clustered near an earlier glyph (occlusion) with ``cluster_p``."""
    if centres and rng.random() < cluster_p:
        cy, cx = centres[rng.integers(len(centres))]
        cy, cx = np.array([cy, cx]) + rng.uniform(-0.6, 0.6, 2) * glyph_size
    else:
        lo, hi = 0.35 * glyph_size, size - 0.35 * glyph_size
        cy, cx = rng.uniform(lo, hi, 2)
    return int(round(cy - glyph_size / 2)), int(round(cx - glyph_size / 2))


def _clip_box(top: int, left: int, glyph_size: int, size: int):
    """Slices into (image, glyph) for a glyph box that may stick out of the frame."""
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + glyph_size, size), min(left + glyph_size, size)
    if y1 <= y0 or x1 <= x0:
        return None
    img_sl = (slice(y0, y1), slice(x0, x1))
    gly_sl = (slice(y0 - top, y1 - top), slice(x0 - left, x1 - left))
    return img_sl, gly_sl


def _ignore_band(label: np.ndarray) -> np.ndarray:
    """Add the 1-px VOC-style 255 band on the outside of object outlines."""
    pad = np.pad(label, 1, mode="edge")
    band = np.zeros(label.shape, dtype=bool)
    for nb in (pad[:-2, 1:-1], pad[2:, 1:-1], pad[1:-1, :-2], pad[1:-1, 2:]):
        band |= (nb > 0) & (nb > label)
    out = label.copy()
    out[band] = IGNORE_INDEX
    return out


def _sample_scene(rng: np.random.Generator, level: str) -> list[tuple[int, int]]:
    """Paint order of (label, digit) items: objects and distractors interleaved."""
    params = _LEVELS[level]
    n_obj = int(rng.integers(params["objects"][0], params["objects"][1] + 1))
    n_dis = int(rng.integers(params["distractors"][0], params["distractors"][1] + 1))
    weights = np.asarray(CLASS_WEIGHTS) / np.sum(CLASS_WEIGHTS)
    classes = rng.choice(len(OBJECT_DIGITS), size=n_obj, p=weights) + 1
    items = [(int(c), OBJECT_DIGITS[c - 1]) for c in classes]
    items += [(0, int(d)) for d in rng.choice(DISTRACTOR_DIGITS, size=n_dis)]
    return [items[i] for i in rng.permutation(len(items))]


def _render_scene(rng: np.random.Generator, level: str, bank: dict, size: int):
    """Render one scene; returns (rgb float image, label map, factors)."""
    params = _LEVELS[level]
    items = _sample_scene(rng, level)
    img, clutter = _background(rng, size, params)
    label = np.zeros((size, size), dtype=np.uint8)
    owner = np.full((size, size), -1, dtype=np.int16)
    areas, sizes, contrasts, centres = {}, [], [], []
    for j, (cls, digit) in enumerate(items):
        glyphs = bank[digit]
        glyph_size = int(round(rng.uniform(*params["size"]) * size))
        intensity = _warp_glyph(glyphs[rng.integers(len(glyphs))], glyph_size, rng)
        thr = rng.uniform(0.3, 0.5)
        alpha = np.clip((intensity - thr) / 0.15 + 0.5, 0.0, 1.0)
        mask = intensity > thr
        top, left = _place(rng, size, glyph_size, centres, params["cluster_p"])
        centres.append((top + glyph_size / 2, left + glyph_size / 2))
        boxes = _clip_box(top, left, glyph_size, size)
        target = rng.uniform(*params["contrast"])
        if boxes is None:
            continue
        img_sl, gly_sl = boxes
        m = mask[gly_sl]
        under = img[img_sl][m].mean(axis=0) if m.any() else img[img_sl].mean(axis=(0, 1))
        if cls > 0 and rng.random() < params["hue_cue_p"]:
            colour = _class_colour(rng, cls, under, target)
        else:
            colour = _pick_colour(rng, under, target)
        fill = _fill(rng, colour, glyph_size, params["texture_p"])[gly_sl]
        a = alpha[gly_sl][..., None]
        img[img_sl] = img[img_sl] * (1.0 - a) + fill * a
        label[img_sl][m] = cls
        owner[img_sl][m] = j
        if cls > 0:
            areas[j] = int(m.sum())
            sizes.append(glyph_size)
            contrasts.append(float(np.linalg.norm(colour - under) / np.sqrt(3.0)))
    blur = rng.uniform(*params["blur"])
    noise = rng.uniform(*params["noise"])
    if blur > 0.05:
        img = ndimage.gaussian_filter(img, sigma=(blur, blur, 0))
    img = img + rng.normal(0.0, noise, img.shape)
    visible = {j: int((owner == j).sum()) for j in areas}
    factors = {
        "n_objects": len(areas),
        "n_distractors": sum(1 for cls, _ in items if cls == 0),
        "object_classes": [DEMO_CLASSES[items[j][0]] for j in areas],
        "object_sizes": sizes,
        "mean_object_size": round(float(np.mean(sizes)), 2) if sizes else 0.0,
        "mean_contrast": round(float(np.mean(contrasts)), 4) if contrasts else 0.0,
        "occlusion": round(1.0 - sum(visible.values()) / max(sum(areas.values()), 1), 4),
        "clutter": clutter,
        "blur_sigma": round(float(blur), 4),
        "noise_std": round(float(noise), 4),
    }
    return img, label, factors


def _render_image(rng: np.random.Generator, level: str, bank: dict, size: int):
    """Render a scene with at least a few visible object pixels (retries deterministically)."""
    min_pixels = max(4, size * size // 200)
    for _ in range(20):
        img, label, factors = _render_scene(rng, level, bank, size)
        if np.count_nonzero(label) >= min_pixels:
            break
    rgb = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    target = _ignore_band(label)
    counts = np.bincount(target[target != IGNORE_INDEX], minlength=DEMO_NUM_CLASSES)
    factors["visible_pixels"] = {
        DEMO_CLASSES[c]: int(counts[c]) for c in range(1, DEMO_NUM_CLASSES) if counts[c]
    }
    return rgb, target, factors


# --------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------


def _balanced_subset(pool: list[int], classes_of: dict[int, set[int]], k: int,
                     rng: np.random.Generator) -> list[int]:
    """Greedy subset of ``pool`` of size ``k``: repeatedly take an image containing
    the class seen least so far (random order within a class)."""
    remaining = [pool[i] for i in rng.permutation(len(pool))]
    counts = np.zeros(DEMO_NUM_CLASSES)
    counts[0] = np.inf  # background is everywhere; never the target
    chosen = []
    while len(chosen) < k and remaining:
        cls = int(np.argmin(counts))
        pick = next((i for i in remaining if cls in classes_of[i]), None)
        if pick is None:
            counts[cls] = np.inf  # class exhausted in the pool
            if np.isinf(counts).all():
                pick = remaining[0]
            else:
                continue
        remaining.remove(pick)
        chosen.append(pick)
        for c in classes_of[pick]:
            counts[c] += 1
    return sorted(chosen)


def _make_splits(num_train: int, classes_of: dict[int, set[int]], seed: int) -> dict:
    """Nested labeled subsets: 1_16 ⊂ 1_8 ⊂ pool."""
    rng = np.random.default_rng([seed, 0x5B17])
    pool = list(range(num_train))
    l8 = _balanced_subset(pool, classes_of, max(1, num_train // 8), rng)
    l16 = _balanced_subset(l8, classes_of, max(1, num_train // 16), rng)
    return {"1_16": l16, "1_8": l8, "full": pool}


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def _image_id(split: str, index: int) -> str:
    return f"demo_{split}_{index:04d}"


def _params(seed: int, num_train: int, num_val: int, image_size: int) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "num_train": int(num_train),
        "num_val": int(num_val),
        "image_size": int(image_size),
    }


def _write_list(path: Path, ids: list[str]) -> None:
    write_text_atomic(path, "".join(f"{i}\n" for i in ids))


def _save_pair(out: Path, image_id: str, rgb: np.ndarray, label: np.ndarray) -> None:
    Image.fromarray(rgb, "RGB").save(out / "JPEGImages" / f"{image_id}.jpg", quality=95)
    mask = Image.fromarray(label, "P")
    mask.putpalette(VOC_PALETTE)
    mask.save(out / "SegmentationClass" / f"{image_id}.png")


def _purge_stale(out: Path) -> None:
    """Drop the marker and files this generator owns (never anything else)."""
    (out / MARKER_NAME).unlink(missing_ok=True)
    for sub, ext in (("JPEGImages", "jpg"), ("SegmentationClass", "png")):
        for path in (out / sub).glob(f"demo_*.{ext}"):
            path.unlink()


def _generate_split(out: Path, split: str, count: int, bank: dict, seed: int,
                    size: int) -> list[dict]:
    """Render and save one split; each image has its own rng, so order does not matter."""
    code = {"train": 1, "val": 2}[split]
    records = []
    for index in range(count):
        rng = np.random.default_rng([seed, code, index])
        level = DIFFICULTY_LEVELS[rng.choice(len(DIFFICULTY_LEVELS), p=DIFFICULTY_PROBS)]
        rgb, label, factors = _render_image(rng, level, bank, size)
        image_id = _image_id(split, index)
        _save_pair(out, image_id, rgb, label)
        records.append({"id": image_id, "difficulty": level, "factors": factors})
    return records


def generate_demo_dataset(out: str | Path, seed: int = 0, *, num_train: int = 512,
                          num_val: int = 128, image_size: int = 64) -> Path:
    """Write the demo dataset to ``out`` (VOC layout) and return ``out``."""
    if num_train < 1 or num_val < 1 or image_size < 32:
        raise ValueError("need num_train >= 1, num_val >= 1 and image_size >= 32")
    out = Path(out)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    _purge_stale(out)
    banks = _glyph_bank(seed)
    train = _generate_split(out, "train", num_train, banks["train"], seed, image_size)
    val = _generate_split(out, "val", num_val, banks["val"], seed, image_size)

    classes_of = {
        i: {DEMO_CLASSES.index(n) for n in r["factors"]["visible_pixels"]}
        for i, r in enumerate(train)
    }
    splits = _make_splits(num_train, classes_of, seed)
    seg = out / "ImageSets" / "Segmentation"
    train_ids = [r["id"] for r in train]
    for name, labeled in splits.items():
        # full has no unlabeled images; it repeats 1_16's so the file is non-empty.
        chosen = set(splits["1_16" if name == "full" else name])
        unlabeled = [train_ids[i] for i in range(num_train) if i not in chosen]
        _write_list(seg / name / "labeled.txt", [train_ids[i] for i in labeled])
        _write_list(seg / name / "unlabeled.txt", unlabeled)
    _write_list(seg / "train.txt", train_ids)
    _write_list(seg / "val.txt", [r["id"] for r in val])

    params = _params(seed, num_train, num_val, image_size)
    info = {
        **params,
        "classes": list(DEMO_CLASSES),
        "num_classes": DEMO_NUM_CLASSES,
        "ignore_index": IGNORE_INDEX,
        "rare_class": RARE_CLASS,
        "object_digits": {DEMO_CLASSES[i + 1]: d for i, d in enumerate(OBJECT_DIGITS)},
        "distractor_digits": list(DISTRACTOR_DIGITS),
        "difficulty_levels": dict(zip(DIFFICULTY_LEVELS, DIFFICULTY_PROBS)),
        "split_sizes": {name: len(ids) for name, ids in splits.items()},
        "train": train,
        "val": val,
    }
    write_text_atomic(out / INFO_NAME, json.dumps(info, indent=1, sort_keys=True) + "\n")
    write_text_atomic(out / MARKER_NAME, json.dumps(params, sort_keys=True) + "\n")
    return out


def _marker_matches(out: Path, params: dict) -> bool:
    try:
        return json.loads((out / MARKER_NAME).read_text()) == params
    except (OSError, ValueError):
        return False


def ensure_demo_dataset(out: str | Path, seed: int = 0, **kwargs) -> Path:
    """Return ``out``, generating the dataset unless a matching completion marker exists."""
    out = Path(out)
    options = {"num_train": 512, "num_val": 128, "image_size": 64, **kwargs}
    params = _params(seed, **options)
    if _marker_matches(out, params):
        return out
    out.mkdir(parents=True, exist_ok=True)
    with locked(out / ".demo_lock"):  # one process generates a directory, the others wait
        if not _marker_matches(out, params):  # another process may have finished it
            generate_demo_dataset(out, seed, **options)
    return out
