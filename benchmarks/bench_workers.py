"""``sdde serve --workers 1`` vs ``--workers 2`` under wrk, side by side in one run.

LeNet x5 (the demo model: HTTP-bound, the case where more processes should help), one PNG per
request (JSON ``/v1/predict``, base64), wrk at 16 and 64 connections. The two configurations
alternate round by round so that both see the same background load on a shared machine. For each:
requests/s, latency p50/p99 (wrk's), non-2xx answers, and requests/s per worker process; the
merged ``/metrics`` (prometheus multiprocess mode) is cross-checked against wrk's request count.

wrk is Debian's ``wrk`` package (``apt-get install wrk``): a C load generator that needs far less
CPU per request than a Python client, so it measures the server, not itself.

    .venv/bin/python benchmarks/bench_workers.py [--model model.onnx] [--duration 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_server import (  # noqa: E402
    build_model,
    free_port,
    png_for,
    start,
    stop,
    wait_ready,
)

WORKERS = (1, 2)
CONNECTIONS = (16, 64)


def lua_script(path: Path, png: bytes) -> None:
    body = json.dumps({"images": [base64.b64encode(png).decode()]})
    path.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = {json.dumps(body)}\n"
        # wrk counts non-2xx answers itself ("Non-2xx or 3xx responses")
    )


def _seconds(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def run_wrk(port: int, script: Path, connections: int, duration: float) -> dict:
    cmd = [
        "wrk", "-t", "1", "-c", str(connections), "-d", f"{max(1, round(duration))}s", "--latency",
        "--timeout", "30s", "-s", str(script), f"http://127.0.0.1:{port}/v1/predict",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    # the "Latency Distribution" lines (anchored: "68.50%" in the thread stats also ends in 50%)
    p50, p99 = (
        (_seconds(m.group(1)) if m else None)
        for m in (re.search(rf"^\s*{q}%\s+(\S+)", out, re.MULTILINE) for q in (50, 99))
    )
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {
        "requests_per_s": rps,
        "requests": total,
        "p50_s": p50,
        "p99_s": p99,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": errors.group(1) if errors else None,
        "wrk_output": out,
    }


def predictions_total(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("sdde_predictions_total{")
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="default: a LeNet x5 export")
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads per worker")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench_workers")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bench_workers.json")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk)")
        return 2
    t0 = time.time()
    model = args.model or build_model("lenet_x5", args.work)[1]
    script = args.work / "predict.lua"
    script.parent.mkdir(parents=True, exist_ok=True)
    lua_script(script, png_for((1, 28, 28)))
    servers = {}
    for w in WORKERS:
        port = free_port()
        cmd = [
            sys.executable, "-m", "sdde_serve", "serve", str(model), "--port", str(port),
            "--workers", str(w), "--threads", str(args.threads), "--log-level", "warning",
        ]  # fmt: skip
        servers[w] = (port, start(cmd, args, args.work / f"server-{w}.log"))
    rows = []
    try:
        for port, proc in servers.values():
            wait_ready(port, "/v2/health/ready", proc)
        for port, _ in servers.values():  # warm-up: first requests load lazily
            run_wrk(port, script, 4, 2)
        for rnd in range(args.rounds):
            for c in CONNECTIONS:
                for w, (port, _) in servers.items():
                    before = predictions_total(port)
                    res = run_wrk(port, script, c, args.duration)
                    counted = predictions_total(port) - before
                    row = {"round": rnd, "workers": w, "connections": c, **res,
                           "metrics_counted": counted,
                           "requests_per_s_per_worker": res["requests_per_s"] / w}  # fmt: skip
                    rows.append(row)
                    print(f"round {rnd} c={c:3d} workers={w}: {res['requests_per_s']:8.1f} req/s"
                          f" p50 {res['p50_s']} s p99 {res['p99_s']} s"
                          f" non-2xx {res['non_2xx']} /metrics counted {counted:.0f}"
                          f" of {res['requests']}", flush=True)  # fmt: skip
    finally:
        for _, proc in servers.values():
            stop(proc)
    summary = {}
    for c in CONNECTIONS:
        med = {}
        for w in WORKERS:
            vals = sorted(
                r["requests_per_s"] for r in rows if r["workers"] == w and r["connections"] == c
            )
            med[w] = vals[len(vals) // 2]
        summary[f"c{c}"] = {
            "requests_per_s": med,
            "two_vs_one": med[2] / med[1],
            "per_worker": {w: med[w] / w for w in WORKERS},
        }
        print(f"c={c}: 1 worker {med[1]:.1f} req/s, 2 workers {med[2]:.1f} req/s "
              f"({med[2] / med[1]:.2f}x; {med[2] / 2:.1f} req/s per worker)")  # fmt: skip
    load = os.getloadavg()
    out = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "loadavg_end": load, "onnxruntime_threads_per_worker": args.threads},
        "load_generator": "wrk -t 1 (Debian package), JSON /v1/predict, one 28x28 PNG",
        "rows": rows,
        "summary": summary,
        "wall_s": time.time() - t0,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {args.out} ({time.time() - t0:.0f} s, load average {load[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
