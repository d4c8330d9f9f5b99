"""PyTorch -> ONNX: one fused graph per trained run, carrying its calibration and OOD threshold.

``export_run(run_dir, output)`` loads a run directory, builds the KNN feature bank from the run's
training images, chooses the deployed OOD score (on validation OOD data when given), builds the
fused graph in the chosen layout and exports it, fits the temperature and the OOD threshold on
the run's validation split (on the graph's own outputs), verifies the graph against PyTorch at
that temperature and writes it with its manifest (docs/export.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdde_serve.errors import UserError
from sdde_serve.manifest import Manifest
from sdde_serve.transform import Resize
from training import registry

if TYPE_CHECKING:
    import onnx

    from export.quantize import PrecisionOptions
    from sdde_serve.manifest import CalibrationInfo, OODSpec

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
) -> Manifest:
    """Export ``run_dir``'s ensemble to ``output`` (one ONNX file); returns its manifest.

    ``score``: the deployed OOD score (``mal``, ``msp``, ``minmax``, ``knn``) or ``auto`` (the
    best validation AUROC against the ``ood_val`` sets ``{NAME: SPEC}``, else the benchmark's
    default). ``knn_bank``: most rows of the KNN bank (None: export.knn.DEFAULT_BANK_ROWS;
    0: no bank and no ``knn`` output); ``knn_k``: its k (None: chosen, see export/select.py).
    ``precision`` (default fp32) converts the verified fp32 graph (``export/quantize.py``),
    refits T and the threshold on the converted graph and refuses it beyond its tolerances.
    """
    # torch and the exporter load slowly; keep `import export` cheap for the CLI
    from export.choice import choose_ood_score
    from export.graph import DEFAULT_OPSET, build_graph, to_onnx
    from export.knn import DEFAULT_BANK_ROWS
    from export.layouts import default_layout, get_layout
    from export.quantize import PrecisionOptions, lower_precision, run_training_images
    from export.verify import verification_inputs, verify
    from sdde_serve.calibrate import calibrate_model as calibrate_on_validation
    from sdde_serve.manifest import InputSpec, save_onnx_atomic, weights_sha256, write_manifest
    from training.run import load_run

    output = Path(output)
    if output.is_dir():
        raise UserError(f"-o {output} is a directory; give a file name such as model.onnx")
    if not 0.0 < id_acceptance <= 1.0:
        raise UserError(f"--id-acceptance must be in (0, 1], got {id_acceptance}")
    knn_bank = DEFAULT_BANK_ROWS if knn_bank is None else knn_bank
    check_ood_options(score, knn_k=knn_k, knn_bank=knn_bank)
    run = load_run(run_dir, checkpoint)
    config, data, model_cfg = run.config, run.config["data"], run.config["model"]
    ensemble = run.ensemble.eval()
    arch = str(model_cfg["arch"])
    precision = precision or PrecisionOptions()
    precision.validate()
    layout = layout or precision.default_layout(arch) or default_layout(arch)
    get_layout(layout)  # fail on a bad name before the slow part
    opset = opset or DEFAULT_OPSET
    shape = (int(data["channels"]), int(data["height"]), int(data["width"]))
    if run.val.labels is None or len(run.val) == 0:
        raise UserError(f"{run_dir}: the validation split has no labelled images to calibrate on")
    val_images = run.val.as_model_input(*shape)
    choice = choose_ood_score(
        run, score, shape, ood_val or {}, knn_k=knn_k, rows=knn_bank, dtype=knn_dtype, seed=knn_seed
    )

    graph = build_graph(
        ensemble,
        layout,
        input_shape=shape,
        with_cams=with_cams,
        knn_bank=choice.bank_tensor(),
        knn_k=choice.k,
    )
    proto = to_onnx(graph, input_shape=shape, opset=opset)
    if choice.bank is not None and choice.bank.dtype != "float32":
        from export.knn import store_bank_as

        store_bank_as(proto, choice.bank.dtype)

    def calibrate(model: onnx.ModelProto) -> tuple[CalibrationInfo, OODSpec]:
        # T is fitted on the graph's outputs and written into its `temperature` initializer
        return calibrate_on_validation(
            model,
            val_images,
            run.val.labels,
            data=run.val.name,
            id_acceptance=id_acceptance,
            score=choice.score,
        )

    info, ood = calibrate(proto)
    # verified as written: with the fitted T in the file
    verify(
        proto,
        ensemble,
        temperature=info.temperature,
        inputs=verification_inputs(shape, val_images),
        knn=None if choice.bank is None else (choice.bank.bank, choice.k),
    )
    proto, info, ood, precision_check = lower_precision(
        proto,
        precision,
        fp32_calibration=(info, ood),
        calibrate=calibrate,
        val_images=val_images,
        val_labels=run.val.labels,
        val_name=run.val.name,
        train_images=lambda n: run_training_images(run, n, shape),
    )
    manifest = Manifest(
        name=name or Path(run_dir).resolve().name,
        version=version or "1",
        classes=[str(c) for c in data["classes"]],
        input=InputSpec(
            channels=shape[0],
            height=shape[1],
            width=shape[2],
            mean=[float(v) for v in data["mean"]],
            std=[float(v) for v in data["std"]],
            color="L" if shape[0] == 1 else "RGB",
            # what as_model_input applied above (training and export have no manifest yet)
            resize=Resize.default_for(shape[0]).mode,
        ),
        arch=arch,
        members=int(model_cfg["members"]),
        method=str(config.get("method", "unknown")),
        hyperparameters=hyperparameters(config),
        layout=layout,
        opset=opset,
        outputs=graph.output_names,
        temperature=info.temperature,
        ood=ood.model_copy(update={"selection": choice.selection}),
        calibration=info,
        knn=choice.knn_spec(),
        weights_sha256=weights_sha256(proto),
        precision=precision.precision,
        precision_check=precision_check,
        training_config={k: v for k, v in config.items() if k != "schema"},
    )
    write_manifest(proto, manifest)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_onnx_atomic(proto, output)
    return manifest


def check_ood_options(score: str, *, knn_k: int | None, knn_bank: int) -> None:
    """Fail on contradictory OOD options before anything slow runs."""
    from export.select import SCORE_CHOICES

    if score not in SCORE_CHOICES:
        raise UserError(f"--ood-score must be one of {', '.join(SCORE_CHOICES)}, got {score!r}")
    if knn_bank < 0:
        raise UserError(f"--knn-bank must be >= 0 rows (0: no KNN output), got {knn_bank}")
    if knn_k is not None and knn_k < 1:
        raise UserError(f"--knn-k must be >= 1, got {knn_k}")
    if knn_bank == 0 and score == "knn":
        raise UserError("--ood-score knn needs a KNN bank; --knn-bank 0 leaves it out")
    if knn_k is not None and knn_k > knn_bank:
        raise UserError(f"--knn-k {knn_k} is larger than the KNN bank (--knn-bank {knn_bank})")
