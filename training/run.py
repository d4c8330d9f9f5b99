"""The run directory: its format, writing it (trainer) and loading it back (``load_run``).

```
RUN_DIR/config.json         {"schema": "sdde-run/1", resolved TrainConfig, "data", "model"}
                            ("model" records the pretrained file's SHA-256 under "pretrained")
RUN_DIR/split.json          {"seed", "val_fraction", "n", "val_indices", "fingerprint"}
RUN_DIR/metrics.jsonl       one JSON object per epoch (and one at a max_steps stop)
RUN_DIR/best.safetensors    weights only: member i under "members.{i}.", plus "mean" and "std"
RUN_DIR/last.safetensors
RUN_DIR/last_state.pt       optimizer, RNG, step, best, running sums: torch.load(weights_only=True)
```

In config.json the TrainConfig field ``data`` (the spec string) is replaced by the ``data`` block
(``{"spec", "split", "name", "classes", "channels", "height", "width", "mean", "std"}``), whose
``spec`` holds that string. A run recorded before a config field existed loads with the value it
trained with (``LEGACY_DEFAULTS``), not the field's new default. Nothing here unpickles
objects: safetensors for weights, and ``weights_only=True`` for the resume state. Files are
written to a temporary name, fsynced and renamed (``sdde_serve.atomic``), so an interrupted write
never leaves a truncated file under the real name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from sdde_serve.atomic import atomic_path, write_bytes_atomic
from sdde_serve.data import ArrayDataset, parse_spec, read_run_json, run_part
from sdde_serve.errors import UserError
from training import pretrained
from training.config import RESUME_OVERRIDABLE, TrainConfig
from training.ensemble import Ensemble, build_ensemble

SCHEMA = "sdde-run/1"
CONFIG, SPLIT, METRICS = "config.json", "split.json", "metrics.jsonl"
BEST, LAST, STATE = "best.safetensors", "last.safetensors", "last_state.pt"
CHECKPOINTS = {"best": BEST, "last": LAST}


@dataclass
class LoadedRun:
    """A trained run: its config.json (dict), its ensemble (eval mode, CPU) and validation split."""

    config: dict[str, Any]
    ensemble: Ensemble
    val: ArrayDataset
    run_dir: Path
    checkpoint: str

    @property
    def train_config(self) -> TrainConfig:
        return _train_config(self.config)


def load_run(run_dir: str | Path, checkpoint: str = "best") -> LoadedRun:
    """Loads ``run_dir``'s ``checkpoint`` ("best" or "last") and its validation split.

    The validation split is rebuilt from the recorded data spec and ``split.json``; the data's
    fingerprint must match the recorded one (the spec must still mean the same images). Every
    problem (missing, truncated, other schema, other data) raises ``UserError`` with one line.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    if checkpoint not in CHECKPOINTS:
        raise UserError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {checkpoint!r}")
    config = read_config(run_dir)
    weights_path = run_dir / CHECKPOINTS[checkpoint]
    if not weights_path.exists():
        hint = (
            " (the run stopped before its first validation; use 'last')"
            if checkpoint == "best"
            else ""
        )
        raise UserError(f"{run_dir} has no {weights_path.name}{hint}")
    try:
        data, model = config["data"], config["model"]
        ensemble = build_ensemble(
            model["arch"],
            members=int(model["members"]),
            num_classes=int(model["num_classes"]),
            in_chans=int(model["in_chans"]),
            mean=data["mean"],
            std=data["std"],
            saliency_layer=model.get("saliency_layer"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{run_dir / CONFIG}: incomplete run config ({exc!r})") from None
    try:
        ensemble.load_state_dict(read_weights(weights_path), strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"{weights_path} does not match {CONFIG} ({first})") from None
    ensemble.eval()
    return LoadedRun(config, ensemble, load_val_split(run_dir, config), run_dir, checkpoint)


def load_val_split(run_dir: Path, config: dict[str, Any]) -> ArrayDataset:
    """The run's validation images, rebuilt from the data spec and split.json (checked); the
    same images as the data spec ``RUN_DIR@val`` (``sdde_serve.data.run_part``)."""
    return run_part(run_dir, "val", config["data"]["spec"])


def load_train_split(run_dir: Path, config: dict[str, Any]) -> ArrayDataset:
    """The images the run trained on: its data minus split.json's validation indices."""
    return run_part(run_dir, "train", config["data"]["spec"])


def read_config(run_dir: Path) -> dict[str, Any]:
    """config.json, checked for the schema and its data/model blocks."""
    path = run_dir / CONFIG
    if not path.exists():
        raise UserError(f"{run_dir} holds no training run ({CONFIG} is missing)")
    raw = read_run_json(path)
    found = raw.get("schema") if isinstance(raw, dict) else None
    if found != SCHEMA:
        raise UserError(f"{path}: not an {SCHEMA} run directory (schema {found!r})")
    for block in ("data", "model"):
        if not isinstance(raw.get(block), dict):
            raise UserError(f"{path}: the {block!r} block is missing")
    return raw


# What runs recorded before these fields existed trained with: a resumed or reloaded old run keeps
# its protocol instead of silently taking the new defaults.
LEGACY_DEFAULTS: dict[str, Any] = {
    "shared_source": "stream",
    "shared_batch": 1.0,
    "diversity_period": 1,
    "diversity_pairs": 0,
    "lambda_warmup_epochs": 0.0,
}


def _train_config(raw: dict[str, Any]) -> TrainConfig:
    fields = {k: v for k, v in raw.items() if k not in ("schema", "data", "model")}
    fields = {**LEGACY_DEFAULTS, **fields}
    fields["data"] = raw["data"]["spec"]
    return TrainConfig.from_dict(fields)


def recorded_config(out: Path) -> TrainConfig:
    """The TrainConfig recorded in ``out/config.json`` (its ``data`` block gives ``data``)."""
    return _train_config(read_config(out))


def check_fresh_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()):
        if (out / CONFIG).exists():
            raise UserError(
                f"{out} already holds a run; pass --resume to continue it or choose another --out"
            )
        raise UserError(f"--out {out} exists and is not empty; choose another directory")


def resume_config(given: dict[str, Any]) -> TrainConfig:
    """The config of ``sdde train --resume``: the recorded run, changed only by the flags the
    user actually passed (``given``; argparse defaults are not flags).

    Flags in ``RESUME_OVERRIDABLE`` replace the recorded values; any other flag must equal the
    recorded value, else one line names them (a different ``--method`` is refused, not ignored).
    """
    out = Path(given.get("out") or TrainConfig().out)
    if not (out / CONFIG).exists():
        raise UserError(f"--resume: {out / CONFIG} is missing (nothing to resume)")
    recorded = recorded_config(out)
    changed = [
        name
        for name, value in given.items()
        if name not in RESUME_OVERRIDABLE and name != "out" and value != getattr(recorded, name)
    ]
    if changed:
        flags = ", ".join(
            f"--{n.replace('_', '-')} {given[n]!r} (run: {getattr(recorded, n)!r})" for n in changed
        )
        raise UserError(f"--resume continues the recorded run; these flags differ from it: {flags}")
    merged = recorded.to_dict()
    merged.update({k: v for k, v in given.items() if k in RESUME_OVERRIDABLE})
    merged["out"] = str(out)
    merged["resume"] = True
    return TrainConfig.from_dict(merged)


def load_resume(cfg: TrainConfig, out: Path) -> tuple[TrainConfig, dict[str, Any]]:
    """The recorded config (with the overridable fields taken from ``cfg``) and the state."""
    recorded = recorded_config(out)
    default = TrainConfig()
    changed = [
        name
        for name in recorded.to_dict()
        if name not in RESUME_OVERRIDABLE
        and name != "out"
        and getattr(cfg, name) != getattr(default, name)  # set explicitly by the caller
        and getattr(cfg, name) != getattr(recorded, name)
    ]
    if changed:
        flags = ", ".join("--" + n.replace("_", "-") for n in changed)
        raise UserError(f"--resume continues the recorded run; these flags differ from it: {flags}")
    merged = recorded.to_dict()
    for name in RESUME_OVERRIDABLE:
        merged[name] = getattr(cfg, name)
    merged["out"] = str(out)
    merged["resume"] = False  # what is recorded is the run, not how it was started
    for path in (out / LAST, out / STATE):
        if not path.exists():
            raise UserError(f"--resume: {path} is missing (nothing to resume)")
    try:
        state = torch.load(out / STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file: one clear line
        raise UserError(f"--resume: cannot read {out / STATE} ({exc.__class__.__name__})") from None
    return TrainConfig.from_dict(merged), state


def record_resumed_config(out: Path, cfg: TrainConfig) -> None:
    """Rewrites the fields a resume may change (``RESUME_OVERRIDABLE``) in config.json."""
    raw = read_config(out)
    updated = {**raw, **{k: getattr(cfg, k) for k in RESUME_OVERRIDABLE}, "resume": False}
    if updated != raw:
        write_bytes_atomic(out / CONFIG, json.dumps(updated, indent=2).encode())


def check_same_data(out: Path, full: ArrayDataset, fingerprint: str) -> None:
    split = read_run_json(out / SPLIT)
    if split.get("fingerprint") != fingerprint or split.get("n") != len(full):
        raise UserError(f"--resume: the data spec now gives different data than {out} used")


def write_run_header(
    out: Path,
    cfg: TrainConfig,
    full: ArrayDataset,
    fingerprint: str,
    val_idx,
    mean: list[float],
    std: list[float],
    n_classes: int,
) -> None:
    """config.json (schema, resolved config, data and model blocks) and split.json."""
    out.mkdir(parents=True, exist_ok=True)
    config = {"schema": SCHEMA, **cfg.to_dict(), "resume": False}
    config["data"] = {
        "spec": cfg.data,
        "split": parse_spec(cfg.data).split or "train",
        "name": full.name,
        "classes": list(full.classes) or [str(i) for i in range(n_classes)],
        "channels": cfg.in_chans,
        "height": cfg.input_size,
        "width": cfg.input_size,
        "mean": mean,
        "std": std,
    }
    config["model"] = {
        "arch": cfg.arch,
        "members": cfg.members,
        "num_classes": n_classes,
        "in_chans": cfg.in_chans,
        "saliency_layer": cfg.saliency_layer,
        # the weights members started from: {"source", "sha256"} (None: random initialisation)
        "pretrained": pretrained.record(cfg.pretrained),
    }
    split = {
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
        "n": len(full),
        "val_indices": [int(i) for i in val_idx],
        "fingerprint": fingerprint,
    }
    write_bytes_atomic(out / CONFIG, json.dumps(config, indent=2).encode())
    write_bytes_atomic(out / SPLIT, json.dumps(split).encode())
    (out / METRICS).touch()


def save_weights(ensemble: Ensemble, path: Path, step: int) -> None:
    """Weights only (safetensors): ``members.{i}.*`` plus the normalisation buffers."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in ensemble.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"schema": SCHEMA, "step": str(step)})


def read_weights(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path}: unreadable or truncated checkpoint ({exc})") from None


def save_state(
    out: Path,
    optimizer: torch.optim.Optimizer,
    step: int,
    best: dict[str, Any] | None,
    running: dict[str, Any],
    elapsed: float,
    cfg: TrainConfig,
    aux: dict[str, Any] | None = None,
    guard: dict[str, Any] | None = None,
) -> None:
    """Everything else ``--resume`` needs; plain containers and tensors (weights_only-loadable).

    The learning-rate schedule is a pure function of the step, so the step is its state.
    """
    state = {
        "schema": SCHEMA,
        "step": step,
        "epochs": cfg.epochs,
        "optimizer": optimizer.state_dict(),
        "rng": get_rng_state(),
        "best": best,
        "running": running,
        "elapsed_s": elapsed,
    }
    if guard is not None:  # the dead-member guard's memory (training/dead_members.py)
        state["guard"] = guard
    if aux is not None:  # a method's auxiliary module (DICE's discriminator) and its optimizer
        state["aux"] = aux
    with atomic_path(out / STATE) as tmp:
        torch.save(state, tmp)


def get_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def stuck_at_end(run_dir: Path) -> list[int]:
    """The members the dead-member guard reported below the line at the run's last validation
    (training/dead_members.py): a dead member that the ensemble's answers alone would not show."""
    lines = [ln for ln in (Path(run_dir) / METRICS).read_text().splitlines() if ln.strip()]
    last = json.loads(lines[-1]) if lines else {}
    return sorted({s["member"] for s in last.get("stuck_members", [])})


def keep_metrics_up_to(path: Path, step: int) -> None:
    """On resume, drop records written after the saved state (a crash between the two)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if _record_step(ln) <= step]
    if len(kept) != len(lines):
        write_bytes_atomic(path, "".join(ln + "\n" for ln in kept).encode())


def _record_step(line: str) -> float:
    """The step of a metrics line; a line cut short by a crash counts as after any step."""
    try:
        return float(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return float("inf")
