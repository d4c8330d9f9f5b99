"""The dead-member guard: a member stuck near chance while its peers learn is found, logged in
metrics.jsonl and re-initialised from a seeded generator; a slow starter is given time; healthy
runs are left alone; a resumed run revives exactly as an uninterrupted one."""

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
from training.dead_members import PATIENCE, Guard, revive_seed, stuck_members
from training.ensemble import Ensemble
from training.methods import StepBatch
from training.models import create_model
from training.run import stuck_at_end
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


# Member accuracies at the epoch ends of the built-in digits' seed-2 SDDE run (8 steps an epoch,
# AMD EPYC): member 0 starts slowly and, left alone, learns with the others.
SLOW_START = {
    8: [0.12, 0.13, 0.11, 0.12, 0.24],
    16: [0.08, 0.22, 0.18, 0.12, 0.30],
    24: [0.11, 0.44, 0.38, 0.36, 0.43],
    32: [0.31, 0.47, 0.47, 0.42, 0.57],
    40: [0.44, 0.68, 0.52, 0.59, 0.62],
}


def test_guard_gives_a_slow_starter_the_time_its_peers_needed() -> None:
    guard = Guard.fresh(5)
    for step, acc in SLOW_START.items():
        assert guard.judge(acc, 10, step, last=False) == []
    # the peers got going at step 24 (median 0.40 >= 0.1 + 0.25 * 0.9): member 0, below the
    # line there, is left alone until it has had PATIENCE * 24 steps of its own
    assert guard.ready_step == 24 and stuck_members(SLOW_START[24], 10)[0]["member"] == 0
    dead = [0.1, 0.9, 0.9, 0.9, 0.9]
    assert guard.judge(dead, 10, PATIENCE * 24 - 8, last=False) == []
    (revived,) = guard.judge(dead, 10, PATIENCE * 24, last=False)
    assert revived["member"] == 0 and revived["action"] == "reinitialized"
    # the revived member's clock restarts: judged again only PATIENCE * 24 steps later ...
    guard.revived(0, PATIENCE * 24)
    assert guard.judge(dead, 10, 2 * PATIENCE * 24 - 8, last=False) == []
    assert guard.judge(dead, 10, 2 * PATIENCE * 24, last=False)[0]["member"] == 0
    guard.revived(0, 2 * PATIENCE * 24)
    # ... except at the last step, where every member below the line is reported, not revived
    assert guard.born == [2 * PATIENCE * 24, 0, 0, 0, 0]
    (end,) = guard.judge(dead, 10, 2 * PATIENCE * 24 + 8, last=True)
    assert end["action"] == "none (last step)" and guard.born[0] == 2 * PATIENCE * 24
    # the memory round-trips through last_state.pt's plain containers; no memory: a fresh guard
    assert Guard.from_state(guard.to_state(), 5) == guard
    assert Guard.from_state(None, 5) == Guard(born=[0] * 5, ready_step=None)


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
    settings.update(progress=False, **kw)
    return tiny_train_config(out, data=data, method=method, official_protocol=True, **settings)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _member(weights: dict[str, Tensor], i: int) -> dict[str, Tensor]:
    prefix = f"members.{i}."
    return {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}


def test_guard_revives_a_stuck_member_and_resumes_bit_identical(
    frozen_method: str, digits600: str, tmp_path: Path
) -> None:
    cfg = _cfg(tmp_path / "straight", digits600, frozen_method, epochs=5)
    straight = train(cfg)
    recs = _records(straight)
    assert [r["epoch"] for r in recs] == [1, 2, 3, 4, 5]
    judged = [r for r in recs if "stuck_members" in r]
    # the peer got going in epoch 2 (step 32); member 0 is judged after twice that (step 64),
    # and reported at the end
    assert [r["step"] for r in judged] == [PATIENCE * 32, 80]
    assert stuck_at_end(straight) == [0]  # what the benchmarks report
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
    # killed after the peer got going (step 40: the guard's memory must survive) and again
    # mid-epoch 5, after the revival (the revived weights and momentum), resumed each time: the
    # same weights, momentum and records as the straight run
    part = dataclasses.replace(cfg, out=str(tmp_path / "resumed"), max_steps=40)
    train(part)
    train(dataclasses.replace(part, max_steps=70, resume=True))
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
    # a --max-steps stop validates mid-epoch and may keep that as the best: "best" may differ
    strip = lambda r: {k: v for k, v in r.items() if k not in ("time_s", "best")}  # noqa: E731
    rb = [r for r in _records(resumed) if r["step"] not in (40, 70)]
    assert [strip(r) for r in recs] == [strip(r) for r in rb]


def test_guard_leaves_a_healthy_run_alone(digits600: str, tmp_path: Path) -> None:
    run = train(_cfg(tmp_path / "de", digits600, "de"))
    recs = _records(run)
    assert all("stuck_members" not in r for r in recs) and stuck_at_end(run) == []
    accs = recs[-1]["val"]["member_acc"]
    assert min(accs) > 0.3  # every member learned, so the guard had something to compare
