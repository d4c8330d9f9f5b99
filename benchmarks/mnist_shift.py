"""DE vs SDDE on MNIST under corruption shift, and quality against the number of members.

Evaluates trained runs ``{de,sdde}_s{seed}`` (trained by ``benchmarks/mnist_ood.py``: 5 LeNets on
8000 real MNIST digits) from their exported ONNX files, with the two analyses of
``sdde eval --shift --members-sweep``:

* corruption shift (the paper's Table 5 on MNIST): the 2000 test digits corrupted with the 13
  CIFAR-10-C corruptions this package implements, severities 1-5, one corrupted copy shared by
  every model; accuracy, NLL, ECE, Brier, OOD-flag rate and AUROC(correct vs wrong);
* the members sweep (the paper's Figure 6): the first k and random k members, T refitted for
  each subset on the run's own validation split, near/far/validation OOD AUROC of mal/msp/minmax.

Mean ± std over seeds goes to ``benchmarks/results/mnist_shift.json`` with the tables.

    .venv/bin/python benchmarks/mnist_shift.py --runs /tmp/sdde_mnist_ood/runs --work /tmp/shift
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from mnist_ood import FAR, NEAR, VAL, build_ood_sets, split_mnist, write_results  # noqa: E402

from sdde_serve.data import ArrayDataset, load_dataset  # noqa: E402
from sdde_serve.evaluation import corruptions as corr  # noqa: E402
from sdde_serve.evaluation.members import SweepConfig, sweep_on_engine  # noqa: E402
from sdde_serve.evaluation.shift import METRICS, ShiftConfig, evaluate_shift  # noqa: E402

METHODS = ("de", "sdde")
SWEEP_SCORES = ("mal", "msp", "minmax")
SWEEP_GROUPS = ("near", "far", "val")


def corrupted_cache(images: np.ndarray, config: ShiftConfig) -> dict[tuple[str, int], np.ndarray]:
    """Every (corruption, severity) copy of the test images, made once for all models."""
    return {
        (name, s): corr.corrupt(images, name, s, seed=config.seed)
        for name in config.corruptions
        for s in config.severities
    }


def evaluate_run(
    run_dir: Path,
    work: Path,
    test: ArrayDataset,
    ood: dict[str, ArrayDataset],
    cache: dict[tuple[str, int], np.ndarray],
    args: argparse.Namespace,
    plots: bool,
) -> dict[str, Any]:
    from export import export_run
    from sdde_serve.engine import Engine
    from sdde_serve.evaluation.evaluate import evaluate
    from sdde_serve.evaluation.report import write_report
    from training.run import load_val_split, read_config

    model = work / "models" / f"{run_dir.name}.onnx"
    t0 = time.time()
    if not model.exists() or model.stat().st_mtime < (run_dir / "best.safetensors").stat().st_mtime:
        export_run(run_dir, model, name=f"mnist-{run_dir.name}", version="1")
    t_export = time.time() - t0
    t0 = time.time()
    engine = Engine(model, intra_op_threads=args.threads, spin_wait=False)
    groups = {"near": list(NEAR), "far": list(FAR), "val": list(VAL)}
    ev = evaluate(engine, test, ood, groups=groups, id_spec="mnist_test.npz", cam_images=0)
    t_eval = time.time() - t0
    t0 = time.time()
    config = ShiftConfig(args.corruptions, args.severities, seed=args.shift_seed)
    ev.metrics["shift"] = evaluate_shift(
        engine, test, config, corrupted=lambda _images, name, s: cache[(name, s)]
    )
    t_shift = time.time() - t0
    t0 = time.time()
    val = load_val_split(run_dir, read_config(run_dir))  # the split export calibrated on
    ev.metrics["members_sweep"] = sweep_on_engine(
        ev, engine, SweepConfig(subsets=args.subsets, seed=args.sweep_seed), val_data=val
    )
    t_sweep = time.time() - t0
    write_report(ev, work / "reports" / run_dir.name, plots=plots)
    m = ev.metrics
    print(
        f"  {run_dir.name}: acc {100 * m['classification']['after']['accuracy']:.2f}  "
        f"shift mean acc {100 * m['shift']['mean']['accuracy']:.2f} "
        f"ECE {100 * m['shift']['mean']['ece']:.2f}  "
        f"[export {t_export:.0f}s, eval {t_eval:.0f}s, shift {t_shift:.0f}s, sweep {t_sweep:.0f}s]",
        flush=True,
    )
    return {
        "metrics": {k: m[k] for k in ("model", "classification", "ood", "shift", "members_sweep")},
        "seconds": {"export": t_export, "eval": t_eval, "shift": t_shift, "sweep": t_sweep},
    }


# --- aggregation --------------------------------------------------------------------------------


def _ms(values: list[float | None]) -> dict[str, float | None]:
    v = [x for x in values if x is not None]
    if not v:
        return {"mean": None, "std": None}
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over seeds of the shift rows and of the sweep curves."""
    shifts = [r["metrics"]["shift"] for r in runs]
    sweeps = [r["metrics"]["members_sweep"] for r in runs]
    sev = list(shifts[0]["per_severity"])
    shift = {
        "clean": {k: _ms([s["clean"][k] for s in shifts]) for k in METRICS},
        "per_severity": {
            v: {k: _ms([s["per_severity"][v][k] for s in shifts]) for k in METRICS} for v in sev
        },
        "mean": {k: _ms([s["mean"][k] for s in shifts]) for k in METRICS},
        "per_family": {
            f: {
                v: {k: _ms([s["per_family"][f][v][k] for s in shifts]) for k in METRICS}
                for v in sev
            }
            for f in shifts[0]["per_family"]
        },
    }
    sweep: dict[str, Any] = {}
    for which in ("first", "random"):
        rows = []
        for i, k in enumerate(sweeps[0]["k"]):
            cells = [s[which][i] if which == "first" else s[which][i]["mean"] for s in sweeps]
            row: dict[str, Any] = {"k": k}
            for key in ("accuracy", "nll", "ece", "brier", "temperature"):
                row[key] = _ms([c[key] for c in cells])
            row["ood"] = {
                g: {
                    sc: _ms([c["ood"]["groups"][g][sc]["auroc"] for c in cells])
                    for sc in SWEEP_SCORES
                }
                for g in SWEEP_GROUPS
            }
            rows.append(row)
        sweep[which] = rows
    sweep["gains"] = gains(sweeps)
    return {"shift": shift, "members_sweep": sweep}


GAIN_METRICS = {
    "accuracy": lambda r: r["accuracy"],
    "nll": lambda r: r["nll"],
    "ece": lambda r: r["ece"],
    **{
        f"{g}_auroc_{sc}": (lambda r, g=g, sc=sc: r["ood"]["groups"][g][sc]["auroc"])
        for g in SWEEP_GROUPS
        for sc in SWEEP_SCORES
    },
}


def gains(sweeps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What member k adds: the change from k - 1 to k of the random-subset mean, per seed."""
    out = []
    for i in range(1, len(sweeps[0]["k"])):
        row: dict[str, Any] = {"k": sweeps[0]["k"][i]}
        for key, get in GAIN_METRICS.items():
            row[key] = _ms(
                [get(s["random"][i]["mean"]) - get(s["random"][i - 1]["mean"]) for s in sweeps]
            )
        out.append(row)
    return out


# --- tables -------------------------------------------------------------------------------------


def _f(cell: dict[str, float | None], scale: float = 100.0, digits: int = 2) -> str:
    if cell["mean"] is None:
        return "n/a"
    return f"{scale * cell['mean']:.{digits}f} ± {scale * cell['std']:.{digits}f}"


def tables(agg: dict[str, dict[str, Any]]) -> str:
    out: list[str] = []

    def table(title: str, header: list[str], rows: list[list[str]]) -> None:
        out.extend(["", f"### {title}", "", "| " + " | ".join(header) + " |"])
        out.append("|" + "---|" * len(header))
        out.extend("| " + " | ".join(r) + " |" for r in rows)

    methods = list(agg)
    sev = list(agg[methods[0]]["shift"]["per_severity"])
    for metric, scale, digits in (
        ("accuracy", 100.0, 2),
        ("confidence", 100.0, 2),
        ("ece", 100.0, 2),
        ("nll", 1.0, 4),
        ("brier", 1.0, 4),
        ("flag_rate", 100.0, 2),
        ("auroc_correct", 100.0, 2),
    ):
        rows = []
        for m in methods:
            s = agg[m]["shift"]
            rows.append(
                [m.upper(), _f(s["clean"][metric], scale, digits)]
                + [_f(s["per_severity"][v][metric], scale, digits) for v in sev]
                + [_f(s["mean"][metric], scale, digits)]
            )
        table(
            f"Shift: {metric} by severity (mean over corruptions; mean ± std over seeds)",
            ["method", "clean", *[f"sev {v}" for v in sev], "mean 1-5"],
            rows,
        )
    fams = list(agg[methods[0]]["shift"]["per_family"])
    rows = []
    for f in fams:
        rows.append(
            [f]
            + [
                _f(agg[m]["shift"]["per_family"][f][sev[-1]][k])
                for k in ("accuracy", "ece")
                for m in methods
            ]
        )
    table(
        f"Shift: severity {sev[-1]} by family (accuracy, then ECE)",
        ["family", *[f"{k} {m.upper()}" for k in ("accuracy", "ECE") for m in methods]],
        rows,
    )
    for which in ("random", "first"):
        rows = []
        for i in range(len(agg[methods[0]]["members_sweep"][which])):
            row = [str(i + 1)]
            for m in methods:
                c = agg[m]["members_sweep"][which][i]
                row += [
                    _f(c["accuracy"]),
                    _f(c["nll"], 1.0, 4),
                    _f(c["ece"]),
                    _f(c["ood"]["near"]["mal"]),
                    _f(c["ood"]["far"]["mal"]),
                ]
            rows.append(row)
        label = "mean over random subsets" if which == "random" else "first k members"
        table(
            f"Members sweep ({label}; T refitted per subset on validation)",
            ["k"]
            + [
                f"{m.upper()} {h}"
                for m in methods
                for h in ("acc", "NLL", "ECE", "near AUROC MAL", "far AUROC MAL")
            ],
            rows,
        )
    rows = []
    for i in range(len(agg[methods[0]]["members_sweep"]["random"])):
        row = [str(i + 1)]
        for m in methods:
            c = agg[m]["members_sweep"]["random"][i]["ood"]
            row += [_f(c[g][s]) for g in ("near", "val") for s in SWEEP_SCORES]
        rows.append(row)
    table(
        "Members sweep: near and validation OOD AUROC by score (random subsets)",
        ["k"]
        + [f"{m.upper()} {g} {s}" for m in methods for g in ("near", "val") for s in SWEEP_SCORES],
        rows,
    )
    rows = []
    for i in range(len(agg[methods[0]]["members_sweep"]["gains"])):
        row = [str(agg[methods[0]]["members_sweep"]["gains"][i]["k"])]
        for m in methods:
            g = agg[m]["members_sweep"]["gains"][i]
            row += [
                _f(g["accuracy"]),
                _f(g["nll"], 1.0, 4),
                _f(g["ece"]),
                _f(g["near_auroc_mal"]),
                _f(g["val_auroc_mal"]),
            ]
        rows.append(row)
    table(
        "Members sweep: what the k-th member adds (change of the random-subset mean from k - 1)",
        ["k"]
        + [
            f"{m.upper()} {h}"
            for m in methods
            for h in ("Δacc", "ΔNLL", "ΔECE", "Δnear AUROC MAL", "Δval AUROC MAL")
        ],
        rows,
    )
    text = "\n".join(out)
    print(text)
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from sdde_serve.evaluation.shift import parse_corruptions, parse_severities

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mnist", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    p.add_argument("--runs", required=True, help="directory of runs {de,sdde}_s{seed}")
    p.add_argument("--work", default="/tmp/sdde_mnist_shift", help="data, models, reports")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mnist_shift.json"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--corruptions", default="default")
    p.add_argument("--severities", default="1,2,3,4,5")
    p.add_argument("--shift-seed", type=int, default=0)
    p.add_argument("--subsets", type=int, default=10, help="random member subsets per k")
    p.add_argument("--sweep-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    args.corruptions = parse_corruptions(args.corruptions)
    args.severities = parse_severities(args.severities)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work, runs_dir = Path(args.work), Path(args.runs)
    for sub in ("models", "reports"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    _, test_spec = split_mnist(Path(args.mnist), work)
    ood = {n: load_dataset(s, split="test") for n, s in build_ood_sets(work).items()}
    ood = {n: d for n, d in ood.items() if n in (*NEAR, *FAR, *VAL)}
    test = load_dataset(test_spec, split="test")
    t0 = time.time()
    cache = corrupted_cache(
        test.images, ShiftConfig(args.corruptions, args.severities, args.shift_seed)
    )
    t_corrupt = time.time() - t0
    print(
        f"{len(cache)} corrupted copies of {len(test)} test images in {t_corrupt:.0f}s", flush=True
    )
    results: dict[str, list[dict]] = {m: [] for m in args.methods}
    for seed in args.seeds:
        for method in args.methods:
            run_dir = runs_dir / f"{method}_s{seed}"
            results[method].append(
                evaluate_run(run_dir, work, test, ood, cache, args, plots=seed == args.seeds[0])
            )
    agg = {m: aggregate(rs) for m, rs in results.items()}
    text = tables(agg)
    payload = {
        "benchmark": "mnist_shift",
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
        },
        "settings": {
            "runs": str(runs_dir),
            "seeds": args.seeds,
            "corruptions": list(args.corruptions),
            "severities": list(args.severities),
            "shift_seed": args.shift_seed,
            "subsets_per_k": args.subsets,
            "sweep_seed": args.sweep_seed,
            "n_test": len(test),
            "ood_groups": {"near": list(NEAR), "far": list(FAR), "val": list(VAL)},
        },
        "aggregate": agg,
        "runs": {
            m: [{"seed": s, **r} for s, r in zip(args.seeds, rs, strict=True)]
            for m, rs in results.items()
        },
        "tables_markdown": text,
        "seconds_corrupting": t_corrupt,
        "wall_seconds": time.time() - t_start,
    }
    write_results(Path(args.out), payload)
    print(f"\nwrote {args.out} ({time.time() - t_start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
