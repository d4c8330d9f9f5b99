"""Fused-ensemble inference speed, side by side in one run (docs/export.md).

For LeNet x5 at 1x28x28 and ResNet18_32 x5 at 3x32x32 (untrained weights: speed does not depend
on them), images/s at batch 1, 8 and 64 of

  (a) torch-eager : a PyTorch eager loop over the members (``Ensemble.forward``, inference mode),
  (b) ort-separate: N onnxruntime sessions, one per member, probabilities averaged in numpy,
  (c) ort-<layout>: the fused graph of export/ in each layout (one ``session.run``),

plus the fused graph's achieved GFLOP/s (FLOPs counted from the members' Conv2d/Linear shapes,
2 per multiply-add, times N) over this machine's float32 matmul GFLOP/s (2048x2048, numpy and
torch, best of both) measured in the same run. Prints a table, writes
``benchmarks/results/bench_engine.json``.

    .venv/bin/python benchmarks/bench_engine.py [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from export.graph import build_graph, to_onnx  # noqa: E402
from export.layouts import LAYOUTS  # noqa: E402
from sdde_serve.calibration import ensemble_probs  # noqa: E402
from training.ensemble import Ensemble  # noqa: E402
from training.models import create_model  # noqa: E402

CASES = {
    "lenet_x5": ("lenet", 5, (1, 28, 28), 10),
    "resnet18_32_x5": ("resnet18_32", 5, (3, 32, 32), 10),
}
BATCHES = (1, 8, 64)
SPIN = False


def time_call(fn: Callable[[], object], min_time: float, min_reps: int = 3) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return statistics.median(times)


def time_interleaved(
    paths: dict[str, Callable[[], object]], min_time: float, slow_s: float = 4.0
) -> dict[str, float]:
    """Median seconds per call of each path, measured in alternating rounds.

    On a shared machine the background load changes from second to second; interleaving the
    paths round by round exposes all of them to the same load. Round 0 warms up (allocations,
    thread pools, onnxruntime's first-run planning); a path whose calls take longer than
    ``slow_s`` (ResNet x5 at batch 64 on two busy cores) also counts its warm-up round, whose
    one-off costs are then negligible, so the whole run stays within minutes.
    """
    times: dict[str, list[float]] = {p: [] for p in paths}
    warm: dict[str, float] = {}
    for p, fn in paths.items():
        t0 = time.perf_counter()
        fn()
        warm[p] = time.perf_counter() - t0
    start = time.perf_counter()
    rounds = 0
    slow = max(warm.values()) > slow_s
    min_rounds = 1 if slow else 3
    while rounds < min_rounds or (
        not slow and time.perf_counter() - start < min_time * len(paths) and rounds < 100
    ):
        for p, fn in paths.items():
            t0 = time.perf_counter()
            fn()
            times[p].append(time.perf_counter() - t0)
        rounds += 1
    if slow:
        for p in paths:
            times[p].append(warm[p])
    return {p: statistics.median(t) for p, t in times.items()}


def matmul_gflops(threads: int) -> dict[str, float]:
    n = 2048
    rng = np.random.default_rng(0)
    a = rng.random((n, n), dtype=np.float32)
    b = rng.random((n, n), dtype=np.float32)
    flop = 2.0 * n**3
    t_np = min(time_call(lambda: a @ b, 0.0, 1) for _ in range(3))
    torch.set_num_threads(threads)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    t_torch = min(time_call(lambda: ta @ tb, 0.0, 1) for _ in range(3))
    return {"numpy": flop / t_np / 1e9, "torch": flop / t_torch / 1e9}


def count_flops(member: torch.nn.Module, input_shape: tuple[int, int, int]) -> float:
    """FLOPs of one member on one image: 2 x multiply-adds of every Conv2d and Linear."""
    total = 0.0

    def conv_hook(mod: torch.nn.Conv2d, _inp: object, out: torch.Tensor) -> None:
        nonlocal total
        k = mod.kernel_size[0] * mod.kernel_size[1] * (mod.in_channels // mod.groups)
        total += 2.0 * out.numel() * k

    def linear_hook(mod: torch.nn.Linear, _inp: object, out: torch.Tensor) -> None:
        nonlocal total
        total += 2.0 * out.numel() * mod.in_features

    handles = []
    for mod in member.modules():
        if isinstance(mod, torch.nn.Conv2d):
            handles.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, torch.nn.Linear):
            handles.append(mod.register_forward_hook(linear_hook))
    with torch.no_grad():
        member.eval()(torch.zeros(1, *input_shape))
    for h in handles:
        h.remove()
    return total


def session(model_bytes: bytes, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not SPIN:
        # busy-waiting worker threads steal the core from the one doing the work when the
        # machine is oversubscribed; off on a shared machine (--spin turns it back on)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def export_bytes(ensemble: Ensemble, layout: str, shape: tuple[int, int, int]) -> bytes:
    graph = build_graph(ensemble, layout, input_shape=shape, with_cams=False)
    return to_onnx(graph, input_shape=shape).SerializeToString()


def bench_case(name: str, threads: int, min_time: float) -> dict:
    arch, n, shape, classes = CASES[name]
    torch.manual_seed(0)
    members = [create_model(arch, num_classes=classes, in_chans=shape[0]).eval() for _ in range(n)]
    ensemble = Ensemble(members, [0.5] * shape[0], [0.25] * shape[0]).eval()
    flops_per_image = n * count_flops(members[0], shape)

    fused = {layout: session(export_bytes(ensemble, layout, shape), threads) for layout in LAYOUTS}
    singles = [
        session(
            export_bytes(
                Ensemble([m], ensemble.mean.flatten().tolist(), ensemble.std.flatten().tolist()),
                "loop",
                shape,
            ),
            threads,
        )
        for m in members
    ]

    # PyTorch's OpenMP pool collapses when the cores are oversubscribed (a shared machine): (a)
    # uses whichever of 1 thread and `threads` is faster on this machine right now (batch 8)
    probe = torch.rand(8, *shape)
    probe_s = {}
    for t in sorted({1, threads}):
        torch.set_num_threads(t)
        with torch.inference_mode():
            probe_s[t] = time_call(lambda: ensemble(probe), 0.5, 2)
    torch_threads = min(probe_s, key=probe_s.__getitem__)
    print(f"  {name}: torch eager uses {torch_threads} thread(s) ({probe_s})", flush=True)

    rows = []
    for batch in BATCHES:
        x = np.random.default_rng(batch).random((batch, *shape), dtype=np.float32)
        xt = torch.from_numpy(x)

        def eager(torch_threads: int, xt: torch.Tensor = xt) -> Callable[[], object]:
            def run() -> object:
                torch.set_num_threads(torch_threads)
                with torch.inference_mode():
                    return torch.softmax(ensemble(xt), -1).mean(1)

            return run

        def separate(x: np.ndarray = x) -> object:
            logits = np.stack([s.run(["logits"], {"images": x})[0][:, 0] for s in singles], 1)
            return ensemble_probs(logits)

        paths: dict[str, Callable[[], object]] = {
            "torch-eager": eager(torch_threads),
            "ort-separate": separate,
        }
        for layout, sess in fused.items():
            paths[f"ort-{layout}"] = lambda sess=sess, x=x: sess.run(None, {"images": x})
        for path, seconds in time_interleaved(paths, min_time).items():
            rows.append(
                {
                    "case": name,
                    "path": path,
                    "batch": batch,
                    "seconds_per_call": seconds,
                    "images_per_s": batch / seconds,
                    "gflops": flops_per_image * batch / seconds / 1e9,
                }
            )
            print(
                f"  {name:15s} {path:15s} batch {batch:3d}: {batch / seconds:9.1f} img/s",
                flush=True,
            )
    return {"flops_per_image": flops_per_image, "torch_threads": torch_threads, "rows": rows}


def bench_knn(name: str, threads: int, min_time: float, rows: int) -> dict:
    """Cost of the ``knn`` output: the graph without it vs with a ``rows``-row bank (issue 10).

    The arch's default layout; the bank holds random unit rows (its values do not change the
    cost); ``float16`` stores the bank in half precision behind a Cast (export/knn.py).
    """
    from export.knn import default_k, normalize_rows, store_bank_as
    from export.layouts import default_layout

    arch, n, shape, classes = CASES[name]
    torch.manual_seed(0)
    members = [create_model(arch, num_classes=classes, in_chans=shape[0]).eval() for _ in range(n)]
    ensemble = Ensemble(members, [0.5] * shape[0], [0.25] * shape[0]).eval()
    dims = n * members[0].get_classifier().in_features
    bank = normalize_rows(np.random.default_rng(0).normal(size=(rows, dims))).astype(np.float32)
    layout = default_layout(arch)

    def graph(with_bank: bool, dtype: str = "float32") -> ort.InferenceSession:
        g = build_graph(
            ensemble,
            layout,
            input_shape=shape,
            with_cams=False,
            knn_bank=torch.from_numpy(bank) if with_bank else None,
            knn_k=default_k(rows) if with_bank else None,
        )
        proto = to_onnx(g, input_shape=shape)
        if with_bank and dtype != "float32":
            store_bank_as(proto, dtype)
        return session(proto.SerializeToString(), threads)

    sessions = {
        "no-knn": graph(False),
        "knn-float32": graph(True),
        "knn-float16": graph(True, "float16"),
    }
    rows_out = []
    for batch in (1, 64):
        x = np.random.default_rng(batch).random((batch, *shape), dtype=np.float32)
        paths = {p: (lambda s=s, x=x: s.run(None, {"images": x})) for p, s in sessions.items()}
        secs = time_interleaved(paths, min_time)
        for path, seconds in secs.items():
            rows_out.append(
                {
                    "case": name,
                    "path": path,
                    "batch": batch,
                    "seconds_per_call": seconds,
                    "slowdown_vs_no_knn": seconds / secs["no-knn"],
                }
            )
            print(
                f"  {name:15s} {path:12s} batch {batch:3d}: {1e3 * seconds:8.2f} ms/call "
                f"({seconds / secs['no-knn']:.3f}x no-knn)",
                flush=True,
            )
    return {
        "layout": layout,
        "bank_rows": rows,
        "bank_dims": dims,
        "k": default_k(rows),
        "bank_mb_float32": rows * dims * 4 / 1e6,
        "rows": rows_out,
    }


def summarise(results: dict, matmul: float) -> dict:
    summary: dict[str, dict] = {}
    for name, res in results.items():
        ips = {(r["path"], r["batch"]): r["images_per_s"] for r in res["rows"]}
        gfl = {(r["path"], r["batch"]): r["gflops"] for r in res["rows"]}
        per_layout = {}
        for layout in LAYOUTS:
            p = f"ort-{layout}"
            per_layout[layout] = {
                "speedup_vs_eager": {b: ips[(p, b)] / ips[("torch-eager", b)] for b in BATCHES},
                "speedup_vs_separate": {b: ips[(p, b)] / ips[("ort-separate", b)] for b in BATCHES},
                "fraction_of_matmul": {b: gfl[(p, b)] / matmul for b in BATCHES},
                "geomean_images_per_s": float(
                    np.exp(np.mean([np.log(ips[(p, b)]) for b in BATCHES]))
                ),
            }
        best = max(per_layout, key=lambda k: per_layout[k]["geomean_images_per_s"])
        summary[name] = {"layouts": per_layout, "faster_layout": best}
    return summary


def print_table(results: dict, summary: dict, matmul: dict[str, float]) -> None:
    rate = max(matmul.values())
    print(
        f"\nfloat32 matmul 2048x2048: numpy {matmul['numpy']:.1f}, torch {matmul['torch']:.1f}"
        f" GFLOP/s (reference: {rate:.1f})"
    )
    header = f"{'case':15s} {'path':15s} " + " ".join(f"{'b=' + str(b):>16s}" for b in BATCHES)
    print(header)
    print("-" * len(header))
    for name, res in results.items():
        paths = dict.fromkeys(r["path"] for r in res["rows"])
        for path in paths:
            cells = []
            for b in BATCHES:
                r = next(r for r in res["rows"] if r["path"] == path and r["batch"] == b)
                cells.append(f"{r['images_per_s']:8.1f} ({r['gflops'] / rate:4.0%})")
            print(f"{name:15s} {path:15s} " + " ".join(f"{c:>16s}" for c in cells))
        s = summary[name]
        for layout, v in s["layouts"].items():
            sp = ", ".join(f"b{b} {v['speedup_vs_eager'][b]:.2f}x" for b in BATCHES)
            print(f"{'':15s} {layout} vs eager: {sp}")
        print(f"{'':15s} faster layout: {s['faster_layout']}")
    print("cells: images/s (achieved GFLOP/s as a fraction of the matmul rate)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bench_engine.json")
    parser.add_argument("--spin", action="store_true", help="let onnxruntime threads spin")
    parser.add_argument(
        "--knn-cost",
        action="store_true",
        help="only measure the cost of the knn output (default bank) and write "
        "benchmarks/results/bench_engine_knn.json",
    )
    args = parser.parse_args()
    global SPIN
    SPIN = args.spin
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    if args.knn_cost:
        from export.knn import DEFAULT_BANK_ROWS

        knn = {n: bench_knn(n, args.threads, args.min_time, DEFAULT_BANK_ROWS) for n in args.cases}
        path = ROOT / "benchmarks/results/bench_engine_knn.json"
        record = {
            "machine": {"cores": os.cpu_count(), "threads": args.threads},
            "loadavg_end": os.getloadavg(),
            "onnxruntime": ort.__version__,
            "goal": "resnet18_32_x5 knn-float32 <= 1.15x no-knn at batch 1 and 64",
            "results": knn,
            "wall_s": time.time() - t0,
        }
        path.write_text(json.dumps(record, indent=2))
        print(f"wrote {path}")
        return 0
    matmul = matmul_gflops(args.threads)
    print(f"matmul GFLOP/s: {matmul}", flush=True)
    results = {name: bench_case(name, args.threads, args.min_time) for name in args.cases}
    matmul_after = matmul_gflops(args.threads)  # the machine is shared: measure before and after
    rate = max(*matmul.values(), *matmul_after.values())
    summary = summarise(results, rate)
    print_table(results, summary, {k: max(matmul[k], matmul_after[k]) for k in matmul})
    load = os.getloadavg()
    out = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": args.threads,
            "loadavg_end": load,
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
        },
        "matmul_gflops": {"before": matmul, "after": matmul_after, "reference": rate},
        "results": results,
        "summary": summary,
        "wall_s": time.time() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {args.out} ({time.time() - t0:.0f} s, load average {load[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
