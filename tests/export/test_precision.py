"""``sdde export --precision``: int8 and fp16 graphs, their checks against fp32, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from export.quantize import (
    PRECISIONS,
    PrecisionOptions,
    check_tolerances,
    member_nodes,
    to_int8,
)
from sdde_serve import calibration as cal
from sdde_serve.calibrate import run_graph
from sdde_serve.data import ArrayDataset
from sdde_serve.errors import UserError
from sdde_serve.manifest import (
    PrecisionCheck,
    PrecisionMetrics,
    get_temperature,
    load_onnx,
    read_manifest,
    weights_sha256,
)


def _noise_set(n: int = 96, seed: int = 0) -> ArrayDataset:
    """Validation OOD images for the AUROC comparison: seeded uniform noise."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 1, 8, 8), dtype=np.uint8)
    return ArrayDataset("noise", images, None, [])


@pytest.fixture(scope="module")
def int8_model(margin_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """int8 export of the run trained to margins (tests/export/conftest.py): on the tiny run's
    near-ties any kernel difference flips labels, whatever the scheme."""
    from export import export_run

    path = tmp_path_factory.mktemp("int8") / "model-int8.onnx"
    options = PrecisionOptions(precision="int8", max_accuracy_drop=100.0, ood_val=[_noise_set()])
    export_run(margin_run, path, name="margin-int8", precision=options)
    return path


def test_precision_choices_match_the_registry():
    from export.cli import PRECISION_CHOICES

    assert tuple(PRECISIONS) == PRECISION_CHOICES


def test_int8_graph_is_valid_quantized_and_agrees_with_fp32(int8_model, margin_model, margin_run):
    from training.run import load_run

    q = load_onnx(int8_model)
    onnx.checker.check_model(q, full_check=True)
    ops = {n.op_type for n in q.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # int8 per-channel convolution weights (one scale per output channel)
    int8_weights = [t for t in q.graph.initializer if t.data_type == TensorProto.INT8]
    assert int8_weights
    # the heads stay float32: `sdde calibrate` still finds and rewrites the temperature
    manifest = read_manifest(q)
    assert get_temperature(q) == pytest.approx(manifest.temperature, rel=1e-6)
    assert weights_sha256(q) == manifest.weights_sha256

    run = load_run(margin_run)
    shape = (manifest.input.channels, manifest.input.height, manifest.input.width)
    images = run.val.as_model_input(*shape)
    ref = run_graph(load_onnx(margin_model), images, ["probs"])["probs"]
    out = run_graph(q, images, ["logits", "probs", "mal"])
    agreement = float((ref.argmax(-1) == out["probs"].argmax(-1)).mean())
    assert agreement >= 0.99
    # the outputs are still what the conventions say, computed from the int8 member logits
    np.testing.assert_allclose(
        out["probs"], cal.ensemble_probs(out["logits"], manifest.temperature), atol=1e-5
    )
    np.testing.assert_allclose(out["mal"], cal.mal(out["logits"]), atol=1e-5)


def test_int8_products_cannot_saturate_the_int16_sums_of_non_vnni_kernels(int8_model):
    """Instruction-set independent: on AVX2 (no VNNI) onnxruntime adds two uint8 x int8
    products into a saturating int16 (VPMADDUBSW); with 7-bit weights no pair can overflow it,
    so the int8 graph computes the same on every x86 kind."""
    from onnx import numpy_helper

    from export.quantize import INT8_WEIGHT_MAX

    q = load_onnx(int8_model)
    weights = [numpy_helper.to_array(t) for t in q.graph.initializer]
    int8 = [w for w in weights if w.dtype == np.int8 and w.ndim >= 2]
    assert int8 and max(int(np.abs(w.astype(np.int32)).max()) for w in int8) <= INT8_WEIGHT_MAX
    uint8_activations = [t for t in q.graph.initializer if t.data_type == TensorProto.UINT8]
    assert uint8_activations  # the activation zero points: uint8, 0..255
    assert np.iinfo(np.int16).max >= 2 * 255 * INT8_WEIGHT_MAX


def test_only_the_7_bit_scheme_keeps_the_weights_within_the_bound():
    """The bound above is the scheme's doing: 8-bit weights reach 127 (and would saturate)."""
    from onnx import numpy_helper

    from export.quantize import DEFAULT_INT8_SCHEME, INT8_SCHEMES, INT8_WEIGHT_MAX

    images = np.random.default_rng(1).random((16, 4, 8, 8), dtype=np.float32)
    largest = {}
    for scheme in (DEFAULT_INT8_SCHEME, "u8s8-w8"):
        q = to_int8(_identity_shared_model(), images, scheme=scheme)
        weights = [numpy_helper.to_array(t) for t in q.graph.initializer]
        largest[scheme] = max(int(np.abs(w.astype(np.int32)).max()) for w in weights
                              if w.dtype == np.int8 and w.ndim >= 2)  # fmt: skip
    assert INT8_SCHEMES[DEFAULT_INT8_SCHEME]["reduce_range"] is True
    assert largest == {DEFAULT_INT8_SCHEME: INT8_WEIGHT_MAX, "u8s8-w8": 127}


def test_int8_manifest_records_precision_and_deltas(int8_model, margin_model, margin_run):
    from training.run import load_run

    manifest = read_manifest(load_onnx(int8_model))
    fp32 = read_manifest(load_onnx(margin_model))
    assert manifest.precision == "int8" and fp32.precision == "fp32"
    # the layout measured faster for int8 LeNet (fp32 LeNet defaults to loop)
    assert (manifest.layout, fp32.layout) == ("packed", "loop")
    assert fp32.precision_check is None
    check = manifest.precision_check
    assert check is not None and check.precision == "int8"
    assert check.data == fp32.calibration.data and check.n == fp32.calibration.n
    assert check.calibration_data and check.calibration_data.endswith(":train (512 images)")
    assert (check.ood_data, check.n_ood) == ("noise", 96)
    assert (check.max_accuracy_drop, check.max_auroc_drop) == (100.0, 0.5)
    assert (check.max_nll_increase, check.max_ece_increase) == (5.0, 2.0)
    assert check.nll_increase_percent <= 5.0 and check.ece_increase_points <= 2.0
    # the fp32 side is the fp32 export's own validation numbers
    assert check.fp32.accuracy == pytest.approx(fp32.calibration.after.accuracy)
    assert check.fp32.nll == pytest.approx(fp32.calibration.after.nll, rel=1e-4)
    # and the converted side is the int8 graph's, refitted on its own outputs
    assert check.converted.accuracy == pytest.approx(manifest.calibration.after.accuracy)
    assert check.converted.nll == pytest.approx(manifest.calibration.after.nll, rel=1e-4)
    assert check.fp32.auroc is not None and check.converted.auroc is not None
    # the issue 21 goals, on a model with margins (~89% validation accuracy)
    assert check.label_agreement >= 0.99 and abs(check.nll_increase_percent) <= 5.0
    # T and the threshold fitted on the int8 graph's own deployed score: its validation scores
    # are the conformal calibration set, and the threshold accepts at least 95% of them (less
    # alpha / n: docs/conventions.md)
    run = load_run(margin_run)
    images = run.val.as_model_input(1, manifest.input.height, manifest.input.width)
    kind = manifest.ood.score
    scores = run_graph(load_onnx(int8_model), images, [kind])[kind].astype(np.float64)
    assert manifest.ood.calibration_scores == sorted(scores.tolist())
    assert (scores >= manifest.ood.threshold).mean() >= 0.95 - 0.05 / len(scores)


def test_int8_calibration_never_reads_the_validation_split(tiny_run):
    """The activation ranges come from training images only (split.json's complement)."""
    from export.quantize import run_training_images
    from training.run import load_run

    run = load_run(tiny_run)
    shape = (1, 28, 28)
    images, name = run_training_images(run, 512, shape)
    assert len(images) == 512 and name.endswith(":train (512 images)")
    val_rows = {v.tobytes() for v in run.val.as_model_input(*shape)}
    train_rows = [img.tobytes() for img in images]
    assert not any(row in val_rows for row in train_rows)
    everything, _ = run_training_images(run, 10**6, shape)  # all of them: n - validation
    assert len(everything) + len(run.val) == len(load_dataset_of(run))


def load_dataset_of(run) -> ArrayDataset:
    from sdde_serve.data import load_dataset

    return load_dataset(run.config["data"]["spec"], split="train")


def test_refusal_beyond_tolerance_is_exit_2_and_writes_nothing(tiny_run, tmp_path, monkeypatch):
    """int8 ranges calibrated on black images: activations clip, accuracy collapses."""
    import export.quantize as q
    from sdde_serve.cli import main

    monkeypatch.setitem(q.PRECISIONS, "int8", lambda m, images: to_int8(m, images * 0.0))
    out = tmp_path / "m.onnx"
    code = main(["export", str(tiny_run), "-o", str(out), "--precision", "int8"])
    assert code == 2
    assert not out.exists()


def test_refusal_message_names_the_metric_and_the_flag():
    check = PrecisionCheck(
        precision="int8",
        data="digits@train:val",
        n=200,
        ood_data="noise",
        n_ood=100,
        fp32=PrecisionMetrics(accuracy=0.95, nll=0.2, ece=0.02, auroc=0.990),
        converted=PrecisionMetrics(accuracy=0.945, nll=0.21, ece=0.02, auroc=0.980),
        label_agreement=0.99,
        max_abs_logit_diff=0.1,
    )
    assert check.accuracy_drop_points == pytest.approx(0.5)
    assert check.auroc_drop_points == pytest.approx(1.0)
    with pytest.raises(UserError, match=r"accuracy 95.00% -> 94.50% \(0.50 points lost") as err:
        check_tolerances(check, max_accuracy_drop=0.3, max_auroc_drop=0.5)
    assert "--max-accuracy-drop 0.3" in str(err.value)
    assert "--max-auroc-drop 0.5" in str(err.value) and "nothing written" in str(err.value)
    with pytest.raises(UserError, match="AUROC") as err:
        check_tolerances(check, max_accuracy_drop=1.0, max_auroc_drop=0.5)
    assert "accuracy" not in str(err.value).split(";")[0]
    check_tolerances(check, max_accuracy_drop=0.5, max_auroc_drop=1.0)  # at the limit: passes


def test_nll_and_ece_beyond_tolerance_are_refused_with_accuracy_unchanged():
    """Probabilities that drift without flipping labels (the AVX2 saturation walkthrough:
    accuracy kept, NLL +12%, ECE doubled) are refused by the calibration tolerances."""
    same = PrecisionMetrics(accuracy=0.95, nll=0.2, ece=0.02)
    drifted = PrecisionMetrics(accuracy=0.95, nll=0.224, ece=0.045)
    check = PrecisionCheck(
        precision="int8",
        data="digits@train:val",
        n=200,
        fp32=same,
        converted=drifted,
        label_agreement=1.0,
        max_abs_logit_diff=8.15,
    )
    assert check.nll_increase_percent == pytest.approx(12.0)
    assert check.ece_increase_points == pytest.approx(2.5)
    tolerances = dict(max_accuracy_drop=0.3, max_auroc_drop=0.5)
    with pytest.raises(UserError) as err:
        check_tolerances(check, **tolerances)  # the defaults: NLL 5%, ECE 2 points
    message = str(err.value)
    assert "NLL 0.2000 -> 0.2240 (+12.0%, --max-nll-increase 5)" in message
    assert "ECE 0.0200 -> 0.0450 (+2.50 points, --max-ece-increase 2)" in message
    assert "accuracy" not in message.split("refused on")[1]
    with pytest.raises(UserError, match="ECE") as err:
        check_tolerances(check, **tolerances, max_nll_increase=12.0)  # at the limit: passes
    assert "NLL" not in str(err.value)
    check_tolerances(check, **tolerances, max_nll_increase=12.0, max_ece_increase=2.5)
    # a lower NLL or ECE than fp32's is never a reason to refuse
    better = check.model_copy(update={"fp32": drifted, "converted": same})
    check_tolerances(better, **tolerances, max_nll_increase=0.0, max_ece_increase=0.0)


def test_cli_tolerance_defaults_are_the_library_defaults():
    import argparse

    from export.cli import add_arguments, precision_options

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    options = precision_options(parser.parse_args(["RUN", "-o", "m.onnx"]))
    assert options.tolerances() == PrecisionOptions().tolerances()


def test_bf16_is_refused_before_the_slow_part(tiny_run, tmp_path, capsys):
    from sdde_serve.cli import main

    out = tmp_path / "m.onnx"
    assert main(["export", str(tiny_run), "-o", str(out), "--precision", "bf16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bf16" in err and "bfloat16" in err
    assert not out.exists()


def test_fp16_graph_runs_on_cpu_with_float32_heads(margin_run, tmp_path):
    from export import export_run
    from sdde_serve.engine import Engine

    out = tmp_path / "m16.onnx"
    manifest = export_run(margin_run, out, precision=PrecisionOptions("fp16"))
    model = load_onnx(out)
    onnx.checker.check_model(model, full_check=True)
    assert manifest.precision == "fp16" and manifest.precision_check is not None
    assert manifest.precision_check.label_agreement >= 0.99
    halves = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT16]
    assert halves and get_temperature(model) == pytest.approx(manifest.temperature, rel=1e-6)
    # inputs and outputs stay float32, so the engine and its clients do not change
    engine = Engine(out)
    x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    res = engine.run(x)
    assert res.probs.dtype == np.float32 and res.probs.shape == (3, 10)


def test_member_nodes_are_the_ancestors_of_logits(tiny_model):
    model = load_onnx(tiny_model)
    members = set(member_nodes(model))
    ops = {n.op_type for n in model.graph.node if n.name in members}
    assert {"Conv", "Gemm"} <= ops
    heads = {n.op_type for n in model.graph.node if n.name not in members}
    assert {"Softmax", "ReduceMax"} <= heads  # probs, MAL, MSP stay out of the conversion
    assert not any("temperature" in n.input for n in model.graph.node if n.name in members)


def _identity_shared_model() -> onnx.ModelProto:
    """Two convolutions with equal biases, the second's fed through an Identity (the TorchScript
    exporter deduplicates equal tensors so: BatchNorm-folded biases of an untrained ResNet),
    under a `logits` output and a temperature head."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 4, 3, 3)).astype(np.float32), "w")
    w2 = numpy_helper.from_array(rng.normal(size=(4, 4, 3, 3)).astype(np.float32), "w2")
    bias = numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "b")
    temperature = numpy_helper.from_array(np.array(1.5, np.float32), "temperature")
    shape = numpy_helper.from_array(np.array([0, 1, 4], np.int64), "shape")
    nodes = [
        helper.make_node("Conv", ["images", "w", "b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Identity", ["b"], ["b_shared"], name="dedup"),
        helper.make_node("Conv", ["r1", "w2", "b_shared"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c2"], ["pooled"], name="pool"),
        helper.make_node("Reshape", ["pooled", "shape"], ["logits"], name="to_logits"),
        helper.make_node("Div", ["logits", "temperature"], ["scaled"], name="div_t"),
        helper.make_node("Softmax", ["scaled"], ["probs"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, 4]),
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 1, 4]),
        ],
        [w, w2, bias, temperature, shape],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_int8_fuses_every_convolution_even_with_identity_shared_weights(tmp_path):
    """onnxruntime must turn both convolutions into QLinearConv: a weight reached through an
    Identity left the second one as float Conv between Dequantize/Quantize (3x slower)."""
    import onnxruntime as ort

    model = _identity_shared_model()
    images = np.random.default_rng(1).random((16, 4, 8, 8), dtype=np.float32)
    q = to_int8(model, images)
    onnx.checker.check_model(q, full_check=True)
    assert get_temperature(q) == pytest.approx(1.5)  # the head is untouched
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(
        q.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("QLinearConv") == 2 and "Conv" not in ops
    # and the int8 graph still computes what the float one does, to int8 precision
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a, b = (s.run(["logits"], {"images": images})[0] for s in (ref, session))
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()


def test_cli_options_name_each_validation_ood_set_as_given(tmp_path):
    import argparse

    from export.cli import add_arguments, precision_options

    np.savez(tmp_path / "n.npz", images=_noise_set(5).images)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    npz = tmp_path / "n.npz"
    flags = ["--precision", "int8", "--max-auroc-drop", "1.5"]
    flags += ["--ood-val", f"noise={npz}", "--ood-val", f"more={npz}"]
    args = parser.parse_args(["RUN", "-o", "m.onnx", *flags])
    options = precision_options(args)
    assert (options.precision, options.max_auroc_drop, options.max_accuracy_drop) == (
        "int8",
        1.5,
        0.3,
    )
    assert [d.name for d in options.ood_val] == ["noise", "more"]
    assert all(len(d) == 5 for d in options.ood_val)
