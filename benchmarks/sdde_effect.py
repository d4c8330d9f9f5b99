"""SDDE vs Deep Ensembles, side by side: held-out accuracy, NLL and GradCAM similarity.

The paper's Figure 5 effect at settings larger than the unit test's
(tests/training/test_sdde_effect.py): same seeds, epochs and data order for both methods; the
held-out set is the data spec's test split (digits@test by default; never used in training).

    python benchmarks/sdde_effect.py                       # digits, 3 LeNets, 8 epochs, seed 0
    python benchmarks/sdde_effect.py --members 5 --epochs 15 --seeds 0 1 2
    python benchmarks/sdde_effect.py --data ../shared/data/mnist --epochs 3

Prints a table and writes benchmarks/results/sdde_effect.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from sdde_serve.data import load_dataset
from training.config import TrainConfig
from training.run import load_run
from training.saliency import cam_similarity
from training.trainer import train

RESULTS = Path(__file__).resolve().parent / "results" / "sdde_effect.json"


def held_out(run_dir: Path, spec: str) -> dict[str, float]:
    loaded = load_run(run_dir, "last")
    data = loaded.config["data"]
    base = spec.rsplit("@", 1)[0] if "@" in spec else spec
    test = load_dataset(f"{base}@test")
    x = torch.from_numpy(test.as_model_input(data["channels"], data["height"], data["width"]))
    y = torch.from_numpy(test.labels)
    ens = loaded.ensemble
    with torch.no_grad():
        probs = torch.cat([ens(x[i : i + 512]).softmax(-1).mean(1) for i in range(0, len(x), 512)])
    n = min(len(x), 2000)  # CAM similarity on up to 2000 held-out images
    return {
        "accuracy": float((probs.argmax(-1) == y).double().mean()),
        "nll": float(-probs.gather(1, y[:, None]).clamp_min(1e-12).log().double().mean()),
        "cam_similarity": cam_similarity(ens, x[:n], y[:n]),
        "n_test": len(x),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="digits")
    p.add_argument("--arch", default="lenet")
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for method in ("de", "sdde"):
                cfg = TrainConfig(
                    data=args.data,
                    arch=args.arch,
                    members=args.members,
                    method=method,
                    epochs=args.epochs,
                    batch_size=args.batch_size,
                    seed=seed,
                    out=f"{tmp}/{method}-{seed}",
                    progress=False,
                    cam_samples=0,
                    eval_train_samples=0,
                )
                t0 = time.perf_counter()
                run = train(cfg)
                seconds = time.perf_counter() - t0
                rows.append(
                    {
                        "method": method,
                        "seed": seed,
                        "train_s": round(seconds, 1),
                        **held_out(run, args.data),
                    }
                )

    print(f"\n{'method':<6} {'seed':>4} {'acc %':>7} {'nll':>7} {'CAM sim':>8} {'train s':>8}")
    for r in rows:
        print(
            f"{r['method']:<6} {r['seed']:>4} {100 * r['accuracy']:>7.2f} {r['nll']:>7.4f} "
            f"{r['cam_similarity']:>+8.3f} {r['train_s']:>8.1f}"
        )
    for method in ("de", "sdde"):
        sel = [r for r in rows if r["method"] == method]
        acc = sum(r["accuracy"] for r in sel) / len(sel)
        cam = sum(r["cam_similarity"] for r in sel) / len(sel)
        print(f"{method:<6} mean {100 * acc:>7.2f} {'':>7} {cam:>+8.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {
        "benchmark": "sdde_effect",
        "settings": settings,
        "rows": rows,
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "processor": platform.processor() or platform.machine(),
        },
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
