"""Plotting helpers every report section shares: matplotlib on demand, PNGs written atomically.

matplotlib is the optional ``[eval]`` extra: it is imported only when plots are drawn, with the
Agg backend (no display needed), and a missing install is one clear error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdde_serve.atomic import atomic_path
from sdde_serve.extras import require_extra


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend; a missing matplotlib is one UserError."""
    with require_extra("eval", what="plots need matplotlib", alternative="or pass --no-plots"):
        import matplotlib
    matplotlib.use("Agg")  # files only; never open a window (servers and CI have no display)
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path) -> Path:
    """Lay out, write ``fig`` as a PNG at ``path`` (replaced whole, never half-written), close."""
    # one layout pass; bbox_inches="tight" would draw the figure twice
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")  # the temporary name has no .png suffix
    pyplot().close(fig)
    return path
