"""Hostile requests against a real ``sdde serve``: peak memory and liveness while each is handled.

For every request of :func:`corpus` (oversized JSON lists, 16-bit PNGs, WebP bombs, many images
at the pixel budget, v2 output copies, the largest legitimate requests, ...) this measures

* the server's peak RSS (``VmHWM`` in ``/proc/PID/status``) after the request, against the
  warmed server (model loaded, typical and largest legitimate requests served once), and
* the slowest answer of a liveness probe (``GET /v2/health/live`` in a loop on its own
  connection) while the request was being handled.

Goal (issue 12): no request raises the peak by more than 64 MB over the warmed server, and
liveness answers within 100 ms throughout. Only 127.0.0.1 is contacted; every loop is bounded.

    python benchmarks/hostile_requests.py MODEL.onnx [--out benchmarks/results/hostile.json]

``tests/server/test_hostile.py`` runs the same corpus against the test suite's tiny model.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MB = 1024 * 1024
RSS_GOAL_MB = 64.0
LIVENESS_GOAL_S = 0.1


@dataclass(frozen=True)
class Hostile:
    name: str
    method: str
    path: str  # {model} is replaced by the model's name
    build: Callable[[], dict]  # -> httpx request keyword arguments


@dataclass
class Measured:
    name: str
    status: int
    seconds: float
    peak_over_warm_mb: float  # peak RSS during the request minus the warmed server's RSS
    rss_before_mb: float  # RSS when the request started, over the warmed server's
    liveness_max_s: float
    reason: str


# --- building the requests (in the client; cheap, no large arrays kept) ------------------------


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png16(width: int, height: int) -> bytes:
    """A 16-bit grayscale PNG of zeros, compressed row by row (no full image in memory)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    comp = zlib.compressobj(9)
    row = b"\0" * (1 + 2 * width)
    data = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def png_text_bomb(chunks: int = 64, size: int = MB) -> bytes:
    """An 8x8 PNG whose metadata holds ``chunks`` zTXt chunks of ``size`` bytes each once
    decompressed (a few KB on the wire), read by Pillow while opening the file."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    png = encode(Image.new("L", (8, 8), 0))
    text = b"".join(
        chunk(b"zTXt", b"k%d\0\0" % i + zlib.compress(b"a" * size, 9)) for i in range(chunks)
    )
    return png[:33] + text + png[33:]  # after the signature and IHDR


def webp(width: int, height: int, mode: str = "RGBA") -> bytes:
    img = Image.new(mode, (width, height), (200, 10, 10, 128) if mode == "RGBA" else 0)
    return encode(img, "WEBP", lossless=True, method=0, quality=0)


def multipart(blobs: list[bytes], suffix: str = "png") -> dict:
    return {"files": [("files", (f"f{i}.{suffix}", b, "image/png")) for i, b in enumerate(blobs)]}


def json_list(item: bytes, total_bytes: int) -> bytes:
    n = total_bytes // (len(item) + 1)
    return b'{"images":[' + (item + b",") * n + item + b"]}"


def v2_json(batch: int, side: int, outputs: list[str] | None = None) -> dict:
    body: dict = {
        "inputs": [
            {
                "name": "images",
                "shape": [batch, 1, side, side],
                "datatype": "FP32",
                "data": [0] * (batch * side * side),
            }
        ]
    }
    if outputs is not None:
        body["outputs"] = [{"name": n} for n in outputs]
    return {"content": json.dumps(body).encode(), "headers": {"content-type": "application/json"}}


def v2_binary(batch: int, side: int, outputs: list[str] | None = None) -> dict:
    x = np.zeros((batch, 1, side, side), np.float32).tobytes()
    request: dict = {
        "inputs": [
            {
                "name": "images",
                "shape": [batch, 1, side, side],
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(x)},
            }
        ],
        "parameters": {"binary_data_output": outputs is None},
    }
    if outputs is not None:
        request["outputs"] = [{"name": n} for n in outputs]
    head = json.dumps(request).encode()
    return {
        "content": head + x,
        "headers": {
            "content-type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(head)),
        },
    }


def raw(data: bytes, media: str = "image/png") -> dict:
    return {"content": data, "headers": {"content-type": media}}


def b64_json(blobs: list[bytes]) -> dict:
    import base64

    body = json.dumps({"images": [base64.b64encode(b).decode() for b in blobs]}).encode()
    return {"content": body, "headers": {"content-type": "application/json"}}


def corpus(side: int = 28, max_images: int = 256) -> list[Hostile]:
    """Hostile requests for a 1-channel ``side`` x ``side`` model (the server's defaults)."""
    small = encode(Image.new("L", (side, side), 0))
    at_limit = 1448  # 1448^2 = 2,096,704 <= the default 2,097,152 pixels per image
    predict = "/v1/predict"
    infer = "/v2/models/{model}/infer"
    return [
        Hostile(
            "json: 32 MB list of empty strings",
            "POST",
            predict,
            lambda: raw(json_list(b'""', 32 * MB - 4096), "application/json"),
        ),
        Hostile(
            "json: 8 MB list of empty strings",
            "POST",
            predict,
            lambda: raw(json_list(b'""', 8 * MB - 4096), "application/json"),
        ),
        Hostile(
            "json: 8 MB list of numbers",
            "POST",
            predict,
            lambda: raw(json_list(b"0", 8 * MB - 4096), "application/json"),
        ),
        Hostile(
            "json: nesting 1M deep",
            "POST",
            predict,
            lambda: raw(b'{"images":' + b"[" * 10**6 + b"]" * 10**6 + b"}", "application/json"),
        ),
        Hostile("png: 16-bit 6000x6000 (77 KB)", "POST", predict, lambda: raw(png16(6000, 6000))),
        Hostile(
            "png: 16-bit at the pixel limit",
            "POST",
            predict,
            lambda: raw(png16(at_limit, at_limit)),
        ),
        Hostile("png: 64 MB of zTXt metadata", "POST", predict, lambda: raw(png_text_bomb())),
        Hostile("webp: 3000x3000 bomb", "POST", predict, lambda: raw(webp(3000, 3000, "L"))),
        Hostile(
            "webp: RGBA at the pixel limit",
            "POST",
            predict,
            lambda: raw(webp(at_limit, at_limit), "image/webp"),
        ),
        Hostile(
            "webp: 8 RGBA at the pixel limit (multipart)",
            "POST",
            predict,
            lambda: multipart([webp(at_limit, at_limit)] * 8, "webp"),
        ),
        Hostile(
            "webp: 4 RGBA at the request budget (base64 JSON)",
            "POST",
            predict,
            lambda: b64_json([webp(at_limit, at_limit)] * 4),
        ),
        Hostile(
            "jpeg: RGB at the pixel limit",
            "POST",
            predict,
            lambda: raw(encode(Image.new("RGB", (at_limit, at_limit), (9, 99, 199)), "JPEG")),
        ),
        Hostile(
            "raw: 31 MB of junk as image/png",
            "POST",
            predict,
            lambda: raw(b"\x89PNG" + b"\0" * (31 * MB)),
        ),
        Hostile(
            "multipart: 4 files of 7.5 MB junk",
            "POST",
            predict,
            lambda: multipart([b"\x89PNG" + bytes(15 * MB // 2)] * 4),
        ),
        Hostile(
            f"multipart: {max_images} small PNGs",
            "POST",
            predict,
            lambda: multipart([small] * max_images),
        ),
        Hostile(
            "v2: 300 copies of logits (JSON input)",
            "POST",
            infer,
            lambda: v2_json(max_images, side, ["logits"] * 300),
        ),
        Hostile(
            "v2: 300 copies of logits (binary input)",
            "POST",
            infer,
            lambda: v2_binary(max_images, side, ["logits"] * 300),
        ),
        Hostile(
            f"v2: JSON input of {max_images} images, all outputs",
            "POST",
            infer,
            lambda: v2_json(max_images, side),
        ),
        Hostile(
            "v2: 8 MB header of zeros for a 1-image shape",
            "POST",
            infer,
            lambda: {
                "content": b'{"inputs":[{"name":"images","shape":[1,1,%d,%d],"datatype":"FP32",'
                b'"data":[' % (side, side) + b"0," * (4 * MB - 64) + b"0]}]}",
                "headers": {"content-type": "application/json"},
            },
        ),
        Hostile(
            f"v2: binary {max_images} images", "POST", infer, lambda: v2_binary(max_images, side)
        ),
    ]


# --- measuring ---------------------------------------------------------------------------------


def status_mb(pid: int, field: str = "VmHWM") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no {field}")


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, our own process), so that each request's
    peak is its own; False where the kernel refuses (the peak is then cumulative)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _probe_loop(url: str, interval_s: float, worst, stop) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                ok = client.get("/v2/health/live").status_code == 200
            except httpx.HTTPError:  # no answer within the client's timeout
                ok = False
            took = time.perf_counter() - started if ok else float("inf")
            with worst.get_lock():
                worst.value = max(worst.value, took)
            stop.wait(interval_s)


class LivenessProbe:
    """``GET /v2/health/live`` in a loop on its own connection, in its own process (so the
    client sending a large request does not delay it); ``window()`` gives the slowest answer
    since the last call."""

    def __init__(self, url: str, interval_s: float = 0.01) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._worst = ctx.Value("d", 0.0)
        self._stop = ctx.Event()
        self._proc = ctx.Process(
            target=_probe_loop, args=(url, interval_s, self._worst, self._stop), daemon=True
        )

    def __enter__(self) -> LivenessProbe:
        self._proc.start()
        deadline = time.monotonic() + 30
        while self._worst.value == 0.0 and time.monotonic() < deadline:  # first answer seen
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._proc.join(timeout=35)
        if self._proc.is_alive():
            self._proc.kill()

    def window(self) -> float:
        with self._worst.get_lock():
            worst, self._worst.value = self._worst.value, 0.0
        return worst


def warm_up(client: httpx.Client, model: str, side: int = 28, max_images: int = 256) -> None:
    """Typical and largest legitimate small-image traffic, once each."""
    small = encode(Image.new("L", (side, side), 0))
    for kw in (
        multipart([small]),
        multipart([small] * max_images),
        b64_json([small] * 8),
        raw(small),
    ):
        client.post("/v1/predict", **kw).raise_for_status()
    client.post(f"/v2/models/{model}/infer", **v2_json(1, side)).raise_for_status()
    client.post(f"/v2/models/{model}/infer", **v2_binary(max_images, side)).raise_for_status()


def measure(
    url: str, pid: int, model: str, requests: list[Hostile], side: int = 28
) -> list[Measured]:
    results = []
    with httpx.Client(base_url=url, timeout=120) as client:
        warm_up(client, model, side)
        time.sleep(0.2)
        # the warmed server's RSS; where the peak cannot be reset, its peak (cumulative then)
        warm = status_mb(pid, "VmRSS" if reset_peak(pid) else "VmHWM")
        with LivenessProbe(url) as probe:
            for h in requests:
                kwargs = h.build()
                time.sleep(0.05)
                probe.window()
                before = status_mb(pid, "VmRSS")
                reset_peak(pid)
                started = time.perf_counter()
                try:
                    r = client.request(h.method, h.path.format(model=model), **kwargs)
                    status = r.status_code
                    reason = r.json().get("error", "") if status != 200 else ""
                except httpx.HTTPError as exc:  # e.g. no answer in time: recorded, not fatal
                    status, reason = 0, f"{type(exc).__name__}"
                seconds = time.perf_counter() - started
                time.sleep(0.05)  # a probe sent during the request has answered by now
                after = status_mb(pid, "VmHWM")
                results.append(
                    Measured(
                        h.name,
                        status,
                        round(seconds, 3),
                        round(after - warm, 1),
                        round(before - warm, 1),
                        round(probe.window(), 4),
                        reason[:100],
                    )
                )
                del kwargs
    return results


def start_server(model: Path, *args: str) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    log = tempfile.TemporaryFile()  # noqa: SIM115 (the process owns it until it exits)
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "sdde_serve", "serve", str(model), "--port", str(port)),
            *("--threads", "1", "--log-level", "warning", *args),
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited: {log.read().decode(errors='replace')}")
        try:
            if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise TimeoutError("server not ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/hostile.json")
    args = parser.parse_args()
    from sdde_serve.engine import Engine

    manifest = Engine(args.model).manifest
    proc, url = start_server(args.model)
    try:
        rows = measure(url, proc.pid, manifest.name, corpus(manifest.input.height))
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:  # a server that cannot drain: measured all the same
            proc.kill()
            proc.wait()
    for r in rows:
        print(
            f"{r.name:50s} {r.status}  {r.seconds:6.3f} s  peak +{r.peak_over_warm_mb:6.1f} MB "
            f"(RSS before +{r.rss_before_mb:5.1f})  liveness max {r.liveness_max_s * 1000:6.1f} ms"
        )
    worst_rss = max(r.peak_over_warm_mb for r in rows)
    worst_live = max(r.liveness_max_s for r in rows)
    summary = {
        "peak_over_warm_mb": worst_rss,
        "rss_goal_mb": RSS_GOAL_MB,
        "liveness_max_s": worst_live,
        "liveness_goal_s": LIVENESS_GOAL_S,
        "met": worst_rss <= RSS_GOAL_MB and worst_live <= LIVENESS_GOAL_S,
    }
    print(json.dumps(summary))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"summary": summary, "requests": [asdict(r) for r in rows]}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
