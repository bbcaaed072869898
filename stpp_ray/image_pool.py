"""The unlabeled split as two Arrow columns, image ids and paths: the driver's copy of a pool
of a million images holds no per-image Python object."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from .datasets import Sample, iter_samples
from .storage import location

CHUNK = 4096  # samples converted to Arrow at a time while the split is read


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
        """The images of an unlabeled split file (`datasets.iter_samples`, no masks)."""
        return cls.of(iter_samples(layout, root, split_file, with_masks=False))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        return Sample(self.ids[k].as_py(), location(self.paths[k].as_py()))

    def image_ids(self) -> list[str]:
        return self.ids.to_pylist()

    def subset(self, image_ids: Iterable[str]) -> "ImagePool":
        """The images among `image_ids`, in the pool's order."""
        keep = pc.is_in(self.ids, value_set=pa.array(list(image_ids), pa.string()))
        return ImagePool(self.ids.filter(keep), self.paths.filter(keep))

    def among(self, image_ids: Iterable[str]) -> list[str]:
        """The pool's ids that are also in `image_ids` (a small set: overlaps of the splits)."""
        return self.subset(image_ids).image_ids()

    def table(self) -> pa.Table:
        return pa.table({"image_id": self.ids, "image_path": self.paths})
