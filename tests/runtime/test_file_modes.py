"""Files the project writes get the mode a plain ``open()`` gives under the current umask (0644
under 022, 0600 under 077): a model exported by one user is served by a container running as
another. A model this process may not read is refused as "permission denied", not as a format
problem."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
import pytest

from sdde_serve.atomic import write_bytes_atomic, write_text_atomic
from sdde_serve.batch.writers import open_sink, result_columns
from sdde_serve.engine import Engine
from sdde_serve.errors import UserError
from sdde_serve.manifest import load_onnx, save_onnx_atomic
from tests.onnx_factory import make_linear_ensemble

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def plain_open_mode(directory: Path) -> int:
    """What ``open(path, "w")`` gives here, now: the reference every writer must match."""
    probe = directory / "plain"
    probe.write_bytes(b"")
    return mode(probe)


def write_model(path: Path) -> None:  # what `sdde export` and `sdde calibrate` write with
    source = path.with_name("source.onnx")
    make_linear_ensemble(source)
    save_onnx_atomic(onnx.load(str(source)), path)


def write_csv_rows(path: Path) -> None:  # what `sdde score` writes with
    sink = open_sink(path, result_columns(["a", "b"], probs=False), None)
    sink.write([{"path": "x.png", "label": "a", "confidence": 0.5}])
    sink.commit()
    sink.finish()
    sink.close()


WRITERS: dict[str, Callable[[Path], None]] = {
    "atomic bytes": lambda p: write_bytes_atomic(p, b"x"),
    "atomic bytes, unique temporary": lambda p: write_bytes_atomic(p, b"x", unique=True),
    "atomic text": lambda p: write_text_atomic(p, "x"),
    "model (export, calibrate)": write_model,
    "score output (csv)": write_csv_rows,
}


@pytest.mark.parametrize("writer", WRITERS)
def test_written_files_get_the_mode_open_gives_under_the_umask(tmp_path, umask, writer):
    expected = 0o666 & ~umask
    assert plain_open_mode(tmp_path) == expected
    path = tmp_path / "out.csv"
    WRITERS[writer](path)
    assert mode(path) == expected
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_no_private_temporary_files_for_outputs() -> None:
    """``tempfile.mkstemp`` makes 0600 files: outputs go through sdde_serve/atomic.py instead.
    The one use left is Ray's private scratch copy, deleted before its constructor returns."""
    users = sorted(
        str(p.relative_to(ROOT))
        for folder in ("sdde_serve", "training", "export")
        for p in (ROOT / folder).rglob("*.py")
        if re.search(r"\bmkstemp\(", p.read_text())
    )
    assert users == ["sdde_serve/batch/ray_backend.py"]


def deny(monkeypatch, path: Path) -> None:
    """Make ``path`` unreadable, also for root (which ignores file modes): the read raises
    the PermissionError the kernel gives."""
    path.chmod(0)
    real_read, real_load = Path.read_bytes, onnx.load

    def read_bytes(self: Path) -> bytes:
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    def load(f, *args, **kwargs):
        if Path(f) == path:
            raise PermissionError(13, "Permission denied", str(f))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    monkeypatch.setattr(onnx, "load", load)


def test_an_unreadable_model_is_permission_denied_not_a_format_problem(tmp_path, monkeypatch):
    path, _ = make_linear_ensemble(tmp_path / "m.onnx")
    deny(monkeypatch, path)
    expected = f"^permission denied: {re.escape(str(path))} "
    with pytest.raises(UserError, match=expected):
        Engine(path)  # `sdde serve`, `sdde score`
    with pytest.raises(UserError, match=expected):
        load_onnx(path)  # `sdde calibrate`, `sdde eval`
