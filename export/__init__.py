"""PyTorch -> ONNX: one fused graph per trained run, carrying its calibration and OOD threshold.

``export_run(run_dir, output)`` loads a run directory, builds the fused graph in the chosen layout
and exports it, fits the temperature and the OOD threshold on the run's validation split (on the
graph's own outputs), verifies the graph against PyTorch at that temperature and writes it with
its manifest (docs/export.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdde_serve.errors import UserError
from sdde_serve.manifest import Manifest

__all__ = ["export_run"]

# Training hyper-parameters recorded in the manifest: the ones every method uses, plus each
# method's own (the full resolved config is recorded too, under ``training_config``).
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
_SDDE = ("lambda_div", "saliency", "saliency_layer", "diversity_bn", "lambda_warmup_epochs")
# How the diversity batch is drawn and how often the term is computed (sdde only)
_PROTOCOL = ("shared_source", "shared_batch", "diversity_period")
_OE = ("outliers", "beta_oe", "outlier_batch_size")
METHOD_HPARAMS: dict[str, tuple[str, ...]] = {
    "de": (),
    "sdde": _SDDE + _PROTOCOL,
    "oe": _OE,
    "sdde-oe": _SDDE + _OE,
    "ncl": ("ncl_weight", "shared_source"),
    "adp": ("adp_weight", "adp_alpha", "adp_beta", "shared_source"),
    "dice": (
        "dice_weight",
        "dice_rampup_epochs",
        "dice_tau",
        "discriminator_lr",
        "grad_clip",
        "shared_source",
    ),
    "de-adv": ("adv_eps",),
}


def hyperparameters(config: dict[str, Any]) -> dict[str, Any]:
    keys = COMMON_HPARAMS + METHOD_HPARAMS.get(str(config.get("method")), ())
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
    score: str = "mal",
) -> Manifest:
    """Export ``run_dir``'s ensemble to ``output`` (one ONNX file); returns its manifest."""
    # torch and the exporter load slowly; keep `import export` cheap for the CLI
    from export.calibrate import calibrate_on_validation
    from export.graph import DEFAULT_OPSET, build_graph, to_onnx
    from export.layouts import default_layout, get_layout
    from export.verify import verification_inputs, verify
    from sdde_serve.manifest import InputSpec, save_onnx_atomic, weights_sha256, write_manifest
    from training.run import load_run

    output = Path(output)
    if output.is_dir():
        raise UserError(f"-o {output} is a directory; give a file name such as model.onnx")
    if not 0.0 < id_acceptance <= 1.0:
        raise UserError(f"--id-acceptance must be in (0, 1], got {id_acceptance}")
    run = load_run(run_dir, checkpoint)
    config, data, model_cfg = run.config, run.config["data"], run.config["model"]
    ensemble = run.ensemble.eval()
    arch = str(model_cfg["arch"])
    layout = layout or default_layout(arch)
    get_layout(layout)  # fail on a bad name before the slow part
    opset = opset or DEFAULT_OPSET
    shape = (int(data["channels"]), int(data["height"]), int(data["width"]))
    if run.val.labels is None or len(run.val) == 0:
        raise UserError(f"{run_dir}: the validation split has no labelled images to calibrate on")
    val_images = run.val.as_model_input(*shape)

    graph = build_graph(ensemble, layout, input_shape=shape, with_cams=with_cams)
    proto = to_onnx(graph, input_shape=shape, opset=opset)
    # T is fitted on the graph's outputs and written into its `temperature` initializer
    info, ood = calibrate_on_validation(
        proto,
        val_images,
        run.val.labels,
        data=run.val.name,
        id_acceptance=id_acceptance,
        score=score,
    )
    # verified as written: with the fitted T in the file
    verify(
        proto,
        ensemble,
        temperature=info.temperature,
        inputs=verification_inputs(shape, val_images),
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
        ),
        arch=arch,
        members=int(model_cfg["members"]),
        method=str(config.get("method", "unknown")),
        hyperparameters=hyperparameters(config),
        layout=layout,
        opset=opset,
        outputs=graph.output_names,
        temperature=info.temperature,
        ood=ood,
        calibration=info,
        weights_sha256=weights_sha256(proto),
        training_config={k: v for k, v in config.items() if k != "schema"},
    )
    write_manifest(proto, manifest)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_onnx_atomic(proto, output)
    return manifest
