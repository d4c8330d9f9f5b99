"""Prometheus metrics across ``sdde serve --workers N`` processes (prometheus_client's
multiprocess mode, docs/server.md).

Each worker writes its samples to memory-mapped files in one directory; ``/metrics``, answered
by any worker, reads every process's files and merges them:

* counters and histograms are **summed** over the workers (and over workers that have exited, so
  a restarted worker does not make a counter go backwards);
* gauges merge by the mode their definition states (``GAUGE_MODES`` in ``metrics.py``): the
  queue depth is summed over live workers, readiness is the minimum over live workers (1 only
  when every worker is ready), the model-info gauge the maximum.

The directory is ``$PROMETHEUS_MULTIPROC_DIR`` when set (it must be set before
``prometheus_client`` is imported, which is why the parent sets it before it starts the workers),
else a fresh temporary directory removed at exit. ``sdde serve`` empties it of ``*.db`` files at
start: files left by an earlier server would otherwise be added to this one's counters.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

Rewrite = Callable[[list["Metric"]], list["Metric"]]

ENV = "PROMETHEUS_MULTIPROC_DIR"
# gauge_livesum_1234.db: the live modes' files carry the pid of the process that wrote them
_LIVE_FILE = re.compile(r"^gauge_live\w+?_(\d+)\.db$")


def multiprocess_dir() -> Path | None:
    """The directory the workers share, when this process runs in multiprocess mode."""
    value = os.environ.get(ENV) or os.environ.get(ENV.lower())
    return Path(value) if value else None


def clean_dir(path: Path) -> None:
    """Create ``path`` or remove the metric files an earlier server left in it."""
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink(missing_ok=True)
    for stale in path.glob("repository-*"):  # repo_sync's shared state: this server's own
        stale.unlink(missing_ok=True)


@contextlib.contextmanager
def shared_metrics_dir() -> Iterator[Path]:
    """Set up the directory for the workers (in the parent, before any worker starts)."""
    given = multiprocess_dir()
    path = given or Path(tempfile.mkdtemp(prefix="sdde-metrics-"))
    clean_dir(path)
    os.environ[ENV] = str(path)
    try:
        yield path
    finally:
        if given is None:
            shutil.rmtree(path, ignore_errors=True)


def remove_series(metric: Any, *labelvalues: str) -> bool:
    """Remove one labelled series of ``metric`` if this process has it; False when it had none.

    Every removal goes through here rather than ``metric.remove``: prometheus_client warns at
    each ``remove()`` in multiprocess mode, also for a series that was never created (nothing to
    remove), which printed one warning per worker at start-up. Removing a series that does exist
    still warns there, truthfully: the other workers' files keep it until they exit.
    """
    wanted = tuple(map(str, labelvalues))
    present = any(  # a sample's labels: the metric's, in order (a histogram's "le" after them)
        tuple(sample.labels.values())[: len(wanted)] == wanted
        for family in metric.collect()
        for sample in family.samples
    )
    if present:
        metric.remove(*labelvalues)
    return present


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0 probes without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def forget_dead_workers(path: Path) -> None:
    """Drop the live-gauge files of processes that have exited (a crashed worker's queue depth
    and readiness must not count). uvicorn restarts dead workers without telling us, so this
    runs at each scrape; counters and histograms of dead workers are kept."""
    from prometheus_client import multiprocess

    pids = {int(m.group(1)) for f in path.iterdir() if (m := _LIVE_FILE.match(f.name))}
    for pid in pids:
        if pid != os.getpid() and not alive(pid):
            multiprocess.mark_process_dead(pid, str(path))


def collect(path: Path, rewrite: Rewrite | None = None) -> bytes:
    """Prometheus text of every worker's metrics, merged (then passed through ``rewrite``: the
    feedback window's sums become ratios, live_window.py)."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    forget_dead_workers(path)
    families = list(multiprocess.MultiProcessCollector(None, str(path)).collect())
    if rewrite is not None:
        families = rewrite(families)
    registry = CollectorRegistry()
    registry.register(_Families(families))
    return generate_latest(registry)


class _Families:
    """A collector answering with families already collected."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def worker_exiting(path: Path | None) -> None:
    """A worker shutting down removes its live gauges (its counters stay in the sums)."""
    if path is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid(), str(path))
