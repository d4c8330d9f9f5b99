"""Optional report sections: analyses that ``sdde eval`` adds to metrics.json on request.

Each entry names its key in ``metrics.json`` and how to render it (markdown lines, PNG plots);
:mod:`.report` draws every section whose key is present, so a new analysis registers here
instead of growing the report module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdde_serve.evaluation import members, shift


@dataclass(frozen=True)
class Section:
    key: str
    markdown: Callable[[dict[str, Any]], list[str]]
    plots: Callable[[dict[str, Any], Path], list[Path]]


SECTIONS = (
    Section(shift.SCHEMA_KEY, shift.render_markdown, shift.write_plots),
    Section(members.SCHEMA_KEY, members.render_markdown, members.write_plots),
)


def section_markdown(metrics: dict[str, Any]) -> list[str]:
    return [line for s in SECTIONS if metrics.get(s.key) for line in s.markdown(metrics[s.key])]


def section_plots(metrics: dict[str, Any], out: Path) -> list[Path]:
    return [p for s in SECTIONS if metrics.get(s.key) for p in s.plots(metrics[s.key], out)]
