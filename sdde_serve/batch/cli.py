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
import contextlib
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path
from typing import Any

from sdde_serve.deprecation import add_deprecated_alias
from sdde_serve.errors import UserError
from sdde_serve.probe import add_probe_argument
from sdde_serve.scoring import OOD_POLICIES

from .inputs import check_inputs, iter_inputs
from .job import (  # job_header, run_and_report: also imported from here by tests and benchmarks
    EXIT_JOB_FAILED,
    EXIT_OK,
    EXIT_SOME_FAILED,
    BackendRun,
    Job,
    JobResult,
    ScoreOptions,
    errors_path,
    job_header,
    report_failure,
    run_and_report,
    summary_path,
)
from .pipeline import Backend, run_job
from .writers import JobFiles, check_format

__all__ = [
    "EXIT_JOB_FAILED",
    "EXIT_OK",
    "EXIT_SOME_FAILED",
    "add_arguments",
    "job_header",
    "main",
    "run_and_report",
    "summary_path",
]

HELP = (
    "score image files offline with the server's preprocessing and OOD rule: one row per image, "
    "failed files in an errors file, crash-safe and resumable"
)


EPILOG = (
    "exit status: 0 all inputs scored, 1 some inputs failed (see the errors file), "
    "2 usage error or the job failed (resumable with --resume), 130 interrupted"
)

# ``sdde score``'s arguments in --help order: (flags, add_argument keywords), or a function that
# adds a flag shared with other commands
Argument = tuple[tuple[str, ...], dict[str, Any]] | Callable[[argparse.ArgumentParser], None]
ARGUMENTS: tuple[Argument, ...] = (
    (
        ("model",),
        {"help": "exported ONNX model (with --url: the file the server serves; its manifest)"},
    ),
    (
        ("inputs",),
        {
            "nargs": "+",
            "metavar": "INPUT",
            "help": "image file, directory (recursive), glob pattern ('**' for any depth), "
            ".txt/.csv file listing paths, or '-' for paths on stdin",
        },
    ),
    (("-o", "--output"), {"required": True, "help": "output file: .jsonl, .csv or .parquet"}),
    (
        ("--errors",),
        {"default": None, "help": "errors file (path, reason); default OUT_STEM.errors.EXT"},
    ),
    (("--batch-size",), {"type": int, "default": 64, "help": "images per engine call"}),
    (
        ("--concurrency",),
        {
            "type": int,
            "default": min(4, os.cpu_count() or 1),
            "metavar": "N",
            "help": "decoders at once: threads (processes with --processes; Ray actors with --ray)",
        },
    ),
    (
        ("--processes",),
        {
            "action": "store_true",
            "help": "decode in --concurrency processes instead of threads (many cores, small "
            "images)",
        },
    ),
    (
        ("--threads",),
        {"type": int, "default": 0, "help": "onnxruntime intra-op threads (0: one per core)"},
    ),
    add_probe_argument,
    (
        ("--ood-policy",),
        {
            "choices": OOD_POLICIES,
            "default": "flag",
            "help": "flag: OOD images keep their label, is_ood marks them; reject: they get no "
            "label",
        },
    ),
    (
        ("--top-k",),
        {"type": int, "default": 0, "help": "add a top_k column with the K best classes (0: none)"},
    ),
    (("--probs",), {"action": "store_true", "help": "add the full calibrated probability vector"}),
    (
        ("--resume",),
        {"action": "store_true", "help": "continue an interrupted job (same inputs/options)"},
    ),
    (
        ("--fdr",),
        {
            "type": float,
            "default": None,
            "metavar": "Q",
            "help": "after the job, apply Benjamini-Hochberg at false discovery rate Q over all "
            "its p-values and add an ood_bh column: flagged images of which at most a share Q "
            "are expected to be in-distribution (needs a model with calibration scores)"
            "%(default).0s",
        },
    ),
    (
        ("--expect-sha256",),
        {
            "metavar": "HEX",
            "default": None,
            "help": "refuse to start unless the model file's SHA-256 (sha256sum MODEL) is HEX",
        },
    ),
)
# the backend: at most one of them (neither: this machine's onnxruntime)
BACKEND_ARGUMENTS: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = (
    (
        ("--url",),
        {
            "default": None,
            "help": "score against a running server (http://host:port; v2 protocol, binary "
            "tensors)",
        },
    ),
    (
        ("--ray",),
        {
            "nargs": "?",
            "const": "local",
            "default": None,
            "metavar": "ADDRESS",
            "help": "run on Ray Data (needs the [ray] extra): no ADDRESS starts a local Ray, "
            "'auto' or ray://HOST:10001 joins a cluster",
        },
    ),
)
# renamed flags: the new spelling -> the old one, still accepted (hidden, with a warning)
RENAMED = {"--concurrency": "--workers", "--ood-policy": "--policy"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    for argument in ARGUMENTS:
        if callable(argument):
            argument(parser)
            continue
        flags, options = argument
        action = parser.add_argument(*flags, **options)
        old = RENAMED.get(flags[-1])
        if old is not None:  # checked as the new flag is: same type and choices
            checks = {k: options[k] for k in ("type", "choices") if k in options}
            add_deprecated_alias(parser, old, new=flags[-1], dest=action.dest, **checks)
    backend = parser.add_mutually_exclusive_group()
    for flags, options in BACKEND_ARGUMENTS:
        backend.add_argument(*flags, **options)


def _validate(args: argparse.Namespace) -> ScoreOptions:
    if args.fdr is not None and not 0.0 < args.fdr < 1.0:
        raise UserError(f"--fdr must be in (0, 1), got {args.fdr}")
    for flag, value, low in (
        ("--batch-size", args.batch_size, 1),
        ("--concurrency", args.concurrency, 1),
        ("--threads", args.threads, 0),
        ("--top-k", args.top_k, 0),
    ):
        if value < low:
            raise UserError(f"{flag} must be >= {low}, got {value}")
    return ScoreOptions(
        batch_size=args.batch_size,
        workers=args.concurrency,
        processes=args.processes,
        top_k=args.top_k,
        policy=args.ood_policy,
        probs=args.probs,
    )


def main(args: argparse.Namespace) -> int:
    try:
        return _main(args)
    except (UserError, KeyboardInterrupt):
        raise  # the sdde CLI prints these (exit 2 / 130)
    except Exception as exc:  # e.g. the model does not load: the job failed before it started
        return report_failure(exc, resumable=False)


def pipeline_job(scorer: Backend, args: argparse.Namespace, opts: ScoreOptions) -> Job:
    """The pipeline (decode pool in this process) around ``scorer``: an engine or a server."""

    def job(files: JobFiles, progress: Callable[[int], None]) -> JobResult:
        return run_job(scorer, iter_inputs(args.inputs), files, opts, progress=progress)

    return job


@contextlib.contextmanager
def local_backend(args: argparse.Namespace, opts: ScoreOptions) -> Iterator[BackendRun]:
    """This machine's onnxruntime; decoding in threads, or processes with ``--processes``."""
    from sdde_serve.engine import Engine

    engine = Engine(
        args.model,
        intra_op_threads=args.threads,
        expect_sha256=args.expect_sha256,
        probe_check=args.probe_check,
    )
    yield BackendRun(
        pipeline_job(engine, args, opts), engine.manifest, "local:" + ",".join(engine.providers)
    )


@contextlib.contextmanager
def url_backend(args: argparse.Namespace, opts: ScoreOptions) -> Iterator[BackendRun]:
    """A running server (``--url``): decoding here, inference there."""
    from sdde_serve.manifest import load_onnx, read_manifest

    from .remote import RemoteBackend

    remote = RemoteBackend(args.url, read_manifest(load_onnx(args.model), source=args.model))
    yield BackendRun(pipeline_job(remote, args, opts), remote.manifest, f"url:{remote.url}")


@contextlib.contextmanager
def ray_backend(args: argparse.Namespace, opts: ScoreOptions) -> Iterator[BackendRun]:
    """Ray Data (``--ray``); imported only when chosen."""
    from .ray_backend import ray_backend as backend

    with backend(args, opts) as run:
        yield run


BACKENDS: dict[str, Callable[[argparse.Namespace, ScoreOptions], ContextManager[BackendRun]]] = {
    "local": local_backend,
    "url": url_backend,
    "ray": ray_backend,
}


def backend_name(args: argparse.Namespace) -> str:
    return "ray" if args.ray is not None else "url" if args.url else "local"


def _main(args: argparse.Namespace) -> int:
    opts = _validate(args)
    out = Path(args.output)
    errors = Path(args.errors) if args.errors else errors_path(out)
    check_format(out)
    check_format(errors)
    check_inputs(args.inputs)
    name = backend_name(args)
    if args.expect_sha256 and name != "local":
        # the local engine checks it itself; the other backends read the file here
        from sdde_serve.model_checks import check_digest, read_model

        check_digest(Path(args.model), read_model(Path(args.model))[1], args.expect_sha256)
    with BACKENDS[name](args, opts) as run:
        return run_and_report(
            run.job,
            args=args,
            opts=opts,
            manifest=run.manifest,
            out=out,
            errors=errors,
            backend=run.name,
        )
