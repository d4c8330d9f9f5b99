"""Renamed command-line flags: the old spelling keeps working for a while, hidden, and warns.

See CHANGELOG.md for the renames.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any


class _DeprecatedAlias(argparse.Action):
    """Stores into the new flag's ``dest`` and prints one warning line on stderr."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, new: str, **kwargs: Any):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(
            f"warning: {option_string} is deprecated and will be removed; use {self.new}",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def add_deprecated_alias(
    parser: argparse.ArgumentParser, *old: str, new: str, dest: str, **kwargs: Any
) -> None:
    """Accept ``old`` (hidden from ``--help``) as a spelling of ``new`` (which stores ``dest``);
    ``kwargs`` are the new flag's ``type``/``choices``, so the old spelling is checked alike."""
    parser.add_argument(
        *old,
        dest=dest,
        action=_DeprecatedAlias,
        new=new,
        default=argparse.SUPPRESS,  # the new flag's default stands
        help=argparse.SUPPRESS,
        **kwargs,
    )
