"""One job runner: the backends share the worker function and the tally; no import cycle."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np

from sdde_serve.batch import job, pipeline, ray_backend
from sdde_serve.batch.writers import read_rows

from .conftest import write_images

BATCH = Path(job.__file__).parent


def _local_imports(path: Path) -> set[str]:
    """The ``sdde_serve.batch`` modules ``path`` imports (anywhere in it, lazily too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            "sdde_serve.batch."
        ):
            names.add(node.module.split(".")[2])
    return names


def test_the_batch_modules_import_no_cycle() -> None:
    graph = {p.stem: _local_imports(p) for p in BATCH.glob("*.py") if p.stem != "__init__"}

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == target or (nxt not in seen and reaches(nxt, target, seen | {nxt})):
                return True
        return False

    assert [m for m in graph if reaches(m, m, set())] == []


def test_the_ray_worker_uses_the_pipelines_worker_function(
    tmp_path: Path, linear_model, monkeypatch
) -> None:
    """A decoder failing in a way decode_image does not map is one bad file on every backend
    (before: the Ray copy of the worker let it fail the whole job)."""
    model, _ = linear_model
    good = [str(p) for p in write_images(tmp_path / "images", 3)]
    real = pipeline.load_image

    def load(path: str, spec, limits):
        if path == good[1]:
            raise TypeError("plugin bug")
        return real(path, spec, limits)

    monkeypatch.setattr(ray_backend, "load_image", load)
    scorer = ray_backend.RayScorer(Path(model).read_bytes(), job.ScoreOptions(), threads=1)
    out = scorer({"path": np.asarray(good, dtype=object), "file": np.asarray(good, dtype=object)})
    records = [json.loads(r) for r in out["record"]]
    assert [sorted(r) for r in records] == [["row"], ["error"], ["row"]]
    assert records[1]["error"] == "cannot decode (TypeError: plugin bug)"
    # the same reason as a local job's worker gives
    spec = scorer.engine.manifest.input
    [(_, image, reason)] = pipeline.decode_chunk(lambda p: load(p, spec, None), good[1:2])
    assert image is None and reason == records[1]["error"]


def test_the_tally_counts_rows_and_errors_once(tmp_path: Path, linear_model) -> None:
    from sdde_serve.batch.writers import JobFiles, result_columns
    from sdde_serve.engine import Engine

    model, _ = linear_model
    engine = Engine(model)
    good = [str(p) for p in write_images(tmp_path / "images", 4)]
    columns = result_columns(engine.manifest.classes, probs=False)
    opts = job.ScoreOptions()
    files = JobFiles(
        tmp_path / "o.jsonl",
        tmp_path / "e.jsonl",
        columns,
        job.job_header(engine.manifest, opts),
        resume=False,
    )
    tally = job.Tally(iter([*good, "missing.png"]), files)
    images = np.stack([pipeline.load_image(p, engine.manifest.input, opts.limits) for p in good])
    rows = pipeline.score_rows(engine.run(images), good, engine.manifest, opts)
    for p in [*good, "missing.png"]:
        tally.seen(p)
    tally.add(rows, [{"path": "missing.png", "reason": "unreadable"}])
    tally.commit()
    files.finish()
    result = tally.result()
    assert result.processed == 5 and result.counts.scored == 4 and result.counts.failed == 1
    assert result.counts.ood == sum(r["is_ood"] for r in rows)
    assert [r["path"] for r in read_rows(tmp_path / "o.jsonl")] == good
