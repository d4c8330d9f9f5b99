"""At export: the KNN bank from the run's training images and the choice of the deployed score.

``choose_ood_score`` runs the PyTorch ensemble on the training split (bank features), the
validation split and the ``--ood-val`` sets (candidate scores), then applies the numpy rule of
export/select.py. Without ``--ood-val``, ``auto`` ranks the candidates on validation OOD sets
synthesized from the validation images (export/synth_ood.py) unless ``--synth-ood none``.
The threshold is *not* fitted here: that happens on the exported graph's own outputs
(sdde_serve/calibrate.py), once the score is known.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from export.knn import (
    DTYPES,
    FLOAT16_TOLERANCE,
    FeatureBank,
    bank_fingerprint,
    default_k,
    knn_scores,
    normalize_rows,
    pre_logit_features,
    stratified_subsample,
)
from export.scores import initializer_name
from export.select import ScoreInputs, select_score
from export.synth_ood import PER_KIND, SEED, synthesize
from sdde_serve import calibration as cal
from sdde_serve import scores
from sdde_serve.data import ArrayDataset, load_dataset
from sdde_serve.errors import UserError
from sdde_serve.manifest import KNNSpec, ScoreSelection, ScoreStatsSpec, SynthesizedOOD
from sdde_serve.scores import combined

# scores with statistics of validation ID images (beyond the training split's): name ->
# (statistics fitted on the training rows, ScoreData of the choice half) -> full statistics.
# They are fitted on the images that choose the score, never on the calibration half.
VALIDATION_FITTED = {combined.SPEC.name: combined.standardise}

SYNTH_PREFIX = "synth:"  # names of the synthesized sets in ood.selection


@dataclass
class OODChoice:
    score: str
    k: int | None
    bank: FeatureBank | None
    selection: ScoreSelection
    source: str
    # fitted statistics of the registered scores that need them (training split), by score
    stats: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    train: TrainingFeatures | None = None  # fits the statistics still missing, on demand
    # the choice half's images as the scores see them (VALIDATION_FITTED's statistics)
    choice_data: scores.ScoreData | None = None

    def stats_of(self, name: str) -> dict[str, np.ndarray] | None:
        """``name``'s statistics, fitted on first use (None: it has none or cannot have them)."""
        if name not in self.stats and self.train is not None:
            fitted = self.train.fit(name)
            if fitted is not None and name in VALIDATION_FITTED:
                fitted = (
                    None
                    if self.choice_data is None
                    else fit_on_validation(name, fitted, self.choice_data)
                )
            if fitted is not None:
                self.stats[name] = fitted
        return self.stats.get(name)

    def graph_scores(self, extra: tuple[str, ...] = ()) -> dict[str, dict[str, np.ndarray]]:
        """The scores export adds to the graph beyond mal, msp, minmax and knn, with their
        statistics: the deployed one and ``extra`` (``--with-score``)."""
        from export.graph import BASE_SCORES

        wanted = {self.score, *extra}
        out = {}
        for name in scores.names():  # registration order: a stable output order
            if name not in wanted or name in (*BASE_SCORES, "knn"):
                continue
            stats = self.stats_of(name)
            if scores.get(name).fit is not None and stats is None:
                raise UserError(
                    f"OOD score {name!r} needs statistics of labelled training features: export "
                    "with --knn-bank > 0 (its rows are the features it is fitted on)"
                )
            out[name] = stats or {}
        return out

    def stats_specs(self, names: list[str], initializers: set[str]) -> dict[str, ScoreStatsSpec]:
        """The manifest's record of the graph's fitted statistics. ``memory_bytes`` counts what
        the score itself stores: a statistic the graph shares with another score (``combined``'s
        bank is the ``knn_bank`` initializer, export/graph.py's ``store_stat``) is counted once,
        under the score whose initializer holds it."""
        return {
            n: ScoreStatsSpec(
                shapes={k: list(v.shape) for k, v in self.stats[n].items()},
                memory_bytes=sum(  # float32
                    4 * v.size
                    for k, v in self.stats[n].items()
                    if initializer_name(n, k) in initializers
                ),
                source=self.source,
            )
            for n in names
            if self.stats.get(n)
        }

    def bank_tensor(self) -> torch.Tensor | None:
        if self.bank is None:
            return None
        return torch.from_numpy(self.bank.bank.astype(np.float32))

    def knn_spec(self) -> KNNSpec | None:
        if self.bank is None or self.k is None:
            return None
        b = self.bank
        return KNNSpec(
            k=self.k,
            rows=b.rows,
            dims=b.dims,
            dtype=b.dtype,  # type: ignore[arg-type]
            memory_bytes=b.memory_bytes,
            source=self.source,
            source_images=b.source_images,
            subsample="all" if b.rows == b.source_images else "stratified",
            seed=b.seed,
            fingerprint=bank_fingerprint(b.bank),
        )


@torch.no_grad()
def score_inputs(ensemble: torch.nn.Module, images: np.ndarray, with_features: bool) -> ScoreInputs:
    logits = []
    for i in range(0, len(images), 512):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + 512], dtype=np.float32))
        logits.append(ensemble(x).double().numpy())
    feats = pre_logit_features(ensemble, images) if with_features else None
    return ScoreInputs(np.concatenate(logits), feats)


@dataclass
class TrainingFeatures:
    """Member pre-logit features of (a stratified subsample of) the run's training split."""

    features: np.ndarray  # [n, N, D] float32
    labels: np.ndarray | None
    indices: np.ndarray  # positions in the training split
    source_images: int  # images in the training split
    seed: int
    source: str
    weight: np.ndarray  # [N, L, D] each member's final linear layer
    bias: np.ndarray  # [N, L]

    def bank(self) -> FeatureBank:
        flat = self.features.reshape(len(self.features), -1)
        bank = normalize_rows(flat).astype(np.float32)
        return FeatureBank(bank, "float32", self.source_images, self.indices, self.seed)

    def fit(self, name: str) -> dict[str, np.ndarray] | None:
        """Registered score ``name``'s statistics (None: it needs none, or labels are missing)."""
        fit = scores.get(name).fit
        if fit is None or self.labels is None:
            return None
        return fit(scores.FitData(self.features, self.labels, self.weight, self.bias))


def training_features(
    run: Any, shape: tuple[int, int, int], *, rows: int, seed: int
) -> TrainingFeatures:
    """Features of ``run``'s training split (never its validation split) and their description."""
    from training.run import load_train_split

    train = load_train_split(run.run_dir, run.config)
    if len(train) == 0:
        raise UserError(f"{run.run_dir}: the training split is empty; export with --knn-bank 0")
    # subsample first (it depends on the labels only): features for the kept rows alone, so a
    # 10,000-row bank of a 45,000-image training set costs 10,000 forward passes, not 45,000
    labels = np.zeros(len(train)) if train.labels is None else train.labels
    idx = stratified_subsample(labels, rows, seed)
    ensemble = run.ensemble.eval()
    feats = pre_logit_features(ensemble, train.subset(idx).as_model_input(*shape))
    feats = feats.reshape(len(idx), ensemble.num_members, -1)
    spec = run.config["data"].get("spec", train.name)
    source = (
        f"training split of {spec!r} ({len(train)} images; validation indices of split.json "
        f"excluded), {len(idx)} rows"
        + ("" if len(idx) == len(train) else f" stratified by class, seed {seed}")
    )
    kept = None if train.labels is None else train.labels[idx]
    weight, bias = final_layers(ensemble)
    return TrainingFeatures(feats, kept, idx, len(train), seed, source, weight, bias)


@torch.no_grad()
def final_layers(ensemble: torch.nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """``(W [N, L, D], b [N, L])``: every member's final linear layer (what reads the features)."""
    layers = [m.get_classifier() for m in ensemble.members]
    weight = np.stack([layer.weight.double().numpy() for layer in layers])
    return weight, np.stack([layer.bias.double().numpy() for layer in layers])


def training_bank(
    run: Any, shape: tuple[int, int, int], *, rows: int, seed: int
) -> tuple[FeatureBank, str]:
    """The bank from ``run``'s training split (never its validation split) and its description."""
    train = training_features(run, shape, rows=rows, seed=seed)
    return train.bank(), train.source


def check_float16(bank: FeatureBank, queries: np.ndarray, k: int, full: np.ndarray) -> None:
    """``--knn-dtype float16`` only if it moves no validation score by more than 1e-3."""
    diff = float(np.abs(knn_scores(queries, bank.bank, k) - knn_scores(queries, full, k)).max())
    if diff > FLOAT16_TOLERANCE:
        raise UserError(
            f"--knn-dtype float16 changes validation KNN scores by up to {diff:.2g} "
            f"(> {FLOAT16_TOLERANCE:g}); export with --knn-dtype float32"
        )


def fit_on_validation(
    name: str, fitted: dict[str, np.ndarray], choice: scores.ScoreData
) -> dict[str, np.ndarray]:
    """``name``'s training-split statistics completed on the choice half's ID images."""
    return VALIDATION_FITTED[name](fitted, choice)


def synthesized_sets(
    val: ArrayDataset, kinds: tuple[str, ...]
) -> tuple[dict[str, ArrayDataset], dict[str, str], SynthesizedOOD]:
    """Validation OOD sets made from the images of ``val`` (the validation split):
    (sets, specs, record)."""
    made = synthesize(val.images, val.labels, kinds, per_kind=PER_KIND, seed=SEED)
    sets = {f"{SYNTH_PREFIX}{k}": ArrayDataset(f"{SYNTH_PREFIX}{k}", v) for k, v in made.items()}
    specs = {name: f"{name.removeprefix(SYNTH_PREFIX)} of {val.name}" for name in sets}
    n = len(next(iter(made.values())))
    record = SynthesizedOOD(source=val.name, kinds=list(kinds), per_kind=n, seed=SEED)
    return sets, specs, record


# the seed of the validation split's division into the choice's and the calibration's halves
SPLIT_SEED = 0


def split_validation(
    val: ArrayDataset, seed: int = SPLIT_SEED
) -> tuple[ArrayDataset, ArrayDataset]:
    """(choice half, calibration half) of the validation split: disjoint, stratified by class.

    ``auto`` with ``--ood-val`` chooses the score on the first and T, the threshold and the
    conformal calibration scores are fitted on the second: the calibration scores then stay
    exchangeable with future in-distribution scores (a score chosen because the calibration
    images happened to score high against the OOD sets would bias its own threshold).
    """
    labels = np.zeros(len(val)) if val.labels is None else val.labels
    choice = stratified_subsample(labels, len(val) // 2, seed)
    rest = np.setdiff1d(np.arange(len(val)), choice)
    return (
        val.subset(choice, f"{val.name} (choice half, {len(choice)} images)"),
        val.subset(rest, f"{val.name} (calibration half, {len(rest)} images)"),
    )


def validation_roles(
    val: ArrayDataset, score: str, ood_val: dict[str, str] | None
) -> tuple[ArrayDataset, ArrayDataset]:
    """(images that choose the score, images T and the threshold are fitted on): the two halves
    of :func:`split_validation` when ``auto`` chooses on ``--ood-val`` data or the deployed score
    fits statistics on validation ID images (:data:`VALIDATION_FITTED`), else the whole split
    twice. Splits need >= 2 images in each half.

    ``auto`` on synthesized sets keeps the whole split, measured (docs/scores.md, "combined"):
    halving it there moved MNIST's near FPR@95 from +0.18 to +2.30 points over the best single
    score (one seed's choice half ranked minmax over knn@1), and a default export of a small
    run then calibrated on so few images that its int8 precision check refused it."""
    chooses_on_real_data = score == "auto" and bool(ood_val)
    if (chooses_on_real_data or score in VALIDATION_FITTED) and len(val) >= 4:
        return split_validation(val)
    return val, val


def choose_ood_score(
    run: Any,
    score: str,
    shape: tuple[int, int, int],
    ood_val: dict[str, str],
    *,
    knn_k: int | None,
    rows: int,
    dtype: str,
    seed: int,
    synth_kinds: tuple[str, ...] = (),
    val: ArrayDataset | None = None,
) -> OODChoice:
    """The deployed score, k and bank for ``run`` (export/select.py has the rule); the
    candidates are measured on ``val`` (default: the run's validation split).

    ``synth_kinds``: with ``score == "auto"`` and no ``ood_val``, rank on sets of these kinds
    synthesized from the validation split (export/synth_ood.py); ``()``: the fixed default."""
    ensemble = run.ensemble.eval()
    val_data = run.val if val is None else val
    train = None if rows == 0 else checked_training_features(run, shape, knn_k, rows, dtype, seed)
    # float32 first: a float16 bank is checked against it once k is known
    bank = None if train is None else train.bank()
    val_in = score_inputs(ensemble, val_data.as_model_input(*shape), bank is not None)
    datasets, specs, synthesized = ood_val_sets(ood_val, val_data, score, synth_kinds)
    sets = {
        name: score_inputs(ensemble, data.as_model_input(*shape), bank is not None)
        for name, data in datasets.items()
    }
    # msp depends on T: the candidates see a T fitted on the images that rank them
    temperature = cal.fit_temperature(val_in.logits, val_data.labels) if sets else 1.0
    choice_data = val_in.score_data(temperature)
    # statistics are fitted when candidates need them (auto on real validation OOD sets), else
    # on demand. Synthesized sets rank only the scores without fitted statistics: that is the
    # rule benchmarks/synth_ood_mnist.py measured against real held-out OOD data.
    fit_now = bool(sets) and train is not None and synthesized is None
    stats = candidate_stats(train, choice_data) if fit_now else {}
    chosen, k, selection = select_score(
        score,
        id_data=val_in,
        id_name=val_data.name,
        ood_val=sets,
        ood_specs=specs,
        temperature=temperature,
        bank=None if bank is None else bank.bank,
        default_k=default_k(0 if bank is None else bank.rows),
        knn_k=knn_k,
        stats=stats,
    )
    if bank is not None and dtype != "float32" and k is not None:
        bank = stored_bank(bank, dtype, val_in, k)
    if synthesized is not None:
        reason = f"{selection.reason} (sets synthesized from it: no --ood-val given)"
        selection = selection.model_copy(update={"synthesized": synthesized, "reason": reason})
    source = "" if train is None else train.source
    return OODChoice(chosen, k, bank, selection, source, stats, train, choice_data)


def checked_training_features(
    run: Any, shape: tuple[int, int, int], knn_k: int | None, rows: int, dtype: str, seed: int
) -> TrainingFeatures:
    """:func:`training_features` once ``--knn-dtype`` is known good, and checked to have at
    least ``--knn-k`` rows (the run's training split can be smaller than ``--knn-bank``)."""
    if dtype not in DTYPES:
        raise UserError(f"--knn-dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    train = training_features(run, shape, rows=rows, seed=seed)
    if knn_k is not None and knn_k > len(train.features):
        raise UserError(
            f"--knn-k {knn_k} is larger than the KNN bank ({len(train.features)} rows: the run's "
            "training split); lower --knn-k"
        )
    return train


def ood_val_sets(
    ood_val: dict[str, str], val: ArrayDataset, score: str, synth_kinds: tuple[str, ...]
) -> tuple[dict[str, ArrayDataset], dict[str, str], SynthesizedOOD | None]:
    """The validation OOD sets the candidates are ranked on, their specs and, when they were
    synthesized from ``val`` (``auto`` without ``--ood-val``), the record of that."""
    datasets: dict[str, ArrayDataset] = {}
    for name, spec in ood_val.items():
        datasets[name] = load_dataset(spec, split="test")
        if len(datasets[name]) == 0:
            raise UserError(f"--ood-val {name}={spec}: the data set is empty")
    if score == "auto" and not ood_val and synth_kinds and len(val) >= 2:
        return synthesized_sets(val, synth_kinds)
    return datasets, dict(ood_val), None


def candidate_stats(
    train: TrainingFeatures, choice_data: scores.ScoreData
) -> dict[str, dict[str, np.ndarray]]:
    """The statistics of every candidate score that has them (training split, completed on the
    choice half's images for :data:`VALIDATION_FITTED`)."""
    fitted = {n: train.fit(n) for n in scores.names(candidate=True)}
    for n in VALIDATION_FITTED:
        if fitted.get(n) is not None:
            fitted[n] = fit_on_validation(n, fitted[n], choice_data)  # type: ignore[arg-type]
    return {n: v for n, v in fitted.items() if v is not None}


def stored_bank(bank: FeatureBank, dtype: str, val_in: ScoreInputs, k: int) -> FeatureBank:
    """``bank`` in ``--knn-dtype`` (float16: only if it moves no validation knn score much)."""
    assert val_in.features is not None
    stored = bank.as_dtype(dtype)
    check_float16(stored, val_in.features, k, bank.bank)
    return stored
