"""Write an :class:`~sdde_serve.evaluation.results.Evaluation` as metrics.json, report.md and PNGs.

The report is a header (what was evaluated, the conventions) followed by each registered section's
markdown and plots (:mod:`.sections`), in registration order; every file is replaced atomically
(``sdde_serve.atomic``), so a reader never sees half a report file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from sdde_serve.atomic import write_text_atomic
from sdde_serve.errors import UserError
from sdde_serve.evaluation.plotting import pyplot
from sdde_serve.evaluation.results import Evaluation
from sdde_serve.evaluation.sections import SECTIONS


def jsonable(obj: Any) -> Any:
    """Floats that JSON can't hold (NaN, inf) become null; numpy scalars become Python ones."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_metrics(evaluation: Evaluation, path: Path) -> None:
    text = json.dumps(jsonable(evaluation.metrics), indent=2, allow_nan=False) + "\n"
    write_text_atomic(path, text)


def write_plots(evaluation: Evaluation, out: Path) -> list[Path]:
    """Every section's PNGs in ``out``, in section order."""
    return [p for section in SECTIONS for p in section.plots(evaluation, out)]


def _header(m: dict[str, Any]) -> list[str]:
    model, conv = m["model"], m["conventions"]
    return [
        f"# Evaluation of {model['name']} v{model['version']}",
        "",
        f"Model file `{model['path']}`: {model['members']} × {model['arch']} ({model['method']}), "
        f"{model['classes']} classes, temperature T = {model['temperature']:.4g}, run with "
        f"onnxruntime on {', '.join(model['providers'])}.",
        f"In-distribution test data: `{m['data']['id']['spec'] or m['data']['id']['name']}` "
        f"({m['data']['id']['n']} images).",
        "",
        "## Conventions",
        "",
        f"* Positive class: {conv['positive_class']}.",
        "* OOD metrics are in percent; FPR@95 lower is better, the others higher.",
        "* ECE uses 15 equal-width confidence bins. *Before* = T = 1 from the graph's member "
        f"logits; *after* = {conv['after_calibration']}.",
        "* Group rows are unweighted means over the group's OOD sets.",
        "",
    ]


def render_markdown(evaluation: Evaluation, plots: list[Path]) -> str:
    """report.md: the header, each section's markdown, then the plots."""
    m = evaluation.metrics
    lines = _header(m)
    for section in SECTIONS:
        lines += section.markdown(m)
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{p.stem}]({p.name})" for p in plots]
        lines.append("")
    return "\n".join(lines)


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """The console summary of ``sdde eval``: each section's lines."""
    return [line for section in SECTIONS for line in section.summary(metrics)]


def write_report(evaluation: Evaluation, out: str | Path, *, plots: bool = True) -> list[Path]:
    """Write metrics.json, report.md and (with ``plots``) the PNGs into ``out``."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"-o {out}: cannot create the output directory ({exc})") from None
    if plots:
        pyplot()  # fail before writing anything when matplotlib is missing
    written = write_plots(evaluation, out) if plots else []
    write_metrics(evaluation, out / "metrics.json")
    write_text_atomic(out / "report.md", render_markdown(evaluation, written))
    return [out / "metrics.json", out / "report.md", *written]
