"""Small generated datasets in the real on-disk layouts, for the ids that a config's split
lists name, so that a shipped config runs end to end without the real data set.

The file names follow each data set's own conventions, written here independently of
`stpp_ray.datasets`, and every id is checked against the real id format first: a split
list that does not fit its layout (Cityscapes ids without their `train/<city>/` prefix,
Cityscapes-style two-column lines, VOC lines with other paths) fails here, naming the
file and the line, before anything trains. Images carry no meaning; masks are valid
(classes below `num_classes`, 255 borders; Cityscapes label ids, some of them unmapped).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from stpp_ray.config import Config
from stpp_ray.datasets import CITYSCAPES_LUT, read_split, resolve_path
from stpp_ray.demo_data import VOC_PALETTE

# VOC 2012 and SBD ids: year_number, e.g. 2007_000032.
VOC_ID = re.compile(r"\d{4}_\d{6}")
VOC_TWO_COLUMNS = re.compile(r"JPEGImages/(?P<id>\d{4}_\d{6})\.jpg SegmentationClass/(?P=id)\.png")
# Cityscapes ids: split/city/city_sequence_frame, e.g. train/jena/jena_000078_000019; or the
# ST++/UniMatch two-column lines naming the image and its (labelIds or labelTrainIds) mask.
CITYSCAPES_ID = re.compile(r"(?P<split>train|val|test)/(?P<city>[a-z_]+)/(?P=city)_\d{6}_\d{6}")
CITYSCAPES_TWO_COLUMNS = re.compile(r"leftImg8bit/(?P<id>\S+)_leftImg8bit\.png gtFine/(?P=id)_gtFine_(?P<kind>labelIds|labelTrainIds)\.png")
# (height, width): landscape, portrait and square, as VOC mixes them (up to 500 pixels there).
VOC_SIZES = ((36, 48), (48, 36), (40, 46), (46, 40), (48, 48), (33, 44))
# Cityscapes frames all share one size, 1024 x 2048: here 32 x 64.
CITYSCAPES_SIZES = ((32, 64),)
GRAYSCALE_EVERY = 5  # about one VOC image in five is a mode L JPEG
CITYSCAPES_UNMAPPED = (0, 1, 4, 6, 9, 14)  # label ids without a train id (-> 255)


class LayoutMismatch(ValueError):
    """A split list whose entries do not fit the data set's layout."""


@dataclass
class LayoutData:
    """One generated data set per layout under `base`, shared by all configs of that layout:
    each image is written once, the same for every config (its content is seeded by its id)."""

    base: Path
    written: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # (layout, file kind) -> ids

    def root(self, layout: str) -> Path:
        return self.base / layout

    def prepare(self, cfg: Config, max_images: int) -> dict[str, list[str]]:
        """Write the first `max_images` images of each split list of `cfg` (masks for labeled
        and val) under `root(cfg.data.layout)`. The lists are read as the pipeline reads them,
        relative to that root unless absolute or built in. Returns the ids per split."""
        layout, root = cfg.data.layout, self.root(cfg.data.layout)
        splits = {"labeled": cfg.data.labeled_split, "val": cfg.data.val_split}
        if cfg.method != "supervised":
            splits["unlabeled"] = cfg.data.unlabeled_split
        entries = {}
        for role, split in splits.items():
            lines = read_split(root, split)[:max_images]
            where = resolve_path(root, split)
            entries[role] = [_checked_entry(layout, line, role, f"{where}:{i + 1}") for i, line in enumerate(lines)]
        for role, pairs in entries.items():
            for image_id, mask_kind in pairs:
                self._write(layout, root, image_id, mask_kind if role != "unlabeled" else None, cfg.data.num_classes)
        return {role: [image_id for image_id, _ in pairs] for role, pairs in entries.items()}

    def _write(self, layout: str, root: Path, image_id: str, mask_kind: str | None, num_classes: int) -> None:
        done = self.written.setdefault((layout, "image"), set())
        if image_id not in done:
            write_image(layout, root, image_id)
            done.add(image_id)
        done = self.written.setdefault((layout, f"mask {mask_kind}"), set())
        if mask_kind and image_id not in done:
            write_mask(layout, root, image_id, num_classes, mask_kind)
            done.add(image_id)


def _checked_entry(layout: str, entry: str, role: str, where: str) -> tuple[str, str]:
    """(image id, mask kind) of a split line, or LayoutMismatch naming the file and line."""
    if layout == "voc":
        two = VOC_TWO_COLUMNS.fullmatch(entry)
        if VOC_ID.fullmatch(entry) or two:
            return (two["id"] if two else entry), "voc"
        raise LayoutMismatch(f"{where}: {entry!r} is not a VOC id (like 2007_000032) nor "
                             f"'JPEGImages/<id>.jpg SegmentationClass/<id>.png'")
    if layout == "cityscapes":
        two = CITYSCAPES_TWO_COLUMNS.fullmatch(entry)
        image_id, kind = (two["id"], two["kind"]) if two else (entry, "labelIds")
        match = CITYSCAPES_ID.fullmatch(image_id)
        if not match:
            raise LayoutMismatch(f"{where}: {entry!r} is not a Cityscapes id (like train/jena/jena_000078_000019) "
                                 f"nor 'leftImg8bit/<id>_leftImg8bit.png gtFine/<id>_gtFine_labelTrainIds.png'")
        expected = "val" if role == "val" else "train"
        if match["split"] != expected:
            raise LayoutMismatch(f"{where}: {role} image {image_id!r} is not in Cityscapes' {expected}/ split")
        return image_id, kind
    raise LayoutMismatch(f"{where}: no generator for layout {layout!r}")


def _rng(layout: str, image_id: str, what: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"{layout}/{image_id}/{what}".encode()))


def image_size(layout: str, image_id: str) -> tuple[int, int]:
    """(height, width) of a generated image, fixed by its id."""
    sizes = VOC_SIZES if layout == "voc" else CITYSCAPES_SIZES
    return sizes[zlib.crc32(image_id.encode()) % len(sizes)]


def is_grayscale(layout: str, image_id: str) -> bool:
    return layout == "voc" and zlib.crc32(image_id.encode()) % GRAYSCALE_EVERY == 0


def image_path(layout: str, root: Path, image_id: str) -> Path:
    if layout == "voc":
        return root / "JPEGImages" / f"{image_id}.jpg"
    return root / "leftImg8bit" / f"{image_id}_leftImg8bit.png"


def mask_path(layout: str, root: Path, image_id: str, kind: str = "labelIds") -> Path:
    if layout == "voc":
        return root / "SegmentationClass" / f"{image_id}.png"
    return root / "gtFine" / f"{image_id}_gtFine_{kind}.png"


def write_image(layout: str, root: Path, image_id: str) -> Path:
    h, w = image_size(layout, image_id)
    pixels = _rng(layout, image_id, "image").integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    if is_grayscale(layout, image_id):
        img = img.convert("L")
    path = image_path(layout, root, image_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=90) if layout == "voc" else img.save(path)
    return path


def _class_map(rng: np.random.Generator, h: int, w: int, values: np.ndarray, background: int) -> np.ndarray:
    """Background with a few rectangles of other values."""
    label = np.full((h, w), background, dtype=np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        top, left = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
        bh, bw = int(rng.integers(6, h - top + 1)), int(rng.integers(6, w - left + 1))
        label[top:top + bh, left:left + bw] = rng.choice(values)
    return label


def voc_mask(image_id: str, num_classes: int) -> np.ndarray:
    """Class indices in [0, num_classes) with 255 on the object borders, as VOC's outlines."""
    h, w = image_size("voc", image_id)
    label = _class_map(_rng("voc", image_id, "mask"), h, w, np.arange(1, num_classes), background=0)
    edge = np.zeros_like(label, dtype=bool)
    edge[1:, :] |= label[1:, :] != label[:-1, :]
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    label[edge] = 255
    return label


def cityscapes_mask(image_id: str, num_classes: int) -> np.ndarray:
    """Cityscapes label ids: mapped ones (road, car, ...) and some without a train id."""
    h, w = image_size("cityscapes", image_id)
    rng = _rng("cityscapes", image_id, "mask")
    mapped = np.flatnonzero(CITYSCAPES_LUT < num_classes)
    label = _class_map(rng, h, w, mapped, background=int(rng.choice(mapped)))
    label[: h // 8] = rng.choice(CITYSCAPES_UNMAPPED)  # e.g. the ego vehicle / unlabeled band
    return label


def write_mask(layout: str, root: Path, image_id: str, num_classes: int, kind: str = "labelIds") -> Path:
    """VOC: a palette PNG. Cityscapes (mode L): label ids, or for `kind=labelTrainIds` their train ids."""
    path = mask_path(layout, root, image_id, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "voc":
        mask = Image.fromarray(voc_mask(image_id, num_classes))
        mask.putpalette(VOC_PALETTE)  # mode L -> P: the pixel values are the palette indices
    else:
        label = cityscapes_mask(image_id, num_classes)
        mask = Image.fromarray(CITYSCAPES_LUT[label] if kind == "labelTrainIds" else label)
    mask.save(path)
    return path
