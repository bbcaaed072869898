"""File writes that a crash cannot leave half done, and a lock shared across processes.

Paths may be object-store URIs (`storage.location`): there one upload is the atomic write."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .storage import BucketPath, location


@contextmanager
def atomic_output(path: str | Path):
    """A binary file that replaces `path` only when the block ends without an error: a
    temporary file beside it renamed over it, or one upload to an object store."""
    path = location(path)
    if isinstance(path, BucketPath):
        with path.open("wb") as f:
            yield f
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        yield f
    os.replace(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through `atomic_output`."""
    with atomic_output(path) as f:
        f.write(text.encode())


def write_json_atomic(path: str | Path, obj) -> None:
    """`obj` as indented JSON (other types as their str), written atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def write_arrow_atomic(path: str | Path, table) -> None:
    """`table` (pyarrow) as one Arrow IPC file, written atomically."""
    import pyarrow as pa

    with atomic_output(path) as f, pa.ipc.new_file(f, table.schema) as writer:
        writer.write_table(table)


def write_arrow_named(directory: str | Path, name: str, table, salt: str = "") -> str:
    """`table` as an Arrow IPC file in `directory` named by `name` and its content (and `salt`):
    writing the same table again is a no-op. Returns its path."""
    digest = hashlib.sha256(salt.encode())
    digest.update(str(table.schema.remove_metadata()).encode())  # the metadata in full below (str truncates it)
    for column in table.columns:
        for chunk in column.chunks:
            # A slice shares its parent's buffers: its offset and length tell them apart.
            digest.update(f"{chunk.offset}:{len(chunk)}".encode())
            for buf in chunk.buffers():
                if buf is not None:
                    digest.update(buf)
    digest.update(json.dumps({k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}, sort_keys=True).encode())
    path = location(directory) / f"{name}-{digest.hexdigest()[:16]}.arrow"
    if not path.exists():
        write_arrow_atomic(path, table)
    return str(path)


def read_arrow(path: str | Path):
    """The table of an Arrow IPC file (local or in a bucket)."""
    import pyarrow as pa

    loc = location(path)
    with (loc.open("rb") if isinstance(loc, BucketPath) else pa.OSFile(str(loc))) as f:
        return pa.ipc.open_file(f).read_all()


@contextmanager
def locked(path: str | Path | None):
    """Exclusive lock on the file `path` (created if missing; no-op for None) for the block.

    An object-store `path` is locked on this machine only, through a local file named by it."""
    if path is None:
        yield
        return
    if isinstance(location(path), BucketPath):
        path = Path(tempfile.gettempdir()) / "stpp_ray_locks" / hashlib.sha256(str(path).encode()).hexdigest()[:16]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
