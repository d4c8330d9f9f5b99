"""What a run shows and sums as it trains: the running loss means, the step bar, log lines."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm


@dataclass
class Running:
    """Sums of the loss terms since the last record (saved in last_state.pt for exact resume)."""

    sums: dict[str, float] | None = None
    count: int = 0
    # Steps that logged each term: a term computed on some steps only (the diversity term under
    # --diversity-period) is averaged over those steps, not diluted by the others.
    counts: dict[str, int] | None = None

    def add(self, terms: dict[str, float]) -> None:
        self.sums = self.sums or {}
        self.counts = self.counts or {}
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1
        self.count += 1

    def to_state(self) -> dict[str, Any]:
        return {
            "sums": dict(self.sums or {}),
            "count": self.count,
            "counts": dict(self.counts or {}),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Running:
        """The inverse of ``to_state`` (a state saved before ``counts`` existed has none)."""
        return cls(dict(state["sums"]), int(state["count"]), dict(state.get("counts") or {}))

    def means(self) -> dict[str, Any]:
        if not self.count or not self.sums:
            return {}
        counts = self.counts or {}
        return {k: round(v / counts.get(k, self.count), 6) for k, v in self.sums.items()}


class StepBar:
    """The step progress bar: loss, learning rate and training images per second since this
    process started (a resumed run's earlier steps and time do not count). Shown only where
    ``enabled`` (rank 0, on a terminal: logs stay clean under CI and torchrun)."""

    def __init__(
        self, step: int, end_step: int, images_per_step: int, elapsed: float, *, enabled: bool
    ) -> None:
        self.bar = tqdm(
            total=end_step, initial=step, unit="step", dynamic_ncols=True, disable=not enabled
        )
        self.start_step, self.start_elapsed = step, elapsed
        self.images_per_step = images_per_step

    def update(self, step: int, elapsed: float, loss: float, lr: float) -> None:
        """One step done; ``elapsed`` is the run's training time so far (evaluation excluded)."""
        if self.bar.disable:
            return
        images = (step - self.start_step) * self.images_per_step
        rate = images / max(elapsed - self.start_elapsed, 1e-9)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def log(main: bool, message: str) -> None:
    """One line on stderr from rank 0 (through tqdm, so it does not break a drawn bar)."""
    if main:
        tqdm.write(message, file=sys.stderr)


def log_epoch(record: dict[str, Any], epochs: int) -> None:
    """The epoch's ``metrics.jsonl`` record as one line: loss, val accuracy and NLL, CAM."""
    val = record.get("val", {})
    cam = val.get("cam_similarity")
    parts = [
        f"epoch {record['epoch']:g}/{epochs}",
        f"step {record['step']}",
        f"loss {record['train'].get('loss', float('nan')):.4f}",
        f"val acc {val.get('ensemble_acc', float('nan')):.4f}",
        f"val nll {val.get('ensemble_nll', float('nan')):.4f}",
    ]
    if cam is not None:
        parts.append(f"cam sim {cam:.4f}")
    if record.get("best"):
        parts.append("(best)")
    tqdm.write("  ".join(parts), file=sys.stderr)
