"""The dead-member guard: a member stuck near chance while its peers learn is found, logged in
metrics.jsonl and re-initialised from a seeded generator; healthy runs are left alone; a resumed
run revives exactly as an uninterrupted one."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor

from tests.conftest import tiny_train_config
from training import registry
from training.dead_members import revive_seed, stuck_members
from training.ensemble import Ensemble
from training.methods import StepBatch
from training.models import create_model
from training.trainer import train


def test_stuck_members_on_the_cifar_repro_numbers() -> None:
    # The repro: 6 classes, member 3 at 0.162 while the others reach ~0.6.
    (found,) = stuck_members([0.555, 0.604, 0.617, 0.162, 0.61], num_classes=6)
    assert found["member"] == 3 and found["peer_acc"] == pytest.approx((0.604 + 0.61) / 2)
    # a healthy ensemble, a slow but learning member, and peers still at chance: nobody
    assert stuck_members([0.557, 0.609, 0.615, 0.588, 0.615], num_classes=6) == []
    assert stuck_members([0.557, 0.609, 0.30, 0.588, 0.615], num_classes=6) == []
    assert stuck_members([0.17, 0.18, 0.16, 0.2, 0.17], num_classes=6) == []
    assert stuck_members([0.9], num_classes=10) == []


@dataclass(frozen=True)
class FrozenFirstMember:
    """A constructed dead member: Deep Ensembles' loss without member 0's term, so member 0
    gets no gradient and keeps its initial weights (near chance) while the others learn."""

    name: str = "toy-frozen-first"

    def loss(self, ensemble: Ensemble, batch: StepBatch, cfg) -> tuple[Tensor, dict[str, float]]:
        logits = ensemble.forward_each([x for x, _ in batch.member_batches])
        pairs = zip(logits[1:], batch.member_batches[1:], strict=True)
        ce = torch.stack([F.cross_entropy(z, y) for z, (_, y) in pairs]).mean()
        return ce, {"loss": float(ce.detach())}


@pytest.fixture
def frozen_method() -> Iterator[str]:
    spec = registry.register(registry.MethodSpec("toy-frozen-first", "test", FrozenFirstMember))
    yield spec.name
    registry.unregister(spec.name)


@pytest.fixture(scope="module")
def digits600(tmp_path_factory) -> str:
    """600 training digits as a .npz spec: 540 train / 60 val, 16 steps of 32 per epoch."""
    from sdde_serve.data import load_dataset

    ds = load_dataset("digits")
    path = tmp_path_factory.mktemp("digits") / "digits600.npz"
    np.savez(path, images=ds.images[:600], labels=ds.labels[:600], classes=np.array(ds.classes))
    return str(path)


def _cfg(out: Path, data: str, method: str, **kw):
    settings = dict(members=2, epochs=3, batch_size=32, cam_samples=0, eval_train_samples=0)
    settings.update(progress=False)
    return tiny_train_config(
        out, data=data, method=method, official_protocol=True, **settings, **kw
    )


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _member(weights: dict[str, Tensor], i: int) -> dict[str, Tensor]:
    prefix = f"members.{i}."
    return {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}


def test_guard_revives_a_stuck_member_and_resumes_bit_identical(
    frozen_method: str, digits600: str, tmp_path: Path
) -> None:
    cfg = _cfg(tmp_path / "straight", digits600, frozen_method)
    straight = train(cfg)
    recs = _records(straight)
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    judged = [r for r in recs if "stuck_members" in r]
    assert judged and judged[-1] is recs[-1]  # judged once the peer learned, then every epoch
    for rec in judged:
        (stuck,) = rec["stuck_members"]
        assert stuck["member"] == 0 and stuck["val_acc"] == rec["val"]["member_acc"][0]
    actions = [r["stuck_members"][0]["action"] for r in judged]
    assert actions == ["reinitialized"] * (len(judged) - 1) + ["none (last step)"]
    # the revived member is exactly a fresh member drawn from revive_seed(seed, step, member)
    # (it gets no gradient afterwards, so the last weights are the last revival's draw)
    torch.manual_seed(revive_seed(cfg.seed, judged[-2]["step"], 0))
    fresh = create_model("lenet", num_classes=10, in_chans=1).state_dict()
    last = _member(load_file(str(straight / "last.safetensors")), 0)
    assert fresh.keys() == last.keys() and all(torch.equal(fresh[k], last[k]) for k in fresh)
    # killed mid-epoch 3, after the revival, and resumed: the same weights, momentum and records
    part = dataclasses.replace(cfg, out=str(tmp_path / "resumed"), max_steps=37)
    train(part)
    resumed = train(dataclasses.replace(part, max_steps=None, resume=True))
    a, b = (
        load_file(str(straight / "last.safetensors")),
        load_file(str(resumed / "last.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (torch.load(r / "last_state.pt", weights_only=True) for r in (straight, resumed))
    ma, mb = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert ma.keys() == mb.keys()
    assert all(torch.equal(ma[k]["momentum_buffer"], mb[k]["momentum_buffer"]) for k in ma)
    strip = lambda r: {k: v for k, v in r.items() if k != "time_s"}  # noqa: E731
    rb = [r for r in _records(resumed) if r["step"] != 37]
    assert [strip(r) for r in recs] == [strip(r) for r in rb]


def test_guard_leaves_a_healthy_run_alone(digits600: str, tmp_path: Path) -> None:
    recs = _records(train(_cfg(tmp_path / "de", digits600, "de")))
    assert all("stuck_members" not in r for r in recs)
    accs = recs[-1]["val"]["member_acc"]
    assert min(accs) > 0.3  # every member learned, so the guard had something to compare
