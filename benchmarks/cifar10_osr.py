"""Open-set CIFAR-10: DE vs SDDE on natural colour images, every OOD score near and far.

What it does (docs/evaluation.md, "The CIFAR-10 open-set benchmark"):

1. Splits CIFAR-10 (a directory with ``train/`` and ``test/`` class folders of images, or the
   ``train.tar.gz`` / ``test.tar.gz`` archives of them, unpacked into ``--work``) into

   * known classes (trained on): ``--known``, by default airplane, automobile, bird, deer, dog,
     truck - a fixed 6/4 split in the style of the open-set recognition literature; the model is
     trained on (a seeded per-class subset, ``--train-per-class``, of) their training images and
     tested on all their test images;
   * validation OOD (``--val-class``, default horse): that unknown class's *training* images,
     passed to ``sdde export --ood-val``, so the deployed score and KNN k are chosen on it;
   * near-OOD test: the other three unknown classes' *test* images (cat, frog, ship by default);
   * far-OOD test: MNIST test digits (grey to RGB, resized to 32x32; ``--mnist`` an IDX
     directory) and, when scikit-image is installed, crops of its textures (brick, grass,
     gravel) and photographs (camera, astronaut, coffee, clock, moon, rocket) - all offline.

2. Trains DE and SDDE ensembles (``--arch``, ``--members``, ``--epochs``) per seed with
   ``training.trainer.train`` (the default crop+flip augmentation of colour data), exports each
   with ``sdde export --ood-val`` and evaluates the exported file with ``sdde eval`` (all scores
   side by side, calibration before/after T, member diversity, ``--members-sweep``: the first
   member alone is the single-model floor). The known-class test set and the near-OOD sets are
   folders of the original image files, so ``sdde eval`` decodes them as the server does.

3. Issue 22's goal: every candidate of export's ``auto`` (the registry's, as export derives
   them) scored on the test known-class images against the near and far sets, beside the one
   ``auto`` deployed (:func:`candidate_table`); the summary's ``candidates`` has each one's mean
   over seeds, the best single candidate by near FPR@95 and the auto pick's gap to it in points.

4. Each (method, seed) run's result is kept in ``WORK/runs/NAME/result.json``; a rerun skips
   finished runs (and finished training), only adding the candidates table to a result that
   lacks it (from the saved run and its exported model: no retraining, no re-export).
   Writes ``benchmarks/results/cifar10_osr*.json``.

    python benchmarks/cifar10_osr.py --cifar DIR --mnist DIR --work /tmp/cifar10-osr \\
        --arch lenet --epochs 10 --train-per-class 2000 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdde_serve.data import load_dataset  # noqa: E402
from sdde_serve.errors import UserError  # noqa: E402

if TYPE_CHECKING:
    from export.choice import OODChoice
    from sdde_serve.manifest import Manifest
    from training.config import TrainConfig

CIFAR10 = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
KNOWN = ("airplane", "automobile", "bird", "deer", "dog", "truck")
VAL_CLASS = "horse"
SIZE = 32
SPLIT_SEED = 20261204
FAR_N = 2000
VAL_OOD_N = 2000
METHODS = ("de", "sdde")
SCORES = ("mal", "msp", "minmax", "knn")
OUT = ROOT / "benchmarks" / "results" / "cifar10_osr.json"


# --- the split ----------------------------------------------------------------------------------


def cifar_root(given: Path, work: Path) -> Path:
    """``given`` itself when it holds ``train/`` and ``test/``; else its archives, unpacked once."""
    if (given / "train").is_dir() and (given / "test").is_dir():
        return given
    target = work / "cifar10"
    for part in ("train", "test"):
        if (target / part).is_dir():
            continue
        archive = given / f"{part}.tar.gz"
        if not archive.is_file():
            raise UserError(f"{given}: neither {part}/ nor {part}.tar.gz")
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
    return target


def link_classes(src: Path, classes: list[str], dest: Path) -> str:
    """A folder spec of ``classes`` (symlinks to ``src/CLASS``): labels follow ``classes``'
    sorted order, as every folder spec's do."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in classes:
        if not (src / name).is_dir():
            raise UserError(f"{src}: no class folder {name!r}")
        link = dest / name
        if not link.exists():
            link.symlink_to((src / name).resolve(), target_is_directory=True)
    return str(dest)


def subset_npz(spec: str, per_class: int | None, seed: int, path: Path) -> tuple[str, int]:
    """A seeded per-class subset of a folder spec, written as ``.npz`` (decoded once)."""
    data = load_dataset(spec)
    if data.labels is None:
        raise UserError(f"{spec}: expected class folders")
    rng = np.random.default_rng(seed)
    keep = []
    for c in range(len(data.classes)):
        idx = np.flatnonzero(data.labels == c)
        keep.append(np.sort(rng.permutation(idx)[:per_class]) if per_class else idx)
    idx = np.sort(np.concatenate(keep))
    np.savez(path, images=data.images[idx], labels=data.labels[idx], classes=np.array(data.classes))
    return str(path), len(idx)


def make_split(
    root: Path, work: Path, known: list[str], val_class: str, per_class: int | None
) -> dict[str, Any]:
    """Every data spec of the benchmark (see the module docstring); unknown = the rest."""
    if val_class in known or val_class not in CIFAR10 or len(set(known)) != len(known):
        raise UserError(f"--val-class {val_class!r} must be a CIFAR-10 class outside --known")
    unknown = [c for c in CIFAR10 if c not in known]
    near = [c for c in unknown if c != val_class]
    data = work / "data"
    train_dir = link_classes(root / "train", sorted(known), data / "train_known")
    train, n_train = subset_npz(train_dir, per_class, SPLIT_SEED, data / "train.npz")
    val_dir = link_classes(root / "train", [val_class], data / "val_ood")
    val_ood, _ = subset_npz(val_dir, VAL_OOD_N, SPLIT_SEED + 1, data / "val_ood.npz")
    return {
        "known": sorted(known),
        "unknown": unknown,
        "train": train,
        "train_images": n_train,
        "test": link_classes(root / "test", sorted(known), data / "test_known"),
        "val_ood": {val_class: val_ood},
        "near": {c: link_classes(root / "test", [c], data / f"near_{c}") for c in near},
    }


# --- far OOD ------------------------------------------------------------------------------------


def _rgb(img: np.ndarray) -> Image.Image:
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    pil = Image.fromarray(np.ascontiguousarray(img[..., :3] if img.ndim == 3 else img))
    return pil.convert("RGB")


def random_crops(images: list[np.ndarray], n: int, seed: int) -> np.ndarray:
    """``n`` random square crops (side 32..128 px) resized to 32x32 RGB, NCHW uint8."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 3, SIZE, SIZE), np.uint8)
    for i in range(n):
        img = images[i % len(images)]
        side = int(rng.integers(SIZE, min(128, *img.shape[:2]) + 1))
        y = int(rng.integers(0, img.shape[0] - side + 1))
        x = int(rng.integers(0, img.shape[1] - side + 1))
        patch = _rgb(img[y : y + side, x : x + side]).resize(
            (SIZE, SIZE), Image.Resampling.BILINEAR
        )
        out[i] = np.asarray(patch).transpose(2, 0, 1)
    return out


def mnist_rgb(mnist_dir: str, n: int, seed: int) -> np.ndarray:
    """``n`` seeded MNIST test digits, grey to RGB, bilinear 28 -> 32, NCHW uint8."""
    digits = load_dataset(mnist_dir, split="test").images[:, 0]
    idx = np.sort(np.random.default_rng(seed).permutation(len(digits))[:n])
    out = [
        np.asarray(_rgb(d).resize((SIZE, SIZE), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
        for d in digits[idx]
    ]
    return np.stack(out)


def skimage_sets(n: int) -> dict[str, np.ndarray]:
    """Textures and photographs shipped with scikit-image (no download); {} without it."""
    try:
        import skimage.data as sk
    except ImportError:
        return {}
    textures = [sk.brick(), sk.grass(), sk.gravel()]
    # no chelsea: a cat photo is the near-OOD class 'cat', not far OOD
    photos = [getattr(sk, p)() for p in ("camera", "astronaut", "coffee", "clock", "moon")]
    photos.append(sk.rocket())
    return {"textures": random_crops(textures, n, 5), "photos": random_crops(photos, n, 6)}


def make_far(mnist_dir: str | None, work: Path) -> dict[str, str]:
    sets = skimage_sets(FAR_N)
    if mnist_dir:
        sets = {"mnist": mnist_rgb(mnist_dir, FAR_N, 7), **sets}
    specs = {}
    for name, images in sets.items():
        path = work / "data" / f"far_{name}.npz"
        np.savez(path, images=images)
        specs[name] = str(path)
    return specs


# --- one run: train (library), export and eval (the sdde CLI) -----------------------------------


def sdde(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "sdde_serve", *args]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)


def train_config(
    method: str, seed: int, args: argparse.Namespace, train: str, out: Path
) -> TrainConfig:
    from training.config import TrainConfig

    return TrainConfig(
        data=train,
        arch=args.arch,
        members=args.members,
        method=method,
        epochs=args.epochs,
        out=str(out),
        batch_size=args.batch_size,
        lr=args.lr,
        seed=seed,
        max_steps=args.max_steps,
        device="cpu",
        progress=False,
        # the per-epoch CAM comparison costs a GradCAM pass; sdde eval measures CAMs anyway
        cam_samples=0,
        eval_train_samples=256,
        lambda_div=args.lambda_div if method == "sdde" else None,
    )


def epoch_seconds(run_dir: Path) -> list[float]:
    """Training seconds of each epoch, from the run's cumulative clock (metrics.jsonl)."""
    times = [
        float(json.loads(line)["time_s"])
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if line.strip() and "time_s" in json.loads(line)
    ]
    return list(np.diff([0.0, *times]))


def training_done(run_dir: Path, epochs: int) -> bool:
    log = run_dir / "metrics.jsonl"
    return log.exists() and len(epoch_seconds(run_dir)) >= epochs


def eval_args(split: dict[str, Any], far: dict[str, str]) -> list[str]:
    out = ["--data", split["test"]]
    for name, spec in {**split["near"], **far}.items():
        out += ["--ood", f"{name}={spec}"]
    out += ["--group", "near=" + ",".join(split["near"])]
    if far:
        out += ["--group", "far=" + ",".join(far)]
    return out


def run_one(
    method: str, seed: int, args: argparse.Namespace, split: dict[str, Any], far: dict[str, str]
) -> dict[str, Any]:
    from training.run import stuck_at_end
    from training.trainer import train

    name = f"{method}_s{seed}"
    run_dir = args.work / "runs" / name
    done = run_dir / "result.json"
    model = args.work / "models" / f"{name}.onnx"
    if done.exists():
        result = json.loads(done.read_text())
        # what a run finished before these were recorded lacks
        added: dict[str, Any] = {}
        if "candidates" not in result:
            added["candidates"] = candidate_table(run_dir, model, split, far)
        if "stuck_members_at_end" not in result:
            added["stuck_members_at_end"] = stuck_at_end(run_dir)
        what = f"adding {', '.join(added)}" if added else "kept"
        print(f"  {name}: finished earlier, {what}", flush=True)
        if added:
            done.write_text(json.dumps({**result, **added}, indent=1, default=str))
        return {**result, **added}
    if not training_done(run_dir, args.epochs):
        cfg = train_config(method, seed, args, split["train"], run_dir)
        cfg.resume = (run_dir / "config.json").exists()  # an interrupted run goes on
        train(cfg)
    t0 = time.time()
    val = [f"{k}={v}" for k, v in split["val_ood"].items()]
    sdde("export", str(run_dir), "-o", str(model), "--ood-val", *val, "--name", f"c10osr-{name}")
    t_export = time.time() - t0
    report = args.work / "reports" / name
    t0 = time.time()
    sdde(
        "eval", str(model), *eval_args(split, far), "--out-dir", str(report), "--no-plots",
        "--cams-from-run", str(run_dir), "--cam-images", str(args.cam_images), "--members-sweep",
    )  # fmt: skip
    result = {
        "method": method,
        "seed": seed,
        "config": json.loads((run_dir / "config.json").read_text()),  # the run's header
        "epoch_seconds": epoch_seconds(run_dir),
        "seconds": {"export": t_export, "eval": time.time() - t0},
        "metrics": json.loads((report / "metrics.json").read_text()),
        "candidates": candidate_table(run_dir, model, split, far),
        # members the dead-member guard left below the line (issue 23: none should be)
        "stuck_members_at_end": stuck_at_end(run_dir),
    }
    done.write_text(json.dumps(result, indent=1, default=str))
    return result


# --- every auto candidate on the test sets (issue 22's goal) -------------------------------------


def candidate_table(
    run_dir: Path, model: Path, split: dict[str, Any], far: dict[str, str]
) -> dict[str, Any]:
    """Every candidate of the export's ``auto`` scored on the test known-class images against
    the near and far sets (AUROC and FPR@95, unweighted mean over a group's sets, as ``sdde
    eval``'s groups), and the one export deployed, read from the model's manifest."""
    from export.choice import score_inputs
    from export.select import candidate_name, candidate_scores
    from sdde_serve.manifest import load_onnx, read_manifest

    if not model.is_file():
        raise UserError(f"{model}: no exported model for the run {run_dir}; rerun it")
    m = read_manifest(load_onnx(model))
    if m.knn is None or m.ood.selection is None:
        raise UserError(f"{model}: exported without a KNN bank or a score choice")
    ens, choice, opts = export_candidates(run_dir, m, split["val_ood"])
    shape = (m.input.channels, m.input.height, m.input.width)

    def scored(spec: str) -> dict[str, np.ndarray]:
        data = load_dataset(spec, split="test", model=m.input)  # files decoded as sdde eval does
        return candidate_scores(score_inputs(ens, data.as_model_input(*shape), True), **opts)

    test = scored(split["test"])
    sets = {n: scored(spec) for n, spec in {**split["near"], **far}.items()}
    groups = {"near": list(split["near"]), "far": list(far)}
    return {
        "auto_pick": candidate_name(m.ood.score, m.knn.k),
        # the choice made again here: equal to auto_pick unless the run or its data changed
        "recomputed_pick": candidate_name(choice.score, choice.k),
        "temperature": opts["temperature"],
        "val_auroc": m.ood.selection.val_auroc,
        "val_fpr95": m.ood.selection.val_fpr95,
        "table": {c: candidate_row(test[c], {n: s[c] for n, s in sets.items()}, groups)
                  for c in test},
    }  # fmt: skip


def export_candidates(
    run_dir: Path, m: Manifest, val_ood: dict[str, str]
) -> tuple[Any, OODChoice, dict[str, Any]]:
    """(ensemble, choice, ``candidate_scores`` options): the candidates rebuilt as export built
    them, from the saved run (its checkpoint and split.json), the manifest's bank rows and seed,
    the validation split's choice half (``export.choice.split_validation``: export chose on it,
    ``--ood-val`` given) and the ``--ood-val`` sets; ``msp`` at the T fitted on that half (the T
    the candidates were ranked with). Numpy references on PyTorch features, as ``auto`` scores
    them, not the graph."""
    from export.choice import choose_ood_score, score_inputs, split_validation
    from sdde_serve import calibration as cal
    from training.run import load_run

    assert m.knn is not None and m.ood.selection is not None
    run = load_run(run_dir)
    shape = (m.input.channels, m.input.height, m.input.width)
    choice_val, _ = split_validation(run.val)
    choice = choose_ood_score(
        run, "auto", shape, val_ood, knn_k=None, rows=m.knn.rows, dtype="float32",
        seed=m.knn.seed, val=choice_val,
    )  # fmt: skip
    assert choice.bank is not None
    ens = run.ensemble.eval()
    val_in = score_inputs(ens, choice_val.as_model_input(*shape), True)
    ks = sorted({int(c.partition("@")[2]) for c in m.ood.selection.val_auroc if "@" in c})
    opts = {
        "temperature": cal.fit_temperature(val_in.logits, choice_val.labels),
        "bank": choice.bank.bank,
        "ks": ks,
        "stats": choice.stats,
    }
    return ens, choice, opts


def candidate_row(
    id_scores: np.ndarray, ood: dict[str, np.ndarray], groups: dict[str, list[str]]
) -> dict[str, Any]:
    """One candidate's AUROC and FPR@95 per OOD set and per group (mean over its sets)."""
    from sdde_serve.evaluation.metrics import auroc, fpr_at_tpr

    per_set = {
        n: {"auroc": auroc(id_scores, s), "fpr95": fpr_at_tpr(id_scores, s)} for n, s in ood.items()
    }
    row: dict[str, Any] = {}
    for group, names in groups.items():
        for metric in ("auroc", "fpr95"):
            if names:
                row[f"{group}_{metric}"] = float(np.mean([per_set[n][metric] for n in names]))
    return {**row, "per_set": per_set}


CANDIDATE_METRICS = ("near_auroc", "near_fpr95", "far_auroc", "far_fpr95")


def candidate_summary(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One method's candidates over seeds: mean per candidate, the best single candidate by mean
    near FPR@95, the auto pick's mean near FPR@95 (each seed's pick on that seed) and its gap in
    points; issue 22's goal is a gap of at most 1 point. None without candidates tables."""
    tables = [r["candidates"] for r in results if r.get("candidates")]
    if not tables:
        return None
    common = [c for c in tables[0]["table"] if all(c in t["table"] for t in tables)]
    metrics = [k for k in CANDIDATE_METRICS if all(k in t["table"][common[0]] for t in tables)]
    mean = {c: {k: _ms([t["table"][c][k] for t in tables]) for k in metrics} for c in common}
    auto = {k: _ms([t["table"][t["auto_pick"]][k] for t in tables]) for k in metrics}
    best = min(common, key=lambda c: mean[c]["near_fpr95"][0])
    gap = 100.0 * (auto["near_fpr95"][0] - mean[best]["near_fpr95"][0])
    return {
        "seeds": [r["seed"] for r in results if r.get("candidates")],
        "candidates": mean,
        "auto": auto,
        "auto_picks": [t["auto_pick"] for t in tables],
        "best_single_near_fpr95": best,
        "gap_points": gap,
        "goal_within_1_point": bool(gap <= 1.0),
    }


def candidate_markdown(method: str, summary: dict[str, Any]) -> str:
    """One method's candidates table: mean ± std over seeds, percent."""
    lines = [
        f"| {method}: candidate | near AUROC | near FPR@95 | far AUROC | far FPR@95 |",
        "|---|---|---|---|---|",
    ]
    rows = {f"auto ({', '.join(summary['auto_picks'])})": summary["auto"]}
    for name, row in {**rows, **summary["candidates"]}.items():
        mark = " (best)" if name == summary["best_single_near_fpr95"] else ""
        cells = " | ".join(_cell(row, k) for k in CANDIDATE_METRICS)
        lines.append(f"| {name}{mark} | {cells} |")
    lines.append(
        f"\nauto's near FPR@95 gap to the best single candidate: {summary['gap_points']:+.2f} "
        f"points (goal <= 1: {summary['goal_within_1_point']})"
    )
    return "\n".join(lines)


# --- results ------------------------------------------------------------------------------------


def _ms(values: list[float]) -> list[float]:
    """[mean, sample std] over seeds (std 0 for one seed)."""
    v = np.asarray(values, float)
    return [float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0]


def run_row(result: dict[str, Any]) -> dict[str, float]:
    """The numbers of one exported run that the table reports (fractions, not percent)."""
    m = result["metrics"]
    cls, groups = m["classification"], m["ood"]["groups"]
    deployed = m["ood"]["deployed"]
    single = m["members_sweep"]["first"][0]  # member 0 alone: the single-model floor
    row = {
        "accuracy": cls["after"]["accuracy"],
        "nll_before_T": cls["before"]["nll"],
        "nll_after_T": cls["after"]["nll"],
        "ece_before_T": cls["before"]["ece"],
        "ece_after_T": cls["after"]["ece"],
        "epoch_s": float(np.mean(result["epoch_seconds"])),
        "disagreement": m["diversity"]["id"]["disagreement"],
        "mutual_information": m["diversity"]["id"]["mutual_information"],
        "cam_similarity": m["cams"]["id"] if m.get("cams") else float("nan"),
        "single_accuracy": single["accuracy"],
        "single_nll": single["nll"],
        "single_ece": single["ece"],
    }
    for group in ("near", "far"):
        if group not in groups:
            continue
        for score in SCORES:
            for metric in ("auroc", "fpr95"):
                row[f"{group}_{score}_{metric}"] = groups[group][score][metric]
                row[f"{group}_deployed_{metric}"] = groups[group][deployed][metric]
        for score in ("mal", "msp"):
            row[f"single_{group}_{score}_auroc"] = single["ood"]["groups"][group][score]["auroc"]
    return row


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Mean and std over seeds per method; SDDE minus DE on near AUROC per seed (paired)."""
    table: dict[str, Any] = {}
    for method, results in runs.items():
        if not results:
            continue
        rows = [run_row(r) for r in results]
        table[method] = {k: _ms([row[k] for row in rows]) for k in rows[0]}
        table[method]["seeds"] = [r["seed"] for r in results]
        table[method]["deployed"] = [r["metrics"]["ood"]["deployed"] for r in results]
        table[method]["knn_k"] = [(r["metrics"]["ood"].get("knn") or {}).get("k") for r in results]
        table[method]["stuck_members_at_end"] = [r["stuck_members_at_end"] for r in results]
    paired = {}
    if "de" in runs and "sdde" in runs:
        de = {r["seed"]: run_row(r) for r in runs["de"]}
        sd = {r["seed"]: run_row(r) for r in runs["sdde"]}
        for key in (
            "near_deployed_auroc",
            "near_mal_auroc",
            "near_msp_auroc",
            "far_deployed_auroc",
        ):
            diffs = [sd[s][key] - de[s][key] for s in sorted(set(de) & set(sd)) if key in de[s]]
            if diffs:
                paired[f"sdde_minus_de_{key}"] = {"per_seed": diffs, "mean_std": _ms(diffs)}
    cands = {m: candidate_summary(r) for m, r in runs.items() if r}
    cands = {m: c for m, c in cands.items() if c is not None}
    return {
        "table": table,
        "sdde_vs_de": paired,
        "candidates": cands,
        "goals": goals(table, paired, cands),
    }


def goals(
    table: dict[str, Any], paired: dict[str, Any], candidates: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Issue 20's goals and issue 22's (auto within 1 point of the best single candidate's near
    FPR@95), checked on the mean over seeds of each method."""
    out: dict[str, Any] = {}
    for method, row in table.items():
        out[method] = {
            "ensemble_accuracy_ge_90": row["accuracy"][0] >= 0.90,
            "near_deployed_auroc_ge_85": row.get("near_deployed_auroc", [0.0])[0] >= 0.85,
            "far_deployed_auroc_ge_95": row.get("far_deployed_auroc", [0.0])[0] >= 0.95,
            "no_member_stuck_at_end": not any(row.get("stuck_members_at_end", [])),
        }
        if (candidates or {}).get(method):
            within = candidates[method]["goal_within_1_point"]  # type: ignore[index]
            out[method]["auto_near_fpr95_within_1_point_of_best"] = within
    margin = paired.get("sdde_minus_de_near_deployed_auroc")
    if margin is not None:
        out["sdde_ge_de_near_deployed_auroc"] = margin["mean_std"][0] >= 0.0
    return out


def _cell(row: dict[str, Any], key: str, scale: float = 100.0) -> str:
    if key not in row:
        return "-"
    mean, std = row[key]
    return f"{scale * mean:.2f} ± {scale * std:.2f}"


def markdown(table: dict[str, Any]) -> str:
    """The docs' tables: mean ± std over seeds, percent except NLL and seconds."""
    cols = [
        ("known acc", "accuracy", 100.0),
        ("NLL before→after T", None, 1.0),
        ("ECE before→after T", None, 100.0),
        ("near AUROC / FPR@95 (deployed)", "near_deployed", 100.0),
        ("far AUROC / FPR@95 (deployed)", "far_deployed", 100.0),
        ("s/epoch", "epoch_s", 1.0),
        ("disagreement", "disagreement", 100.0),
        ("CAM sim.", "cam_similarity", 1.0),
    ]
    head = [c[0] for c in cols] + ["stuck members at end"]
    lines = ["| method | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for method, row in table.items():
        cells = []
        for _, key, scale in cols:
            if key is None:
                kind = "nll" if scale == 1.0 else "ece"
                before = _cell(row, f"{kind}_before_T", scale)
                cells.append(f"{before} → {_cell(row, f'{kind}_after_T', scale)}")
            elif key.endswith("_deployed"):
                auroc, fpr = _cell(row, f"{key}_auroc"), _cell(row, f"{key}_fpr95")
                cells.append(f"{auroc} / {fpr}")
            else:
                cells.append(_cell(row, key, scale))
        stuck = sum(len(s) for s in row["stuck_members_at_end"])
        cells.append(str(stuck))
        lines.append(f"| {method} ({', '.join(row['deployed'])}) | " + " | ".join(cells) + " |")
    lines += ["", "| method | score | near AUROC | near FPR@95 | far AUROC | far FPR@95 |"]
    lines.append("|---|---|---|---|---|---|")
    for method, row in table.items():
        for score in SCORES:
            keys = [f"{g}_{score}_{m}" for g in ("near", "far") for m in ("auroc", "fpr95")]
            cells = " | ".join(_cell(row, k) for k in keys)
            lines.append(f"| {method} | {score} | {cells} |")
        single = ["single_accuracy", "single_near_mal_auroc", "single_far_mal_auroc"]
        cells = " / ".join(_cell(row, k) for k in single)
        lines.append(f"| {method} member 0 alone | acc / near / far AUROC (mal) | {cells} | | | |")
    return "\n".join(lines)


def write_results(
    args: argparse.Namespace,
    split: dict[str, Any],
    far: dict[str, str],
    runs: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    import torch

    summary = summarize(runs)
    report = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "note": "2 cores shared with other jobs: times are upper bounds",
        },
        "budget": {
            "arch": args.arch,
            "members": args.members,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "train_per_class": args.train_per_class or "all",
            "train_images": split["train_images"],
            "seeds": args.seeds,
            "lambda_div": args.lambda_div if args.lambda_div is not None else "code default",
        },
        "split": {k: split[k] for k in ("known", "unknown")}
        | {"val_ood": sorted(split["val_ood"]), "near": sorted(split["near"]), "far": sorted(far)},
        **summary,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    return report


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cifar", type=Path, required=True, help="train/ and test/ folders or archives")
    p.add_argument("--mnist", default=None, help="MNIST IDX directory (far OOD); omit to skip")
    p.add_argument("--work", type=Path, required=True, help="data, runs, models and reports")
    p.add_argument("--known", default=",".join(KNOWN), help="comma list of 6 known classes")
    p.add_argument("--val-class", default=VAL_CLASS, help="the unknown class used for choices")
    p.add_argument("--train-per-class", type=int, default=0, help="0: every training image")
    p.add_argument("--arch", default="lenet")
    p.add_argument("--members", type=int, default=5)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--lambda-div", type=float, default=None, help="SDDE's; default: the code's")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--cam-images", type=int, default=128)
    p.add_argument("--out", type=Path, default=OUT)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "data").mkdir(exist_ok=True)
    known = [c.strip() for c in args.known.split(",") if c.strip()]
    t0 = time.time()
    root = cifar_root(args.cifar, args.work)
    split = make_split(root, args.work, known, args.val_class, args.train_per_class or None)
    far = make_far(args.mnist, args.work)
    print(f"split: {json.dumps(split)}\nfar: {sorted(far)} [{time.time() - t0:.0f}s]", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.methods}
    for seed in args.seeds:
        for method in args.methods:
            runs[method].append(run_one(method, seed, args, split, far))
            write_results(args, split, far, runs)
    summary = write_results(args, split, far, runs)
    print(json.dumps({k: summary[k] for k in ("sdde_vs_de", "goals")}, indent=1))
    print(markdown(summary["table"]))
    for method, cands in summary["candidates"].items():
        print("\n" + candidate_markdown(method, cands))
    return 0


if __name__ == "__main__":
    sys.exit(main())
