"""Lower-precision graphs: ``sdde export --precision {fp32,int8,bf16,fp16}`` (docs/export.md).

The member networks (every node the ``logits`` output depends on) change precision; the heads
on top of them stay float32: the ``temperature`` division, the softmax average, MAL/MSP, CAMs
and any feature-space head (a KNN bank) that does not feed ``logits``. So ``sdde calibrate``
still finds a float32 ``temperature`` initializer, and the scores are computed at full precision
from the lower-precision logits.

* **int8**: onnxruntime static quantization in the QDQ format, per-channel symmetric int8
  weights in 7 bits (``reduce_range``), uint8 activations calibrated (MinMax) on **training**
  images, never the validation split that T, the threshold and this module's own comparison use.
  7-bit weights are what makes one file right on every x86 CPU: without VNNI (AVX2, AVX-512
  without VNNI) onnxruntime's U8S8 kernels multiply with VPMADDUBSW, which adds two
  uint8 x int8 products into a *saturating* int16; 2 x 255 x 127 overflows it, 2 x 255 x 64 =
  32640 does not (:data:`INT8_SCHEMES`, docs/export.md).
* **fp16**: float16 member networks for the CUDA provider (inputs and outputs stay float32).
  onnxruntime's CPU provider runs such a graph only by inserting casts back to float32 (it has
  no float16 convolution on x86), so it is slower there; it is built for GPUs.
* **bf16**: refused with the measured reason: onnxruntime 1.31's CPU provider has no bfloat16
  MatMul/Gemm kernel and ONNX Conv accepts bfloat16 only from opset 22 (the graph does not
  load), see docs/export.md.

After conversion the caller refits T and the threshold on the converted graph's own outputs,
then :func:`compare_precision` measures it against the float32 graph on the validation split
(accuracy, NLL, ECE, label agreement and, given validation OOD images, the AUROC of the deployed
score) and :func:`check_tolerances` refuses an export beyond the tolerances (accuracy, AUROC,
NLL and ECE).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sdde_serve import calibration as cal
from sdde_serve.calibrate import run_graph
from sdde_serve.errors import UserError
from sdde_serve.manifest import (
    TEMPERATURE_INITIALIZER,
    CalibrationInfo,
    OODSpec,
    PrecisionCheck,
    PrecisionMetrics,
)

if TYPE_CHECKING:
    import onnx

    from sdde_serve.data import ArrayDataset
    from training.run import LoadedRun

__all__ = [
    "DEFAULT_MAX_ACCURACY_DROP",
    "DEFAULT_MAX_AUROC_DROP",
    "DEFAULT_MAX_ECE_INCREASE",
    "DEFAULT_MAX_NLL_INCREASE",
    "PRECISIONS",
    "check_tolerances",
    "compare_precision",
    "lower_precision",
    "member_nodes",
    "to_fp16",
    "to_int8",
]

# tolerances in points (percentage points of accuracy and of AUROC x 100)
DEFAULT_MAX_ACCURACY_DROP = 0.3
DEFAULT_MAX_AUROC_DROP = 0.5
# calibration tolerances: NLL in percent of fp32's NLL, ECE in points (x 100). Accuracy and
# AUROC miss a graph whose probabilities drifted without flipping labels (measured on an AVX2
# machine before 7-bit weights: NLL +12%, ECE doubled, accuracy within tolerance).
DEFAULT_MAX_NLL_INCREASE = 5.0
DEFAULT_MAX_ECE_INCREASE = 2.0
# training images the int8 activation ranges are calibrated on (MinMax over all of them)
DEFAULT_CALIBRATION_IMAGES = 512
CALIBRATION_BATCH = 64
# weights quantized to 7 bits (onnxruntime's ``reduce_range``: symmetric [-64, 64]) so that a
# pair of uint8 x int8 products never saturates the int16 sum of the non-VNNI x86 kernels
# (VPMADDUBSW); onnxruntime's quantize_static docs recommend it for CPUs without VNNI, and on
# VNNI/AMX (int32 accumulation) it costs one bit of weight precision and no speed (measured,
# docs/export.md). The same file is then right on every x86 kind it is deployed to.
INT8_WEIGHT_MAX = 64  # |quantized weight| with reduce_range: 2 * 255 * 64 = 32640 <= 32767
# int8 schemes: name -> quantize_static options (activations / weights). Only the default is
# shipped; the others exist so that benchmarks/bench_engine.py --precision-runs can measure
# why (docs/export.md): "u8s8-w8" is the 8-bit weight scheme that saturates on AVX2, "u8u8"
# avoids saturation with uint8 weights (asymmetric), "s8s8" uses int8 activations.
INT8_SCHEMES: dict[str, dict[str, object]] = {
    "u8s8-w7": {"reduce_range": True},
    "u8s8-w8": {"reduce_range": False},
    "u8u8": {"reduce_range": False, "weight_type": "QUInt8", "weight_symmetric": False},
    "s8s8": {"reduce_range": False, "activation_type": "QInt8", "activation_symmetric": True},
}
DEFAULT_INT8_SCHEME = "u8s8-w7"
# ops quantized inside the member networks: everything onnxruntime fuses into int8 kernels on
# the CPU provider (QLinearConv, QGemm, QLinearAdd, ...); Relu and MaxPool are quantized as
# "pass-through" ops so that no dequantize/quantize pair sits between two convolutions
INT8_OPS = (
    "Conv",
    "Gemm",
    "MatMul",
    "Add",
    "Relu",
    "MaxPool",
    "GlobalAveragePool",
    "AveragePool",
    "Flatten",
    "Reshape",
)


def member_nodes(model: onnx.ModelProto, output: str = "logits") -> list[str]:
    """Names of the nodes ``output`` depends on (the member networks), in graph order."""
    producer = {out: node for node in model.graph.node for out in node.output}
    needed: set[str] = set()
    stack = [output]
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        node = producer.get(name)
        if node is None or name in seen:
            continue
        seen.add(name)
        needed.add(node.name)
        stack.extend(node.input)
    return [n.name for n in model.graph.node if n.name in needed]


def _require_node_names(model: onnx.ModelProto) -> None:
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"


class _ImageReader:
    """onnxruntime's CalibrationDataReader protocol over float32 [0, 1] images, in batches."""

    def __init__(self, images: np.ndarray, batch: int = CALIBRATION_BATCH) -> None:
        self._batches = iter(
            [np.ascontiguousarray(images[i : i + batch]) for i in range(0, len(images), batch)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"images": batch}


def to_int8(
    model: onnx.ModelProto, calibration_images: np.ndarray, scheme: str = DEFAULT_INT8_SCHEME
) -> onnx.ModelProto:
    """Static int8 QDQ copy of ``model``: per-channel weights, activations from the images;
    ``scheme``: one of :data:`INT8_SCHEMES` (the default is the one export ships)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration_images) == 0:
        raise UserError("int8 calibration needs training images; the training split is empty")
    options = INT8_SCHEMES[scheme]

    model = onnx.ModelProto.FromString(model.SerializeToString())
    _require_node_names(model)
    quantizable = _inline_identity_weights(model)
    with tempfile.TemporaryDirectory(prefix="sdde-int8-") as tmp:
        src, pre, dst = (Path(tmp) / f"{n}.onnx" for n in ("fp32", "pre", "int8"))
        onnx.save(quantizable, str(src))
        # shape inference only: onnxruntime's graph optimisation here would turn the division
        # by `temperature` into a multiplication by its reciprocal (sdde calibrate needs it)
        with _quiet_root_logger():
            quant_pre_process(str(src), str(pre), skip_optimization=True)
        prepared = onnx.load(str(pre))
        _require_node_names(prepared)
        onnx.save(prepared, str(pre))
        members = [n for n in member_nodes(prepared) if n not in _batched_matmuls(prepared)]
        # onnxruntime logs a "consider pre-processing" warning on the root logger even after it
        with _quiet_root_logger():
            quantize_static(
                str(pre),
                str(dst),
                _ImageReader(calibration_images),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(INT8_OPS),
                nodes_to_quantize=members,
                per_channel=True,
                reduce_range=bool(options["reduce_range"]),
                activation_type=QuantType[str(options.get("activation_type", "QUInt8"))],
                weight_type=QuantType[str(options.get("weight_type", "QInt8"))],
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={
                    "WeightSymmetric": bool(options.get("weight_symmetric", True)),
                    "ActivationSymmetric": bool(options.get("activation_symmetric", False)),
                },
            )
        quantized = onnx.load(str(dst))
    _keep_metadata(model, quantized)
    _check_temperature(quantized)
    return quantized


def _inline_identity_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy where each ``Identity`` of an initializer is replaced by its own initializer.

    The TorchScript exporter deduplicates equal initializers (the BatchNorm-folded biases of an
    untrained ResNet, for one) and hands the duplicates to their convolutions through Identity
    nodes. The quantizer then sees no constant bias and leaves those convolutions as
    DequantizeLinear -> float Conv -> QuantizeLinear, which onnxruntime does not fuse into
    QLinearConv (measured on ResNet18_32: 8 of 20 convolutions int8 with the Identity
    nodes, 20 without). onnxruntime's own pre-processing removes them too, but its graph
    optimisation also turns the division by ``temperature`` into a multiplication.
    """
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            graph.initializer.append(copy)
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return model


def _batched_matmuls(model: onnx.ModelProto) -> set[str]:
    """MatMul nodes with a 3-D weight (the packed layout's per-member Linear layers): their
    per-channel int8 form is refused at run time by onnxruntime's QLinearMatMul ("weight zero
    point must be a scalar, 1D tensor of size 1, or last to second dimension is 1"); they stay
    float32 (a few thousand multiply-adds per image next to the convolutions)."""
    dims = {t.name: len(t.dims) for t in model.graph.initializer}
    return {
        n.name
        for n in model.graph.node
        if n.op_type == "MatMul" and any(dims.get(i, 0) > 2 for i in n.input)
    }


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """float16 member networks (float32 inputs, outputs and heads), for the CUDA provider.

    Done here rather than with onnxruntime's ``convert_float_to_float16``: with a node block
    list and float32 inputs/outputs, its 1.31 version names two cast outputs alike (the graph
    fails the checker). The member networks are a closed subgraph, so the rewrite is simple:
    their float initializers and constants become float16, the image is cast on the way in, and
    every tensor they hand to a float32 head or graph output is cast back.
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    _require_node_names(model)
    graph = model.graph
    members = set(member_nodes(model))
    inside = [n for n in graph.node if n.name in members]
    produced = {out for n in inside for out in n.output}
    read_outside = {i for n in graph.node if n.name not in members for i in n.input}
    read_outside |= {o.name for o in graph.output}
    inits = {t.name: t for t in graph.initializer}
    graph_inputs = {i.name for i in graph.input}
    new_inits: dict[str, onnx.TensorProto] = {}  # by name, in first-use order
    casts: list[onnx.NodeProto] = []
    for node in inside:
        _constants_to_fp16(node)
        for k, name in enumerate(node.input):
            init = inits.get(name)
            if init is not None and init.data_type == TensorProto.FLOAT:
                if _fp16_name(name) not in new_inits:
                    new_inits[_fp16_name(name)] = _fp16_tensor(init, _fp16_name(name))
                node.input[k] = _fp16_name(name)
            elif name in graph_inputs:
                if not casts:  # the image, cast once on the way in
                    to_half = TensorProto.FLOAT16
                    casts.append(helper.make_node("Cast", [name], [_fp16_name(name)], to=to_half))
                node.input[k] = _fp16_name(name)
        casts += _cast_back_outputs(node, read_outside)
    for node in inside:  # rename reads of tensors whose producer was renamed above
        for k, name in enumerate(node.input):
            if name in produced and name in read_outside:
                node.input[k] = _fp16_name(name)
    graph.initializer.extend(new_inits.values())
    graph.node.extend(casts)
    _drop_unread_initializers(graph)
    del graph.value_info[:]
    _toposort(model)
    model = onnx.shape_inference.infer_shapes(model)
    _check_temperature(model)
    return model


def _fp16_name(name: str) -> str:
    """The name of a member tensor's float16 version (initializer, cast image or output)."""
    return f"{name}__fp16"


def _fp16_tensor(tensor: onnx.TensorProto, name: str) -> onnx.TensorProto:
    from onnx import numpy_helper

    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), name)


def _constants_to_fp16(node: onnx.NodeProto) -> None:
    """A float ``Constant`` node's value in float16, in place (other nodes are left alone)."""
    from onnx import TensorProto

    if node.op_type != "Constant":
        return
    for attr in node.attribute:
        if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
            attr.t.CopyFrom(_fp16_tensor(attr.t, attr.t.name))


def _cast_back_outputs(node: onnx.NodeProto, read_outside: set[str]) -> list[onnx.NodeProto]:
    """Rename ``node``'s outputs that float32 nodes or graph outputs read to their float16 name
    and return the casts that give those readers the float32 tensor under the old name.

    A float member tensor read only by other member nodes keeps its name (now float16)."""
    from onnx import TensorProto, helper

    casts = []
    for k, name in enumerate(node.output):
        if name in read_outside:
            node.output[k] = _fp16_name(name)
            casts.append(helper.make_node("Cast", [node.output[k]], [name], to=TensorProto.FLOAT))
    return casts


def _drop_unread_initializers(graph: onnx.GraphProto) -> None:
    """Drop float32 initializers only the member networks read (replaced by float16 copies)."""
    still_read = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in still_read]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _toposort(model: onnx.ModelProto) -> None:
    """Reorder ``model.graph.node`` so that every node comes after the producers of its inputs."""
    available = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    available.add("")  # an omitted optional input
    pending, ordered = list(model.graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise UserError("the converted graph has a cycle or a dangling input; not exported")
        for node in ready:
            available.update(node.output)
        ordered.extend(ready)
        pending = [n for n in pending if not any(n is r for r in ready)]
    del model.graph.node[:]
    model.graph.node.extend(ordered)


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _keep_metadata(source: onnx.ModelProto, target: onnx.ModelProto) -> None:
    del target.metadata_props[:]
    for prop in source.metadata_props:
        target.metadata_props.add().CopyFrom(prop)


def _check_temperature(model: onnx.ModelProto) -> None:
    """The converted graph must still read a float32 scalar ``temperature`` (sdde calibrate)."""
    from onnx import TensorProto

    for init in model.graph.initializer:
        if init.name == TEMPERATURE_INITIALIZER:
            if init.data_type != TensorProto.FLOAT or list(init.dims):
                raise UserError("conversion changed the 'temperature' initializer; not exported")
            if any(TEMPERATURE_INITIALIZER in node.input for node in model.graph.node):
                return
    raise UserError("conversion lost the 'temperature' initializer; not exported")


def _refuse_bf16(model: onnx.ModelProto | None, calibration_images: np.ndarray) -> onnx.ModelProto:
    raise UserError(
        "--precision bf16 is not shipped: onnxruntime's CPU provider has no bfloat16 MatMul/Gemm "
        "kernel (NOT_IMPLEMENTED) and ONNX Conv takes bfloat16 only from opset 22, so a bfloat16 "
        "graph does not load, let alone run faster; use int8 on CPUs, fp16 on GPUs "
        "(docs/export.md)"
    )


# precision -> converter(fp32 model, training images) -> converted model
Converter = Callable[["onnx.ModelProto", np.ndarray], "onnx.ModelProto"]
PRECISIONS: dict[str, Converter | None] = {
    "fp32": None,
    "int8": to_int8,
    "bf16": _refuse_bf16,
    "fp16": lambda model, _images: to_fp16(model),
}
NEEDS_CALIBRATION_IMAGES = frozenset({"int8"})
# (precision, arch) -> the layout measured faster for it (benchmarks/bench_engine.py
# --precision-runs; docs/export.md): int8 packs differently from fp32. ResNet18_32 x5 int8:
# loop 3.62x / 5.22x fp32 at batch 64 / 1, packed 3.37x / 3.82x; LeNet x5 int8: packed ahead
DEFAULT_LAYOUTS: dict[tuple[str, str], str] = {
    ("int8", "resnet18_32"): "loop",
    ("int8", "lenet"): "packed",
}


# --- comparison with the fp32 graph -----------------------------------------------------------


@dataclass
class _Outputs:
    logits: np.ndarray
    probs: np.ndarray
    scores: np.ndarray
    ood_scores: np.ndarray | None


def _outputs(
    model: onnx.ModelProto, images: np.ndarray, score: str, ood: np.ndarray | None
) -> _Outputs:
    out = run_graph(model, images, ["logits", "probs", score])
    ood_scores = None if ood is None else run_graph(model, ood, [score])[score]
    return _Outputs(out["logits"], out["probs"], out[score], ood_scores)


def _metrics(o: _Outputs, labels: np.ndarray) -> PrecisionMetrics:
    from sdde_serve.evaluation.metrics import auroc

    return PrecisionMetrics(
        accuracy=cal.accuracy(o.probs, labels),
        nll=cal.nll(o.probs, labels),
        ece=cal.ece(o.probs, labels),
        auroc=None if o.ood_scores is None else auroc(o.scores, o.ood_scores),
    )


def compare_precision(
    reference: onnx.ModelProto,
    converted: onnx.ModelProto,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    precision: str,
    score: str,
    data: str,
    ood_images: np.ndarray | None = None,
    ood_data: str | None = None,
    calibration_data: str | None = None,
) -> PrecisionCheck:
    """Both graphs (each at its own fitted T) on the validation split: metrics and deltas."""
    ref = _outputs(reference, images, score, ood_images)
    new = _outputs(converted, images, score, ood_images)
    return PrecisionCheck(
        precision=precision,
        data=data,
        n=len(labels),
        calibration_data=calibration_data,
        ood_data=ood_data if ood_images is not None else None,
        n_ood=None if ood_images is None else len(ood_images),
        fp32=_metrics(ref, labels),
        converted=_metrics(new, labels),
        label_agreement=float((ref.probs.argmax(-1) == new.probs.argmax(-1)).mean()),
        max_abs_logit_diff=float(np.abs(ref.logits - new.logits).max()),
    )


def check_tolerances(
    check: PrecisionCheck,
    *,
    max_accuracy_drop: float,
    max_auroc_drop: float,
    max_nll_increase: float = DEFAULT_MAX_NLL_INCREASE,
    max_ece_increase: float = DEFAULT_MAX_ECE_INCREASE,
) -> None:
    """Raise ``UserError`` (exit 2, nothing written) when the converted graph is worse than the
    fp32 one by more than the tolerances (points; NLL: percent of fp32's NLL)."""
    # a value exactly at the tolerance passes (1e-9: 100 * (0.95 - 0.945) is 0.5000000000000004)
    problems = []
    acc_drop = check.accuracy_drop_points
    if acc_drop > max_accuracy_drop + 1e-9:
        problems.append(
            f"accuracy {check.fp32.accuracy:.2%} -> {check.converted.accuracy:.2%} "
            f"({acc_drop:.2f} points lost, --max-accuracy-drop {max_accuracy_drop:g})"
        )
    auroc_drop = check.auroc_drop_points
    if auroc_drop is not None and auroc_drop > max_auroc_drop + 1e-9:
        problems.append(
            f"AUROC vs {check.ood_data} {check.fp32.auroc:.2%} -> {check.converted.auroc:.2%} "
            f"({auroc_drop:.2f} points lost, --max-auroc-drop {max_auroc_drop:g})"
        )
    if check.nll_increase_percent > max_nll_increase + 1e-9:
        problems.append(
            f"NLL {check.fp32.nll:.4f} -> {check.converted.nll:.4f} "
            f"({check.nll_increase_percent:+.1f}%, --max-nll-increase {max_nll_increase:g})"
        )
    if check.ece_increase_points > max_ece_increase + 1e-9:
        problems.append(
            f"ECE {check.fp32.ece:.4f} -> {check.converted.ece:.4f} "
            f"({check.ece_increase_points:+.2f} points, --max-ece-increase {max_ece_increase:g})"
        )
    if problems:
        raise UserError(
            f"--precision {check.precision} refused on {check.data} ({check.n} images): "
            + "; ".join(problems)
            + "; nothing written (export fp32, or raise the tolerance)"
        )


# --- the hook export_run calls ------------------------------------------------------------------


Calibrate = Callable[["onnx.ModelProto"], tuple[CalibrationInfo, OODSpec]]


@dataclass
class PrecisionOptions:
    """What ``sdde export --precision`` was asked for."""

    precision: str = "fp32"
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP
    max_auroc_drop: float = DEFAULT_MAX_AUROC_DROP
    max_nll_increase: float = DEFAULT_MAX_NLL_INCREASE
    max_ece_increase: float = DEFAULT_MAX_ECE_INCREASE
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES
    # validation OOD sets (never a set reported as a result); AUROC is over their union
    ood_val: list[ArrayDataset] = field(default_factory=list)

    def tolerances(self) -> dict[str, float]:
        """The tolerances as :func:`check_tolerances` takes them (and the manifest records)."""
        return {
            "max_accuracy_drop": self.max_accuracy_drop,
            "max_auroc_drop": self.max_auroc_drop,
            "max_nll_increase": self.max_nll_increase,
            "max_ece_increase": self.max_ece_increase,
        }

    def default_layout(self, arch: str) -> str | None:
        """The layout measured faster for this precision and arch, if it differs from fp32's."""
        return DEFAULT_LAYOUTS.get((self.precision, arch))

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise UserError(
                f"unknown --precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}"
            )
        if min(self.tolerances().values()) < 0:
            raise UserError(
                "--max-accuracy-drop, --max-auroc-drop, --max-nll-increase and "
                "--max-ece-increase must be >= 0"
            )
        if self.calibration_images < 1:
            raise UserError(f"--calibration-images must be >= 1, got {self.calibration_images}")
        if self.precision == "bf16":  # before the slow part
            _refuse_bf16(None, np.empty(0))


def lower_precision(
    model: onnx.ModelProto,
    options: PrecisionOptions,
    *,
    fp32_calibration: tuple[CalibrationInfo, OODSpec],
    calibrate: Calibrate,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    val_name: str,
    train_images: Callable[[int], tuple[np.ndarray, str]],
) -> tuple[onnx.ModelProto, CalibrationInfo, OODSpec, PrecisionCheck | None]:
    """``model`` (fp32, calibrated) in ``options.precision``, recalibrated on its own outputs
    with ``calibrate`` and checked against fp32; fp32 comes back unchanged with no check.

    ``train_images(n)`` returns up to n training images (float32 [0, 1]) and their name.
    """
    options.validate()
    convert = PRECISIONS[options.precision]
    if convert is None:
        return model, *fp32_calibration, None
    images, calib_name = np.empty((0,), np.float32), None
    if options.precision in NEEDS_CALIBRATION_IMAGES:
        images, calib_name = train_images(options.calibration_images)
    converted = convert(model, images)
    check_graph(converted)
    info, ood = calibrate(converted)
    ood_images, ood_name = None, None
    if options.ood_val:
        shape = images_shape(val_images)
        ood_images = np.concatenate([d.as_model_input(*shape) for d in options.ood_val])
        ood_name = "+".join(d.name for d in options.ood_val)
    check = compare_precision(
        model,
        converted,
        val_images,
        val_labels,
        precision=options.precision,
        score=ood.score,
        data=val_name,
        ood_images=ood_images,
        ood_data=ood_name,
        calibration_data=calib_name,
    )
    check = check.model_copy(update=options.tolerances())
    check_tolerances(check, **options.tolerances())
    return converted, info, ood, check


def images_shape(images: np.ndarray) -> tuple[int, int, int]:
    _, c, h, w = images.shape
    return int(c), int(h), int(w)


def check_graph(model: onnx.ModelProto) -> None:
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"the converted graph fails the ONNX checker: {first}") from None


def run_training_images(
    run: LoadedRun, n: int, shape: tuple[int, int, int], seed: int = 0
) -> tuple[np.ndarray, str]:
    """Up to ``n`` of ``run``'s training images (a seeded sample of its data minus
    ``split.json``'s validation, as training.run.load_train_split gives them), as model input."""
    from training.run import load_train_split

    train = load_train_split(run.run_dir, run.config)
    keep = np.arange(len(train))
    if len(keep) > n:
        keep = np.sort(np.random.default_rng(seed).choice(keep, n, replace=False))
    images = train.subset(keep, name=train.name).as_model_input(*shape)
    return images, f"{train.name} ({len(keep)} images)"
