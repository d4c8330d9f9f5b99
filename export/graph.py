"""The fused ensemble graph: one module whose outputs are the serving contract.

``FusedEnsemble(images) -> logits [B, N, L], probs [B, L], mal [B], msp [B], minmax [B]
(, knn [B]) (, more registered scores [B]) (, cams [B, N, h, w])``

Every OOD score is built by its head in export/scores/, as registered in sdde_serve/scores/
(docs/scores.md); the ones below are the graph's historical contract.

* ``probs = mean_m softmax(logits_m / T)`` with ``T`` the buffer ``temperature``, which the
  exporter keeps as a float32 scalar initializer named ``temperature``: it only feeds a ``Div``
  whose other input is computed, so constant folding cannot absorb it (checked after export by
  :func:`check_temperature_initializer`). ``sdde calibrate`` rewrites it without PyTorch.
* ``mal = max_c mean_m logits`` (Eq. 9 of the paper; no temperature), ``msp = max_c probs``.
* ``minmax = min_m max_c logits_m``: the official SDDE code's aggregation (the least confident
  member's max logit).
* ``knn``: the k-th largest cosine similarity between the input's L2-normalised concatenated
  member pre-logit features and the R rows of the float32 initializer ``knn_bank`` (the same
  features of training images, normalised at export: export/knn.py; stored transposed,
  ``[N*D, R]``, the layout MatMul reads). One MatMul and one TopK;
  k is a constant of the graph. Higher = more in-distribution, like every score here.
* ``cams``: per-member class-activation maps for the ensemble's predicted class
  ``c = argmax probs``, on each member's *last* feature map A (the classifier's input), computed
  without gradients as ``relu(sum_k W[c, k] A_k) / (h w)``. When the classifier is global average
  pooling followed by an affine layer (every ResNet), dy_c/dA_k(i, j) = W[c, k] / (h w) at every
  position, so GradCAM's channel weights are W[c, k] / (h w) and this *is* GradCAM, exactly.
  :func:`linear_head_weights` checks that property numerically and reads W. GradCAM at the
  training saliency layer (ResNet layer3, LeNet conv2) would need a backward pass through the
  rest of the network, which the exporters cannot put into a graph; models whose classifier is
  not pool+affine (LeNet: an MLP on a 1x1 map) are exported without ``cams``.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from export.layouts import (
    ensemble_members,
    ensemble_norm,
    get_layout,
    last_map,
    supports_last_map,
)
from export.scores import GraphInputs, head, initializer_name
from sdde_serve.errors import UserError
from sdde_serve.manifest import KNN_BANK_INITIALIZER, OUTPUTS, TEMPERATURE_INITIALIZER

DEFAULT_OPSET = 17


@torch.no_grad()
def linear_head_weights(
    classifier: nn.Module | object,
    map_shape: tuple[int, int, int],
    *,
    seed: int = 0,
    rtol: float = 1e-4,
) -> Tensor | None:
    """``W [L, K]`` when ``classifier(A) == W @ mean_hw(A) + b`` for every A, else None.

    Probes with constant maps (one channel at a time) to read W and b, then checks the identity
    on random non-negative maps, which spatial structure (max-pool, flatten + linear) or a
    nonlinearity after the pooling breaks.
    """
    k, h, w = map_shape
    if h * w == 1:
        return None  # a 1x1 map has no spatial extent to explain: no CAM worth exporting
    bias = classifier(torch.zeros(1, k, h, w))[0]  # type: ignore[operator]
    columns = []
    for start in range(0, k, 128):  # in chunks: ResNet50 at 224 would need 0.8 GB at once
        stop = min(start + 128, k)
        probe = torch.zeros(stop - start, k, h, w)
        probe[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        columns.append(classifier(probe) - bias)  # type: ignore[operator]
    weight = torch.cat(columns).T  # [L, K]
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(4, k, h, w, generator=gen) * 3.0
    predicted = a.mean((2, 3)) @ weight.T + bias
    actual = classifier(a)  # type: ignore[operator]
    scale = float(actual.abs().max()) + 1e-6
    if not torch.allclose(predicted, actual, atol=rtol * scale, rtol=0.0):
        return None
    return weight.contiguous()


@torch.no_grad()
def cam_weights(ensemble: nn.Module, input_shape: tuple[int, int, int]) -> Tensor | None:
    """Stacked ``[N, L, K]`` classifier weights when every member allows exact CAMs, else None."""
    members = [m.eval() for m in ensemble_members(ensemble)]
    if not all(supports_last_map(m) for m in members):
        return None
    mean, std = ensemble_norm(ensemble)
    x = (torch.zeros(1, *input_shape) - mean) / std
    _, k, h, w = last_map(members[0], x).shape
    try:
        weights = [linear_head_weights(m.classifier, (k, h, w)) for m in members]
    except (RuntimeError, ValueError):  # a classifier that only takes its own input shape
        return None
    if any(wt is None for wt in weights):
        return None
    return torch.stack(weights)  # type: ignore[arg-type]


# the scores of every graph exported since minmax existed, in output order; knn follows when the
# graph has a bank, then the other registered scores export adds (export/__init__.py)
BASE_SCORES = ("mal", "msp", "minmax")


class FusedEnsemble(nn.Module):
    """Wraps a layout's core; outputs follow docs/architecture.md.

    Each OOD score is computed by its registered graph head (export/scores/); ``score_stats``
    maps each score beyond :data:`BASE_SCORES` and ``knn`` to its fitted statistics (stored as
    float32 initializers ``<score>_<key>``, except one equal to a statistic already in the graph,
    which is read from there: :meth:`store_stat`; an empty dict for a score that needs none).
    """

    def __init__(
        self,
        core: nn.Module,
        temperature: float,
        cam_w: Tensor | None = None,
        *,
        knn_bank: Tensor | None = None,
        knn_k: int | None = None,
        score_stats: dict[str, dict[str, np.ndarray]] | None = None,
    ) -> None:
        super().__init__()
        self.core = core
        self.register_buffer("temperature", torch.tensor(float(temperature), dtype=torch.float32))
        self.with_cams = cam_w is not None
        if cam_w is not None:
            # [L, N, K]: row c holds every member's weights for class c (one Gather per batch)
            self.register_buffer("cam_weights", cam_w.detach().transpose(0, 1).contiguous())
        self.with_knn = knn_bank is not None
        self.knn_k = 0
        self.scores = list(BASE_SCORES)
        # score -> statistic key -> the buffer (graph initializer) holding it
        self.stat_buffers: dict[str, dict[str, str]] = {}
        self.params: dict[str, dict[str, int]] = {}
        if knn_bank is not None:
            rows = int(knn_bank.shape[0])
            if knn_k is None or not 1 <= knn_k <= rows:
                raise UserError(f"KNN k must be in 1..{rows} (the bank's rows), got {knn_k}")
            self.knn_k = int(knn_k)
            # stored transposed, [N*D, R]: MatMul reads it as is, so the initializer keeps its
            # name (a transpose in the graph would be constant-folded into an anonymous copy)
            bank = knn_bank.detach().to(torch.float32).T.contiguous()
            self.register_buffer(KNN_BANK_INITIALIZER, bank)
            self.scores.append("knn")
            self.stat_buffers["knn"] = {"bank": KNN_BANK_INITIALIZER}
            self.params["knn"] = {"k": self.knn_k}
        for name, stats in (score_stats or {}).items():
            if name in self.scores:
                raise UserError(f"OOD score {name!r} is already in the graph")
            self.scores.append(name)
            self.stat_buffers[name] = {
                key: self.store_stat(initializer_name(name, key), value)
                for key, value in stats.items()
            }
        self.heads = {name: head(name) for name in self.scores}

    def store_stat(self, name: str, value: np.ndarray) -> str:
        """The buffer that holds statistic ``value``: a score statistic already in the graph with
        the same float32 contents, else a new buffer ``name``.

        Stored once because the file's largest tensor would otherwise be stored twice:
        ``combined`` fits its own copy of the KNN bank (its numpy reference reads it), equal to
        the graph's ``knn_bank`` unless that is stored in float16 (then each keeps its own). The
        TorchScript exporter does not merge equal buffers; one buffer read twice is one
        initializer.
        """
        t = torch.as_tensor(np.asarray(value, np.float32))
        for buffers in self.stat_buffers.values():
            for existing in buffers.values():
                held = getattr(self, existing)
                if held.shape == t.shape and torch.equal(held, t):
                    return existing
        self.register_buffer(name, t)
        return name

    @property
    def output_names(self) -> list[str]:
        return [*OUTPUTS[:2], *self.scores, *(["cams"] if self.with_cams else [])]

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        logits, maps, feats = self.core.forward_all(images)
        probs = torch.softmax(logits / self.temperature, dim=-1).mean(dim=1)
        x = GraphInputs(logits, probs, feats, self.temperature)
        outs: list[Tensor] = [logits, probs]
        for name in self.scores:
            stats = {k: getattr(self, b) for k, b in self.stat_buffers.get(name, {}).items()}
            outs.append(self.heads[name](x, stats, self.params.get(name, {})))
        if self.with_cams:
            w = self.cam_weights[probs.argmax(dim=-1)]  # [B, N, K]
            area = maps.shape[-2] * maps.shape[-1]
            outs.append(torch.relu(torch.einsum("bnk,bnkhw->bnhw", w, maps)) / area)
        return tuple(outs)


def build_graph(
    ensemble: nn.Module,
    layout: str,
    *,
    input_shape: tuple[int, int, int],
    temperature: float = 1.0,
    with_cams: bool = True,
    knn_bank: Tensor | None = None,
    knn_k: int | None = None,
    score_stats: dict[str, dict[str, np.ndarray]] | None = None,
) -> FusedEnsemble:
    """The PyTorch module that gets exported (``with_cams`` only where CAMs are exact).

    ``knn_bank`` ``[R, N*D]`` (unit rows, export/knn.py) adds the ``knn`` output with ``knn_k``;
    ``score_stats`` adds more registered scores with their statistics (:class:`FusedEnsemble`).
    """
    cam_w = cam_weights(ensemble, input_shape) if with_cams else None
    core = get_layout(layout).build(ensemble, cam_w is not None).eval()
    return FusedEnsemble(
        core, temperature, cam_w, knn_bank=knn_bank, knn_k=knn_k, score_stats=score_stats
    ).eval()


def to_onnx(
    graph: FusedEnsemble, *, input_shape: tuple[int, int, int], opset: int = DEFAULT_OPSET
) -> onnx.ModelProto:
    """Export (TorchScript exporter, dynamic batch axis) and check ``temperature`` survived."""
    names = graph.output_names
    example = torch.rand(2, *input_shape, generator=torch.Generator().manual_seed(0))
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter is chosen deliberately (export/layouts.py); its deprecation
        # notice and the tracer's notes on the models' static shape checks are noise here
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            graph,
            (example,),
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=["images"],
            output_names=names,
            dynamic_axes={n: {0: "batch"} for n in ["images", *names]},
            do_constant_folding=True,
        )
    model = onnx.load_from_string(buf.getvalue())
    check_temperature_initializer(model)
    return model


def check_temperature_initializer(model: onnx.ModelProto) -> None:
    """``temperature`` must be a float32 scalar initializer that a node still reads."""
    inits = {i.name: i for i in model.graph.initializer}
    t = inits.get(TEMPERATURE_INITIALIZER)
    if t is None or t.data_type != onnx.TensorProto.FLOAT or list(t.dims):
        raise UserError("export lost the float32 scalar 'temperature' initializer")
    if not any(TEMPERATURE_INITIALIZER in n.input for n in model.graph.node):
        raise UserError("export folded 'temperature' away: no node reads it")
