"""Ctrl-C (or SIGTERM) while training: finish the step, checkpoint, then stop."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any


class CheckpointedStop(KeyboardInterrupt):
    """The asked-for stop, raised on every process together after the checkpoint and a barrier
    (so the process group may be torn down); an abort at once is a plain ``KeyboardInterrupt``."""


class StopRequest:
    """First Ctrl-C (or SIGTERM) asks the loop to stop after the current step and checkpoint;
    a second one interrupts at once. Handlers are restored on exit."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (Ctrl-C again to abort at once)", file=sys.stderr)

    def __enter__(self) -> StopRequest:
        # Signal handlers can only be set from the main thread (tests may train in others).
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
