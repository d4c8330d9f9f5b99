"""``sdde score MODEL INPUT... -o OUT``: score image files offline.

Exit codes (also in docs/batch.md):

* 0: every input was scored;
* 1: the job completed but some inputs failed (listed in the errors file);
* 2: the job itself failed (bad arguments, model not loadable, scorer/server failure): the journal
  is kept, so ``--resume`` continues it;
* 130: interrupted (Ctrl-C); resumable like 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

from sdde_serve.errors import UserError
from sdde_serve.scoring import OOD_POLICIES

from .fdr import BHResult, apply_bh
from .inputs import check_inputs, iter_inputs
from .pipeline import JobResult, ScoreOptions, run_job
from .writers import JobFiles, check_format, journal_path, parts_dir, result_columns

HELP = (
    "score image files offline with the server's preprocessing and OOD rule: one row per image, "
    "failed files in an errors file, crash-safe and resumable"
)

EXIT_OK, EXIT_SOME_FAILED, EXIT_JOB_FAILED = 0, 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "exit status: 0 all inputs scored, 1 some inputs failed (see the errors file), "
        "2 usage error or the job failed (resumable with --resume), 130 interrupted"
    )
    parser.add_argument(
        "model", help="exported ONNX model (with --url: the file the server serves; its manifest)"
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image file, directory (recursive), glob pattern ('**' for any depth), "
        ".txt/.csv file listing paths, or '-' for paths on stdin",
    )
    parser.add_argument(
        "-o", "--output", required=True, help="output file: .jsonl, .csv or .parquet"
    )
    parser.add_argument(
        "--errors", default=None, help="errors file (path, reason); default OUT_STEM.errors.EXT"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per engine call")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="decoding threads (processes with --processes; actors with --ray)",
    )
    parser.add_argument(
        "--processes",
        action="store_true",
        help="decode in --workers processes instead of threads (many cores, small images)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="onnxruntime intra-op threads (0: one per core)"
    )
    parser.add_argument("--policy", choices=OOD_POLICIES, default="flag", help="OOD policy")
    parser.add_argument(
        "--top-k", type=int, default=0, help="add a top_k column with the K best classes (0: none)"
    )
    parser.add_argument(
        "--probs", action="store_true", help="add the full calibrated probability vector"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted job (same inputs/options)"
    )
    parser.add_argument(
        "--fdr",
        type=float,
        default=None,
        metavar="Q",
        help="after the job, apply Benjamini-Hochberg at false discovery rate Q over all its "
        "p-values and add an ood_bh column: flagged images of which at most a share Q are "
        "expected to be in-distribution (needs a model with calibration scores)" + "%(default).0s",
    )
    parser.add_argument(
        "--expect-sha256",
        metavar="HEX",
        default=None,
        help="refuse to start unless the model file's SHA-256 (sha256sum MODEL) is HEX",
    )
    backend = parser.add_mutually_exclusive_group()
    backend.add_argument(
        "--url",
        default=None,
        help="score against a running server (http://host:port; v2 protocol, binary tensors)",
    )
    backend.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="run on Ray Data (needs the [ray] extra): no ADDRESS starts a local Ray, "
        "'auto' or ray://HOST:10001 joins a cluster",
    )


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
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


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


def _validate(args: argparse.Namespace) -> ScoreOptions:
    if args.fdr is not None and not 0.0 < args.fdr < 1.0:
        raise UserError(f"--fdr must be in (0, 1), got {args.fdr}")
    for flag, value, low in (
        ("--batch-size", args.batch_size, 1),
        ("--workers", args.workers, 1),
        ("--threads", args.threads, 0),
        ("--top-k", args.top_k, 0),
    ):
        if value < low:
            raise UserError(f"{flag} must be >= {low}, got {value}")
    return ScoreOptions(
        batch_size=args.batch_size,
        workers=args.workers,
        processes=args.processes,
        top_k=args.top_k,
        policy=args.policy,
        probs=args.probs,
    )


def main(args: argparse.Namespace) -> int:
    try:
        return _main(args)
    except (UserError, KeyboardInterrupt):
        raise  # the sdde CLI prints these (exit 2 / 130)
    except Exception as exc:  # anything else failed the job: exit 2, never a bare traceback
        if os.environ.get("SDDE_DEBUG"):
            traceback.print_exc()
        print(f"error: the job failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_JOB_FAILED


def _main(args: argparse.Namespace) -> int:
    opts = _validate(args)
    out = Path(args.output)
    errors = Path(args.errors) if args.errors else errors_path(out)
    check_format(out)
    check_format(errors)
    check_inputs(args.inputs)
    if args.expect_sha256 and (args.url or args.ray is not None):
        # the local engine checks it itself; the other backends read the file here
        from sdde_serve.model_checks import check_digest, read_model

        check_digest(Path(args.model), read_model(Path(args.model))[1], args.expect_sha256)

    if args.ray is not None:
        from .ray_backend import run_ray_job

        return run_ray_job(args, opts, out, errors)

    backend: Any
    if args.url:
        from sdde_serve.manifest import load_onnx, read_manifest

        from .remote import RemoteBackend

        manifest = read_manifest(load_onnx(args.model), source=args.model)
        backend = RemoteBackend(args.url, manifest)
        kind = f"url:{backend.url}"
    else:
        from sdde_serve.engine import Engine

        backend = Engine(
            args.model, intra_op_threads=args.threads, expect_sha256=args.expect_sha256
        )
        manifest = backend.manifest
        kind = "local:" + ",".join(backend.providers)
    return run_and_report(
        lambda files, progress: run_job(
            backend, iter_inputs(args.inputs), files, opts, progress=progress
        ),
        args=args,
        opts=opts,
        manifest=manifest,
        out=out,
        errors=errors,
        backend=kind,
    )


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


def bh_only(out: Path, columns: list[Any], q: float) -> int:
    """``--resume --fdr`` on a finished job: (re)run the BH pass alone (idempotent)."""
    bh = apply_bh(out, columns, q)
    path = summary_path(out)
    if path.exists():
        summary = json.loads(path.read_text())
        summary.update(bh_summary(bh))
        _write_json_atomic(path, summary)
    print(f"{out}: the job had finished; {bh_line(bh)}")
    return EXIT_OK


def job_header(manifest: Any, opts: ScoreOptions) -> dict[str, Any]:
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


def run_and_report(
    job: Any,
    *,
    args: argparse.Namespace,
    opts: ScoreOptions,
    manifest: Any,
    out: Path,
    errors: Path,
    backend: str,
) -> int:
    """Open the job's files, run ``job(files, progress)``, finish, print and write the summary."""
    columns = result_columns(manifest.classes, probs=opts.probs, top_k=opts.top_k > 0)
    fdr = getattr(args, "fdr", None)
    if fdr is not None and manifest.ood.calibration_scores is None:
        raise UserError(
            f"--fdr needs p-values, but model {manifest.name!r} stores no calibration scores "
            "(exported before p-values); refit it with `sdde calibrate`"
        )
    if fdr is not None and args.resume and finished_without_journal(out):
        return bh_only(out, columns, fdr)
    files = JobFiles(out, errors, columns, job_header(manifest, opts), resume=args.resume)
    resumed = files.resumed is not None
    progress = Progress(args.inputs, enabled=sys.stderr.isatty())
    if resumed and files.resumed is not None:
        progress.update(files.resumed.n)
    try:
        result: JobResult = job(files, progress.update)
    except UserError:
        files.close()
        raise
    except KeyboardInterrupt:
        files.close()
        raise
    except Exception as exc:
        files.close()
        progress.close()
        if os.environ.get("SDDE_DEBUG"):
            traceback.print_exc()
        print(
            f"error: the job failed: {type(exc).__name__}: {exc}\n"
            f"(committed rows are kept; continue with --resume)",
            file=sys.stderr,
        )
        return EXIT_JOB_FAILED
    finally:
        progress.close()
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
    print(
        f"scored {summary['images_scored']} images, {summary['failed']} failed, "
        f"OOD rate {100 * summary['ood_rate']:.1f}%, {summary['images_per_s']} images/s "
        f"-> {out}" + (f" (errors: {errors})" if summary["failed"] else "")
    )
    if bh is not None:
        print(bh_line(bh))
    return EXIT_SOME_FAILED if summary["failed"] else EXIT_OK
