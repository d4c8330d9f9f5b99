"""Temperature rule and conformal false-flag rates on real MNIST (issue 11's benchmark).

For each trained run (5 LeNets on 8,000 MNIST digits, ``benchmarks/mnist_ood.py``'s split, 10%
validation split) this script:

1. exports the run (``export_run``: the cross-validated temperature rule and the conformal
   calibration scores on the run's validation split, as users get them);
2. measures on the 2,000 held-out MNIST test digits the NLL and ECE at T = 1, at the *old* rule's
   T (fit on the whole validation split, always applied) and at the *new* rule's T, with a paired
   bootstrap 95% interval of ``NLL(new) - NLL(T = 1)`` over test images (the "noise");
3. the empirical false-flag rate ``P(p-value < alpha)`` on the ID test digits at alpha = 0.05 and
   0.01, next to the exact rate the conformal rule promises, ``(ceil(alpha (n + 1)) - 1)/(n + 1)``;
   and the share of each OOD set flagged (OOD sets from ``mnist_ood.build_ood_sets``);
4. the same with a larger calibration set, as ``sdde calibrate`` would use it: 6,000 digits drawn
   (seeded) from the official MNIST *training* file, which these models never saw;
5. an exchangeability control for the p-values: the 6,000 training-file digits split in half
   (seeded), one half calibrating and the other tested, so calibration and test images are
   exchangeable by construction (the MNIST test split and the training file are not quite: a
   two-sample KS test of their scores is reported);
6. a check that the rule still applies T when T is needed: the same members made over-confident
   (every logit multiplied by ``OVERCONFIDENT`` on the calibration and the test images alike).

Writes ``benchmarks/results/mnist_calibration.json``. Needs the runs (``--runs``) and the MNIST
files; trains nothing.
"""

from __future__ import annotations

import argparse
import json
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

from mnist_ood import build_ood_sets, split_mnist  # noqa: E402

from sdde_serve import calibration as cal  # noqa: E402
from sdde_serve import conformal  # noqa: E402
from sdde_serve.data import load_dataset  # noqa: E402
from sdde_serve.temperature import bootstrap_interval, choose_temperature  # noqa: E402

ALPHAS = (0.05, 0.01)
OVERCONFIDENT = 3.0
N_LARGE = 6000
LARGE_SEED = 11


def classification(logits: np.ndarray, labels: np.ndarray, t: float) -> dict[str, float]:
    probs = cal.ensemble_probs(logits, t)
    return {"t": t, "nll": cal.nll(probs, labels), "ece": cal.ece(probs, labels)}


def nll_noise(logits: np.ndarray, labels: np.ndarray, t: float) -> list[float]:
    """Paired bootstrap 95% interval of NLL(T = t) - NLL(T = 1) over the test images."""
    idx = np.arange(len(labels))

    def per(temp: float) -> np.ndarray:
        return -cal.ensemble_log_probs(logits, temp)[idx, labels]

    return list(bootstrap_interval(per(t) - per(1.0), confidence=0.95, seed=1))


def rule_summary(cal_logits: np.ndarray, cal_labels: np.ndarray) -> dict[str, Any]:
    d = choose_temperature(cal_logits, cal_labels)
    return {
        "n": d.n,
        "errors": d.errors,
        "t_old": d.fitted,  # the old rule: fit on all calibration images, always applied
        "t_new": d.temperature,
        "applied": d.applied,
        "cv_nll_t1": d.cv_nll_t1,
        "cv_nll_fitted": d.cv_nll_fitted,
        "gain_interval": list(d.gain_interval),
        "fold_t": [f.temperature for f in d.folds],
        "reason": d.reason,
    }


def temperature_block(
    rule: dict[str, Any], test_logits: np.ndarray, test_labels: np.ndarray
) -> dict[str, Any]:
    out = {
        "rule": rule,
        "test_t1": classification(test_logits, test_labels, 1.0),
        "test_old": classification(test_logits, test_labels, rule["t_old"]),
        "test_new": classification(test_logits, test_labels, rule["t_new"]),
        "test_nll_new_minus_t1_interval": nll_noise(test_logits, test_labels, rule["t_new"]),
        "test_nll_old_minus_t1_interval": nll_noise(test_logits, test_labels, rule["t_old"]),
    }
    lo, _ = out["test_nll_new_minus_t1_interval"]
    # "never worse than T = 1 by more than noise": the interval of the difference reaches 0
    out["new_not_worse_than_t1"] = bool(lo <= 0.0)
    return out


def false_flags(
    cal_scores: np.ndarray, id_scores: np.ndarray, ood_scores: dict[str, np.ndarray]
) -> dict[str, Any]:
    calib = conformal.sorted_scores(cal_scores)
    out: dict[str, Any] = {"n_calibration": len(calib)}
    for alpha in ALPHAS:
        threshold = conformal.threshold_for_alpha(calib, alpha)
        p_id = conformal.p_values(calib, id_scores)
        flagged = p_id < alpha
        assert np.array_equal(flagged, id_scores < threshold)  # the two forms of the rule agree
        out[str(alpha)] = {
            "id_false_flag_rate": float(flagged.mean()),
            "expected": conformal.expected_false_flag_rate(len(calib), alpha),
            "ood_flagged": {
                n: float((conformal.p_values(calib, s) < alpha).mean())
                for n, s in ood_scores.items()
            },
        }
    return out


def exchangeable_control(scores: np.ndarray, ood_mal: dict[str, np.ndarray]) -> dict[str, Any]:
    """Calibrate on a seeded half of ``scores``, test on the other half."""
    perm = np.random.default_rng(LARGE_SEED + 1).permutation(len(scores))
    half = len(scores) // 2
    return false_flags(scores[perm[:half]], scores[perm[half:]], ood_mal)


def run_model(run_dir: Path, work: Path, data: dict[str, Any], threads: int) -> dict[str, Any]:
    from export import export_run
    from sdde_serve.engine import Engine
    from training.run import load_run

    model_path = work / "models" / f"{run_dir.name}.onnx"
    t0 = time.time()
    manifest = export_run(run_dir, model_path, name=run_dir.name)
    export_s = time.time() - t0
    engine = Engine(model_path, intra_op_threads=threads)
    shape = engine.input_shape
    run = load_run(run_dir)
    val_out = engine.run_batches(run.val.as_model_input(*shape))
    test_out = engine.run_batches(data["test"].as_model_input(*shape))
    large_out = engine.run_batches(data["large"].as_model_input(*shape))
    ood_mal = {
        n: np.asarray(engine.run_batches(d.as_model_input(*shape)).mal, np.float64)
        for n, d in data["ood"].items()
    }
    test_labels, large_labels = data["test"].labels, data["large"].labels
    val_labels = np.asarray(run.val.labels)
    # the exported manifest must hold what this script recomputes
    rule_val = rule_summary(val_out.logits, val_labels)
    assert abs(rule_val["t_new"] - manifest.temperature) < 1e-9, (rule_val, manifest.temperature)
    assert manifest.ood.score == "mal" and manifest.ood.calibration_scores is not None
    assert np.array_equal(manifest.ood.calibration_scores, conformal.sorted_scores(val_out.mal)), (
        "stored calibration scores differ from the graph's validation MAL"
    )
    test_mal = np.asarray(test_out.mal, np.float64)
    from scipy import stats

    # are the calibration scores and the test scores one distribution? (exchangeability check)
    ks = {
        split: {"statistic": float(r.statistic), "p_value": float(r.pvalue)}
        for split, r in (
            ("validation_split", stats.ks_2samp(val_out.mal, test_mal)),
            ("large_calibration", stats.ks_2samp(large_out.mal, test_mal)),
        )
    }
    return {
        "run": run_dir.name,
        "export_s": round(export_s, 1),
        "val_accuracy": cal.accuracy(cal.ensemble_probs(val_out.logits), val_labels),
        "test_accuracy": cal.accuracy(cal.ensemble_probs(test_out.logits), test_labels),
        "validation_split": {
            **temperature_block(rule_val, test_out.logits, test_labels),
            "conformal": false_flags(np.asarray(val_out.mal), test_mal, ood_mal),
            "ks_calibration_vs_test_mal": ks["validation_split"],
        },
        "large_calibration": {
            **temperature_block(
                rule_summary(large_out.logits, large_labels), test_out.logits, test_labels
            ),
            "conformal": false_flags(np.asarray(large_out.mal), test_mal, ood_mal),
            "ks_calibration_vs_test_mal": ks["large_calibration"],
        },
        "exchangeable_control": exchangeable_control(
            np.asarray(large_out.mal, np.float64), ood_mal
        ),
        "overconfident": {
            split: temperature_block(
                rule_summary(OVERCONFIDENT * logits, labels),
                OVERCONFIDENT * test_out.logits,
                test_labels,
            )
            for split, logits, labels in (
                ("validation_split", val_out.logits, val_labels),
                ("large_calibration", large_out.logits, large_labels),
            )
        },
    }


def load_data(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    _, test_spec = split_mnist(Path(args.mnist), work)
    test = load_dataset(test_spec, split="test")
    train = load_dataset(args.mnist_train, split="train")
    idx = np.sort(np.random.default_rng(LARGE_SEED).permutation(len(train))[:N_LARGE])
    large = type(train)(
        images=train.images[idx], labels=train.labels[idx], classes=train.classes, name="large"
    )
    ood_specs = build_ood_sets(work)
    ood = {n: load_dataset(s, split="test") for n, s in ood_specs.items()}
    return {"test": test, "large": large, "ood": ood}


def mean_over(runs: list[dict], *path: str) -> float:
    values = []
    for r in runs:
        v: Any = r
        for p in path:
            v = v[p]
        values.append(float(v))
    return float(np.mean(values))


def aggregate(runs: list[dict]) -> dict[str, Any]:
    agg: dict[str, Any] = {}
    for split in ("validation_split", "large_calibration"):
        block: dict[str, Any] = {
            f"test_{k}_{m}": mean_over(runs, split, f"test_{k}", m)
            for k in ("t1", "old", "new")
            for m in ("nll", "ece")
        }
        block["old_worse_nll_than_t1"] = sum(
            r[split]["test_old"]["nll"] > r[split]["test_t1"]["nll"] for r in runs
        )
        block["new_not_worse_than_t1_all"] = all(r[split]["new_not_worse_than_t1"] for r in runs)
        block["applied"] = sum(r[split]["rule"]["applied"] for r in runs)
        for alpha in ALPHAS:
            rate = mean_over(runs, split, "conformal", str(alpha), "id_false_flag_rate")
            block[f"false_flag_rate@{alpha}"] = rate
            block[f"false_flag_within_1pp@{alpha}"] = bool(abs(rate - alpha) <= 0.01)
        for alpha in ALPHAS:
            block[f"exchangeable_control_false_flag_rate@{alpha}"] = mean_over(
                runs, "exchangeable_control", str(alpha), "id_false_flag_rate"
            )
        over = [r["overconfident"][split] for r in runs]
        block["overconfident"] = {
            "applied": sum(o["rule"]["applied"] for o in over),
            "test_t1_nll": float(np.mean([o["test_t1"]["nll"] for o in over])),
            "test_new_nll": float(np.mean([o["test_new"]["nll"] for o in over])),
            "t_new": [o["rule"]["t_new"] for o in over],
        }
        agg[split] = block
    return agg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", required=True, type=Path, help="trained run directories")
    p.add_argument("--work", default="/tmp/sdde_mnist_calibration", help="models, data")
    p.add_argument("--mnist", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    p.add_argument("--mnist-train", default=str(ROOT.parent / "shared" / "data" / "mnist-train"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mnist_calibration.json"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    (work / "models").mkdir(parents=True, exist_ok=True)
    start, cpu0 = time.time(), time.process_time()
    data = load_data(args, work)
    runs = []
    for run_dir in args.runs:
        r = run_model(run_dir, work, data, args.threads)
        v, lg = r["validation_split"], r["large_calibration"]
        print(
            f"{r['run']}: val n={v['rule']['n']} errors={v['rule']['errors']} "
            f"T old {v['rule']['t_old']:.3f} new {v['rule']['t_new']:.3f} | test NLL "
            f"T=1 {v['test_t1']['nll']:.4f} old {v['test_old']['nll']:.4f} "
            f"new {v['test_new']['nll']:.4f} | ECE {100 * v['test_t1']['ece']:.2f}% "
            f"{100 * v['test_old']['ece']:.2f}% {100 * v['test_new']['ece']:.2f}% | "
            f"flag@.05 {100 * v['conformal']['0.05']['id_false_flag_rate']:.2f}% "
            f"@.01 {100 * v['conformal']['0.01']['id_false_flag_rate']:.2f}%",
            flush=True,
        )
        print(
            f"   large n={lg['rule']['n']} errors={lg['rule']['errors']} "
            f"T old {lg['rule']['t_old']:.3f} new {lg['rule']['t_new']:.3f} | test NLL "
            f"{lg['test_t1']['nll']:.4f} {lg['test_old']['nll']:.4f} "
            f"{lg['test_new']['nll']:.4f} | ECE {100 * lg['test_t1']['ece']:.2f}% "
            f"{100 * lg['test_old']['ece']:.2f}% {100 * lg['test_new']['ece']:.2f}% | "
            f"flag@.05 {100 * lg['conformal']['0.05']['id_false_flag_rate']:.2f}% "
            f"@.01 {100 * lg['conformal']['0.01']['id_false_flag_rate']:.2f}%",
            flush=True,
        )
        runs.append(r)
    payload = {
        "benchmark": "mnist_calibration",
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "settings": {
            "alphas": list(ALPHAS),
            "n_test": len(data["test"]),
            "n_large_calibration": N_LARGE,
            "large_calibration_source": "official MNIST training file (unseen by these runs)",
            "score": "mal",
            "rule": "5-fold CV; apply T when the one-sided 95% lower bound (2000-draw percentile "
            "bootstrap) of the held-out NLL gain is > 0 and the fit is not on the search bound",
        },
        "aggregate": aggregate(runs),
        "runs": runs,
        "wall_seconds": round(time.time() - start, 1),
        "cpu_seconds": round(time.process_time() - cpu0, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")
    print(json.dumps(payload["aggregate"], indent=1))
    print(f"wrote {args.out} ({time.time() - start:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
