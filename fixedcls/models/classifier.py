"""Classifier = timm backbone -> projection -> head (SPEC section 2).

    model = create_model("resnet18", head="simplex", num_classes=10)
    logits, h = model(x, return_features=True)     # h: [B, d], the head's input

The backbone is any timm model built with ``num_classes=0`` (pooled features).  When the
head's dimension d differs from the backbone width, a learned
``Linear(width, d, bias=False)`` projection sits in between (Regular Polytope Networks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import re
from pathlib import Path
from typing import Any, Optional

import timm
import torch
from torch import nn

from .. import polytopes
from ..errors import FixedclsError
from ..runtime import choice
from .heads import HEADS_LEARNED, create_head

__all__ = [
    "Classifier", "check_backbone", "create_model", "format_param_summary", "model_data_config", "param_summary",
    "weights_source",
]
log = logging.getLogger("fixedcls")

# What timm's loaders read (timm.models.load_state_dict and load_state_dict_from_path).
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pth.tar", ".pt", ".bin")
PRETRAINED_FILE_HINT = "model.pretrained_file=<a .safetensors/.pth file, or a folder saved by timm's save_for_hf>"


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
        self.weights_source = "random initialisation"  # where the backbone's weights came from, in words

    def group_matcher(self, coarse: bool = False):
        """timm's layer grouping (used by optim.layer_decay): the backbone's own groups, from the stem up, then
        one top group for the projection and the head, as timm ranks a classifier.  A backbone without a
        group_matcher counts as one group below the top."""
        from timm.models import group_parameters

        layer_of: dict[str, int] = {}
        if hasattr(self.backbone, "group_matcher"):
            layer_of = group_parameters(self.backbone, self.backbone.group_matcher(coarse=coarse), reverse=True)
        top = max(layer_of.values(), default=0) + 1

        def layer(name: str) -> int:
            if name.startswith("backbone."):  # unmatched backbone parameters rank with the head, as in timm
                return layer_of.get(name[len("backbone."):], top if layer_of else 0)
            return top

        return layer

    def no_weight_decay(self) -> set[str]:
        """The backbone's parameters that timm trains without weight decay (position embeddings, tokens)."""
        own = getattr(self.backbone, "no_weight_decay", None)
        return {f"backbone.{name}" for name in own()} if callable(own) else set()

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


def _pretrained_file_overlay(path_text: str, backbone: str) -> dict:
    """timm's pretrained_cfg_overlay that loads model.pretrained_file (a weight file, or a save_for_hf folder whose
    config.json also brings the preprocessing the weights were trained with)."""
    path = Path(str(path_text)).expanduser()
    if not path.exists():
        raise FixedclsError(f"model.pretrained_file={path} does not exist: set {PRETRAINED_FILE_HINT}")
    if path.is_dir():
        if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in path.iterdir()):
            raise FixedclsError(f"model.pretrained_file={path} is a folder without weights "
                                f"({', '.join(WEIGHT_SUFFIXES)}): set {PRETRAINED_FILE_HINT}")
        overlay: dict[str, Any] = {}
        if (path / "config.json").is_file():
            from timm.models._hub import load_model_config_from_path

            pretrained_cfg, architecture, _ = load_model_config_from_path(path)
            registry_name = backbone.split(".", 1)[0] if ":" not in backbone else None
            if registry_name and architecture and architecture != registry_name:
                raise FixedclsError(f"model.pretrained_file={path} holds a {architecture} but model.backbone={backbone}: "
                                    f"set model.backbone={architecture}")
            known = {f.name for f in dataclasses.fields(timm.models.PretrainedCfg)}
            overlay = {key: value for key, value in pretrained_cfg.items() if key in known}
        # timm's local-dir loader picks the folder's weight file (model.safetensors first).
        return {**overlay, "source": "local-dir", "file": str(path)}
    if not path.name.endswith(WEIGHT_SUFFIXES):
        raise FixedclsError(f"model.pretrained_file={path} is not a weight file ({', '.join(WEIGHT_SUFFIXES)}): "
                            f"set {PRETRAINED_FILE_HINT}")
    # No source: timm's default order, in which a file beats the hub id and the url.
    return {"source": None, "file": str(path)}


def _cached_hub_weights(backbone: str) -> str | None:
    """A registry backbone's pretrained weights in the local Hugging Face cache, or None; never touches the network.

    Without this look first, a machine without network spends the hub client's retries (about 45 s) before
    timm falls back to the same cache.  hf-hub: names are left to timm: their config.json comes from the hub too.
    """
    from timm.models import get_pretrained_cfg, parse_model_name

    if parse_model_name(backbone)[0] is not None:
        return None
    pretrained_cfg = get_pretrained_cfg(backbone, allow_unregistered=False)
    if pretrained_cfg is None or not pretrained_cfg.hf_hub_id or pretrained_cfg.custom_load:
        return None
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = pretrained_cfg.hf_hub_id.partition("@")
    filename = pretrained_cfg.hf_hub_filename
    for name in ([filename] if filename else ["model.safetensors", "pytorch_model.bin"]):
        found = try_to_load_from_cache(repo, name, revision=revision or None)
        if isinstance(found, str):
            return found
    return None


def weights_source(backbone: str, *, pretrained: bool, pretrained_file: str | None = None) -> tuple[dict | None, str]:
    """(timm's pretrained_cfg_overlay, where the weights come from in words) for a backbone; overlay None: timm's own
    source (the hub, or a local-dir: folder).  Checks files only; loading is timm's."""
    if pretrained_file:
        overlay = _pretrained_file_overlay(pretrained_file, backbone)
        return overlay, f"model.pretrained_file={overlay['file']}"
    if not pretrained:
        return None, "random initialisation"
    if backbone.startswith("local-dir:"):
        return None, f"the folder {backbone[len('local-dir:'):]}"
    cached = _cached_hub_weights(backbone)
    if cached is not None:
        return {"source": None, "file": cached}, f"the Hugging Face cache ({cached})"
    return None, f"the Hugging Face hub ({backbone})"


def _short(error: BaseException) -> str:
    """The error's type and its first sentence, short enough for a one-line message."""
    lines = str(error).strip().splitlines()
    text = (lines[0] if lines else "").split(". ")[0].rstrip(".")
    text = text if len(text) <= 100 else text[:97] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _missing_weights_error(backbone: str, error: BaseException) -> FixedclsError:
    # The hub's own messages run to several sentences about connections; its error's name says enough.
    reason = type(error).__name__ if type(error).__module__.startswith("huggingface_hub") else _short(error)
    return FixedclsError(
        f"model.pretrained=true: the pretrained weights of {backbone} are not in the local Hugging Face cache and "
        f"could not be downloaded ({reason}): set {PRETRAINED_FILE_HINT}, or download them once where "
        f"there is network (HF_HUB_OFFLINE=1 skips the download attempts)"
    )


def _is_download_failure(error: BaseException) -> bool:
    """A failure to obtain weights (no network, not cached, no weights published), not a bug of the model."""
    module = type(error).__module__.split(".", 1)[0]
    if module in ("huggingface_hub", "requests", "urllib3", "httpx", "urllib", "http"):
        return True
    if isinstance(error, RuntimeError) and "No pretrained weights exist" in str(error):
        return True
    return isinstance(error, (ConnectionError, TimeoutError))


def _create_backbone(
    name: str, *, pretrained: bool, in_chans: int, img_size: int | None, drop_rate: float,
    drop_path_rate: float = 0.0, pretrained_file: str | None = None,
) -> tuple[nn.Module, str]:
    """(timm backbone without its classifier, where its weights came from in words)."""
    check_backbone(name)
    overlay, source = weights_source(name, pretrained=pretrained, pretrained_file=pretrained_file)
    kwargs: dict[str, Any] = dict(pretrained=pretrained or bool(pretrained_file), num_classes=0, in_chans=in_chans,
                                  drop_rate=drop_rate)
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if overlay is not None:
        kwargs["pretrained_cfg_overlay"] = overlay
    try:
        with _timm_load_report() as report:
            net = _timm_backbone(name, img_size, kwargs)
    except FixedclsError:
        raise
    except TypeError as error:
        if "drop_path_rate" in str(error):
            raise FixedclsError(f"model.drop_path_rate={drop_path_rate}: {name} has no stochastic depth "
                                f"(drop_path_rate): set model.drop_path_rate=0 or pick a backbone with residual blocks") from None
        raise
    except Exception as error:
        if not kwargs["pretrained"]:
            raise
        if isinstance(error, RuntimeError) and "state_dict" in str(error):
            raise FixedclsError(f"the weights of {source} do not fit backbone {name} ({_short(error)}): use the "
                                f"model.backbone they were saved from") from None
        if pretrained_file or not _is_download_failure(error):
            raise FixedclsError(f"cannot load the weights of {source} into {name} ({_short(error)}): set "
                                f"{PRETRAINED_FILE_HINT} saved from this model.backbone") from None
        raise _missing_weights_error(name, error) from None
    if kwargs["pretrained"]:
        # timm loads non-strictly once the classifier is dropped, and only logs what did not load.
        missing = report.get("Missing keys", [])
        if missing:
            raise FixedclsError(f"the weights of {source} do not fit backbone {name}: {len(missing)} of its "
                                f"{len(net.state_dict())} tensors are not in them (e.g. {missing[0]}): use the "
                                f"model.backbone they were saved from")
        unexpected = report.get("Unexpected keys", [])
        note = f", {len(unexpected)} extra tensors ignored (e.g. {unexpected[0]})" if unexpected else ""
        log.info(f"pretrained backbone weights: {source}{note}")
    return net, source


@contextlib.contextmanager
def _timm_load_report():
    """{"Missing keys": [...], "Unexpected keys": [...]} as timm's load_pretrained logs them while the block runs."""
    found: dict[str, list[str]] = {}

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            match = re.match(r"(Missing keys|Unexpected keys) \((.*?)\) (discovered|found) while loading",
                             record.getMessage())
            if match:
                found[match.group(1)] = [key for key in match.group(2).split(", ") if key]

    timm_logger = logging.getLogger("timm.models._builder")
    handler, level = Collect(logging.INFO), timm_logger.level
    timm_logger.addHandler(handler)
    if timm_logger.getEffectiveLevel() > logging.INFO:
        timm_logger.setLevel(logging.INFO)
    try:
        yield found
    finally:
        timm_logger.removeHandler(handler)
        timm_logger.setLevel(level)


def _timm_backbone(name: str, img_size: int | None, kwargs: dict) -> nn.Module:
    if img_size is None:
        return timm.create_model(name, **kwargs)
    try:
        return timm.create_model(name, img_size=img_size, **kwargs)
    except TypeError as error:
        # Convolutional models take any input size and have no img_size argument.
        if "img_size" not in str(error):
            raise
        return timm.create_model(name, **kwargs)


def model_data_config(backbone: str, *, pretrained_file: str | None = None, in_chans: int = 3) -> dict:
    """timm's data config of a backbone (input_size, interpolation, mean, std, crop_pct, crop_mode): what its
    pretrained weights were trained with; a save_for_hf folder's config.json wins over the registry's.

    The architecture is built on the meta device (no memory, no weights), so nothing is downloaded but the
    config.json of an hf-hub: name.
    """
    from timm.data import resolve_model_data_config

    check_backbone(backbone)
    overlay = _pretrained_file_overlay(pretrained_file, backbone) if pretrained_file else None
    kwargs: dict[str, Any] = dict(pretrained=False, num_classes=0, in_chans=in_chans)
    if overlay is not None:
        kwargs["pretrained_cfg_overlay"] = overlay
    try:
        with torch.device("meta"):
            net = timm.create_model(backbone, **kwargs)
    except Exception as error:
        if _is_download_failure(error):  # an hf-hub: name whose config.json is neither cached nor reachable
            raise _missing_weights_error(backbone, error) from None
        raise
    return dict(resolve_model_data_config(net))


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
    drop_path_rate: float = 0.0,
    pretrained_file: str | None = None,
    feature_bn: bool = False,
    **head_kwargs: Any,
) -> Classifier:
    """Build ``Classifier(timm backbone -> projection -> head)``.

    ``dim=None`` picks the polytope's natural dimension for a fixed head (for
    ``num_prototypes`` classes when set) and the backbone width for ``learned`` /
    ``cosine``.  ``head_kwargs`` go to ``create_head`` (normalize, scale, learn_scale,
    bias, seed, num_prototypes).  ``img_size`` is passed only to models that accept it.
    ``pretrained_file`` (a weight file or a save_for_hf folder) loads pretrained weights from disk;
    ``pretrained`` alone takes them from the Hugging Face cache, else the hub.  Either way only the
    backbone gets them (it is built without its classifier): the projection and head are fixedcls's.
    ``feature_bn``: a ``BatchNorm1d(d)`` on the features before the head (the measured h is its output).
    """
    # Check the cheap things first so a config typo fails before the backbone is built.
    if head not in HEADS_LEARNED and head not in polytopes.POLYTOPES:
        create_head(head, num_classes, dim, **head_kwargs)  # raises the unknown-head error
    net, weights = _create_backbone(backbone, pretrained=pretrained, in_chans=in_chans, img_size=img_size, drop_rate=drop_rate,
                           drop_path_rate=drop_path_rate, pretrained_file=pretrained_file)
    width = _feature_width(net)
    if dim is None:
        if head in HEADS_LEARNED:
            dim = width
        else:
            num_prototypes = head_kwargs.get("num_prototypes") or num_classes
            dim = polytopes.natural_dim(head, num_prototypes)
    classifier_head = create_head(head, num_classes, dim, **head_kwargs)
    proj: nn.Module = nn.Identity() if dim == width else nn.Linear(width, dim, bias=False)
    classifier = Classifier(net, proj, classifier_head, nn.BatchNorm1d(dim) if feature_bn else None)
    classifier.weights_source = weights
    return classifier


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


def in_chans_of(cfg) -> int:
    """The image channels a config's model takes (CIFAR is always RGB)."""
    return 3 if cfg.data.name in ("cifar10", "cifar100") else int(cfg.data.in_chans)


def model_spec(cfg, *, num_classes: int, in_chans: int, img_size: int) -> dict:
    """Everything `create_model` needs to build the Classifier a config describes, as plain values (a checkpoint
    stores it, so a model can be rebuilt without the config schema or the data)."""
    return {
        "backbone": str(cfg.model.backbone), "head": str(cfg.head.name), "num_classes": int(num_classes),
        "dim": cfg.model.dim, "in_chans": int(in_chans), "img_size": int(img_size),
        "drop_rate": float(cfg.model.drop_rate), "normalize": choice(cfg.head.normalize), "scale": cfg.head.scale,
        "learn_scale": bool(cfg.head.learn_scale), "bias": cfg.head.bias, "seed": int(cfg.head.seed),
        "num_prototypes": cfg.head.num_prototypes, "drop_path_rate": float(cfg.model.get("drop_path_rate") or 0.0),
        "feature_bn": bool(cfg.head.get("feature_bn", False)),
    }


def model_from_spec(spec: dict, *, pretrained: bool = False, pretrained_file: Optional[str] = None) -> Classifier:
    """The Classifier of a `model_spec` (untrained unless `pretrained` / `pretrained_file` bring the backbone's
    weights; a spec of an older checkpoint without the newer keys takes their defaults)."""
    spec = dict(spec)
    backbone, head, num_classes = spec.pop("backbone"), spec.pop("head"), spec.pop("num_classes")
    return create_model(backbone, head, num_classes, pretrained=pretrained, pretrained_file=pretrained_file, **spec)


def build_model(cfg, *, num_classes: int, in_chans: int, img_size: int, pretrained: Optional[bool] = None) -> Classifier:
    """The Classifier a config describes, with `num_classes` outputs; `pretrained=False` loads no pretrained
    weights at all (neither model.pretrained nor model.pretrained_file: a checkpoint's weights follow)."""
    spec = model_spec(cfg, num_classes=num_classes, in_chans=in_chans, img_size=img_size)
    return model_from_spec(spec, pretrained=cfg.model.pretrained if pretrained is None else pretrained,
                           pretrained_file=cfg.model.get("pretrained_file") if pretrained is not False else None)
