"""The engine refuses a model file whose manifest disagrees with its graph, and one whose bytes
are not the pinned SHA-256 (``--expect-sha256``); every refusal is one line, exit status 2."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from sdde_serve.cli import main as sdde_main
from sdde_serve.engine import Engine, ModelLoadError
from sdde_serve.manifest import (
    InputSpec,
    graph_sha256,
    load_onnx,
    read_manifest,
    set_temperature,
    write_manifest,
)


def _rewrite(src: Path, dst: Path, *, graph=None, **manifest_update) -> Path:
    """Copy ``src`` with the manifest updated (re-stamped) and/or the graph edited by ``graph``
    after the manifest was written (so the manifest does not know about the edit)."""
    proto = load_onnx(src)
    manifest = read_manifest(proto)
    if manifest_update:
        write_manifest(proto, manifest.model_copy(update=manifest_update))
    if graph is not None:
        graph(proto)
    onnx.save(proto, str(dst))
    return dst


def _refused(path: Path, match: str) -> str:
    with pytest.raises(ModelLoadError, match=match) as info:
        Engine(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_manifest_classes_or_members_other_than_the_graph_are_refused(linear_model, tmp_path):
    src, _ = linear_model  # 3 members, 4 classes
    fewer = _rewrite(src, tmp_path / "c.onnx", classes=["a", "b", "c"])
    assert "3 classes" in _refused(fewer, "output 'logits' has shape \\[1, 3, 4\\]")
    members = _rewrite(src, tmp_path / "m.onnx", members=5)
    _refused(members, "5 members")


def test_a_temperature_other_than_the_manifest_is_refused(linear_model, tmp_path):
    src, _ = linear_model
    _refused(_rewrite(src, tmp_path / "t.onnx", graph=lambda p: set_temperature(p, 3.0)), "3")
    # sdde calibrate changes both together: accepted
    proto = load_onnx(src)
    set_temperature(proto, 3.0)
    write_manifest(proto, read_manifest(proto).model_copy(update={"temperature": 3.0}))
    onnx.save(proto, str(tmp_path / "both.onnx"))
    assert Engine(tmp_path / "both.onnx").manifest.temperature == 3.0


def test_graph_edits_unknown_to_the_manifest_are_refused(linear_model, tmp_path):
    src, _ = linear_model

    def swap_op(proto):  # Sub -> Add: same weights, other function
        proto.graph.node[0].op_type = "Add"

    _refused(_rewrite(src, tmp_path / "g.onnx", graph=swap_op), "graph_sha256")
    size = _rewrite(src, tmp_path / "s.onnx", input=InputSpec(**{**_input(src), "height": 9}))
    _refused(size, "input 'images'")


def _input(src: Path) -> dict:
    return read_manifest(load_onnx(src)).input.model_dump()


def _add_output(proto: onnx.ModelProto, name: str) -> None:
    proto.graph.node.append(helper.make_node("Identity", ["mal"], [name]))
    proto.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [None]))


def test_outputs_must_be_the_manifests_and_declared_extras_are_accepted(linear_model, tmp_path):
    src, _ = linear_model
    undeclared = _rewrite(src, tmp_path / "u.onnx", graph=lambda p: _add_output(p, "knn"))
    _refused(undeclared, "graph_sha256|differ from the manifest's outputs")
    # an output the manifest declares (as issue 10's knn/minmax are): loads and is served
    proto = load_onnx(src)
    _add_output(proto, "knn")
    manifest = read_manifest(proto)
    write_manifest(proto, manifest.model_copy(update={"outputs": [*manifest.outputs, "knn"]}))
    onnx.save(proto, str(tmp_path / "declared.onnx"))
    engine = Engine(tmp_path / "declared.onnx")
    assert "knn" in engine.output_names
    missing = _rewrite(src, tmp_path / "missing.onnx", outputs=["logits", "probs", "mal"])
    _refused(missing, "differ from the manifest's outputs")


def test_the_graph_hash_is_stamped_by_every_manifest_writer(linear_model):
    src, _ = linear_model
    proto = load_onnx(src)
    assert read_manifest(proto).graph_sha256 == graph_sha256(proto)
    set_temperature(proto, 2.0)  # weights-only edits leave the graph hash alone
    assert graph_sha256(proto) == read_manifest(proto).graph_sha256


def test_expect_sha256_pins_the_file_bytes(linear_model, tmp_path, capsys):
    src, _ = linear_model
    digest = hashlib.sha256(src.read_bytes()).hexdigest()  # what sha256sum prints
    engine = Engine(src, expect_sha256=digest.upper())
    assert engine.sha256 == digest
    with pytest.raises(ModelLoadError, match="not the expected"):
        Engine(src, expect_sha256="0" * 64)
    for argv in (
        ["serve", str(src), "--expect-sha256", "0" * 64, "--port", "0"],
        ["score", str(src), str(src), "-o", str(tmp_path / "o.jsonl"), "--expect-sha256", "ab"],
    ):
        assert sdde_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "not the expected" in err and len(err.splitlines()) == 1


def test_an_invalid_onnx_graph_is_one_line_and_exit_2(linear_model, tmp_path, capsys):
    src, _ = linear_model

    def unknown_op(proto):
        proto.graph.node[0].op_type = "NoSuchOp"

    bad = _rewrite(src, tmp_path / "bad.onnx", graph=unknown_op)
    # re-stamp so only the checker can object
    proto = load_onnx(bad)
    write_manifest(proto, read_manifest(proto))
    onnx.save(proto, str(bad))
    _refused(bad, "invalid ONNX graph")
    assert sdde_main(["serve", str(bad), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "invalid ONNX graph" in err and len(err.splitlines()) == 1
    assert "Traceback" not in err


def test_a_good_model_still_loads_and_answers(linear_model):
    src, _ = linear_model
    engine = Engine(src)
    out = engine.run(np.zeros((2, 1, 8, 8), np.float32))
    assert out.logits.shape == (2, 3, 4) and len(engine.sha256) == 64
