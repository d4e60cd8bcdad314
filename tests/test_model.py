"""Classifier / create_model on tiny timm test models, optimizer hygiene, checkpoints, summaries."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fixedcls import polytopes
from fixedcls.errors import FixedclsError
from fixedcls.models.classifier import Classifier, create_model, format_param_summary, param_summary

# Three families (ViT, ResNet, ConvNeXt) plus MambaOut, whose pooled width (head_hidden_size)
# differs from num_features.
BACKBONES = ["test_vit", "test_resnet", "test_convnext", "test_mambaout"]
HEADS = ["learned", "cosine", "simplex", "dcube", "orthoplex", "hadamard", "etf"]
WIDTH = {"test_vit": 64, "test_resnet": 96, "test_convnext": 64, "test_mambaout": 256}


def images(batch: int = 2, size: int = 32, chans: int = 3) -> torch.Tensor:
    return torch.randn(batch, chans, size, size, generator=torch.Generator().manual_seed(0))


GRID = [(backbone, head) for backbone in BACKBONES[:3] for head in HEADS]
GRID += [("test_mambaout", "learned"), ("test_mambaout", "etf")]


@pytest.mark.parametrize("backbone,head", GRID)
def test_forward_backward_every_head(backbone, head):
    torch.manual_seed(0)
    model = create_model(backbone, head, num_classes=10, img_size=32)
    assert isinstance(model, Classifier)
    logits, h = model(images(), return_features=True)
    assert logits.shape == (2, 10) and h.shape == (2, model.dim)
    assert model.num_classes == 10 and model.head.num_classes == 10
    assert torch.allclose(model.head(h), logits)
    assert torch.equal(model.forward_features(images()), h)
    F.cross_entropy(logits, torch.tensor([1, 7])).backward()
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    if model.head.is_fixed:
        assert not model.head.prototypes.requires_grad and model.head.prototypes.grad is None


@pytest.mark.parametrize("head", HEADS)
def test_default_dim_and_projection(head):
    model = create_model("test_resnet", head, num_classes=10)
    width = WIDTH["test_resnet"]
    expected = width if head in ("learned", "cosine") else polytopes.natural_dim(head, 10)
    assert model.dim == expected == model.head.dim
    if expected == width:
        assert isinstance(model.proj, nn.Identity)
    else:
        assert isinstance(model.proj, nn.Linear) and model.proj.bias is None
        assert model.proj.weight.shape == (expected, width)


def test_explicit_dim():
    assert isinstance(create_model("test_resnet", "learned", 10, dim=32).proj, nn.Linear)
    assert isinstance(create_model("test_resnet", "etf", 10, dim=96).proj, nn.Identity)
    model = create_model("test_resnet", "etf", 10, dim=64)
    assert model.dim == 64 and model(images()).shape == (2, 10)


def test_reserved_prototypes_set_default_dim():
    model = create_model("test_resnet", "simplex", num_classes=5, num_prototypes=20)
    assert model.dim == 19 and model.num_classes == 20
    assert model(images()).shape == (2, 20)


def test_head_input_is_before_normalisation():
    model = create_model("test_resnet", "etf", 10, normalize="l2", scale=10.0)
    logits, h = model(images(), return_features=True)
    assert not torch.allclose(h.norm(dim=1), torch.ones(2))  # h is the raw projection output
    assert torch.allclose(logits, 10.0 * F.normalize(h, dim=1) @ model.head.prototypes.T, atol=1e-5)


def test_img_size_and_in_chans():
    vit = create_model("test_vit", "etf", 10, img_size=48, in_chans=1)
    assert vit(images(size=48, chans=1)).shape == (2, 10)
    # Convolutional models take no img_size; it is dropped, not an error.
    resnet = create_model("test_resnet", "etf", 10, img_size=48, in_chans=1)
    assert resnet(images(size=48, chans=1)).shape == (2, 10)


def test_drop_rate_is_passed():
    model = create_model("test_resnet", "etf", 10, drop_rate=0.3)
    assert model.backbone.drop_rate == 0.3


def test_unknown_backbone_error():
    with pytest.raises(FixedclsError) as info:
        create_model("resnett18", "etf", 10)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "'resnett18'" in message and "resnet18" in message and "model.backbone" in message
    assert "\n" not in message


def test_unknown_head_fails_before_backbone():
    with pytest.raises(FixedclsError, match="unknown head"):
        create_model("resnett18", "tetrahedron", 10)


def trainable_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize("options,extra", [
    ({}, 0),
    ({"learn_scale": True}, 1),
    ({"bias": True}, 10),
    ({"bias": True, "learn_scale": True}, 11),
])
def test_trainable_parameters_are_backbone_and_projection_only(options, extra):
    model = create_model("test_resnet", "simplex", 10, **options)
    expected = trainable_count(model.backbone) + trainable_count(model.proj) + extra
    assert trainable_count(model) == expected
    assert "head.prototypes" in dict(model.named_buffers())
    assert all("prototypes" not in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4),
    lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05),
])
def test_optimizer_steps_leave_prototypes_bit_identical(make_optimizer):
    torch.manual_seed(0)
    model = create_model("test_resnet", "etf", 10, learn_scale=True)
    before = model.head.prototypes.clone()
    projection_before = model.proj.weight.detach().clone()
    optimizer = make_optimizer(model.parameters())
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert all(p is not model.head.prototypes for p in held)
    assert all(p.data_ptr() != model.head.prototypes.data_ptr() for p in held)
    x, y = images(batch=4), torch.tensor([0, 1, 2, 3])
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert torch.equal(model.head.prototypes, before)
    assert not torch.equal(model.proj.weight, projection_before)


def save_and_load(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("head", ["cosine", "etf"])
def test_state_dict_round_trip(head):
    torch.manual_seed(0)
    model = create_model("test_convnext", head, 10).eval()
    torch.manual_seed(1)
    clone = create_model("test_convnext", head, 10).eval()
    clone.load_state_dict(save_and_load(model.state_dict()))
    assert torch.equal(clone(images()), model(images()))


def test_loading_other_prototypes_is_an_error():
    saved = create_model("test_resnet", "etf", 10, seed=0).state_dict()
    with pytest.raises(FixedclsError, match="seed=0"):
        create_model("test_resnet", "etf", 10, seed=1).load_state_dict(saved)
    with pytest.raises(FixedclsError, match="differ in K"):
        create_model("test_resnet", "etf", 10, dim=11).load_state_dict(
            create_model("test_resnet", "etf", 12, dim=11).state_dict()
        )


def test_param_summary_fixed_head():
    model = create_model("test_resnet", "simplex", 10)
    summary = param_summary(model)
    assert summary["backbone"] == trainable_count(model.backbone)
    assert summary["projection"] == 96 * 9
    assert summary["head"] == 0
    assert summary["trainable"] == summary["backbone"] + summary["projection"]
    assert summary["fixed"] == 90
    assert summary["saved"] == 10 * 9 + 10
    # against the learned baseline (96 x 10 + 10 on the backbone width) the projection is paid for
    assert summary["saved_vs_baseline"] == 96 * 10 + 10 - 96 * 9
    line = format_param_summary(model)
    assert "\n" not in line
    assert line.startswith("params: 373.6k trainable (backbone 372.7k, projection 864, head 0)")
    assert line.endswith("| fixed head: 90 prototype values, saves 100 parameters vs a learned head on d=9, "
                         "106 vs the learned baseline (projection included)")


def test_param_summary_with_trainable_bias_and_scale():
    summary = param_summary(create_model("test_resnet", "etf", 10, bias=True, learn_scale=True))
    assert summary["head"] == 11 and summary["saved"] == 100 - 11


def test_param_summary_learned_head():
    model = create_model("test_resnet", "learned", 10)
    summary = param_summary(model)
    assert summary["head"] == 96 * 10 + 10 and summary["fixed"] == 0 and summary["saved"] == 0
    assert summary["projection"] == 0
    assert format_param_summary(model).endswith("| learned head")
