"""Crash-safe file replacement: write a temporary file beside the target, fsync, rename.

A reader (a server restarting, a batch job resuming) sees either the old file or the new one,
never a half-written one: a rename within one directory is atomic on POSIX, and the directory is
fsynced after it so the rename itself survives a power loss.

The new file gets the mode a plain ``open(path, "w")`` would give (0644 under the usual umask
022, 0600 under 077): a model written here is often read by another user (a container running
as uid 10001 with the file bind-mounted), so the temporary file is not made private the way
``tempfile.mkstemp`` (always 0600) would make it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory by name (a directory: makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_unique(directory: Path, *, prefix: str, suffix: str) -> Path:
    """Create a new empty file with a unique name in ``directory`` and return its path.

    Like ``tempfile.mkstemp`` (``O_EXCL``: never an existing file), but with mode 0666 masked by
    the umask, as ``open()`` gives.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        candidate = directory / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            os.close(os.open(candidate, flags, 0o666))
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"no unique temporary name left in {directory}")


@contextlib.contextmanager
def atomic_path(
    path: str | Path, *, tmp: str | Path | None = None, unique: bool = False
) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; when the block succeeds it is
    fsynced and renamed over ``path`` (then the directory fsynced); when it fails it is removed.

    The temporary name is ``tmp``, else ``.NAME.tmp`` in the same directory; ``unique`` makes it
    unique (several writers of one target at once, e.g. two ``sdde calibrate`` runs).
    """
    path = Path(path)
    if tmp is not None:
        tmp_path = Path(tmp)
    elif unique:
        tmp_path = create_unique(path.parent, prefix=f".{path.name}.", suffix=".tmp")
    else:
        tmp_path = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp_path
        fsync_path(tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes, *, unique: bool = False) -> None:
    with atomic_path(path, unique=unique) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))
