"""``--probe-check`` reaches the engines of every backend, the Ray actors' included.

Ray itself is replaced by a stand-in that runs Ray Data's calls this backend makes in this
process (the actor class built with its constructor keywords, as each Ray actor builds it), so
the test needs neither the [ray] extra nor a Ray instance; tests/batch/test_ray.py runs the
real one.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sdde_serve.batch.writers import read_rows
from sdde_serve.engine import Engine
from sdde_serve.manifest import load_onnx, read_manifest, save_onnx_atomic, write_manifest
from sdde_serve.probe import PROBE_IMAGES, cpu_kind, encode_images, make_probe

from .conftest import score


class FakeDataset:
    """``from_items(items).map_batches(cls, ...).iter_batches()``, in this process."""

    def __init__(self, items: list[dict[str, str]]) -> None:
        self.items = items

    def map_batches(
        self, fn: Any, *, fn_constructor_kwargs: dict[str, Any], batch_size: int, **_: Any
    ) -> FakeDataset:
        self.actor, self.batch_size = fn(**fn_constructor_kwargs), batch_size
        return self

    def iter_batches(self, **_: Any) -> Any:
        for i in range(0, len(self.items), self.batch_size):
            chunk = self.items[i : i + self.batch_size]
            yield self.actor(
                {k: np.asarray([it[k] for it in chunk], dtype=object) for k in ("path", "file")}
            )


@pytest.fixture
def fake_ray(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    ray = types.ModuleType("ray")
    data = types.ModuleType("ray.data")
    context = types.SimpleNamespace(execution_options=types.SimpleNamespace())
    data.DataContext = types.SimpleNamespace(get_current=lambda: context)
    data.from_items = FakeDataset
    data.ActorPoolStrategy = lambda size: size
    ray.data = data
    ray.is_initialized = lambda: True  # connected already: the backend neither starts nor stops it
    ray.put = lambda obj: obj
    ray.ObjectRef = type("ObjectRef", (), {})
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.setitem(sys.modules, "ray.data", data)
    return ray


def with_failing_probe(model: Path, dst: Path) -> Path:
    """A copy of ``model`` whose probe stores logits 1 above what any machine computes."""
    engine = Engine(model)
    pixels = np.random.default_rng(0).random((PROBE_IMAGES, *engine.input_shape))
    encoded, images = encode_images(pixels)
    proto = load_onnx(model)
    manifest = read_manifest(proto)
    outputs = {"logits": engine.run(images).logits + 1.0}
    probe = make_probe(encoded, outputs, manifest.precision, cpu_kind())
    write_manifest(proto, manifest.model_copy(update={"probe": probe}))
    save_onnx_atomic(proto, dst)
    return dst


def test_every_backend_honours_probe_check(
    tmp_path: Path, linear_model, images, fake_ray, capsys: pytest.CaptureFixture[str]
) -> None:
    model = with_failing_probe(linear_model[0], tmp_path / "failing_probe.onnx")
    args = [model, tmp_path / "images", "--batch-size", "8", "--concurrency", "1"]
    for backend in ([], ["--ray"]):
        capsys.readouterr()
        assert score(*args, *backend, "-o", tmp_path / "refused.jsonl") == 2
        assert "refused (--probe-check warn serves it anyway)" in capsys.readouterr().err
    local, ray = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    assert score(*args, "-o", local, "--probe-check", "warn") == 0
    assert score(*args, "-o", ray, "--probe-check", "warn", "--ray") == 0
    assert list(read_rows(ray)) == list(read_rows(local))
    assert len(list(read_rows(ray))) == len(images)
    assert score(*args, "-o", tmp_path / "off.jsonl", "--probe-check", "off", "--ray") == 0
