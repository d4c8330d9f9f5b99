"""Server throughput and latency against the engine alone and a naive PyTorch server, in one run.

For LeNet x5 (1x28x28) and ResNet18_32 x5 (3x32x32), untrained (speed does not depend on the
weights; each gets a one-step training run and a real export, so the manifest is genuine):

  sdde    ``sdde serve`` as a real process, driven by closed-loop clients at concurrency 1, 16,
          64 (one PNG per request, multipart ``/v1/predict``): throughput, p50/p99, errors;
  engine  (a) the fused engine alone, in-process, at the mean batch size the server formed at
          that concurrency (from ``sdde_batch_size`` in ``/metrics``), and at batch 1, measured
          right after that level (server idle) so both see the same background load: the limit;
  naive   (b) a FastAPI server that runs one PyTorch ensemble forward per request (sync endpoint,
          batch 1): what people write by hand.

Goals (docs/server.md): at concurrency 64, sdde >= 80% of (a) and >= 5x (b); at concurrency 1,
sdde p99 within 5 ms of the engine's batch-1 p99. The clients are a minimal asyncio HTTP/1.1
keep-alive client (cheap: they share the machine's cores with the server). Prints a table and
writes ``benchmarks/results/bench_server.json``.

    .venv/bin/python benchmarks/bench_server.py [--duration 6] [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from fastapi import File, UploadFile  # module level: the naive endpoint's annotations name them

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = {
    "lenet_x5": {"arch": "lenet", "data": "digits", "shape": (1, 28, 28), "time_scale": 1.0},
    # ~5-20 images/s on two cores: longer windows, or a level counts only a handful of answers
    "resnet18_32_x5": {
        "arch": "resnet18_32",
        "data": "npz32",
        "shape": (3, 32, 32),
        "time_scale": 2.0,
    },
}
CONCURRENCY = (1, 16, 64)
BOUNDARY = "sddebench"


# --- models ---------------------------------------------------------------------------------


def build_model(case: str, work: Path) -> tuple[Path, Path]:
    """(run_dir, model.onnx) for ``case``: a one-step training run and its export (cached)."""
    spec = CASES[case]
    run_dir, model = work / case / "run", work / case / "model.onnx"
    if model.exists():
        return run_dir, model
    from export import export_run
    from training.config import TrainConfig
    from training.trainer import train

    data = spec["data"]
    if data == "npz32":
        rng = np.random.default_rng(0)
        data = str(work / "random32.npz")
        np.savez(
            data,
            images=rng.integers(0, 256, (200, 3, 32, 32), dtype=np.uint8),
            labels=np.arange(200) % 10,
        )
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    cfg = TrainConfig(
        data=data, arch=spec["arch"], members=5, method="de", epochs=1, max_steps=1,
        batch_size=16, out=str(run_dir), seed=0,
    )  # fmt: skip
    train(cfg)
    export_run(run_dir, model, name=case, version="bench", with_cams=False)
    return run_dir, model


def png_for(shape: tuple[int, int, int], seed: int = 0) -> bytes:
    from PIL import Image

    c, h, w = shape
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, c) if c == 3 else (h, w), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def request_bytes(png: bytes, path: str = "/v1/predict") -> bytes:
    """A raw HTTP/1.1 multipart request sending ``png`` to ``path`` (for the load loops)."""
    body = (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="x.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + png
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    head = (
        f"POST {path} HTTP/1.1\r\nHost: bench\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


# --- a minimal keep-alive HTTP client ---------------------------------------------------------


async def _one(reader, writer, payload: bytes) -> int:
    writer.write(payload)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    m = re.search(rb"(?i)content-length:\s*(\d+)", head)
    if m:
        await reader.readexactly(int(m.group(1)))
    return status


async def drive(port: int, payload: bytes, concurrency: int, duration: float, warmup: float):
    """Closed loop: ``concurrency`` connections, each sending the next request on its answer.

    Counts the answers that arrive inside the measured window (after ``warmup``, for
    ``duration`` s), so slow models with few, long requests are measured correctly too.
    """
    done: list[tuple[float, float, int]] = []  # (sent, answered, status)
    errors = 0
    t_start = time.perf_counter()
    t_measure = t_start + warmup
    t_end = t_measure + duration

    async def client() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < t_end:
                t0 = time.perf_counter()
                try:
                    status = await _one(reader, writer, payload)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    errors += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                done.append((t0, time.perf_counter(), status))
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    window = [(t0, t1, st) for t0, t1, st in done if t_measure <= t1 <= t_end]
    ok = [t1 - t0 for t0, t1, st in window if st == 200]
    errors += sum(1 for *_, st in window if st != 200)
    lat = np.array(ok) * 1000
    return {
        "concurrency": concurrency,
        "requests": len(ok),
        "errors": errors,
        "throughput_rps": len(ok) / duration,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, path: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} (see the log in --work)")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError("server did not become ready")


def get_metrics(port: int) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("sdde_batch_size_sum") or line.startswith("sdde_batch_size_count"):
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0]] = float(value)
    return out


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start(cmd: list[str], args, log: Path) -> subprocess.Popen:
    """A server process logging to ``log`` (a pipe nobody reads would block it when full)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)


# --- the three systems ------------------------------------------------------------------------


def bench_sdde(model: Path, payload: bytes, args, engine_at) -> list[dict]:
    """Each level is followed at once by (a) at the batch size it formed (``engine_at``), with
    the server idle: on a shared machine the background load drifts within minutes, and
    measuring the pair back to back exposes both to the same load."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "sdde_serve", "serve", str(model), "--port", str(port),
        "--threads", str(args.threads), "--max-batch-size", "64", "--max-queue-delay-ms",
        str(args.delay_ms), "--log-level", "warning",
    ]  # fmt: skip
    proc = start(cmd, args, args.work / "sdde_server.log")
    rows = []
    try:
        wait_ready(port, "/v2/health/ready", proc)
        for c in CONCURRENCY:
            before = get_metrics(port)
            row = asyncio.run(drive(port, payload, c, args.duration, args.warmup))
            after = get_metrics(port)
            calls = after["sdde_batch_size_count"] - before.get("sdde_batch_size_count", 0)
            images = after["sdde_batch_size_sum"] - before.get("sdde_batch_size_sum", 0)
            row["mean_batch"] = images / calls if calls else None
            row["engine_batch1"] = engine_at(1)
            row["engine_at_batch"] = engine_at(max(1, round(row["mean_batch"] or 1)))
            rows.append(row)
    finally:
        stop(proc)
    return rows


def bench_naive(run_dir: Path, payload: bytes, args) -> list[dict]:
    port = free_port()
    cmd = [sys.executable, __file__, "--serve-naive", str(run_dir), "--port", str(port),
           "--threads", str(args.threads)]  # fmt: skip
    proc = start(cmd, args, args.work / "naive_server.log")
    rows = []
    try:
        wait_ready(port, "/health", proc)
        for c in CONCURRENCY if not args.quick else (64,):
            rows.append(asyncio.run(drive(port, payload, c, args.duration, args.warmup)))
    finally:
        stop(proc)
    return rows


class EngineBench:
    """(a): the fused engine alone, in this process: images/s and latency at a batch size."""

    def __init__(self, model: Path, shape: tuple[int, int, int], args) -> None:
        from sdde_serve.engine import Engine

        self.engine = Engine(model, intra_op_threads=args.threads)
        self.shape = shape
        self.seconds = args.engine_time

    def __call__(self, batch: int) -> dict:
        x = np.random.default_rng(0).random((batch, *self.shape), dtype=np.float32)
        self.engine.run(x)
        times = []
        t_end = time.perf_counter() + self.seconds
        while time.perf_counter() < t_end or len(times) < 10:
            t0 = time.perf_counter()
            self.engine.run(x)
            times.append(time.perf_counter() - t0)
        t = np.array(times) * 1000
        return {
            "batch": batch,
            "images_per_s": batch / statistics.median(times),
            "p50_ms": float(np.percentile(t, 50)),
            "p99_ms": float(np.percentile(t, 99)),
        }


# --- the naive server (run as a subprocess of this script) ------------------------------------


def serve_naive(run_dir: Path, port: int, threads: int) -> None:
    import torch
    import uvicorn
    from fastapi import FastAPI
    from PIL import Image

    from training.run import load_run

    torch.set_num_threads(threads)
    loaded = load_run(run_dir)
    ensemble = loaded.ensemble.eval()
    data = loaded.config["data"]
    c, h, w = data["channels"], data["height"], data["width"]
    classes = data["classes"]
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"ok": True}

    @app.post("/v1/predict")
    def predict(files: list[UploadFile] = File(...)) -> dict:  # noqa: B008  # sync: FastAPI's thread pool, one per request
        img = Image.open(files[0].file).convert("RGB" if c == 3 else "L").resize((w, h))
        x = torch.from_numpy(np.asarray(img, np.float32) / 255.0)
        x = x.permute(2, 0, 1)[None] if c == 3 else x[None, None]
        with torch.inference_mode():
            logits = ensemble(x)  # [1, N, L]
        probs = torch.softmax(logits, -1).mean(1)[0]
        label = int(probs.argmax())
        mal = float(logits.mean(1).max())
        return {"label": label, "class_name": classes[label], "confidence": float(probs[label]),
                "ood_score": mal}  # fmt: skip

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# --- main -------------------------------------------------------------------------------------


def fmt(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per level")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--engine-time", type=float, default=2.0, help="seconds per batch size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--delay-ms", type=float, default=2.0, help="server --max-queue-delay-ms")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_server")
    p.add_argument("--cases", nargs="+", default=list(CASES))
    p.add_argument("--quick", action="store_true", help="naive server at concurrency 64 only")
    p.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_server.json"
    )
    p.add_argument("--serve-naive", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_naive:
        serve_naive(args.serve_naive, args.port, args.threads)
        return 0

    started = time.time()
    results = {}
    for case in args.cases:
        print(f"== {case}: preparing model", flush=True)
        run_dir, model = build_model(case, args.work)
        shape = CASES[case]["shape"]
        payload = request_bytes(png_for(shape))
        scale = CASES[case]["time_scale"]
        case_args = argparse.Namespace(
            **{**vars(args), "duration": args.duration * scale, "warmup": args.warmup * scale}
        )
        print(f"== {case}: sdde server, each level followed by the engine alone", flush=True)
        sdde = bench_sdde(model, payload, case_args, EngineBench(model, shape, case_args))
        print(f"== {case}: naive PyTorch server", flush=True)
        naive = bench_naive(run_dir, payload, case_args)
        naive_by_c = {r["concurrency"]: r for r in naive}
        levels = []
        for r in sdde:
            c, e = r["concurrency"], r.pop("engine_at_batch")
            nv = naive_by_c.get(c)
            levels.append({
                "concurrency": c,
                "sdde": r,
                "engine_at_batch": e,
                "naive": nv,
                "fraction_of_engine": r["throughput_rps"] / e["images_per_s"],
                "speedup_vs_naive": (
                    r["throughput_rps"] / nv["throughput_rps"] if nv and nv["requests"] else None
                ),
            })  # fmt: skip
        c1 = next(lv for lv in levels if lv["concurrency"] == 1)
        c64 = next(lv for lv in levels if lv["concurrency"] == 64)
        engine = {1: c1["sdde"]["engine_batch1"]}
        goals = {
            "c64_fraction_of_engine": c64["fraction_of_engine"],
            "c64_fraction_of_engine_ok": c64["fraction_of_engine"] >= 0.8,
            "c64_speedup_vs_naive": c64["speedup_vs_naive"],
            "c64_speedup_vs_naive_ok": (c64["speedup_vs_naive"] or 0) >= 5.0,
            "c1_p99_minus_engine_b1_p99_ms": c1["sdde"]["p99_ms"] - engine[1]["p99_ms"],
            "c1_p99_minus_engine_b1_p50_ms": c1["sdde"]["p99_ms"] - engine[1]["p50_ms"],
            "c1_p99_within_5ms_ok": c1["sdde"]["p99_ms"] - engine[1]["p99_ms"] <= 5.0,
        }
        results[case] = {"levels": levels, "engine_batch1": engine[1], "goals": goals}

    print()
    head = (f"{'case':16} {'conc':>4} {'sdde req/s':>10} {'p50 ms':>7} {'p99 ms':>7} {'err':>4} "
            f"{'batch':>5} {'engine img/s':>12} {'%eng':>5} {'naive req/s':>11} {'naive p99':>9} "
            f"{'x naive':>7}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for case, res in results.items():
        for lv in res["levels"]:
            s, e, n = lv["sdde"], lv["engine_at_batch"], lv["naive"] or {}
            print(
                f"{case:16} {lv['concurrency']:>4} {s['throughput_rps']:>10.1f} "
                f"{fmt(s['p50_ms']):>7} {fmt(s['p99_ms']):>7} {s['errors']:>4} "
                f"{e['batch']:>5} {e['images_per_s']:>12.1f} "
                f"{100 * lv['fraction_of_engine']:>4.0f}% "
                f"{fmt(n.get('throughput_rps')):>11} {fmt(n.get('p99_ms')):>9} "
                f"{fmt(lv['speedup_vs_naive'], '.1f'):>7}"
            )
        g, e1 = res["goals"], res["engine_batch1"]
        print(
            f"{case:16} goals: c64 {100 * g['c64_fraction_of_engine']:.0f}% of engine "
            f"({'ok' if g['c64_fraction_of_engine_ok'] else 'MISSED'} >= 80%), "
            f"{fmt(g['c64_speedup_vs_naive'])}x naive "
            f"({'ok' if g['c64_speedup_vs_naive_ok'] else 'MISSED'} >= 5x), "
            f"c1 p99 - engine b1 p99 = {g['c1_p99_minus_engine_b1_p99_ms']:.1f} ms "
            f"(engine b1 p50 {e1['p50_ms']:.2f} / p99 {e1['p99_ms']:.2f} ms; "
            f"{'ok' if g['c1_p99_within_5ms_ok'] else 'MISSED'} <= 5 ms)"
        )
    payload = {
        "benchmark": "bench_server",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - started, 1),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0],
        },
        "settings": {k: str(v) for k, v in vars(args).items() if k not in ("serve_naive", "port")},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {args.out} ({payload['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
