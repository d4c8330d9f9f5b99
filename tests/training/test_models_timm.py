"""``--arch timm:NAME``: timm's own split adopted, and refusals of models that do not fit.

``test_resnet`` is timm's 0.37M-parameter test network (random weights: nothing downloads).
"""

from __future__ import annotations

import pytest
import timm
import torch

from sdde_serve.errors import UserError
from training.models import arch_spec, check_saliency_map, create_model

NAME = "test_resnet"


def test_timm_model_is_timms_own_network_split_at_its_feature_map() -> None:
    torch.manual_seed(0)
    model = create_model(f"timm:{NAME}", num_classes=7, in_chans=3).eval()
    reference = timm.create_model(NAME, num_classes=7).eval()
    reference.load_state_dict(model.net.state_dict())  # bare timm names: same parameters
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        logits = model(x)
        torch.testing.assert_close(model.forward_head(feats), logits, rtol=0, atol=0)
        torch.testing.assert_close(model.get_classifier()(pooled), logits, rtol=0, atol=0)
        torch.testing.assert_close(logits, reference(x), rtol=0, atol=0)
        # the KNN feature is the global average of the last map (what fc reads)
        torch.testing.assert_close(pooled, feats.mean((2, 3)), rtol=1e-6, atol=1e-6)
    assert feats.shape == (2, 96, 2, 2) and model.saliency_layer == "features"
    assert model.get_classifier() is model.net.fc  # timm's own head, not a copy


def test_timm_spec_takes_the_models_input_size_and_gray_inputs_work() -> None:
    spec = arch_spec(f"timm:{NAME}")
    assert spec.input_size == timm.get_pretrained_cfg(NAME).input_size[-1]
    gray = create_model(f"timm:{NAME}", num_classes=3, in_chans=1).eval()
    with torch.no_grad():
        assert gray(torch.rand(1, 1, 32, 32)).shape == (1, 3)


def test_token_models_and_unknown_names_are_refused() -> None:
    with pytest.raises(UserError, match=r"timm:test_vit: forward_features gives \[2, \d+, 64\]"):
        arch_spec("timm:test_vit")
    with pytest.raises(UserError, match="timm has no model 'no_such_net'"):
        create_model("timm:no_such_net", num_classes=3, in_chans=3)


def test_saliency_map_must_survive_the_cam_crop() -> None:
    # stride 32: 1x1 at 32 px, 3x3 at 96 px (one pixel after the crop), 4x4 at 128 px;
    # ResNet-20's layer3 is 8x8 at 32 px, LeNet's conv2 5x5 at 28 px
    for size, side in ((32, 1), (96, 3)):
        with pytest.raises(UserError, match=f"gives a {side}x{side} map.*at least 4x4"):
            check_saliency_map(f"timm:{NAME}", 3, size, None)
    check_saliency_map(f"timm:{NAME}", 3, 128, None)
    check_saliency_map("resnet20", 3, 32, None)
    check_saliency_map("lenet", 1, 28, None)


def test_sdde_diversity_term_reaches_a_timm_members_weights() -> None:
    """At 128 px timm's last map is 4x4: GradCAM is differentiable through forward_features
    and the diversity term's gradient reaches every member's first convolution."""
    from training.ensemble import build_ensemble
    from training.saliency import diversity_similarity, gradcam

    torch.manual_seed(0)
    ens = build_ensemble(
        f"timm:{NAME}", members=2, num_classes=3, in_chans=3, mean=[0.5] * 3, std=[0.25] * 3
    ).eval()
    # at initialisation many maps are all zero (ReLU of a negative sum): 4 images give pairs
    # where both members' maps are positive
    x, y = torch.rand(4, 3, 128, 128), torch.tensor([0, 2, 1, 1])
    maps = gradcam(ens, x, y, create_graph=True)
    assert maps.shape == (4, 2, 4, 4)
    similarity = diversity_similarity(maps, "gradcam")
    grads = torch.autograd.grad(similarity, [m.net.conv1[0].weight for m in ens.members])
    assert all(float(g.abs().sum()) > 0 for g in grads)
