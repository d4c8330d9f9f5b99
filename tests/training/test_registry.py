"""The method registry: a method registered in one place (here: this test only) trains through
``sdde train`` like a built-in one, with its own option; the flags, checks, defaults, help text
and manifest list all derive from the registry."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from torch import Tensor

from export import hyperparameters
from sdde_serve import cli as sdde_cli
from sdde_serve.errors import UserError
from training import cli, registry
from training.config import FIELD_HELP, CommonConfig, TrainConfig
from training.ensemble import Ensemble
from training.methods import METHODS, StepBatch, member_ce, option
from training.run import recorded_config


@dataclass(frozen=True)
class LogitDecay:
    """A toy method: mean CE + toy_weight·mean squared logit on the shared batch."""

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


# The whole declaration: its option (flag, field, check, default, help) lives here only.
TOY = registry.MethodSpec(
    "toy-decay",
    "mean CE + a logit penalty",
    LogitDecay,
    options=(
        registry.Option("toy_weight", float, 0.01, "toy: weight of the logit penalty", low=0),
    ),
    compares_members=True,
)


@pytest.fixture
def toy_method() -> Iterator[registry.MethodSpec]:
    registry.register(TOY)
    yield TOY
    registry.unregister(TOY.name)


def train_args(run: Path, *more: str) -> list[str]:
    return [
        "train",
        "--method",
        "toy-decay",
        "--members",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--max-steps",
        "3",
        "--cam-samples",
        "0",
        "--eval-train-samples",
        "0",
        "--no-progress",
        "--out",
        str(run),
        *more,
    ]


def test_a_method_registered_in_one_place_trains_through_the_cli(
    toy_method, tmp_path: Path, capsys
) -> None:
    assert "toy-decay" in METHODS and isinstance(METHODS["toy-decay"], LogitDecay)
    run = tmp_path / "run"
    assert sdde_cli.main(train_args(run, "--toy-weight", "0.5")) == 0
    (record,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = record["train"]
    assert record["step"] == 3 and set(train) == {"loss", "ce", "decay"}
    # the flag's value reached the loss: loss = ce + 0.5 * decay (step means, so also on average)
    assert train["loss"] == pytest.approx(train["ce"] + 0.5 * train["decay"], rel=1e-5)
    assert train["decay"] > 0
    # recorded like a built-in option: config.json, the reloaded config, the manifest's list
    config = json.loads((run / "config.json").read_text())
    assert config["toy_weight"] == 0.5 and "extra" not in config
    assert recorded_config(run).toy_weight == 0.5
    assert hyperparameters(config)["toy_weight"] == 0.5
    # --resume refuses a different value, as for a built-in option
    assert sdde_cli.main(train_args(run, "--resume", "--toy-weight", "0.1")) == 2
    assert "--toy-weight 0.1 (run: 0.5)" in capsys.readouterr().err
    # its declared range is checked before torch trains anything, its traits like a built-in's
    assert sdde_cli.main(train_args(tmp_path / "bad", "--toy-weight", "-1")) == 2
    assert "--toy-weight must be >= 0, got -1.0" in capsys.readouterr().err
    with pytest.raises(UserError, match="compares members"):
        dataclasses.replace(recorded_config(run), members=1).validate()
    with pytest.raises(ValueError, match="already registered"):
        registry.register(toy_method)


def test_a_late_option_has_a_flag_a_default_and_round_trips(toy_method) -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert "toy: weight of the logit penalty [default: 0.01]" in parser.format_help()
    assert cli.config_from_args(parser.parse_args([])).toy_weight == 0.01  # the declared default
    cfg = cli.config_from_args(parser.parse_args(["--toy-weight", "0.2", "--members", "2"]))
    assert (cfg.toy_weight, cfg.extra, cfg.members) == (0.2, {"toy_weight": 0.2}, 2)
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    assert TrainConfig().to_dict()["toy_weight"] == 0.01
    with pytest.raises(AttributeError):
        _ = cfg.no_such_option


def test_an_option_name_means_one_thing() -> None:
    clash = registry.MethodSpec(
        "toy-clash", "x", LogitDecay, options=(registry.Option("ncl_weight", float, 0.5, "other"),)
    )
    with pytest.raises(ValueError, match="declares option 'ncl_weight' unlike another method"):
        registry.register(clash)
    assert "toy-clash" not in registry.METHODS


def test_option_checks_name_the_flag_and_the_range() -> None:
    shared = registry.SHARED_BATCH  # (0, 1]
    shared.check(1.0)
    for bad in (0.0, 1.5):
        with pytest.raises(UserError, match=r"^--shared-batch must be in \(0, 1\], got "):
            shared.check(bad)
    with pytest.raises(UserError, match="--saliency must be one of gradcam, inputgrad, got 'x'"):
        registry.SALIENCY.check("x")
    registry.LAMBDA_DIV.check(None)  # None: derived at resolve time
    with pytest.raises(UserError, match=r"--lambda-div must be >= 0, got -0\.1"):
        registry.LAMBDA_DIV.check(-0.1)
    tau = registry.options()["dice_tau"]
    with pytest.raises(UserError, match="--dice-tau must be > 0, got 0"):
        tau.check(0)
    with pytest.raises(UserError, match="--adv-eps must be >= 0"):
        TrainConfig(method="de-adv", adv_eps=-0.5).validate()


def test_the_registry_is_the_one_source() -> None:
    assert tuple(METHODS) == registry.names()
    assert all(name in FIELD_HELP["method"] for name in registry.names())
    assert registry.names(compares_members=True) == ("sdde", "sdde-oe", "ncl", "adp", "dice")
    assert registry.names(periodic=True) == ("sdde",)
    # each option is a TrainConfig field with its declared default, and config.json holds the
    # common fields and the options, nothing else
    defaults = TrainConfig()
    for spec in registry.METHODS.values():
        for opt in spec.options:
            assert getattr(defaults, opt.name) == opt.default == spec.defaults[opt.name]
        for name in spec.hparams:
            assert name in defaults.to_dict(), (spec.name, name)
    common = {f.name for f in dataclasses.fields(CommonConfig)}
    assert set(defaults.to_dict()) == common | set(registry.options())
    assert set(FIELD_HELP) == common
    with pytest.raises(UserError, match="unknown --method 'nope'"):
        TrainConfig(method="nope").validate()
    with pytest.raises(UserError, match="unknown training config keys: extra"):
        TrainConfig.from_dict({"extra": {}})
