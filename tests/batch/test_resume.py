"""Crash safety: a job killed with SIGKILL mid-run, then ``--resume``: every file exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdde_serve.batch.writers import journal_path, read_journal, read_rows

from .conftest import score, write_bad_files, write_images

ROOT = Path(__file__).resolve().parents[2]


def _journal_commits(out: Path) -> int:
    _, last = read_journal(journal_path(out))
    return 0 if last is None else last.n


# one format is enough here: the parquet part-file commit and cut-back are covered in
# test_writers (the kill test costs two process start-ups)
@pytest.mark.parametrize("suffix", [".jsonl"])
def test_resume_after_sigkill_scores_each_file_once(tmp_path: Path, linear_model, suffix) -> None:
    model, _ = linear_model
    good = write_images(tmp_path / "images", 60)
    bad = write_bad_files(tmp_path / "images" / "bad")
    paths = [str(p) for p in good]
    for i, b in enumerate(bad.values()):  # failures spread through the list
        paths.insert(7 + 11 * i, str(b))
    out = tmp_path / f"out{suffix}"
    cmd = [
        sys.executable,
        "-m",
        "sdde_serve",
        "score",
        str(model),
        "-",
        "-o",
        str(out),
        "--batch-size",
        "4",
        "--concurrency",
        "2",
        "--probs",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    # a slow input list on stdin: the job commits (every second) while it waits for more paths
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, env=env, cwd=ROOT, text=True)
    assert proc.stdin is not None
    try:
        sent = 0
        deadline = time.monotonic() + 30
        while _journal_commits(out) < 12 and time.monotonic() < deadline:
            if sent < 40:
                proc.stdin.write(paths[sent] + "\n")
                proc.stdin.flush()
                sent += 1
            time.sleep(0.04)
        committed = _journal_commits(out)
        assert 12 <= committed <= sent < len(paths), "the job should be killed mid-run"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert journal_path(out).exists()

    # resume with the same list in full
    resumed = subprocess.run(
        [*cmd, "--resume"],
        input="\n".join(paths) + "\n",
        env=env,
        cwd=ROOT,
        text=True,
        capture_output=True,
        timeout=60,
    )
    assert resumed.returncode == 1, resumed.stderr  # the bad files failed, the job completed
    rows = list(read_rows(out))
    errors = list(read_rows(tmp_path / f"out.errors{suffix}"))
    assert [r["path"] for r in rows] == [str(p) for p in good]  # each exactly once, in order
    assert sorted(e["path"] for e in errors) == sorted(map(str, bad.values()))

    # the same rows as an uninterrupted run
    clean = tmp_path / f"clean{suffix}"
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(paths) + "\n")
    assert score(model, listing, "-o", clean, "--batch-size", "4", "--probs") == 1
    assert rows == list(read_rows(clean))


def test_resume_refuses_other_inputs(tmp_path: Path, linear_model, capsys) -> None:
    model, _ = linear_model
    good = write_images(tmp_path / "images", 12)
    out = tmp_path / "o.jsonl"
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(map(str, good)) + "\n")
    # interrupted run, reproduced in-process: a journal with a commit and no finish
    from sdde_serve.batch.cli import job_header
    from sdde_serve.batch.pipeline import ScoreOptions, run_job
    from sdde_serve.batch.writers import JobFiles, result_columns
    from sdde_serve.cli import main
    from sdde_serve.engine import Engine

    engine, opts = Engine(model), ScoreOptions(batch_size=4)
    columns = result_columns(engine.manifest.classes, probs=False)
    header = job_header(engine.manifest, opts)
    files = JobFiles(out, tmp_path / "o.errors.jsonl", columns, header, resume=False)
    run_job(engine, iter(map(str, good[:6])), files, opts)
    files.close()
    # different options: refused, nothing lost
    assert main(["score", str(model), str(listing), "-o", str(out), "--resume", "--probs"]) == 2
    assert "settings changed" in capsys.readouterr().err
    # the first inputs differ from the interrupted run's: refused
    listing.write_text("\n".join(map(str, good[1:])) + "\n")
    assert main(["score", str(model), str(listing), "-o", str(out), "--resume"]) == 2
    assert "differ from the interrupted run" in capsys.readouterr().err
    assert len(list(read_rows(out))) == 6


class FailingBackend:
    """A scorer that dies on its ``fail_at``-th batch (like a server going away mid-job)."""

    def __init__(self, engine, fail_at: int) -> None:
        self.engine, self.manifest, self.fail_at, self.calls = engine, engine.manifest, fail_at, 0

    def run(self, images):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("connection reset by peer")
        return self.engine.run(images)


def test_failed_job_exits_2_and_resumes(tmp_path: Path, linear_model, capsys) -> None:
    import argparse

    from sdde_serve.batch.cli import run_and_report
    from sdde_serve.batch.pipeline import ScoreOptions, run_job
    from sdde_serve.engine import Engine

    model, _ = linear_model
    good = [str(p) for p in write_images(tmp_path / "images", 40)]
    engine = Engine(model)
    opts = ScoreOptions(batch_size=4, commit_interval=0.0)  # commit after every batch
    out, errors = tmp_path / "o.csv", tmp_path / "o.errors.csv"
    args = argparse.Namespace(resume=False, inputs=[str(tmp_path / "images")])

    def job(backend):
        return lambda files, progress: run_job(backend, iter(good), files, opts, progress=progress)

    common = {"opts": opts, "manifest": engine.manifest, "out": out, "errors": errors,
              "backend": "test"}  # fmt: skip
    assert run_and_report(job(FailingBackend(engine, fail_at=4)), args=args, **common) == 2
    assert "connection reset by peer" in capsys.readouterr().err
    assert [r["path"] for r in read_rows(out)] == good[:12]  # three committed batches
    args.resume = True
    assert run_and_report(job(engine), args=args, **common) == 0
    assert [r["path"] for r in read_rows(out)] == good
    summary = (tmp_path / "o.summary.json").read_text()
    assert '"images_scored": 40' in summary and '"processed_this_run": 28' in summary


def test_a_non_utf8_file_name_is_scored_and_written_escaped(tmp_path: Path, linear_model) -> None:
    """Before: the row could not be encoded, the commit failed, and so did every resume."""
    from sdde_serve.batch.writers import unescape_path

    model, _ = linear_model
    images = tmp_path / "images"
    good = write_images(images, 3)
    raw = os.fsencode(images) + b"/caf\xe9.png"  # a Latin-1 name: not UTF-8
    os.rename(good[0], raw)
    out, errors = tmp_path / "out.csv", tmp_path / "errors.jsonl"
    assert score(model, images, "-o", out, "--errors", errors) == 0
    paths = [r["path"] for r in read_rows(out)]
    assert len(paths) == 3 and unescape_path(next(p for p in paths if "\\x" in p)) == raw


def test_resume_refuses_a_deleted_output_instead_of_writing_nul_bytes(
    tmp_path: Path, linear_model, capsys
) -> None:
    from sdde_serve.batch.writers import JobFiles

    model, _ = linear_model
    images = write_images(tmp_path / "images", 6)
    out = tmp_path / "out.jsonl"
    # a job stopped after its first commit: the journal remains, as after a crash
    real_finish = JobFiles.finish
    JobFiles.finish = JobFiles.close  # type: ignore[method-assign]
    try:
        assert score(model, *images, "-o", out) == 0
    finally:
        JobFiles.finish = real_finish  # type: ignore[method-assign]
    assert journal_path(out).exists()
    out.unlink()
    capsys.readouterr()
    assert score(model, *images, "-o", out, "--resume") == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "is missing" in err and not out.exists()


def test_an_interrupted_job_prints_the_command_that_resumes_it(
    tmp_path: Path, linear_model, images, monkeypatch, capsys
) -> None:
    import itertools
    import shlex

    import sdde_serve.batch.cli as batch_cli
    from sdde_serve.cli import main as sdde_main

    model, _ = linear_model
    out = tmp_path / "out.csv"
    real_run_job = batch_cli.run_job

    def ctrl_c_after_ten_inputs(backend, paths, files, opts, **kwargs):
        def inputs():
            yield from itertools.islice(paths, 10)
            raise KeyboardInterrupt

        return real_run_job(backend, inputs(), files, opts, **kwargs)

    monkeypatch.setattr(batch_cli, "run_job", ctrl_c_after_ten_inputs)
    argv = ["score", str(model), str(tmp_path / "images"), "-o", str(out), "--batch-size", "4"]
    assert sdde_main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == f"interrupted: the rows committed so far are kept in {out}; continue with"
    again = shlex.split(err[1])
    assert again == ["sdde", *argv, "--resume"]
    monkeypatch.setattr(batch_cli, "run_job", real_run_job)
    assert sdde_main(again[1:]) == 0  # the printed line does continue the job
    assert sorted(r["path"] for r in read_rows(out)) == sorted(map(str, images))
