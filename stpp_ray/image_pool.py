"""The unlabeled split as Arrow columns, image ids and paths: the driver's copy of a pool of a
million images holds no per-image Python object. A plain VOC split's paths are not held at all:
each is its id between the pool's prefix and suffix, derived where a path is needed."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from .datasets import Sample, iter_samples, resolve_path
from .files import read_arrow, write_arrow_named
from .storage import location

CHUNK = 4096  # samples converted to Arrow (or files tested) at a time while the split is read
TEXT_BLOCK = 1 << 16  # characters of a plain split file parsed at a time (then to the line's end)
# An entry the Arrow reading takes as is: no whitespace inside, no path separator, no control or
# line-breaking character (`str.splitlines` would split there); anything else goes to `iter_samples`.
_NOT_PLAIN = r"[\s\x00-\x1f\x7f/\\]|\x{85}|\x{2028}|\x{2029}"


def template_paths(ids: pa.Array, template: tuple[str, str]) -> pa.Array:
    """The paths `prefix + id + suffix` of `ids` (Arrow strings)."""
    prefix, suffix = template
    return pc.binary_join_element_wise(prefix, ids, suffix, "")


class ImagePool(Sequence):
    """Unlabeled images: `ids` (Arrow strings) and their paths, held (`paths`) or derived from
    `template`, (prefix, suffix); indexing gives a `Sample`."""

    def __init__(self, ids: pa.Array, paths: pa.Array | None = None, *, template: tuple[str, str] | None = None):
        if (paths is None) == (template is None):
            raise ValueError("an ImagePool takes either its paths or a path template")
        self.ids, self._paths, self.template = ids, paths, template

    @property
    def paths(self) -> pa.Array:
        """Every image's path (made now for a templated pool)."""
        return self._paths if self.template is None else template_paths(self.ids, self.template)

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
        held, paths derived from ids); any other split, or one with a problem, goes through
        `iter_samples`, which names it."""
        pool = _plain_voc_pool(layout, root, split_file)
        return pool if pool is not None else cls.of(iter_samples(layout, root, split_file, with_masks=False))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        return Sample(self.ids[k].as_py(), location(self.path(k)))

    def path(self, k: int) -> str:
        """The path of image `k`."""
        return self._paths[k].as_py() if self.template is None else self.template[0] + self.ids[k].as_py() + self.template[1]

    def image_ids(self) -> list[str]:
        return self.ids.to_pylist()

    def subset(self, image_ids: pa.Array | Iterable[str]) -> "ImagePool":
        """The images among `image_ids`, in the pool's order."""
        if image_ids is self.ids:  # the whole pool (a labeling pass of every image): no hash set
            return self
        wanted = image_ids if isinstance(image_ids, pa.Array) else pa.array(list(image_ids), pa.string())
        keep = pc.is_in(self.ids, value_set=wanted)
        return ImagePool(self.ids.filter(keep), None if self._paths is None else self._paths.filter(keep),
                         template=self.template)

    def among(self, image_ids: Iterable[str]) -> list[str]:
        """The pool's ids that are also in `image_ids` (a small set: overlaps of the splits)."""
        return self.subset(image_ids).image_ids()

    def table(self) -> pa.Table:
        return pa.table({"image_id": self.ids, "image_path": self.paths})

    def blocks(self, rows: int) -> list[pa.Table]:
        """The pool as tables of `rows` images for a Ray Data pass: `image_id`, and `image_path`
        unless the pool has a template (the pass's tasks derive the paths, `with_paths`)."""
        table = pa.table({"image_id": self.ids}) if self.template else self.table()
        return [table.slice(lo, rows) for lo in range(0, len(table), rows)] or [table]


class ImagePaths(Sequence):
    """The paths of an `ImagePool` by index, each made when read (an online method's
    `UnlabeledSet` indexes it: no list of |U| strings in a Train worker or its loader processes)."""

    def __init__(self, pool: ImagePool):
        self.pool = pool

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self.pool.path(i) for i in range(*k.indices(len(self)))]
        return self.pool.path(k)


def write_pool(directory, name: str, pool: ImagePool) -> str:
    """`pool` as one Arrow IPC file in `directory`, named by its content: its ids, and its paths
    or their template in the metadata. An online stage's spec names it, so the spec sent to
    every Train worker holds one path, not |U| of them. Returns the file's path."""
    table = pa.table({"image_id": pool.ids} if pool.template else {"image_id": pool.ids, "image_path": pool._paths})
    if pool.template:
        table = table.replace_schema_metadata({"template": json.dumps(list(pool.template))})
    return write_arrow_named(directory, name, table)


def read_pool(path) -> ImagePool:
    """The pool of a `write_pool` file."""
    table = read_arrow(path)
    ids = table.column("image_id").combine_chunks()
    meta = table.schema.metadata or {}
    if b"template" in meta:
        return ImagePool(ids, template=tuple(json.loads(meta[b"template"])))
    return ImagePool(ids, table.column("image_path").combine_chunks())


def with_paths(batch: pa.Table, template: tuple[str, str] | None) -> pa.Table:
    """A block of `ImagePool.blocks` with its `image_path` column (derived from `template`)."""
    if template is None:
        return batch
    return batch.append_column("image_path", template_paths(batch.column("image_id"), template))


def release_arrow_memory() -> None:
    """Return the memory pyarrow's allocator keeps after frees to the system: the driver's next
    step would otherwise peak on top of it (at 200k images, 11 MiB after reading the pool)."""
    pa.default_memory_pool().release_unused()


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
    parts = []
    try:  # a block of whole lines at a time: the whole text and its split held 5.7 MiB per 100k ids more
        with open(resolve_path(root, split_file), encoding="utf-8") as f:
            while block := f.read(TEXT_BLOCK):
                if not block.endswith("\n"):
                    block += f.readline()
                lines = pc.utf8_trim_whitespace(pc.split_pattern(pa.array([block], pa.string()), "\n").values)
                parts.append(lines.filter(pc.and_(pc.not_equal(lines, ""), pc.invert(pc.starts_with(lines, "#")))))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    entries = pa.concat_arrays(parts) if parts else pa.array([], pa.string())
    del parts
    if not len(entries) or pc.any(pc.match_substring_regex(entries, _NOT_PLAIN)).as_py():
        return None
    if has_duplicates(sorted_ids(entries)):
        return None
    template = (f"{root / 'JPEGImages'}{os.sep}", ".jpg")
    for lo in range(0, len(entries), CHUNK):
        if not all(map(os.path.isfile, template_paths(entries.slice(lo, CHUNK), template).to_pylist())):
            return None  # `iter_samples` lists every missing file
    return ImagePool(entries, template=template)
