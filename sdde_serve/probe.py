"""Load-time self-check: a probe batch the manifest carries and the outputs the graph must give.

An export is verified (against PyTorch, and a lower precision against fp32) on the machine that
exports it; the machine that serves it may run other kernels. int8 is where that bites: on x86
CPUs without VNNI onnxruntime's uint8 x int8 kernels add pairs of products into a saturating
int16, so a file checked on a VNNI/AMX server can silently answer otherwise on an AVX2 one
(measured: 94.4% label agreement with fp32 where the export machine saw 100%). So ``sdde
export`` stores :data:`PROBE_IMAGES` validation images (uint8) and the graph's own member
logits (and KNN similarities) for them, and :class:`~sdde_serve.engine.Engine` runs them when
it loads the model, on this machine's kernels, before anything is served.

What is compared, all defined independently of the temperature, so ``sdde calibrate`` (which
rewrites T and the threshold) keeps the probe valid without re-running it:

* ``logits`` against the stored ones;
* ``probs`` against ``mean_m softmax(stored logits / T)`` at the manifest's T (float64);
* the deployed OOD score against the same score computed from the stored outputs: the
  registry's reference (sdde_serve/scores/) on the stored logits for a score of the logits
  alone, the stored similarities for ``knn``.

Tolerances scale with the precision (:data:`PROBE_TOLERANCES`): loose enough for the legitimate
differences between kernels (SIMD widths, TF32 on GPUs, rounding ties in int8 requantization),
tight enough that saturating int8 kernels (max |logit diff| 8 on a tiny model) or a broken
provider fail. ``--probe-check refuse|warn|off`` (:data:`PROBE_MODES`) decides what a mismatch
does; files exported before the probe have none and load as before.
"""

from __future__ import annotations

import argparse
import base64
import platform
from typing import Literal

import numpy as np

from sdde_serve import calibration as cal
from sdde_serve import scores
from sdde_serve.manifest import Manifest, ProbeCheck

PROBE_IMAGES = 8
# precision -> (max |logit diff| relative to max(1, largest |stored logit|), max |diff| of
# probabilities, MSP and KNN cosine similarity). fp32: kernels differ by ~1e-6, TF32 on GPUs by
# ~1e-3; fp16 by ~1e-3. int8 kernels without saturation agree up to requantization ties; 3% is
# about twice the int8 graph's own distance from fp32 on the probe (1.6% and 1.4% of the largest
# logit on two trained digits runs, docs/export.md): a kernel that errs as much as quantization
# itself is refused.
PROBE_TOLERANCES: dict[str, tuple[float, float]] = {
    "fp32": (5e-3, 5e-3),
    "fp16": (2e-2, 1e-2),
    "int8": (3e-2, 2e-2),
}
# outputs that are probabilities or cosine similarities: compared with the probability
# tolerance. Every other output (the logits, and scores on their scale: mal, minmax, energy, a
# newly registered score) gets the logits' tolerance, which is never the tighter one.
PROBABILITY_SCALE = ("probs", "msp", "knn")
ProbeMode = Literal["refuse", "warn", "off"]
PROBE_MODES: tuple[str, ...] = ("refuse", "warn", "off")
DEFAULT_PROBE_MODE: ProbeMode = "refuse"
PROBE_HELP = (
    "load-time self-check of the manifest's probe batch on this machine's kernels: refuse a "
    "model whose outputs disagree beyond tolerance, only warn, or skip it"
)

__all__ = [
    "DEFAULT_PROBE_MODE",
    "PROBE_HELP",
    "PROBE_MODES",
    "ProbeMode",
    "add_probe_argument",
    "cpu_kind",
    "make_probe",
    "probe_images",
    "probe_problem",
]


def add_probe_argument(parser: argparse.ArgumentParser) -> None:
    """``--probe-check`` for the commands that load a model through the engine (``sdde serve``
    declares it through its Settings, from the same names)."""
    parser.add_argument(
        "--probe-check", choices=PROBE_MODES, default=DEFAULT_PROBE_MODE, help=PROBE_HELP
    )


def probe_images(probe: ProbeCheck, shape: tuple[int, int, int]) -> np.ndarray:
    """The probe batch as graph input: float32 ``[n, C, H, W]`` pixels in [0, 1]."""
    raw = np.frombuffer(base64.b64decode(probe.images), np.uint8)
    return (raw.reshape(probe.n, *shape).astype(np.float32) / np.float32(255.0)).copy()


def encode_images(images: np.ndarray) -> tuple[str, np.ndarray]:
    """float [0, 1] images -> (base64 of their uint8 pixels, the float32 images they decode to)."""
    pixels = np.clip(np.rint(np.asarray(images, np.float64) * 255.0), 0, 255).astype(np.uint8)
    decoded = pixels.astype(np.float32) / np.float32(255.0)
    return base64.b64encode(pixels.tobytes()).decode("ascii"), decoded


def make_probe(
    pixels_b64: str, outputs: dict[str, np.ndarray], precision: str, computed_on: str
) -> ProbeCheck:
    """The manifest's probe from the encoded images and the graph's outputs on them."""
    logits = np.asarray(outputs["logits"], np.float32)
    logit_rtol, prob_atol = PROBE_TOLERANCES.get(precision, PROBE_TOLERANCES["fp32"])
    knn = outputs.get("knn")
    return ProbeCheck(
        images=pixels_b64,
        n=len(logits),
        logits=logits.tolist(),
        knn=None if knn is None else np.asarray(knn, np.float32).tolist(),
        logit_tolerance=logit_rtol * max(1.0, float(np.abs(logits).max())),
        prob_tolerance=prob_atol,
        computed_on=computed_on,
    )


def expected_outputs(probe: ProbeCheck, manifest: Manifest) -> dict[str, np.ndarray]:
    """What the graph must output on the probe at the manifest's T (float64)."""
    logits = np.asarray(probe.logits, np.float64)
    probs = cal.ensemble_probs(logits, manifest.temperature)
    out = {"logits": logits, "probs": probs}
    spec = scores.get(manifest.ood.score)
    if spec.name == "knn":
        if probe.knn is not None:  # the probe stores the graph's KNN similarities
            out["knn"] = np.asarray(probe.knn, np.float64)
    elif spec.member_subset:  # a score of the logits alone (the registry's reference, at T)
        out[spec.name] = spec.compute(scores.ScoreData(logits, manifest.temperature))
    # a score with fitted statistics (mahalanobis, combined, ...) needs the probe's features,
    # which it does not store: the logits it reads are checked above
    return out


def probe_problem(
    probe: ProbeCheck, manifest: Manifest, outputs: dict[str, np.ndarray | None]
) -> str | None:
    """None when ``outputs`` (this machine's, on the probe) are within tolerance, else why not."""
    expected = expected_outputs(probe, manifest)
    for name, want in expected.items():
        got = outputs.get(name)
        if got is None:
            return f"the graph gives no {name!r} output for the probe"
        tolerance = probe.prob_tolerance if name in PROBABILITY_SCALE else probe.logit_tolerance
        diff = float(np.abs(np.asarray(got, np.float64) - want).max())
        if not diff <= tolerance:  # NaN fails too
            agree = np.mean(np.argmax(outputs["probs"], -1) == np.argmax(expected["probs"], -1))
            return (
                f"the probe's {name} differ from the export's by {diff:.3g} (tolerance "
                f"{tolerance:.3g}; predicted classes agree on {agree:.0%} of {probe.n} images): "
                f"this machine ({cpu_kind()}) computes the {manifest.precision} graph otherwise "
                f"than the one it was exported on ({probe.computed_on})"
            )
    return None


def cpu_kind() -> str:
    """This machine's CPU as it matters to onnxruntime's kernels: the architecture and the
    widest integer dot-product extension (amx > avx512_vnni > avx512f > avx2)."""
    machine = platform.machine() or "unknown"
    flags = _cpu_flags()
    for flag in ("amx_int8", "avx512_vnni", "avx_vnni", "avx512f", "avx2"):
        if flag in flags:
            return f"{machine} {flag}"
    return machine


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()
