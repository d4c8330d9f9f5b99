"""``--ray [ADDRESS]``: the batch job as a Ray Data pipeline (needs the ``[ray]`` extra).

The driver enumerates inputs exactly as a local job does (same order, same resume journal) and
feeds them to Ray in windows of :data:`WINDOW` paths. Each window is one Ray Data dataset::

    from_items(paths) -> map_batches(RayScorer, concurrency=--workers) -> iter_batches (in order)

:class:`RayScorer` is an actor class: each actor holds **one onnxruntime session** (an
:class:`~sdde_serve.engine.Engine`, built with ``--threads`` and ``--probe-check``: the probe
runs on each worker's own kernels), reads and decodes its batch's files with the same worker
function as local jobs (:func:`~sdde_serve.batch.pipeline.decode_chunk`) and makes the rows with
the same :func:`~sdde_serve.batch.pipeline.score_rows`, so the rows and the errors are the same.
The model travels to the workers through Ray's object store (nodes need no copy of it); the
**image paths must be readable on every node** (shared filesystem). After each window the driver
writes the rows and commits the journal, so ``--resume`` works as for local jobs. Memory on the
driver is bounded by one window.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from sdde_serve.extras import require_extra
from sdde_serve.manifest import load_onnx, read_manifest
from sdde_serve.probe import DEFAULT_PROBE_MODE, ProbeMode

from .inputs import iter_inputs
from .job import BackendRun, JobResult, ScoreOptions, Tally
from .pipeline import decode_chunk, load_image, score_rows
from .writers import JobFiles

WINDOW = 8192  # paths per Ray dataset: bounds driver memory and the work lost to a crash


class RayScorer:
    """Ray Data actor: one engine per worker; a batch of paths in, one JSON record per path out.

    A record is ``{"row": {...}}`` or ``{"error": reason}``; JSON keeps float32 values exact and
    the nested columns (top_k, probs) simple to ship through Arrow.
    """

    def __init__(
        self,
        model_bytes: Any,
        opts: ScoreOptions,
        threads: int,
        probe_check: ProbeMode = DEFAULT_PROBE_MODE,
    ) -> None:
        import ray

        from sdde_serve.engine import Engine

        data = ray.get(model_bytes) if isinstance(model_bytes, ray.ObjectRef) else model_bytes
        # private scratch (0600 on purpose, unlike the project's outputs: sdde_serve/atomic.py),
        # read back by this process only and deleted before the constructor returns
        fd, tmp = tempfile.mkstemp(suffix=".onnx")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            # reads the file once, fully; the probe runs on this worker's kernels, which may
            # not be the driver's
            self.engine = Engine(tmp, intra_op_threads=threads, probe_check=probe_check)
        finally:
            os.unlink(tmp)
        self.opts = opts

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        manifest, opts = self.engine.manifest, self.opts
        paths = [str(p) for p in batch["path"]]  # as the user gave them: the rows' names
        files = [str(p) for p in batch["file"]]  # absolute: workers have another working dir
        load = functools.partial(load_image, spec=manifest.input, limits=opts.limits)
        records: list[dict[str, Any] | None] = [None] * len(paths)
        good, images = [], []
        for i, (_, image, error) in enumerate(decode_chunk(load, files)):
            if image is None:
                records[i] = {"error": error}
            else:
                images.append(image)
                good.append(i)
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
    with require_extra("ray", what="--ray needs Ray Data"):
        import ray
        import ray.data
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
    probe_check: ProbeMode = DEFAULT_PROBE_MODE,
    progress: Callable[[int], None] | None = None,
    window: int = WINDOW,
) -> JobResult:
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows in input order, like local jobs
    ctx.enable_progress_bars = False
    tally = Tally(paths, files)
    # each actor's RayScorer(**scorer_kwargs): the model through the object store, once
    scorer_kwargs = {
        "model_bytes": ray.put(Path(model_path).read_bytes()),
        "opts": opts,
        "threads": threads,
        "probe_check": probe_check,
    }
    while chunk := list(islice(tally.paths, window)):
        items = [{"path": p, "file": os.path.abspath(p)} for p in chunk]
        ds = ray.data.from_items(items).map_batches(
            RayScorer,
            fn_constructor_kwargs=scorer_kwargs,
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
            tally.add(rows, errors)
            if progress is not None:
                progress(len(batch["path"]))
        if seen != len(chunk):
            raise RuntimeError(f"Ray returned {seen} rows for {len(chunk)} inputs")
        for p in chunk:
            tally.seen(p)
        tally.commit()
    if files.resumed is None and tally.done == 0:
        tally.commit()
    return tally.result()


@contextlib.contextmanager
def ray_backend(args: argparse.Namespace, opts: ScoreOptions) -> Iterator[BackendRun]:
    """The ``--ray`` backend, with Ray connected (or started) for the block and shut down after
    if we started it."""
    ray = _import_ray()
    manifest = read_manifest(load_onnx(args.model), source=args.model)
    started = _connect(ray, args.ray)
    try:

        def job(files: JobFiles, progress: Callable[[int], None]) -> JobResult:
            return ray_job(
                ray,
                args.model,
                iter_inputs(args.inputs),
                files,
                opts,
                threads=max(1, args.threads),
                probe_check=args.probe_check,
                progress=progress,
            )

        yield BackendRun(job, manifest, f"ray:{args.ray}")
    finally:
        if started:
            ray.shutdown()
