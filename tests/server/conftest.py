"""Fixtures for the server tests: apps on real models, image bytes, a real server process."""

from __future__ import annotations

import io
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from sdde_serve.engine import Engine
from sdde_serve.server.app import create_app
from sdde_serve.server.settings import Settings
from tests.onnx_factory import make_linear_ensemble, reference_outputs

REPO = Path(__file__).resolve().parents[2]


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def gray_png(seed: int = 0, size: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    return encode(Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)))


def png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (valid CRC), with one tiny data chunk:
    zero-size and decompression-bomb images without allocating them."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="session")
def linear(tmp_path_factory: pytest.TempPathFactory):
    """(path, weights) of a hand-made 3-member, 4-class ensemble on 1x8x8 inputs whose OOD
    threshold splits seeded noise images roughly in half (so both outcomes are easy to get)."""
    root = tmp_path_factory.mktemp("server_linear")
    _, weights = make_linear_ensemble(root / "probe.onnx")
    x = np.stack([decode(gray_png(s)) for s in range(40)])
    mal = reference_outputs(weights, x, 3, 1.5)["mal"]
    threshold = float(np.median(mal))
    return make_linear_ensemble(root / "linear.onnx", threshold=threshold)


def decode(png: bytes) -> np.ndarray:
    img = np.asarray(Image.open(io.BytesIO(png)), dtype=np.float32) / 255.0
    return img[None]


@pytest.fixture(scope="session")
def linear_engine(linear) -> Engine:
    return Engine(linear[0], intra_op_threads=1)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model: Path) -> Engine:
    return Engine(tiny_model, intra_op_threads=1)


@contextmanager
def serve(engine: Engine, **settings) -> Iterator[TestClient]:
    """An in-process app around ``engine`` (lifespan run: warmed up and ready)."""
    app = create_app(Settings(model=engine.path, **settings), engine)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def linear_client(linear_engine: Engine) -> Iterator[TestClient]:
    with serve(linear_engine) as client:
        yield client


# --- a real server process --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # a file, not a pipe: a pipe nobody reads blocks the server once it fills
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
        cmd = [sys.executable, "-m", "sdde_serve", "serve", str(model), "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [*cmd, "--threads", "1", "--log-level", "warning", *args],
            cwd=REPO,
            env=full_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited {self.proc.returncode}: {self.proc.stderr.read()}"
                )
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError("server not ready")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self.log.close()


@pytest.fixture(scope="session")
def tiny_server(tiny_model: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(tiny_model, "--max-queue-delay-ms", "20")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
