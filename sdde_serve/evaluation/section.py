"""The one interface of a report section, and the registry every section is listed in.

A section is one analysis of ``sdde eval``: it **computes** its entries of metrics.json from a
:class:`Context` (the scored data sets and the engine), renders them as **markdown** lines of
report.md, draws its **plots** and prints its console **summary**. An optional analysis
(``--shift``) also declares its command-line flags and turns them into a config (``None``: not
asked for).

:func:`~sdde_serve.evaluation.evaluate.evaluate`, :func:`~sdde_serve.evaluation.report.write_report`
and ``sdde eval`` iterate :data:`SECTIONS` in registration order (the order of metrics.json's keys,
of report.md and of the console lines): adding an analysis is one module with a ``SECTION`` and one
registration line (built-ins: sdde_serve/evaluation/sections.py; docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdde_serve.data import ArrayDataset
    from sdde_serve.engine import Engine, EngineOutput
    from sdde_serve.evaluation.results import Evaluation

# a data spec ("digits@train", a folder, an .npz) -> the data set, decoded as the model's input
Loader = Callable[[str], "ArrayDataset"]


@dataclass
class Context:
    """What a section computes from: the main pass's scored sets and the engine for more passes."""

    engine: Engine
    evaluation: Evaluation  # its ``metrics`` hold the entries of the sections computed so far
    id_data: ArrayDataset
    id_output: EngineOutput  # the graph's outputs on the ID test data
    cam_source: str | None  # "checkpoint" or "graph" when the sets carry CAMs
    batch_size: int = 256
    progress: Callable[[str], None] | None = None  # one line per slow step (stderr in sdde eval)

    def report(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)


def no_plots(evaluation: Evaluation, out: Path) -> list[Path]:
    return []


def no_lines(metrics: dict[str, Any]) -> list[str]:
    return []


@dataclass(frozen=True)
class Section:
    """``compute(context, config)`` returns the section's metrics.json entries (usually one key,
    ``name``); ``markdown``, ``plots`` and ``summary`` read them back from the whole metrics dict
    (so a report can be redrawn from metrics.json) and return nothing when they are absent.

    ``configure(args, load)`` makes an optional section's config from its flags (``None``: not
    asked for); a section without one always runs, with config ``None``."""

    name: str
    compute: Callable[[Context, Any], dict[str, Any]]
    markdown: Callable[[dict[str, Any]], list[str]]
    plots: Callable[[Evaluation, Path], list[Path]] = no_plots
    summary: Callable[[dict[str, Any]], list[str]] = no_lines
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    configure: Callable[[argparse.Namespace, Loader], Any] | None = None

    @property
    def optional(self) -> bool:
        return self.configure is not None


def block_section(
    name: str,
    compute: Callable[[Context, Any], dict[str, Any]],
    markdown: Callable[[dict[str, Any]], list[str]],
    plots: Callable[[dict[str, Any], Path], list[Path]],
    summary: Callable[[dict[str, Any] | None], list[str]],
    **options: Any,
) -> Section:
    """A section whose renderers take its own block (``metrics[name]``), not the whole dict:
    markdown and plots are skipped when the block is absent; ``summary`` is handed ``None``."""

    def block_markdown(metrics: dict[str, Any]) -> list[str]:
        block = metrics.get(name)
        return markdown(block) if block else []

    def block_plots(evaluation: Evaluation, out: Path) -> list[Path]:
        block = evaluation.metrics.get(name)
        return plots(block, out) if block else []

    def block_summary(metrics: dict[str, Any]) -> list[str]:
        return summary(metrics.get(name))

    return Section(name, compute, block_markdown, block_plots, block_summary, **options)


SECTIONS: list[Section] = []


def register(section: Section) -> None:
    """Add ``section`` after the registered ones (its name must be new)."""
    if any(s.name == section.name for s in SECTIONS):
        raise ValueError(f"an evaluation section named {section.name!r} is registered already")
    SECTIONS.append(section)


def unregister(name: str) -> None:
    SECTIONS[:] = [s for s in SECTIONS if s.name != name]


# --- markdown cells every section formats alike -------------------------------------------------


def pct(x: float | None) -> str:
    """A fraction as a percentage with two decimals; ``n/a`` for a missing or non-finite one."""
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.2f}"


def num(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"
