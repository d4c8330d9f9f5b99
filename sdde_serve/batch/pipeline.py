"""The streaming scoring pipeline shared by local and ``--url`` jobs.

::

    paths (lazy, ordered) -> decode pool (threads, bounded window, in order)
        -> full batches -> backend.run (engine or server) -> make_predictions -> rows
        -> JobFiles (staged; committed with the journal every ``commit_interval`` seconds)

Memory is bounded by the decode window (a few batches of images) and the rows staged between two
commits, whatever the number of inputs. Decoding overlaps inference because onnxruntime and
Pillow's decoders release the GIL: while the main thread runs a batch, the pool decodes the next
ones. Results keep the input order, so "the first n inputs are done" is a complete description
of progress (the resume journal relies on it).
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

from sdde_serve.engine import EngineOutput
from sdde_serve.manifest import InputSpec, Manifest
from sdde_serve.preprocess import ImageError, ImageLimits, decode_image
from sdde_serve.scoring import Prediction, make_predictions

from .job import JobResult, ScoreOptions, Tally
from .writers import JobFiles

__all__ = ["Backend", "ScoreOptions", "decode_chunk", "decoded_stream", "load_image", "run_job"]


class Backend(Protocol):
    """What scores a batch: a local :class:`~sdde_serve.engine.Engine` or a remote server."""

    manifest: Manifest

    def run(self, images: np.ndarray) -> EngineOutput: ...


# seconds without new input after which the pipeline scores its partial batch and commits
IDLE_S = 0.5
# failed inputs staged before a commit is forced (bounds memory on a run of bad files)
MAX_STAGED_ERRORS = 10_000


def load_image(path: str, spec: InputSpec, limits: ImageLimits) -> np.ndarray:
    """Read and decode one file; every failure is an :class:`ImageError` with the reason."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(limits.bytes_limit(spec) + 1)
    except OSError as exc:
        raise ImageError(f"unreadable: {exc.strerror or exc}") from None
    return decode_image(data, spec, limits)


def prediction_row(path: str, p: Prediction, *, top_k: bool, probs: bool) -> dict[str, Any]:
    """One output row (see :func:`sdde_serve.batch.writers.result_columns`)."""
    row: dict[str, Any] = {
        "path": path,
        "label": p.label,
        "class_name": p.class_name,
        "confidence": p.confidence,
        "ood_score": p.ood_score,
        "ood_p_value": p.ood_p_value,
        "is_ood": p.is_ood,
        "rejected": p.rejected,
        "agreement": p.agreement,
    }
    if top_k:
        row["top_k"] = None if p.top_k is None else [c.model_dump() for c in p.top_k]
    if probs:
        row["probs"] = p.probabilities
    return row


def score_rows(
    backend_out: EngineOutput, paths: list[str], manifest: Manifest, opts: ScoreOptions
) -> list[dict[str, Any]]:
    preds = make_predictions(
        backend_out,
        manifest,
        top_k=max(opts.top_k, 1),
        policy=opts.policy,
        include_probs=opts.probs,
    )
    return [
        prediction_row(path, pred, top_k=opts.top_k > 0, probs=opts.probs)
        for path, pred in zip(paths, preds, strict=True)
    ]


def make_pool(workers: int, processes: bool) -> Executor:
    if processes:
        import multiprocessing

        # spawn, not fork: the parent holds onnxruntime's thread pools, which fork would copy
        # in an undefined state
        ctx = multiprocessing.get_context("spawn")
        return ProcessPoolExecutor(max_workers=max(1, workers), mp_context=ctx)
    return ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="decode")


Decoded = tuple[str, np.ndarray | None, str | None]  # (path, image, error): one of the two is None


def decode_chunk(load: Callable[[str], np.ndarray], batch: list[str]) -> list[Decoded]:
    """Decode one chunk of paths: the worker function of every backend (thread and process
    pools here, Ray actors in :mod:`.ray_backend`). Module level: picklable for a process pool.

    A file that fails to decode is one bad input (its reason in the errors file), never a
    failed job."""
    out: list[Decoded] = []
    for p in batch:
        try:
            out.append((p, load(p), None))
        except ImageError as exc:
            out.append((p, None, str(exc)))
        except Exception as exc:
            # a decoder plugin failing in a way decode_image does not map (TypeError,
            # struct.error, ... on hostile files): still one bad file, not a failed job
            out.append((p, None, f"cannot decode ({type(exc).__name__}: {str(exc)[:120]})"))
    return out


class ChunkFeeder:
    """The hand-over between the feeder thread and the consumer of :func:`decoded_stream`: a
    bounded queue of chunk futures, in input order, ended by ``None`` (or the exception that
    stopped the feeder), and a stop flag the consumer sets when it leaves early."""

    def __init__(
        self, paths: Iterable[str], load: Callable[[str], np.ndarray], *, chunk: int, window: int
    ) -> None:
        self.paths, self.load, self.chunk = paths, load, chunk
        self.futures: queue.Queue[Future | BaseException | None] = queue.Queue(
            maxsize=max(1, window // chunk)
        )
        self.stop = threading.Event()

    def put(self, item: Future | BaseException | None) -> bool:
        """Queue ``item`` once there is room; False if the consumer stopped first."""
        while not self.stop.is_set():
            try:
                self.futures.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def feed(self, pool: Executor) -> None:
        """The feeder thread: submit the paths to ``pool`` chunk by chunk."""
        try:
            buf: list[str] = []
            for p in self.paths:
                buf.append(p)
                if len(buf) >= self.chunk:
                    if not self.put(pool.submit(decode_chunk, self.load, buf)):
                        return
                    buf = []
            if buf:
                self.put(pool.submit(decode_chunk, self.load, buf))
            self.put(None)
        except BaseException as exc:  # e.g. an unreadable list file: the job fails with it
            self.put(exc)

    def results(self, idle_s: float | None) -> Iterator[Decoded | None]:
        """The consumer: the decoded files in order, ``None`` after ``idle_s`` without any."""
        while True:
            try:
                item = self.futures.get(timeout=idle_s)
            except queue.Empty:
                yield None
                continue
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield from item.result()

    def close(self) -> None:
        """Stop the feeder and drop the queued work: nothing will consume it."""
        self.stop.set()
        while not self.futures.empty():
            item = self.futures.get_nowait()
            if isinstance(item, Future):
                item.cancel()


def decoded_stream(
    paths: Iterable[str],
    load: Callable[[str], np.ndarray],
    *,
    workers: int,
    window: int,
    chunk: int = 16,
    idle_s: float | None = None,
    processes: bool = False,
) -> Iterator[Decoded | None]:
    """``(path, image or None, error or None)`` in input order, from a decode pool.

    With ``idle_s``, ``None`` is yielded whenever no input arrived for that long (a stalled
    input stream), so the caller can score and commit what it holds instead of waiting.

    A feeder thread pulls paths (which may block: a slow list on stdin) and submits them in
    chunks (one future per ``chunk`` files: per-future overhead matters at thousands of small
    images per second), at most ``window`` files (plus two chunks in hand-over) ahead of the
    consumer; the consumer takes the futures in order, so finished work is never held back by
    input that has not arrived yet.
    """
    feeder = ChunkFeeder(paths, load, chunk=chunk, window=window)
    with make_pool(workers, processes) as pool:
        threading.Thread(target=feeder.feed, args=(pool,), name="feed", daemon=True).start()
        try:
            yield from feeder.results(idle_s)
        finally:
            feeder.close()


class Batcher:
    """A job's decoded inputs, in order, to the backend and the tally: images fill one engine
    batch, scored when full; failed inputs are staged; both are committed every
    ``commit_interval`` seconds (or sooner, when :data:`MAX_STAGED_ERRORS` errors wait)."""

    def __init__(self, backend: Backend, tally: Tally, opts: ScoreOptions) -> None:
        self.backend, self.tally, self.opts = backend, tally, opts
        spec = backend.manifest.input
        self.batch = np.empty((opts.batch_size, spec.channels, spec.height, spec.width), np.float32)
        self.batch_paths: list[str] = []
        self.errors: list[dict[str, Any]] = []  # staged until the next commit
        self.last_commit = time.monotonic()

    def take(self, path: str, image: np.ndarray | None, error: str | None) -> None:
        """The next input in order: into the batch, or the errors; score and commit when due."""
        self.tally.seen(path)
        if error is not None:
            self.errors.append({"path": path, "reason": error})
        else:
            self.batch[len(self.batch_paths)] = image
            self.batch_paths.append(path)
        # a long run of failures: score the partial batch so the errors can be committed
        many_errors = len(self.errors) >= MAX_STAGED_ERRORS
        if len(self.batch_paths) == self.opts.batch_size or many_errors:
            self.flush_batch()
            if many_errors or time.monotonic() - self.last_commit >= self.opts.commit_interval:
                self.commit()

    def idle(self) -> None:
        """The input stalls (slow list on stdin): don't sit on finished work."""
        if self.tally.done > self.tally.committed:
            self.flush_batch()
            self.commit()

    def flush_batch(self) -> None:
        """Score the (possibly partial) batch into the tally."""
        if not self.batch_paths:
            return
        out = self.backend.run(self.batch[: len(self.batch_paths)])
        rows = score_rows(out, self.batch_paths, self.backend.manifest, self.opts)
        self.tally.add(rows, [])
        self.batch_paths = []

    def commit(self) -> None:
        self.tally.add([], self.errors)
        self.errors = []
        self.tally.commit()
        self.last_commit = time.monotonic()


def run_job(
    backend: Backend,
    paths: Iterator[str],
    files: JobFiles,
    opts: ScoreOptions,
    *,
    progress: Callable[[int], None] | None = None,
) -> JobResult:
    """Score ``paths`` into ``files``; bad files are recorded in the errors file, never fatal."""
    tally = Tally(paths, files)
    batcher = Batcher(backend, tally, opts)
    bs = opts.batch_size
    stream = decoded_stream(
        tally.paths,
        functools.partial(load_image, spec=backend.manifest.input, limits=opts.limits),  # picklable
        workers=opts.workers,
        window=max(3 * bs, 64),
        chunk=max(1, min(16, bs)),
        idle_s=IDLE_S,
        processes=opts.processes,
    )
    with contextlib.closing(stream):  # stops the feeder and the pool if scoring fails
        for item in stream:
            if item is None:  # no input for IDLE_S
                batcher.idle()
                continue
            batcher.take(*item)
            if progress is not None:
                progress(1)
    batcher.flush_batch()
    batcher.commit()
    return tally.result()
