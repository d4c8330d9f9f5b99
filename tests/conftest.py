"""Session fixtures shared by every test area.

``tiny_run`` trains a real (tiny) SDDE ensemble on the bundled digits data and ``tiny_model``
exports it, once per test session: end-to-end tests then exercise the artifact users deploy.
``linear_model`` is a hand-made ONNX ensemble whose outputs tests can recompute in numpy.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests are tiny and share two cores with the servers and workers they start: one thread per
# process avoids oversubscription (measured: a LeNet step was ~10x slower with 2 under load).
os.environ["OMP_NUM_THREADS"] = "1"  # torch sizes its pool from it on import

TINY_RUN_STEPS = 30


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.config import TrainConfig
    from training.trainer import train

    out = tmp_path_factory.mktemp("tiny_run") / "run"
    cfg = TrainConfig(
        data="digits",
        arch="lenet",
        members=3,
        method="sdde",
        epochs=2,
        max_steps=TINY_RUN_STEPS,
        batch_size=64,
        out=str(out),
        seed=0,
        # the protocol this fixture was built with before issue 13's defaults (the λ warm-up,
        # the diversity batch from a member's batch): tests downstream rely on its exact model
        shared_source="stream",
        lambda_warmup_epochs=0.0,
        diversity_period=1,
        shared_batch=1.0,
    )
    return Path(train(cfg))


@pytest.fixture(scope="session")
def tiny_model(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export import export_run

    path = tmp_path_factory.mktemp("tiny_model") / "model.onnx"
    export_run(tiny_run, path, name="tiny-digits", version="1")
    return path


@pytest.fixture(scope="session")
def linear_model(tmp_path_factory: pytest.TempPathFactory):
    """(path, weights) of the hand-made 3-member linear ensemble (1x8x8 inputs, 4 classes)."""
    from tests.onnx_factory import make_linear_ensemble

    return make_linear_ensemble(tmp_path_factory.mktemp("linear") / "linear.onnx")
