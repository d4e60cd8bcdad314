"""Heads (learned, cosine, fixed polytopes), create_head, and the losses (SPEC section 2)."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fixedcls import polytopes
from fixedcls.errors import FixedclsError
from fixedcls.models.heads import CosineHead, FixedHead, HEADS_LEARNED, LinearHead, available_heads, create_criterion, create_head

POLYTOPE_HEADS = ["simplex", "dcube", "orthoplex", "hadamard", "etf"]
ALL_HEADS = [*HEADS_LEARNED, *POLYTOPE_HEADS]


def features(batch: int = 6, dim: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed))


def test_available_heads():
    assert set(ALL_HEADS) <= set(available_heads())


@pytest.mark.parametrize("name", ALL_HEADS)
def test_common_api_and_forward(name):
    head = create_head(name, num_classes=10, dim=16)
    assert head.num_classes == 10 and head.dim == 16
    assert head.is_fixed == (name in POLYTOPE_HEADS)
    assert head.weight.shape == (10, 16)
    h = features(dim=16).requires_grad_()
    logits = head(h)
    assert logits.shape == (6, 10)
    logits.sum().backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()


def test_learned_head_is_plain_linear_with_bias():
    head = create_head("learned", 10, 16)
    assert isinstance(head, LinearHead) and isinstance(head, nn.Linear)
    assert head.bias is not None and head.bias.shape == (10,)
    assert create_head("learned", 10, 16, bias=False).bias is None
    h = features()
    assert torch.allclose(head(h), h @ head.weight.T + head.bias)


def test_cosine_head():
    head = create_head("cosine", 10, 16, scale=8.0)
    assert isinstance(head, CosineHead) and head.bias is None
    assert torch.allclose(head.weight.norm(dim=1), torch.ones(10), atol=1e-6)
    h = features()
    expected = 8.0 * F.normalize(h, dim=1) @ head.weight.T
    assert torch.allclose(head(h), expected, atol=1e-5)
    assert head(h).abs().max() <= 8.0 + 1e-5
    learned = create_head("cosine", 10, 16, learn_scale=True, scale=4.0)
    assert isinstance(learned.scale, nn.Parameter) and learned.scale.item() == 4.0


def test_learned_heads_need_dim():
    with pytest.raises(FixedclsError, match="needs dim"):
        create_head("learned", 10)


def test_learned_head_rejects_fixed_head_options():
    with pytest.raises(FixedclsError):
        create_head("learned", 10, 16, normalize="l2")
    with pytest.raises(FixedclsError):
        create_head("cosine", 10, 16, num_prototypes=12)


@pytest.mark.parametrize("name", POLYTOPE_HEADS)
def test_fixed_head_prototypes_are_a_buffer(name):
    head = create_head(name, 10)
    assert isinstance(head, FixedHead)
    assert torch.equal(head.prototypes, polytopes.make(name, 10))
    assert head.weight is head.prototypes
    assert not head.prototypes.requires_grad
    assert list(head.parameters()) == []  # defaults: no bias, fixed scale
    assert "prototypes" in dict(head.named_buffers())
    assert set(head.state_dict()) == {"prototypes"}
    assert head.bias is None and head.dim == polytopes.natural_dim(name, 10)


@pytest.mark.parametrize("normalize", ["none", "l2"])
@pytest.mark.parametrize("scale,learn_scale", [(None, False), (5.0, False), (3.0, True)])
@pytest.mark.parametrize("bias", [False, True])
def test_fixed_head_logits_formula(normalize, scale, learn_scale, bias):
    head = create_head("etf", 10, 16, normalize=normalize, scale=scale, learn_scale=learn_scale, bias=bias, seed=2)
    with torch.no_grad():
        if bias:
            head.bias.copy_(torch.linspace(-1, 1, 10))
    h = features()
    n = F.normalize(h, dim=1) if normalize == "l2" else h
    s = 1.0 if scale is None else scale
    expected = s * n @ polytopes.make("etf", 10, 16, seed=2).T
    if bias:
        expected = expected + torch.linspace(-1, 1, 10)
    assert torch.allclose(head(h), expected, atol=1e-5)
    trainable = {name for name, _ in head.named_parameters()}
    assert trainable == ({"scale"} if learn_scale else set()) | ({"bias"} if bias else set())


def test_fixed_scale_is_not_state():
    head = create_head("simplex", 5, scale=10.0)
    assert head.scale == 10.0 and "scale" not in head.state_dict()


@pytest.mark.parametrize("scale", [0.0, -1.0])
def test_bad_scale(scale):
    with pytest.raises(FixedclsError, match="positive"):
        create_head("simplex", 5, scale=scale)


def test_unknown_head_and_normalisation():
    with pytest.raises(FixedclsError) as info:
        create_head("polytope", 5, 4)
    assert all(name in str(info.value) for name in ALL_HEADS)
    with pytest.raises(FixedclsError, match="normalisation"):
        create_head("etf", 5, normalize="l1")


def test_reserved_prototypes():
    head = create_head("etf", 10, 32, num_prototypes=15, seed=1)
    assert head.num_classes == 15 and head.num_prototypes == 15
    assert torch.equal(head.prototypes, polytopes.make("etf", 15, 32, seed=1))
    assert head(features(dim=32)).shape == (6, 15)
    # Natural dimension follows the prototypes, not the current classes.
    assert create_head("simplex", 10, num_prototypes=15).dim == 14
    with pytest.raises(FixedclsError, match="num_prototypes=8"):
        create_head("etf", 10, num_prototypes=8)


def test_polytope_capacity_error_passes_through():
    with pytest.raises(FixedclsError, match="needs d >= 9"):
        create_head("simplex", 10, 5)


@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=0.1),
    lambda params: torch.optim.AdamW(params, lr=0.1, weight_decay=0.1),
])
def test_optimizer_never_moves_prototypes(make_optimizer):
    model = nn.Sequential(nn.Linear(8, 9), create_head("simplex", 10, bias=True, learn_scale=True))
    before = model[1].prototypes.clone()
    optimizer = make_optimizer(model.parameters())
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(model[1].prototypes) not in held
    assert all(p.data_ptr() != model[1].prototypes.data_ptr() for group in optimizer.param_groups for p in group["params"])
    x, y = torch.randn(16, 8), torch.arange(16) % 10
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert torch.equal(model[1].prototypes, before)
    assert model[1].scale.item() != 1.0  # the trainable parts did move


def round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dict_round_trip():
    head = create_head("etf", 10, 16, seed=4, bias=True, learn_scale=True)
    with torch.no_grad():
        head.bias.fill_(0.3)
        head.scale.fill_(2.5)
    clone = create_head("etf", 10, 16, seed=4, bias=True, learn_scale=True)
    clone.load_state_dict(round_trip(head.state_dict()))
    h = features()
    assert torch.equal(clone(h), head(h))


def test_half_precision_checkpoint_still_loads():
    head = create_head("etf", 10, 16)
    state = {"prototypes": head.prototypes.half()}
    create_head("etf", 10, 16).load_state_dict(state)


@pytest.mark.parametrize("other,expected", [
    (dict(name="etf", num_classes=10, dim=16, seed=1), "seed=1"),
    (dict(name="hadamard", num_classes=10, dim=16), "'hadamard'"),
    (dict(name="etf", num_classes=12, dim=16), "differ in K"),
    (dict(name="etf", num_classes=10, dim=20), "differ in d"),
    (dict(name="etf", num_classes=12, dim=20), "K and d"),
])
def test_prototype_mismatch_is_an_error(other, expected):
    head = create_head("etf", 10, 16, seed=0)
    before = head.prototypes.clone()
    saved = create_head(other.pop("name"), **other).state_dict()
    with pytest.raises(FixedclsError) as info:
        head.load_state_dict(saved)
    message = str(info.value)
    assert expected in message and "\n" not in message
    assert "polytope 'etf'" in message and "seed=0" in message
    assert torch.equal(head.prototypes, before)  # nothing was copied
    with pytest.raises(FixedclsError):
        head.load_state_dict(saved, strict=False)


def test_unrecognised_prototypes_mismatch():
    head = create_head("etf", 4, 8)
    with pytest.raises(FixedclsError, match="match no built-in polytope"):
        head.load_state_dict({"prototypes": F.normalize(torch.randn(4, 8), dim=1)})


def test_missing_prototypes_is_reported_by_torch():
    with pytest.raises(RuntimeError, match="prototypes"):
        create_head("etf", 4).load_state_dict({})


# --------------------------------------------------------------------------- losses


def test_cross_entropy_with_label_smoothing():
    head = create_head("simplex", 10)
    criterion = create_criterion("ce", head, label_smoothing=0.1)
    logits, target = features(dim=10), torch.arange(6)
    assert torch.allclose(criterion(logits, target), F.cross_entropy(logits, target, label_smoothing=0.1))


@pytest.mark.parametrize("scale", [None, 16.0, 4.0])
def test_dot_regression_matches_formula(scale):
    # The paper's form: features of constant length sqrt(E_H) = s, unit prototypes (E_W = 1),
    # L = (w_y . h - sqrt(E_W E_H))^2 / (2 sqrt(E_W E_H)).
    head = create_head("etf", 10, 16, normalize="l2", scale=scale)
    criterion = create_criterion("dot_regression", head)
    h, target = features(), torch.tensor([0, 1, 2, 3, 9, 9])
    w, s = polytopes.make("etf", 10, 16), 1.0 if scale is None else scale
    dot = (s * F.normalize(h, dim=1) * w[target]).sum(1)
    expected = ((dot - s) ** 2 / (2 * s)).mean()
    assert torch.allclose(criterion(head(h), target), expected, atol=1e-5)
    assert list(criterion.parameters()) == []  # the head is not a submodule of the loss


def test_dot_regression_validates_the_head():
    with pytest.raises(FixedclsError, match="fixed polytope head"):
        create_criterion("dot_regression", create_head("learned", 10, 16))
    with pytest.raises(FixedclsError, match="normalize='l2'"):
        create_criterion("dot_regression", create_head("etf", 10), dr_length="fixed")
    with pytest.raises(FixedclsError, match="head.bias=false"):
        create_criterion("dot_regression", create_head("etf", 10, normalize="l2", bias=True))
    with pytest.raises(FixedclsError, match="label_smoothing"):
        create_criterion("dot_regression", create_head("etf", 10, normalize="l2"), label_smoothing=0.1)
    with pytest.raises(FixedclsError, match="learn_scale=false"):
        create_criterion("dot_regression", create_head("etf", 10, normalize="l2", scale=4.0, learn_scale=True))
    with pytest.raises(FixedclsError, match="unknown loss"):
        create_criterion("mse", create_head("etf", 10))


def test_dot_regression_decreases_on_toy_problem():
    generator = torch.Generator().manual_seed(0)
    num_classes, dim = 5, 8
    centres = torch.randn(num_classes, 12, generator=generator) * 3
    target = torch.arange(200) % num_classes
    x = centres[target] + torch.randn(200, 12, generator=generator)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, dim))
    head = create_head("etf", num_classes, dim, normalize="l2", seed=0)
    criterion = create_criterion("dot_regression", head)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = criterion(head(model(x)), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]
    assert (head(model(x)).argmax(1) == target).float().mean() > 0.9
