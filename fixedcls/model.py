"""Classifier = timm backbone -> projection -> head (SPEC section 2).

    model = create_model("resnet18", head="simplex", num_classes=10)
    logits, h = model(x, return_features=True)     # h: [B, d], the head's input

The backbone is any timm model built with ``num_classes=0`` (pooled features).  When the
head's dimension d differs from the backbone width, a learned
``Linear(width, d, bias=False)`` projection sits in between (Regular Polytope Networks).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from . import polytopes
from .errors import FixedclsError
from .heads import HEADS_LEARNED, create_head

__all__ = ["Classifier", "check_backbone", "create_model", "format_param_summary", "param_summary"]


class Classifier(nn.Module):
    """backbone (pooled features) -> proj (Linear or Identity) -> feature_bn (BatchNorm1d or Identity) -> head."""

    def __init__(self, backbone: nn.Module, proj: nn.Module, head: nn.Module, feature_bn: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.proj = proj
        # Yang et al. (2022) normalise the features with BatchNorm before the fixed ETF; an Identity holds no
        # state, so checkpoints without it load unchanged.
        self.feature_bn = feature_bn if feature_bn is not None else nn.Identity()
        self.head = head
        self.dim = head.dim
        self.num_classes = head.num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Features h [B, d]: after the projection (and head.feature_bn), before any normalisation the head applies."""
        return self.feature_bn(self.proj(self.backbone(x)))

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h = self.forward_features(x)
        logits = self.head(h)
        return (logits, h) if return_features else logits


def _unknown_backbone_error(name: str) -> FixedclsError:
    names = timm.list_models()
    # Wildcard matches catch truncated names ("convnext" -> "convnext_tiny"); difflib catches typos.
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    for candidate in timm.list_models(f"*{name}*"):
        if len(close) >= 5:
            break
        if candidate not in close:
            close.append(candidate)
    hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models() for valid names"
    return FixedclsError(f"unknown timm backbone {name!r}: {hint} (set model.backbone to a timm model name)")


def check_backbone(name: str) -> None:
    """Refuse a model.backbone that timm cannot build, without building it.

    A registry name must exist; ``local-dir:<folder>`` needs the folder and its config.json. An ``hf-hub:``
    repo id is left to timm (checking it would need the network).
    """
    from timm.models import parse_model_name

    valid = "a timm model name (resnet18), hf-hub:<repo id> or local-dir:<folder with config.json>"
    try:
        source, model_id = parse_model_name(name)
    except ValueError as error:  # an unknown "<source>:" prefix, or a path without one
        registry_name = name.split(":", 1)[0]
        hint = f"; did you mean model.backbone={registry_name}?" if timm.is_model(registry_name) else ""
        raise FixedclsError(f"model.backbone={name!r} is not {valid} ({str(error).rstrip('.')}){hint}") from None
    if source is None and not timm.is_model(name):
        raise _unknown_backbone_error(name)
    if source == "local-dir":
        folder = Path(model_id).expanduser()
        if not folder.is_dir():
            what = "is not a folder" if folder.exists() else "does not exist"
            raise FixedclsError(f"model.backbone={name}: the folder {folder} {what}: point local-dir: at a folder "
                                f"holding a timm model's config.json (and its weights)")
        if not (folder / "config.json").is_file():
            raise FixedclsError(f"model.backbone={name}: {folder} has no config.json: point local-dir: at a folder "
                                f"saved by timm (config.json and its weights)")


def _create_backbone(
    name: str, *, pretrained: bool, in_chans: int, img_size: int | None, drop_rate: float
) -> nn.Module:
    check_backbone(name)
    kwargs: dict[str, Any] = dict(pretrained=pretrained, num_classes=0, in_chans=in_chans, drop_rate=drop_rate)
    if img_size is None:
        return timm.create_model(name, **kwargs)
    try:
        return timm.create_model(name, img_size=img_size, **kwargs)
    except TypeError as error:
        # Convolutional models take any input size and have no img_size argument.
        if "img_size" not in str(error):
            raise
        return timm.create_model(name, **kwargs)


def _feature_width(backbone: nn.Module) -> int:
    # Models with a pre-logits hidden layer (e.g. MambaOut, MobileNetV3) output
    # head_hidden_size, not num_features, when built with num_classes=0.
    width = getattr(backbone, "head_hidden_size", None) or getattr(backbone, "num_features", None)
    if not width:
        raise FixedclsError(
            f"cannot tell the feature width of backbone {type(backbone).__name__}: use a timm model with num_features"
        )
    return int(width)


def create_model(
    backbone: str,
    head: str,
    num_classes: int,
    dim: int | None = None,
    *,
    pretrained: bool = False,
    in_chans: int = 3,
    img_size: int | None = None,
    drop_rate: float = 0.0,
    feature_bn: bool = False,
    **head_kwargs: Any,
) -> Classifier:
    """Build ``Classifier(timm backbone -> projection -> head)``.

    ``dim=None`` picks the polytope's natural dimension for a fixed head (for
    ``num_prototypes`` classes when set) and the backbone width for ``learned`` /
    ``cosine``.  ``head_kwargs`` go to ``create_head`` (normalize, scale, learn_scale,
    bias, seed, num_prototypes).  ``img_size`` is passed only to models that accept it.
    ``feature_bn``: a ``BatchNorm1d(d)`` on the features before the head (the measured h is its output).
    """
    # Check the cheap things first so a config typo fails before the backbone is built.
    if head not in HEADS_LEARNED and head not in polytopes.POLYTOPES:
        create_head(head, num_classes, dim, **head_kwargs)  # raises the unknown-head error
    net = _create_backbone(backbone, pretrained=pretrained, in_chans=in_chans, img_size=img_size, drop_rate=drop_rate)
    width = _feature_width(net)
    if dim is None:
        if head in HEADS_LEARNED:
            dim = width
        else:
            num_prototypes = head_kwargs.get("num_prototypes") or num_classes
            dim = polytopes.natural_dim(head, num_prototypes)
    classifier_head = create_head(head, num_classes, dim, **head_kwargs)
    proj: nn.Module = nn.Identity() if dim == width else nn.Linear(width, dim, bias=False)
    return Classifier(net, proj, classifier_head, nn.BatchNorm1d(dim) if feature_bn else None)


# --------------------------------------------------------------------------- parameter summary


def _count(params: Any) -> int:
    return sum(p.numel() for p in params if p.requires_grad)


def param_summary(model: Classifier) -> dict[str, int]:
    """Trainable parameter counts per part, the fixed prototype values, and what the fixed head saves.

    ``saved`` = the parameters of a learned ``K x d`` head with bias minus those the fixed
    head trains (bias, scale); 0 for learned and cosine heads.
    ``saved_vs_baseline`` = the learned baseline on the same backbone (a ``K x width`` head with
    bias, no projection) minus what this model trains after the backbone (projection + head):
    the honest saving once a projection to a smaller d is paid for; it can be negative.
    """
    head = model.head
    head_trainable = _count(head.parameters())
    fixed = head.weight.numel() if head.is_fixed else 0
    learned_equivalent = head.num_classes * head.dim + head.num_classes
    summary = {
        "trainable": _count(model.parameters()),
        "backbone": _count(model.backbone.parameters()),
        "projection": _count(model.proj.parameters()),
        "head": head_trainable,
        "fixed": fixed,
        "saved": learned_equivalent - head_trainable if head.is_fixed else 0,
    }
    width = model.proj.in_features if isinstance(model.proj, nn.Linear) else head.dim
    baseline_head = head.num_classes * width + head.num_classes
    summary["saved_vs_baseline"] = baseline_head - summary["projection"] - head_trainable
    return summary


def _human(count: int) -> str:
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(count) >= threshold:
            return f"{count / threshold:.1f}{suffix}"
    return str(count)


def format_param_summary(model: Classifier) -> str:
    """One line, e.g. ``params: 11.2M trainable (backbone 11.1M, projection 4.6k, head 0) | fixed head: ...``."""
    s = param_summary(model)
    line = (
        f"params: {_human(s['trainable'])} trainable (backbone {_human(s['backbone'])}, "
        f"projection {_human(s['projection'])}, head {_human(s['head'])})"
    )
    if model.head.is_fixed:
        line += (
            f" | fixed head: {_human(s['fixed'])} prototype values, "
            f"saves {_human(s['saved'])} parameters vs a learned head on d={model.dim}, "
            f"{_human(s['saved_vs_baseline'])} vs the learned baseline (projection included)"
        )
    else:
        line += " | learned head"
    return line
