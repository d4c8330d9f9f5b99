"""Engine and manifest on the hand-made linear ensemble (outputs recomputable in numpy)."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from sdde_serve.engine import Engine, EngineOutput, ModelLoadError
from sdde_serve.errors import UserError
from sdde_serve.manifest import (
    Manifest,
    get_temperature,
    load_onnx,
    read_manifest,
    save_onnx_atomic,
    set_temperature,
    weights_sha256,
)
from tests.onnx_factory import reference_outputs


@pytest.fixture(scope="module")
def engine(linear_model):
    return Engine(linear_model[0], intra_op_threads=1)


def test_engine_outputs_equal_numpy_reference(engine, linear_model):
    _, weights = linear_model
    x = np.random.default_rng(0).random((7, 1, 8, 8)).astype(np.float32)
    out = engine.run(x)
    ref = reference_outputs(weights, x, members=3, temperature=1.5)
    np.testing.assert_allclose(out.logits, ref["logits"], atol=1e-4)
    np.testing.assert_allclose(out.probs, ref["probs"], atol=1e-6)
    np.testing.assert_allclose(out.mal, ref["mal"], atol=1e-4)
    np.testing.assert_allclose(out.msp, ref["msp"], atol=1e-6)
    chunked = engine.run_batches(x, batch_size=3)
    np.testing.assert_array_equal(chunked.probs, out.probs)
    assert isinstance(EngineOutput.concat([out.slice(0, 2), out.slice(2, 7)]), EngineOutput)


def test_engine_reports_providers_and_checks_shapes(engine):
    assert "CPUExecutionProvider" in engine.providers
    assert engine.manifest.name == "linear-test" and engine.input_shape == (1, 8, 8)
    with pytest.raises(ValueError, match="shape"):
        engine.run(np.zeros((1, 3, 8, 8), np.float32))
    engine.warmup()


def test_manifest_round_trip(linear_model):
    proto = load_onnx(linear_model[0])
    m = read_manifest(proto)
    again = Manifest.from_json(m.to_json())
    assert again == m and again.ood.score == "mal" and again.num_classes == 4
    with pytest.raises(UserError, match="schema version"):
        Manifest.from_json(m.to_json().replace('"schema_version":1', '"schema_version":9'))
    with pytest.raises(UserError, match="not JSON"):
        Manifest.from_json("{")


def test_temperature_change_keeps_weights_hash(linear_model, tmp_path):
    proto = load_onnx(linear_model[0])
    before = weights_sha256(proto)
    set_temperature(proto, 2.5)
    assert get_temperature(proto) == pytest.approx(2.5)
    assert weights_sha256(proto) == before
    out = tmp_path / "m.onnx"
    save_onnx_atomic(proto, out)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temp files left behind
    assert get_temperature(load_onnx(out)) == pytest.approx(2.5)


def test_tampered_weights_fail_to_load(linear_model, tmp_path):
    proto = load_onnx(linear_model[0])
    for i, init in enumerate(proto.graph.initializer):
        if init.name == "W":
            w = numpy_helper.to_array(init).copy()
            w[0, 0] += 1.0
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(w, "W"))
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    with pytest.raises(ModelLoadError, match="SHA-256"):
        Engine(tmp_path / "bad.onnx")


def test_missing_and_corrupt_files_are_one_line(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model file"):
        Engine(tmp_path / "nope.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(ModelLoadError) as info:
        Engine(tmp_path / "junk.onnx")
    assert "\n" not in str(info.value)


def test_model_without_manifest(linear_model, tmp_path):
    proto = load_onnx(linear_model[0])
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "plain.onnx"))
    with pytest.raises(ModelLoadError, match="no sdde manifest"):
        Engine(tmp_path / "plain.onnx")


def test_require_gpu_fails_fast_without_a_gpu(linear_model):
    import onnxruntime as ort

    from sdde_serve.engine import cuda_usable

    if "CUDAExecutionProvider" in ort.get_available_providers() and cuda_usable():
        assert "CUDAExecutionProvider" in Engine(linear_model[0], require_gpu=True).providers
        return
    with pytest.raises(ModelLoadError, match=r"require-gpu|onnxruntime cannot load"):
        Engine(linear_model[0], require_gpu=True)


def test_spin_wait_off_is_set_on_the_session_and_changes_no_output(engine, linear_model):
    quiet = Engine(linear_model[0], intra_op_threads=1, spin_wait=False)
    options = quiet.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    x = np.random.default_rng(1).random((4, 1, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(quiet.run(x).logits, engine.run(x).logits)
