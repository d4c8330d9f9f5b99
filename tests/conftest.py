"""Session fixtures shared by every test area.

``tiny_run`` trains a real (tiny) SDDE ensemble on the bundled digits data and ``tiny_model``
exports it, once per test session: end-to-end tests then exercise the artifact users deploy.
``linear_model`` is a hand-made ONNX ensemble whose outputs tests can recompute in numpy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

if TYPE_CHECKING:
    from training.config import TrainConfig

# Tests are tiny and share two cores with the servers and workers they start: one thread per
# process avoids oversubscription (measured: a LeNet step was ~10x slower with 2 under load).
os.environ["OMP_NUM_THREADS"] = "1"  # torch sizes its pool from it on import

TINY_RUN_STEPS = 30


def tiny_train_config(
    out: Path, *, official_protocol: bool = False, **overrides: Any
) -> TrainConfig:
    """The tiny run the tests train: 3-member LeNet SDDE on digits, seeded; a test overrides
    what it needs (steps, batch size, ...). Written once here (it was copied per test file).
    ``official_protocol``: keep TrainConfig's protocol defaults instead of the ones ``tiny_run``
    was built with."""
    from training.config import TrainConfig

    base: dict[str, Any] = dict(
        data="digits",
        arch="lenet",
        members=3,
        method="sdde",
        epochs=2,
        batch_size=64,
        seed=0,
        out=str(out),
        # the protocol this fixture was built with before issue 13's and issue 23's defaults
        # (the λ warm-up, the diversity batch from a member's batch, one pair every 2nd step,
        # λ 1.0): tests downstream rely on its exact model
    )
    if not official_protocol:
        base.update(shared_source="stream", lambda_warmup_epochs=0.0, shared_batch=1.0)
        base.update(diversity_period=1, diversity_pairs=0, lambda_div=0.1)
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="session")
def digits300(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The first 300 built-in digits as an .npz data spec (training tests that need a few steps)."""
    from sdde_serve.data import load_dataset

    ds = load_dataset("digits")
    path = tmp_path_factory.mktemp("digits300") / "digits300.npz"
    np.savez(path, images=ds.images[:300], labels=ds.labels[:300], classes=np.array(ds.classes))
    return str(path)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.trainer import train

    out = tmp_path_factory.mktemp("tiny_run") / "run"
    return Path(train(tiny_train_config(out, max_steps=TINY_RUN_STEPS)))


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


CONFORMAL_CAL_N = 199  # alpha (n + 1) = 10 at alpha = 0.05: the threshold is an exact order stat


def uniform_images(n: int, seed: int) -> np.ndarray:
    """Seeded uniform-noise images for the linear model: exchangeable draws of one distribution."""
    return np.random.default_rng(seed).random((n, 1, 8, 8), dtype=np.float32)


@pytest.fixture(scope="session")
def conformal_model(tmp_path_factory: pytest.TempPathFactory):
    """(path, weights) of the linear ensemble with conformal calibration scores: the graph's own
    MAL on ``CONFORMAL_CAL_N`` seeded uniform images (seed 100)."""
    from sdde_serve.engine import Engine
    from tests.onnx_factory import make_linear_ensemble

    root = tmp_path_factory.mktemp("conformal")
    plain, _ = make_linear_ensemble(root / "plain.onnx")
    scores = Engine(plain).run(uniform_images(CONFORMAL_CAL_N, seed=100)).mal
    return make_linear_ensemble(
        root / "conformal.onnx", calibration_scores=sorted(float(s) for s in scores)
    )
