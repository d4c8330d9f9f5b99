"""A 12 MP JPEG through the server's decode path: peak memory over idle and decode time.

Each case runs in a fresh process (so one case's freed memory cannot hide the next one's peak),
with the server's allocator settings (``sdde_serve.server.memory.bound_allocator``). Per case:
the file's bytes are read, one small image is decoded to warm Pillow and numpy up, the idle RSS
is taken, the peak (``VmHWM``) is reset, and the image is decoded ``--repeat`` times; reported
are the peak RSS over idle and the median decode time, wall and CPU (on a shared, oversubscribed
machine the CPU time is what an idle core would take: the decode is single-threaded).

* ``decode_image``: the server's and ``sdde score``'s path (``sdde_serve.preprocess``): header
  checks, libjpeg's DCT scaling (``draft``), reduction, the manifest's resize;
* ``full decode``: what an image library does without draft mode (``Image.open().convert("RGB")``
  then torchvision's eval transform on the full image), side by side.

Goal (issue 20): under 64 MB over idle and under 200 ms per 12 MP photo.

    python benchmarks/bench_decode.py [--photo PHOTO.jpg] [--repeat 5] [--out FILE.json]

Without ``--photo`` a 4000x3000 photo-like JPEG (smooth shapes plus fine texture, quality 90)
is generated.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MB = 1024 * 1024
GOAL_MB, GOAL_MS = 64.0, 200.0
# (name, channels, side, resize, resize_size)
MODELS = [
    ("gray 28x28, stretch", 1, 28, "bilinear-stretch", None),
    ("rgb 32x32, shorter-crop", 3, 32, "shorter-crop", None),
    ("rgb 224x224, shorter-crop 256", 3, 224, "shorter-crop", 256),
]


def make_photo(path: Path, width: int = 4000, height: int = 3000) -> None:
    """Photo-like content: large smooth regions and per-pixel texture, as a camera's JPEG."""
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (height // 200, width // 200, 3), dtype=np.uint8)
    img = np.asarray(
        Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.int16
    )
    img += rng.integers(-12, 13, (height, width, 1), dtype=np.int16)  # sensor-like texture
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def child(photo: Path, model: int, method: str, repeat: int) -> dict:
    """One measurement in this (fresh) process."""
    from sdde_serve.manifest import InputSpec
    from sdde_serve.preprocess import ImageLimits, decode_image
    from sdde_serve.server.memory import bound_allocator
    from sdde_serve.transform import to_model_array

    bound_allocator()
    name, channels, side, resize, resize_size = MODELS[model]
    spec = InputSpec(
        channels=channels, height=side, width=side, mean=[0.5] * channels, std=[0.5] * channels,
        color="L" if channels == 1 else "RGB", resize=resize, resize_size=resize_size,
    )  # fmt: skip
    data = photo.read_bytes()

    def decode(blob: bytes) -> np.ndarray:
        if method == "decode_image":
            return decode_image(blob, spec, ImageLimits())
        full = Image.open(io.BytesIO(blob)).convert("RGB")
        return to_model_array(full, channels, side, side, spec.transform)

    small = io.BytesIO()
    Image.new("RGB", (64, 48), (1, 2, 3)).save(small, "JPEG")
    decode(small.getvalue())
    idle = status_mb("VmRSS")
    reset_peak()
    times, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        x = decode(data)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        del x
    return {
        "model": name,
        "method": method,
        "peak_over_idle_mb": round(status_mb("VmHWM") - idle, 1),
        "decode_ms_median": round(1000 * statistics.median(times), 1),
        "decode_ms_min": round(1000 * min(times), 1),
        # CPU time of this (single-threaded) decode: what the wall time is on an idle core
        "decode_cpu_ms_median": round(1000 * statistics.median(cpu), 1),
        "repeat": repeat,
    }


def run_child(photo: Path, model: int, method: str, repeat: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(model), method, "--photo", str(photo)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [*cmd, "--repeat", str(repeat)], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def brief(row: dict) -> str:
    return (
        f"{row['peak_over_idle_mb']:5.1f} MB {row['decode_ms_median']:6.1f} ms "
        f"({row['decode_cpu_ms_median']:.0f} ms CPU)"
    )


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photo", type=Path, help="a JPEG photo (default: a generated 12 MP one)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bench_decode.json")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.photo, int(args.child[0]), args.child[1], args.repeat)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        photo = args.photo or Path(tmp) / "photo_12mp.jpg"
        if args.photo is None:
            make_photo(photo)
        with Image.open(photo) as img:
            size = img.size
        rows = []
        for model in range(len(MODELS)):
            ours = run_child(photo, model, "decode_image", args.repeat)
            full = run_child(photo, model, "full decode", args.repeat)
            ratio_mb = full["peak_over_idle_mb"] / max(ours["peak_over_idle_mb"], 0.1)
            ratio_ms = full["decode_ms_median"] / ours["decode_ms_median"]
            print(
                f"{ours['model']:30s} decode_image {brief(ours)} | full decode {brief(full)} | "
                f"x{ratio_mb:.0f} memory, x{ratio_ms:.1f} time"
            )
            rows += [ours, full]
        goal_met = all(
            r["peak_over_idle_mb"] < GOAL_MB and r["decode_cpu_ms_median"] < GOAL_MS
            for r in rows
            if r["method"] == "decode_image"
        )
        result = {
            "photo": str(args.photo) if args.photo else "generated 4000x3000, quality 90",
            "photo_size": list(size),
            "photo_bytes": photo.stat().st_size,
            "cpu": cpu_name(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg()[0],
            "goal": {"peak_over_idle_mb": GOAL_MB, "decode_cpu_ms": GOAL_MS, "met": goal_met},
            "rows": rows,
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    verdict = "met" if goal_met else "NOT met"
    print(f"goal (< {GOAL_MB:.0f} MB over idle, < {GOAL_MS:.0f} ms CPU): {verdict}")


if __name__ == "__main__":
    main()
