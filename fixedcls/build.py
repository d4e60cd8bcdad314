"""A config, or a checkpoint's stored config, becomes objects here and nowhere else.

Every command calls these builders: `fixedcls-train` for a new run, `fixedcls-compat` and the collapse
command to rebuild trained models (`model_from_checkpoint` is the one rebuild), a benchmark for the very
objects of a real run.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from . import checkpoint as ckpt
from .config import Config
from .errors import FixedclsError
from .heads import FeatureDistillation, create_criterion
from .model import Classifier, create_model
from .runtime import choice

log = logging.getLogger("fixedcls")
DISTILL_LOSSES = ("cosine", "l2")


def plain_config(cfg: DictConfig) -> dict:
    """The resolved config as plain containers (safe to store in a weights_only checkpoint)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def stored_config(state: dict, path: Path) -> DictConfig:
    """The resolved config stored in a checkpoint, on the current schema (keys it lacks take their defaults)."""
    if not isinstance(state.get("config"), dict):
        raise FixedclsError(f"checkpoint {path} holds no config: it was not written by fixedcls-train")
    try:
        return OmegaConf.merge(OmegaConf.structured(Config), state["config"])
    except OmegaConfBaseException as error:
        raise FixedclsError(f"checkpoint {path} has a config this fixedcls cannot read ({str(error).splitlines()[0]})") from None


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
        "num_prototypes": cfg.head.num_prototypes,
    }


def model_from_spec(spec: dict, *, pretrained: bool = False) -> Classifier:
    """The Classifier of a `model_spec` (untrained unless `pretrained` fetches the backbone's timm weights)."""
    spec = dict(spec)
    backbone, head, num_classes = spec.pop("backbone"), spec.pop("head"), spec.pop("num_classes")
    return create_model(backbone, head, num_classes, pretrained=pretrained, **spec)


def build_model(cfg, *, num_classes: int, in_chans: int, img_size: int, pretrained: Optional[bool] = None) -> Classifier:
    """The Classifier a config describes, with `num_classes` outputs."""
    spec = model_spec(cfg, num_classes=num_classes, in_chans=in_chans, img_size=img_size)
    return model_from_spec(spec, pretrained=cfg.model.pretrained if pretrained is None else pretrained)


def mismatch(model: nn.Module, saved: dict) -> str:
    """What differs between a model's state dict and a saved one, in a few words."""
    own = model.state_dict()
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    shapes = [k for k in own if k in saved and tuple(own[k].shape) != tuple(saved[k].shape)]
    parts = [f"{len(keys)} {what} (e.g. {keys[0]})" for what, keys in
             (("missing tensors", missing), ("unexpected tensors", unexpected), ("tensors of another shape", shapes)) if keys]
    return ", ".join(parts) or "the weights do not load"


def load_checkpoint(path: str | Path) -> tuple[Path, dict]:
    """(the file, its state): a folder means its newest good checkpoint."""
    path = ckpt.checkpoint_file(path, warn=log.warning)
    return path, ckpt.load(path)


def model_from_checkpoint(path: str | Path) -> tuple[Classifier, DictConfig, dict, Path]:
    """(model in eval mode with the checkpoint's weights, its config, the state, the file): backbone and
    head from the stored config, never downloading pretrained weights."""
    path, state = load_checkpoint(path)
    cfg = stored_config(state, path)
    outputs = state.get("meta", {}).get("num_classes")
    if outputs is None:
        head_rows = [v for k, v in state["model"].items() if k in ("head.prototypes", "head.weight", "head.raw_weight")]
        outputs = int(head_rows[0].shape[0]) if head_rows else cfg.data.num_classes
    model = build_model(cfg, num_classes=int(outputs), in_chans=in_chans_of(cfg), img_size=cfg.data.img_size, pretrained=False)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        raise FixedclsError(f"checkpoint {path} does not match the model its config describes "
                            f"({mismatch(model, state['model'])}): it was written by another fixedcls version") from None
    return model.eval(), cfg, state, path


def load_trained(path: str | Path, *, data_overrides: Optional[dict] = None):
    """(model in eval mode, its config, its data bundle) from a checkpoint; `data_overrides` (e.g.
    {"root": ...}) adapt the stored data section to this machine."""
    from .data import create_data

    model, cfg, _, _ = model_from_checkpoint(path)
    if data_overrides:
        cfg.data = OmegaConf.merge(cfg.data, data_overrides)
    return model, cfg, create_data(cfg.data)


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    from timm.optim import create_optimizer_v2, list_optimizers

    if cfg.name not in list_optimizers():
        raise FixedclsError(f"unknown optimizer optim.name='{cfg.name}': choose sgd, adamw, adam, lamb, lion, ... "
                            f"(any of timm.optim.list_optimizers())")
    return create_optimizer_v2(model, opt=cfg.name, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)


def build_scheduler(cfg, optimizer: torch.optim.Optimizer, epochs: int):
    from timm.scheduler import create_scheduler_v2

    if cfg.name in ("none", "constant"):
        return None
    unknown = FixedclsError(f"unknown scheduler sched.name='{cfg.name}': choose cosine, step, multistep, plateau, poly, tanh or none")
    try:
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=cfg.name, num_epochs=epochs, warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
            min_lr=cfg.min_lr, decay_epochs=cfg.decay_epochs, decay_rate=cfg.decay_rate,
        )
    except (AssertionError, ValueError, KeyError) as error:
        raise unknown from error
    if scheduler is None:
        raise unknown
    return scheduler


def build_criterion(cfg, model: Classifier) -> nn.Module:
    return create_criterion(cfg.trainer.loss, model.head, label_smoothing=cfg.trainer.label_smoothing)


def build_ema(cfg, model: nn.Module) -> Optional[nn.Module]:
    if not cfg.trainer.ema:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=cfg.trainer.ema_decay)


def build_checkpoints(cfg, directory: Path, *, enabled: bool = True) -> ckpt.CheckpointWriter:
    """The checkpoint writer of `checkpoint.*` (close() it when done: it may own a writer thread)."""
    return ckpt.CheckpointWriter(directory, keep=cfg.keep, best_metric=cfg.best_metric, enabled=enabled,
                                 background=cfg.background)


def init_from_checkpoint(cfg, model: nn.Module, device: torch.device) -> Optional[Callable]:
    """model.init_from: load a checkpoint's weights into `model` (strict, prototypes checked).

    trainer.distill_weight > 0: return the feature-distillation extra loss against a frozen copy of the
    init_from model (taken before training, so a resumed run distils from the same model); else None.
    """
    weight = float(cfg.trainer.distill_weight or 0.0)
    kind = str(cfg.trainer.distill_loss)
    path = cfg.model.init_from
    if weight < 0:
        raise FixedclsError(f"trainer.distill_weight={weight} is negative: use 0 (off) or a positive weight")
    if weight and not path:
        raise FixedclsError(f"trainer.distill_weight={weight} distils from the previous model: set model.init_from=<its checkpoint>")
    if weight and kind not in DISTILL_LOSSES:
        raise FixedclsError(f"unknown trainer.distill_loss={kind!r}: choose one of {', '.join(DISTILL_LOSSES)}")
    if not path:
        return None
    path, state = load_checkpoint(path)
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError:
        saved = state.get("meta", {})
        raise FixedclsError(
            f"model.init_from={path} does not fit this model (it holds {saved.get('backbone', '?')} with head "
            f"{saved.get('head', '?')}, {saved.get('num_classes', '?')} outputs, d={saved.get('dim', '?')}; "
            f"{mismatch(model, state['model'])}): use the checkpoint's model.backbone, head, model.dim and class count"
        ) from None
    log.info(f"initialised from {path}")
    if not weight:
        return None
    teacher = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    log.info(f"feature distillation ({kind}, weight {weight}) from the frozen {path}")
    return FeatureDistillation(teacher, weight, kind)
