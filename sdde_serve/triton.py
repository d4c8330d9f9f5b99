"""Write a Triton Inference Server model repository for an exported SDDE model.

The same fused ONNX graph that ``sdde serve`` runs is served by Triton's ONNX Runtime backend::

    REPO/<name>/config.pbtxt     platform onnxruntime_onnx, dynamic batching, inputs and outputs
    REPO/<name>/labels.txt       class names, one a line (Triton's classification extension)
    REPO/<name>/1/model.onnx     the exported file, byte for byte (manifest included)

Inputs and outputs (names, data types, dims without the batch dimension) are read from the graph,
so the config can never disagree with the model. Torch-free: only ``onnx`` is needed.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Literal

from sdde_serve.atomic import atomic_path, write_text_atomic
from sdde_serve.errors import UserError
from sdde_serve.manifest import load_onnx, read_manifest

TritonKind = Literal["KIND_CPU", "KIND_GPU"]
KINDS: tuple[str, ...] = ("KIND_CPU", "KIND_GPU")

# onnx.TensorProto.DataType value -> Triton data type (model_config.proto DataType)
TRITON_DTYPES: dict[int, str] = {
    1: "TYPE_FP32",
    2: "TYPE_UINT8",
    3: "TYPE_INT8",
    4: "TYPE_UINT16",
    5: "TYPE_INT16",
    6: "TYPE_INT32",
    7: "TYPE_INT64",
    8: "TYPE_STRING",
    9: "TYPE_BOOL",
    10: "TYPE_FP16",
    11: "TYPE_FP64",
    12: "TYPE_UINT32",
    13: "TYPE_UINT64",
    16: "TYPE_BF16",
}

# Triton model names become directory names and URL path segments (the server scans a repository
# by the same rule: public).
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def write_triton_repo(
    onnx_path: str | Path,
    repo_dir: str | Path,
    *,
    name: str | None = None,
    max_batch_size: int = 64,
    instance_count: int = 1,
    kind: TritonKind = "KIND_CPU",
    max_queue_delay_us: int = 500,
) -> Path:
    """Write ``repo_dir/<name>/`` for Triton; returns that model directory.

    ``name`` defaults to the manifest's name. ``max_queue_delay_us`` is how long Triton may hold
    a request to form a larger batch (the counterpart of ``sdde serve``'s max queue delay).
    """
    onnx_path = Path(onnx_path)
    model = load_onnx(onnx_path)
    manifest = read_manifest(model, source=str(onnx_path))
    name = name or manifest.name
    if not MODEL_NAME_RE.match(name):
        raise UserError(f"Triton model name {name!r}: use letters, digits, '_', '-', '.'")
    if max_batch_size < 1:
        raise UserError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if instance_count < 1:
        raise UserError(f"instance_count must be >= 1, got {instance_count}")
    if kind not in KINDS:
        raise UserError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")

    initializers = {init.name for init in model.graph.initializer}
    inputs = [_tensor(v, onnx_path) for v in model.graph.input if v.name not in initializers]
    outputs = [_tensor(v, onnx_path) for v in model.graph.output]
    text = _config_text(
        name=name,
        max_batch_size=max_batch_size,
        inputs=inputs,
        outputs=outputs,
        kind=kind,
        instance_count=instance_count,
        max_queue_delay_us=max_queue_delay_us,
    )

    model_dir = Path(repo_dir) / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    # Each file is replaced whole (sdde_serve/atomic.py): a Triton polling the repository, or
    # one restarted after an interrupted export, never loads a half-written model or config.
    # The config comes last, so a new entry appears only once its model and labels are there.
    # A byte-for-byte copy keeps the manifest and the weights hash verifiable on the Triton side.
    with atomic_path(model_dir / "1" / "model.onnx", unique=True) as tmp:
        shutil.copyfile(onnx_path, tmp)
    write_text_atomic(model_dir / "labels.txt", "".join(f"{c}\n" for c in manifest.classes))
    write_text_atomic(model_dir / "config.pbtxt", text)
    return model_dir


def preferred_batch_sizes(max_batch_size: int) -> list[int]:
    """Up to three powers of two (>= 4) ending at the largest one <= ``max_batch_size``.

    Triton forms a preferred size when it can and otherwise the largest batch possible within the
    queue delay; a few large sizes keep ONNX Runtime on its efficient batched kernels.
    """
    sizes = [1 << k for k in range(2, max_batch_size.bit_length()) if 1 << k <= max_batch_size]
    return sizes[-3:] or [max_batch_size]


def _tensor(value_info, source: Path) -> tuple[str, str, list[int]]:
    """(name, Triton dtype, dims without the batch dimension) of a graph input or output."""
    ttype = value_info.type.tensor_type
    dtype = TRITON_DTYPES.get(ttype.elem_type)
    if dtype is None:
        raise UserError(f"{source}: tensor {value_info.name!r} has an unsupported element type")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in ttype.shape.dim]
    if not dims or dims[0] != -1:
        # Triton batches along a leading dynamic dimension, which every tensor must have.
        raise UserError(f"{source}: tensor {value_info.name!r} has no dynamic batch dimension")
    return value_info.name, dtype, dims[1:]


def _tensor_block(name: str, dtype: str, dims: list[int], extra: str = "") -> str:
    if dims:
        shape = f"    dims: [ {', '.join(str(d) for d in dims)} ]"
    else:
        # A per-image scalar ([batch] in the graph): Triton wants dims [1] reshaped to [].
        shape = "    dims: [ 1 ]\n    reshape: { shape: [ ] }"
    return f'  {{\n    name: "{name}"\n    data_type: {dtype}\n{shape}{extra}\n  }}'


def _config_text(
    *,
    name: str,
    max_batch_size: int,
    inputs: list[tuple[str, str, list[int]]],
    outputs: list[tuple[str, str, list[int]]],
    kind: str,
    instance_count: int,
    max_queue_delay_us: int,
) -> str:
    def label(tensor_name: str) -> str:
        return '\n    label_filename: "labels.txt"' if tensor_name == "probs" else ""

    ins = ",\n".join(_tensor_block(*t) for t in inputs)
    outs = ",\n".join(_tensor_block(*t, label(t[0])) for t in outputs)
    preferred = ", ".join(str(s) for s in preferred_batch_sizes(max_batch_size))
    return (
        "# Written by sdde_serve.triton.write_triton_repo; inputs and outputs read from the graph\n"
        f'name: "{name}"\n'
        f'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch_size}\n"
        f"input [\n{ins}\n]\n"
        f"output [\n{outs}\n]\n"
        f"dynamic_batching {{\n"
        f"  preferred_batch_size: [ {preferred} ]\n"
        f"  max_queue_delay_microseconds: {max_queue_delay_us}\n"
        f"}}\n"
        f"instance_group [\n  {{\n    count: {instance_count}\n    kind: {kind}\n  }}\n]\n"
    )
