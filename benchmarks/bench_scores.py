"""Engine cost of each registered OOD score in the graph, side by side (docs/scores.md).

For each case of bench_engine (untrained weights: the cost does not depend on them), the fused
graph in the arch's default layout is timed at batch 1 and 64 with only the base scores (mal,
msp, minmax), then with each further score added alone: ``knn`` (a --knn-bank-rows bank of
random unit rows), ``energy``, ``mahalanobis``, ``vim`` and ``knn_members`` (statistics fitted
on random features of the right shapes; knn_members's bank has --knn-bank-rows rows). Paths are
interleaved round by round (shared CPUs). Prints each graph's time over the base graph's and
writes ``benchmarks/results/bench_scores.json``.

    .venv/bin/python benchmarks/bench_scores.py [--cases lenet_x5 resnet18_32_x5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.bench_engine import CASES, session, time_interleaved  # noqa: E402
from export.choice import final_layers  # noqa: E402
from export.graph import build_graph, to_onnx  # noqa: E402
from export.knn import default_k, normalize_rows  # noqa: E402
from export.layouts import default_layout  # noqa: E402
from sdde_serve import scores  # noqa: E402
from training.ensemble import Ensemble  # noqa: E402
from training.models import create_model  # noqa: E402

FITTED = ("energy", "mahalanobis", "vim", "knn_members")


def graphs(name: str, threads: int, rows: int) -> tuple[dict, tuple[int, int, int], dict]:
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
    sessions = {}
    for label, kw in variants.items():
        g = build_graph(ensemble, layout, input_shape=shape, with_cams=False, **kw)
        sessions[label] = session(to_onnx(g, input_shape=shape).SerializeToString(), threads)
    return sessions, shape, {"layout": layout, "stored_bytes": stored, "width": width}


def bench(name: str, threads: int, min_time: float, rows: int) -> dict:
    sessions, shape, info = graphs(name, threads, rows)
    out = []
    for batch in (1, 64):
        x = np.random.default_rng(batch).random((batch, *shape), dtype=np.float32)
        paths = {p: (lambda s=s, x=x: s.run(None, {"images": x})) for p, s in sessions.items()}
        secs = time_interleaved(paths, min_time)
        for path, seconds in secs.items():
            ratio = seconds / secs["base"]
            out.append({"case": name, "path": path, "batch": batch,
                        "seconds_per_call": seconds, "vs_base": ratio})  # fmt: skip
            print(f"  {name:15s} {path:12s} batch {batch:3d}: {1e3 * seconds:8.2f} ms/call "
                  f"({ratio:.3f}x base)", flush=True)  # fmt: skip
    return {**info, "bank_rows": rows, "rows": out}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=2.0)
    parser.add_argument("--knn-bank-rows", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bench_scores.json")
    args = parser.parse_args()
    results = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads},
        "cases": {c: bench(c, args.threads, args.min_time, args.knn_bank_rows) for c in args.cases},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
