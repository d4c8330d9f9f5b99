"""The method registry: a method registered in one place (here: this test only) trains through
``train`` like a built-in one, and the checks, help text and manifest list derive from it."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor

from export import hyperparameters
from sdde_serve.errors import UserError
from tests.conftest import tiny_train_config
from training import registry
from training.config import FIELD_HELP, TrainConfig
from training.ensemble import Ensemble
from training.methods import METHODS, StepBatch, member_ce, option
from training.trainer import train


@dataclass(frozen=True)
class LogitDecay:
    """A toy method: mean CE + w·mean squared logit on the shared batch."""

    name: str = "toy-decay"

    def loss(self, ensemble: Ensemble, batch: StepBatch, cfg) -> tuple[Tensor, dict[str, float]]:
        ce = member_ce(ensemble, batch)
        assert batch.shared is not None
        decay = ensemble(batch.shared[0]).pow(2).mean()
        loss = ce + option(cfg, "toy_weight", self.name) * decay
        return loss, {
            "loss": float(loss.detach()),
            "ce": float(ce.detach()),
            "decay": float(decay.detach()),
        }


@pytest.fixture
def toy_method() -> Iterator[registry.MethodSpec]:
    spec = registry.register(
        registry.MethodSpec(
            "toy-decay",
            "mean CE + a logit penalty",
            LogitDecay,
            hparams=("toy_weight",),
            defaults={"toy_weight": 0.01},
            compares_members=True,
        )
    )
    yield spec
    registry.unregister(spec.name)


def test_a_method_registered_in_one_place_trains(toy_method, tmp_path: Path) -> None:
    assert "toy-decay" in METHODS and isinstance(METHODS["toy-decay"], LogitDecay)
    cfg = tiny_train_config(
        tmp_path / "run",
        method="toy-decay",
        members=2,
        epochs=1,
        batch_size=32,
        max_steps=3,
        cam_samples=0,
        eval_train_samples=0,
        progress=False,
    )
    run = Path(train(cfg))
    (record,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 3 and set(record["train"]) == {"loss", "ce", "decay"}
    assert 0 < record["train"]["decay"] < 1 and torch.isfinite(torch.tensor(record["train"]["ce"]))
    # its traits are checked like a built-in's, and the manifest lists its hyper-parameter
    with pytest.raises(UserError, match="compares members"):
        dataclasses.replace(cfg, members=1).validate()
    config = json.loads((run / "config.json").read_text())
    assert "toy_weight" in hyperparameters({**config, "toy_weight": 0.01})
    with pytest.raises(ValueError, match="already registered"):
        registry.register(toy_method)
    assert toy_method.load().name == "toy-decay"


def test_the_registry_is_the_one_source() -> None:
    assert tuple(METHODS) == registry.names()
    assert all(name in FIELD_HELP["method"] for name in registry.names())
    assert registry.names(compares_members=True) == ("sdde", "sdde-oe", "ncl", "adp", "dice")
    assert registry.names(periodic=True) == ("sdde",)
    # the defaults a method falls back on are TrainConfig's defaults, not a second opinion
    defaults = TrainConfig()
    for spec in registry.METHODS.values():
        for name, value in spec.defaults.items():
            assert getattr(defaults, name) == value, (spec.name, name)
        for name in spec.hparams:
            assert hasattr(defaults, name), (spec.name, name)
    with pytest.raises(UserError, match="unknown --method 'nope'"):
        TrainConfig(method="nope").validate()
