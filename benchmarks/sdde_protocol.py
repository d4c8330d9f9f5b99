"""SDDE's training protocol, one change at a time, scored on VALIDATION data only.

Every choice this benchmark feeds (λ, the diversity period k, the shared-batch fraction, the
diversity batch's source, the augmentation) is made here on validation data, never on the sets
the reproduction (``benchmarks/mnist_full.py``) reports:

* training data: a seeded subset of the 60,000 MNIST training digits (``--n``, default 10,000);
  the trainer holds out 10 % of it as the run's validation split;
* in-distribution scores: that validation split (accuracy, NLL, ECE);
* OOD: ``val-glyphs`` (near: letters K-T in the fonts the test glyphs do not use) and
  ``val-photos`` (far: coins, rocket, Hubble crops) from ``benchmarks/mnist_ood.py``.

Each variant is one ``TrainConfig`` override on the same base (LeNet x 5, SGD Nesterov lr 0.1,
cosine, batch 128, λ = 0.1 for SDDE); the best checkpoint (validation accuracy) is scored in
PyTorch with MAL (max over classes of the member-mean logit), MSP (T = 1) and minmax (the
official code's min over members of the max logit). The step time is the run's own training
clock divided by its steps (busy machine: compare within one run of this script only).

Results are appended to ``benchmarks/results/sdde_protocol.json`` as each run ends (a rerun skips
the variants already there unless ``--retrain``).

    python benchmarks/sdde_protocol.py --variants de sdde lam0.5 k2 --seeds 0
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.mnist_ood import build_ood_sets  # noqa: E402
from sdde_serve.data import load_dataset  # noqa: E402

MNIST_TRAIN = ROOT.parent / "shared" / "data" / "mnist-train"
RESULTS = ROOT / "benchmarks" / "results" / "sdde_protocol.json"
SUBSET_SEED = 20261201

# name -> TrainConfig overrides on the base (method sdde unless it says otherwise)
VARIANTS: dict[str, dict[str, Any]] = {
    "de": {"method": "de"},
    "de-crop": {"method": "de", "augment": "crop"},
    "sdde": {},
    "sdde-stream": {"shared_source": "stream"},
    "sdde-crop": {"augment": "crop"},
    "sdde-crop-flip": {"augment": "crop-flip"},
    "lam0.01": {"lambda_div": 0.01},
    "lam0.05": {"lambda_div": 0.05},
    "lam0.5": {"lambda_div": 0.5},
    "lam1": {"lambda_div": 1.0},
    "k2": {"diversity_period": 2},
    "k4": {"diversity_period": 4},
    "s1/2": {"shared_batch": 0.5},
    "s1/4": {"shared_batch": 0.25},
    "k2-s1/2": {"diversity_period": 2, "shared_batch": 0.5},
    "k4-s1/2": {"diversity_period": 4, "shared_batch": 0.5},
    "warmup1": {"lambda_warmup_epochs": 1.0},
    "dice": {"method": "dice"},
}


def subset_spec(n: int, work: Path) -> str:
    data = load_dataset(str(MNIST_TRAIN), split="train")
    idx = np.sort(np.random.default_rng(SUBSET_SEED).permutation(len(data))[:n])
    path = work / f"mnist_train_{n}.npz"
    if not path.exists():
        np.savez(
            path,
            images=data.images[idx],
            labels=data.labels[idx],
            classes=np.array(data.classes),
        )
    return str(path)


def scores(logits: np.ndarray) -> dict[str, np.ndarray]:
    """OOD scores (higher = more in-distribution) from member logits ``[n, N, L]``."""
    mean = logits.mean(axis=1)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return {
        "mal": mean.max(-1),
        "msp": probs.mean(axis=1).max(-1),
        "minmax": logits.max(-1).min(-1),
    }


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    conf, pred = probs.max(-1), probs.argmax(-1)
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs(conf[m].mean() - (pred[m] == labels[m]).mean())
    return float(total)


def evaluate_run(run_dir: Path, ood: dict[str, np.ndarray]) -> dict[str, Any]:
    import torch

    from sdde_serve.evaluation.metrics import auroc, fpr_at_tpr
    from training.run import load_run

    run = load_run(run_dir, "best")
    shape = (run.config["data"]["channels"], run.config["data"]["height"], 28)

    def member_logits(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return np.concatenate(
                [
                    run.ensemble(torch.from_numpy(x[i : i + 512])).double().numpy()
                    for i in range(0, len(x), 512)
                ]
            )

    val_x = run.val.as_model_input(*shape)
    labels = np.asarray(run.val.labels)
    z = member_logits(val_x)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    probs = p.mean(axis=1)
    member_acc = (z.argmax(-1) == labels[:, None]).mean(0)
    out: dict[str, Any] = {
        "val_acc": float((probs.argmax(-1) == labels).mean()),
        "val_nll": float(-np.log(probs[np.arange(len(labels)), labels] + 1e-12).mean()),
        "val_ece": ece(probs, labels),
        "member_acc": [round(float(a), 4) for a in member_acc],
        "ood": {},
    }
    id_scores = scores(z)
    for name, images in ood.items():
        o = scores(member_logits(images))
        out["ood"][name] = {
            s: {"auroc": auroc(id_scores[s], o[s]), "fpr95": fpr_at_tpr(id_scores[s], o[s])}
            for s in id_scores
        }
    return out


def run_variant(
    name: str, seed: int, args: argparse.Namespace, spec: str, ood: dict, work: Path
) -> dict[str, Any]:
    import shutil

    from training.config import TrainConfig
    from training.trainer import train

    over = dict(VARIANTS[name])
    run_dir = work / "runs" / f"{name.replace('/', '_')}_s{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    base = dict(
        data=spec,
        arch="lenet",
        members=args.members,
        method="sdde",
        epochs=args.epochs,
        out=str(run_dir),
        batch_size=128,
        lr=0.1,
        lambda_div=0.1,
        lambda_warmup_epochs=0.0,  # the paper's protocol; the "warmup1" variant turns it on
        diversity_period=1,  # the paper's; the k variants change it
        diversity_pairs=0,  # the paper's all pairs (the trainer's default is 1 pair)
        shared_batch=1.0,  # the paper's; the s variants change it
        seed=seed,
        device="cpu",
        progress=False,
        cam_samples=0,
        eval_train_samples=0,
    )
    base.update(over)
    if base["method"] != "sdde":
        base["lambda_div"] = None
    train(TrainConfig(**base))
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    result = evaluate_run(run_dir, ood)
    result.update(
        variant=name,
        seed=seed,
        overrides=over,
        steps=last["step"],
        train_s=last["time_s"],
        step_s=last["time_s"] / max(1, last["step"]),
        val_member_acc_by_epoch=[r["val"]["member_acc"] for r in records],
    )
    shutil.rmtree(run_dir)  # checkpoints are not kept: the numbers are the result
    return result


def load_results() -> dict[str, Any]:
    if RESULTS.exists():
        return json.loads(RESULTS.read_text())
    return {"benchmark": "sdde_protocol", "runs": []}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--n", type=int, default=10000, help="training digits (subset of 60,000)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="/tmp/sdde_protocol")
    ap.add_argument("--retrain", action="store_true")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    spec = subset_spec(args.n, work)
    specs = build_ood_sets(work)
    ood = {
        k: load_dataset(specs[k]).as_model_input(1, 28, 28) for k in ("val-glyphs", "val-photos")
    }
    results = load_results()
    results["settings"] = {
        "n": args.n,
        "epochs": args.epochs,
        "members": args.members,
        "threads": args.threads,
        "arch": "lenet",
        "batch_size": 128,
        "base": "sdde, lambda 0.1, shared_source member, k 1, shared 1, augment none, "
        "no lambda warm-up",
        "torch": torch.__version__,
        "machine": platform.machine(),
        "command": "python benchmarks/sdde_protocol.py " + " ".join(argv or sys.argv[1:]),
    }
    done = {(r["variant"], r["seed"], r.get("epochs"), r.get("n")) for r in results["runs"]}
    for seed in args.seeds:
        for name in args.variants:
            if (name, seed, args.epochs, args.n) in done and not args.retrain:
                continue
            t0 = time.time()
            r = run_variant(name, seed, args, spec, ood, work)
            r.update(epochs=args.epochs, n=args.n, wall_s=round(time.time() - t0, 1))
            results["runs"] = [
                x
                for x in results["runs"]
                if (x["variant"], x["seed"], x.get("epochs"), x.get("n"))
                != (name, seed, args.epochs, args.n)
            ] + [r]
            RESULTS.write_text(json.dumps(results, indent=1))
            g, ph = r["ood"]["val-glyphs"], r["ood"]["val-photos"]
            print(
                f"{name:15s} s{seed} acc {100 * r['val_acc']:.2f} nll {r['val_nll']:.4f} "
                f"glyphs MAL {100 * g['mal']['auroc']:.2f} MSP {100 * g['msp']['auroc']:.2f} "
                f"minmax {100 * g['minmax']['auroc']:.2f} | photos MAL "
                f"{100 * ph['mal']['auroc']:.2f} | step {r['step_s']:.3f}s "
                f"members {r['member_acc']}",
                flush=True,
            )
    print(summary(results))
    return 0


def summary(results: dict[str, Any]) -> str:
    """Mean over seeds per variant (and the seed count), validation metrics only."""
    by: dict[str, list[dict]] = {}
    for r in results["runs"]:
        by.setdefault(r["variant"], []).append(r)
    lines = [
        "| variant | seeds | val acc | val NLL | val-glyphs AUROC MAL / MSP / minmax "
        "| val-photos AUROC MAL | step s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in VARIANTS:
        rs = by.get(name)
        if not rs:
            continue

        def m(f, rs=rs) -> float:
            v = [f(r) for r in rs]
            return float(np.mean(v)) if v else math.nan

        g = [
            m(lambda r, s=s: 100 * r["ood"]["val-glyphs"][s]["auroc"])
            for s in ("mal", "msp", "minmax")
        ]
        lines.append(
            f"| {name} | {len(rs)} | {100 * m(lambda r: r['val_acc']):.2f} "
            f"| {m(lambda r: r['val_nll']):.4f} | {g[0]:.2f} / {g[1]:.2f} / {g[2]:.2f} "
            f"| {m(lambda r: 100 * r['ood']['val-photos']['mal']['auroc']):.2f} "
            f"| {m(lambda r: r['step_s']):.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
