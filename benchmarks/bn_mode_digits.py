"""Which BatchNorm mode for SDDE's shared diversity batch: "eval" (official code) or "train"?

Trains small ensembles on the bundled digits set (28x28 gray, test split held out) with
``--method sdde`` and ``diversity_bn`` = eval / train, plus DE for reference, same seeds and
steps, and reports held-out ensemble accuracy, mean member accuracy, held-out CAM similarity
(eval mode, the paper's Figure-5 metric) and step time. JSON to benchmarks/results/.

The architecture is LeNet with a BatchNorm after each convolution ("lenet_bn", defined here):
LeNet itself has no BatchNorm (the two modes are then the same computation), and ResNet18_32
costs about a minute per SDDE step of 3 x 16 images on this shared 2-core CPU.

    .venv/bin/python benchmarks/bn_mode_digits.py            # ~3-5 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from sdde_serve.data import load_dataset  # noqa: E402
from training.ensemble import Ensemble  # noqa: E402
from training.methods import METHODS, StepBatch  # noqa: E402
from training.models import SplitModel  # noqa: E402
from training.saliency import cam_similarity  # noqa: E402


class LeNetBN(SplitModel):
    """LeNet (28x28) with BatchNorm after each convolution; saliency at conv2 as in LeNet."""

    stage_names = ("conv1", "conv2", "conv3")

    def __init__(self, num_classes: int = 10, in_chans: int = 1):
        super().__init__()

        def block(cin: int, cout: int, pad: int, pool: bool) -> nn.Sequential:
            layers = [nn.Conv2d(cin, cout, 5, padding=pad), nn.BatchNorm2d(cout), nn.ReLU()]
            return nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else []))

        self.block1 = block(in_chans, 6, 2, True)
        self.block2 = block(6, 16, 0, True)
        self.block3 = block(16, 120, 0, False)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes)
        )
        self._set_split(num_classes, in_chans, "conv2")

    def stage(self, name: str) -> nn.Module:
        return {"conv1": self.block1, "conv2": self.block2, "conv3": self.block3}[name]

    def classifier(self, x: Tensor) -> Tensor:
        return self.head(x)


def train_one(
    method: str,
    bn: str,
    seed: int,
    x: Tensor,
    y: Tensor,
    *,
    members: int,
    batch: int,
    epochs: int,
    lr: float,
) -> tuple[Ensemble, float]:
    torch.manual_seed(seed)
    mean, std = [float(x.mean())], [float(x.std())]
    ens = Ensemble([LeNetBN() for _ in range(members)], mean, std).train()
    opt = torch.optim.SGD(ens.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps_per_epoch = len(x) // batch
    total = steps_per_epoch * epochs
    # Per-step cosine decay to 1e-6, as the trainer does.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (1e-6 + (lr - 1e-6) * 0.5 * (1 + math.cos(math.pi * s / total))) / lr
    )
    cfg = SimpleNamespace(
        lambda_div=None, beta_oe=0.5, saliency="gradcam", diversity_bn=bn, adv_eps=0.01, extra={}
    )
    g = torch.Generator().manual_seed(seed)
    step_times = []
    for _ in range(epochs):
        orders = [torch.randperm(len(x), generator=g) for _ in range(members)]  # own data order
        for s in range(steps_per_epoch):
            idx = [o[s * batch : (s + 1) * batch] for o in orders]
            mb = [(x[i], y[i]) for i in idx]
            shared = mb[int(torch.randint(members, (1,), generator=g))]  # as the official code
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss, _ = METHODS[method].loss(ens, StepBatch(mb, shared, None), cfg)
            loss.backward()
            opt.step()
            sched.step()
            step_times.append(time.perf_counter() - t0)
    return ens.eval(), statistics.median(step_times)


@torch.no_grad()
def accuracy(ens: Ensemble, x: Tensor, y: Tensor) -> tuple[float, float]:
    logits = ens(x)  # [B, N, L]
    ens_pred = logits.softmax(-1).mean(1).argmax(-1)
    member_acc = (logits.argmax(-1) == y[:, None]).float().mean()
    return float((ens_pred == y).float().mean()), float(member_acc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bn_mode_digits.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    def tensors(split: str) -> tuple[Tensor, Tensor]:
        ds = load_dataset("digits", split=split)
        return torch.from_numpy(ds.as_model_input(1, 28, 28)), torch.from_numpy(ds.labels)

    x_tr, y_tr = tensors("train")
    x_te, y_te = tensors("test")
    runs = []
    for seed in args.seeds:
        for method, bn in (("de", "eval"), ("sdde", "eval"), ("sdde", "train")):
            ens, step_s = train_one(
                method,
                bn,
                seed,
                x_tr,
                y_tr,
                members=args.members,
                batch=args.batch,
                epochs=args.epochs,
                lr=args.lr,
            )
            acc, member_acc = accuracy(ens, x_te, y_te)
            cam = cam_similarity(ens, x_te, y_te)
            run = dict(
                method=method,
                diversity_bn=bn,
                seed=seed,
                test_ensemble_acc=acc,
                test_member_acc=member_acc,
                test_cam_similarity=cam,
                step_s_median=step_s,
            )
            runs.append(run)
            print(json.dumps(run), flush=True)

    summary = {}
    for method, bn in (("de", "eval"), ("sdde", "eval"), ("sdde", "train")):
        sel = [r for r in runs if r["method"] == method and r["diversity_bn"] == bn]
        key = method if method == "de" else f"sdde_bn_{bn}"
        summary[key] = {
            k: statistics.mean(r[k] for r in sel)
            for k in (
                "test_ensemble_acc",
                "test_member_acc",
                "test_cam_similarity",
                "step_s_median",
            )
        }
    report = {
        "benchmark": "bn_mode_digits",
        "args": {k: str(v) for k, v in vars(args).items()},
        "n_train": len(x_tr),
        "n_test": len(x_te),
        "runs": runs,
        "mean_over_seeds": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'variant':16s} {'ens acc':>8s} {'member acc':>10s} {'CAM sim':>8s} {'step s':>7s}")
    for key, s in summary.items():
        print(
            f"{key:16s} {s['test_ensemble_acc']:8.4f} {s['test_member_acc']:10.4f} "
            f"{s['test_cam_similarity']:8.4f} {s['step_s_median']:7.3f}"
        )
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
