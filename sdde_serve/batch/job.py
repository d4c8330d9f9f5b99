"""One batch job, whatever scores it: the tally/journal, the job's files and its report.

A backend (local threads or processes, a server with ``--url``, Ray with ``--ray``) is a
:data:`Job`: a function that scores the remaining inputs into the job's :class:`JobFiles` through a
:class:`Tally`. :func:`run_and_report` is the one path around it: open the files (checking a
resume), run the job, turn a failure into exit 2 (:func:`report_failure`, also used by the CLI for
failures before the files are open), finish the files, apply ``--fdr`` and write the summary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdde_serve.atomic import write_text_atomic
from sdde_serve.errors import UserError
from sdde_serve.manifest import Manifest
from sdde_serve.preprocess import ImageLimits
from sdde_serve.scoring import OODPolicy, no_calibration_scores_message

from .fdr import BHResult, apply_bh
from .inputs import iter_inputs
from .writers import Column, JobFiles, journal_path, parts_dir, result_columns

EXIT_OK, EXIT_SOME_FAILED, EXIT_JOB_FAILED = 0, 1, 2


@dataclass
class ScoreOptions:
    batch_size: int = 64
    workers: int = 2  # decoders at once: threads, processes (``processes``) or Ray actors
    # decode in worker processes instead of threads: not limited by the GIL (many cores, small
    # images, where Pillow's per-image Python overhead dominates), at a start-up cost per worker
    processes: bool = False
    top_k: int = 0  # 0: no top_k column
    policy: OODPolicy = "flag"
    probs: bool = False
    limits: ImageLimits = field(default_factory=ImageLimits)
    # seconds between commits (each commit fsyncs three files); 0 commits after every batch
    commit_interval: float = 1.0


@dataclass
class Counts:
    scored: int = 0
    failed: int = 0
    ood: int = 0
    rejected: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "scored": self.scored,
            "failed": self.failed,
            "ood": self.ood,
            "rejected": self.rejected,
        }


@dataclass
class JobResult:
    counts: Counts
    processed: int  # inputs handled by this run (scored + failed), excluding resumed ones
    elapsed_s: float


def path_hash_update(h: Any, path: str) -> None:
    h.update(path.encode("utf-8", "surrogateescape") + b"\0")


def skip_done(paths: Iterator[str], n: int, sha: str) -> tuple[Iterator[str], Any]:
    """Consume the ``n`` inputs a previous run committed, checking they are the same ones.

    Returns the remaining paths and the running hash (to continue the journal's hash chain).
    """
    h = hashlib.sha256()
    for i in range(n):
        p = next(paths, None)
        if p is None:
            raise UserError(
                f"cannot resume: the interrupted run had done {n} inputs but the inputs now "
                f"list only {i}; resume needs the same inputs in the same order"
            )
        path_hash_update(h, p)
    if h.hexdigest() != sha:
        raise UserError(
            f"cannot resume: the first {n} inputs differ from the interrupted run's (files "
            "added, removed or renamed); resume needs the same inputs in the same order, "
            "or start again without --resume"
        )
    return paths, h


class Tally:
    """A job's progress, updated in one place by every backend: the inputs done (in input order)
    and the hash chain of their paths, the counts, and the commits that make them durable with
    the rows and errors in ``files``.

    Built at the job's start: after the inputs a resumed run committed (checked to be the same
    ones), or at the beginning. :attr:`paths` are the inputs left to score.
    """

    def __init__(self, paths: Iterator[str], files: JobFiles) -> None:
        self.files = files
        if files.resumed is None:
            self.paths, self._hash, self.counts, self.done = paths, hashlib.sha256(), Counts(), 0
        else:
            self.paths, self._hash = skip_done(paths, files.resumed.n, files.resumed.sha)
            self.counts, self.done = Counts(**files.resumed.counts), files.resumed.n
        self.committed = self.done  # inputs covered by the last commit
        self.processed = 0  # inputs handled by this run
        self._start = time.perf_counter()

    def seen(self, path: str) -> None:
        """``path``, the next input in order, is handled (its row or error is or will be added
        before the next commit)."""
        path_hash_update(self._hash, path)
        self.done += 1
        self.processed += 1

    def add(self, rows: list[dict[str, Any]], errors: list[dict[str, Any]]) -> None:
        """Stage scored rows and failed inputs (``{"path", "reason"}``) and count them."""
        self.counts.scored += len(rows)
        self.counts.failed += len(errors)
        self.counts.ood += sum(r["is_ood"] for r in rows)
        self.counts.rejected += sum(r["rejected"] for r in rows)
        self.files.write(rows, errors)

    def commit(self) -> None:
        """Make everything staged durable and record it in the journal."""
        self.files.commit(self.done, self._hash.hexdigest(), self.counts.as_dict())
        self.committed = self.done

    def result(self) -> JobResult:
        return JobResult(self.counts, self.processed, time.perf_counter() - self._start)


# scores the job's remaining inputs into its files, reporting inputs done to the callback
Job = Callable[[JobFiles, Callable[[int], None]], JobResult]


@dataclass
class BackendRun:
    """What a backend (chosen by the CLI) hands :func:`run_and_report`."""

    job: Job
    manifest: Manifest
    name: str  # the summary's ``backend``: local:PROVIDERS, url:URL, ray:ADDRESS


def job_header(manifest: Manifest, opts: ScoreOptions) -> dict[str, Any]:
    """What must not change between a run and its ``--resume`` (checked by the journal)."""
    return {
        "model": manifest.name,
        "weights_sha256": manifest.weights_sha256,
        "temperature": manifest.temperature,
        "threshold": manifest.ood.threshold,
        "score": manifest.ood.score,
        "policy": opts.policy,
        "top_k": opts.top_k,
        "probs": opts.probs,
    }


def errors_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.errors{out.suffix}")


def summary_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.summary.json")


class Progress:
    """A tqdm bar with rate and ETA on a terminal; nothing otherwise.

    The total is counted in a background thread (a second, lazy walk of the inputs), so the bar
    starts at once and gains its ETA when the count is known; stdin cannot be read twice, so
    ``-`` inputs get a bar without ETA.
    """

    def __init__(self, inputs: list[str], *, enabled: bool) -> None:
        self.bar = None
        if not enabled:
            return
        from tqdm import tqdm

        self.bar = tqdm(unit="img", dynamic_ncols=True, smoothing=0.1, file=sys.stderr)
        if "-" not in inputs:
            threading.Thread(target=self._count, args=(inputs,), daemon=True).start()

    def _count(self, inputs: list[str]) -> None:
        n = sum(1 for _ in iter_inputs(inputs))
        if self.bar is not None:
            self.bar.total = n
            self.bar.refresh()

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def summarize(
    result: JobResult,
    *,
    model: str,
    version: str,
    out: Path,
    errors: Path,
    backend: str,
    resumed: bool,
) -> dict[str, Any]:
    c = result.counts
    return {
        "model": model,
        "version": version,
        "backend": backend,
        "output": str(out),
        "errors": str(errors),
        "images_scored": c.scored,
        "failed": c.failed,
        "ood": c.ood,
        "ood_rate": c.ood / c.scored if c.scored else 0.0,
        "rejected": c.rejected,
        "resumed": resumed,
        "processed_this_run": result.processed,
        "elapsed_s": round(result.elapsed_s, 3),
        "images_per_s": round(result.processed / result.elapsed_s, 1) if result.elapsed_s else 0.0,
    }


def report_failure(exc: Exception, *, resumable: bool) -> int:
    """The job failed (not the user's input): one line on stderr, exit 2, never a traceback
    (unless ``SDDE_DEBUG`` is set)."""
    if os.environ.get("SDDE_DEBUG"):
        traceback.print_exc()
    hint = "\n(committed rows are kept; continue with --resume)" if resumable else ""
    print(f"error: the job failed: {type(exc).__name__}: {exc}{hint}", file=sys.stderr)
    return EXIT_JOB_FAILED


def resume_hint(args: argparse.Namespace, out: Path) -> str:
    """What an interrupted job prints: where its rows are and the command that continues it."""
    argv = list(getattr(args, "command_line", None) or [])
    if argv and "--resume" not in argv:
        argv.append("--resume")
    again = shlex.join(["sdde", *argv]) if argv else "the same command with --resume"
    return f"interrupted: the rows committed so far are kept in {out}; continue with\n  {again}"


def finished_without_journal(out: Path) -> bool:
    """A finished job's output (its journal is removed when it completes)."""
    return out.exists() and not journal_path(out).exists() and not parts_dir(out).exists()


def bh_summary(bh: BHResult) -> dict[str, Any]:
    return {"fdr": bh.q, "ood_bh": bh.flagged, "bh_cutoff": bh.cutoff}


def bh_line(bh: BHResult) -> str:
    return (
        f"Benjamini-Hochberg at FDR {bh.q:g}: {bh.flagged} of {bh.m} images flagged "
        f"(ood_bh: p-value <= {max(bh.cutoff, 0.0):.4g})"
    )


def bh_only(out: Path, columns: list[Column], q: float) -> int:
    """``--resume --fdr`` on a finished job: (re)run the BH pass alone (idempotent)."""
    bh = apply_bh(out, columns, q)
    path = summary_path(out)
    if path.exists():
        summary = json.loads(path.read_text())
        summary.update(bh_summary(bh))
        _write_json_atomic(path, summary)
    print(f"{out}: the job had finished; {bh_line(bh)}")
    return EXIT_OK


def require_p_values(manifest: Manifest) -> None:
    """``--fdr`` needs the model's p-values: a model exported before them is the user's error."""
    if manifest.ood.calibration_scores is None:
        # the one wording of it (sdde_serve.scoring), as the line the sdde CLI prints (exit 2)
        raise UserError(
            f"--fdr needs p-values, but {no_calibration_scores_message(manifest.name)}; refit it "
            "with `sdde calibrate`"
        )


def run_with_progress(job: Job, files: JobFiles, inputs: list[str]) -> JobResult:
    """Run ``job`` with a progress bar; if it fails, its files are closed (the journal kept for
    ``--resume``) and the bar is gone before the error is printed."""
    progress = Progress(inputs, enabled=sys.stderr.isatty())
    if files.resumed is not None:
        progress.update(files.resumed.n)
    try:
        return job(files, progress.update)
    except (Exception, KeyboardInterrupt):
        files.close()
        raise
    finally:
        progress.close()


def summary_line(summary: dict[str, Any], out: Path, errors: Path) -> str:
    return (
        f"scored {summary['images_scored']} images, {summary['failed']} failed, "
        f"OOD rate {100 * summary['ood_rate']:.1f}%, {summary['images_per_s']} images/s "
        f"-> {out}" + (f" (errors: {errors})" if summary["failed"] else "")
    )


def run_and_report(
    job: Job,
    *,
    args: argparse.Namespace,
    opts: ScoreOptions,
    manifest: Manifest,
    out: Path,
    errors: Path,
    backend: str,
) -> int:
    """Open the job's files, run ``job(files, progress)``, finish, print and write the summary.

    ``args`` is the command line: ``inputs``, ``resume`` and, optionally, ``fdr``.
    """
    columns = result_columns(manifest.classes, probs=opts.probs, top_k=opts.top_k > 0)
    fdr: float | None = getattr(args, "fdr", None)
    if fdr is not None:
        require_p_values(manifest)
        if args.resume and finished_without_journal(out):
            return bh_only(out, columns, fdr)
    files = JobFiles(out, errors, columns, job_header(manifest, opts), resume=args.resume)
    resumed = files.resumed is not None
    try:
        result = run_with_progress(job, files, args.inputs)
    except UserError:
        raise  # the sdde CLI prints it (exit 2)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(resume_hint(args, out)) from None  # printed by the CLI, exit 130
    except Exception as exc:
        return report_failure(exc, resumable=True)
    files.finish()
    bh = apply_bh(out, columns, fdr) if fdr is not None else None
    summary = summarize(
        result,
        model=manifest.name,
        version=manifest.version,
        out=out,
        errors=errors,
        backend=backend,
        resumed=resumed,
    )
    if bh is not None:
        summary.update(bh_summary(bh))
    _write_json_atomic(summary_path(out), summary)
    print(summary_line(summary, out, errors))
    if bh is not None:
        print(bh_line(bh))
    return EXIT_SOME_FAILED if summary["failed"] else EXIT_OK
