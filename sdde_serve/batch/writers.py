"""Output files of ``sdde score``: rows, errors, the resume journal, crash-safe commits.

Formats are chosen by the output's extension (:data:`SINKS`): ``.jsonl``, ``.csv`` and ``.parquet``
(the last needs pyarrow, the ``[parquet]`` extra).

Crash safety. Rows are staged in memory and made durable in *commits*:

* ``.jsonl`` / ``.csv``: the staged rows of a commit are appended with one ``write`` of complete
  lines, then ``fsync``;
* ``.parquet``: each commit writes one part file ``OUT.parts/part-NNNNNN.parquet`` (written to a
  temporary name, fsynced, renamed: a part is either whole or absent); when the job finishes the
  parts are merged into ``OUT`` (again temporary file + rename) and the parts directory removed.

After the row and error files are durable, one line is appended (and fsynced) to the journal
``OUT.journal``: how many inputs of the (deterministic) input sequence are done, a SHA-256 of those
input paths, the byte size / part count of each file, and running counts. ``--resume`` reads the
last complete journal line, cuts each file back to that commit (dropping rows written after it,
which are then scored again) and skips the inputs it covers: every file is scored exactly once.
The journal is removed when the job completes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sdde_serve.atomic import atomic_path, write_text_atomic
from sdde_serve.errors import UserError
from sdde_serve.extras import require_extra

JOURNAL_SCHEMA = "sdde-score-journal/1"


@dataclass(frozen=True)
class Column:
    """One output column.

    ``kind``: str, int, float, bool, floats (a vector, e.g. probs) or topk (a list of
    ``{label, class_name, probability}``; a JSON string in CSV).
    """

    name: str
    kind: str
    # for kind "floats": the element names (class names), used for CSV's one column per element
    items: tuple[str, ...] = ()


def result_columns(classes: Sequence[str], *, probs: bool, top_k: bool = False) -> list[Column]:
    """The row of one scored image (the same for local, ``--url`` and ``--ray`` jobs)."""
    cols = [
        Column("path", "str"),
        Column("label", "int"),
        Column("class_name", "str"),
        Column("confidence", "float"),
        Column("ood_score", "float"),
        Column("ood_p_value", "float"),  # empty for models without calibration scores
        Column("is_ood", "bool"),
        Column("rejected", "bool"),
        Column("agreement", "float"),
    ]
    if top_k:
        cols.append(Column("top_k", "topk"))
    if probs:
        cols.append(Column("probs", "floats", tuple(classes)))
    return cols


ERROR_COLUMNS = [Column("path", "str"), Column("reason", "str")]


class Sink(Protocol):
    """A row file. ``write`` stages rows, ``commit`` makes them durable, ``finish`` finalises."""

    def write(self, rows: list[dict[str, Any]]) -> None: ...

    def commit(self) -> dict[str, int]: ...

    def finish(self) -> None: ...

    def close(self) -> None: ...


def _committed_prefix(path: Path, size: int, sha256: str | None) -> Any:
    """Check that ``path`` still holds the ``size`` committed bytes (and their SHA-256 when the
    journal has it); returns the running hash of that prefix, to be continued by later commits.

    Cutting a file back to the committed size must never *extend* it: ``ftruncate`` pads a file
    that was deleted or shortened with NUL bytes, which a resume would then silently keep.
    """
    actual = path.stat().st_size if path.exists() else -1
    if actual < size:
        state = "is missing" if actual < 0 else f"has {actual} bytes"
        raise UserError(
            f"cannot resume: {path} {state} but the journal committed {size}; the file was "
            "deleted, moved or cut short since: start again without --resume"
        )
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        left = size
        while left:
            block = fh.read(min(left, 1 << 20))
            if not block:
                break
            h.update(block)
            left -= len(block)
    if sha256 is not None and h.hexdigest() != sha256:
        raise UserError(
            f"cannot resume: the first {size} bytes of {path} differ from what the journal "
            "committed (the file was edited or replaced): start again without --resume"
        )
    return h


class _AppendSink:
    """Text formats appended in whole lines; the committed state is the file's byte size and
    the SHA-256 of those bytes."""

    def __init__(self, path: Path, columns: list[Column], state: dict[str, Any] | None) -> None:
        self.path, self.columns = path, columns
        if state is None:
            # 0666 masked by the umask: the mode open() gives (0644 under umask 022)
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            self._size = 0
            self._hash = hashlib.sha256()
        else:
            self._size = int(state["bytes"])
            self._hash = _committed_prefix(path, self._size, state.get("sha256"))
            self._fd = os.open(path, os.O_WRONLY)
            os.ftruncate(self._fd, self._size)  # drop anything written after the last commit
            os.fsync(self._fd)
        self._pending: list[str] = [self.header()] if self._size == 0 else []

    def header(self) -> str:
        return ""

    def encode(self, rows: list[dict[str, Any]]) -> str:
        raise NotImplementedError

    def write(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            self._pending.append(self.encode(rows))

    def commit(self) -> dict[str, int]:
        data = "".join(self._pending).encode("utf-8")
        self._pending = []
        view = memoryview(data)
        os.lseek(self._fd, self._size, os.SEEK_SET)
        while view:  # one write() in practice; the loop covers short writes
            n = os.write(self._fd, view)
            view = view[n:]
        os.fsync(self._fd)
        self._size += len(data)
        self._hash.update(data)
        return {"bytes": self._size, "sha256": self._hash.hexdigest()}

    def finish(self) -> None:
        pass

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class JsonlSink(_AppendSink):
    def encode(self, rows: list[dict[str, Any]]) -> str:
        return "".join(json.dumps(r, ensure_ascii=False, allow_nan=True) + "\n" for r in rows)


def _csv_names(columns: list[Column]) -> list[str]:
    names: list[str] = []
    for c in columns:
        names += [f"prob_{item}" for item in c.items] if c.kind == "floats" else [c.name]
    return names


# A cell starting with one of these is a formula to Excel, LibreOffice and Google Sheets
# (CSV injection, OWASP): such text cells get a leading apostrophe, which spreadsheets hide.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "|", "%")


def csv_text(value: str) -> str:
    """A text cell that a spreadsheet shows as text, never runs (undone by :func:`_from_csv`).
    A leading apostrophe is doubled, so the escape is lossless."""
    return "'" + value if value.startswith((*_FORMULA_START, "'")) else value


def escape_path(path: str) -> str:
    """``path`` as UTF-8 text: unchanged when it is valid UTF-8; otherwise (a file name whose
    bytes are not UTF-8, which Python carries as lone surrogates) each undecodable byte is
    written ``\\xNN`` and each backslash doubled, so :func:`unescape_path` restores the bytes."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        raw = path.encode("utf-8", "surrogateescape")
        return raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def unescape_path(text: str) -> bytes:
    """The file name bytes of an :func:`escape_path` result that was escaped."""
    out, i, raw = bytearray(), 0, text.encode("utf-8")
    while i < len(raw):
        if raw[i : i + 2] == b"\\\\":
            out += b"\\"
            i += 2
        elif raw[i : i + 2] == b"\\x" and i + 4 <= len(raw):
            out.append(int(raw[i + 2 : i + 4], 16))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return bytes(out)


def _csv_cell(value: Any, kind: str) -> str:
    if value is None:
        return ""
    if kind == "str":
        return csv_text(str(value))
    if kind == "bool":
        return "true" if value else "false"
    if kind == "topk":
        return json.dumps(value, ensure_ascii=False)
    return repr(value) if kind == "float" else str(value)


class CsvSink(_AppendSink):
    """One column per field; a vector becomes one ``prob_<class>`` column per element."""

    def header(self) -> str:
        return self._line(_csv_names(self.columns))

    @staticmethod
    def _line(cells: list[str]) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(cells)
        return buf.getvalue()

    def encode(self, rows: list[dict[str, Any]]) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        for row in rows:
            cells: list[str] = []
            for c in self.columns:
                value = row.get(c.name)
                if c.kind == "floats":
                    values = value if value is not None else [None] * len(c.items)
                    cells += [_csv_cell(v, "float") for v in values]
                else:
                    cells.append(_csv_cell(value, c.kind))
            writer.writerow(cells)
        return buf.getvalue()


def _arrow_schema(columns: list[Column]):  # -> pyarrow.Schema
    pa = _pyarrow()
    types = {
        "str": pa.string(),
        "int": pa.int64(),
        "float": pa.float64(),
        "bool": pa.bool_(),
        "floats": pa.list_(pa.float32()),
        "topk": pa.list_(
            pa.struct(
                [("label", pa.int64()), ("class_name", pa.string()), ("probability", pa.float64())]
            )
        ),
    }
    return pa.schema([pa.field(c.name, types[c.kind]) for c in columns])


def _pyarrow():
    with require_extra("parquet", what="parquet output needs pyarrow"):
        import pyarrow
        import pyarrow.parquet  # the submodule must be loaded
    return pyarrow


class ParquetSink:
    """Each commit is one atomically renamed part file; ``finish`` merges them into ``path``."""

    def __init__(self, path: Path, columns: list[Column], state: dict[str, int] | None) -> None:
        self.path, self.columns = path, columns
        self.schema = _arrow_schema(columns)
        self.parts_dir = parts_dir(path)
        if state is None:
            shutil.rmtree(self.parts_dir, ignore_errors=True)
            self._parts = 0
        else:
            self._parts = int(state["parts"])
            missing = [
                i for i in range(self._parts) if not (self.parts_dir / _part_name(i)).is_file()
            ]
            if missing:
                raise UserError(
                    f"cannot resume: {self.parts_dir} lacks {len(missing)} of the "
                    f"{self._parts} committed parts (first: {_part_name(missing[0])}): start "
                    "again without --resume"
                )
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        for f in self.parts_dir.iterdir():  # parts after the last commit, unfinished temporaries
            if not f.name.endswith(".parquet") or _part_index(f) >= self._parts:
                f.unlink()
        self._pending: list[dict[str, Any]] = []

    def write(self, rows: list[dict[str, Any]]) -> None:
        self._pending += rows

    def commit(self) -> dict[str, int]:
        if self._pending:
            pa = _pyarrow()
            table = pa.Table.from_pylist(self._pending, schema=self.schema)
            # an unfinished temporary does not end in .parquet: dropped on resume
            with atomic_path(self.parts_dir / _part_name(self._parts)) as tmp:
                pa.parquet.write_table(table, tmp)
            self._parts += 1
            self._pending = []
        return {"parts": self._parts}

    def finish(self) -> None:
        pa = _pyarrow()
        # streaming merge: one part in memory at a time, each becomes a row group
        with atomic_path(self.path) as tmp, pa.parquet.ParquetWriter(tmp, self.schema) as writer:
            for i in range(self._parts):
                writer.write_table(pa.parquet.read_table(self.parts_dir / _part_name(i)))
        shutil.rmtree(self.parts_dir, ignore_errors=True)

    def close(self) -> None:
        pass


def _part_name(i: int) -> str:
    return f"part-{i:06d}.parquet"


def parts_dir(path: Path) -> Path:
    return path.with_name(path.name + ".parts")


def _part_index(f: Path) -> int:
    try:
        return int(f.name.split("-")[1].split(".")[0])
    except (IndexError, ValueError):
        return 1 << 62


SINKS: dict[str, type] = {".jsonl": JsonlSink, ".csv": CsvSink, ".parquet": ParquetSink}


def check_format(path: Path) -> None:
    if path.suffix.lower() not in SINKS:
        raise UserError(
            f"{path}: unknown output format {path.suffix!r}; use one of {', '.join(SINKS)}"
        )
    if path.suffix.lower() == ".parquet":
        _pyarrow()


def open_sink(path: Path, columns: list[Column], state: dict[str, int] | None = None) -> Sink:
    check_format(path)
    return SINKS[path.suffix.lower()](path, columns, state)


# --- reading back (tests, resume fallback, users) ----------------------------------------------

_KINDS = {
    "label": "int",
    "confidence": "float",
    "ood_score": "float",
    "ood_p_value": "float",
    "ood_bh": "bool",
    "agreement": "float",
    "is_ood": "bool",
    "rejected": "bool",
    "top_k": "topk",
}


def _from_csv(value: str, kind: str) -> Any:
    if value == "":
        return None
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    if kind == "bool":
        return value == "true"
    if kind == "topk":
        return json.loads(value)
    return value[1:] if value.startswith("'") else value  # csv_text's escape


def read_rows(path: str | Path) -> Iterator[dict[str, Any]]:
    """The rows of an output or errors file as dicts, whatever the format.

    A ``.parquet`` output of an unfinished job is read from its committed parts. CSV vectors
    (``prob_<class>`` columns) come back as one ``probs`` list, as in the other formats.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.endswith("\n"):  # a line without its newline was never committed
                    yield json.loads(line)
    elif suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.reader(fh)
            names = next(reader, [])
            for cells in reader:
                row: dict[str, Any] = {}
                probs: list[float | None] = []
                for name, value in zip(names, cells, strict=True):
                    if name.startswith("prob_"):
                        probs.append(_from_csv(value, "float"))
                    else:
                        row[name] = _from_csv(value, _KINDS.get(name, "str"))
                if any(n.startswith("prob_") for n in names):
                    row["probs"] = None if all(p is None for p in probs) else probs
                yield row
    elif suffix == ".parquet":
        pq = _pyarrow().parquet
        files = [path] if path.exists() else sorted(parts_dir(path).glob("part-*.parquet"))
        for f in files:
            yield from pq.read_table(f).to_pylist()
    else:
        raise UserError(f"{path}: unknown format {suffix!r}")


# --- the journal and the pair of files it commits ----------------------------------------------


@dataclass
class Commit:
    """What the journal's last line says is durable."""

    n: int  # inputs of the input sequence that are done (scored or failed)
    sha: str  # SHA-256 of those inputs' paths
    out: dict[str, int]
    errors: dict[str, int]
    counts: dict[str, int]


def journal_path(out: Path) -> Path:
    return out.with_name(out.name + ".journal")


def read_journal(path: Path) -> tuple[dict[str, Any] | None, Commit | None]:
    """(header, last complete commit); a torn last line (crash while appending) is ignored."""
    if not path.exists():
        return None, None
    header, last = None, None
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.endswith("\n"):
                break
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break
            if header is None:
                header = entry
            else:
                last = Commit(**entry)
    return header, last


def _text_paths(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows whose ``path`` every format can store (see :func:`escape_path`)."""
    return [
        {**r, "path": escape_path(r["path"])}
        if isinstance(r.get("path"), str) and not r["path"].isascii()
        else r
        for r in rows
    ]


class JobFiles:
    """The output file, the errors file and the journal of one job, committed together."""

    def __init__(
        self,
        out: Path,
        errors: Path,
        columns: list[Column],
        header: dict[str, Any],
        *,
        resume: bool,
    ) -> None:
        check_format(out)
        check_format(errors)
        if out.resolve() == errors.resolve():
            raise UserError(f"the errors file must differ from the output ({out})")
        self.out, self.errors, self.journal = out, errors, journal_path(out)
        # the errors file is part of the job: resuming with another --errors would lose the first
        # run's failures from the file the user reads
        header = {"schema": JOURNAL_SCHEMA, **header, "errors_file": os.path.abspath(errors)}
        old_header, last = read_journal(self.journal) if resume else (None, None)
        if resume and old_header is None and (out.exists() or parts_dir(out).exists()):
            raise UserError(
                f"{out} exists but has no journal ({self.journal.name}): the job finished or was "
                f"not written by sdde score; nothing to resume (remove it to score again)"
            )
        if old_header is not None and old_header != header:
            diff = sorted(k for k in {*header, *old_header} if header.get(k) != old_header.get(k))
            raise UserError(
                f"cannot resume {out}: the job's settings changed ({', '.join(diff)}); "
                f"use the same model and options, or start again without --resume"
            )
        self.resumed: Commit | None = last
        out.parent.mkdir(parents=True, exist_ok=True)
        errors.parent.mkdir(parents=True, exist_ok=True)
        if old_header is None:
            self._start_journal(header)
        self.out_sink = open_sink(out, columns, last.out if last else None)
        self.err_sink = open_sink(errors, ERROR_COLUMNS, last.errors if last else None)
        self._jfd = os.open(self.journal, os.O_WRONLY | os.O_APPEND)

    def _start_journal(self, header: dict[str, Any]) -> None:
        write_text_atomic(self.journal, json.dumps(header, sort_keys=True) + "\n")

    def write(self, rows: list[dict[str, Any]], errors: list[dict[str, Any]]) -> None:
        self.out_sink.write(_text_paths(rows))
        self.err_sink.write(_text_paths(errors))

    def commit(self, n: int, sha: str, counts: dict[str, int]) -> None:
        """Make everything written so far durable, then record it in the journal."""
        entry = {
            "n": n,
            "sha": sha,
            "out": self.out_sink.commit(),
            "errors": self.err_sink.commit(),
            "counts": counts,
        }
        os.write(self._jfd, (json.dumps(entry) + "\n").encode())
        os.fsync(self._jfd)

    def finish(self) -> None:
        """The job is complete: finalise the files and drop the journal."""
        self.out_sink.finish()
        self.err_sink.finish()
        self.close()
        self.journal.unlink(missing_ok=True)

    def close(self) -> None:
        self.out_sink.close()
        self.err_sink.close()
        if self._jfd >= 0:
            os.close(self._jfd)
            self._jfd = -1
