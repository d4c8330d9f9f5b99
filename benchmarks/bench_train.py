"""Training step cost: SDDE over DE, GradCAM over input-gradient saliency, fused (vmap) over loop.

One optimizer step = zero_grad + loss + backward + SGD step, on synthetic data (pixel values do
not change the arithmetic). Variants run interleaved, one step each per round, so load drift
on a shared machine hits them alike; the table and the ratios use each variant's fastest round
(other jobs only add time), the JSON also keeps the medians and every round.

    .venv/bin/python benchmarks/bench_train.py                      # defaults: ~5 min on 2 cores
    .venv/bin/python benchmarks/bench_train.py --resnet-batch 128  # paper batch (slow)

Derived numbers:
* ``sdde_over_de``: SDDE (GradCAM) step time / DE step time (goal on CPU: <= 1.5x).
* ``inputgrad_over_gradcam``: cost of the diversity term, (SDDE-inputgrad − DE) / (SDDE − DE),
  i.e. how much more the input-gradient saliency costs than GradCAM (paper: GradCAM 2.4x faster).
* ``fused_over_loop``: fused backend step time / loop backend step time (< 1: fused is faster).
* ``sdde_shared_quarter_over_de``: SDDE with a shared batch of 1/4 of the member batch, over DE
  (not the paper's setting; shows how the diversity cost scales with the shared batch).
* ``<variant>_over_de`` (and ``<variant>_over_de_round_median``, the median over rounds of the
  round's ratio) for every SDDE cost lever: ``sdde_k2``/``sdde_k4`` (the diversity term
  every 2nd/4th step, ``--diversity-period``; one round is k steps, the first with the term,
  timed together and divided by k), ``sdde_shared_1/2``/``1/4`` (``--shared-batch``) and their
  combinations; ``sdde_pairs1``/``sdde_pairs2`` (``--diversity-pairs``: the term on 1 or 2
  random member pairs, maps only for their members) and ``sdde_pairs1_k2`` (with
  ``--diversity-period 2``). The goal for the default SDDE setting is <= 1.3x DE.

    .venv/bin/python benchmarks/bench_train.py --variants de sdde sdde_k2 sdde_k4 \
        sdde_shared_1/2 sdde_shared_1/4 sdde_k2_shared_1/2 --out benchmarks/results/X.json
    .venv/bin/python benchmarks/bench_train.py --variants de sdde sdde_pairs1 sdde_pairs2 \
        sdde_pairs1_k2 --skip-resnet --out benchmarks/results/bench_train_pairs.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from training.ensemble import build_ensemble  # noqa: E402
from training.methods import METHODS, StepBatch  # noqa: E402

# label -> (method, saliency, backend, shared batch as a fraction of the member batch,
#           diversity period k[, member pairs P per step, 0: all])
VARIANTS: dict[str, tuple] = {
    "de": ("de", "gradcam", "loop", 1.0, 1),
    "sdde": ("sdde", "gradcam", "loop", 1.0, 1),
    "sdde_inputgrad": ("sdde", "inputgrad", "loop", 1.0, 1),
    "de_fused": ("de", "gradcam", "fused", 1.0, 1),
    "sdde_fused": ("sdde", "gradcam", "fused", 1.0, 1),
    # The cost levers (docs/training-methods.md, "Cost"): shared batch and diversity period.
    "sdde_shared_1/2": ("sdde", "gradcam", "loop", 0.5, 1),
    "sdde_shared_1/4": ("sdde", "gradcam", "loop", 0.25, 1),
    "sdde_k2": ("sdde", "gradcam", "loop", 1.0, 2),
    "sdde_k4": ("sdde", "gradcam", "loop", 1.0, 4),
    "sdde_k2_shared_1/2": ("sdde", "gradcam", "loop", 0.5, 2),
    "sdde_k4_shared_1/2": ("sdde", "gradcam", "loop", 0.5, 4),
    # --diversity-pairs P: the term on P random member pairs, maps only for their members
    "sdde_pairs1": ("sdde", "gradcam", "loop", 1.0, 1, 1),
    "sdde_pairs2": ("sdde", "gradcam", "loop", 1.0, 1, 2),
    "sdde_pairs1_k2": ("sdde", "gradcam", "loop", 1.0, 2, 1),
}
DEFAULT_VARIANTS = ("de", "sdde", "sdde_inputgrad", "de_fused", "sdde_fused", "sdde_shared_1/4")


def run_arch(
    arch: str,
    *,
    size: int,
    chans: int,
    batch: int,
    members: int,
    steps: int,
    warmup: int,
    variants: list[str],
) -> dict[str, object]:
    torch.manual_seed(0)
    base = build_ensemble(
        arch,
        members=members,
        num_classes=10,
        in_chans=chans,
        mean=[0.5] * chans,
        std=[0.25] * chans,
    ).train()
    g = torch.Generator().manual_seed(0)
    member_batches = [
        (
            torch.rand(batch, chans, size, size, generator=g),
            torch.randint(0, 10, (batch,), generator=g),
        )
        for _ in range(members)
    ]
    shared = (
        torch.rand(batch, chans, size, size, generator=g),
        torch.randint(0, 10, (batch,), generator=g),
    )
    step_batches = {
        frac: StepBatch(
            member_batches, (shared[0][: int(batch * frac)], shared[1][: int(batch * frac)])
        )
        for frac in {VARIANTS[v][3] for v in variants}
    }
    no_term = StepBatch(member_batches, None)  # a step the diversity period skips
    # One ensemble per backend (same weights); each variant gets its own optimizer state.
    ensembles = {"loop": base, "fused": _clone(base).set_backend("fused")}
    optims = {
        v: torch.optim.SGD(
            ensembles[VARIANTS[v][2]].parameters(), lr=1e-3, momentum=0.9, nesterov=True
        )
        for v in variants
    }
    times: dict[str, list[float]] = {v: [] for v in variants}
    for round_ in range(warmup + steps):
        for v in variants:
            method, saliency, backend, frac, period, *pairs = VARIANTS[v]
            ens, opt = ensembles[backend], optims[v]
            cfg = SimpleNamespace(
                lambda_div=None,
                beta_oe=0.5,
                saliency=saliency,
                diversity_bn="eval",
                adv_eps=0.01,
                seed=0,
                diversity_pairs=pairs[0] if pairs else 0,
                extra={},
            )
            t0 = time.perf_counter()
            for i in range(period):  # k steps, the first with the diversity term
                opt.zero_grad(set_to_none=True)
                # the step number draws the pairs of --diversity-pairs: a new draw every round
                this = step_batches[frac] if i == 0 else no_term
                this = dataclasses.replace(this, step=round_ * period + i)
                loss, _ = METHODS[method].loss(ens, this, cfg)
                loss.backward()
                opt.step()
            dt = (time.perf_counter() - t0) / period
            if round_ >= warmup:
                times[v].append(dt)
            print(f"  {arch} {v:15s} round {round_} {dt:8.3f}s", flush=True)
    # Ratios use the fastest round: on a shared machine other jobs only ever add time, so the
    # minimum is the least noisy estimate of a variant's own cost (medians are kept too).
    med = {v: min(ts) for v, ts in times.items()}
    out: dict[str, object] = {
        "arch": arch,
        "input": [chans, size, size],
        "members": members,
        "batch_per_member": batch,
        "steps": steps,
        "warmup": warmup,
        "step_s_min": med,
        "step_s_median": {v: statistics.median(ts) for v, ts in times.items()},
        "step_s_all": times,
    }
    derived: dict[str, float] = {}
    if "sdde" in med and "de" in med:
        derived["sdde_over_de"] = med["sdde"] / med["de"]
    if {"sdde", "sdde_inputgrad", "de"} <= med.keys():
        gc, ig = med["sdde"] - med["de"], med["sdde_inputgrad"] - med["de"]
        derived["gradcam_term_s"] = gc
        derived["inputgrad_term_s"] = ig
        derived["inputgrad_over_gradcam"] = ig / gc if gc > 0 else float("nan")
        derived["sdde_inputgrad_over_sdde_step"] = med["sdde_inputgrad"] / med["sdde"]
    if "de_fused" in med and "de" in med:
        derived["de_fused_over_loop"] = med["de_fused"] / med["de"]
    if "sdde_fused" in med and "sdde" in med:
        derived["sdde_fused_over_loop"] = med["sdde_fused"] / med["sdde"]
    if "sdde_shared_1/4" in med and "de" in med:
        derived["sdde_shared_quarter_over_de"] = med["sdde_shared_1/4"] / med["de"]
    for v in med:
        if v.startswith("sdde") and "de" in med:
            derived[f"{v}_over_de"] = med[v] / med["de"]
            # The same ratio round by round (DE and the variant ran back to back, so a load
            # change hits both), then the median: steadier than fastest-over-fastest when
            # the load drifts during the run.
            paired = [t / d for t, d in zip(times[v], times["de"], strict=True)]
            derived[f"{v}_over_de_round_median"] = statistics.median(paired)
    out["derived"] = derived
    return out


def _clone(ens):
    import copy

    return copy.deepcopy(ens)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=7, help="timed LeNet rounds per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--members", type=int, default=5)
    p.add_argument("--lenet-batch", type=int, default=128, help="batch per member for LeNet")
    p.add_argument(
        "--resnet-batch",
        type=int,
        default=8,
        help="batch per member for ResNet18_32 (128 is the paper's; minutes per step on 2 cores)",
    )
    p.add_argument("--resnet-steps", type=int, default=3, help="timed ResNet18_32 rounds")
    p.add_argument(
        "--resnet-fused", action="store_true", help="also time the fused backend on ResNet"
    )
    p.add_argument("--skip-resnet", action="store_true")
    p.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=None,
        help="(default: the classic set)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bench_train.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    results = []
    print(f"LeNet x{args.members}, 28x28 gray, batch {args.lenet_batch}/member", flush=True)
    results.append(
        run_arch(
            "lenet",
            size=28,
            chans=1,
            batch=args.lenet_batch,
            members=args.members,
            steps=args.steps,
            warmup=args.warmup,
            variants=list(args.variants or DEFAULT_VARIANTS),
        )
    )
    if not args.skip_resnet:
        variants = ["de", "sdde", "sdde_inputgrad", "sdde_shared_1/4"]
        if args.resnet_fused:
            variants += ["de_fused", "sdde_fused"]
        if args.variants:  # the same levers as LeNet (the fused backend only on request)
            variants = [v for v in args.variants if "fused" not in v or args.resnet_fused]
        print(
            f"ResNet18_32 x{args.members}, 32x32 RGB, batch {args.resnet_batch}/member", flush=True
        )
        results.append(
            run_arch(
                "resnet18_32",
                size=32,
                chans=3,
                batch=args.resnet_batch,
                members=args.members,
                steps=args.resnet_steps,
                warmup=args.warmup,
                variants=variants,
            )
        )

    report = {
        "benchmark": "bench_train",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_at_end": os.getloadavg(),
        "machine": platform.machine(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    print()
    print(f"{'arch':12s} {'batch':>5s} " + " ".join(f"{v:>15s}" for v in VARIANTS))
    for r in results:
        med = r["step_s_min"]
        cells = " ".join(f"{med[v]:14.3f}s" if v in med else f"{'-':>15s}" for v in VARIANTS)
        print(f"{r['arch']:12s} {r['batch_per_member']:5d} {cells}")
    print()
    for r in results:
        for k, v in r["derived"].items():
            print(f"{r['arch']:12s} {k:30s} {v:8.3f}")
    print(f"\nthreads={report['threads']} load_avg={report['load_avg_at_end']} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
