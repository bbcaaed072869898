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


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`."""
    path = location(path)
    if isinstance(path, BucketPath):
        path.write_text(text)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, obj) -> None:
    """`obj` as indented JSON (other types as their str), written atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


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
