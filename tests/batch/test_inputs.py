"""Input enumeration: every kind of INPUT, deterministic order, lazy, clear usage errors."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from sdde_serve.batch.inputs import check_inputs, iter_inputs
from sdde_serve.errors import UserError


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for rel in [
        "b/z.png",
        "b/a.JPG",
        "a/y.png",
        "a/deep/x.jpeg",
        "top.png",
        "c/notes.txt",
        "a/.hidden.png",
        ".git/obj.png",
    ]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    return tmp_path


def test_directory_walk_is_recursive_sorted_and_images_only(tree: Path) -> None:
    got = [os.path.relpath(p, tree) for p in iter_inputs([str(tree)])]
    assert got == ["a/deep/x.jpeg", "a/y.png", "b/a.JPG", "b/z.png", "top.png"]


def test_glob_patterns_sorted(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree)
    assert list(iter_inputs(["*/*.png"])) == ["a/y.png", "b/z.png"]
    assert list(iter_inputs(["**/*.png"])) == ["top.png", "a/y.png", "b/z.png"]
    assert list(iter_inputs([str(tree / "a" / "**")])) == [
        str(tree / "a/deep/x.jpeg"),
        str(tree / "a/y.png"),
    ]


def test_list_files_txt_csv_and_stdin(tree: Path) -> None:
    (tree / "list.txt").write_text("# comment\ntop.png\n\n/abs/path.png\nb/z.png\n")
    (tree / "with_header.csv").write_text('id,path\n1,a/y.png\n2,"b/a.JPG"\n')
    (tree / "no_header.csv").write_text("top.png,3\nb/z.png,4\n")
    assert list(iter_inputs([str(tree / "list.txt")])) == [
        str(tree / "top.png"),
        "/abs/path.png",
        str(tree / "b/z.png"),
    ]
    assert list(iter_inputs([str(tree / "with_header.csv")])) == [
        str(tree / "a/y.png"),
        str(tree / "b/a.JPG"),
    ]
    assert list(iter_inputs([str(tree / "no_header.csv")])) == [
        str(tree / "top.png"),
        str(tree / "b/z.png"),
    ]
    stdin = io.StringIO("rel/one.png\n  two.png  \n")
    assert list(iter_inputs(["-", str(tree / "top.png")], stdin=stdin)) == [
        "rel/one.png",
        "two.png",
        str(tree / "top.png"),
    ]


def test_enumeration_is_lazy() -> None:
    # a generator of inputs is consumed only as far as asked: stdin with endless lines
    class Endless(io.StringIO):
        def __iter__(self):
            i = 0
            while True:
                i += 1
                yield f"{i}.png\n"

    it = iter_inputs(["-"], stdin=Endless())
    assert [next(it) for _ in range(3)] == ["1.png", "2.png", "3.png"]


def test_check_inputs_rejects_nothing_matching(tree: Path) -> None:
    check_inputs([str(tree), str(tree / "*.png"), "-"])
    with pytest.raises(UserError, match="does not exist"):
        check_inputs([str(tree / "missing.png")])
    with pytest.raises(UserError, match="matches no file"):
        check_inputs([str(tree / "*.gif")])
