"""``sdde score``: the ood_p_value column and the Benjamini-Hochberg pass of ``--fdr``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sdde_serve import conformal
from sdde_serve.batch import fdr
from sdde_serve.batch.writers import read_rows
from sdde_serve.engine import Engine
from tests.conftest import uniform_images
from tests.runtime.test_conformal import _bh_reference

from .conftest import score


@pytest.fixture
def images(images: list[Path], conformal_model) -> list[Path]:
    """The batch fixture's noise images plus 6 clearly out-of-distribution ones for the
    conformal model (calibrated on uniform noise): the lowest-MAL of 3000 noise draws, far below
    every calibration score."""
    from PIL import Image

    x = (uniform_images(3000, seed=11) * 255).round() / 255  # as the PNG will store them
    mal = Engine(conformal_model[0]).run(x.astype(np.float32)).mal
    root = images[0].parents[1] / "odd"
    root.mkdir()
    for i, k in enumerate(np.argsort(mal)[:6]):
        Image.fromarray((x[k, 0] * 255).round().astype(np.uint8), "L").save(root / f"{i}.png")
    return [*images, *sorted(root.iterdir())]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_p_value_column_and_bh_over_the_whole_job(
    tmp_path: Path, conformal_model, images, suffix
) -> None:
    model, _ = conformal_model
    out = tmp_path / f"pred{suffix}"
    # batches of 4: BH must see the whole job, not one batch
    assert score(model, tmp_path / "images", "-o", out, "--batch-size", "4", "--fdr", "0.2") == 0
    rows = list(read_rows(out))
    assert len(rows) == 36
    cal = Engine(model).manifest.ood.calibration_scores
    p = np.array([r["ood_p_value"] for r in rows])
    np.testing.assert_array_equal(
        p, conformal.p_values(cal, np.array([r["ood_score"] for r in rows]))
    )
    assert [r["is_ood"] for r in rows] == list(p < 0.05)
    bh = np.array([r["ood_bh"] for r in rows])
    np.testing.assert_array_equal(bh, _bh_reference(p, 0.2))
    assert 0 < bh.sum() < (p < 0.05).sum() + 3  # both sides exercised
    summary = json.loads((tmp_path / "pred.summary.json").read_text())
    assert summary["fdr"] == 0.2 and summary["ood_bh"] == int(bh.sum())
    assert not list(tmp_path.glob(".pred.bh-tmp*"))


def test_a_crash_in_the_bh_pass_keeps_the_rows_and_resume_finishes_it(
    tmp_path: Path, conformal_model, images, monkeypatch, capsys
) -> None:
    model, _ = conformal_model
    plain, out = tmp_path / "plain.csv", tmp_path / "pred.csv"
    assert score(model, tmp_path / "images", "-o", plain) == 0

    real_open_sink = fdr.open_sink

    def dying_sink(path, columns, state=None):
        sink = real_open_sink(path, columns, state)

        def commit():
            raise OSError("disk full")

        sink.commit = commit
        return sink

    monkeypatch.setattr(fdr, "open_sink", dying_sink)
    assert score(model, tmp_path / "images", "-o", out, "--fdr", "0.1") == 2
    assert "disk full" in capsys.readouterr().err
    # the output is the complete job without ood_bh; the temporary file is gone
    assert list(read_rows(out)) == list(read_rows(plain))
    assert not list(tmp_path.glob(".pred.bh-tmp*"))

    monkeypatch.setattr(fdr, "open_sink", real_open_sink)
    assert score(model, tmp_path / "images", "-o", out, "--fdr", "0.1", "--resume") == 0
    assert "the job had finished" in capsys.readouterr().out
    rows = list(read_rows(out))
    p = np.array([r["ood_p_value"] for r in rows])
    np.testing.assert_array_equal([r["ood_bh"] for r in rows], _bh_reference(p, 0.1))
    assert [{k: v for k, v in r.items() if k != "ood_bh"} for r in rows] == list(read_rows(plain))
    # again, at another level: ood_bh is recomputed, not appended twice
    assert score(model, tmp_path / "images", "-o", out, "--fdr", "0.3", "--resume") == 0
    rows = list(read_rows(out))
    np.testing.assert_array_equal([r["ood_bh"] for r in rows], _bh_reference(p, 0.3))
    assert list(rows[0]).count("ood_bh") == 1


def test_models_without_calibration_scores(tmp_path: Path, linear_model, images, capsys) -> None:
    model, _ = linear_model
    out = tmp_path / "o.jsonl"
    assert score(model, tmp_path / "images", "-o", out) == 0
    assert all(r["ood_p_value"] is None for r in read_rows(out))
    assert score(model, tmp_path / "images", "-o", tmp_path / "b.jsonl", "--fdr", "0.1") == 2
    assert "stores no calibration scores" in capsys.readouterr().err
    assert score(model, tmp_path / "images", "-o", tmp_path / "c.jsonl", "--fdr", "1.5") == 2
