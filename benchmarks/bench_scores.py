"""Engine cost of each registered OOD score in the graph, side by side (docs/scores.md).

For each case of bench_engine (untrained weights: the cost does not depend on them), the fused
graph in the arch's default layout is timed at batch 1 and 64 with only the base scores (mal,
msp, minmax), then with each further score added alone: ``knn`` (a --knn-bank-rows bank of
random unit rows), ``energy``, ``mahalanobis``, ``vim`` and ``knn_members`` (statistics fitted
on random features of the right shapes; knn_members's bank has --knn-bank-rows rows).

The machine is shared (2 cores, a niced background job, other sessions), and other jobs only
ever add time, so the graphs are timed in interleaved rounds (the order rotated each round) and
each path's MIN over the rounds is its time; the median is reported beside it. ``vs_base`` is
min over base min (``vs_base_median`` likewise). A nearly load-independent check beside it:
each graph also runs under onnxruntime's profiler at --profile-batch, and the score head's share
of the summed node times (each node's fastest run) is reported; head nodes are the nodes of the
optimised graph that only the score's output depends on, and ``head_vs_base = 1 / (1 - share)``
is the ratio the head alone implies. ``shared_as_base`` says whether the rest of the optimised
graph has the base graph's nodes (a head that broke a fusion in the members would show here).

    .venv/bin/python benchmarks/bench_scores.py [--cases lenet_x5 resnet18_32_x5] [--threads 2]
        [--rounds 5] [--min-time 2] [--profile-batch 64] [--profile-runs 4]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from benchmarks.bench_engine import CASES, session  # noqa: E402
from export.choice import final_layers  # noqa: E402
from export.graph import build_graph, to_onnx  # noqa: E402
from export.knn import default_k, normalize_rows  # noqa: E402
from export.layouts import default_layout  # noqa: E402
from sdde_serve import scores  # noqa: E402
from training.ensemble import Ensemble  # noqa: E402
from training.models import create_model  # noqa: E402

FITTED = ("energy", "mahalanobis", "vim", "knn_members")
BATCHES = (1, 64)


def machine() -> dict:
    """CPU model and the ISA flags that decide onnxruntime's float32 kernels."""
    info = dict(
        line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line
    )
    info = {k.strip(): v.strip() for k, v in info.items()}
    flags = info.get("flags", "").split()
    return {
        "cpu": info.get("model name", "unknown"),
        "avx512": sorted(f for f in flags if f.startswith("avx512")),
        "amx": sorted(f for f in flags if f.startswith("amx")),
        "onnxruntime": ort.__version__,
    }


def graphs(name: str, rows: int) -> tuple[dict[str, bytes], tuple[int, int, int], dict]:
    """Serialised graphs ``{"base" | score: ONNX bytes}`` of case ``name``."""
    arch, n, shape, classes = CASES[name]
    torch.manual_seed(0)
    members = [create_model(arch, num_classes=classes, in_chans=shape[0]).eval() for _ in range(n)]
    ensemble = Ensemble(members, [0.5] * shape[0], [0.25] * shape[0]).eval()
    width = members[0].get_classifier().in_features
    rng = np.random.default_rng(0)
    feats = np.abs(rng.normal(size=(max(2 * width, 500), n, width)))
    bank_feats = np.abs(rng.normal(size=(rows, n, width)))
    fit_data = scores.FitData(feats, np.arange(len(feats)) % classes, *final_layers(ensemble))
    bank = normalize_rows(rng.normal(size=(rows, n * width))).astype(np.float32)
    layout = default_layout(arch)
    variants: dict[str, dict] = {"base": {}, "knn": {"knn_bank": torch.from_numpy(bank),
                                                     "knn_k": default_k(rows)}}  # fmt: skip
    stored = {}
    for s in FITTED:
        fit = scores.get(s).fit
        rows_data = scores.FitData(bank_feats, np.zeros(rows), fit_data.weight, fit_data.bias)
        stats = {} if fit is None else fit(rows_data if s == "knn_members" else fit_data)
        variants[s] = {"score_stats": {s: stats}}
        stored[s] = sum(4 * v.size for v in stats.values())
    stored["knn"] = bank.nbytes
    models = {}
    for label, kw in variants.items():
        g = build_graph(ensemble, layout, input_shape=shape, with_cams=False, **kw)
        models[label] = to_onnx(g, input_shape=shape).SerializeToString()
    return models, shape, {"layout": layout, "stored_bytes": stored, "width": width}


def time_rounds(
    paths: dict[str, Callable[[], object]], rounds: int, min_time: float
) -> dict[str, list[float]]:
    """Seconds of every call of each path, in at least ``rounds`` interleaved rounds.

    One warm-up call each first; then rounds of one call per path, the order rotated by one each
    round so that no path always runs right after the same neighbour, until every path has run
    ``rounds`` times and for ``min_time`` seconds in all (at most 200 rounds).
    """
    for fn in paths.values():
        fn()
    order = list(paths)
    times: dict[str, list[float]] = {p: [] for p in order}
    r = 0
    while r < rounds or (min(sum(t) for t in times.values()) < min_time and r < 200):
        for p in order[r % len(order) :] + order[: r % len(order)]:
            t0 = time.perf_counter()
            paths[p]()
            times[p].append(time.perf_counter() - t0)
        r += 1
    return times


def cone(graph: onnx.GraphProto, outputs: set[str]) -> set[str]:
    """Names of the nodes that ``outputs`` depend on."""
    producer = {out: node for node in graph.node for out in node.output}
    seen: set[str] = set()
    stack = list(outputs)
    while stack:
        node = producer.get(stack.pop())
        if node is not None and node.name not in seen:
            seen.add(node.name)
            stack.extend(node.input)
    return seen


def op_counts(nodes: list[onnx.NodeProto]) -> dict[str, int]:
    return dict(sorted(collections.Counter(n.op_type for n in nodes).items()))


def profile(
    model: bytes, score: str, threads: int, x: np.ndarray, runs: int, min_time: float
) -> dict:
    """The score head's nodes and their share of the node times (each node's fastest of at
    least ``runs - 1`` profiled runs and ``min_time`` seconds; the first run is a warm-up),
    from onnxruntime's profiler on the graph it really runs."""
    with tempfile.TemporaryDirectory(prefix="sdde-bench-scores-") as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # the optimised-model dump warns it is machine-specific
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.optimized_model_filepath = f"{tmp}/optimised.onnx"
        opts.enable_profiling = True
        opts.profile_file_prefix = f"{tmp}/profile"
        sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        start = time.perf_counter()
        done = 0
        while done < runs or (time.perf_counter() - start < min_time and done < 200):
            sess.run(None, {"images": x})
            done += 1
        events = json.loads(Path(sess.end_profiling()).read_text())
        optimised = onnx.load(f"{tmp}/optimised.onnx").graph
    raw = onnx.load_from_string(model).graph
    outs = {o.name for o in raw.output}
    raw_head = cone(raw, outs) - cone(raw, outs - {score})
    head_names = cone(optimised, outs) - cone(optimised, outs - {score})
    head_nodes = [n for n in optimised.node if n.name in head_names]
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    runs_of: dict[str, list[int]] = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= starts[1]:
            runs_of[e["name"].removesuffix("_kernel_time")].append(e["dur"])
    # each node's fastest run: other jobs only add time, so the sum of minima is the least
    # load-dependent estimate of both the head's and the whole graph's time
    per_node = {k: min(v) for k, v in runs_of.items()}
    total = sum(per_node.values())
    head = sum(v for k, v in per_node.items() if k in head_names)
    return {
        "providers": sess.get_providers(),
        "raw_head_nodes": len(raw_head),
        "head_nodes": len(head_nodes),
        "head_ops": op_counts(head_nodes),
        "shared_ops": op_counts([n for n in optimised.node if n.name not in head_names]),
        "profiled_runs": done,
        "head_ms": head / 1e3,
        "graph_ms": total / 1e3,
        "head_share": head / total,
        "head_vs_base": total / (total - head),
    }


def profiles(models: dict[str, bytes], shape: tuple, args: argparse.Namespace) -> dict:
    batch = args.profile_batch
    x = np.random.default_rng(batch).random((batch, *shape), dtype=np.float32)
    out = {
        label: profile(m, label, args.threads, x, args.profile_runs, args.min_time)
        for label, m in models.items()
    }
    for label, p in out.items():
        p["shared_as_base"] = p["shared_ops"] == out["base"]["shared_ops"]
        print(f"  profile batch {batch} {label:12s}: head {p['head_nodes']:2d} nodes "
              f"{p['head_ms']:8.2f} ms of {p['graph_ms']:9.1f} ({100 * p['head_share']:.3f}%, "
              f"-> {p['head_vs_base']:.4f}x), rest as base: {p['shared_as_base']}, "
              f"{p['providers']}", flush=True)  # fmt: skip
    return out


def bench(name: str, args: argparse.Namespace) -> dict:
    models, shape, info = graphs(name, args.knn_bank_rows)
    sessions = {label: session(m, args.threads) for label, m in models.items()}
    print(f"{name}: providers in use {sessions['base'].get_providers()}", flush=True)
    out = []
    for batch in BATCHES:
        x = np.random.default_rng(batch).random((batch, *shape), dtype=np.float32)
        paths = {p: (lambda s=s, x=x: s.run(None, {"images": x})) for p, s in sessions.items()}
        times = time_rounds(paths, args.rounds, args.min_time)
        base_min, base_med = min(times["base"]), statistics.median(times["base"])
        for path, t in times.items():
            row = {"case": name, "path": path, "batch": batch, "calls": len(t),
                   "min_s": min(t), "median_s": statistics.median(t),
                   "vs_base": min(t) / base_min,
                   "vs_base_median": statistics.median(t) / base_med}  # fmt: skip
            out.append(row)
            print(f"  {name:15s} {path:12s} batch {batch:3d}: min {1e3 * row['min_s']:9.2f} ms "
                  f"({row['vs_base']:.3f}x base), median {1e3 * row['median_s']:9.2f} ms "
                  f"({row['vs_base_median']:.3f}x), {len(t)} calls", flush=True)  # fmt: skip
    del sessions
    prof = profiles(models, shape, args)
    return {**info, "bank_rows": args.knn_bank_rows, "rows": out,
            "profile_batch": args.profile_batch, "profile": prof}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="at least this many per path")
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds per path, at least")
    parser.add_argument("--knn-bank-rows", type=int, default=10_000)
    parser.add_argument("--profile-batch", type=int, default=64)
    parser.add_argument("--profile-runs", type=int, default=4, help="the first is a warm-up")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bench_scores.json")
    args = parser.parse_args()
    if args.rounds < 1 or args.profile_runs < 2:
        parser.error("--rounds must be >= 1 and --profile-runs >= 2")
    results = {
        "machine": {**machine(), "threads": args.threads},
        "timing": "min over interleaved rounds (median beside it); vs_base = min / base min",
        "cases": {c: bench(c, args) for c in args.cases},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
