"""DE vs SDDE on real MNIST: OOD detection and calibration of the exported models.

What it does (docs/evaluation.md, "The MNIST benchmark"):

1. Splits the real MNIST test set (``../shared/data/mnist``, 10k images, the only MNIST here) with
   a fixed seed into train+validation (8000; training carves its own 10 % validation split, on
   which export fits T and the OOD threshold) and test (2000), written as ``.npz`` data specs.
2. Builds OOD sets from real data shipped with matplotlib, scikit-image and scikit-learn (no
   download), each 28x28 gray, white-on-black where that is the natural polarity:

   * validation (model selection only): ``val-glyphs`` (letters K-T rendered in 20 of
     matplotlib's fonts) and ``val-photos`` (crops of the coins, rocket and Hubble images);
   * near-OOD test: ``glyphs`` (letters A-J in the other 20 fonts: a notMNIST analogue) and
     ``page-text`` (crops of scikit-image's scanned text page, inverted to white ink);
   * far-OOD test: ``textures`` (brick, grass, gravel), ``photos`` (camera, astronaut, chelsea,
     coffee, clock, moon crops) and ``faces`` (scikit-image's LFW subset);
   * ``digits-8x8`` (scikit-learn's 8x8 digits upscaled): the *same classes* in another
     acquisition - covariate shift, not semantic OOD; reported apart, never averaged in.

3. Trains DE and SDDE ensembles of 5 LeNets (SGD, momentum 0.9, Nesterov, lr 0.1 with cosine decay,
   weight decay 5e-4, batch 128 per member, lambda = 0.1 for SDDE) for each seed, exports each run
   to ONNX and evaluates the exported file with ``sdde_serve.evaluation`` (onnxruntime).
4. Every run is exported as ``sdde export`` does by default (``--ood-score auto`` without
   validation OOD data: KNN with the default bank and k), and the exported graph reports MAL,
   MSP, minmax and KNN side by side.
5. OOD-chosen hyper-parameters are chosen on the *validation* OOD sets only: the KNN bank size
   and k (a sweep on PyTorch features of every run, :func:`knn_sweep`; the best mean validation
   AUROC over methods and seeds is compared with the code's default, export/knn.py), what
   ``--ood-score auto`` would pick per run, and the score per method for Table 2 (mean AUROC
   over seeds); lambda stays at the paper's 0.1.
6. Prints the paper's Table 2 (OOD AUROC, accuracy) and Table 3 (calibration) layouts as
   mean ± std over seeds, the scores side by side, the goal checks of the deployed default
   (issue 10) and writes ``benchmarks/results/mnist_ood.json``.

Quick run: ``python benchmarks/mnist_ood.py --epochs 1 --seeds 0 --members 2 --max-steps 20``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdde_serve.data import ArrayDataset, load_dataset  # noqa: E402
from sdde_serve.errors import UserError  # noqa: E402

SPLIT_SEED = 20241129
N_TEST = 2000
SIZE = 28
OOD_N = 1000
NEAR = ("glyphs", "page-text")
FAR = ("textures", "photos", "faces")
VAL = ("val-glyphs", "val-photos")
SHIFT = ("digits-8x8",)
METHODS = ("de", "sdde")
SCORES = ("mal", "msp", "minmax", "knn")
# KNN sweep (validation OOD sets decide; test-set numbers are recorded for information only)
SWEEP_BANKS = (1000, 2000, 5000, 0)  # 0: every training image
SWEEP_KS = (1, 2, 5, 10, 20, 50, 100)


# --- data -------------------------------------------------------------------------------------


def split_mnist(mnist_dir: Path, work: Path) -> tuple[str, str]:
    """Seeded split of the 10k real MNIST images into train+val and test ``.npz`` specs."""
    data = load_dataset(str(mnist_dir), split="test")
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(data))
    test_idx, train_idx = np.sort(perm[:N_TEST]), np.sort(perm[N_TEST:])
    paths = []
    for name, idx in (("mnist_trainval", train_idx), ("mnist_test", test_idx)):
        path = work / f"{name}.npz"
        np.savez(
            path, images=data.images[idx], labels=data.labels[idx], classes=np.array(data.classes)
        )
        paths.append(str(path))
    return paths[0], paths[1]


def _fonts() -> list[str]:
    import matplotlib

    return sorted(glob.glob(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "*.ttf")))


def render_glyphs(letters: str, fonts: list[str], n: int, seed: int) -> np.ndarray:
    """White letters on black, random font/size/offset/rotation: a notMNIST-like set."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, SIZE, SIZE), np.uint8)
    usable = []
    for f in fonts:
        try:
            ImageFont.truetype(f, 20).getbbox("A")
            usable.append(f)
        except OSError:
            continue
    i = 0
    while i < n:
        font = ImageFont.truetype(usable[rng.integers(len(usable))], int(rng.integers(18, 27)))
        ch = letters[rng.integers(len(letters))]
        canvas = Image.new("L", (56, 56), 0)
        draw = ImageDraw.Draw(canvas)
        x0, y0, x1, y1 = draw.textbbox((0, 0), ch, font=font)
        if x1 - x0 < 3 or y1 - y0 < 3:  # a font without this glyph draws nothing useful
            continue
        dx, dy = rng.integers(-2, 3, size=2)
        draw.text((28 - (x0 + x1) / 2 + dx, 28 - (y0 + y1) / 2 + dy), ch, fill=255, font=font)
        canvas = canvas.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BILINEAR)
        out[i] = np.asarray(canvas.crop((14, 14, 42, 42)))
        i += 1
    return out


def random_crops(
    images: list[np.ndarray],
    n: int,
    seed: int,
    crop: tuple[int, int] = (32, 96),
    invert: bool = False,
) -> np.ndarray:
    """Random square crops of gray images (side drawn from ``crop``), resized to 28x28."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, SIZE, SIZE), np.uint8)
    for i in range(n):
        img = images[i % len(images)]
        side = int(rng.integers(crop[0], min(crop[1], *img.shape[:2]) + 1))
        y = int(rng.integers(0, img.shape[0] - side + 1))
        x = int(rng.integers(0, img.shape[1] - side + 1))
        patch = Image.fromarray(img[y : y + side, x : x + side])
        arr = np.asarray(patch.resize((SIZE, SIZE), Image.Resampling.BILINEAR), np.uint8)
        out[i] = 255 - arr if invert else arr
    return out


def _gray(img: np.ndarray) -> np.ndarray:
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 3:
        img = np.asarray(Image.fromarray(img[..., :3]).convert("L"))
    return np.ascontiguousarray(img, dtype=np.uint8)


def build_ood_sets(work: Path) -> dict[str, str]:
    """Write every OOD set as ``.npz``; returns ``{name: spec}``."""
    import skimage.data as sk
    from sklearn.datasets import load_digits

    fonts = _fonts()
    half = len(fonts) // 2
    # disjoint letters AND fonts between validation and test glyphs
    sets: dict[str, np.ndarray] = {
        "val-glyphs": render_glyphs("KLMNOPQRST", fonts[half:], OOD_N, seed=1),
        "val-photos": random_crops(
            [_gray(sk.coins()), _gray(sk.rocket()), _gray(sk.hubble_deep_field())], OOD_N, seed=2
        ),
        "glyphs": render_glyphs("ABCDEFGHIJ", fonts[:half], OOD_N, seed=3),
        # scanned text is dark ink on light paper: invert to MNIST's white-on-black
        "page-text": random_crops(
            [_gray(sk.page()), _gray(sk.text())], OOD_N, seed=4, crop=(20, 48), invert=True
        ),
        "textures": random_crops(
            [_gray(sk.brick()), _gray(sk.grass()), _gray(sk.gravel())], OOD_N, seed=5
        ),
        "photos": random_crops(
            [
                _gray(getattr(sk, n)())
                for n in ("camera", "astronaut", "chelsea", "coffee", "clock", "moon")
            ],
            OOD_N,
            seed=6,
        ),
    }
    faces = (sk.lfw_subset() * 255).round().astype(np.uint8)  # 200 faces, 25x25
    sets["faces"] = np.stack(
        [
            np.asarray(Image.fromarray(f).resize((SIZE, SIZE), Image.Resampling.BILINEAR))
            for f in faces
        ]
    )
    digits = load_digits()
    d8 = np.round(digits.images * (255 / 16)).astype(np.uint8)
    sets["digits-8x8"] = np.stack(
        [np.asarray(Image.fromarray(d).resize((SIZE, SIZE), Image.Resampling.BILINEAR)) for d in d8]
    )
    specs = {}
    for name, images in sets.items():
        path = work / f"ood_{name}.npz"
        np.savez(path, images=images[:, None])
        specs[name] = str(path)
    return specs


# --- training, export, evaluation ---------------------------------------------------------------


def run_one(
    method: str,
    seed: int,
    args: argparse.Namespace,
    train_spec: str,
    test: ArrayDataset,
    ood: dict[str, ArrayDataset],
    work: Path,
) -> dict[str, Any]:
    from export import export_run
    from sdde_serve.engine import Engine
    from sdde_serve.evaluation.evaluate import evaluate
    from sdde_serve.evaluation.report import write_report
    from training.cams import cam_fn_from_run
    from training.config import TrainConfig
    from training.trainer import train

    name = f"{method}_s{seed}"
    run_dir = work / "runs" / name
    t0 = time.time()
    if not (run_dir / "best.safetensors").exists() or args.retrain:
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        cfg = TrainConfig(
            data=train_spec,
            arch="lenet",
            members=args.members,
            method=method,
            epochs=args.epochs,
            out=str(run_dir),
            batch_size=128,
            lr=0.1,
            momentum=0.9,
            nesterov=True,
            weight_decay=5e-4,
            lambda_div=args.lambda_div if method == "sdde" else None,
            seed=seed,
            max_steps=args.max_steps,
            val_fraction=0.1,
            device="cpu",
            progress=False,
            cam_samples=0 if method == "de" else 256,
        )
        train(cfg)
    # the run's own clock (metrics.jsonl), so a cached run still reports its training time
    records = (run_dir / "metrics.jsonl").read_text().splitlines()
    t_train = float(json.loads(records[-1]).get("time_s", time.time() - t0)) if records else 0.0
    model = work / "models" / f"{name}.onnx"
    t0 = time.time()
    export_run(run_dir, model, name=f"mnist-{name}", version="1")
    t_export = time.time() - t0
    t0 = time.time()
    engine = Engine(model, intra_op_threads=args.threads)
    groups = {"near": list(NEAR), "far": list(FAR), "val": list(VAL), "shift": list(SHIFT)}
    extra = [n for n in ood if n not in (*NEAR, *FAR, *VAL, *SHIFT)]
    if extra:
        groups["extra"] = extra
    ev = evaluate(
        engine,
        test,
        ood,
        groups=groups,
        id_spec="mnist_test.npz",
        cam_images=args.cam_images,
        # LeNet graphs have no cams: GradCAM on the checkpoint, class = argmax of the graph's probs
        cam_fn=cam_fn_from_run(run_dir, temperature=engine.manifest.temperature),
    )
    # plots for the first seed only: they cost seconds each and look alike across seeds
    write_report(ev, work / "reports" / name, plots=not args.no_plots and seed == args.seeds[0])
    t_eval = time.time() - t0
    m = ev.metrics
    near, far, dep = m["ood"]["groups"]["near"], m["ood"]["groups"]["far"], m["ood"]["deployed"]
    print(
        f"  {name}: acc {100 * m['classification']['after']['accuracy']:.2f}  "
        f"near AUROC/FPR@95 MAL {100 * near['mal']['auroc']:.2f}/{100 * near['mal']['fpr95']:.2f}"
        f"  {dep} {100 * near[dep]['auroc']:.2f}/{100 * near[dep]['fpr95']:.2f}  "
        f"far AUROC MAL {100 * far['mal']['auroc']:.2f} {dep} {100 * far[dep]['auroc']:.2f}  "
        f"[train {t_train:.0f}s, export {t_export:.0f}s, eval {t_eval:.0f}s]",
        flush=True,
    )
    t0 = time.time()
    sweep = knn_sweep(run_dir, test, ood)
    print(f"    KNN sweep {time.time() - t0:.0f}s; auto on val picks {sweep['auto']}", flush=True)
    return {
        "metrics": m,
        "manifest_ood": engine.manifest.ood.model_dump(),
        "manifest_knn": None if engine.manifest.knn is None else engine.manifest.knn.model_dump(),
        "knn_sweep": sweep,
        "seconds": {"train": t_train, "export": t_export, "eval": t_eval},
    }


# --- the KNN sweep (validation OOD sets choose; test sets for information) -----------------------


def knn_sweep(run_dir: Path, test: ArrayDataset, ood: dict[str, ArrayDataset]) -> dict[str, Any]:
    """AUROC / FPR@95 of KNN for every (bank rows, k) and of the other scores, from PyTorch.

    Uses export's own pieces (training split, features, stratified bank, numpy KNN reference,
    export.select's rule) on one run: ``val`` entries average the validation OOD sets against
    the run's validation split, ``near``/``far`` the test sets against the ID test set.
    ``auto`` is what ``sdde export --ood-score auto --ood-val`` would choose on the val sets.
    """
    from export.choice import score_inputs
    from export.knn import build_bank, default_k, knn_scores_many, pre_logit_features
    from export.select import ScoreInputs, candidate_scores, select_score
    from sdde_serve import calibration as cal
    from sdde_serve.evaluation.metrics import auroc, fpr_at_tpr
    from training.run import load_run, load_train_split

    run = load_run(run_dir)
    ens = run.ensemble.eval()
    shape = (1, SIZE, SIZE)
    train = load_train_split(run.run_dir, run.config)
    feats = pre_logit_features(ens, train.as_model_input(*shape))
    sets: dict[str, ScoreInputs] = {
        "val-id": score_inputs(ens, run.val.as_model_input(*shape), True),
        "test-id": score_inputs(ens, test.as_model_input(*shape), True),
    }
    for name in (*VAL, *NEAR, *FAR):
        sets[name] = score_inputs(ens, ood[name].as_model_input(*shape), True)
    temperature = cal.fit_temperature(sets["val-id"].logits, run.val.labels)
    groups = {"val": ("val-id", VAL), "near": ("test-id", NEAR), "far": ("test-id", FAR)}

    def summarize(scores: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
        out = {}
        for g, (id_name, names) in groups.items():
            out[g] = {
                "auroc": float(np.mean([auroc(scores[id_name], scores[n]) for n in names])),
                "fpr95": float(np.mean([fpr_at_tpr(scores[id_name], scores[n]) for n in names])),
                "min_auroc": float(min(auroc(scores[id_name], scores[n]) for n in names)),
            }
        return out

    result: dict[str, Any] = {"train_images": len(train), "temperature": temperature, "knn": {}}
    for rows in SWEEP_BANKS:
        bank = build_bank(feats, train.labels, rows=rows or len(train), seed=0).bank
        ks = [k for k in SWEEP_KS if k <= len(bank)]
        many = {n: knn_scores_many(d.features, bank, ks) for n, d in sets.items()}  # type: ignore[arg-type]
        for k in ks:
            result["knn"][f"{rows or 'all'}/{k}"] = summarize({n: v[k] for n, v in many.items()})
    others = {
        n: candidate_scores(d, temperature=temperature, bank=None, ks=[]) for n, d in sets.items()
    }
    result["scores"] = {
        s: summarize({n: v[s] for n, v in others.items()}) for s in ("mal", "msp", "minmax")
    }
    full = build_bank(feats, train.labels, rows=len(train), seed=0).bank
    chosen, k, why = select_score(
        "auto",
        id_data=sets["val-id"],
        id_name=run.val.name,
        ood_val={n: sets[n] for n in VAL},
        ood_specs={n: n for n in VAL},
        temperature=temperature,
        bank=full,
        default_k=default_k(len(full)),
        knn_k=None,
    )
    result["auto"] = {"score": chosen, "k": k, "val_auroc": why.val_auroc}
    return result


def choose_knn_config(sweeps: dict[str, list[dict]]) -> dict[str, Any]:
    """The default (bank, k) and score, on the validation OOD sets over every method and seed.

    The criterion is the goal's own metric, the mean validation FPR@95 (lower is better; ties go
    to the higher validation AUROC), for the KNN configuration and then for the default score
    among MAL, MSP, minmax and KNN at that configuration. (``--ood-score auto`` with
    ``--ood-val`` ranks by AUROC, as its specification says; both are recorded here.)
    """
    runs = [r for rs in sweeps.values() for r in rs]

    def mean(get: Any) -> float:
        return float(np.mean([get(r) for r in runs]))

    configs = list(runs[0]["knn"])
    val = {c: mean(lambda r, c=c: r["knn"][c]["val"]["auroc"]) for c in configs}
    fpr = {c: mean(lambda r, c=c: r["knn"][c]["val"]["fpr95"]) for c in configs}
    best = min(configs, key=lambda c: (fpr[c], -val[c]))
    scores = {
        s: mean(lambda r, s=s: r["scores"][s]["val"]["auroc"]) for s in ("mal", "msp", "minmax")
    }
    scores_fpr = {
        s: mean(lambda r, s=s: r["scores"][s]["val"]["fpr95"]) for s in ("mal", "msp", "minmax")
    }
    scores["knn"], scores_fpr["knn"] = val[best], fpr[best]
    return {
        "criterion": "mean validation FPR@95 (ties: higher validation AUROC)",
        "best": best,
        "val_auroc": val,
        "val_fpr95": fpr,
        "score_val_auroc": scores,
        "score_val_fpr95": scores_fpr,
        "default_score": min(scores, key=lambda c: (scores_fpr[c], -scores[c])),
    }


# --- aggregation and tables ---------------------------------------------------------------------


def _ms(values: list[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1) over seeds, ignoring undefined values."""
    v = np.array([np.nan if x is None else x for x in values], float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _fmt(values: list[float | None], scale: float = 100.0, digits: int = 2) -> str:
    mean, std = _ms(values)
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def select_scores(results: dict[str, list[dict]]) -> dict[str, dict[str, Any]]:
    """Per method: the score with the best mean validation-OOD AUROC (over seeds)."""
    chosen = {}
    for method, runs in results.items():
        val = {
            s: float(np.mean([r["metrics"]["ood"]["groups"]["val"][s]["auroc"] for r in runs]))
            for s in SCORES
        }
        chosen[method] = {"score": max(val, key=val.get), "val_auroc": val}
    return chosen


def aggregate(results: dict[str, list[dict]], chosen: dict[str, dict]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method, runs in results.items():
        ms = [r["metrics"] for r in runs]
        agg: dict[str, Any] = {"seeds": len(runs), "selected_score": chosen[method]["score"]}
        for when in ("before", "after"):
            agg[when] = {
                k: _ms([m["classification"][when][k] for m in ms])
                for k in ("accuracy", "nll", "ece", "brier")
            }
        agg["member_accuracy"] = _ms(
            [float(np.mean(m["classification"]["members"]["accuracy"])) for m in ms]
        )
        agg["ood"] = {}
        for kind in ("groups", "sets"):
            for name in ms[0]["ood"][kind]:
                agg["ood"][name] = {
                    score: {
                        k: _ms([m["ood"][kind][name][score][k] for m in ms])
                        for k in ("auroc", "aupr_in", "aupr_out", "fpr95")
                    }
                    for score in ms[0]["ood"]["scores"]
                }
        agg["diversity"] = {
            k: _ms([m["diversity"]["id"][k] for m in ms]) for k in ms[0]["diversity"]["id"]
        }
        if ms[0]["cams"] is not None:
            agg["cams"] = {
                "id": _ms([m["cams"]["id"] for m in ms]),
                **{k: _ms([m["cams"]["ood"][k] for m in ms]) for k in ms[0]["cams"]["ood"]},
            }
        agg["temperature"] = _ms([m["model"]["temperature"] for m in ms])
        out[method] = agg
    return out


def goal_checks(results: dict[str, list[dict]]) -> dict[str, Any]:
    """Issue 10's goals for the deployed default score, on mean over seeds."""
    out: dict[str, Any] = {}
    for method, runs in results.items():
        ms = [r["metrics"] for r in runs]
        dep = ms[0]["ood"]["deployed"]
        near = {s: _ms([m["ood"]["groups"]["near"][s]["fpr95"] for m in ms]) for s in ("mal", dep)}
        far = {n: _ms([m["ood"]["sets"][n][dep]["auroc"] for m in ms]) for n in FAR}
        ratio = near[dep][0] / near["mal"][0] if near["mal"][0] > 0 else float("nan")
        out[method] = {
            "deployed": dep,
            "near_fpr95": {"deployed": near[dep], "mal": near["mal"], "ratio": ratio},
            "near_fpr95_at_most_a_fifth_of_mal": bool(ratio <= 0.2),
            "far_auroc_per_set": far,
            "far_auroc_at_least_99_5_every_set": bool(all(v[0] >= 0.995 for v in far.values())),
            "near_auroc": _ms([m["ood"]["groups"]["near"][dep]["auroc"] for m in ms]),
        }
    if "de" in out and "sdde" in out:
        de, sdde = out["de"]["near_auroc"][0], out["sdde"]["near_auroc"][0]
        out["sdde_at_least_de_near_auroc"] = {"sdde": sdde, "de": de, "met": bool(sdde >= de)}
    return out


def print_tables(results: dict[str, list[dict]], chosen: dict[str, dict]) -> str:
    lines = []

    def table(title: str, header: list[str], rows: list[list[str]]) -> None:
        lines.extend(["", title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)])
        lines.extend("| " + " | ".join(r) + " |" for r in rows)

    def col(method: str, path: list[str], scale: float = 100.0, digits: int = 2) -> str:
        vals = []
        for r in results[method]:
            v: Any = r["metrics"]
            for p in path:
                v = v[p]
            vals.append(v)
        return _fmt(vals, scale, digits)

    rows = []
    for method in results:
        s = chosen[method]["score"]
        rows.append(
            [
                method.upper(),
                s.upper(),
                col(method, ["ood", "groups", "near", s, "auroc"]),
                col(method, ["ood", "groups", "far", s, "auroc"]),
                col(method, ["classification", "after", "accuracy"]),
            ]
        )
    table(
        "Table 2 layout (MNIST, OOD AUROC %, ID positive; score chosen on validation OOD)",
        ["method", "score", "near-OOD AUROC", "far-OOD AUROC", "accuracy"],
        rows,
    )
    for score in SCORES:
        rows = [
            [
                method.upper(),
                *[
                    col(method, ["ood", "groups", g, score, k])
                    for g in ("near", "far")
                    for k in ("auroc", "fpr95")
                ],
                col(method, ["ood", "groups", "shift", score, "auroc"]),
            ]
            for method in results
        ]
        table(
            f"OOD detection with {score.upper()} (%)",
            [
                "method",
                "near AUROC",
                "near FPR@95",
                "far AUROC",
                "far FPR@95",
                "digits-8x8 AUROC (shift)",
            ],
            rows,
        )
    sets = list(results[next(iter(results))][0]["metrics"]["ood"]["sets"])
    for score in ("mal", results[next(iter(results))][0]["metrics"]["ood"]["deployed"]):
        rows = [
            [method.upper(), *[col(method, ["ood", "sets", n, score, "auroc"]) for n in sets]]
            for method in results
        ]
        table(f"Per-set AUROC with {score.upper()} (%)", ["method", *sets], rows)
    rows = [
        [
            method.upper(),
            score,
            *[
                col(method, ["ood", "groups", g, score, k])
                for g in ("near", "far")
                for k in ("auroc", "fpr95")
            ],
        ]
        for score in SCORES
        for method in results
    ]
    table(
        "Scores side by side on the exported graphs (%; knn = the deployed default)",
        ["method", "score", "near AUROC", "near FPR@95", "far AUROC", "far FPR@95"],
        rows,
    )
    configs = list(results[next(iter(results))][0]["knn_sweep"]["knn"])
    rows = []
    for c in configs:
        row = [c]
        for method in results:
            for g in ("val", "near"):
                for k in ("auroc", "fpr95"):
                    row.append(
                        _fmt([r["knn_sweep"]["knn"][c][g][k] for r in results[method]], 100.0, 2)
                    )
        rows.append(row)
    table(
        "KNN sweep, bank rows / k (validation chooses; near = test, for information only)",
        [
            "bank/k",
            *[
                f"{m.upper()} {g} {k}"
                for m in results
                for g in ("val", "near")
                for k in ("AUROC", "FPR@95")
            ],
        ],
        rows,
    )
    rows = []
    for method in results:
        for when in ("before", "after"):
            rows.append(
                [
                    method.upper(),
                    when,
                    col(method, ["classification", when, "accuracy"]),
                    col(method, ["classification", when, "nll"], 1.0, 4),
                    col(method, ["classification", when, "ece"]),
                    col(method, ["classification", when, "brier"], 1.0, 4),
                ]
            )
    table(
        "Table 3 layout (MNIST calibration; before = T 1, after = T fitted on ID validation)",
        ["method", "temperature scaling", "accuracy %", "NLL", "ECE %", "Brier"],
        rows,
    )
    div_keys = ["disagreement", "correlation", "q_statistic", "double_fault", "mutual_information"]
    rows = [
        [
            method.upper(),
            *[col(method, ["diversity", "id", k], 1.0, 4) for k in div_keys],
            (
                col(method, ["cams", "id"], 1.0, 3)
                if results[method][0]["metrics"]["cams"]
                else "n/a"
            ),
        ]
        for method in results
    ]
    table(
        "Diversity on the ID test set (Table 1 metrics) and CAM cosine similarity",
        ["method", *div_keys, "CAM cosine (ID)"],
        rows,
    )
    text = "\n".join(lines)
    print(text)
    return text


def write_results(out: Path, payload: dict[str, Any]) -> None:
    """The benchmark's JSON (numpy values made plain; NaN refused), parent folders created."""
    from sdde_serve.evaluation.report import jsonable

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(jsonable(payload), indent=1, allow_nan=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mnist", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    p.add_argument("--work", default="/tmp/sdde_mnist_ood", help="runs, models, data, reports")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mnist_ood.json"))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--members", type=int, default=5)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--lambda-div", type=float, default=0.1)
    p.add_argument("--max-steps", type=int, default=None, help="cap optimizer steps (smoke runs)")
    p.add_argument("--cam-images", type=int, default=100)
    # one thread: on a shared, oversubscribed CPU two intra-op threads ran 4x slower (measured)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--ood",
        action="append",
        default=[],
        metavar="NAME=SPEC",
        help="extra OOD set by path (reported in the 'extra' group)",
    )
    p.add_argument("--retrain", action="store_true", help="retrain runs that already exist")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    for sub in ("runs", "models", "reports"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    try:
        train_spec, test_spec = split_mnist(Path(args.mnist), work)
        ood_specs = build_ood_sets(work)
        for item in args.ood:
            name, _, spec = item.partition("=")
            if not spec or name in ood_specs:
                raise UserError(f"--ood {item!r}: expected a new NAME=SPEC")
            ood_specs[name] = spec
        test = load_dataset(test_spec, split="test")
        ood = {n: load_dataset(s, split="test") for n, s in ood_specs.items()}
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"MNIST: {len(test)} test images; OOD sets: "
        + ", ".join(f"{n} ({len(d)})" for n, d in ood.items()),
        flush=True,
    )

    results: dict[str, list[dict]] = {m: [] for m in args.methods}
    for seed in args.seeds:
        for method in args.methods:
            results[method].append(run_one(method, seed, args, train_spec, test, ood, work))
    chosen = select_scores(results)
    text = print_tables(results, chosen)
    from export.knn import DEFAULT_BANK_ROWS, default_k
    from export.select import DEFAULT_SCORE

    knn_choice = choose_knn_config({m: [r["knn_sweep"] for r in rs] for m, rs in results.items()})
    n_train = results[args.methods[0]][0]["knn_sweep"]["train_images"]
    rows = min(DEFAULT_BANK_ROWS, n_train)
    knn_choice["code_default"] = f"{rows if rows < n_train else 'all'}/{default_k(rows)}"
    checks = goal_checks(results)
    summary = [
        "",
        f"KNN bank/k chosen on validation OOD (FPR@95): {knn_choice['best']} "
        f"(val FPR@95 {100 * knn_choice['val_fpr95'][knn_choice['best']]:.2f}, AUROC "
        f"{100 * knn_choice['val_auroc'][knn_choice['best']]:.2f}); code default "
        f"{knn_choice['code_default']}",
        "default score chosen on validation OOD (FPR@95 / AUROC): "
        f"{knn_choice['default_score']} ("
        + ", ".join(
            f"{k} {100 * knn_choice['score_val_fpr95'][k]:.2f}/{100 * v:.2f}"
            for k, v in knn_choice["score_val_auroc"].items()
        )
        + f"); code default: {DEFAULT_SCORE}",
    ]
    for method in args.methods:
        c = checks[method]
        summary.append(
            f"{method.upper()}: deployed {c['deployed']} near FPR@95 "
            f"{100 * c['near_fpr95']['deployed'][0]:.2f} vs MAL "
            f"{100 * c['near_fpr95']['mal'][0]:.2f}"
            f" (ratio {c['near_fpr95']['ratio']:.3f}, goal <= 0.2: "
            f"{'met' if c['near_fpr95_at_most_a_fifth_of_mal'] else 'MISSED'}); far AUROC "
            + ", ".join(f"{n} {100 * v[0]:.2f}" for n, v in c["far_auroc_per_set"].items())
            + " (goal >= 99.5 each: "
            + ("met)" if c["far_auroc_at_least_99_5_every_set"] else "MISSED)")
        )
    if "sdde_at_least_de_near_auroc" in checks:
        g = checks["sdde_at_least_de_near_auroc"]
        summary.append(
            f"SDDE >= DE (near AUROC, deployed): {100 * g['sdde']:.2f} vs {100 * g['de']:.2f}: "
            f"{'met' if g['met'] else 'MISSED'}"
        )
    print("\n".join(summary))
    text += "\n".join(summary)
    payload = {
        "benchmark": "mnist_ood",
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": args.threads,
        },
        "settings": {
            "epochs": args.epochs,
            "seeds": args.seeds,
            "members": args.members,
            "lambda_div": args.lambda_div,
            "max_steps": args.max_steps,
            "optimizer": "SGD momentum 0.9 nesterov, lr 0.1 cosine to 1e-6, wd 5e-4, "
            "batch 128 per member",
            "split_seed": SPLIT_SEED,
            "n_test": len(test),
            "n_trainval": 10000 - N_TEST,
        },
        "ood_sets": {
            n: {
                "n": len(d),
                "group": next(
                    (
                        g
                        for g, names in (
                            ("near", NEAR),
                            ("far", FAR),
                            ("val", VAL),
                            ("shift", SHIFT),
                        )
                        if n in names
                    ),
                    "extra",
                ),
            }
            for n, d in ood.items()
        },
        "selection": chosen,
        "knn_choice": knn_choice,
        "goals": checks,
        "aggregate": aggregate(results, chosen),
        "runs": {
            m: [{"seed": s, **r} for s, r in zip(args.seeds, rs, strict=True)]
            for m, rs in results.items()
        },
        "tables_markdown": text,
        "wall_seconds": time.time() - t_start,
    }
    write_results(Path(args.out), payload)
    print(f"\nwrote {args.out} ({time.time() - t_start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
