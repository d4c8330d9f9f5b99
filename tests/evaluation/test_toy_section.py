"""A report section registered in the test only, carried through ``sdde eval``: adding an
analysis is one module with a ``SECTION`` and one registration line (docs/evaluation.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sdde_serve import calibration as cal
from sdde_serve.cli import main as sdde_main
from sdde_serve.data import load_dataset
from sdde_serve.evaluation import sections
from sdde_serve.evaluation.plotting import pyplot, save
from sdde_serve.evaluation.results import Evaluation
from sdde_serve.evaluation.section import Context, Loader, Section, pct
from tests.evaluation.helpers import check_png, labelled_npz
from tests.onnx_factory import reference_outputs

# --- the toy section: what a new analysis module would hold ------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--per-class", action="store_true", help="accuracy of each class")


def configure(args: argparse.Namespace, load: Loader) -> bool | None:
    return True if args.per_class else None


def compute(ctx: Context, config: bool) -> dict[str, Any]:
    ev = ctx.evaluation
    correct = ev.probs_after.argmax(axis=1) == ev.labels
    n = np.bincount(ev.labels, minlength=len(ev.classes))
    hits = np.bincount(ev.labels, weights=correct, minlength=len(ev.classes))
    acc = [float(h / c) if c else None for h, c in zip(hits, n, strict=True)]
    return {"per_class": {"classes": ev.classes, "n": n.tolist(), "accuracy": acc}}


def markdown(m: dict[str, Any]) -> list[str]:
    block = m.get("per_class")
    if not block:
        return []
    rows = zip(block["classes"], block["n"], block["accuracy"], strict=True)
    return [
        "## Per-class accuracy",
        "",
        "| class | images | accuracy (%) |",
        "|---|---|---|",
        *[f"| {c} | {n} | {pct(a)} |" for c, n, a in rows],
        "",
    ]


def plots(evaluation: Evaluation, out: Path) -> list[Path]:
    block = evaluation.metrics.get("per_class")
    if not block:
        return []
    fig, ax = pyplot().subplots(figsize=(4, 3))
    ax.bar(block["classes"], [a or 0.0 for a in block["accuracy"]])
    return [save(fig, out / "per_class.png")]


def summary(m: dict[str, Any]) -> list[str]:
    block = m.get("per_class")
    return [f"worst class accuracy {pct(min(block['accuracy']))}%"] if block else []


PER_CLASS = Section(
    "per_class", compute, markdown, plots, summary, add_arguments=add_arguments, configure=configure
)

# --- the test -----------------------------------------------------------------------------------


@pytest.fixture
def per_class():
    sections.register(PER_CLASS)  # the registration line
    try:
        yield PER_CLASS
    finally:
        sections.unregister("per_class")


def test_a_registered_section_goes_through_sdde_eval(
    per_class, linear_model, tmp_path: Path, capsys
) -> None:
    path, weights = linear_model
    id_spec = str(labelled_npz(tmp_path / "id.npz", 200, 8, classes=4, seed=3))
    out = tmp_path / "report"
    argv = ["eval", str(path), "--data", id_spec, "--out-dir", str(out), "--threads", "1"]
    assert sdde_main([*argv, "--per-class"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    # numpy reference: the graph's calibrated probs recomputed from the hand-made weights
    data = load_dataset(id_spec, split="test")
    probs = reference_outputs(weights, data.as_model_input(1, 8, 8), 3, 1.5)["probs"]
    correct = probs.argmax(1) == data.labels
    expected = [correct[data.labels == c].mean() for c in range(4)]
    np.testing.assert_allclose(m["per_class"]["accuracy"], expected)
    assert m["per_class"]["n"] == np.bincount(data.labels, minlength=4).tolist()
    # weighted by the class sizes, the per-class accuracies give the overall one
    overall = np.dot(m["per_class"]["n"], m["per_class"]["accuracy"]) / 200
    assert overall == pytest.approx(m["classification"]["after"]["accuracy"])
    assert list(m)[-1] == "per_class"  # after the built-in sections, in registration order
    assert cal.accuracy(probs, data.labels) == pytest.approx(overall)
    report = (out / "report.md").read_text()
    assert "## Per-class accuracy" in report and "![per_class](per_class.png)" in report
    assert report.index("## Per-class accuracy") > report.index("## Consistency check")
    check_png(out / "per_class.png")
    assert f"worst class accuracy {100 * min(expected):.2f}%" in capsys.readouterr().out
    # not asked for: not computed, not rendered
    assert sdde_main([*argv, "--no-plots"]) == 0
    assert "per_class" not in json.loads((out / "metrics.json").read_text())
    assert "Per-class" not in (out / "report.md").read_text()


def test_a_name_registers_once(per_class) -> None:
    with pytest.raises(ValueError, match="registered already"):
        sections.register(PER_CLASS)
