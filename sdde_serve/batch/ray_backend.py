"""``--ray [ADDRESS]``: the batch job as a Ray Data pipeline (needs the ``[ray]`` extra).

The driver enumerates inputs exactly as a local job does (same order, same resume journal) and
feeds them to Ray in windows of :data:`WINDOW` paths. Each window is one Ray Data dataset::

    from_items(paths) -> map_batches(RayScorer, concurrency=--workers) -> iter_batches (in order)

:class:`RayScorer` is an actor class: each actor holds **one onnxruntime session** (an
:class:`~sdde_serve.engine.Engine`), reads and decodes its batch's files with
:func:`~sdde_serve.batch.pipeline.load_image` and makes the rows with the same
:func:`~sdde_serve.batch.pipeline.score_rows` as local jobs, so the rows are the same. The model
travels to the workers through Ray's object store (nodes need no copy of it); the **image paths
must be readable on every node** (shared filesystem). After each window the driver writes the
rows and commits the journal, so ``--resume`` works as for local jobs. Memory on the driver is
bounded by one window.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from sdde_serve.errors import UserError
from sdde_serve.manifest import load_onnx, read_manifest

from .inputs import iter_inputs
from .pipeline import (
    JobResult,
    ScoreOptions,
    load_image,
    path_hash_update,
    resume_point,
    score_rows,
)
from .writers import JobFiles

WINDOW = 8192  # paths per Ray dataset: bounds driver memory and the work lost to a crash


class RayScorer:
    """Ray Data actor: one engine per worker; a batch of paths in, one JSON record per path out.

    A record is ``{"row": {...}}`` or ``{"error": reason}``; JSON keeps float32 values exact and
    the nested columns (top_k, probs) simple to ship through Arrow.
    """

    def __init__(self, model_bytes: Any, opts: ScoreOptions, threads: int) -> None:
        import ray

        from sdde_serve.engine import Engine

        data = ray.get(model_bytes) if isinstance(model_bytes, ray.ObjectRef) else model_bytes
        fd, tmp = tempfile.mkstemp(suffix=".onnx")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            self.engine = Engine(tmp, intra_op_threads=threads)  # reads the file once, fully
        finally:
            os.unlink(tmp)
        self.opts = opts

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from sdde_serve.preprocess import ImageError

        manifest, opts = self.engine.manifest, self.opts
        paths = [str(p) for p in batch["path"]]  # as the user gave them: the rows' names
        records: list[dict[str, Any] | None] = [None] * len(paths)
        good, images = [], []
        for i, p in enumerate(batch["file"]):  # absolute: workers have another working dir
            try:
                images.append(load_image(str(p), manifest.input, opts.limits))
                good.append(i)
            except ImageError as exc:
                records[i] = {"error": str(exc)}
        if good:
            out = self.engine.run(np.stack(images))
            rows = score_rows(out, [paths[i] for i in good], manifest, opts)
            for i, row in zip(good, rows, strict=True):
                records[i] = {"row": row}
        return {
            "path": np.asarray(paths, dtype=object),
            "record": np.asarray([json.dumps(r) for r in records], dtype=object),
        }


def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ModuleNotFoundError:
        raise UserError("--ray needs Ray Data: pip install 'sdde-serve[ray]'") from None
    return ray


def _connect(ray: Any, address: str) -> bool:
    """Connect (or start a local Ray); returns whether we started it (and must shut it down)."""
    if ray.is_initialized():
        return False
    # local workers import sdde_serve from where the driver found it (no install needed)
    package_root = str(Path(__file__).resolve().parents[2])
    pythonpath = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    if address == "local":
        ray.init(
            include_dashboard=False,
            runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
            log_to_driver=False,
        )
    else:
        # a cluster: its nodes need sdde-serve[ray] installed (same version), see docs/batch.md
        ray.init(address=address, log_to_driver=False)
    return True


def ray_job(
    ray: Any,
    model_path: str,
    paths: Iterator[str],
    files: JobFiles,
    opts: ScoreOptions,
    *,
    threads: int,
    progress: Callable[[int], None] | None = None,
    window: int = WINDOW,
) -> JobResult:
    import time

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows in input order, like local jobs
    ctx.enable_progress_bars = False
    paths, h, counts, done = resume_point(paths, files)
    model_ref = ray.put(Path(model_path).read_bytes())
    start, processed = time.perf_counter(), 0
    while chunk := list(islice(paths, window)):
        items = [{"path": p, "file": os.path.abspath(p)} for p in chunk]
        ds = ray.data.from_items(items).map_batches(
            RayScorer,
            fn_constructor_kwargs={"model_bytes": model_ref, "opts": opts, "threads": threads},
            batch_size=opts.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(
                size=max(1, min(opts.workers, -(-len(chunk) // opts.batch_size)))
            ),
            num_cpus=1,
        )
        seen = 0
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            rows, errors = [], []
            for p, rec in zip(batch["path"], batch["record"], strict=True):
                r = json.loads(rec)
                if "error" in r:
                    errors.append({"path": str(p), "reason": r["error"]})
                else:
                    rows.append(r["row"])
                if str(p) != chunk[seen]:
                    raise RuntimeError("Ray returned rows out of input order")
                seen += 1
            counts.scored += len(rows)
            counts.failed += len(errors)
            counts.ood += sum(r["is_ood"] for r in rows)
            counts.rejected += sum(r["rejected"] for r in rows)
            files.write(rows, errors)
            if progress is not None:
                progress(len(batch["path"]))
        if seen != len(chunk):
            raise RuntimeError(f"Ray returned {seen} rows for {len(chunk)} inputs")
        for p in chunk:
            path_hash_update(h, p)
        done += len(chunk)
        processed += len(chunk)
        files.commit(done, h.hexdigest(), counts.as_dict())
    if files.resumed is None and done == 0:
        files.commit(0, h.hexdigest(), counts.as_dict())
    return JobResult(counts, processed, time.perf_counter() - start)


def run_ray_job(args: argparse.Namespace, opts: ScoreOptions, out: Path, errors: Path) -> int:
    from .cli import run_and_report

    ray = _import_ray()
    manifest = read_manifest(load_onnx(args.model), source=args.model)
    started = _connect(ray, args.ray)
    try:
        return run_and_report(
            lambda files, progress: ray_job(
                ray,
                args.model,
                iter_inputs(args.inputs),
                files,
                opts,
                threads=max(1, args.threads),
                progress=progress,
            ),
            args=args,
            opts=opts,
            manifest=manifest,
            out=out,
            errors=errors,
            backend=f"ray:{args.ray}",
        )
    finally:
        if started:
            ray.shutdown()
