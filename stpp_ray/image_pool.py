"""The unlabeled split as two Arrow columns, image ids and paths: the driver's copy of a pool
of a million images holds no per-image Python object."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from .datasets import Sample, iter_samples, resolve_path
from .storage import location

CHUNK = 4096  # samples converted to Arrow (or files tested) at a time while the split is read
# An entry the Arrow reading takes as is: no whitespace inside, no path separator, no control or
# line-breaking character (`str.splitlines` would split there); anything else goes to `iter_samples`.
_NOT_PLAIN = r"[\s\x00-\x1f\x7f/\\]|\x{85}|\x{2028}|\x{2029}"


class ImagePool(Sequence):
    """Unlabeled images: `ids` and `paths` (Arrow strings); indexing gives a `Sample`."""

    def __init__(self, ids: pa.Array, paths: pa.Array):
        self.ids, self.paths = ids, paths

    @classmethod
    def of(cls, samples: Iterable[Sample]) -> "ImagePool":
        """From samples, converted `CHUNK` at a time."""
        ids, paths = [], []
        samples = iter(samples)
        while chunk := list(itertools.islice(samples, CHUNK)):
            ids.append(pa.array([s.image_id for s in chunk], pa.string()))
            paths.append(pa.array([str(s.image_path) for s in chunk], pa.string()))
        concat = lambda parts: pa.concat_arrays(parts) if parts else pa.array([], pa.string())  # noqa: E731
        return cls(concat(ids), concat(paths))

    @classmethod
    def read(cls, layout: str, root, split_file) -> "ImagePool":
        """The images of an unlabeled split file (`datasets.iter_samples`, no masks). A local VOC
        split of plain ids, every image present, is read in Arrow (no per-image Python object
        held); any other split, or one with a problem, goes through `iter_samples`, which names it."""
        pool = _plain_voc_pool(layout, root, split_file)
        return pool if pool is not None else cls.of(iter_samples(layout, root, split_file, with_masks=False))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        return Sample(self.ids[k].as_py(), location(self.paths[k].as_py()))

    def image_ids(self) -> list[str]:
        return self.ids.to_pylist()

    def subset(self, image_ids: pa.Array | Iterable[str]) -> "ImagePool":
        """The images among `image_ids`, in the pool's order."""
        if image_ids is self.ids:  # the whole pool (a labeling pass of every image): no hash set
            return self
        wanted = image_ids if isinstance(image_ids, pa.Array) else pa.array(list(image_ids), pa.string())
        keep = pc.is_in(self.ids, value_set=wanted)
        return ImagePool(self.ids.filter(keep), self.paths.filter(keep))

    def among(self, image_ids: Iterable[str]) -> list[str]:
        """The pool's ids that are also in `image_ids` (a small set: overlaps of the splits)."""
        return self.subset(image_ids).image_ids()

    def table(self) -> pa.Table:
        return pa.table({"image_id": self.ids, "image_path": self.paths})


def sorted_ids(ids: pa.Array) -> pa.Array:
    return ids.take(pc.sort_indices(ids))


def distinct_sorted(ids: pa.Array) -> pa.Array:
    """`ids` sorted, each once (`pc.unique` hashes: ~10 MiB per 100k ids)."""
    ordered = sorted_ids(ids)
    if len(ordered) < 2:
        return ordered
    first = pc.not_equal(ordered[1:], ordered[:-1])
    return ordered.filter(pa.concat_arrays([pa.array([True]), first]))


def has_duplicates(ordered: pa.Array) -> bool:
    """Whether sorted `ordered` holds a value twice (side by side; a hash set of 200k ids held 30 MB)."""
    return len(ordered) > 1 and pc.any(pc.equal(ordered[1:], ordered[:-1])).as_py()


def _plain_voc_pool(layout: str, root, split_file) -> ImagePool | None:
    """`ImagePool.read` in Arrow where it reads the same as `iter_samples`, else None."""
    root = location(root)
    if layout != "voc" or not isinstance(root, Path):
        return None
    try:
        text = resolve_path(root, split_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    lines = pc.utf8_trim_whitespace(pc.split_pattern(pa.array([text], pa.string()), "\n").values)
    del text
    entries = lines.filter(pc.and_(pc.not_equal(lines, ""), pc.invert(pc.starts_with(lines, "#"))))
    del lines
    if not len(entries) or pc.any(pc.match_substring_regex(entries, _NOT_PLAIN)).as_py():
        return None
    if has_duplicates(sorted_ids(entries)):
        return None
    paths = pc.binary_join_element_wise(f"{root / 'JPEGImages'}{os.sep}", entries, ".jpg", "")
    for lo in range(0, len(paths), CHUNK):
        if not all(map(os.path.isfile, paths.slice(lo, CHUNK).to_pylist())):
            return None  # `iter_samples` lists every missing file
    return ImagePool(entries, paths)
