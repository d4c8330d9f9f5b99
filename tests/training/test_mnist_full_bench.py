"""benchmarks/mnist_full.py is resumable per (method, seed): a training killed mid-way resumes to
the same numbers, and a stored record is reused rather than recomputed. Tiny budget: the bundled
digits (no external data), 2 LeNet members, 3 steps, 40 images per OOD set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import mnist_full, mnist_ood
from training.trainer import train

VOLATILE = ("seconds", "step_s")  # wall-clock fields


def _argv(work: Path) -> list[str]:
    return [
        "--train", "digits", "--test", "digits@test", "--work", str(work),
        "--out", str(work / "table.json"), "--epochs", "1", "--max-steps", "3",
        "--members", "2", "--methods", "de", "--seeds", "0", "--cam-images", "16",
    ]  # fmt: skip


def _record(work: Path) -> dict:
    record = json.loads((work / "results" / "de_s0.json").read_text())
    # the validation OOD sets' paths name the work folder; their contents are the same
    assert set(record["score_choice"]["selection"].pop("ood_val")) == set(mnist_ood.VAL)
    return {k: v for k, v in record.items() if k not in VOLATILE}


@pytest.fixture
def small_ood(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mnist_ood, "OOD_N", 40)


def test_killed_run_resumes_to_the_same_numbers(small_ood, tmp_path: Path, capsys) -> None:
    straight = tmp_path / "straight"
    assert mnist_full.main(_argv(straight)) == 0
    record = _record(straight)
    # every score of the graph, the deployed one named, knn as exported, diversity and CAMs
    near = record["groups"]["near"]
    assert {"mal", "msp", "minmax", "knn"} <= set(near)
    assert record["deployed"] in near and record["knn"]["k"] >= 1
    cls = record["classification"]
    assert {"accuracy", "nll", "ece"} <= set(cls["before"]) & set(cls["after"])
    assert record["temperature"] > 0
    assert record["cam_similarity"] is not None and "disagreement" in json.dumps(record)
    assert record["steps"] == 3
    table = json.loads((straight / "table.json").read_text())
    assert "| de | deployed (" in table["table_markdown"]

    # a benchmark killed during training: the run directory holds a checkpoint at step 2
    killed = tmp_path / "killed"
    args = mnist_full.main.__globals__["argparse"].Namespace(
        train="digits", members=2, epochs=1, lambda_div=0.1, diversity_period=1, shared_batch=1.0,
        diversity_pairs=0, lambda_warmup_epochs=0.0, dice_rampup_epochs=None, augment="auto",
        max_steps=2, device="cpu",
    )  # fmt: skip
    train(mnist_full.train_config("de", 0, args, killed / "runs" / "de_s0"))
    assert mnist_full.main(_argv(killed)) == 0
    log = json.loads((killed / "runs" / "de_s0" / "metrics.jsonl").read_text().splitlines()[0])
    assert log["step"] == 2  # resumed from the kill, not retrained from scratch
    assert _record(killed) == record

    # rerun: the stored record is reused as it is
    capsys.readouterr()
    assert mnist_full.main(_argv(straight)) == 0
    assert "stored record reused" in capsys.readouterr().out
    assert _record(straight) == record


def test_val_table_by_hand() -> None:
    """The validation table (what settings are judged on): means, sample stds, the deployed
    score per seed, stuck members summed."""

    def run(auroc: float, fpr: float, deployed: str, step_s: float, stuck: int) -> dict:
        val = {k: {"auroc": auroc, "fpr95": fpr} for k in ("mal", "msp", "minmax", "knn")}
        val[deployed] = {"auroc": auroc + 0.01, "fpr95": fpr / 2}
        return {
            "groups": {"val": val},
            "deployed": deployed,
            "cam_similarity": 0.5,
            "step_s": step_s,
            "stuck_members": [{}] * stuck,
        }

    rows = mnist_full.val_table(
        {"sdde": [run(0.9, 0.2, "knn", 0.1, 1), run(0.8, 0.4, "mal", 0.3, 0)]}
    )
    cells = [c.strip() for c in rows.splitlines()[2].split("|")[1:-1]]
    # mal: seed 0 0.90, seed 1 0.81 (deployed there) -> 85.50 ± 6.36 (sample std of 0.09 / sqrt 2)
    assert cells[:3] == ["sdde", "2", "85.50 ± 6.36"]
    assert cells[5] == "85.50 ± 7.78"  # knn: 0.91 and 0.80 (sample std 0.11 / sqrt 2)
    assert cells[6:8] == ["86.00 ± 7.07", "15.00 ± 7.07"]  # deployed: 0.91 / 0.81, FPR 0.1 / 0.2
    assert cells[8:] == ["0.50 ± 0.00", "0.200 ± 0.141", "1"]
