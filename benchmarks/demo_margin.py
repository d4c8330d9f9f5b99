"""How safely `make demo` answers its samples, over training seeds (issue 21 item 6).

For each seed: trains the demo's run (``sdde train --data digits --arch lenet --members 5
--method sdde --epochs 20 --val-fraction 0.25``; reused when present), exports it as the demo
does (``auto`` without ``--ood-val``: ranked on synthesized validation OOD data) and as before
(``--synth-ood none``: the fixed default), and sends the samples of ``sdde_serve.samples`` plus
the old gradient "photo" through the engine and the server's scoring path. Records, per sample:
the label, whether it is flagged, the deployed score minus the threshold and the conformal
p-value; the goal is the digit answered and noise and photo flagged with p < alpha / 2, with no
member stuck at chance at the end of training (``stuck_members_at_end``).

``python benchmarks/demo_margin.py --seeds 0 1 2 3 4`` (~1-2 min per seed to train, CPU);
JSON in ``benchmarks/results/demo_margin.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mnist_ood import write_results  # noqa: E402

DEMO = dict(data="digits", arch="lenet", members=5, method="sdde", epochs=20, val_fraction=0.25)
EXPORTS = {"synthesized-auto": None, "fixed-default": ()}  # export_run's synth_ood


def demo_run(work: Path, seed: int) -> Path:
    from training.config import TrainConfig
    from training.trainer import train

    out = work / f"s{seed}"
    if not (out / "best.safetensors").exists():
        train(TrainConfig(**DEMO, seed=seed, out=str(out), progress=False))
    return out


def sample_paths(work: Path) -> list[Path]:
    from sdde_serve.samples import write_samples

    paths = write_samples(work / "samples")
    # the photo make demo sent before (a diagonal gradient), kept for comparison
    yy, xx = np.mgrid[0:64, 0:64]
    old = work / "samples" / "gradient.png"
    Image.fromarray(((xx * 4 + yy * 2) % 256).astype(np.uint8)).save(old)
    return [*paths, old]


def answers(model: Path, paths: list[Path]) -> dict[str, Any]:
    from sdde_serve.engine import Engine
    from sdde_serve.preprocess import ImageLimits, decode_image
    from sdde_serve.scoring import make_predictions

    engine = Engine(model)
    m = engine.manifest
    x = np.stack([decode_image(p.read_bytes(), m.input, ImageLimits()) for p in paths])
    preds = make_predictions(engine.run(x), m)
    rows = {
        p.name: {
            "label": pr.label,
            "confidence": pr.confidence,
            "is_ood": pr.is_ood,
            "margin": pr.ood_score - pr.threshold,
            "p_value": pr.ood_p_value,
        }
        for p, pr in zip(paths, preds, strict=True)
    }
    sel = m.ood.selection
    return {
        "score": m.ood.score,
        "k": None if m.knn is None else m.knn.k,
        "alpha": m.ood.alpha,
        "calibration_n": len(m.ood.calibration_scores or []),
        "selection": None if sel is None else sel.model_dump(),
        "samples": rows,
    }


def cpu_name() -> str:
    for line in (
        Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    ):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    from export import export_run
    from training.run import stuck_at_end

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--work", default="/tmp/sdde_demo_margin", help="runs, models, samples")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "demo_margin.json"))
    args = p.parse_args(argv)
    work = Path(args.work)
    paths = sample_paths(work)
    results: dict[str, Any] = {}
    for seed in args.seeds:
        run = demo_run(work, seed)
        for name, synth in EXPORTS.items():
            model = work / "models" / f"s{seed}_{name}.onnx"
            export_run(run, model, synth_ood=synth)
            r = answers(model, paths)
            r["stuck_members_at_end"] = stuck_at_end(run)  # what the p-values would not show
            results.setdefault(name, {})[str(seed)] = r
            print(
                f"seed {seed} {name:16s} {r['score']}@{r['k']}: "
                + f"stuck at end: {r['stuck_members_at_end']}  "
                + "  ".join(
                    f"{s}: {'OOD' if v['is_ood'] else v['label']} p={v['p_value']:.3f}"
                    for s, v in r["samples"].items()
                ),
                flush=True,
            )
    recorded = json.loads((work / f"s{args.seeds[0]}" / "config.json").read_text())
    payload = {
        "cpu": cpu_name(),
        "demo": DEMO,
        # the SDDE dose the trainer's defaults gave (it changed with issue 23)
        "dose": {
            k: recorded[k]
            for k in ("diversity_period", "diversity_pairs", "shared_batch", "lambda_div")
        },
        "seeds": args.seeds,
        "results": results,
    }
    write_results(Path(args.out), payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
