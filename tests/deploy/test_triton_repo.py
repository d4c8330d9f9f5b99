"""The Triton model repository: config.pbtxt parsed with Triton's schema and checked against
the graph it serves."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient
from google.protobuf import text_format

from sdde_serve.errors import UserError
from sdde_serve.manifest import read_manifest
from sdde_serve.triton import preferred_batch_sizes, write_triton_repo

ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.INT64: "TYPE_INT64"}


@functools.cache
def _triton_proto():
    """Triton's model_config_pb2 module, as tritonclient ships it.

    Loaded from its file because ``tritonclient.grpc/__init__`` needs the grpc extra we don't
    install; the generated module itself only needs protobuf.
    """
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parse(config_path: Path):
    # text_format.Parse rejects unknown fields and bad enum values: Triton would too.
    return text_format.Parse(config_path.read_text(), _triton_proto().ModelConfig())


def _graph_io(path: Path) -> tuple[list, list]:
    model = onnx.load(str(path))
    inits = {i.name for i in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in inits], list(model.graph.output)


def _check_against_graph(tensors, config_tensors) -> None:
    assert [t.name for t in config_tensors] == [v.name for v in tensors]
    for v, c in zip(tensors, config_tensors, strict=True):
        graph_dims = [
            d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim
        ]
        assert graph_dims[0] == -1  # the dynamic batch dimension Triton batches along
        dtype = _triton_proto().DataType.Name(c.data_type)
        assert dtype == ONNX_TO_TRITON[v.type.tensor_type.elem_type]
        if len(graph_dims) == 1:  # [batch] -> dims [1] reshaped to a scalar per image
            assert list(c.dims) == [1]
            assert c.HasField("reshape") and list(c.reshape.shape) == []
        else:
            assert list(c.dims) == graph_dims[1:]
            assert not c.HasField("reshape")


@pytest.mark.parametrize("fixture", ["linear_model", "tiny_model"])
def test_config_matches_graph(fixture: str, request: pytest.FixtureRequest, tmp_path: Path):
    value = request.getfixturevalue(fixture)
    onnx_path = Path(value[0] if isinstance(value, tuple) else value)
    manifest = read_manifest(onnx.load(str(onnx_path)))

    model_dir = write_triton_repo(onnx_path, tmp_path / "repo", max_batch_size=32)

    assert model_dir == tmp_path / "repo" / manifest.name
    assert (model_dir / "1" / "model.onnx").read_bytes() == onnx_path.read_bytes()
    assert (model_dir / "labels.txt").read_text().splitlines() == manifest.classes
    cfg = _parse(model_dir / "config.pbtxt")

    assert cfg.name == manifest.name
    assert cfg.platform == "onnxruntime_onnx"
    assert cfg.max_batch_size == 32
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 16, 32]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
    kind_name = _triton_proto().ModelInstanceGroup.Kind.Name
    assert [(g.count, kind_name(g.kind)) for g in cfg.instance_group] == [(1, "KIND_CPU")]
    inputs, outputs = _graph_io(onnx_path)
    _check_against_graph(inputs, cfg.input)
    _check_against_graph(outputs, cfg.output)
    assert {o.name for o in cfg.output} >= {"logits", "probs", "mal", "msp"}
    if manifest.knn is not None:  # the deployed knn score is a Triton output like the others
        assert {"minmax", "knn", manifest.ood.score} <= {o.name for o in cfg.output}
    assert [o.label_filename for o in cfg.output if o.label_filename] == ["labels.txt"]
    assert [i.name for i in cfg.input] == ["images"]
    assert list(cfg.input[0].dims) == [
        manifest.input.channels,
        manifest.input.height,
        manifest.input.width,
    ]

    # The copied graph still runs and its outputs have the shapes the config declares.
    sess = ort.InferenceSession(
        str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    x = np.random.default_rng(0).random((3, *cfg.input[0].dims), dtype=np.float32)
    for out, arr in zip(
        cfg.output, sess.run([o.name for o in cfg.output], {"images": x}), strict=True
    ):
        declared = list(out.reshape.shape) if out.HasField("reshape") else list(out.dims)
        assert list(arr.shape) == [3, *declared]


def test_gpu_kind_name_and_instance_count(linear_model, tmp_path: Path):
    path, _ = linear_model
    model_dir = write_triton_repo(
        path, tmp_path, name="digits-gpu", max_batch_size=64, instance_count=2, kind="KIND_GPU"
    )
    cfg = _parse(model_dir / "config.pbtxt")
    kind_enum = _triton_proto().ModelInstanceGroup.Kind
    assert model_dir.name == cfg.name == "digits-gpu"
    assert [(g.count, kind_enum.Name(g.kind)) for g in cfg.instance_group] == [(2, "KIND_GPU")]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [16, 32, 64]


@pytest.mark.parametrize(
    ("max_batch_size", "expected"),
    [(1, [1]), (3, [3]), (4, [4]), (10, [4, 8]), (64, [16, 32, 64]), (100, [16, 32, 64])],
)
def test_preferred_batch_sizes(max_batch_size: int, expected: list[int]):
    assert preferred_batch_sizes(max_batch_size) == expected


def test_bad_arguments_are_user_errors(linear_model, tmp_path: Path):
    path, _ = linear_model
    with pytest.raises(UserError, match="name"):
        write_triton_repo(path, tmp_path, name="../escape")
    with pytest.raises(UserError, match="max_batch_size"):
        write_triton_repo(path, tmp_path, max_batch_size=0)
    with pytest.raises(UserError, match="kind"):
        write_triton_repo(path, tmp_path, kind="KIND_TPU")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="no such model file"):
        write_triton_repo(tmp_path / "missing.onnx", tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written
