"""The repository extension's index: every model version on disk and loaded, with its state."""

from __future__ import annotations

from typing import Any

from sdde_serve.server.repo_files import scan
from sdde_serve.server.repository import ModelRepository


def index(repository: ModelRepository, ready_only: bool = False) -> list[dict[str, Any]]:
    """Rows ``{name, version, state[, reason, in_flight]}`` sorted by name and version."""
    root = repository.repository_root()
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for name, versions in scan(root).items():
        for version in versions:
            rows[(name, version)] = {"name": name, "version": version, "state": "UNAVAILABLE"}
    for name, entry in repository.entries.items():
        for version in entry.refused:
            if (name, version) in rows:
                rows[(name, version)]["reason"] = "failed to load (see the log)"
        for runtime, role in ((entry.serving, "serving"), (entry.shadow, "shadow")):
            if runtime is not None:
                rows[(name, runtime.version)] = {
                    "name": name,
                    "version": runtime.version,
                    "state": "READY",
                    "reason": role,
                    "in_flight": runtime.users,
                }
    order = sorted(rows, key=lambda k: (k[0], int(k[1]) if k[1].isdigit() else 0))
    out = [rows[k] for k in order]
    return [r for r in out if r["state"] == "READY"] if ready_only else out
