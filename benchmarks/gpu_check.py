"""One prepared check of every GPU code path, in one call, written to one JSON file.

On a CUDA machine, in order (each step is timed; a failing step records its error and the
others still run):

1. ``train``: a short SDDE training run on the GPU with bf16 autocast and channels-last
   (``TrainConfig.amp`` / ``channels_last``, both on by default on CUDA);
2. ``export``: the run exported in fp32 and fp16 (``--precision fp16``: fp16 member networks,
   float32 heads; compared with fp32 on the validation split);
3. ``engine``: both graphs on onnxruntime's CUDA provider with IO binding (input and outputs on
   the device, no host copies inside the timed loop), images/s at batch 1 and 64 (and 256),
   outputs compared with the CPU provider's;
4. ``tensorrt``: the fp32 graph on the TensorRT provider (fp16 kernels allowed), if it loads;
5. ``serve``: ``sdde serve MODEL --require-gpu`` answering one ``/v1/predict`` request;
6. ``cifar`` (with ``--cifar DIR``, CIFAR-10's ``train/`` class folders or an ``.npz``): a short
   ``resnet18_32`` x5 DE run and SDDE run (bf16 autocast, channels-last; ``--cifar-epochs``
   epochs each, sized to take about 10 minutes together on one modern GPU), reporting epoch time
   and training images/s per method.

On a machine without a GPU it prints one "no GPU" line and exits 0 (a test runs it that way).
``--dry-run`` runs step 6 alone on the CPU on 20 fabricated colour images (2 members, one
step per method, 16x16 inputs): a check that the step and its report work, no measurement (a
test runs it).

    .venv/bin/python benchmarks/gpu_check.py [--data digits] [--arch resnet18_32] [--steps 60]
        [--cifar DIR [--cifar-epochs 3]]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results" / "gpu_check.json"
BATCHES = (1, 64, 256)


def gpu_name() -> str | None:
    """The first CUDA device torch sees, or None."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(0)


def step(report: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]]) -> Any:
    t0 = time.perf_counter()
    print(f"[{name}] ...", flush=True)
    try:
        result = fn()
        report[name] = {"ok": True, "seconds": time.perf_counter() - t0, **result}
    except Exception as exc:  # a check records every failure and goes on with the next step
        report[name] = {
            "ok": False,
            "seconds": time.perf_counter() - t0,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(limit=5),
        }
    print(f"[{name}] {json.dumps(report[name], default=str)[:400]}", flush=True)
    return report[name]


def train(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from training.config import TrainConfig
    from training.trainer import train as run_training

    cfg = TrainConfig(
        data=args.data,
        arch=args.arch,
        members=args.members,
        method="sdde",
        epochs=args.epochs,
        max_steps=args.steps,
        batch_size=args.batch_size,
        out=str(work / "run"),
        device="cuda",
        amp=True,
        channels_last=True,
        seed=0,
    )
    t0 = time.perf_counter()
    run_dir = run_training(cfg)
    seconds = time.perf_counter() - t0
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {
        "run_dir": str(run_dir),
        "config": {"arch": args.arch, "members": args.members, "steps": args.steps, "amp": True},
        "steps_per_s": args.steps / seconds,
        "last_metrics": json.loads(lines[-1]) if lines else None,
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def fabricated_cifar(work: Path, n: int, size: int) -> str:
    """``n`` random RGB images in 10 classes as an ``.npz`` spec (the dry run's data)."""
    rng = np.random.default_rng(0)
    path = work / "fabricated_cifar.npz"
    images = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    np.savez(path, images=images, labels=np.arange(n) % 10)
    return str(path)


def cifar_method(
    method: str, spec: str, work: Path, args: argparse.Namespace, device: str
) -> dict[str, Any]:
    """One ``resnet18_32`` ensemble trained on ``spec``: epoch seconds and images/s.

    images/s counts training images per second of the run's own clock (metrics.jsonl, which
    includes each epoch's validation pass); every image goes through all members.
    """
    from training.config import TrainConfig
    from training.trainer import train as run_training

    cfg = TrainConfig(
        data=spec,
        arch="resnet18_32",
        members=args.cifar_members,
        method=method,
        epochs=args.cifar_epochs,
        max_steps=args.cifar_max_steps,
        batch_size=args.cifar_batch_size,
        out=str(work / f"cifar-{method}"),
        input_size=args.cifar_input_size,
        device=device,
        amp=True,
        channels_last=True,
        progress=False,
        cam_samples=0,  # the per-epoch CAM comparison is evaluation, not training throughput
        seed=0,
    )
    run_dir = Path(run_training(cfg))
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    split = json.loads((run_dir / "split.json").read_text())
    train_images = split["n"] - len(split["val_indices"])
    clock = [float(r["time_s"]) for r in records]
    epoch_s = list(np.diff([0.0, *clock]))
    steps = int(records[-1]["step"])
    images = min(steps * cfg.batch_size, train_images * len(records))  # --max-steps may cut
    return {
        "epochs": len(records),
        "steps": steps,
        "train_images": train_images,
        "epoch_s": epoch_s,
        "images_per_s": images / clock[-1],
        "val_ensemble_acc": records[-1]["val"]["ensemble_acc"],
    }


def cifar(spec: str, work: Path, args: argparse.Namespace, device: str) -> dict[str, Any]:
    """DE then SDDE, same data, members and epochs: throughput side by side."""
    out: dict[str, Any] = {
        "config": {
            "arch": "resnet18_32",
            "members": args.cifar_members,
            "epochs": args.cifar_epochs,
            "batch_size": args.cifar_batch_size,
            "amp": "bf16 autocast (CUDA only)",
            "channels_last": True,
            "device": device,
        }
    }
    for method in ("de", "sdde"):
        out[method] = cifar_method(method, spec, work, args, device)
    out["sdde_over_de_epoch_time"] = sum(out["sdde"]["epoch_s"]) / sum(out["de"]["epoch_s"])
    return out


def dry_run(args: argparse.Namespace) -> int:
    """Step 6 on the CPU with fabricated data: the code path, not a measurement."""
    args.cifar_members, args.cifar_epochs, args.cifar_max_steps = 2, 1, 1
    args.cifar_batch_size, args.cifar_input_size = 8, 16  # the CPU is small and shared
    report: dict[str, Any] = {"dry_run": True, "machine": {"gpu": None}}
    with tempfile.TemporaryDirectory(prefix="sdde-gpu-check-dry-") as tmp:
        work = Path(tmp)
        spec = fabricated_cifar(work, n=20, size=args.cifar_input_size)
        step(report, "cifar", lambda: cifar(spec, work, args, "cpu"))
    report["ok"] = report["cifar"]["ok"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out} (dry run on the CPU: no GPU measurement)")
    return 0 if report["ok"] else 1


def export(run_dir: Path, work: Path) -> dict[str, Any]:
    from export import export_run
    from export.quantize import PrecisionOptions

    out: dict[str, Any] = {}
    for precision in ("fp32", "fp16"):
        path = work / f"model-{precision}.onnx"
        manifest = export_run(run_dir, path, precision=PrecisionOptions(precision))
        check = manifest.precision_check
        out[precision] = {
            "path": str(path),
            "accuracy": manifest.calibration.after.accuracy,
            "check": None if check is None else check.model_dump(),
        }
    return out


def _session(path: str, providers: list[Any]):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=providers)


def _iobinding_rate(sess, x: np.ndarray, reps: int) -> float:
    """images/s of ``sess`` with the input copied to the GPU once and outputs left there."""
    import onnxruntime as ort

    binding = sess.io_binding()
    binding.bind_ortvalue_input("images", ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
    for out in sess.get_outputs():
        binding.bind_output(out.name, "cuda", 0)
    sess.run_with_iobinding(binding)  # warm-up (cuDNN algorithm search)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()
        times.append(time.perf_counter() - t0)
    return len(x) / statistics.median(times)


def engine(models: dict[str, str], shape: tuple[int, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cpu = _session(models["fp32"], ["CPUExecutionProvider"])
    x_check = np.random.default_rng(0).random((8, *shape), dtype=np.float32)
    ref = cpu.run(["probs"], {"images": x_check})[0]
    for precision, path in models.items():
        sess = _session(path, ["CUDAExecutionProvider", "CPUExecutionProvider"])
        providers = sess.get_providers()
        if "CUDAExecutionProvider" not in providers:
            raise RuntimeError(f"the CUDA provider did not load (in use: {providers})")
        probs = sess.run(["probs"], {"images": x_check})[0]
        rates = {}
        for batch in BATCHES:
            x = np.random.default_rng(batch).random((batch, *shape), dtype=np.float32)
            rates[batch] = _iobinding_rate(sess, x, reps=50 if batch < 64 else 20)
        out[precision] = {
            "providers": providers,
            "images_per_s": rates,
            "max_abs_probs_diff_vs_cpu_fp32": float(np.abs(probs - ref).max()),
            "labels_agree_vs_cpu_fp32": float((probs.argmax(1) == ref.argmax(1)).mean()),
        }
    return out


def tensorrt(path: str, shape: tuple[int, ...], work: Path) -> dict[str, Any]:
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        return {"present": False}
    trt = (
        "TensorrtExecutionProvider",
        {
            "trt_fp16_enable": True,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(work / "trt-cache"),
            "trt_profile_min_shapes": f"images:1x{'x'.join(map(str, shape))}",
            "trt_profile_opt_shapes": f"images:64x{'x'.join(map(str, shape))}",
            "trt_profile_max_shapes": f"images:256x{'x'.join(map(str, shape))}",
        },
    )
    sess = _session(path, [trt, "CUDAExecutionProvider", "CPUExecutionProvider"])
    providers = sess.get_providers()
    if "TensorrtExecutionProvider" not in providers:
        return {"present": True, "loaded": False, "providers": providers}
    rates = {}
    for batch in BATCHES:
        x = np.random.default_rng(batch).random((batch, *shape), dtype=np.float32)
        rates[batch] = _iobinding_rate(sess, x, reps=20)
    return {"present": True, "loaded": True, "providers": providers, "images_per_s": rates}


def _png(shape: tuple[int, ...]) -> str:
    import base64
    import io

    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (shape[1], shape[2]), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def serve(path: str, shape: tuple[int, ...]) -> dict[str, Any]:
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "sdde_serve", "serve", path, "--require-gpu", "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.5)
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"sdde serve exited {proc.returncode}: {log.read()[-2000:]!r}")
            t0 = time.perf_counter()
            r = httpx.post(url + "/v1/predict", json={"images": [_png(shape)]}, timeout=60)
            latency = time.perf_counter() - t0
            metrics = httpx.get(url + "/metrics", timeout=10).text
            info = [line for line in metrics.splitlines() if line.startswith("sdde_model_info")]
            return {"status": r.status_code, "response": r.json(), "latency_s": latency,
                    "model_info": info}  # fmt: skip
        finally:
            proc.terminate()
            proc.wait(60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits")
    parser.add_argument("--arch", default="resnet18_32")
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--cifar", default=None, help="CIFAR-10 train folder or .npz (step 6)")
    parser.add_argument("--cifar-epochs", type=int, default=3)
    parser.add_argument("--cifar-members", type=int, default=5)
    parser.add_argument("--cifar-batch-size", type=int, default=128)
    parser.add_argument("--cifar-max-steps", type=int, default=None)
    parser.add_argument("--cifar-input-size", type=int, default=None, help="default: 32")
    parser.add_argument("--dry-run", action="store_true", help="step 6 on the CPU, tiny")
    args = parser.parse_args()
    if args.dry_run:
        return dry_run(args)

    name = gpu_name()
    if name is None:
        print("no GPU: torch sees no CUDA device; gpu_check has nothing to run on this machine")
        return 0
    import onnxruntime as ort
    import torch

    report: dict[str, Any] = {
        "machine": {
            "gpu": name,
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "onnxruntime": ort.__version__,
            "ort_providers": ort.get_available_providers(),
        },
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="sdde-gpu-check-") as tmp:
        work = Path(tmp)
        trained = step(report, "train", lambda: train(work, args))
        if trained["ok"]:
            run_dir = Path(trained["run_dir"])
            exported = step(report, "export", lambda: export(run_dir, work))
            if exported["ok"]:
                from sdde_serve.manifest import load_onnx, read_manifest

                models = {p: exported[p]["path"] for p in ("fp32", "fp16")}
                spec = read_manifest(load_onnx(models["fp32"])).input
                shape = (spec.channels, spec.height, spec.width)
                step(report, "engine", lambda: engine(models, shape))
                step(report, "tensorrt", lambda: tensorrt(models["fp32"], shape, work))
                step(report, "serve", lambda: serve(models["fp32"], shape))
        if args.cifar:
            step(report, "cifar", lambda: cifar(args.cifar, work, args, "cuda"))
    report["wall_s"] = time.time() - t0
    report["ok"] = all(v.get("ok", True) for v in report.values() if isinstance(v, dict))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out}: {'all steps passed' if report['ok'] else 'some steps FAILED'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
