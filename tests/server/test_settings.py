"""Settings: environment, flags over environment, worker hand-off, validation."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from sdde_serve.errors import UserError
from sdde_serve.server.cli import add_arguments, build_settings, settings_env
from sdde_serve.server.settings import Settings


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_environment_then_flags(monkeypatch):
    monkeypatch.setenv("SDDE_PORT", "9001")
    monkeypatch.setenv("SDDE_API_KEYS", "a, b,,c")
    monkeypatch.setenv("SDDE_OOD_POLICY", "reject")
    monkeypatch.setenv("SDDE_MAX_QUEUE_DELAY_MS", "0.5")
    from_env = build_settings(parse("m.onnx"))
    assert from_env.port == 9001 and from_env.api_keys == ["a", "b", "c"]
    assert from_env.ood_policy == "reject" and from_env.max_queue_delay_ms == 0.5
    assert from_env.model == Path("m.onnx")
    flags = build_settings(parse("m.onnx", "--port", "9002", "--api-key", "x", "--api-key", "y"))
    assert flags.port == 9002 and flags.api_keys == ["x", "y"]  # flags win
    assert flags.ood_policy == "reject"  # flags not given keep the environment's value
    assert build_settings(parse("--require-gpu")).require_gpu is True
    assert build_settings(parse()).spin_wait is True
    assert build_settings(parse("--no-spin-wait")).spin_wait is False
    monkeypatch.setenv("SDDE_SPIN_WAIT", "false")
    assert build_settings(parse()).spin_wait is False
    assert build_settings(parse("--spin-wait")).spin_wait is True


def test_worker_environment_reproduces_the_settings(monkeypatch, tmp_path):
    original = Settings(
        model=tmp_path / "m.onnx", port=8123, max_batch_size=8, max_queue_size=64,
        api_keys=["k1", "k2"], ood_policy="reject", max_queue_delay_ms=0.25, require_gpu=True,
        spin_wait=False,
    )  # fmt: skip
    env = settings_env(original)
    assert "SDDE_HOST" not in env  # defaults are not exported
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert Settings() == original


def test_invalid_settings_are_one_line_user_errors(monkeypatch):
    with pytest.raises(UserError, match="port"):
        build_settings(parse("m.onnx", "--port", "-1"))
    monkeypatch.setenv("SDDE_MAX_BATCH_SIZE", "lots")
    with pytest.raises(
        UserError,
        match=r"^--max-batch-size \(SDDE_MAX_BATCH_SIZE\) must be an integer, got 'lots'$",
    ):
        build_settings(parse("m.onnx"))


def test_help_names_every_variable():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = parser.format_help()
    names = {f"SDDE_{name.upper()}" for name in Settings.model_fields} - {"SDDE_MODEL"}
    assert {n for n in names if n in text} == names
