"""``sdde score`` end to end on the hand-made linear ensemble (answers recomputed in numpy)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from sdde_serve.batch import cli as batch_cli
from sdde_serve.batch.inputs import iter_inputs
from sdde_serve.batch.pipeline import ScoreOptions, decoded_stream, load_image
from sdde_serve.batch.writers import journal_path, read_rows
from sdde_serve.calibration import member_agreement
from sdde_serve.engine import Engine
from sdde_serve.preprocess import ImageLimits
from tests.onnx_factory import reference_outputs

from .conftest import score, write_bad_files


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_rows_match_numpy_reference(tmp_path: Path, linear_model, images, suffix) -> None:
    model, weights = linear_model
    out = tmp_path / f"pred{suffix}"
    assert score(model, tmp_path / "images", "-o", out, "--probs", "--batch-size", "8") == 0

    rows = list(read_rows(out))
    paths = list(iter_inputs([str(tmp_path / "images")]))
    assert [r["path"] for r in rows] == paths  # input order, one row each
    engine = Engine(model)
    m = engine.manifest
    x = np.stack([load_image(p, m.input, ImageLimits()) for p in paths])
    ref = reference_outputs(weights, x, m.members, m.temperature)
    probs = np.array([r["probs"] for r in rows])
    np.testing.assert_allclose(probs, ref["probs"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal([r["label"] for r in rows], ref["probs"].argmax(1))
    assert [r["class_name"] for r in rows] == [m.classes[i] for i in ref["probs"].argmax(1)]
    np.testing.assert_allclose([r["confidence"] for r in rows], ref["probs"].max(1), rtol=1e-5)
    np.testing.assert_allclose([r["ood_score"] for r in rows], ref["mal"], rtol=1e-5, atol=1e-5)
    assert [r["is_ood"] for r in rows] == list(ref["mal"] < m.ood.threshold)
    agreement = member_agreement(ref["logits"], ref["probs"])
    np.testing.assert_allclose([r["agreement"] for r in rows], agreement)

    summary = json.loads((tmp_path / "pred.summary.json").read_text())
    assert summary["images_scored"] == len(paths) == 30 and summary["failed"] == 0
    assert summary["ood_rate"] == pytest.approx(np.mean(ref["mal"] < m.ood.threshold))
    assert not journal_path(out).exists()
    assert list(read_rows(tmp_path / f"pred.errors{suffix}")) == []


def test_bad_files_are_recorded_and_good_ones_scored(tmp_path: Path, linear_model, images):
    model, _ = linear_model
    bad = write_bad_files(tmp_path / "images" / "bad")
    listing = tmp_path / "list.txt"
    good = [str(p) for p in images[:7]]
    listed = [
        good[0],
        str(bad["corrupt"]),
        good[1],
        str(bad["truncated"]),
        str(bad["not_image"]),
        *good[2:5],
        str(bad["empty"]),
        str(bad["unreadable"]),
        str(tmp_path / "vanished.png"),
        *good[5:],
    ]
    listing.write_text("\n".join(listed) + "\n")
    out, errors = tmp_path / "o.csv", tmp_path / "failed.jsonl"
    rc = score(model, listing, "-o", out, "--errors", errors, "--batch-size", "4")
    assert rc == 1  # some files failed, the job completed

    assert [r["path"] for r in read_rows(out)] == good
    reasons = {r["path"]: r["reason"] for r in read_rows(errors)}
    assert set(reasons) == {*map(str, bad.values()), str(tmp_path / "vanished.png")}
    assert reasons[str(bad["not_image"])].startswith("not a recognised image format")
    assert reasons[str(bad["truncated"])].startswith("corrupt or truncated image")
    assert reasons[str(bad["empty"])] == "empty image"
    assert reasons[str(bad["unreadable"])] == "unreadable: Is a directory"
    assert reasons[str(tmp_path / "vanished.png")] == "unreadable: No such file or directory"
    summary = json.loads((tmp_path / "o.summary.json").read_text())
    assert (summary["images_scored"], summary["failed"]) == (7, 6)


def test_reject_policy_rows(tmp_path: Path, linear_model, images) -> None:
    model, _ = linear_model
    flag, reject = tmp_path / "f.jsonl", tmp_path / "r.jsonl"
    assert score(model, tmp_path / "images", "-o", flag) == 0
    assert score(model, tmp_path / "images", "-o", reject, "--ood-policy", "reject") == 0
    n_ood = 0
    for f, r in zip(read_rows(flag), read_rows(reject), strict=True):
        assert f["ood_score"] == r["ood_score"] and f["is_ood"] == r["is_ood"]
        if f["is_ood"]:
            n_ood += 1
            assert r["rejected"] and r["label"] is None and r["confidence"] is None
        else:
            assert r == f
    assert 0 < n_ood < 30  # the fixture exercises both branches


def test_usage_errors_exit_2(tmp_path: Path, linear_model, images, capsys) -> None:
    model, _ = linear_model
    assert score(model, tmp_path / "images", "-o", tmp_path / "o.xlsx") == 2
    assert "unknown output format" in capsys.readouterr().err
    assert score(model, tmp_path / "nope", "-o", tmp_path / "o.csv") == 2
    assert score(tmp_path / "no.onnx", tmp_path / "images", "-o", tmp_path / "o.csv") == 2
    assert score(model, tmp_path / "images", "-o", tmp_path / "o.csv", "--batch-size", "0") == 2
    assert "error:" in capsys.readouterr().err


def test_decoded_stream_keeps_order_and_bounds_the_window() -> None:
    # a load function that records how far ahead of the consumer the pool ran
    started: list[int] = []

    def load(p: str) -> np.ndarray:
        started.append(int(p))
        return np.full((1, 1, 1), int(p), np.float32)

    consumed = 0
    for path, image, err in decoded_stream(
        (str(i) for i in range(500)), load, workers=3, window=40, chunk=8
    ):
        assert err is None and int(path) == consumed and image[0, 0, 0] == consumed
        # bounded: the queued window, the chunk being handed over, the chunk being consumed
        assert max(started) - consumed < 40 + 2 * 8
        consumed += 1
    assert consumed == 500


def test_options_defaults_are_sane() -> None:
    opts = ScoreOptions()
    assert opts.batch_size >= 1 and opts.workers >= 1 and opts.policy == "flag"


def test_process_pool_decoding_gives_the_same_rows(tmp_path: Path, linear_model, images) -> None:
    model, _ = linear_model
    write_bad_files(tmp_path / "images" / "bad")
    threads, procs = tmp_path / "t.jsonl", tmp_path / "p.jsonl"
    assert score(model, tmp_path / "images", "-o", threads, "--concurrency", "2") == 1
    assert score(model, tmp_path / "images", "-o", procs, "--concurrency", "2", "--processes") == 1
    assert list(read_rows(procs)) == list(read_rows(threads))
    assert list(read_rows(tmp_path / "p.errors.jsonl")) == list(
        read_rows(tmp_path / "t.errors.jsonl")
    )


def test_renamed_flags_still_work_and_warn(tmp_path: Path, linear_model, images, capsys) -> None:
    """``--policy`` and ``--workers`` were renamed (CHANGELOG.md): hidden, warned, the same."""
    model, _ = linear_model
    new, old = tmp_path / "new.jsonl", tmp_path / "old.jsonl"
    assert score(model, tmp_path / "images", "-o", new, "--ood-policy", "reject") == 0
    assert "deprecated" not in capsys.readouterr().err
    assert score(model, tmp_path / "images", "-o", old, "--policy", "reject", "--workers", "1") == 0
    err = capsys.readouterr().err
    assert "--policy is deprecated and will be removed; use --ood-policy" in err
    assert "--workers is deprecated and will be removed; use --concurrency" in err
    assert list(read_rows(old)) == list(read_rows(new))
    parser = argparse.ArgumentParser()
    batch_cli.add_arguments(parser)
    help_text = parser.format_help()
    assert "--ood-policy" in help_text and "--policy" not in help_text
    assert "--concurrency" in help_text and "--workers" not in help_text
