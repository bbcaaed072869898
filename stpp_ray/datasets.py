"""Dataset layouts, split lists, and validated image/mask reading.

Three on-disk layouts are supported (see ``build_samples``):

* ``voc``: ``JPEGImages/{id}.jpg`` and palette ``SegmentationClass/{id}.png``.
  Split lines may also use the ST++ two-column form
  ``JPEGImages/x.jpg SegmentationClass/x.png``.
* ``cityscapes``: ``leftImg8bit/{id}_leftImg8bit.png`` and
  ``gtFine/{id}_gtFine_labelIds.png`` (or ``_gtFine_labelTrainIds.png`` when only
  that exists); labelIds are mapped to the 19 train ids, labelTrainIds are used as
  they are. Split lines may also use the ST++/UniMatch two-column form
  ``leftImg8bit/train/c/c_x_y_leftImg8bit.png gtFine/train/c/c_x_y_gtFine_labelTrainIds.png``.
* ``folder``: ``images/{id}.{jpg,jpeg,png,bmp,tif,tiff}`` and ``masks/{id}.png``.

A split path ``builtin:NAME`` names a list shipped in ``stpp_ray/splits/`` (see
``stpp-ray splits``); any other relative split path is relative to the dataset root.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .storage import BucketPath, location

IGNORE_INDEX = 255  # the label of pixels that no loss or metric counts


def _voc_colors() -> np.ndarray:
    """The Pascal VOC colour map, 256 x 3 uint8: bits of the class id interleaved into R, G, B."""
    colors = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        c, r, g, b = index, 0, 0, 0
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        colors[index] = (r, g, b)
    return colors


VOC_COLORS = _voc_colors()
VOC_PALETTE: list[int] = VOC_COLORS.ravel().tolist()  # as PIL's putpalette takes it
LAYOUTS = ("voc", "cityscapes", "folder")
MAX_LISTED_PROBLEMS = 20
FOLDER_IMAGE_EXTS = ("jpg", "jpeg", "png", "bmp", "tif", "tiff")
MASK_MODES = ("L", "P")
BUILTIN_PREFIX = "builtin:"
BUILTIN_SPLITS_DIR = Path(__file__).resolve().parent / "splits"
_CITYSCAPES_IMAGE = re.compile(r"(?:\./)?leftImg8bit/(.+)_leftImg8bit\.png")
CITYSCAPES_TRAIN_ID_SUFFIX = "_labelTrainIds.png"
# Layout of each shipped dataset folder under BUILTIN_SPLITS_DIR.
BUILTIN_SPLIT_LAYOUTS = {"pascal": "voc", "cityscapes": "cityscapes"}

# Official Cityscapes labelId -> trainId table (cityscapesScripts labels.py).
_CITYSCAPES_LABEL_TO_TRAIN = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}


def _cityscapes_lut() -> np.ndarray:
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in _CITYSCAPES_LABEL_TO_TRAIN.items():
        lut[label_id] = train_id
    return lut


CITYSCAPES_LUT = _cityscapes_lut()


class DatasetError(ValueError):
    """A data problem; the message names the file and the problem."""

    def __init__(self, message: str, problems: Sequence[str] = ()):
        super().__init__(message)
        self.problems = list(problems) or [message]

    def __reduce__(self):
        # Keep ``problems`` when pickled (e.g. raised inside a worker process).
        return type(self), (str(self), self.problems)


@dataclass(frozen=True)
class Sample:
    """One image, with its mask path when labeled (None for unlabeled images)."""

    image_id: str
    image_path: Path
    mask_path: Path | None = None


def _format_problems(header: str, problems: Sequence[str]) -> str:
    shown = list(problems[:MAX_LISTED_PROBLEMS])
    if len(problems) > MAX_LISTED_PROBLEMS:
        shown.append(f"... and {len(problems) - MAX_LISTED_PROBLEMS} more")
    return header + "\n" + "\n".join(f"  - {p}" for p in shown)


def _raise_if_problems(header: str, problems: Sequence[str]) -> None:
    if problems:
        raise DatasetError(_format_problems(f"{header} ({len(problems)} problem(s)):", problems), problems)


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown dataset layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


def builtin_split_names() -> list[str]:
    """Names of the shipped split lists, e.g. ``pascal/92/labeled.txt``."""
    return sorted(p.relative_to(BUILTIN_SPLITS_DIR).as_posix() for p in BUILTIN_SPLITS_DIR.rglob("*.txt"))


def builtin_split_path(name: str) -> Path:
    """Path of the shipped split list ``name``; DatasetError naming the known ones if unknown."""
    names = builtin_split_names()
    if name not in names:
        raise DatasetError(
            f"unknown builtin split '{BUILTIN_PREFIX}{name}' (see `stpp-ray splits`); shipped splits: "
            + (", ".join(BUILTIN_PREFIX + n for n in names) or f"none (no *.txt under {BUILTIN_SPLITS_DIR})")
        )
    return BUILTIN_SPLITS_DIR / name


def resolve_path(root: Path | str, path: str | Path) -> Path:
    """Return a ``builtin:NAME`` split's shipped file, ``path`` as is when absolute (or a URI), else
    relative to ``root`` (a directory or an object-store URI)."""
    if isinstance(path, str) and path.startswith(BUILTIN_PREFIX):
        return builtin_split_path(path[len(BUILTIN_PREFIX):])
    return _under_root(location(root), path)


def _under_root(root: Path, path: str) -> Path:
    # Paths inside split entries are never ``builtin:`` names.
    path = location(path)
    return path if path.is_absolute() else root / path


def split_entry_id(entry: str) -> str:
    """Image id of a split entry.

    Two-column entries give the first path's stem, except Cityscapes
    ``leftImg8bit/{id}_leftImg8bit.png`` which gives ``{id}`` (as the one-id form).
    """
    columns = entry.split()
    if len(columns) == 2:
        match = _CITYSCAPES_IMAGE.fullmatch(columns[0])
        return match.group(1) if match else Path(columns[0]).stem
    return entry


def read_split(root: Path | str, split_file: str | Path) -> list[str]:
    """Read split entries, one per line; blank lines and '#' comments are skipped.

    Entries are returned as written (stripped); two-column VOC entries are kept
    whole so ``build_samples`` can take paths from them.
    """
    path = resolve_path(root, split_file)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{path}: split file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read split file: {exc}") from None

    entries: list[str] = []
    first_line: dict[str, int] = {}
    problems: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        if len(entry.split()) > 2:
            problems.append(f"{path}:{lineno}: expected an id or two paths, got {entry!r}")
            continue
        image_id = split_entry_id(entry)
        if image_id in first_line:
            problems.append(
                f"{path}:{lineno}: duplicate id {image_id!r} (first on line {first_line[image_id]}, again on line {lineno})"
            )
            continue
        first_line[image_id] = lineno
        entries.append(entry)
    _raise_if_problems(f"bad split file {path}", problems)
    if not entries:
        raise DatasetError(f"{path}: split file is empty (no ids)")
    return entries


def _two_column_paths(root: Path, entry: str) -> tuple[str, Path, Path] | None:
    columns = entry.split()
    if len(columns) != 2:
        return None
    return split_entry_id(entry), _under_root(root, columns[0]), _under_root(root, columns[1])


def _voc_paths(root: Path, entry: str) -> tuple[str, Path, Path]:
    return _two_column_paths(root, entry) or (
        entry, root / "JPEGImages" / f"{entry}.jpg", root / "SegmentationClass" / f"{entry}.png"
    )


def _cityscapes_paths(root: Path, entry: str, is_file) -> tuple[str, Path, Path]:
    two_column = _two_column_paths(root, entry)
    if two_column:
        return two_column
    image = root / "leftImg8bit" / f"{entry}_leftImg8bit.png"
    mask = root / "gtFine" / f"{entry}_gtFine_labelIds.png"
    # The preprocessed gtFine of ST++/UniMatch (README.md) is named by their lists as
    # *_gtFine_labelTrainIds.png (UniMatch splits/cityscapes/*.txt); take it when labelIds is absent.
    train_ids = root / "gtFine" / f"{entry}_gtFine{CITYSCAPES_TRAIN_ID_SUFFIX}"
    if not is_file(mask) and is_file(train_ids):
        mask = train_ids
    return entry, image, mask


def _folder_image_path(root: Path, image_id: str, is_file) -> Path | None:
    for ext in FOLDER_IMAGE_EXTS:
        for suffix in (ext, ext.upper()):
            candidate = root / "images" / f"{image_id}.{suffix}"
            if is_file(candidate):
                return candidate
    return None


def _sample_paths(layout: str, root: Path, entry: str, is_file) -> tuple[str, Path | None, Path]:
    if layout == "voc":
        return _voc_paths(root, entry)
    if layout == "cityscapes":
        return _cityscapes_paths(root, entry, is_file)
    return entry, _folder_image_path(root, entry, is_file), root / "masks" / f"{entry}.png"


def _file_test(root: Path):
    """`is_file` for the paths of a split: one listing of the prefix for an object-store root
    (instead of a request per image and per mask), `Path.is_file` otherwise."""
    if not isinstance(root, BucketPath):
        return lambda p: p.is_file()
    keys = root.files_under()

    def is_file(p) -> bool:
        if not isinstance(p, BucketPath):
            return location(p).is_file()
        try:
            return str(p.relative_to(root)) in keys
        except ValueError:
            return p.is_file()
    return is_file


def iter_samples(layout: str, root: Path | str, split_file: str | Path, *, with_masks: bool):
    """The samples of ``split_file`` one at a time (image and mask paths of ``layout``); once
    exhausted, raises one DatasetError listing every missing file."""
    _check_layout(layout)
    root = location(root)
    missing: list[str] = []
    entries = read_split(root, split_file)
    is_file = _file_test(root)
    for entry in entries:
        image_id, image_path, mask_path = _sample_paths(layout, root, entry, is_file)
        if image_path is None:
            exts = ",".join(FOLDER_IMAGE_EXTS)
            missing.append(f"{root / 'images' / image_id}.{{{exts}}}: missing image file")
        elif not is_file(image_path):
            missing.append(f"{image_path}: missing image file")
        if with_masks and not is_file(mask_path):
            missing.append(f"{mask_path}: missing mask file")
        if image_path is not None:
            yield Sample(image_id, image_path, mask_path if with_masks else None)
    _raise_if_problems(f"missing files for split {resolve_path(root, split_file)}", missing)


def build_samples(layout: str, root: Path | str, split_file: str | Path, *, with_masks: bool) -> list[Sample]:
    """Map the ids of ``split_file`` to image (and mask) paths of ``layout``.

    Raises one DatasetError listing every missing file.
    """
    return list(iter_samples(layout, root, split_file, with_masks=with_masks))


def _open_fully(path: Path | str, what: str) -> Image.Image:
    """Open and fully decode an image file, turning every failure into DatasetError."""
    path = location(path)
    try:
        if isinstance(path, BucketPath):  # one request for the object, its size with it
            data = path.read_bytes()
            source, size = io.BytesIO(data), len(data)
        else:
            source, size = path, path.stat().st_size
        if size == 0:
            raise DatasetError(f"{path}: empty (zero-byte) {what} file")
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing {what} file") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read {what} file: {exc}") from None
    try:
        img = Image.open(source)
    except Image.UnidentifiedImageError:
        raise DatasetError(f"{path}: not an image file (unrecognised format)") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot open {what} file: {exc}") from None
    try:
        # load() forces a full decode so truncated files fail here, not later.
        img.load()
    except Exception as exc:  # PIL decoders raise OSError, SyntaxError, ValueError, ...
        img.close()
        raise DatasetError(f"{path}: unreadable or truncated {what}: {exc}") from None
    return img


def read_image(path: Path | str) -> np.ndarray:
    """Read an image as an HxWx3 uint8 RGB array."""
    with _open_fully(path, "image") as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def _mask_array(img: Image.Image, path: Path | str) -> np.ndarray:
    if img.mode in ("RGB", "RGBA"):
        raise DatasetError(f"{path}: RGB mask where a palette or single-channel mask is expected (mode {img.mode})")
    if img.mode not in MASK_MODES:
        raise DatasetError(f"{path}: unsupported mask mode {img.mode!r}; expected 'L' or 'P' with 8-bit class indices")
    # For "P" images the array holds the palette indices, i.e. the class ids.
    return np.asarray(img, dtype=np.uint8).copy()


def read_mask(path: Path | str, layout: str) -> np.ndarray:
    """Read a mask as HxW uint8 class indices.

    Cityscapes labelIds are mapped to train ids; a ``*_labelTrainIds.png`` mask
    already holds train ids and is used as it is.
    """
    _check_layout(layout)
    with _open_fully(path, "mask") as img:
        mask = _mask_array(img, path)
    if layout == "cityscapes" and not Path(path).name.endswith(CITYSCAPES_TRAIN_ID_SUFFIX):
        mask = CITYSCAPES_LUT[mask]
    return mask


def _bad_labels(mask: np.ndarray, num_classes: int) -> list[int]:
    values = np.unique(mask)
    return [int(v) for v in values if v >= num_classes and v != IGNORE_INDEX]


def sample_problems(sample: Sample, num_classes: int, layout: str) -> list[str]:
    """All problems of one sample, as messages naming the file."""
    try:
        image = read_image(sample.image_path)
    except DatasetError as exc:
        image = None
        problems = [str(exc)]
    else:
        problems = []
    if sample.mask_path is None:
        return problems
    try:
        mask = read_mask(sample.mask_path, layout)
    except DatasetError as exc:
        return problems + [str(exc)]
    if image is not None and mask.shape != image.shape[:2]:
        mh, mw = mask.shape
        ih, iw = image.shape[:2]
        problems.append(
            f"{sample.mask_path}: mask size {mw}x{mh} (WxH) differs from image size {iw}x{ih} of {sample.image_path}"
        )
    bad = _bad_labels(mask, num_classes)
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        problems.append(
            f"{sample.mask_path}: mask label values outside [0, {num_classes}) other than {IGNORE_INDEX}: {shown}"
        )
    return problems


def raise_if_check_failed(problems: Sequence[str]) -> None:
    """One DatasetError listing every problem of a dataset check, if any."""
    _raise_if_problems("dataset check failed", problems)


def check_samples(samples: Iterable[Sample], num_classes: int, layout: str) -> None:
    """Fully read and validate every image and mask; raise one DatasetError listing all problems."""
    _check_layout(layout)
    problems: list[str] = []
    for sample in samples:
        problems.extend(sample_problems(sample, num_classes, layout))
    raise_if_check_failed(problems)


def sample_for_check(samples: Sequence[Sample], size: int, seed: int) -> list[Sample]:
    """`size` of `samples` drawn without replacement with `seed`, in their order (all if fewer)."""
    if len(samples) <= size:
        return list(samples)
    picked = np.random.default_rng(seed).choice(len(samples), size=size, replace=False)
    return [samples[i] for i in sorted(picked)]


def _overlap_problem(name_a: str, ids_a: set[str], name_b: str, ids_b: set[str]) -> str | None:
    shared = sorted(ids_a & ids_b)
    if not shared:
        return None
    shown = ", ".join(shared[:5]) + (", ..." if len(shared) > 5 else "")
    return f"{len(shared)} id(s) are both {name_a} and {name_b}: {shown}"


def check_disjoint(
    labeled_ids: Iterable[str], unlabeled_ids: Iterable[str], val_ids: Iterable[str] | None = None
) -> None:
    """Raise DatasetError if labeled/unlabeled (or val and either) share ids."""
    labeled = {split_entry_id(i) for i in labeled_ids}
    unlabeled = {split_entry_id(i) for i in unlabeled_ids}
    pairs = [("labeled", labeled, "unlabeled", unlabeled)]
    if val_ids is not None:
        val = {split_entry_id(i) for i in val_ids}
        pairs += [("labeled", labeled, "val", val), ("unlabeled", unlabeled, "val", val)]
    problems = [p for p in (_overlap_problem(*pair) for pair in pairs) if p]
    _raise_if_problems("splits are not disjoint", problems)


def encode_mask_png(mask: np.ndarray) -> bytes:
    """Encode an HxW uint8 mask as a single-channel (mode L) PNG."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"expected an HxW uint8 mask, got shape {mask.shape} dtype {mask.dtype}")
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")  # 2-D uint8 -> mode L
    return buf.getvalue()


def decode_mask_png(data: bytes) -> np.ndarray:
    """Decode PNG bytes from ``encode_mask_png`` to an HxW uint8 mask."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return _mask_array(img, "<mask PNG bytes>")
    except DatasetError:
        raise
    except Exception as exc:  # any decoder failure means corrupt bytes
        raise DatasetError(f"<mask PNG bytes>: cannot decode mask PNG: {exc}") from None
