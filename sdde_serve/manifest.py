"""The manifest: everything a runtime needs, stored inside the ONNX file.

It is a JSON document in the model's ``metadata_props`` under the key ``sdde``. The runtime (server,
batch scorer, evaluation, Triton repository writer) reads nothing else.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sdde_serve.errors import UserError
from sdde_serve.transform import Resize, ResizeMode

if TYPE_CHECKING:  # onnx is a base dependency, but importing it costs ~0.3 s: only when needed
    import onnx

MANIFEST_KEY = "sdde"
SCHEMA_VERSION = 1
TEMPERATURE_INITIALIZER = "temperature"
KNN_BANK_INITIALIZER = "knn_bank"
OUTPUTS = ("logits", "probs", "mal", "msp")
# OOD scores a manifest may deploy; each is a [B] output of the graph of the same name (graphs
# exported before minmax/knn existed lack those outputs: see sdde_serve.scoring.score_of)
OOD_SCORES = ("mal", "msp", "minmax", "knn")
OODScore = Literal["mal", "msp", "minmax", "knn"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class InputSpec(_Model):
    """What the graph's ``images`` input expects; clients send pixels in [0, 1]."""

    channels: Literal[1, 3]
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    # applied inside the graph; recorded so that other runtimes (Triton clients) know
    mean: list[float]
    std: list[float]
    # how any image is brought to (height, width) (sdde_serve/transform.py): "bilinear-stretch"
    # (aspect ratio not kept; what files exported before the choice existed do) or
    # "shorter-crop" (torchvision's eval transform: shorter side to resize_size, centre crop)
    resize: ResizeMode = "bilinear-stretch"
    color: Literal["L", "RGB"] = "L"
    # shorter-crop only; None: max(height, width), a crop of the longer side alone
    resize_size: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _resize_size_fits(self) -> InputSpec:
        if self.resize_size is not None:
            if self.resize != "shorter-crop":
                raise ValueError("resize_size applies to resize 'shorter-crop' only")
            if self.resize_size < max(self.height, self.width):
                raise ValueError(
                    f"resize_size {self.resize_size} is smaller than the crop "
                    f"{self.height}x{self.width}"
                )
        return self

    @property
    def transform(self) -> Resize:
        """The resize every path applies (:func:`sdde_serve.transform.to_model_array`)."""
        return Resize(self.resize, self.resize_size)


class ScoreSelection(_Model):
    """Why the deployed OOD score was chosen (docs/export.md, "Choosing the OOD score")."""

    # given: named by --ood-score; auto: best mean AUROC on the --ood-val sets; default: auto
    # without validation OOD data (the benchmark's choice, export.select.DEFAULT_SCORE)
    method: Literal["given", "auto", "default"]
    reason: str
    # candidate ("mal", "msp", "minmax", "knn@k") -> mean validation AUROC over ood_val
    val_auroc: dict[str, float] = Field(default_factory=dict)
    # candidate -> {ood set name -> AUROC}
    val_auroc_per_set: dict[str, dict[str, float]] = Field(default_factory=dict)
    ood_val: dict[str, str] = Field(default_factory=dict)  # NAME -> data spec
    id_data: str | None = None  # the in-distribution validation images the AUROCs used


class OODSpec(_Model):
    """OOD rule: an image is OOD when ``score < threshold`` (higher = more in-distribution)."""

    score: OODScore = "mal"
    threshold: float
    id_acceptance: float = Field(0.95, gt=0.0, le=1.0)
    higher_is_in_distribution: Literal[True] = True
    selection: ScoreSelection | None = None  # absent in files exported before the choice existed
    # Sorted deployed scores of the held-out in-distribution images the threshold was fitted on:
    # the calibration set of the split-conformal p-value (sdde_serve/conformal.py). Absent in
    # files exported before p-values existed: those serve no p-value and keep `score < threshold`.
    calibration_scores: list[float] | None = None

    @property
    def alpha(self) -> float:
        """Nominal false-flag rate ``1 - id_acceptance``.

        Rounded to 12 digits: in floats 1 - 0.95 is 0.05 + 4e-17, which would flag a p-value
        of exactly 0.05.
        """
        return round(1.0 - self.id_acceptance, 12)


class KNNSpec(_Model):
    """The ``knn`` output's bank: training-image features stored in the graph (``knn_bank``)."""

    k: int = Field(gt=0)
    rows: int = Field(gt=0)
    dims: int = Field(gt=0)  # members x pre-logit width
    dtype: Literal["float32", "float16"] = "float32"
    memory_bytes: int  # rows x dims x bytes per value, as stored
    normalization: Literal["l2-concat"] = "l2-concat"  # unit norm of the concatenated features
    source: str  # where the rows come from (the run's training split, never its validation)
    source_images: int  # training images available; rows <= source_images
    subsample: Literal["all", "stratified"]
    seed: int
    fingerprint: str  # SHA-256 of the bank's little-endian bytes as stored


class CalibrationMetrics(_Model):
    accuracy: float
    nll: float
    ece: float


class TemperatureFold(_Model):
    n: int
    temperature: float  # fitted on the other folds
    nll_t1: float  # held-out NLL at T = 1
    nll_fitted: float  # held-out NLL at the fold's T


class TemperatureRule(_Model):
    """Evidence of the cross-validated temperature rule (sdde_serve/temperature.py)."""

    applied: bool  # whether the fitted T was applied (else T = 1)
    reason: str
    fitted: float  # T fitted on all calibration images
    errors: int  # calibration images the ensemble misclassifies at T = 1
    folds: list[TemperatureFold] = Field(default_factory=list)
    cv_nll_t1: float | None = None
    cv_nll_fitted: float | None = None
    gain: float | None = None  # cv_nll_t1 - cv_nll_fitted
    gain_interval: list[float] | None = None  # 90% bootstrap interval (low: 1-sided 95%)


class CalibrationInfo(_Model):
    data: str
    n: int
    temperature: float = Field(gt=0.0)
    fitted_at: str
    before: CalibrationMetrics  # T = 1
    after: CalibrationMetrics  # T fitted
    # set when the fit is not to be trusted (T on the search bound: data nearly separable)
    warning: str | None = None
    # how T was chosen; absent in files exported before the cross-validated rule
    rule: TemperatureRule | None = None


class PrecisionMetrics(_Model):
    """One graph's numbers on the validation split (each graph at its own fitted T)."""

    accuracy: float
    nll: float
    ece: float
    auroc: float | None = None  # deployed OOD score vs the validation OOD set, when one is given


class PrecisionCheck(_Model):
    """A lower-precision graph measured against the fp32 graph it came from (export/quantize.py)."""

    precision: str
    data: str  # validation split the comparison ran on
    n: int
    calibration_data: str | None = None  # training images the int8 ranges came from
    ood_data: str | None = None
    n_ood: int | None = None
    fp32: PrecisionMetrics
    converted: PrecisionMetrics
    label_agreement: float  # fraction of images with the same predicted class
    max_abs_logit_diff: float
    max_accuracy_drop: float | None = None  # tolerances the export was checked against (points)
    max_auroc_drop: float | None = None

    @property
    def accuracy_drop_points(self) -> float:
        return 100.0 * (self.fp32.accuracy - self.converted.accuracy)

    @property
    def auroc_drop_points(self) -> float | None:
        if self.fp32.auroc is None or self.converted.auroc is None:
            return None
        return 100.0 * (self.fp32.auroc - self.converted.auroc)


class Manifest(_Model):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    version: str = "1"
    classes: list[str]
    input: InputSpec
    arch: str
    members: int = Field(gt=0)
    method: str
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    layout: str = "loop"
    opset: int = 17
    outputs: list[str] = Field(default_factory=lambda: list(OUTPUTS))
    temperature: float = Field(gt=0.0)
    ood: OODSpec
    calibration: CalibrationInfo
    knn: KNNSpec | None = None  # the graph has a ``knn`` output (files before it: none)
    weights_sha256: str
    # SHA-256 of the graph's structure (graph_sha256()); stamped by write_manifest, absent in
    # files written before it existed
    graph_sha256: str | None = None
    # numeric precision of the member networks (fp32, int8, fp16); heads stay float32
    precision: str = "fp32"
    precision_check: PrecisionCheck | None = None  # None for fp32
    created_at: str = Field(default_factory=lambda: now_iso())
    training_config: dict[str, Any] = Field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> str:
        return self.model_dump_json(indent=None)

    @classmethod
    def from_json(cls, text: str, *, source: str = "model") -> Manifest:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{source}: manifest is not JSON ({exc})") from None
        version = raw.get("schema_version") if isinstance(raw, dict) else None
        if version != SCHEMA_VERSION:
            raise UserError(
                f"{source}: manifest schema version {version!r}, "
                f"this runtime reads {SCHEMA_VERSION}"
            )
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise UserError(f"{source}: invalid manifest at {where}: {first['msg']}") from None


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


# --- reading and writing ONNX files -----------------------------------------------------------


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Load an ONNX file, turning every failure into one clear line."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such model file")
    try:
        return onnx.load(str(path))
    except (DecodeError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None


def read_manifest(model: onnx.ModelProto, *, source: str = "model") -> Manifest:
    for prop in model.metadata_props:
        if prop.key == MANIFEST_KEY:
            return Manifest.from_json(prop.value, source=source)
    raise UserError(f"{source}: no sdde manifest in the ONNX metadata (not exported by sdde?)")


def write_manifest(model: onnx.ModelProto, manifest: Manifest) -> None:
    """Store ``manifest`` in ``model.metadata_props`` (replacing an older one).

    The manifest is stamped with the :func:`graph_sha256` of ``model`` as it is now, so every
    writer (export, calibrate, any later graph rewrite) records the graph it sits in.
    """
    stamped = manifest.model_copy(update={"graph_sha256": graph_sha256(model)})
    keep = [(p.key, p.value) for p in model.metadata_props if p.key != MANIFEST_KEY]
    del model.metadata_props[:]
    for key, value in [*keep, (MANIFEST_KEY, stamped.to_json())]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def weights_sha256(model: onnx.ModelProto) -> str:
    """SHA-256 over every initializer but ``temperature``, in name order.

    Each initializer contributes its name, dtype, shape and little-endian bytes, so the hash is
    independent of how the protobuf stores the tensor. ``temperature`` is left out because
    ``sdde calibrate`` changes it without changing the weights.
    """
    from onnx import numpy_helper

    h = hashlib.sha256()
    for init in sorted(model.graph.initializer, key=lambda t: t.name):
        if init.name == TEMPERATURE_INITIALIZER:
            continue
        arr = np.ascontiguousarray(numpy_helper.to_array(init))
        h.update(init.name.encode())
        h.update(str(arr.dtype.newbyteorder("<")).encode())
        h.update(str(arr.shape).encode())
        h.update(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
    return h.hexdigest()


def graph_sha256(model: onnx.ModelProto) -> str:
    """SHA-256 of what the graph computes, apart from its weights: every node in order (op type,
    domain, inputs, outputs, attributes), the graph's inputs and outputs (names, types, shapes),
    the initializers' names, types and shapes, and the opset imports.

    The weights' values are :func:`weights_sha256`'s; ``temperature`` is checked against the
    manifest. Metadata (the manifest itself) is not part of it: the manifest records this hash.
    """
    h = hashlib.sha256()
    for opset in sorted((o.domain, o.version) for o in model.opset_import):
        h.update(f"opset {opset[0]} {opset[1]}\n".encode())
    graph = model.graph
    for part, items in (("input", graph.input), ("output", graph.output), ("node", graph.node)):
        for item in items:
            data = item.SerializeToString(deterministic=True)
            h.update(f"{part} {len(data)}\n".encode() + data)
    for init in sorted(graph.initializer, key=lambda t: t.name):
        h.update(f"init {init.name} {init.data_type} {list(init.dims)}\n".encode())
    return h.hexdigest()


def get_temperature(model: onnx.ModelProto) -> float:
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.name == TEMPERATURE_INITIALIZER:
            return float(numpy_helper.to_array(init))
    raise UserError(f"model has no '{TEMPERATURE_INITIALIZER}' initializer")


def set_temperature(model: onnx.ModelProto, temperature: float) -> None:
    """Replace the ``temperature`` initializer's value in place (dtype and shape kept)."""
    from onnx import numpy_helper

    if not temperature > 0.0:
        raise UserError(f"temperature must be > 0, got {temperature}")
    for i, init in enumerate(model.graph.initializer):
        if init.name == TEMPERATURE_INITIALIZER:
            old = numpy_helper.to_array(init)
            new = numpy_helper.from_array(
                np.full(old.shape, temperature, dtype=old.dtype), TEMPERATURE_INITIALIZER
            )
            model.graph.initializer[i].CopyFrom(new)
            return
    raise UserError(f"model has no '{TEMPERATURE_INITIALIZER}' initializer")


def save_onnx_atomic(model: onnx.ModelProto, path: str | Path) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``.

    A reader (a server restarting, a batch job) sees either the old file or the new one, never a
    half-written one; rename within one directory is atomic on POSIX.
    """
    from sdde_serve.atomic import write_bytes_atomic

    write_bytes_atomic(path, model.SerializeToString(), unique=True)
