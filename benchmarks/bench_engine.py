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

With ``--precision-runs CASE=RUN_DIR ...`` it measures precisions instead, on *trained* runs:
each run is exported by ``export_run`` in fp32 and int8 (``--precision``; tolerances lifted so
that the deltas are recorded even beyond them), and the graphs are timed side by side at batch
1, 8 and 64, with the export's own deltas (accuracy, NLL, ECE, label agreement, AUROC against
``--ood-val``) next to the speed; then every int8 scheme of ``export.quantize.INT8_SCHEMES``
(the shipped 7-bit-weight one and the ones it was chosen against) with its label agreement and
NLL change vs fp32 and its speed-up. Writes ``benchmarks/results/bench_engine_precision_<cpu>.json``
(<cpu>: the widest int8-relevant ISA flag of this machine, e.g. ``avx512vnni``; also recorded
with the flags present, since int8 kernels and their saturation differ per kind).

    .venv/bin/python benchmarks/bench_engine.py --threads 2 \
        --precision-runs lenet_x5=runs/lenet resnet18_32_x5=runs/r18 --ood-val flipped=ood.npz
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


# --- precisions on trained runs ---------------------------------------------------------------

PRECISION_BENCH = ("fp32", "int8")
PRECISION_GOALS = {"resnet18_32_x5": {64: 3.5, 1: 2.0}}  # int8 / fp32 images/s


def export_precisions(
    run_dir: Path, work: Path, case: str, ood_val: list[str]
) -> dict[str, tuple[Path, dict]]:
    """``{variant: (path, manifest dict)}``: fp32 in the default layout, int8 in each layout."""
    from export import export_run
    from export.quantize import PrecisionOptions
    from sdde_serve.data import load_dataset
    from sdde_serve.evaluation.evaluate import parse_named_specs

    ood = [
        load_dataset(spec, split="train")
        for spec in parse_named_specs(ood_val, "--ood-val").values()
    ]
    out = {}
    variants = [("fp32", None)] + [("int8", layout) for layout in LAYOUTS]
    for precision, layout in variants:
        name = precision if layout is None else f"{precision}-{layout}"
        path = work / f"{case}-{name}.onnx"
        options = PrecisionOptions(
            precision, max_accuracy_drop=100.0, max_auroc_drop=100.0, ood_val=ood
        )
        t0 = time.perf_counter()
        manifest = export_run(run_dir, path, layout=layout, with_cams=False, precision=options)
        print(f"  exported {case} {name} ({manifest.layout}) in {time.perf_counter() - t0:.0f} s",
              flush=True)  # fmt: skip
        out[name] = (path, manifest.model_dump())
    return out


def within_tolerances(check: dict | None) -> bool | None:
    from export.quantize import DEFAULT_MAX_ACCURACY_DROP, DEFAULT_MAX_AUROC_DROP

    if check is None:
        return None
    acc = 100 * (check["fp32"]["accuracy"] - check["converted"]["accuracy"])
    ok = acc <= DEFAULT_MAX_ACCURACY_DROP + 1e-9
    if check["fp32"].get("auroc") is not None:
        auroc = 100 * (check["fp32"]["auroc"] - check["converted"]["auroc"])
        ok = ok and auroc <= DEFAULT_MAX_AUROC_DROP + 1e-9
    return ok


def bench_precision_case(
    case: str, run_dir: Path, threads: int, min_time: float, ood_val: list[str], work: Path
) -> dict:
    models = export_precisions(run_dir, work, case, ood_val)
    sessions = {name: session(path.read_bytes(), threads) for name, (path, _) in models.items()}
    m = models["fp32"][1]
    shape = (m["input"]["channels"], m["input"]["height"], m["input"]["width"])
    rows = []
    for batch in BATCHES:
        x = np.random.default_rng(batch).random((batch, *shape), dtype=np.float32)
        paths = {n: (lambda s=s, x=x: s.run(None, {"images": x})) for n, s in sessions.items()}
        secs = time_interleaved(paths, min_time)
        for name, seconds in secs.items():
            rows.append(
                {
                    "variant": name,
                    "layout": models[name][1]["layout"],
                    "batch": batch,
                    "images_per_s": batch / seconds,
                    "speedup_vs_fp32": secs["fp32"] / seconds,
                }
            )
            print(f"  {case:15s} {name:12s} batch {batch:3d}: {batch / seconds:9.1f} img/s "
                  f"({secs['fp32'] / seconds:.2f}x fp32)", flush=True)  # fmt: skip
    checks = {
        name: {
            "precision_check": man["precision_check"],
            "within_default_tolerances": within_tolerances(man["precision_check"]),
            "calibration": man["calibration"],
        }
        for name, (_, man) in models.items()
    }
    return {"run_dir": str(run_dir), "rows": rows, "checks": checks}


# flags of /proc/cpuinfo that decide onnxruntime's int8 kernels, widest first
ISA_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni", "avx512bw", "avx512f", "avx2")
SCHEME_GOALS = {"label_agreement": 0.99, "abs_nll_change_percent": 5.0}  # issue 21


def cpu_isa() -> tuple[str, list[str]]:
    """(the widest int8-relevant flag without underscores, e.g. ``avx512vnni``; all present)."""
    from sdde_serve.probe import cpu_kind

    flags = cpu_kind().split()[-1]
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
        line = next((ln for ln in f if ln.startswith(("flags", "Features"))), ":")
    present = [flag for flag in ISA_FLAGS if flag in line.split(":", 1)[1].split()]
    return flags.replace("_", ""), present


def scheme_quality(graph, reference: dict, images: np.ndarray, labels: np.ndarray) -> dict:
    """Agreement and NLL of ``graph`` vs the fp32 outputs ``reference``, both at fp32's T."""
    from sdde_serve import calibration as cal
    from sdde_serve.calibrate import run_graph

    out = run_graph(graph, images, ["logits", "probs"])
    nll, ref_nll = cal.nll(out["probs"], labels), cal.nll(reference["probs"], labels)
    return {
        "accuracy": cal.accuracy(out["probs"], labels),
        "label_agreement": float((out["probs"].argmax(-1) == reference["probs"].argmax(-1)).mean()),
        "nll": nll,
        "nll_change_percent": 100.0 * (nll - ref_nll) / ref_nll,
        "ece": cal.ece(out["probs"], labels),
        "max_abs_logit_diff": float(np.abs(out["logits"] - reference["logits"]).max()),
    }


def bench_schemes(
    case: str, run_dir: Path, fp32_path: Path, threads: int, min_time: float, work: Path
) -> dict:
    """Every int8 scheme of export.quantize.INT8_SCHEMES, built from an fp32 export in the layout
    int8 ships with for the arch, at fp32's T (no refit): quality vs fp32 and speed vs the fp32
    graph in its own default layout, side by side in one round per batch."""
    import onnx

    from export import export_run
    from export.quantize import DEFAULT_LAYOUTS, INT8_SCHEMES, run_training_images, to_int8
    from sdde_serve.calibrate import run_graph
    from training.run import load_run

    run = load_run(run_dir)
    arch = str(run.config["model"]["arch"])
    base = work / f"{case}-fp32-for-int8.onnx"
    export_run(run_dir, base, layout=DEFAULT_LAYOUTS.get(("int8", arch)), with_cams=False)
    fp32 = onnx.load(str(fp32_path))
    shape = tuple(d.dim_value for d in fp32.graph.input[0].type.tensor_type.shape.dim[1:])
    images, labels = run.val.as_model_input(*shape), run.val.labels
    train, _ = run_training_images(run, 512, shape)  # type: ignore[arg-type]
    graphs = {s: to_int8(onnx.load(str(base)), train, scheme=s) for s in INT8_SCHEMES}
    reference = run_graph(fp32, images, ["logits", "probs"])
    quality = {s: scheme_quality(g, reference, images, labels) for s, g in graphs.items()}
    sessions = {"fp32": session(fp32.SerializeToString(), threads)}
    sessions.update({s: session(g.SerializeToString(), threads) for s, g in graphs.items()})
    speedups: dict[str, dict[int, float]] = {s: {} for s in graphs}
    for batch in BATCHES:
        x = np.random.default_rng(batch).random((batch, *shape), dtype=np.float32)
        calls = {n: (lambda s=s, x=x: s.run(["probs"], {"images": x})) for n, s in sessions.items()}
        secs = time_interleaved(calls, min_time)
        for scheme in graphs:
            speedups[scheme][batch] = secs["fp32"] / secs[scheme]
    for scheme, q in quality.items():
        q["speedup_vs_fp32"] = speedups[scheme]
        print(f"  {case:15s} {scheme:8s} agree {q['label_agreement']:.2%}  NLL "
              f"{q['nll_change_percent']:+.2f}%  max|dlogit| {q['max_abs_logit_diff']:.3g}  "
              + "  ".join(f"b={b} {v:.2f}x" for b, v in speedups[scheme].items()),
              flush=True)  # fmt: skip
    return {"int8_layout": DEFAULT_LAYOUTS.get(("int8", arch)), "schemes": quality}


def print_precision_table(results: dict) -> None:
    print(f"\n{'case':15s} {'variant':12s} " + " ".join(f"{'b=' + str(b):>18s}" for b in BATCHES)
          + "  acc drop  AUROC drop  agree  in tol")  # fmt: skip
    for case, res in results.items():
        for name in dict.fromkeys(r["variant"] for r in res["rows"]):
            cells = [
                f"{r['images_per_s']:8.1f} ({r['speedup_vs_fp32']:.2f}x)"
                for b in BATCHES
                for r in res["rows"]
                if r["variant"] == name and r["batch"] == b
            ]
            check = res["checks"][name]["precision_check"]
            tail = ""
            if check is not None:
                acc = 100 * (check["fp32"]["accuracy"] - check["converted"]["accuracy"])
                auroc = (
                    "-"
                    if check["fp32"].get("auroc") is None
                    else f"{100 * (check['fp32']['auroc'] - check['converted']['auroc']):.2f}"
                )
                ok = res["checks"][name]["within_default_tolerances"]
                tail = f"  {acc:8.2f}  {auroc:>10s}  {check['label_agreement']:.2%}  {ok}"
            print(f"{case:15s} {name:12s} " + " ".join(f"{c:>18s}" for c in cells) + tail)
    print("cells: images/s (speed-up over fp32 in the same round); drops in points vs fp32")


def precision_main(args: argparse.Namespace) -> int:
    import tempfile

    t0 = time.time()
    runs = dict(item.split("=", 1) for item in args.precision_runs)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        for case, run_dir in runs.items():
            results[case] = bench_precision_case(
                case, Path(run_dir), args.threads, args.min_time, args.ood_val, Path(tmp)
            )
            fp32_path = Path(tmp) / f"{case}-fp32.onnx"
            results[case]["int8_schemes"] = bench_schemes(
                case, Path(run_dir), fp32_path, args.threads, args.min_time, Path(tmp)
            )
    print_precision_table(results)
    goals = {}
    for case, per_batch in PRECISION_GOALS.items():
        if case not in results:
            continue
        for batch, goal in per_batch.items():
            best = max(
                (
                    r
                    for r in results[case]["rows"]
                    if r["batch"] == batch and r["variant"] != "fp32"
                ),
                key=lambda r: r["speedup_vs_fp32"],
            )
            ok = within_tolerances(results[case]["checks"][best["variant"]]["precision_check"])
            goals[f"{case} int8 >= {goal}x fp32 at batch {batch}"] = {
                "best_variant": best["variant"],
                "speedup": best["speedup_vs_fp32"],
                "met": bool(best["speedup_vs_fp32"] >= goal and ok),
            }
    from export.quantize import DEFAULT_INT8_SCHEME

    for case, res in results.items():
        q = res["int8_schemes"]["schemes"][DEFAULT_INT8_SCHEME]
        goals[f"{case} int8 ({DEFAULT_INT8_SCHEME}) agreement >= 99% and |dNLL| <= 5%"] = {
            "label_agreement": q["label_agreement"],
            "nll_change_percent": q["nll_change_percent"],
            "met": bool(
                q["label_agreement"] >= SCHEME_GOALS["label_agreement"]
                and abs(q["nll_change_percent"]) <= SCHEME_GOALS["abs_nll_change_percent"]
            ),
        }
    for goal, v in goals.items():
        verdict = "met" if v["met"] else "MISSED"
        detail = {k: v[k] for k in v if k != "met"}
        print(f"goal {goal}: {verdict} ({detail})")
    load = os.getloadavg()
    isa, isa_flags = cpu_isa()
    out = {
        "machine": {
            "cpu_kind": isa,
            "isa_flags": isa_flags,
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": args.threads,
            "loadavg_end": load,
            "onnxruntime": ort.__version__,
        },
        "ood_val": args.ood_val,
        "results": results,
        "goals": goals,
        "wall_s": time.time() - t0,
        "cpu_s": time.process_time(),
    }
    path = (
        args.out.with_name(f"bench_engine_precision_{isa}.json")
        if args.out.name == "bench_engine.json"
        else args.out
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {path} ({time.time() - t0:.0f} s, load average {load[0]:.1f})")
    return 0


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
    parser.add_argument(
        "--precision-runs",
        nargs="*",
        default=[],
        metavar="CASE=RUN_DIR",
        help="measure fp32 vs int8 on these trained runs instead (see the module docstring)",
    )
    parser.add_argument("--ood-val", action="append", default=[], metavar="NAME=SPEC")
    args = parser.parse_args()
    global SPIN
    SPIN = args.spin
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    if args.precision_runs:
        return precision_main(args)
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
