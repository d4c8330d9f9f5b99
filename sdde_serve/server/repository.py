"""The models a server serves: one file, or every model of a Triton-layout repository.

A service that speaks no HTTP: it raises the domain errors of :mod:`domain_errors` (``errors.py``
gives them their status codes). A repository is ``REPO/<name>/<version>/model.onnx``
(:mod:`repo_files`). Each model serves one version at a time: its latest (the default) or the
one pinned with ``--pin NAME:VERSION`` or the load API; a shadow version (:mod:`repo_shadow`)
may be loaded beside it, scored after the live answer (:mod:`shadow`). Following the directory
(``--poll-repo``) is :mod:`repo_poll`; the extension's index is :mod:`repo_index`.

Changing the serving version is a hot swap: the new version is loaded and verified (the
:class:`~sdde_serve.engine.Engine` constructor's checks), warmed up and given its own batcher, and
only then does one assignment route new requests to it. Requests that resolved the old version
hold it (``users``) and finish on it; the old version's batcher closes once they are done. A
version that fails at any step is refused: the serving one stays, and the failure is logged,
returned by the load call and counted in ``sdde_model_load_failures_total``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdde_serve.engine import Engine, ModelLoadError
from sdde_serve.manifest import Manifest
from sdde_serve.server.batcher import Batcher
from sdde_serve.server.domain_errors import LoadFailed, NotReady, Refused, UnknownModel
from sdde_serve.server.lifecycle_metrics import LifecycleMetrics
from sdde_serve.server.metrics import Metrics
from sdde_serve.server.multiprocess import remove_series
from sdde_serve.server.repo_files import MODEL_FILE, Stamp, scan, stamp
from sdde_serve.server.settings import Settings

log = logging.getLogger("sdde.server.repository")


@dataclass
class Preloaded:
    """Each model's starting version, loaded before the server binds, and the versions refused
    on the way (newer ones that failed: the app counts and lists them once it runs)."""

    engines: dict[str, tuple[str, Engine]]  # name -> (version, engine)
    refused: list[tuple[str, str, Path]] = field(default_factory=list)  # (name, version, file)


@dataclass(eq=False)
class ModelRuntime:
    """A loaded, warmed-up model version behind its own batcher."""

    manifest: Manifest
    providers: list[str]
    batcher: Batcher
    name: str = ""  # the name it is served under (repository directory; else the manifest's)
    version: str = ""
    stamp: Stamp | None = None
    users: int = 0  # requests (and shadow jobs) that resolved this version and are not done

    def __post_init__(self) -> None:
        self.name = self.name or self.manifest.name
        self.version = self.version or self.manifest.version

    @contextmanager
    def use(self) -> Iterator[ModelRuntime]:
        self.users += 1
        try:
            yield self
        finally:
            self.users -= 1

    async def drain(self, timeout: float) -> int:
        """Wait (at most ``timeout`` s) for the requests using this version, then stop its
        batcher. Returns how many were in flight when the drain began."""
        busy = self.users
        deadline = time.monotonic() + timeout
        while self.users and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await self.batcher.close(max(deadline - time.monotonic(), 0.0))
        return busy


@dataclass(eq=False)
class ModelEntry:
    name: str
    pinned: str | None = None  # None: serve the latest version
    shadow_version: str | None = None
    serving: ModelRuntime | None = None
    shadow: ModelRuntime | None = None
    unloaded: bool = False  # unloaded through the API: the poller leaves it alone
    refused: dict[str, Stamp] = field(default_factory=dict)  # version -> file that failed
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def loaded(self) -> list[ModelRuntime]:
        return [r for r in (self.serving, self.shadow) if r is not None]


def open_engine(settings: Settings, path: Path) -> Engine:
    """Load and verify one model file with the server's engine options."""
    return Engine(
        path,
        intra_op_threads=settings.intra_op_threads,
        require_gpu=settings.require_gpu,
        spin_wait=settings.spin_wait,
        probe_check=settings.probe_check,
        # a pinned digest names one file: refused with a repository at start-up (server cli)
        expect_sha256=settings.expect_sha256,
    )


class ModelRepository:
    """Every model the server serves, by name and version (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        lifecycle: LifecycleMetrics,
        load: Callable[[Path], Engine] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.lifecycle = lifecycle
        model = settings.model
        self.root: Path | None = model if model is not None and model.is_dir() else None
        self._load = load or (lambda path: open_engine(settings, path))
        self.entries: dict[str, ModelEntry] = {}
        self._retiring: set[asyncio.Task[int]] = set()
        self.pins = settings.model_versions(settings.pin)
        self.shadows = settings.model_versions(settings.shadow)

    # --- lookup --------------------------------------------------------------------------------

    def resolve(self, name: str | None, version: str | None = None) -> ModelRuntime:
        """The version a request for ``name`` (``None``: the only model) runs on."""
        if name is None:
            if len(self.entries) != 1:
                raise Refused(
                    f"this server serves {len(self.entries)} models ({', '.join(self.entries)}): "
                    "name one, e.g. POST /v1/models/{name}:predict",
                )
            (entry,) = self.entries.values()
        else:
            entry = self.entries.get(name)
            if entry is None:
                raise UnknownModel(
                    f"unknown model {name!r}; this server serves {', '.join(self.entries)}"
                )
        if entry.unloaded:
            raise UnknownModel(f"model {entry.name!r} is unloaded")
        if version is None:
            if entry.serving is None:
                raise NotReady(
                    f"model {entry.name!r} is not ready: loading, or no version of it loads "
                    "(POST /v2/repository/index)"
                )
            return entry.serving
        for runtime in entry.loaded():
            if runtime.version == version:
                return runtime
        have = ", ".join(r.version for r in entry.loaded()) or "none"
        raise UnknownModel(f"version {version!r} of {entry.name!r} is not loaded (loaded: {have})")

    def loaded_versions(self, name: str) -> list[str]:
        entry = self.entries.get(name)
        return [r.version for r in entry.loaded()] if entry is not None else []

    def default_entry(self) -> ModelEntry | None:
        return next(iter(self.entries.values()), None) if len(self.entries) == 1 else None

    def ready(self) -> bool:
        """Some model serves. (Per model: ``/v2/models/{name}/ready``. A model that appears in
        the repository with no loadable version must not take the others out of service.)"""
        return any(e.serving is not None for e in self.entries.values())

    # --- start and stop ------------------------------------------------------------------------

    def preload(self) -> Preloaded:
        """Load each model's starting version (blocking; before the server binds).

        Latest policy: the newest version that loads (failures are logged and counted, and an
        older version serves). A pinned version must load. No loadable version: ModelLoadError.
        """
        assert self.root is not None
        models = scan(self.root)
        if not models:
            raise ModelLoadError(
                f"{self.root}: no models (expected {self.root}/<name>/<version>/{MODEL_FILE})"
            )
        loaded = Preloaded({})
        for name, versions in models.items():
            pinned = self.pins.get(name)
            if pinned is not None and pinned not in versions:
                raise ModelLoadError(f"{name}: pinned version {pinned} is not in the repository")
            order = [pinned] if pinned else list(reversed(versions))
            errors = []
            for version in order:
                try:
                    loaded.engines[name] = (version, self._load(versions[version]))
                    break
                except ModelLoadError as exc:
                    errors.append(f"v{version}: {exc}")
                    log.error("model %s version %s refused: %s", name, version, exc)
                    loaded.refused.append((name, version, versions[version]))
            else:
                raise ModelLoadError(f"model {name}: no version loads ({'; '.join(errors)})")
        unknown = set(self.pins) - set(models)
        if unknown:
            raise ModelLoadError(f"--pin names unknown models: {', '.join(sorted(unknown))}")
        for name, version in self.shadows.items():  # a typo stops start-up; a bad file doesn't
            if version not in models.get(name, {}):
                raise ModelLoadError(
                    f"--shadow {name}:{version}: no such model version in {self.root}"
                )
        return loaded

    async def start(self, engine: Engine | None = None, preloaded: Preloaded | None = None) -> None:
        """Serve ``engine`` (one file) or the repository (``preloaded``, else loaded now); the
        shadow versions start after this (``repo_shadow.start_shadows``)."""
        if self.root is None:
            if engine is None:
                assert self.settings.model is not None
                engine = await asyncio.to_thread(self._load, self.settings.model)
            entry = self.entries.setdefault(engine.manifest.name, ModelEntry(engine.manifest.name))
            entry.serving = await self._activate(entry, engine, engine.manifest.version, None)
            self.set_role(entry.serving, "serving")
            return
        if preloaded is None:
            preloaded = await asyncio.to_thread(self.preload)
        for name, (version, eng) in preloaded.engines.items():
            entry = self.entries.setdefault(name, ModelEntry(name, pinned=self.pins.get(name)))
            path = self.root / name / version / MODEL_FILE
            entry.serving = await self._activate(entry, eng, version, stamp(path))
            self.set_role(entry.serving, "serving")
        for name, version, path in preloaded.refused:  # logged by preload; counted from here
            self.entries[name].refused[version] = stamp(path)
            self.lifecycle.load_failures.labels(model=name, version=version).inc()

    async def close(self, timeout: float) -> None:
        runtimes = [r for e in self.entries.values() for r in e.loaded()]
        for entry in self.entries.values():
            entry.serving = entry.shadow = None
        await asyncio.gather(*(r.drain(timeout) for r in runtimes), *self._retiring)

    # --- loading -------------------------------------------------------------------------------

    async def _activate(
        self,
        entry: ModelEntry,
        engine: Engine,
        version: str,
        file_stamp: Stamp | None,
        shadow: bool = False,
    ) -> ModelRuntime:
        """Warm up ``engine`` and start its batcher. A shadow's batcher records no batch metrics
        and it gets no ``sdde_model_info``: the live series describe live traffic only."""
        s = self.settings
        sizes = tuple(sorted({1, s.max_batch_size}))
        await asyncio.to_thread(engine.warmup, sizes)
        batcher = Batcher(
            engine.run,
            max_batch_size=s.max_batch_size,
            max_delay_s=s.max_queue_delay_ms / 1000.0,
            max_queue_size=s.max_queue_size,
            metrics=None if shadow else self.metrics,
            model=entry.name,
        )
        batcher.start()
        runtime = ModelRuntime(
            engine.manifest, list(engine.providers), batcher, entry.name, version, file_stamp
        )
        if not shadow:
            self.metrics.set_model(
                engine.manifest, engine.providers, name=entry.name, version=version
            )
        self.lifecycle.loaded(entry.name, version)
        return runtime

    def _refuse(self, name: str, version: str, path: Path, reason: str) -> None:
        entry = self.entries.get(name)
        if entry is not None:
            entry.refused[version] = stamp(path)
        self.lifecycle.load_failures.labels(model=name, version=version).inc()
        log.error("model %s version %s refused: %s", name, version, reason)

    def repository_root(self) -> Path:
        """The repository's directory. The repository API (index, load, unload) needs one:
        refused alike on a one-file server, which does not list the extension in ``GET /v2``."""
        if self.root is None:
            # nothing to load back from: unloading the only model would end service for good
            raise Refused(
                f"this server serves one model file ({self.settings.model}), not a model "
                "repository: the repository API (index, load, unload) needs "
                "`sdde serve REPO_DIR` (REPO/<name>/<version>/model.onnx)",
            )
        return self.root

    def scan(self) -> dict[str, dict[str, Path]]:
        """``{name: {version: model file}}`` on disk now (:func:`repo_files.scan`)."""
        return scan(self.repository_root())

    def versions(self, name: str) -> dict[str, Path]:
        """``name``'s versions on disk (:class:`UnknownModel` when it has none)."""
        versions = self.scan().get(name)
        if not versions:
            raise UnknownModel(f"model {name!r} is not in the repository {self.root}")
        return versions

    async def load_version(
        self, entry: ModelEntry, version: str, path: Path, shadow: bool = False
    ) -> ModelRuntime:
        """Load, verify and warm up one version behind its own batcher; a failure is counted,
        logged and raised as :class:`LoadFailed` (the serving version is not touched here)."""
        try:
            engine = await asyncio.to_thread(self._load, path)
            return await self._activate(entry, engine, version, stamp(path), shadow)
        except Exception as exc:  # ModelLoadError, or onnxruntime failing at warm-up
            if isinstance(exc, ModelLoadError):
                reason = str(exc)
            else:
                reason = f"{path}: warm-up failed ({type(exc).__name__}: {exc})"
            self._refuse(entry.name, version, path, reason)
            raise LoadFailed(reason) from None

    async def load(self, name: str, version: str | None = None) -> dict[str, Any]:
        """Serve ``name``'s target version: ``version`` (pin), ``"latest"``, or ``None`` (keep
        the policy). A no-op when that version (same file) already serves."""
        versions = self.versions(name)
        entry = self.entries.setdefault(name, ModelEntry(name, pinned=self.pins.get(name)))
        async with entry.lock:
            pinned = entry.pinned if version is None else (None if version == "latest" else version)
            target = pinned or next(reversed(versions))
            if target not in versions:
                raise UnknownModel(f"version {target!r} of {name!r} is not in the repository")
            path = versions[target]
            old = entry.serving
            if old is not None and old.version == target and old.stamp == stamp(path):
                entry.pinned, entry.unloaded = pinned, False
                return {"name": name, "version": target, "state": "READY", "changed": False}
            new = await self._load_new(entry, target, path, old)
            entry.serving = new  # the switch: new requests resolve to `new` from here on
            shadow = entry.shadow
            if shadow is not None and shadow.version == target:
                # the candidate went live (loaded afresh, with the live metrics): shadowing ends
                entry.shadow = entry.shadow_version = None
                self.retire(shadow)
            entry.pinned, entry.unloaded = pinned, False
            entry.refused.pop(target, None)
            self.set_role(new, "serving")
            log.info(
                "model %s: version %s serving%s",
                name,
                target,
                f" (was {old.version})" if old else "",
            )
            if old is not None:
                self.retire(old)
            self._set_ready(entry)
            return {
                "name": name,
                "version": target,
                "state": "READY",
                "changed": True,
                "previous": old.version if old else None,
            }

    async def _load_new(
        self, entry: ModelEntry, version: str, path: Path, old: ModelRuntime | None
    ) -> ModelRuntime:
        try:
            return await self.load_version(entry, version, path)
        except LoadFailed as exc:
            keep = f"version {old.version} stays in service" if old else "nothing serves"
            reason = f"failed to load {entry.name} version {version}: {exc}; {keep}"
            raise LoadFailed(reason) from None

    async def unload(self, name: str) -> dict[str, Any]:
        """Stop serving ``name``: new requests get 404 at once; in-flight ones finish."""
        self.repository_root()
        entry = self.entries.get(name)
        if entry is None or entry.unloaded:
            raise UnknownModel(f"model {name!r} is not loaded")
        async with entry.lock:
            runtimes = entry.loaded()
            entry.serving = entry.shadow = None
            entry.unloaded = True
            self._set_ready(entry)
            drained = await asyncio.gather(*(self.retire(r, background=False) for r in runtimes))
            log.info("model %s unloaded (%d in-flight requests drained)", name, sum(drained))
            return {
                "name": name,
                "unloaded": [r.version for r in runtimes],
                "drained_requests": sum(drained),
            }

    def retire(self, runtime: ModelRuntime, background: bool = True) -> Any:
        """Drain ``runtime`` and stop its batcher (as a task, or an awaitable of the count)."""

        async def retire() -> int:
            busy = await runtime.drain(self.settings.drain_timeout_s)
            self.set_role(runtime, None)
            return busy

        if not background:
            return retire()
        task = asyncio.get_running_loop().create_task(retire())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return task

    def set_role(self, runtime: ModelRuntime, role: str | None) -> None:
        if role is None:
            entry = self.entries.get(runtime.name)
            if entry is not None and any(r.version == runtime.version for r in entry.loaded()):
                return  # the same version reloaded from a changed file: its series stay
            self.metrics.unset_model(
                runtime.manifest, runtime.providers, name=runtime.name, version=runtime.version
            )
        self.lifecycle.set_role(runtime.name, runtime.version, role)

    def _set_ready(self, entry: ModelEntry) -> None:
        if entry.unloaded:  # not served on purpose: no series, so SddeModelNotReady stays quiet
            remove_series(self.metrics.model_ready, entry.name)
            return
        self.metrics.model_ready.labels(model=entry.name).set(int(entry.serving is not None))
