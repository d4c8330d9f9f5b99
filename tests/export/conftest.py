"""Fixtures of the export tests: a tiny run trained far enough to have margins.

``tiny_run`` (tests/conftest.py) stops at ~60% validation accuracy: many of its images sit on a
near-tie between two classes, so any legitimate kernel difference (another CPU's int8 or fp16
rounding) flips some labels, and an agreement test on it would depend on the instruction set.
``margin_run`` trains the same ensemble for 60 steps (~89% validation accuracy, ~25 s on one
thread) so that label agreement and NLL measure the conversion, not the ties.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import tiny_train_config

MARGIN_RUN_STEPS = 60


@pytest.fixture(scope="session")
def margin_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.trainer import train

    out = tmp_path_factory.mktemp("margin_run") / "run"
    return Path(train(tiny_train_config(out, epochs=3, max_steps=MARGIN_RUN_STEPS)))


@pytest.fixture(scope="session")
def margin_model(margin_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export import export_run

    path = tmp_path_factory.mktemp("margin_model") / "model.onnx"
    export_run(margin_run, path, name="margin-digits", version="1")
    return path
