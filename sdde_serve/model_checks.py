"""A model file checked against itself before it is served, and pinned by its digest.

A manifest that disagrees with its graph used to load and then answer 500 while reporting ready
(5 classes for a 10-class graph), or serve a ``temperature`` other than the one it reports. The
engine now refuses such a file at load time with one line (:class:`ModelLoadError`):

* the ONNX structure passes ``onnx.checker`` (a ``ValidationError`` is one line, not a trace);
* ``weights_sha256`` (initializer values) and ``graph_sha256`` (nodes, graph I/O, initializer
  names/types/shapes, opsets) in the manifest match the file;
* the ``temperature`` initializer equals the manifest's ``temperature``;
* the graph's outputs are the manifest's ``outputs`` (so additions declared by the manifest are
  accepted), including the required ones; the ``images`` input is float32 with the manifest's
  channels, height and width;
* one image through the session gives outputs shaped by the manifest's members and classes.

These catch accidents and inconsistent edits. Someone who can rewrite the file can also rewrite
the hashes inside it, so tamper resistance comes from outside: ``--expect-sha256`` pins the
SHA-256 of the file's bytes (what ``sha256sum model.onnx`` prints), which covers the graph, the
weights, the temperature and the manifest at once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sdde_serve.errors import UserError, permission_denied
from sdde_serve.manifest import (
    TEMPERATURE_INITIALIZER,
    Manifest,
    graph_sha256,
    weights_sha256,
)

if TYPE_CHECKING:
    import onnx

INPUT_NAME = "images"
# outputs every served graph has (the engine fetches them; older graphs lack only newer scores)
REQUIRED_OUTPUTS = ("logits", "probs", "mal", "msp")
FLOAT = 1  # onnx.TensorProto.FLOAT


class ModelLoadError(UserError):
    """The model file cannot be served (missing, corrupt, tampered, wrong graph)."""


def read_model(path: Path) -> tuple[onnx.ModelProto, str]:
    """The parsed model and the SHA-256 of the file's bytes (read once)."""
    import onnx
    from google.protobuf.message import DecodeError

    if not path.is_file():
        raise ModelLoadError(f"{path}: no such model file")
    try:
        data = path.read_bytes()
        return onnx.load_model_from_string(data), hashlib.sha256(data).hexdigest()
    except PermissionError:
        raise ModelLoadError(permission_denied(path)) from None
    except (DecodeError, OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None


def check_digest(path: Path, actual: str, expected: str | None) -> None:
    if expected is None:
        return
    expected = expected.strip().lower()
    if actual != expected:
        raise ModelLoadError(
            f"{path}: SHA-256 {actual} is not the expected {expected} (--expect-sha256): "
            "not the model that was pinned"
        )


def check_file(proto: onnx.ModelProto, manifest: Manifest, path: Path) -> None:
    """Structure, hashes, temperature, declared outputs and the input, from the file alone."""
    import onnx

    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{path}: invalid ONNX graph ({first[:200]})") from None
    try:
        weights = weights_sha256(proto)
        graph = graph_sha256(proto)
    except Exception as exc:  # a malformed tensor: numpy_helper raises ValueError/TypeError
        raise ModelLoadError(f"{path}: unreadable initializers ({type(exc).__name__})") from None
    if weights != manifest.weights_sha256:
        raise ModelLoadError(
            f"{path}: weights do not match the manifest's SHA-256 "
            f"(manifest {manifest.weights_sha256[:12]}…, file {weights[:12]}…)"
        )
    if manifest.graph_sha256 is not None and graph != manifest.graph_sha256:
        raise ModelLoadError(
            f"{path}: the graph does not match the manifest's graph_sha256 "
            f"(manifest {manifest.graph_sha256[:12]}…, file {graph[:12]}…)"
        )
    _check_temperature(proto, manifest, path)
    _check_io(proto, manifest, path)


def _check_temperature(proto: onnx.ModelProto, manifest: Manifest, path: Path) -> None:
    from onnx import numpy_helper

    found = [i for i in proto.graph.initializer if i.name == TEMPERATURE_INITIALIZER]
    if not found:
        raise ModelLoadError(f"{path}: graph has no '{TEMPERATURE_INITIALIZER}' initializer")
    values = np.asarray(numpy_helper.to_array(found[0]), dtype=np.float64).reshape(-1)
    stored = np.float32(manifest.temperature)  # the graph holds float32
    if values.size == 0 or not np.all(np.isclose(values, stored, rtol=1e-6, atol=0.0)):
        raise ModelLoadError(
            f"{path}: the graph's temperature {values.tolist()[:3]} differs from the "
            f"manifest's {manifest.temperature:g}; recalibrate with sdde calibrate"
        )


def _dims(value_info: Any) -> list[int | None]:
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]


def _check_io(proto: onnx.ModelProto, manifest: Manifest, path: Path) -> None:
    inputs = {i.name: i for i in proto.graph.input}
    if INPUT_NAME not in inputs:
        raise ModelLoadError(f"{path}: graph has no '{INPUT_NAME}' input")
    image = inputs[INPUT_NAME]
    spec = manifest.input
    dims = _dims(image)
    expected = [None, spec.channels, spec.height, spec.width]
    if (
        image.type.tensor_type.elem_type != FLOAT
        or len(dims) != 4
        or any(d is not None and d != e for d, e in zip(dims[1:], expected[1:], strict=True))
    ):
        raise ModelLoadError(
            f"{path}: graph input '{INPUT_NAME}' is {dims}, the manifest says float32 "
            f"[B, {spec.channels}, {spec.height}, {spec.width}]"
        )
    graph_outputs = [o.name for o in proto.graph.output]
    missing = [o for o in REQUIRED_OUTPUTS if o not in graph_outputs]
    if missing:
        raise ModelLoadError(f"{path}: graph lacks outputs {missing}")
    if set(graph_outputs) != set(manifest.outputs):
        raise ModelLoadError(
            f"{path}: graph outputs {sorted(graph_outputs)} differ from the manifest's "
            f"outputs {sorted(manifest.outputs)}"
        )


def expected_shapes(manifest: Manifest, batch: int) -> dict[str, tuple[int, ...]]:
    """Output shapes fixed by the manifest (other outputs: only the batch dimension)."""
    n, c = manifest.members, manifest.num_classes
    return {"logits": (batch, n, c), "probs": (batch, c), "mal": (batch,), "msp": (batch,)}


def check_outputs(outputs: dict[str, np.ndarray], manifest: Manifest, path: Path) -> None:
    """Shapes of one probe batch against the manifest's members and classes."""
    batch = len(next(iter(outputs.values())))
    fixed = expected_shapes(manifest, batch)
    for name, value in outputs.items():
        shape = tuple(value.shape)
        want = fixed.get(name)
        bad = shape != want if want is not None else (not shape or shape[0] != batch)
        if name == "cams" and not bad:
            bad = len(shape) != 4 or shape[1] != manifest.members
        if bad:
            raise ModelLoadError(
                f"{path}: output {name!r} has shape {list(shape)} for {batch} image(s); the "
                f"manifest ({manifest.members} members, {manifest.num_classes} classes) needs "
                f"{list(want) if want is not None else [batch, '...']}"
            )
