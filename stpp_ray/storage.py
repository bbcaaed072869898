"""Run and data locations that are a local path or an S3 URI (`s3://bucket/prefix`).

`location(p)` gives a `pathlib.Path` for a local path and a `BucketPath` for a URI. A
`BucketPath` has the part of the `Path` interface this project uses, on `pyarrow.fs` (what
Ray resolves its `storage_path` with), so the code that writes a run directory is the same
for both. Credentials and the endpoint come from the environment of each process (AWS_*
variables, `~/.aws`, the instance role; `AWS_ENDPOINT_URL` for an S3-compatible store),
never from the config.
"""

from __future__ import annotations

import fnmatch
import io
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

URI = re.compile(r"^(s3)://([^/]+)(/.*)?$")
ANY_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class StorageError(OSError):
    """An object store that cannot be reached, read or written (one line, naming the URI)."""


def is_uri(path) -> bool:
    return isinstance(path, BucketPath) or bool(URI.match(str(path)))


def location(path) -> "Path | BucketPath":
    """`path` as a BucketPath when it is an S3 URI, else as a Path (`file://` URIs included)."""
    if isinstance(path, (Path, BucketPath)):
        return path
    path = str(path)
    if is_uri(path):
        return BucketPath(path)
    scheme = ANY_URI.match(path)
    if scheme and scheme.group(1) == "file":
        return Path(path[len("file://"):])
    if scheme:
        raise StorageError(f"{path}: {scheme.group(1)}:// is not supported; s3:// is, and any S3-compatible "
                           "store through AWS_ENDPOINT_URL")
    return Path(path)


def _filesystem(scheme: str, bucket: str):
    # Per process: a client inherited through fork() is not safe to use.
    return _process_filesystem(scheme, bucket, os.getpid())


@lru_cache(maxsize=None)
def _process_filesystem(scheme: str, bucket: str, pid: int):
    from pyarrow import fs

    return fs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]


def _reason(err: BaseException) -> str:
    """The store's message on one line, from pyarrow's 'AWS Error ...' on, without the request id."""
    text = " ".join(str(err).split())
    text = "AWS Error " + text.split("AWS Error ", 1)[1] if "AWS Error " in text else text
    text = re.sub(r"\s*\(Request ID: [^)]*\)", "", text)
    return text.rstrip(".")[:300]


class BucketPath:
    """An object-store key prefix with the `Path` methods the run directory needs."""

    def __init__(self, uri: str):
        match = URI.match(uri)
        if not match:
            raise StorageError(f"{uri}: not an S3 URI (s3://bucket/prefix)")
        self.scheme, self.bucket = match.group(1), match.group(2)
        self.key = (match.group(3) or "").strip("/")

    # ---- naming ---------------------------------------------------------------------
    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}" + (f"/{self.key}" if self.key else "")

    def __repr__(self) -> str:
        return f"BucketPath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, BucketPath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __truediv__(self, part) -> "BucketPath":
        part = str(part).strip("/")
        return BucketPath(f"{self}/{part}") if part else self

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    @property
    def parent(self) -> "BucketPath":
        return BucketPath(f"{self.scheme}://{self.bucket}/" + self.key.rpartition("/")[0])

    def with_name(self, name: str) -> "BucketPath":
        return self.parent / name

    def with_suffix(self, suffix: str) -> "BucketPath":
        return self.with_name(self.stem + suffix)

    def resolve(self) -> "BucketPath":
        return self

    def is_absolute(self) -> bool:
        return True

    def relative_to(self, other: "BucketPath") -> Path:
        prefix = other.key + "/" if other.key else ""
        if other.bucket != self.bucket or not self.key.startswith(prefix):
            raise ValueError(f"{self} is not under {other}")
        return Path(self.key[len(prefix):])

    # ---- the store ------------------------------------------------------------------
    @property
    def fs(self):
        return _filesystem(self.scheme, self.bucket)

    @property
    def fs_path(self) -> str:
        """The path `pyarrow.fs` and Ray take with `fs`: bucket/key."""
        return f"{self.bucket}/{self.key}" if self.key else self.bucket

    def _call(self, what: str, fn, *args):
        try:
            return fn(*args)
        except FileNotFoundError:
            raise
        except OSError as err:
            raise StorageError(f"{self}: cannot {what}: {_reason(err)}") from None

    def _info(self):
        return self._call("read", self.fs.get_file_info, self.fs_path)

    def exists(self) -> bool:
        from pyarrow.fs import FileType

        return self._info().type != FileType.NotFound

    def is_file(self) -> bool:
        from pyarrow.fs import FileType

        return self._info().type == FileType.File

    def is_dir(self) -> bool:
        from pyarrow.fs import FileType

        return self._info().type == FileType.Directory

    def stat(self):
        info = self._info()
        if info.size is None:
            raise FileNotFoundError(f"{self}: no such object")
        return SimpleNamespace(st_size=info.size)

    def read_bytes(self) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(self.fs_path) as f:
                return f.read()
        return self._call("read", read)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        """One upload: the object appears whole when it completes, or not at all."""
        def write() -> None:
            with self.fs.open_output_stream(self.fs_path) as f:
                f.write(data)
        self._call("write", write)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def open(self, mode: str = "rb"):
        """Binary reads are seekable (PIL, torch.load); writes are buffered into one upload."""
        if mode == "rb":
            return self._call("read", self.fs.open_input_file, self.fs_path)
        if mode == "wb":
            return _Upload(self)
        raise ValueError(f"{self}: open mode {mode!r} is not supported on an object store")

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: a key prefix exists once an object is under it."""

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self._call("delete", self.fs.delete_file, self.fs_path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmtree(self) -> None:
        """Every object under this prefix (nothing if there is none)."""
        if self.is_dir():
            self._call("delete", self.fs.delete_dir, self.fs_path)

    def iterdir(self):
        from pyarrow.fs import FileSelector

        infos = self._call("list", self.fs.get_file_info, FileSelector(self.fs_path, allow_not_found=True))
        return iter(sorted(self / info.base_name for info in infos))

    def __lt__(self, other: "BucketPath") -> bool:
        return str(self) < str(other)

    def glob(self, pattern: str):
        """One level only (`*.parquet`), as this project uses it."""
        if "/" in pattern:
            raise ValueError(f"{self}: glob pattern {pattern!r} with a '/' is not supported on an object store")
        return [p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern)]

    def files_under(self) -> set[str]:
        """The keys of every object under this prefix, relative to it, from one listing."""
        from pyarrow.fs import FileSelector, FileType

        infos = self._call("list", self.fs.get_file_info, FileSelector(self.fs_path, recursive=True,
                                                                     allow_not_found=True))
        cut = len(self.fs_path) + 1
        return {info.path[cut:] for info in infos if info.type == FileType.File}

    def copy_tree_to(self, target: "BucketPath") -> None:
        """Copy every object under this prefix to `target` (server-side), then delete this prefix."""
        for rel in sorted(self.files_under()):
            self._call("copy", self.fs.copy_file, f"{self.fs_path}/{rel}", f"{target.fs_path}/{rel}")
        self.rmtree()


class _Upload(io.BytesIO):
    """A binary file uploaded in one piece when its `with` block ends without an error (an
    error leaves the object as it was)."""

    def __init__(self, target: BucketPath):
        super().__init__()
        self.target = target

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.target.write_bytes(self.getvalue())
        super().close()

    def close(self) -> None:
        """Closing outside a `with` block also uploads."""
        if not self.closed:
            self.target.write_bytes(self.getvalue())
        super().close()


def remove_tree(path) -> None:
    """Delete a directory or key prefix and everything under it; nothing if it is not there."""
    loc = location(path)
    if isinstance(loc, BucketPath):
        loc.rmtree()
    else:
        shutil.rmtree(loc, ignore_errors=True)


def publish_tree(source, target) -> None:
    """Move the finished directory `source` to `target`, replacing it. A rename on disk; on an
    object store a copy then delete, which is not atomic: the manifest entry written after it
    is what publishes the stage's outputs there."""
    source, target = location(source), location(target)
    remove_tree(target)
    if isinstance(source, BucketPath):
        source.copy_tree_to(target)
    else:
        source.rename(target)


@contextmanager
def local_copy(path):
    """A local file with the content of `path` (itself when it is local) for the block."""
    loc = location(path)
    if not isinstance(loc, BucketPath):
        yield loc
        return
    with tempfile.TemporaryDirectory(prefix="stpp_ray_") as tmp:
        copy = Path(tmp) / loc.name
        copy.write_bytes(loc.read_bytes())
        yield copy


def require_local(command: str, **paths) -> None:
    """The commands whose directories must be on disk (a sweep's, a comparison's) refuse a URI."""
    for key, path in paths.items():
        if ANY_URI.match(str(path)):
            raise StorageError(f"{key}={path}: {command} needs a directory (a shared filesystem on a "
                               "cluster); object storage is for `stpp-ray run`")


def ray_storage_path(path) -> str:
    """What Ray Train and Tune take as `storage_path`: an absolute local path or the URI."""
    loc = location(path)
    return str(loc) if isinstance(loc, BucketPath) else str(loc.resolve())


def check_writable(path, key: str = "run.output_dir") -> None:
    """Fail now, in one line naming `key` and the URI, when an object-store directory cannot be
    written. A local directory needs no check here: its first write names it."""
    loc = location(path)
    if not isinstance(loc, BucketPath):
        return
    probe = loc / ".stpp_ray_write_check"
    try:
        probe.write_bytes(b"")
        probe.unlink(missing_ok=True)
    except OSError as err:
        reason = _reason(err)
        hint = "" if "NO_SUCH_BUCKET" in reason else (
            ". Credentials come from the environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, ~/.aws, "
            "or the instance role) and an S3-compatible endpoint from AWS_ENDPOINT_URL")
        raise StorageError(f"{key}={loc}: cannot write there: {reason}{hint}") from None
