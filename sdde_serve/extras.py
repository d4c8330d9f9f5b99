"""``require_extra()``: one way to say "install the [X] extra" when an optional module is missing.

The modules of each extra are listed once (:data:`EXTRA_MODULES`, mirroring pyproject.toml's
``[project.optional-dependencies]``), so every command names the same extra for the same module.
A missing module that belongs to no expected extra is a bug, not a user error: it propagates.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sdde_serve.errors import UserError

# top-level import names per extra (``training`` is the PyTorch side of this repository)
EXTRA_MODULES: dict[str, frozenset[str]] = {
    "train": frozenset(
        {"torch", "torchvision", "onnxscript", "safetensors", "sklearn", "training"}
    ),
    "eval": frozenset({"matplotlib", "sklearn"}),
    "parquet": frozenset({"pyarrow"}),
    "ray": frozenset({"ray", "pyarrow"}),
}


def missing_extra(exc: ModuleNotFoundError, *extras: str) -> str | None:
    """The first of ``extras`` that provides the module ``exc`` reports missing, else None."""
    top = (exc.name or "").split(".")[0]
    return next((e for e in extras if top in EXTRA_MODULES[e]), None)


def install_hint(extra: str) -> str:
    return f"pip install 'sdde-serve[{extra}]'"


@contextlib.contextmanager
def require_extra(*extras: str, what: str, alternative: str = "") -> Iterator[None]:
    """Run the imports of an optional feature; a missing module of one of ``extras`` becomes the
    one-line :class:`UserError` ``"{what} (missing module 'M'): pip install 'sdde-serve[X]'"``
    (plus ``alternative``, e.g. "or pass --no-plots")."""
    unknown = set(extras) - EXTRA_MODULES.keys()
    if unknown or not extras:
        raise ValueError(f"unknown extras {sorted(unknown)}; known: {sorted(EXTRA_MODULES)}")
    try:
        yield
    except ModuleNotFoundError as exc:
        extra = missing_extra(exc, *extras)
        if extra is None:
            raise
        other = f" ({alternative})" if alternative else ""
        raise UserError(
            f"{what} (missing module {exc.name!r}): {install_hint(extra)}{other}"
        ) from None
