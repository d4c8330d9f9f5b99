"""``require_extra`` (one "install the extra" message) and ``sdde_serve.atomic`` (one
temp-file-and-rename), and the conventions that keep them the only ones."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import tomllib

from sdde_serve.atomic import atomic_path, fsync_path, write_bytes_atomic, write_text_atomic
from sdde_serve.errors import UserError
from sdde_serve.extras import EXTRA_MODULES, require_extra

ROOT = Path(__file__).resolve().parents[2]


def test_a_missing_module_of_the_extra_is_one_clear_line(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    with pytest.raises(UserError) as info, require_extra("parquet", what="parquet needs pyarrow"):
        import pyarrow  # noqa: F401
    assert str(info.value) == (
        "parquet needs pyarrow (missing module 'pyarrow'): pip install 'sdde-serve[parquet]'"
    )


def test_the_first_extra_that_has_the_module_is_named(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)
    expected = r"sdde-serve\[eval\]' \(or pass --no-plots\)$"
    with (
        pytest.raises(UserError, match=expected),
        require_extra("eval", "train", what="x", alternative="or pass --no-plots"),
    ):
        import sklearn  # noqa: F401


def test_a_module_of_no_listed_extra_is_a_bug_and_propagates(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ModuleNotFoundError), require_extra("eval", what="x"):
        import pyarrow  # noqa: F401
    with pytest.raises(ValueError, match="unknown extras"), require_extra("nope", what="x"):
        pass


def test_the_extras_are_pyprojects() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert set(EXTRA_MODULES) <= set(extras)


def test_no_hand_written_install_hints_in_the_runtime() -> None:
    """The "missing extra" message is written once, in sdde_serve/extras.py."""
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "sdde_serve").rglob("*.py")
        if p.name != "extras.py" and re.search(r"pip install", p.read_text())
    ]
    assert offenders == []


def test_no_hand_written_rename_over_a_file_in_the_runtime() -> None:
    """Temp-file-and-rename is written once, in sdde_serve/atomic.py."""
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "sdde_serve").rglob("*.py")
        if p.name != "atomic.py" and re.search(r"os\.replace\(|\.fsync\(", p.read_text())
    ]
    # the batch sinks append and fsync their own open descriptors (no rename)
    assert offenders == ["sdde_serve/batch/writers.py"]


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half-writ")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temporary left
    write_bytes_atomic(target, b"new", unique=True)
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    fsync_path(tmp_path)  # a directory too


def test_an_explicit_temporary_name_is_used(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    with atomic_path(target, tmp=tmp_path / ".out.bh-tmp.csv") as tmp:
        assert tmp.name == ".out.bh-tmp.csv"
        tmp.write_text("a\n")
    assert target.read_text() == "a\n"
