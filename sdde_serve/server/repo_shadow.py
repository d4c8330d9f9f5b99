"""Which version shadows a model (``--shadow NAME:VERSION``, the load API's ``shadow``): loaded
beside the serving one with its own batcher; :mod:`shadow` scores live traffic with it."""

from __future__ import annotations

import logging
from typing import Any

from sdde_serve.server.domain_errors import LoadFailed, Refused, UnknownModel
from sdde_serve.server.repository import ModelRepository

log = logging.getLogger("sdde.server.repository")


async def set_shadow(repository: ModelRepository, name: str, version: str | None) -> dict[str, Any]:
    """Score ``name``'s traffic also with ``version`` (``None``: stop shadow scoring)."""
    versions = repository.versions(name)
    entry = repository.entries.get(name)
    if entry is None:
        raise UnknownModel(f"model {name!r} is not loaded")
    async with entry.lock:
        old = entry.shadow
        if version is None:
            entry.shadow = entry.shadow_version = None
        else:
            if version not in versions:
                raise UnknownModel(f"version {version!r} of {name!r} is not in the repository")
            if entry.serving is not None and entry.serving.version == version:
                raise Refused(f"version {version} of {name} is the serving version")
            if old is None or old.version != version:
                entry.shadow = await repository.load_version(
                    entry, version, versions[version], shadow=True
                )
                repository.set_role(entry.shadow, "shadow")
            entry.shadow_version = version
        if old is not None and old is not entry.shadow:
            repository.retire(old)
        return {"name": name, "shadow": entry.shadow_version}


async def start_shadows(repository: ModelRepository) -> None:
    """The ``--shadow`` versions, once the serving ones run: a typo stopped start-up already
    (``preload``); a file that fails is logged and counted, and live serving goes on."""
    for name, version in repository.shadows.items():
        if name not in repository.entries:
            log.error("--shadow %s:%s: no such model; no shadow scoring", name, version)
            continue
        try:
            await set_shadow(repository, name, version)
        except (LoadFailed, Refused, UnknownModel) as exc:
            log.error("shadow %s:%s not started: %s", name, version, exc)
