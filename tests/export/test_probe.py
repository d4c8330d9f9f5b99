"""The load-time self-check: the manifest's probe batch, run by the engine on this machine.

Instruction-set independent: every expectation is either the export's own outputs (which this
machine reproduces whatever its kernels, being the machine that exported) or a hand-altered copy.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from export.quantize import PrecisionOptions
from sdde_serve import scores as score_registry
from sdde_serve.engine import Engine, ModelLoadError
from sdde_serve.errors import UserError
from sdde_serve.manifest import (
    MANIFEST_KEY,
    Manifest,
    load_onnx,
    read_manifest,
    save_onnx_atomic,
    set_temperature,
    write_manifest,
)
from sdde_serve.probe import (
    PROBE_IMAGES,
    PROBE_TOLERANCES,
    cpu_kind,
    expected_outputs,
    probe_images,
    probe_problem,
)


def _rewrite(src: Path, dst: Path, **update: object) -> Path:
    """A copy of ``src`` whose manifest fields are replaced (``probe`` and ``temperature``)."""
    model = load_onnx(src)
    manifest = read_manifest(model)
    if "temperature" in update:
        set_temperature(model, float(update["temperature"]))  # type: ignore[arg-type]
    write_manifest(model, manifest.model_copy(update=update))
    save_onnx_atomic(model, dst)
    return dst


def _altered_logits(model: Path, tmp_path: Path, by: float) -> Path:
    probe = read_manifest(load_onnx(model)).probe
    assert probe is not None
    logits = np.asarray(probe.logits)
    logits[0, 0, 0] += by
    altered = probe.model_copy(update={"logits": logits.tolist()})
    return _rewrite(model, tmp_path / "altered.onnx", probe=altered)


def test_export_stores_a_compact_probe_of_validation_images(tiny_model, tiny_run):
    from training.run import load_run

    manifest = read_manifest(load_onnx(tiny_model))
    probe = manifest.probe
    assert probe is not None and probe.n == PROBE_IMAGES
    assert probe.computed_on == cpu_kind() and probe.knn is not None  # the tiny model has a bank
    shape = (manifest.input.channels, manifest.input.height, manifest.input.width)
    images = probe_images(probe, shape)
    # the first validation images, as uint8 (the digits are 8-bit already: exact)
    val = load_run(tiny_run).val.as_model_input(*shape)[:PROBE_IMAGES]
    np.testing.assert_allclose(images, val, atol=0.5 / 255)
    assert len(probe.images) < 4 * PROBE_IMAGES * int(np.prod(shape)) / 3 + 4  # base64 of uint8
    # logit tolerance: fp32's relative one, on the scale of the stored logits
    rtol, atol = PROBE_TOLERANCES["fp32"]
    scale = max(1.0, float(np.abs(np.asarray(probe.logits)).max()))
    assert probe.logit_tolerance == pytest.approx(rtol * scale) and probe.prob_tolerance == atol


def test_expected_outputs_follow_the_manifest_temperature(tiny_model):
    """probs are mean_m softmax(stored logits / T) at the manifest's T, so a new T (sdde
    calibrate) needs no new probe; the deployed score is computed from the same logits."""
    manifest = read_manifest(load_onnx(tiny_model))
    probe = manifest.probe
    assert probe is not None
    for t in (manifest.temperature, 2.5):
        at_t = manifest.model_copy(update={"temperature": t})
        want = expected_outputs(probe, at_t)
        z = np.asarray(probe.logits, np.float64)
        e = np.exp(z / t - (z / t).max(-1, keepdims=True))
        np.testing.assert_allclose(want["probs"], (e / e.sum(-1, keepdims=True)).mean(1))
        kind = manifest.ood.score
        if kind == "knn":
            np.testing.assert_array_equal(want["knn"], np.asarray(probe.knn, np.float64))
        else:
            spec = score_registry.get(kind)
            np.testing.assert_allclose(want[kind], spec.compute(score_registry.ScoreData(z, t)))


def test_probe_problem_is_none_within_and_names_the_output_beyond_tolerance(tiny_model):
    manifest = read_manifest(load_onnx(tiny_model))
    probe = manifest.probe
    assert probe is not None
    want = expected_outputs(probe, manifest)
    assert probe_problem(probe, manifest, dict(want)) is None
    near = {**want, "logits": want["logits"] + 0.9 * probe.logit_tolerance}
    near[manifest.ood.score] = want[manifest.ood.score]
    assert probe_problem(probe, manifest, near) is None
    far = {**want, "logits": want["logits"] + 1.5 * probe.logit_tolerance}
    problem = probe_problem(probe, manifest, far)
    assert problem is not None and problem.startswith("the probe's logits differ")
    assert "\n" not in problem and cpu_kind() in problem and "fp32" in problem
    nan = {**want, "probs": np.full_like(want["probs"], np.nan)}
    assert "probe's probs" in (probe_problem(probe, manifest, nan) or "")


def test_engine_refuses_a_model_whose_probe_outputs_were_altered(tiny_model, tmp_path, caplog):
    altered = _altered_logits(tiny_model, tmp_path, by=1.0)
    with pytest.raises(ModelLoadError) as err:
        Engine(altered)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(altered))
    assert "probe's logits differ from the export's by 1" in message
    assert "--probe-check warn" in message
    # warn: loads, serves and says why once
    with caplog.at_level(logging.WARNING, logger="sdde.engine"):
        engine = Engine(altered, probe_check="warn")
    assert engine.run(np.zeros((1, 1, 28, 28), np.float32)).probs.shape == (1, 10)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "probe's logits differ" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sdde.engine"):
        Engine(altered, probe_check="off")
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    with pytest.raises(UserError, match="--probe-check must be one of refuse, warn, off"):
        Engine(tiny_model, probe_check="maybe")


def test_a_change_within_tolerance_still_loads(tiny_model, tmp_path):
    probe = read_manifest(load_onnx(tiny_model)).probe
    assert probe is not None
    Engine(_altered_logits(tiny_model, tmp_path, by=0.5 * probe.logit_tolerance))


def test_a_new_temperature_keeps_the_probe_valid(tiny_model, tmp_path):
    from sdde_serve.calibrate import calibrate_file

    hotter = _rewrite(tiny_model, tmp_path / "t.onnx", temperature=2.5)
    assert Engine(hotter).manifest.temperature == 2.5
    refitted = shutil.copy(tiny_model, tmp_path / "calibrated.onnx")
    calibrate_file(refitted, "digits@test")
    Engine(refitted)  # refuse mode: the probe still holds at the refitted T


def test_files_exported_before_the_probe_still_load(tiny_model, tmp_path):
    model = load_onnx(tiny_model)
    raw = json.loads(read_manifest(model).to_json())
    del raw["probe"]  # an older manifest has no such key at all
    old = Manifest.from_json(json.dumps(raw))
    assert old.probe is None
    write_manifest(model, old)
    assert all(
        "probe" not in json.loads(p.value) or json.loads(p.value)["probe"] is None
        for p in model.metadata_props
        if p.key == MANIFEST_KEY
    )
    save_onnx_atomic(model, tmp_path / "old.onnx")
    assert Engine(tmp_path / "old.onnx").manifest.probe is None


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_lower_precision_exports_pass_their_own_probe(precision, margin_run, tmp_path):
    from export import export_run

    out = tmp_path / f"m-{precision}.onnx"
    manifest = export_run(margin_run, out, precision=PrecisionOptions(precision))
    probe = manifest.probe
    assert probe is not None
    assert probe.prob_tolerance == PROBE_TOLERANCES[precision][1]
    engine = Engine(out)  # refuse mode
    # the stored logits are the converted graph's, not fp32's: reproduced on this machine
    images = probe_images(probe, engine.input_shape)
    np.testing.assert_allclose(engine.run(images).logits, probe.logits, atol=1e-5)


def test_score_cli_refuses_in_one_line_and_serves_with_warn(tiny_model, tmp_path, capsys):
    from PIL import Image

    from sdde_serve.cli import main

    altered = _altered_logits(tiny_model, tmp_path, by=1.0)
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "x.png")
    out = tmp_path / "out.jsonl"
    assert main(["score", str(altered), str(tmp_path / "x.png"), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "probe" in err and len(err.splitlines()) == 1
    flags = ["--probe-check", "warn"]
    assert main(["score", str(altered), str(tmp_path / "x.png"), "-o", str(out), *flags]) == 0


def test_serve_setting_is_the_engine_option():
    from sdde_serve.probe import DEFAULT_PROBE_MODE, PROBE_MODES
    from sdde_serve.server.cli import FLAGS
    from sdde_serve.server.settings import Settings

    assert FLAGS["--probe-check"] == ("probe_check", {"choices": PROBE_MODES})
    assert Settings().probe_check == DEFAULT_PROBE_MODE == "refuse"
    assert Settings(probe_check="warn").probe_check == "warn"


@pytest.mark.parametrize("module", ["sdde_serve.evaluation.cli", "sdde_serve.batch.cli"])
def test_eval_and_score_take_the_same_probe_flag(module):
    import argparse
    import importlib

    parser = argparse.ArgumentParser()
    importlib.import_module(module).add_arguments(parser)
    action = next(a for a in parser._actions if "--probe-check" in a.option_strings)
    assert (tuple(action.choices), action.default) == (("refuse", "warn", "off"), "refuse")


def test_a_deployed_score_of_the_logits_is_checked_with_its_registry_reference(tiny_run, tmp_path):
    """energy (registered after the probe existed) is compared with the registry's reference
    on the stored logits at the manifest's T, on the logits' tolerance."""
    from export import export_run

    export_run(tiny_run, tmp_path / "energy.onnx", score="energy", with_cams=False)
    engine = Engine(tmp_path / "energy.onnx")  # refuse mode: its energy matches the reference
    probe, at_energy = engine.manifest.probe, engine.manifest
    assert probe is not None
    want = expected_outputs(probe, at_energy)
    z, t = np.asarray(probe.logits, np.float64), at_energy.temperature
    np.testing.assert_allclose(want["energy"], t * np.log(np.exp(z.mean(axis=1) / t).sum(-1)))
    out = engine.run(probe_images(probe, engine.input_shape))
    got = {"logits": out.logits, "probs": out.probs, "energy": out.score("energy")}
    assert probe_problem(probe, at_energy, got) is None
    # on the logits' scale: a difference beyond the probability tolerance but within the
    # logits' passes, one beyond the logits' does not
    wide = probe.model_copy(update={"logit_tolerance": 10 * probe.prob_tolerance})
    near = {**got, "energy": want["energy"] + 5 * probe.prob_tolerance}
    assert probe_problem(wide, at_energy, near) is None
    far = {**got, "energy": want["energy"] + 15 * probe.prob_tolerance}
    assert (probe_problem(wide, at_energy, far) or "").startswith("the probe's energy differ")
