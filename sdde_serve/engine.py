"""The inference engine: one onnxruntime session over the fused ensemble graph.

Loading checks everything up front (file readable, manifest valid, the graph consistent with its
manifest: hashes, temperature, inputs, outputs and their shapes, see
:mod:`sdde_serve.model_checks`; optionally the file's pinned SHA-256) and fails with
:class:`ModelLoadError`, one clear line, so a server or batch job never starts half-working.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sdde_serve import scores as score_registry
from sdde_serve.errors import UserError
from sdde_serve.manifest import Manifest, read_manifest
from sdde_serve.model_checks import (
    INPUT_NAME,
    REQUIRED_OUTPUTS,
    ModelLoadError,
    check_digest,
    check_file,
    check_outputs,
    read_model,
)
from sdde_serve.probe import DEFAULT_PROBE_MODE, PROBE_MODES, probe_images, probe_problem

if TYPE_CHECKING:  # onnx and onnxruntime load lazily: importing the engine must stay cheap
    import onnx
    import onnxruntime

log = logging.getLogger("sdde.engine")

# the fields of EngineOutput for scores newer graphs may lack; other registered scores' outputs
# are kept in EngineOutput.extra
_SCORE_FIELDS = ("minmax", "knn")


def optional_scores() -> tuple[str, ...]:
    """[B] scores of newer graphs (the registry's, but mal and msp): fetched when the graph has
    them (older files lack them and serve on)."""
    return tuple(n for n in score_registry.names() if n not in REQUIRED_OUTPUTS)


GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "ROCMExecutionProvider")


__all__ = ["Engine", "EngineOutput", "ModelLoadError", "make_session"]


@dataclass
class EngineOutput:
    logits: np.ndarray  # [B, N, L] raw member logits
    probs: np.ndarray  # [B, L] calibrated ensemble probabilities
    mal: np.ndarray  # [B]
    msp: np.ndarray  # [B]
    cams: np.ndarray | None = None  # [B, N, h, w] when the graph exports them
    minmax: np.ndarray | None = None  # [B] min over members of the member's max logit
    knn: np.ndarray | None = None  # [B] k-th largest cosine similarity to the KNN bank
    # [B] outputs of the graph's other registered scores (energy, mahalanobis...), by name
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.probs)

    def score(self, name: str) -> np.ndarray | None:
        """The graph's output for score ``name``, None when the graph lacks it."""
        if name in ("mal", "msp", *_SCORE_FIELDS):
            return getattr(self, name)
        return self.extra.get(name)

    @staticmethod
    def from_outputs(out: dict[str, np.ndarray]) -> EngineOutput:
        """From the graph's outputs by name (any registered score it has)."""
        return EngineOutput(
            out["logits"],
            out["probs"],
            out["mal"],
            out["msp"],
            out.get("cams"),
            minmax=out.get("minmax"),
            knn=out.get("knn"),
            extra={n: out[n] for n in optional_scores() if n not in _SCORE_FIELDS and n in out},
        )

    def slice(self, start: int, stop: int) -> EngineOutput:
        def part(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[start:stop]

        return EngineOutput(
            self.logits[start:stop],
            self.probs[start:stop],
            self.mal[start:stop],
            self.msp[start:stop],
            part(self.cams),
            minmax=part(self.minmax),
            knn=part(self.knn),
            extra={n: v[start:stop] for n, v in self.extra.items()},
        )

    @staticmethod
    def concat(parts: list[EngineOutput]) -> EngineOutput:
        def joined(name: str) -> np.ndarray | None:
            if getattr(parts[0], name) is None:
                return None
            return np.concatenate([getattr(p, name) for p in parts])

        return EngineOutput(
            *(
                np.concatenate([getattr(p, k) for p in parts])
                for k in ("logits", "probs", "mal", "msp")
            ),
            joined("cams"),
            minmax=joined("minmax"),
            knn=joined("knn"),
            extra={n: np.concatenate([p.extra[n] for p in parts]) for n in parts[0].extra},
        )


def cuda_usable() -> bool:
    """Whether onnxruntime's CUDA provider library loads (CUDA and cuDNN libraries present).

    ``get_available_providers()`` lists CUDA for every onnxruntime-gpu install; asking for it on a
    machine without the CUDA libraries makes onnxruntime print a C++ error and fall back. Probing
    the provider library the way onnxruntime loads it answers the real question quietly.
    """
    import ctypes

    import onnxruntime as ort

    capi = Path(ort.__file__).parent / "capi"
    shared, cuda = (
        capi / "libonnxruntime_providers_shared.so",
        capi / "libonnxruntime_providers_cuda.so",
    )
    if not cuda.exists():
        return "CUDAExecutionProvider" in ort.get_available_providers() and not shared.exists()
    try:
        ctypes.CDLL(str(shared), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(cuda))
    except OSError:
        return False
    return True


def default_providers() -> list[str]:
    """CUDA first where it can really load, then the CPU."""
    import onnxruntime as ort

    gpu = (
        ["CUDAExecutionProvider"]
        if "CUDAExecutionProvider" in ort.get_available_providers() and cuda_usable()
        else []
    )
    return [*gpu, "CPUExecutionProvider"]


def make_session(
    model: bytes | str | Path,
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    intra_op_threads: int = 0,
    inter_op_threads: int = 0,
    spin_wait: bool = True,
    source: str = "the model",
) -> onnxruntime.InferenceSession:
    """THE onnxruntime session of this repository (engine, calibration, export's verification).

    ``model``: the serialized graph or its file. Threads: 0 lets onnxruntime use one per physical
    core. Raises :class:`ModelLoadError` ("``source``: onnxruntime cannot load the graph (...)").
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    # explicit threads: servers pin this to the CPU request so replicas on one node don't
    # oversubscribe
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # the CUDA-missing warning is reported via .providers
    # spinning keeps idle threads hot for the next call; on CPUs shared with other processes
    # it burns their time instead (measured several-fold slowdowns in bench_engine)
    options.add_session_config_entry("session.intra_op.allow_spinning", str(int(spin_wait)))
    graph = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(graph, sess_options=options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/RuntimeException
        raise ModelLoadError(f"{source}: onnxruntime cannot load the graph ({exc})") from None


class Engine:
    """A loaded, verified model. ``run`` is thread-safe (onnxruntime sessions are)."""

    def __init__(
        self,
        path: str | Path,
        *,
        intra_op_threads: int = 0,
        inter_op_threads: int = 1,
        providers: list[str] | None = None,
        require_gpu: bool = False,
        verify_weights: bool = True,
        spin_wait: bool = True,
        expect_sha256: str | None = None,
        probe_check: str = DEFAULT_PROBE_MODE,
    ) -> None:
        if probe_check not in PROBE_MODES:
            raise UserError(f"--probe-check must be one of {', '.join(PROBE_MODES)}")
        self.path = Path(path)
        proto = self._read_verified(expect_sha256, verify_weights=verify_weights)
        self.session = self._open_session(
            proto,
            providers,
            require_gpu=require_gpu,
            intra_op_threads=intra_op_threads,
            inter_op_threads=inter_op_threads,
            spin_wait=spin_wait,
        )
        self.providers: list[str] = self.session.get_providers()
        self.input_name = INPUT_NAME
        self._scores, self._fetch = self._outputs_to_fetch()
        spec = self.manifest.input
        self.input_shape = (spec.channels, spec.height, spec.width)
        self._probe()
        self._self_check(probe_check)
        log.info(
            "loaded %s (%s v%s, %d members, sha256 %s) on %s",
            self.path,
            self.manifest.name,
            self.manifest.version,
            self.manifest.members,
            self.sha256,
            ", ".join(self.providers),
        )

    def _read_verified(self, expect_sha256: str | None, *, verify_weights: bool) -> onnx.ModelProto:
        """The file's graph, its digest pinned and its manifest checked against it; sets
        ``sha256`` (of the file's bytes) and ``manifest``."""
        proto, self.sha256 = read_model(self.path)
        check_digest(self.path, self.sha256, expect_sha256)  # pinned: before anything else
        try:
            self.manifest: Manifest = read_manifest(proto, source=str(self.path))
        except UserError as exc:
            raise ModelLoadError(str(exc)) from None
        if verify_weights:
            check_file(proto, self.manifest, self.path)
        return proto

    def _open_session(
        self,
        proto: onnx.ModelProto,
        providers: list[str] | None,
        *,
        require_gpu: bool,
        intra_op_threads: int,
        inter_op_threads: int,
        spin_wait: bool,
    ) -> onnxruntime.InferenceSession:
        """The session on the requested providers (default: CUDA where it loads, then the CPU);
        ``require_gpu`` refuses a session that ends up without a GPU provider."""
        if require_gpu and not providers and not cuda_usable():
            # asking onnxruntime would only print C++ errors and fall back to the CPU
            raise ModelLoadError("--require-gpu: the CUDA provider cannot load on this machine")
        requested = providers or default_providers()
        session = make_session(
            proto.SerializeToString(),
            providers=requested,
            intra_op_threads=intra_op_threads,
            inter_op_threads=inter_op_threads,
            spin_wait=spin_wait,
            source=str(self.path),
        )
        in_use = session.get_providers()
        fell_back = [p for p in requested if p in GPU_PROVIDERS and p not in in_use]
        if require_gpu and not any(p in GPU_PROVIDERS for p in in_use):
            raise ModelLoadError(
                f"--require-gpu: no GPU provider is usable (in use: {', '.join(in_use)})"
            )
        if fell_back:
            log.warning(
                "%s not usable here (drivers/libraries missing): running on %s",
                ", ".join(fell_back),
                ", ".join(in_use),
            )
        return session

    def _outputs_to_fetch(self) -> tuple[list[str], list[str]]:
        """(scores, scores and CAMs): the outputs ``run`` fetches without and with CAMs, after
        checking the graph has the input, the required outputs and the deployed score."""
        if self.input_name not in {i.name for i in self.session.get_inputs()}:
            raise ModelLoadError(f"{self.path}: graph has no {self.input_name!r} input")
        self.output_names = [o.name for o in self.session.get_outputs()]
        missing = [o for o in REQUIRED_OUTPUTS if o not in self.output_names]
        if missing:
            raise ModelLoadError(f"{self.path}: graph lacks outputs {missing}")
        deployed = score_registry.get(self.manifest.ood.score)
        if deployed.name not in self.output_names and not deployed.recompute_from_logits:
            raise ModelLoadError(
                f"{self.path}: the manifest deploys {deployed.name!r} but the graph lacks it"
            )
        # every output but the CAMs (only fetched on request: they are large)
        fetched = [*REQUIRED_OUTPUTS, *(o for o in optional_scores() if o in self.output_names)]
        with_cams = [*fetched, *(["cams"] if "cams" in self.output_names else [])]
        return fetched, with_cams

    def _probe(self) -> None:
        """One blank image through every output: shapes must be the manifest's, else the
        server would report ready and answer 500."""
        blank = np.zeros((1, *self.input_shape), np.float32)
        try:
            values = self.session.run(self.output_names, {self.input_name: blank})
        except Exception as exc:  # onnxruntime's own error types
            raise ModelLoadError(
                f"{self.path}: the graph fails on a blank {list(blank.shape)} input ({exc})"
            ) from None
        check_outputs(dict(zip(self.output_names, values, strict=True)), self.manifest, self.path)

    def _self_check(self, mode: str) -> None:
        """The manifest's probe batch on this machine's kernels (sdde_serve/probe.py): refuse
        (``mode`` refuse) or warn when its outputs differ from the export's beyond tolerance."""
        probe = self.manifest.probe
        if mode == "off" or probe is None:  # files exported before the probe have none
            return
        out = self.run(probe_images(probe, self.input_shape))
        outputs = {
            "logits": out.logits,
            "probs": out.probs,
            **{n: out.score(n) for n in score_registry.names()},
        }
        problem = probe_problem(probe, self.manifest, outputs)
        if problem is None:
            return
        if mode == "refuse":
            raise ModelLoadError(
                f"{self.path}: {problem}; refused (--probe-check warn serves it anyway)"
            )
        log.warning("%s: %s; serving it anyway (--probe-check warn)", self.path, problem)

    @property
    def has_cams(self) -> bool:
        return "cams" in self._fetch

    def run(self, images: np.ndarray, *, with_cams: bool = False) -> EngineOutput:
        """Run a float32 ``[B, C, H, W]`` batch of [0, 1] pixels through all members at once."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1:] != self.input_shape:
            raise ValueError(
                f"expected images of shape [B, {', '.join(map(str, self.input_shape))}]"
                f", got {list(images.shape)}"
            )
        names = self._fetch if with_cams else self._scores
        values = self.session.run(names, {self.input_name: images})
        return EngineOutput.from_outputs(dict(zip(names, values, strict=True)))

    def run_batches(
        self, images: np.ndarray, batch_size: int = 256, *, with_cams: bool = False
    ) -> EngineOutput:
        """:meth:`run` over a large array in chunks (bounded memory for evaluation)."""
        parts = [
            self.run(images[i : i + batch_size], with_cams=with_cams)
            for i in range(0, len(images), batch_size)
        ]
        if not parts:
            raise ValueError("no images to run")
        return EngineOutput.concat(parts)

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 8)) -> None:
        """Run a few zero batches so the first real request doesn't pay for allocations."""
        for b in batch_sizes:
            self.run(np.zeros((b, *self.input_shape), np.float32))
