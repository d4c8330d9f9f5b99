"""Model factory: the forward_features/forward_head split composes to forward for every arch."""

from __future__ import annotations

import pytest
import torch

from sdde_serve.errors import UserError
from training.models import ARCHS, ShortcutA, create_model

# (arch, input side used here, expected feature-map shape [K, h, w] at the default layer).
# The 224x224 architectures run at 32x32 to stay fast; layer3 of a 224-ResNet is then 2x2.
CASES = [
    ("lenet", 28, (16, 5, 5)),
    ("resnet20", 32, (64, 8, 8)),
    ("resnet18_32", 32, (256, 8, 8)),
    ("resnet18", 32, (256, 2, 2)),
    ("resnet50", 32, (1024, 2, 2)),
]


@pytest.mark.parametrize(("arch", "size", "feat_shape"), CASES)
def test_split_composes_to_forward(arch: str, size: int, feat_shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = create_model(arch, num_classes=7, in_chans=3).eval()
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        feats = model.forward_features(x)
        split = model.forward_head(feats)
        full = model(x)
    assert model.saliency_layer == ARCHS[arch].default_saliency_layer
    assert tuple(feats.shape) == (2, *feat_shape)
    assert full.shape == (2, 7)
    torch.testing.assert_close(split, full, rtol=0, atol=0)


@pytest.mark.parametrize(("layer", "shape"), [("conv1", (6, 14, 14)), ("block2", (16, 5, 5))])
def test_lenet_saliency_layer_is_configurable(layer: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = create_model("lenet", num_classes=10, in_chans=1, saliency_layer=layer).eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        feats = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(feats), model(x), rtol=0, atol=0)
    assert tuple(feats.shape) == (3, *shape)


def test_resnet18_32_split_at_layer2() -> None:
    torch.manual_seed(0)
    model = create_model("resnet18_32", num_classes=5, in_chans=1, saliency_layer="layer2").eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(feats), model(x), rtol=0, atol=0)
    assert feats.shape == (2, 128, 16, 16)


def test_torchvision_resnet_keeps_torchvision_parameter_names() -> None:
    from torchvision.models import resnet18

    ours = create_model("resnet18", num_classes=4, in_chans=3)
    ref = resnet18(weights=None, num_classes=4)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref.eval()(x), rtol=0, atol=0)


def test_arch_specs_for_the_trainer() -> None:
    assert ARCHS["lenet"].input_size == 28 and ARCHS["lenet"].default_saliency_layer == "conv2"
    assert ARCHS["resnet18_32"].input_size == 32
    assert (
        ARCHS["resnet20"].input_size == 32 and ARCHS["resnet20"].default_saliency_layer == "layer3"
    )
    assert ARCHS["resnet18_32x32"] is ARCHS["resnet18_32"]
    for name in ("resnet18", "resnet50"):
        assert ARCHS[name].input_size == 224 and ARCHS[name].default_saliency_layer == "layer3"


def test_bad_names_and_sizes_give_clear_errors() -> None:
    with pytest.raises(UserError, match="unknown --arch 'vgg'"):
        create_model("vgg", num_classes=10, in_chans=3)
    with pytest.raises(UserError, match=r"unknown saliency layer 'layer9'.*layer1"):
        create_model("resnet18_32", num_classes=10, in_chans=3, saliency_layer="layer9")
    lenet = create_model("lenet", num_classes=10, in_chans=1)
    with pytest.raises(ValueError, match="28x28"):
        lenet(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        lenet(torch.rand(1, 3, 28, 28))


def conv_bn(c_in: int, c_out: int) -> int:
    """Parameters of a bias-free 3x3 convolution and its BatchNorm (weight and bias)."""
    return c_in * c_out * 9 + 2 * c_out


def test_resnet20_has_he_et_al_parameter_count() -> None:
    """0.27M (He et al. 2016, Table 6), counted by hand: option-A shortcuts have no weights."""
    stem = conv_bn(3, 16)
    stages = 0
    for c_in, c in ((16, 16), (16, 32), (32, 64)):
        stages += conv_bn(c_in, c) + conv_bn(c, c)  # first block (may change width)
        stages += 2 * (conv_bn(c, c) + conv_bn(c, c))  # two more blocks
    fc = 64 * 10 + 10
    model = create_model("resnet20", num_classes=10, in_chans=3)
    n = sum(p.numel() for p in model.parameters())
    assert n == stem + stages + fc
    assert round(n / 1e6, 2) == 0.27


def test_option_a_shortcut_subsamples_and_zero_pads_each_member_group() -> None:
    x = torch.arange(2 * 2 * 4 * 4, dtype=torch.float32).view(1, 4, 4, 4)  # 2 groups of 2 chans
    out = ShortcutA(2, 4, stride=2)(x)
    assert out.shape == (1, 8, 2, 2)
    sub = x[:, :, ::2, ::2]
    zero = torch.zeros(1, 1, 2, 2)
    # per group of 2 input channels: one zero channel, the two channels, one zero channel
    expected = torch.cat([zero, sub[:, 0:2], zero, zero, sub[:, 2:4], zero], dim=1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_resnet20_packed_export_layout_equals_the_ensemble() -> None:
    """The packed layout runs the model's own code on member-major channels: the option-A
    padding must pad each member's channels, not the packed block."""
    from export.layouts import PackedCore
    from training.ensemble import build_ensemble

    torch.manual_seed(0)
    ens = build_ensemble(
        "resnet20", members=3, num_classes=4, in_chans=3, mean=[0.5] * 3, std=[0.25] * 3
    ).eval()
    with torch.no_grad():
        for m in ens.members:  # non-trivial BatchNorm statistics
            for bn in (b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)):
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 2.0)
        x = torch.rand(2, 3, 32, 32)
        packed, _ = PackedCore(ens, with_maps=False)(x)
        torch.testing.assert_close(packed, ens(x), rtol=1e-5, atol=1e-5)


def test_resnet20_exports_in_every_layout_and_matches_pytorch() -> None:
    """Option A's per-group padding traces to ONNX with a dynamic batch (verify() checks batch
    1 and 7 against the PyTorch ensemble)."""
    from export.graph import build_graph, to_onnx
    from export.layouts import LAYOUTS
    from export.verify import verification_inputs, verify
    from training.ensemble import build_ensemble

    torch.manual_seed(0)
    ens = build_ensemble(
        "resnet20", members=2, num_classes=4, in_chans=3, mean=[0.5] * 3, std=[0.25] * 3
    ).eval()
    shape = (3, 32, 32)
    real = torch.rand(2, *shape).numpy()
    for layout in LAYOUTS:
        model = to_onnx(build_graph(ens, layout, input_shape=shape), input_shape=shape)
        report = verify(model, ens, temperature=1.0, inputs=verification_inputs(shape, real))
        assert report["random (batch 7)"]["logits"] <= 1e-4
        assert "cams" in report["real"]  # GAP + linear head: exact CAMs are exported
