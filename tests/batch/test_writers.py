"""Output formats round-trip; only committed rows survive a crash; the journal drives resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from sdde_serve.batch.writers import (
    ERROR_COLUMNS,
    JobFiles,
    journal_path,
    open_sink,
    parts_dir,
    read_journal,
    read_rows,
    result_columns,
    unescape_path,
)
from sdde_serve.errors import UserError

CLASSES = ["zero", "one, with comma", 'two "quoted"']
FORMATS = [".jsonl", ".csv", ".parquet"]


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        probs = rng.dirichlet(np.ones(3)).astype(np.float32)
        rejected = i % 5 == 4
        label = int(probs.argmax())
        rows.append(
            {
                "path": f"dir/ä image {i},x.png",
                "label": None if rejected else label,
                "class_name": None if rejected else CLASSES[label],
                "confidence": None if rejected else float(probs[label]),
                "ood_score": float(np.float32(rng.normal(3, 2))),
                "ood_p_value": (i + 1) / 24,
                "is_ood": bool(rejected or i % 3 == 0),
                "rejected": rejected,
                "agreement": None if rejected else float(rng.integers(0, 4) / 3),
                "top_k": None
                if rejected
                else [
                    {"label": int(c), "class_name": CLASSES[c], "probability": float(probs[c])}
                    for c in np.argsort(-probs)[:2]
                ],
                "probs": None if rejected else [float(p) for p in probs],
            }
        )
    return rows


@pytest.mark.parametrize("suffix", FORMATS)
def test_round_trip(tmp_path: Path, suffix: str) -> None:
    rows = make_rows(23)
    path = tmp_path / f"out{suffix}"
    sink = open_sink(path, result_columns(CLASSES, probs=True, top_k=True))
    sink.write(rows[:10])
    sink.commit()
    sink.write(rows[10:])
    sink.commit()
    sink.finish()
    sink.close()
    assert list(read_rows(path)) == rows
    if suffix == ".parquet":
        assert not parts_dir(path).exists()


@pytest.mark.parametrize("suffix", FORMATS)
def test_round_trip_without_optional_columns(tmp_path: Path, suffix: str) -> None:
    rows = [{k: v for k, v in r.items() if k not in ("probs", "top_k")} for r in make_rows(4)]
    path = tmp_path / f"out{suffix}"
    sink = open_sink(path, result_columns(CLASSES, probs=False))
    sink.write(rows)
    sink.commit()
    sink.finish()
    assert list(read_rows(path)) == rows


@pytest.mark.parametrize("suffix", FORMATS)
def test_uncommitted_rows_are_dropped_on_resume(tmp_path: Path, suffix: str) -> None:
    rows = make_rows(12)
    cols = result_columns(CLASSES, probs=True, top_k=True)
    path = tmp_path / f"out{suffix}"
    sink = open_sink(path, cols)
    sink.write(rows[:5])
    state = sink.commit()
    sink.write(rows[5:9])  # staged, never committed: the process "dies" here
    sink.close()
    if suffix != ".parquet":
        # simulate a crash that left a torn, uncommitted line on disk
        with open(path, "ab") as fh:
            fh.write(b'{"path": "torn')
    resumed = open_sink(path, cols, state)
    resumed.write(rows[5:])
    resumed.commit()
    resumed.finish()
    assert list(read_rows(path)) == rows


def test_job_files_resume_and_settings_check(tmp_path: Path) -> None:
    out, err = tmp_path / "o.csv", tmp_path / "o.errors.csv"
    cols = result_columns(CLASSES, probs=False)
    rows = [{k: v for k, v in r.items() if k not in ("probs", "top_k")} for r in make_rows(6)]
    files = JobFiles(out, err, cols, {"model": "m", "probs": False}, resume=False)
    assert files.resumed is None
    files.write(rows[:3], [{"path": "bad.png", "reason": "corrupt"}])
    files.commit(4, "sha-4", {"scored": 3, "failed": 1})
    files.write(rows[3:], [])  # lost in the "crash"
    files.close()
    with open(journal_path(out), "a") as fh:
        fh.write('{"n": 99, "sha"')  # a torn journal line is ignored
    header, last = read_journal(journal_path(out))
    assert header == {
        "schema": "sdde-score-journal/1",
        "model": "m",
        "probs": False,
        "errors_file": str(err),
    }
    assert last is not None and (last.n, last.sha) == (4, "sha-4")
    with pytest.raises(UserError, match="settings changed \\(errors_file\\)"):
        JobFiles(out, tmp_path / "elsewhere.csv", cols, {"model": "m", "probs": False}, resume=True)

    with pytest.raises(UserError, match="settings changed \\(probs\\)"):
        JobFiles(out, err, cols, {"model": "m", "probs": True}, resume=True)
    files = JobFiles(out, err, cols, {"model": "m", "probs": False}, resume=True)
    assert files.resumed is not None and files.resumed.counts == {"scored": 3, "failed": 1}
    files.write(rows[3:], [])
    files.commit(7, "sha-7", {"scored": 6, "failed": 1})
    files.finish()
    assert list(read_rows(out)) == rows
    assert list(read_rows(err)) == [{"path": "bad.png", "reason": "corrupt"}]
    assert not journal_path(out).exists()
    with pytest.raises(UserError, match="nothing to resume"):
        JobFiles(out, err, cols, {"model": "m", "probs": False}, resume=True)


def test_errors_file_schema(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    sink = open_sink(path, ERROR_COLUMNS)
    sink.write([{"path": "x.png", "reason": "not a recognised image format"}])
    sink.commit()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"path": "x.png", "reason": "not a recognised image format"}
    ]


def test_unknown_extension_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown output format"):
        open_sink(tmp_path / "out.xlsx", ERROR_COLUMNS)


def _crashed_job(tmp_path: Path, suffix: str) -> tuple[Path, Path, list]:
    """A job that committed two rows and one error, then stopped (the journal remains)."""
    out, err = tmp_path / f"o{suffix}", tmp_path / f"o.errors{suffix}"
    cols = result_columns(CLASSES, probs=False)
    rows = [{k: v for k, v in r.items() if k not in ("probs", "top_k")} for r in make_rows(2)]
    files = JobFiles(out, err, cols, {"model": "m"}, resume=False)
    files.write(rows, [{"path": "bad.png", "reason": "corrupt"}])
    files.commit(3, "sha-3", {"scored": 2, "failed": 1})
    files.close()
    return out, err, cols


@pytest.mark.parametrize("damage", ["deleted", "shortened", "edited", "errors deleted"])
def test_resume_refuses_files_that_lost_committed_bytes(tmp_path: Path, damage: str) -> None:
    """Cutting back to the committed size must never pad a deleted or shortened file with NULs."""
    out, err, cols = _crashed_job(tmp_path, ".jsonl")
    target = err if damage == "errors deleted" else out
    data = target.read_bytes()
    if damage in ("deleted", "errors deleted"):
        target.unlink()
    elif damage == "shortened":
        target.write_bytes(data[:-5])
    else:  # same size, other bytes
        target.write_bytes(data.replace(b'"label"', b'"LABEL"', 1))
    with pytest.raises(UserError, match="cannot resume") as info:
        JobFiles(out, err, cols, {"model": "m"}, resume=True)
    assert str(target) in str(info.value) and "\n" not in str(info.value)
    if target.exists():
        assert b"\0" not in target.read_bytes()


def test_resume_refuses_missing_parquet_parts(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    out, err, cols = _crashed_job(tmp_path, ".parquet")
    (parts_dir(out) / "part-000000.parquet").unlink()
    with pytest.raises(UserError, match="lacks 1 of the 1 committed parts"):
        JobFiles(out, err, cols, {"model": "m"}, resume=True)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_non_utf8_file_names_are_written_escaped_and_losslessly(tmp_path: Path, suffix) -> None:
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    raw = b"dir/caf\xe9 \\ \xff.png"  # Latin-1 bytes: not UTF-8
    name = os.fsdecode(raw)
    out, err = tmp_path / f"o{suffix}", tmp_path / f"e{suffix}"
    cols = result_columns(CLASSES, probs=False)
    row = {k: v for k, v in make_rows(1)[0].items() if k not in ("probs", "top_k")}
    files = JobFiles(out, err, cols, {"model": "m"}, resume=False)
    files.write([{**row, "path": name}], [{"path": name, "reason": "corrupt"}])
    files.commit(2, "sha", {"scored": 1, "failed": 1})
    files.write([{**row, "path": "ok-é.png"}], [])  # valid UTF-8 stays as it is
    files.commit(3, "sha", {"scored": 2, "failed": 1})
    files.finish()
    written = [r["path"] for r in read_rows(out)]
    assert written == ["dir/caf\\xe9 \\\\ \\xff.png", "ok-é.png"]
    assert unescape_path(written[0]) == raw
    assert [r["path"] for r in read_rows(err)] == [written[0]]


def test_csv_text_cells_cannot_be_formulas(tmp_path: Path) -> None:
    out = tmp_path / "o.csv"
    cols = result_columns(["=1+1", "ok"], probs=False)
    row = {k: v for k, v in make_rows(1)[0].items() if k not in ("probs", "top_k")}
    paths = ['=HYPERLINK("http://x")', "+1", "-2", "@SUM(A1)", "'quoted", "plain.png"]
    sink = open_sink(out, cols)
    sink.write([{**row, "path": p, "class_name": "=1+1"} for p in paths])
    sink.commit()
    sink.close()
    cells = [line.split(",")[0] for line in out.read_text().splitlines()[1:]]
    assert all(not c.lstrip('"').startswith(("=", "+", "-", "@")) for c in cells)
    assert cells[-2:] == ["''quoted", "plain.png"]
    back = list(read_rows(out))
    assert [r["path"] for r in back] == paths and {r["class_name"] for r in back} == {"=1+1"}
