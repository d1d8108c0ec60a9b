"""File helpers every layer shares: an atomic write and a file's content hash."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from medrobust.faults import fault_point


def atomic_write(target: str | os.PathLike, write: Callable[[Path], object], suffix: str = ".tmp") -> Path:
    """Write ``target`` through ``write(temporary_path)`` beside it, then rename it into place: an interrupted
    write never leaves a half-written file under the target's name. ``suffix``: the temporary file's (a writer
    that picks the format by the name, as nibabel does, needs the target's own). Returns the target."""
    target = Path(target)
    descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    os.close(descriptor)
    try:
        write(Path(temporary))
        fault_point("replacing")
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    """``atomic_write`` of a text file (UTF-8)."""
    return atomic_write(target, lambda path: path.write_text(text, encoding="utf-8"))


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file's bytes, cached in-process by (path, size, modification time)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    cached = _HASH_CACHE.get(key)
    if cached is None:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        cached = _HASH_CACHE[key] = digest.hexdigest()
    return cached
