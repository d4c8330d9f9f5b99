"""At export: the KNN bank from the run's training images and the choice of the deployed score.

``choose_ood_score`` runs the PyTorch ensemble on the training split (bank features), the
validation split and the ``--ood-val`` sets (candidate scores), then applies the numpy rule of
export/select.py. Without ``--ood-val``, ``auto`` ranks the candidates on validation OOD sets
synthesized from the validation images (export/synth_ood.py) unless ``--synth-ood none``.
The threshold is *not* fitted here: that happens on the exported graph's own outputs
(sdde_serve/calibrate.py), once the score is known.
"""

from __future__ import annotations

from dataclasses import dataclass
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
from export.select import ScoreInputs, select_score
from export.synth_ood import PER_KIND, SEED, synthesize
from sdde_serve import calibration as cal
from sdde_serve.data import ArrayDataset, load_dataset
from sdde_serve.errors import UserError
from sdde_serve.manifest import KNNSpec, ScoreSelection, SynthesizedOOD

SYNTH_PREFIX = "synth:"  # names of the synthesized sets in ood.selection


@dataclass
class OODChoice:
    score: str
    k: int | None
    bank: FeatureBank | None
    selection: ScoreSelection
    source: str

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


def training_bank(
    run: Any, shape: tuple[int, int, int], *, rows: int, seed: int
) -> tuple[FeatureBank, str]:
    """The bank from ``run``'s training split (never its validation split) and its description."""
    from training.run import load_train_split

    train = load_train_split(run.run_dir, run.config)
    if len(train) == 0:
        raise UserError(f"{run.run_dir}: the training split is empty; export with --knn-bank 0")
    # subsample first (it depends on the labels only): features for the kept rows alone, so a
    # 10,000-row bank of a 45,000-image training set costs 10,000 forward passes, not 45,000
    labels = np.zeros(len(train)) if train.labels is None else train.labels
    idx = stratified_subsample(labels, rows, seed)
    feats = pre_logit_features(run.ensemble.eval(), train.subset(idx).as_model_input(*shape))
    bank = FeatureBank(normalize_rows(feats).astype(np.float32), "float32", len(train), idx, seed)
    spec = run.config["data"].get("spec", train.name)
    source = (
        f"training split of {spec!r} ({len(train)} images; validation indices of split.json "
        f"excluded), {bank.rows} rows"
        + ("" if bank.rows == len(train) else f" stratified by class, seed {seed}")
    )
    return bank, source


def check_float16(bank: FeatureBank, queries: np.ndarray, k: int, full: np.ndarray) -> None:
    """``--knn-dtype float16`` only if it moves no validation score by more than 1e-3."""
    diff = float(np.abs(knn_scores(queries, bank.bank, k) - knn_scores(queries, full, k)).max())
    if diff > FLOAT16_TOLERANCE:
        raise UserError(
            f"--knn-dtype float16 changes validation KNN scores by up to {diff:.2g} "
            f"(> {FLOAT16_TOLERANCE:g}); export with --knn-dtype float32"
        )


def synthesized_sets(
    run: Any, kinds: tuple[str, ...]
) -> tuple[dict[str, ArrayDataset], dict[str, str], SynthesizedOOD]:
    """Validation OOD sets made from ``run``'s validation images: (sets, specs, record)."""
    made = synthesize(run.val.images, run.val.labels, kinds, per_kind=PER_KIND, seed=SEED)
    sets = {f"{SYNTH_PREFIX}{k}": ArrayDataset(f"{SYNTH_PREFIX}{k}", v) for k, v in made.items()}
    specs = {name: f"{name.removeprefix(SYNTH_PREFIX)} of {run.val.name}" for name in sets}
    n = len(next(iter(made.values())))
    record = SynthesizedOOD(source=run.val.name, kinds=list(kinds), per_kind=n, seed=SEED)
    return sets, specs, record


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
) -> OODChoice:
    """The deployed score, k and bank for ``run`` (export/select.py has the rule).

    ``synth_kinds``: with ``score == "auto"`` and no ``ood_val``, rank on sets of these kinds
    synthesized from the validation split (export/synth_ood.py); ``()``: the fixed default."""
    ensemble = run.ensemble.eval()
    bank, source = (None, "")
    if rows > 0:
        if dtype not in DTYPES:
            raise UserError(f"--knn-dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        # float32 first: a float16 bank is checked against it once k is known
        bank, source = training_bank(run, shape, rows=rows, seed=seed)
        if knn_k is not None and knn_k > bank.rows:
            raise UserError(
                f"--knn-k {knn_k} is larger than the KNN bank ({bank.rows} rows: the run's "
                "training split); lower --knn-k"
            )
    val = score_inputs(ensemble, run.val.as_model_input(*shape), bank is not None)
    datasets: dict[str, ArrayDataset] = {}
    for name, spec in ood_val.items():
        datasets[name] = load_dataset(spec, split="test")
        if len(datasets[name]) == 0:
            raise UserError(f"--ood-val {name}={spec}: the data set is empty")
    specs, synthesized = dict(ood_val), None
    if score == "auto" and not ood_val and synth_kinds and len(run.val) >= 2:
        datasets, specs, synthesized = synthesized_sets(run, synth_kinds)
    sets = {
        name: score_inputs(ensemble, data.as_model_input(*shape), bank is not None)
        for name, data in datasets.items()
    }
    # msp depends on T: the candidates see the T the export will fit on the same split
    temperature = cal.fit_temperature(val.logits, run.val.labels) if sets else 1.0
    chosen, k, selection = select_score(
        score,
        id_data=val,
        id_name=run.val.name,
        ood_val=sets,
        ood_specs=specs,
        temperature=temperature,
        bank=None if bank is None else bank.bank,
        default_k=default_k(0 if bank is None else bank.rows),
        knn_k=knn_k,
    )
    if bank is not None and dtype != "float32" and k is not None:
        assert val.features is not None
        stored = bank.as_dtype(dtype)
        check_float16(stored, val.features, k, bank.bank)
        bank = stored
    if synthesized is not None:
        reason = f"{selection.reason} (sets synthesized from it: no --ood-val given)"
        selection = selection.model_copy(update={"synthesized": synthesized, "reason": reason})
    return OODChoice(chosen, k, bank, selection, source)
