"""The repository API with ``sdde serve --workers N``: one call changes every worker.

Each worker process has its own models; a load, unload or shadow call reaches one of them. That
worker applies it, then records each model's **desired state** (pinned version, unloaded,
shadow version) in ``repository-state.json`` in the directory the workers share (the metrics
directory, :mod:`multiprocess`), with a generation number. Every worker follows that file
(``FOLLOW_S``) and brings its own models to the desired state, then writes the generation it
reached to ``repository-applied-<pid>.json``; the worker that took the call answers once every
live worker has reached it (at most ``WAIT_S``; the answer names the workers that had not).
A restarted worker catches up when it starts. Replicas do not share this: each replica's API
changes that replica (a model repository volume plus ``--poll-repo`` changes them all).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sdde_serve.atomic import write_text_atomic
from sdde_serve.server.domain_errors import LoadFailed, Refused, UnknownModel
from sdde_serve.server.multiprocess import alive
from sdde_serve.server.repo_shadow import set_shadow
from sdde_serve.server.repository import ModelRepository

log = logging.getLogger("sdde.server.repository")

STATE = "repository-state.json"
APPLIED = "repository-applied-{pid}.json"
FOLLOW_S = 0.2
WAIT_S = 60.0


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or (never: writes are atomic) half written
        return None


class RepositorySync:
    """Shares repository API calls among the worker processes of one server."""

    def __init__(self, repository: ModelRepository, directory: Path) -> None:
        self.repository = repository
        self.directory = directory
        self.applied = 0
        self._lock = asyncio.Lock()  # one reconcile at a time in this worker

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        with open(self.directory / "repository-state.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _desired(self, name: str) -> dict[str, Any]:
        entry = self.repository.entries[name]
        serving = entry.serving.version if entry.serving is not None else None
        return {
            "pinned": entry.pinned,
            "unloaded": entry.unloaded,
            "shadow": entry.shadow_version,
            "serving": serving,  # a load without a version may have found a newer one on disk
        }

    def _publish_now(self, name: str) -> int:
        with self._file_lock():
            state = _read_json(self.directory / STATE) or {"generation": 0, "models": {}}
            state["generation"] += 1
            state["models"][name] = self._desired(name)
            write_text_atomic(self.directory / STATE, json.dumps(state))
        return int(state["generation"])

    async def publish(self, name: str) -> dict[str, Any]:
        """Record ``name``'s state (just changed here) and wait for every worker to reach it."""
        generation = await asyncio.to_thread(self._publish_now, name)
        await self.follow_once()
        deadline = time.monotonic() + WAIT_S
        while (behind := self._behind(generation)) and time.monotonic() < deadline:
            await asyncio.sleep(FOLLOW_S / 2)
        answer: dict[str, Any] = {"workers": len(self._workers()), "generation": generation}
        if behind:
            answer["workers_pending"] = behind
        return answer

    def _workers(self) -> dict[int, int]:
        """Live workers' pid -> generation reached."""
        out = {}
        for path in self.directory.glob(APPLIED.format(pid="*")):
            pid = int(path.stem.rsplit("-", 1)[1])
            data = _read_json(path)
            if data is not None and alive(pid):
                out[pid] = int(data["generation"])
        return out

    def _behind(self, generation: int) -> list[int]:
        return sorted(pid for pid, reached in self._workers().items() if reached < generation)

    async def follow_once(self) -> None:
        """Bring this worker's models to the shared desired state, if it changed."""
        async with self._lock:
            state = await asyncio.to_thread(_read_json, self.directory / STATE)
            generation = int(state["generation"]) if state else 0
            if state is not None and generation > self.applied:
                for name, desired in state["models"].items():
                    await self._reconcile(name, desired)
            self.applied = max(self.applied, generation)
            path = self.directory / APPLIED.format(pid=os.getpid())
            if _read_json(path) != {"generation": self.applied}:
                await asyncio.to_thread(
                    write_text_atomic, path, json.dumps({"generation": self.applied})
                )

    async def _reconcile(self, name: str, desired: dict[str, Any]) -> None:
        repository = self.repository
        entry = repository.entries.get(name)
        try:
            if desired["unloaded"]:
                if entry is not None and not entry.unloaded:
                    await repository.unload(name)
                return
            serving = entry.serving.version if entry is not None and entry.serving else None
            if (
                entry is None
                or entry.unloaded
                or entry.pinned != desired["pinned"]
                or serving != desired["serving"]
            ):
                await repository.load(name, desired["pinned"] or "latest")
            if repository.entries[name].shadow_version != desired["shadow"]:
                await set_shadow(repository, name, desired["shadow"])
        except (LoadFailed, Refused, UnknownModel) as exc:  # logged; the others' answer stands
            log.error("worker %d: model %s not brought to the shared state: %s", os.getpid(),
                      name, exc)  # fmt: skip

    async def follow_forever(self) -> None:
        while True:
            await asyncio.sleep(FOLLOW_S)
            try:
                await self.follow_once()
            except Exception:  # a transient file system error must not stop following
                log.exception("repository state follow failed")
