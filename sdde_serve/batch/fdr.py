"""``sdde score --fdr Q``: Benjamini-Hochberg over the whole job, as a final pass over its rows.

Each scored row has a conformal ``ood_p_value``. Flagging every row with ``p < alpha`` controls
the false-flag rate per image; over a million images that still flags ``alpha`` of the
in-distribution ones. Benjamini-Hochberg at level Q instead flags a set of images whose
expected share of in-distribution images is at most Q (the false discovery rate).

BH needs every p-value of the job, so it runs after the last row is committed:

1. read the ``ood_p_value`` column (one float per row: memory ``8 m`` bytes) and compute the
   BH cutoff (:func:`sdde_serve.conformal.bh_cutoff`);
2. stream the rows again into a temporary file of the same format with an added ``ood_bh``
   column (``ood_p_value <= cutoff``), and rename it over the output.

The rename is atomic: a crash leaves the complete output without ``ood_bh`` (or with the old
one), never a mixture; ``sdde score ... --resume --fdr Q`` on a finished job runs this pass
alone. Rerunning it is idempotent (``ood_bh`` is recomputed from the p-values).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdde_serve import conformal
from sdde_serve.atomic import atomic_path
from sdde_serve.errors import UserError

from .writers import Column, open_sink, parts_dir, read_rows

BH_COLUMN = Column("ood_bh", "bool")
CHUNK = 10_000  # rows per write in the rewrite pass


@dataclass
class BHResult:
    q: float
    m: int  # rows with a p-value (the images BH is applied to)
    flagged: int
    cutoff: float  # flag p <= cutoff (-1: none)


def _p_value(row: dict[str, Any], path: Path) -> float:
    p = row.get("ood_p_value")
    if p is None:
        raise UserError(
            f"{path}: a row has no ood_p_value (scored by a model without calibration scores?); "
            "--fdr needs p-values"
        )
    return float(p)


def apply_bh(out: Path, columns: list[Column], q: float) -> BHResult:
    """Add (or recompute) the ``ood_bh`` column of the finished output ``out``, atomically."""
    p = np.fromiter((_p_value(r, out) for r in read_rows(out)), dtype=np.float64)
    cutoff = conformal.bh_cutoff(p, q)
    columns = [c for c in columns if c.name != BH_COLUMN.name] + [BH_COLUMN]
    # same suffix: the sink is chosen by the extension
    with atomic_path(out, tmp=out.with_name(f".{out.stem}.bh-tmp{out.suffix}")) as tmp:
        tmp.unlink(missing_ok=True)
        sink = open_sink(tmp, columns)
        try:
            chunk: list[dict[str, Any]] = []
            for row in read_rows(out):
                row["ood_bh"] = bool(float(row["ood_p_value"]) <= cutoff)
                chunk.append(row)
                if len(chunk) >= CHUNK:
                    sink.write(chunk)
                    sink.commit()
                    chunk = []
            sink.write(chunk)
            sink.commit()
            sink.finish()
        except BaseException:
            shutil.rmtree(parts_dir(tmp), ignore_errors=True)
            raise
        finally:
            sink.close()
    return BHResult(q=q, m=len(p), flagged=int((p <= cutoff).sum()), cutoff=cutoff)
