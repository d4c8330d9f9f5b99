"""The OOD-score registry: what every part of the code needs to know about a score, torch-free.

One :class:`ScoreSpec` per score says how to compute it in float64 numpy (the reference the
graph is tested against, and the value the runtime recomputes where a graph lacks the output),
which statistics of the training split it stores in the graph (fitted here, in numpy), how export
builds it into the graph (a ``"module:function"`` path into ``export/scores/``, imported only by
export, so this module never imports torch), whether it can be recomputed for a subset of the
members, and its help line and histogram buckets. Every score follows docs/conventions.md:
higher = more in-distribution, an image is OOD when ``score < threshold``.

The CLI choices, the manifest's accepted names, the engine's fetched outputs, the v2 outputs, the
server's histograms, the evaluation's score table, the members sweep and ``--ood-score auto``'s
candidates all derive from :data:`SCORES`. Add a score: docs/scores.md walks through it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from sdde_serve.errors import UserError

# a logit's range: wide and uneven. No negative bounds (prometheus_client drops a histogram's
# _sum with one); scores <= 0 share the first bucket.
LOGIT_BUCKETS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 15.0, 20.0,
                 30.0, 50.0)  # fmt: skip


@dataclass(frozen=True)
class ScoreData:
    """What a score's numpy reference reads, for a batch of B images."""

    logits: np.ndarray  # [B, N, L] member logits (float64)
    temperature: float = 1.0  # the graph's T (probabilities are mean_m softmax(z_m / T))
    features: np.ndarray | None = None  # [B, N, D] member pre-logit features, when needed
    stats: Mapping[str, np.ndarray] = field(default_factory=dict)  # the score's fitted stats
    params: Mapping[str, float] = field(default_factory=dict)  # e.g. KNN's k


@dataclass(frozen=True)
class FitData:
    """What a score's ``fit`` reads: training rows and each member's final linear layer."""

    features: np.ndarray  # [n, N, D] member pre-logit features
    labels: np.ndarray  # [n]
    weight: np.ndarray  # [N, L, D]: member m's logits are features[:, m] @ weight[m].T + bias[m]
    bias: np.ndarray  # [N, L]

    @property
    def logits(self) -> np.ndarray:
        """[n, N, L] member logits of the training rows."""
        return np.einsum("inD,nlD->inl", self.features, self.weight) + self.bias


# fit(training rows) -> named arrays stored in the graph as float32 initializers
FitFn = Callable[[FitData], dict[str, np.ndarray]]


@dataclass(frozen=True)
class ScoreSpec:
    """One OOD score; ``reference(data) -> [B]`` float64, higher = more in-distribution."""

    name: str
    summary: str  # one line: CLI help, API docs, evaluation tables
    reference: Callable[[ScoreData], np.ndarray]
    # "module:function" of export's graph head (export/scores/): (GraphInputs, stats, params)
    # -> [B] tensor. Imported by export only.
    graph: str | Callable
    # numpy statistics of the training split stored in the graph as float32 initializers named
    # "<score>_<key>" (None: the score needs none). KNN's bank has its own pipeline (export/knn.py).
    fit: FitFn | None = None
    needs_features: bool = False  # reads the members' pre-logit features
    # the reference is valid for any subset of the members (logits only, no stored statistics):
    # the members sweep (sdde_serve/evaluation/members.py) reports it per subset
    member_subset: bool = False
    # graphs exported before this score existed lack its output; the runtime recomputes it from
    # the logits (exactly, when the reference only picks float32 values)
    recompute_from_logits: bool = False
    in_every_graph: bool = False  # an output of every exported graph, old ones included
    candidate: bool = True  # among `--ood-score auto`'s candidates
    tolerance: float = 1e-4  # export verification: |graph - float64 reference| allowed
    # the tolerance is relative to max(1, max |reference|): for scores of a wide range (squared
    # distances), whose float32 error grows with their size
    relative_tolerance: bool = False
    buckets: tuple[float, ...] = LOGIT_BUCKETS  # Prometheus histogram bounds (>= 0)
    higher_is_in_distribution: bool = True  # the project's one sign convention: must be True

    def compute(self, data: ScoreData) -> np.ndarray:
        return np.asarray(self.reference(data), np.float64)


SCORES: dict[str, ScoreSpec] = {}


def register(spec: ScoreSpec) -> ScoreSpec:
    """Adds ``spec``; a name already taken or a reversed sign is an error."""
    if spec.name in SCORES:
        raise ValueError(f"OOD score {spec.name!r} is already registered")
    if not spec.higher_is_in_distribution:
        raise ValueError(f"OOD score {spec.name!r}: scores must be higher = more in-distribution")
    if "@" in spec.name or not spec.name.isidentifier():
        raise ValueError(f"OOD score name {spec.name!r} must be an identifier (no '@')")
    SCORES[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    SCORES.pop(name, None)


def get(name: str) -> ScoreSpec:
    """The registered score ``name``; an unknown name is a user error listing the known ones."""
    try:
        return SCORES[name]
    except KeyError:
        raise UserError(f"unknown OOD score {name!r}; choose one of: {', '.join(SCORES)}") from None


def names(**traits: bool) -> tuple[str, ...]:
    """Registered score names in registration order, optionally only those with the given traits
    (``names(member_subset=True)``)."""
    return tuple(
        s.name for s in SCORES.values() if all(getattr(s, k) == v for k, v in traits.items())
    )


def help_lines() -> str:
    """``name (summary)`` of every score, comma separated: the CLI's and the API's help."""
    return ", ".join(f"{s.name} ({s.summary})" for s in SCORES.values())
