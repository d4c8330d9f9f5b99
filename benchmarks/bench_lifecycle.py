"""The model lifecycle under load, measured side by side in one run.

LeNet x5 (1x28x28; a one-step training run and a real export, as bench_server.py), served from a
model repository by ``sdde serve REPO --pin lenet:1`` as a real process, driven by closed-loop
keep-alive clients (one PNG per multipart request to ``/v1/models/lenet:predict``):

  swaps     16 clients for ``--duration`` s; version 2, then 3 are loaded through the repository
            API, then the pin goes back to 1 (a roll-back): failed requests (the goal is 0), how
            long each load call took, answers per version, and latency p50/p99 in the second
            after each switch against the rest of the run;
  shadow    16 clients, the same server settings without and with ``--shadow lenet:2`` (every
            request also scored by version 2 after the answer): live throughput and p99, and how
            many images the shadow scored;
  feedback  the labelled-id memory off (``--feedback-max-size 0``) and on (default): throughput
            (results before issue 21 measured the prediction store it replaced; prediction ids
            are signed either way now, so the pair no longer includes their cost).

Prints a table and writes ``benchmarks/results/bench_lifecycle.json``.

    .venv/bin/python benchmarks/bench_lifecycle.py [--duration 24] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_server import (  # noqa: E402 (after the path set-up)
    build_model,
    free_port,
    png_for,
    request_bytes,
    start,
    stop,
    wait_ready,
)

NAME = "lenet"
ROUTE = f"/v1/models/{NAME}:predict"  # KServe's v1 shape, as the repository serves it
CONCURRENCY = 16


async def _one(reader, writer, payload: bytes) -> tuple[int, bytes]:
    writer.write(payload)
    head = await reader.readuntil(b"\r\n\r\n")
    m = re.search(rb"(?i)content-length:\s*(\d+)", head)
    body = await reader.readexactly(int(m.group(1))) if m else b""
    return int(head[9:12]), body


async def drive(port: int, payload: bytes, duration: float) -> list[tuple[float, float, int, str]]:
    """(sent, answered, status, version) of every request of a closed loop (perf_counter s)."""
    done: list[tuple[float, float, int, str]] = []
    t_end = time.perf_counter() + duration

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < t_end:
                t0 = time.perf_counter()
                try:
                    status, body = await _one(reader, writer, payload)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    done.append((t0, time.perf_counter(), 0, ""))  # a failed request
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                version = json.loads(body).get("version", "") if status == 200 else ""
                done.append((t0, time.perf_counter(), status, version))
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
    return done


def post(port: int, path: str, body: dict | None = None) -> tuple[int, dict, float]:
    data = json.dumps(body or {}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, headers={"Content-Type": "application/json"}
    )
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.load(r), time.perf_counter() - t0
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc), time.perf_counter() - t0


def metric(port: int, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def serve(repo: Path, args, work: Path, tag: str, *extra: str):
    port = free_port()
    cmd = [sys.executable, "-m", "sdde_serve", "serve", str(repo), "--port", str(port)]
    cmd += ["--threads", str(args.threads), "--log-level", "warning", "--no-spin-wait"]
    proc = start([*cmd, "--pin", f"{NAME}:1", *extra], args, work / f"{tag}.log")
    wait_ready(port, "/v2/health/ready", proc)
    return proc, port


def lat_ms(rows) -> dict[str, float | None]:
    lat = np.array([(t1 - t0) * 1000 for t0, t1, st, _ in rows if st == 200])
    if not len(lat):
        return {"p50_ms": None, "p99_ms": None, "n": 0}
    return {
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "n": len(lat),
    }


def bench_swaps(repo: Path, args, work: Path) -> dict:
    proc, port = serve(repo, args, work, "swaps")
    steps = [(0.25, {"version": "2"}), (0.5, {"version": "3"}), (0.75, {"version": "1"})]
    switches: list[dict] = []

    def operator(t_start: float) -> None:
        for frac, params in steps:
            time.sleep(max(t_start + frac * args.duration - time.perf_counter(), 0))
            began = time.perf_counter()
            status, answer, took = post(
                port, f"/v2/repository/models/{NAME}/load", {"parameters": params}
            )
            switches.append(
                {"to": params["version"], "status": status, "answer": answer,
                 "load_call_s": took, "began": began}
            )  # fmt: skip

    try:
        t_start = time.perf_counter()
        thread = threading.Thread(target=operator, args=(t_start,))
        thread.start()
        done = asyncio.run(drive(port, request_bytes(png_for((1, 28, 28)), ROUTE), args.duration))
        thread.join()
    finally:
        stop(proc)
    failed = [d for d in done if d[2] != 200]
    after = [
        d for d in done if any(s["began"] <= d[1] <= s["began"] + s["load_call_s"] + 1.0
                               for s in switches)
    ]  # fmt: skip
    steady = [d for d in done if d not in after]
    by_version: dict[str, int] = {}
    for *_, st, v in done:
        if st == 200:
            by_version[v] = by_version.get(v, 0) + 1
    for s in switches:
        s.pop("began")
    return {
        "requests": len(done),
        "failed": len(failed),
        "answers_by_version": by_version,
        "switches": switches,
        "steady": lat_ms(steady),
        "within_1s_of_a_switch": lat_ms(after),
        "throughput_rps": len(done) / args.duration,
    }


def bench_pair(repo: Path, args, work: Path, tag: str, variants: dict[str, list[str]]) -> dict:
    out = {}
    payload = request_bytes(png_for((1, 28, 28)), ROUTE)
    for name, extra in variants.items():
        proc, port = serve(repo, args, work, f"{tag}-{name}", *extra)
        try:
            asyncio.run(drive(port, payload, 2.0))  # warm-up
            done = asyncio.run(drive(port, payload, args.level_duration))
            # let the shadow finish what it started
            time.sleep(1.0)
            shadowed = metric(port, "sdde_shadow_images_total", model=NAME, version="2")
        finally:
            stop(proc)
        out[name] = {
            "throughput_rps": sum(d[2] == 200 for d in done) / args.level_duration,
            "failed": sum(d[2] != 200 for d in done),
            **lat_ms(done),
            "shadow_scored_images": shadowed,
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=24.0, help="swap scenario, seconds")
    parser.add_argument("--level-duration", type=float, default=10.0, help="per variant, s")
    parser.add_argument("--threads", type=int, default=1, help="server intra-op threads")
    parser.add_argument("--work", type=Path, default=None, help="model cache / logs")
    args = parser.parse_args()
    work = args.work or Path(tempfile.gettempdir()) / "sdde-bench-lifecycle"
    work.mkdir(parents=True, exist_ok=True)
    _, model = build_model("lenet_x5", work)
    repo = work / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    for version in ("1", "2", "3"):
        (repo / NAME / version).mkdir(parents=True)
        shutil.copyfile(model, repo / NAME / version / "model.onnx")

    swaps = bench_swaps(repo, args, work)
    shadow = bench_pair(repo, args, work, "shadow",
                        {"live_only": [], "with_shadow": ["--shadow", f"{NAME}:2"]})  # fmt: skip
    feedback = bench_pair(repo, args, work, "feedback",
                          {"store_off": ["--feedback-max-size", "0"], "store_on": []})  # fmt: skip
    result = {
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "args": {k: str(v) for k, v in vars(args).items()},
        "concurrency": CONCURRENCY,
        "swaps": swaps,
        "shadow": shadow,
        "feedback": feedback,
    }
    out = ROOT / "benchmarks" / "results" / "bench_lifecycle.json"
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"swaps under load ({CONCURRENCY} clients, {args.duration:g} s): "
          f"{swaps['requests']} requests, {swaps['failed']} failed, "
          f"answers by version {swaps['answers_by_version']}")  # fmt: skip
    for s in swaps["switches"]:
        print(f"  -> v{s['to']}: HTTP {s['status']}, load call {s['load_call_s'] * 1000:.0f} ms")
    st, sw = swaps["steady"], swaps["within_1s_of_a_switch"]
    print(f"  p50/p99 steady {st['p50_ms']:.1f}/{st['p99_ms']:.1f} ms; within 1 s of a switch "
          f"{sw['p50_ms']:.1f}/{sw['p99_ms']:.1f} ms")  # fmt: skip
    for title, pair in (("shadow", shadow), ("feedback store", feedback)):
        (a, ra), (b, rb) = pair.items()
        ratio = rb["throughput_rps"] / ra["throughput_rps"]
        extra = f" | shadow scored {rb['shadow_scored_images']:.0f}" if title == "shadow" else ""
        print(
            f"{title}: {a} {ra['throughput_rps']:.1f} req/s p99 {ra['p99_ms']:.1f} ms | "
            f"{b} {rb['throughput_rps']:.1f} req/s p99 {rb['p99_ms']:.1f} ms | "
            f"ratio {ratio:.2f}{extra}"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
