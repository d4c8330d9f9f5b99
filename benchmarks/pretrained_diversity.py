"""Member diversity when every member starts from the same pretrained weights: DE vs SDDE.

A colour image folder with class subfolders (e.g. CIFAR-10's test folder) is split by class:
the last ``--pretrain-classes`` classes pretrain one ResNet-20 (its weights become the shared
``--pretrained`` file: another class count, so every member gets its own fresh head); the
other classes train three ensembles for the same epochs and seed: DE from scratch, DE from the
file, SDDE from the file. Held-out images of the fine-tuning classes (never trained on) give
accuracy, pairwise disagreement (Fort et al. 2019) and GradCAM similarity (the paper's Fig. 5),
before training (``start``) and after it.

    python benchmarks/pretrained_diversity.py --folder /path/to/cifar10/test

Prints a table and writes benchmarks/results/pretrained_diversity.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from sdde_serve.data import ArrayDataset, load_dataset
from sdde_serve.evaluation.diversity import pairwise_disagreement
from training import data as D
from training.config import TrainConfig
from training.ensemble import Ensemble, build_ensemble
from training.run import load_run
from training.saliency import cam_similarity
from training.trainer import train

RESULTS = Path(__file__).resolve().parent / "results"
ARCH = "resnet20"
RUNS = {"de-scratch": "de", "de-pretrained": "de", "sdde-pretrained": "sdde"}  # name -> method


def save_npz(ds: ArrayDataset, idx: np.ndarray, classes: list[int], path: Path) -> str:
    """The images ``idx`` with labels renumbered 0..len(classes)-1."""
    labels = np.searchsorted(np.array(classes), ds.labels[idx])
    names = np.array([ds.classes[c] for c in classes])
    np.savez(path, images=ds.images[idx], labels=labels, classes=names)
    return str(path)


def split_by_class(ds: ArrayDataset, args, work: Path) -> tuple[str, str, ArrayDataset]:
    """(pretrain npz, fine-tune npz, held-out fine-tune-class images)."""
    n_cls = len(ds.classes)
    pre_cls = list(range(n_cls - args.pretrain_classes, n_cls))
    fine_cls = list(range(n_cls - args.pretrain_classes))
    rng = np.random.default_rng(0)
    per = {c: rng.permutation(np.flatnonzero(ds.labels == c)) for c in range(n_cls)}
    pre_idx = np.concatenate([per[c][: args.per_class] for c in pre_cls])
    fine_idx = np.concatenate([per[c][: args.per_class] for c in fine_cls])
    held_idx = np.concatenate(
        [per[c][args.per_class : args.per_class + args.held_out] for c in fine_cls]
    )
    labels = np.searchsorted(np.array(fine_cls), ds.labels[held_idx])
    held = ArrayDataset("held-out", ds.images[held_idx], labels, [ds.classes[c] for c in fine_cls])
    pre = save_npz(ds, pre_idx, pre_cls, work / "pretrain.npz")
    return pre, save_npz(ds, fine_idx, fine_cls, work / "finetune.npz"), held


def config(data: str, out: Path, args, **kw) -> TrainConfig:
    base = dict(data=data, arch=ARCH, members=args.members, epochs=args.epochs, seed=args.seed)
    base.update(batch_size=args.batch_size, cam_samples=0, eval_train_samples=0, progress=False)
    return TrainConfig(**{**base, "out": str(out), **kw})


def pretrain(data: str, work: Path, args) -> Path:
    """One ResNet-20 on the pretraining classes; its member-0 weights as a plain state dict."""
    run = Path(train(config(data, work / "pre", args, members=1, method="de")))
    weights = load_file(str(run / "last.safetensors"))
    state = {
        k.removeprefix("members.0."): v for k, v in weights.items() if k.startswith("members.0.")
    }
    path = work / "pretrained.pt"
    torch.save(state, path)
    return path


def measure(ens: Ensemble, held: ArrayDataset) -> dict[str, float]:
    x = torch.from_numpy(held.as_model_input(3, 32, 32))
    y = torch.from_numpy(held.labels)
    ens.eval()
    with torch.no_grad():
        logits = ens(x)  # [B, N, L]
    probs = logits.softmax(-1).mean(1)
    return {
        "accuracy": float((probs.argmax(-1) == y).double().mean()),
        "member_accuracy": float((logits.argmax(-1) == y[:, None]).double().mean()),
        "disagreement": pairwise_disagreement(logits.argmax(-1).numpy()),
        "cam_similarity": cam_similarity(ens, x, y),
    }


def start_state(data: str, weights: Path | None, args, held: ArrayDataset) -> dict[str, float]:
    """The ensemble the trainer starts from (same seed, same construction), before any step."""
    full = load_dataset(data)
    mean, std = D.channel_stats(D.to_tensors(full, 3, 32).x)  # ~ the trainer's (train split)
    torch.manual_seed(args.seed)
    ens = build_ensemble(
        ARCH,
        members=args.members,
        num_classes=len(full.classes),
        in_chans=3,
        mean=mean,
        std=std,
        pretrained=None if weights is None else str(weights),
    )
    return measure(ens, held)


def run_one(name: str, data: str, weights: Path, args, held: ArrayDataset) -> dict:
    """Train run ``name`` (``RUNS``), measure it at its start and end, print one line."""
    method, start = RUNS[name], weights if name.endswith("pretrained") else None
    extra = {"lambda_div": args.lambda_div} if method == "sdde" else {}
    pretrained = None if start is None else str(start)
    t = time.perf_counter()
    cfg = config(data, Path(args.work) / name, args, method=method, pretrained=pretrained, **extra)
    run = load_run(train(cfg), "last")
    row = {
        "start": start_state(data, start, args, held),
        "end": measure(run.ensemble, held),
        "train_s": round(time.perf_counter() - t, 1),
    }
    end, first = row["end"], row["start"]
    print(
        f"{name:16s} acc {end['accuracy']:.3f} (member {end['member_accuracy']:.3f})  "
        f"disagreement {first['disagreement']:.3f} -> {end['disagreement']:.3f}  "
        f"CAM sim {first['cam_similarity']:.3f} -> {end['cam_similarity']:.3f}  "
        f"{row['train_s']} s"
    )
    return row


def cpu_name() -> str:
    """The CPU model (Linux), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", required=True, help="colour image folder with class subfolders")
    p.add_argument("--pretrain-classes", type=int, default=4)
    p.add_argument("--per-class", type=int, default=250, help="training images per class")
    p.add_argument("--held-out", type=int, default=150, help="held-out images per class")
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--pretrain-epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    p.add_argument("--lambda-div", type=float, default=None, help="SDDE's λ (None: default)")
    p.add_argument("--tag", default="", help="suffix of the results file name")
    args = p.parse_args()
    torch.set_num_threads(1)  # a shared 2-core machine
    work = Path(tempfile.mkdtemp(prefix="pretrained_diversity_"))
    args.work = str(work)
    pre_data, fine_data, held = split_by_class(load_dataset(args.folder), args, work)
    t0 = time.perf_counter()
    pre_args = argparse.Namespace(**{**vars(args), "epochs": args.pretrain_epochs})
    weights = pretrain(pre_data, work, pre_args)
    rows = {name: run_one(name, fine_data, weights, args, held) for name in args.runs}
    result = {
        "settings": vars(args),
        "n_held_out": len(held),
        "runs": rows,
        "total_s": round(time.perf_counter() - t0, 1),
        "cpu": cpu_name(),
        "torch_threads": torch.get_num_threads(),
    }
    path = RESULTS / f"pretrained_diversity{args.tag}.json"
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
