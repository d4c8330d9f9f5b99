"""``--poll-repo``: follow the repository directory (new versions and models load, models whose
directory is gone unload), as Triton's ``--model-control-mode=poll``."""

from __future__ import annotations

import asyncio
import logging

from sdde_serve.server.domain_errors import LoadFailed, Refused, UnknownModel
from sdde_serve.server.repo_files import stamp
from sdde_serve.server.repository import ModelRepository

log = logging.getLogger("sdde.server.repository")


async def poll_once(repository: ModelRepository) -> None:
    """Load new versions (and new models); unload models whose directory is gone."""
    models = await asyncio.to_thread(repository.scan)
    for name, versions in models.items():
        entry = repository.entries.get(name)
        if entry is not None and entry.unloaded:
            continue
        pinned = entry.pinned if entry is not None else repository.pins.get(name)
        target = pinned or next(reversed(versions), None)
        if target is None or target not in versions:
            continue
        if entry is not None and entry.refused.get(target) == stamp(versions[target]):
            continue  # refused already; retried once the file changes
        serving = entry.serving if entry is not None else None
        if serving and serving.version == target and serving.stamp == stamp(versions[target]):
            continue
        try:
            await repository.load(name)
        except (LoadFailed, Refused, UnknownModel) as exc:
            log.error("poll: %s", exc)
    for name, entry in list(repository.entries.items()):
        if name not in models and not entry.unloaded:
            log.warning("poll: model %s left the repository; unloading", name)
            await repository.unload(name)


async def poll_forever(repository: ModelRepository, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await poll_once(repository)
        except Exception:  # a transient file system error must not stop polling
            log.exception("repository poll failed")
