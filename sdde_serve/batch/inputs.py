"""Input enumeration for ``sdde score``: files, directories, glob patterns, list files, stdin.

Paths are produced lazily, in a deterministic order, so that a job over millions of files keeps
memory flat and ``--resume`` can recognise the prefix it already did (the order is part of the
resume contract, see :mod:`sdde_serve.batch.writers`):

* a directory is walked recursively, entries sorted by name at every level, keeping files whose
  suffix is an image suffix (hidden entries and symlinked directories are skipped: no loops);
* a glob pattern (``*``, ``?``, ``[...]``, ``**`` for any depth) is matched level by level, also
  sorted; every matching file counts as an image whatever its suffix (the user chose the pattern);
* a ``.txt``/``.lst``/``.list`` file lists one path per line (``#`` comments), a ``.csv`` file
  lists paths in its ``path`` column (or its first column when there is no ``path`` header);
  relative paths in a list file are relative to the list file's directory;
* ``-`` reads paths from standard input, one per line (relative to the working directory);
* any other existing file is an image path (a non-image is recorded as a failed file later).

Paths are yielded as given (not resolved), so that the rows name files the way the user did.
"""

from __future__ import annotations

import csv
import fnmatch
import glob
import io
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TextIO

from sdde_serve.data import IMAGE_SUFFIXES
from sdde_serve.errors import UserError

LIST_SUFFIXES = (".txt", ".lst", ".list", ".csv")


def iter_inputs(specs: Iterable[str], *, stdin: TextIO | None = None) -> Iterator[str]:
    """Every image path named by ``specs``, in order (each spec expanded in turn)."""
    for spec in specs:
        yield from _expand(spec, stdin)


def check_inputs(specs: Iterable[str]) -> None:
    """Fail fast (``UserError``) on a spec that names nothing, before any work starts."""
    for spec in specs:
        if spec == "-" or os.path.exists(spec):
            continue
        if glob.has_magic(spec):
            if next(_glob(spec), None) is None:
                raise UserError(f"input pattern {spec!r} matches no file")
            continue
        raise UserError(f"input {spec!r} does not exist")


def _expand(spec: str, stdin: TextIO | None) -> Iterator[str]:
    if spec == "-":
        yield from _read_lines(stdin if stdin is not None else _stdin(), base=None)
    elif os.path.isdir(spec):
        yield from walk_images(spec)
    elif os.path.isfile(spec) and spec.lower().endswith(LIST_SUFFIXES):
        yield from read_list_file(spec)
    elif os.path.exists(spec) or not glob.has_magic(spec):
        # A missing literal path is kept: the scorer records it as a failed file, so a list
        # that names a vanished file does not stop the job.
        yield spec
    else:
        yield from _glob(spec)


def walk_images(root: str) -> Iterator[str]:
    """Image files under ``root``, recursively, sorted by name at every level."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return  # an unreadable sub-directory is skipped like an empty one
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=False):
            yield from walk_images(entry.path)
        elif entry.name.lower().endswith(IMAGE_SUFFIXES) and entry.is_file():
            yield entry.path


def read_list_file(path: str) -> Iterator[str]:
    """Paths listed in a text or CSV file, relative ones taken from the file's directory."""
    base = os.path.dirname(path)
    # file names are bytes: one that is not UTF-8 is kept (as os.fsdecode would), not fatal
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        if path.lower().endswith(".csv"):
            yield from _read_csv(fh, base)
        else:
            yield from _read_lines(fh, base)


def _stdin() -> TextIO:
    """Standard input as text that keeps non-UTF-8 file names (surrogateescape, like os)."""
    return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="surrogateescape")


def _join(base: str | None, p: str) -> str:
    return p if base is None or os.path.isabs(p) else os.path.join(base, p)


def _read_lines(fh: TextIO, base: str | None) -> Iterator[str]:
    for line in fh:
        p = line.strip()
        if p and not p.startswith("#"):
            yield _join(base, p)


def _read_csv(fh: TextIO, base: str) -> Iterator[str]:
    reader = csv.reader(fh)
    first = next(reader, None)
    if first is None:
        return
    lowered = [c.strip().lower() for c in first]
    if "path" in lowered:
        column = lowered.index("path")
    else:
        column = 0
        reader = _chain_row(first, reader)  # no header: the first row is data
    for row in reader:
        if len(row) > column and row[column].strip():
            yield _join(base, row[column].strip())


def _chain_row(first: list[str], rest: Iterator[list[str]]) -> Iterator[list[str]]:
    yield first
    yield from rest


def _glob(pattern: str) -> Iterator[str]:
    """Files matching ``pattern``, sorted level by level (``glob.iglob`` has no order)."""
    head, parts = _split_pattern(pattern)
    yield from _match(head, parts)


def _split_pattern(pattern: str) -> tuple[str, list[str]]:
    parts = pattern.split(os.sep)
    literal: list[str] = []
    while parts and not glob.has_magic(parts[0]):
        literal.append(parts.pop(0))
    head = os.sep.join(literal)
    if pattern.startswith(os.sep) and not head:
        head = os.sep
    return head, parts


def _match(base: str, parts: list[str]) -> Iterator[str]:
    if not parts:
        if os.path.isfile(base):
            yield base
        return
    part, rest = parts[0], parts[1:]
    if part == "**":
        # zero directories, then one more level of any directory, recursively; a trailing
        # ``**`` matches every file below
        if rest:
            yield from _match(base, rest)
        for name, entry in _sorted_entries(base):
            if entry.is_dir(follow_symlinks=False):
                yield from _match(name, parts)
            elif not rest and entry.is_file():
                yield name
        return
    if not glob.has_magic(part):
        yield from _match(os.path.join(base, part) if base else part, rest)
        return
    for name, entry in _sorted_entries(base):
        if fnmatch.fnmatchcase(entry.name, part):
            if rest:
                if entry.is_dir():
                    yield from _match(name, rest)
            elif entry.is_file():
                yield name


def _sorted_entries(base: str) -> list[tuple[str, os.DirEntry[str]]]:
    """(path as the user would write it, entry), sorted by name, hidden entries skipped."""
    try:
        entries = sorted(
            (e for e in os.scandir(base or ".") if not e.name.startswith(".")),
            key=lambda e: e.name,
        )
    except OSError:
        return []
    return [(os.path.join(base, e.name) if base else e.name, e) for e in entries]
