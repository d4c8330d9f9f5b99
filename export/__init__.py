"""PyTorch -> ONNX: one fused graph per trained run, carrying its calibration and OOD threshold.

``export_run(run_dir, output)`` loads a run directory, builds the KNN feature bank from the run's
training images, chooses the deployed OOD score (on validation OOD data when given), builds the
fused graph in the chosen layout and exports it, fits the temperature and the OOD threshold on
the run's validation split (on the graph's own outputs), verifies the graph against PyTorch at
that temperature and writes it with its manifest (docs/export.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdde_serve.errors import UserError
from sdde_serve.manifest import InputSpec, Manifest
from sdde_serve.transform import Resize
from training import registry

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from export.choice import OODChoice
    from export.quantize import PrecisionOptions
    from sdde_serve.data import ArrayDataset
    from sdde_serve.manifest import CalibrationInfo, OODSpec, PrecisionCheck
    from training.run import LoadedRun

__all__ = ["export_run"]

# Training hyper-parameters recorded in the manifest: the ones every method uses, plus each
# method's own as its registry entry lists them (training/registry.py; the full resolved config
# is recorded too, under ``training_config``).
COMMON_HPARAMS = (
    "epochs",
    "batch_size",
    "lr",
    "min_lr",
    "momentum",
    "nesterov",
    "weight_decay",
    "seed",
    "max_steps",
    "val_fraction",
    "augment",
    "best_metric",
)


def hyperparameters(config: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``hyperparameters``: COMMON_HPARAMS plus the run's method's own."""
    method = registry.METHODS.get(str(config.get("method")))
    keys = COMMON_HPARAMS + (method.hparams if method is not None else ())
    return {k: config[k] for k in keys if k in config}


def export_run(
    run_dir: str | Path,
    output: str | Path,
    *,
    layout: str | None = None,
    id_acceptance: float = 0.95,
    checkpoint: str = "best",
    name: str | None = None,
    version: str | None = None,
    with_cams: bool = True,
    opset: int | None = None,
    score: str = "auto",
    ood_val: dict[str, str] | None = None,
    knn_k: int | None = None,
    knn_bank: int | None = None,
    knn_dtype: str = "float32",
    knn_seed: int = 0,
    precision: PrecisionOptions | None = None,
    synth_ood: tuple[str, ...] | None = None,
    extra_scores: tuple[str, ...] = (),
) -> Manifest:
    """Export ``run_dir``'s ensemble to ``output`` (one ONNX file); returns its manifest.

    ``score``: the deployed OOD score (any of ``export.select.score_choices()``) or ``auto`` (the
    best validation AUROC against the ``ood_val`` sets ``{NAME: SPEC}``, else against sets
    synthesized per ``synth_ood``, else the benchmark's default). ``knn_bank``: most rows of
    the KNN bank (None: export.knn.DEFAULT_BANK_ROWS; 0: no bank and no ``knn`` output);
    ``knn_k``: its k (None: chosen, see export/select.py).
    ``extra_scores``: more registered OOD scores to put in the graph (the deployed one always is).
    ``precision`` (default fp32) converts the verified fp32 graph (``export/quantize.py``),
    refits T and the threshold on the converted graph and refuses it beyond its tolerances.
    ``synth_ood``: kinds of validation OOD data ``auto`` synthesizes when ``ood_val`` is empty
    (None: export.synth_ood.DEFAULT_KINDS; ``()``: none, the fixed default is deployed).
    """
    # torch and the exporter load slowly: each step imports what it needs when it runs
    from export.knn import DEFAULT_BANK_ROWS

    output = Path(output)
    rows = DEFAULT_BANK_ROWS if knn_bank is None else knn_bank
    knn = KNNOptions(k=knn_k, rows=rows, dtype=knn_dtype, seed=knn_seed)
    check_export_options(output, id_acceptance, score, knn)
    job = load_job(run_dir, checkpoint, layout=layout, opset=opset, precision=precision)
    choice, calibration = choose_score(job, score, ood_val or {}, knn, synth_ood, id_acceptance)
    fused = fuse(job, choice, with_cams=with_cams, extra_scores=extra_scores)
    fp32_calibration = calibration(fused.proto)
    # verified as written: with the fitted T in the file
    verify_fused(job, fused, choice, fp32_calibration[0].temperature, calibration.images)
    proto, calibrated = lower(job, fused.proto, fp32_calibration, calibration)
    manifest = build_manifest(
        job,
        proto,
        fused,
        choice,
        calibrated,
        name=name or Path(run_dir).resolve().name,
        version=version or "1",
        probe_images=calibration.images,
    )
    write_model(proto, manifest, output)
    return manifest


@dataclass
class ExportJob:
    """The loaded run and the graph's settings resolved from it: what every later step reads."""

    run: LoadedRun
    arch: str
    shape: tuple[int, int, int]  # (channels, height, width) the model takes
    layout: str
    opset: int
    precision: PrecisionOptions


@dataclass
class KNNOptions:
    """``--knn-k``, ``--knn-bank``, ``--knn-dtype`` and ``--knn-seed`` as export_run got them."""

    k: int | None
    rows: int
    dtype: str
    seed: int


@dataclass
class FusedGraph:
    """The exported fp32 graph, with the fitted statistics of the scores it computes."""

    proto: onnx.ModelProto
    outputs: list[str]
    score_stats: dict[str, dict[str, np.ndarray]]


@dataclass
class Calibration:
    """The images T and the OOD threshold are fitted on; called on a graph, it fits them there.

    One object both for the fp32 graph and, through ``lower_precision``, the converted one.
    """

    data: ArrayDataset
    images: np.ndarray  # ``data`` as the model takes it
    id_acceptance: float
    score: str

    def __call__(self, model: onnx.ModelProto) -> tuple[CalibrationInfo, OODSpec]:
        from sdde_serve.calibrate import calibrate_model

        # T is fitted on the graph's outputs and written into its `temperature` initializer
        return calibrate_model(
            model,
            self.images,
            self.data.labels,
            data=self.data.name,
            id_acceptance=self.id_acceptance,
            score=self.score,
        )


@dataclass
class Calibrated:
    """What calibrating (and converting) the final graph gave, as the manifest records it."""

    info: CalibrationInfo
    ood: OODSpec
    precision_check: PrecisionCheck | None


def check_export_options(output: Path, id_acceptance: float, score: str, knn: KNNOptions) -> None:
    """Fail on a bad output path or option before the run is loaded."""
    if output.is_dir():
        raise UserError(f"-o {output} is a directory; give a file name such as model.onnx")
    if not 0.0 < id_acceptance <= 1.0:
        raise UserError(f"--id-acceptance must be in (0, 1], got {id_acceptance}")
    check_ood_options(score, knn_k=knn.k, knn_bank=knn.rows)


def load_job(
    run_dir: str | Path,
    checkpoint: str,
    *,
    layout: str | None,
    opset: int | None,
    precision: PrecisionOptions | None,
) -> ExportJob:
    """Load the run and resolve the layout, opset and precision (bad names fail here, before
    the slow part)."""
    from export.graph import DEFAULT_OPSET
    from export.layouts import default_layout, get_layout
    from export.quantize import PrecisionOptions
    from training.run import load_run

    run = load_run(run_dir, checkpoint)
    data = run.config["data"]
    arch = str(run.config["model"]["arch"])
    precision = precision or PrecisionOptions()
    precision.validate()
    layout = layout or precision.default_layout(arch) or default_layout(arch)
    get_layout(layout)
    shape = (int(data["channels"]), int(data["height"]), int(data["width"]))
    if run.val.labels is None or len(run.val) == 0:
        raise UserError(f"{run_dir}: the validation split has no labelled images to calibrate on")
    return ExportJob(run, arch, shape, layout, opset or DEFAULT_OPSET, precision)


def choose_score(
    job: ExportJob,
    score: str,
    ood_val: dict[str, str],
    knn: KNNOptions,
    synth_ood: tuple[str, ...] | None,
    id_acceptance: float,
) -> tuple[OODChoice, Calibration]:
    """The deployed score (with its KNN bank and statistics) and the images T and the threshold
    are fitted on: two halves of the validation split when the choice could bias the threshold
    (export.choice.validation_roles), else the whole split for both."""
    from export.choice import choose_ood_score, validation_roles
    from export.synth_ood import DEFAULT_KINDS

    choice_val, cal_val = validation_roles(job.run.val, score, ood_val)
    cal_images = cal_val.as_model_input(*job.shape)
    choice = choose_ood_score(
        job.run,
        score,
        job.shape,
        ood_val,
        knn_k=knn.k,
        rows=knn.rows,
        dtype=knn.dtype,
        seed=knn.seed,
        synth_kinds=DEFAULT_KINDS if synth_ood is None else synth_ood,
        val=choice_val,
    )
    if choice_val is not cal_val:
        choice.selection = choice.selection.model_copy(update={"calibration_apart": True})
    return choice, Calibration(cal_val, cal_images, id_acceptance, choice.score)


def fuse(
    job: ExportJob, choice: OODChoice, *, with_cams: bool, extra_scores: tuple[str, ...]
) -> FusedGraph:
    """The fused fp32 graph of the ensemble with the chosen score's bank and statistics."""
    from export.graph import build_graph, to_onnx
    from export.knn import store_bank_as

    score_stats = choice.graph_scores(extra_scores)
    graph = build_graph(
        job.run.ensemble.eval(),
        job.layout,
        input_shape=job.shape,
        with_cams=with_cams,
        knn_bank=choice.bank_tensor(),
        knn_k=choice.k,
        score_stats=score_stats,
    )
    proto = to_onnx(graph, input_shape=job.shape, opset=job.opset)
    if choice.bank is not None and choice.bank.dtype != "float32":
        store_bank_as(proto, choice.bank.dtype)
    return FusedGraph(proto, graph.output_names, score_stats)


def verify_fused(
    job: ExportJob,
    fused: FusedGraph,
    choice: OODChoice,
    temperature: float,
    val_images: np.ndarray,
) -> None:
    """The fp32 graph against the PyTorch ensemble at ``temperature`` (raises on a mismatch)."""
    from export.verify import verification_inputs, verify

    verify(
        fused.proto,
        job.run.ensemble.eval(),
        temperature=temperature,
        inputs=verification_inputs(job.shape, val_images),
        knn=None if choice.bank is None else (choice.bank.bank, choice.k),
        scores=fused.score_stats,
    )


def lower(
    job: ExportJob,
    proto: onnx.ModelProto,
    fp32_calibration: tuple[CalibrationInfo, OODSpec],
    calibration: Calibration,
) -> tuple[onnx.ModelProto, Calibrated]:
    """The verified graph in ``--precision``, recalibrated and checked against fp32 (fp32: the
    graph and its calibration unchanged)."""
    from export.quantize import lower_precision, run_training_images

    proto, info, ood, check = lower_precision(
        proto,
        job.precision,
        fp32_calibration=fp32_calibration,
        calibrate=calibration,
        val_images=calibration.images,
        val_labels=calibration.data.labels,
        val_name=calibration.data.name,
        train_images=lambda n: run_training_images(job.run, n, job.shape),
    )
    return proto, Calibrated(info, ood, check)


def build_manifest(
    job: ExportJob,
    proto: onnx.ModelProto,
    fused: FusedGraph,
    choice: OODChoice,
    calibrated: Calibrated,
    *,
    name: str,
    version: str,
    probe_images: np.ndarray,
) -> Manifest:
    """The manifest of the final graph ``proto`` (docs/export.md lists its fields)."""
    from export.verify import build_probe
    from sdde_serve.manifest import weights_sha256

    config = job.run.config
    precision = job.precision.precision
    return Manifest(
        name=name,
        version=version,
        classes=[str(c) for c in config["data"]["classes"]],
        input=input_spec(config["data"], job.shape),
        arch=job.arch,
        members=int(config["model"]["members"]),
        method=str(config.get("method", "unknown")),
        hyperparameters=hyperparameters(config),
        layout=job.layout,
        opset=job.opset,
        outputs=fused.outputs,
        temperature=calibrated.info.temperature,
        ood=calibrated.ood.model_copy(update={"selection": choice.selection}),
        calibration=calibrated.info,
        knn=choice.knn_spec(),
        score_stats=choice.stats_specs(
            list(fused.score_stats), {t.name for t in fused.proto.graph.initializer}
        ),
        weights_sha256=weights_sha256(proto),
        precision=precision,
        precision_check=calibrated.precision_check,
        # what the final graph gives on a few validation images, checked again at load time
        probe=build_probe(proto, probe_images, precision),
        training_config={k: v for k, v in config.items() if k != "schema"},
    )


def input_spec(data: dict[str, Any], shape: tuple[int, int, int]) -> InputSpec:
    """The manifest's input section from the run's data config."""
    return InputSpec(
        channels=shape[0],
        height=shape[1],
        width=shape[2],
        mean=[float(v) for v in data["mean"]],
        std=[float(v) for v in data["std"]],
        color="L" if shape[0] == 1 else "RGB",
        # what as_model_input applied above (training and export have no manifest yet)
        resize=Resize.default_for(shape[0]).mode,
    )


def write_model(proto: onnx.ModelProto, manifest: Manifest, output: Path) -> None:
    """Store ``manifest`` in ``proto`` and write it to ``output`` atomically."""
    from sdde_serve.manifest import save_onnx_atomic, write_manifest

    write_manifest(proto, manifest)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_onnx_atomic(proto, output)


def check_ood_options(score: str, *, knn_k: int | None, knn_bank: int) -> None:
    """Fail on contradictory OOD options before anything slow runs."""
    from export.select import score_choices

    if score not in score_choices():
        raise UserError(f"--ood-score must be one of {', '.join(score_choices())}, got {score!r}")
    if knn_bank < 0:
        raise UserError(f"--knn-bank must be >= 0 rows (0: no KNN output), got {knn_bank}")
    if knn_k is not None and knn_k < 1:
        raise UserError(f"--knn-k must be >= 1, got {knn_k}")
    if knn_bank == 0 and score == "knn":
        raise UserError("--ood-score knn needs a KNN bank; --knn-bank 0 leaves it out")
    if knn_k is not None and knn_k > knn_bank:
        raise UserError(f"--knn-k {knn_k} is larger than the KNN bank (--knn-bank {knn_bank})")
