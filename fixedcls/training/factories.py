"""A config becomes the objects of a training run here and nowhere else: optimizer (layer decay,
`optim.kwargs`), scheduler, loss, mixup, EMA, checkpoint writer, best-checkpoint selection, `model.init_from`,
and the preprocessing a pretrained backbone brings.

The model itself comes from `fixedcls.models.classifier.build_model`; a trained model is rebuilt by
`fixedcls.runs.rebuild.model_from_checkpoint`.
"""
from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..data.datasets import IMAGE_FILE_DATASETS
from ..errors import FixedclsError
from ..models.classifier import Classifier, in_chans_of, model_data_config
from ..models.heads import FeatureDistillation, create_criterion
from ..runs import checkpoints as ckpt
from ..runs.rebuild import load_checkpoint, mismatch
from ..runtime import choice

log = logging.getLogger("fixedcls")

DISTILL_LOSSES = ("cosine", "l2")


def uses_pretrained_weights(cfg) -> bool:
    return bool(cfg.model.pretrained or cfg.model.get("pretrained_file"))


def resolve_preprocessing(cfg) -> dict:
    """Fill the data section's unset preprocessing from the backbone's own data config (timm's
    resolve_model_data_config), in place, before the datasets are built; returns the preprocessing of the run
    (img_size, mean, std, interpolation, crop_pct) and `from_model`, the keys the model gave.

    data.img_size=null always takes the model's input size.  With pretrained weights (model.pretrained or
    model.pretrained_file) and a dataset of image files, mean, std, interpolation and crop_pct left unset
    (null) take the values the weights were trained with; a value set in the data config wins.  Digits and
    synthetic tensors keep their own normalisation.
    """
    data = cfg.data
    from_pretrained = uses_pretrained_weights(cfg) and data.name in IMAGE_FILE_DATASETS
    wanted = (["img_size"] if data.img_size is None else []) + \
        [key for key in ("mean", "std", "interpolation", "crop_pct") if from_pretrained and data.get(key) is None]
    if wanted:
        channels = in_chans_of(cfg)
        model_cfg = model_data_config(cfg.model.backbone, pretrained_file=cfg.model.get("pretrained_file"),
                                      in_chans=channels)
        values = {"img_size": int(model_cfg["input_size"][-1]), "interpolation": model_cfg.get("interpolation"),
                  "crop_pct": model_cfg.get("crop_pct")}
        for key in ("mean", "std"):
            per_channel = [float(v) for v in model_cfg[key]]
            # A 1-channel model of RGB weights (timm sums the stem over the channels): one grey value.
            values[key] = per_channel if len(per_channel) == channels else [sum(per_channel) / len(per_channel)] * channels
        for key in wanted:
            data[key] = values[key]
    chosen = {key: OmegaConf.to_container(data[key]) if OmegaConf.is_list(data[key]) else data.get(key)
              for key in ("img_size", "mean", "std", "interpolation", "crop_pct")}
    return {**chosen, "from_model": wanted}


def check_resume_fits(state: dict, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """One line, before training starts, when a checkpoint's weights or optimizer state cannot be loaded into
    this run's model and optimizer (another model, another optimizer's parameter groups)."""
    own = model.state_dict()
    saved = state["model"]
    if set(own) != set(saved) or any(tuple(own[k].shape) != tuple(saved[k].shape) for k in own):
        raise FixedclsError(f"checkpoint {path} holds weights of another model ({mismatch(model, saved)}): resume it "
                            f"with the model.backbone, head and model.dim it was trained with, or start a new run")
    groups = state["optimizer"]["param_groups"]
    sizes, own_sizes = [len(g["params"]) for g in groups], [len(g["params"]) for g in optimizer.param_groups]
    if sizes != own_sizes:
        raise FixedclsError(f"checkpoint {path} holds an optimizer state for parameter groups of {sizes} tensors, this "
                            f"run's optimizer has {own_sizes}: resume with the optim settings it was trained with "
                            f"(optim.name, optim.weight_decay), or start a new run")


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """timm's create_optimizer_v2 with the `optim` section: optim.layer_decay gives each layer group (the
    backbone's stages from the stem up, then projection and head on top) lr x layer_decay^(groups above it);
    optim.kwargs go to the optimizer as they are (betas, eps, nesterov, ...)."""
    from timm.optim import create_optimizer_v2, get_optimizer_info, list_optimizers

    if cfg.name not in list_optimizers():
        raise FixedclsError(f"unknown optimizer optim.name='{cfg.name}': choose sgd, adamw, adam, lamb, lion, ... "
                            f"(any of timm.optim.list_optimizers())")
    extra = OmegaConf.to_container(cfg.kwargs) if isinstance(cfg.get("kwargs"), DictConfig) else dict(cfg.get("kwargs") or {})
    extra = {key: tuple(value) if isinstance(value, list) else value for key, value in extra.items()}
    taken = sorted(set(extra) & {"opt", "lr", "weight_decay", "momentum", "layer_decay", "model_or_params"})
    if taken:
        raise FixedclsError(f"optim.kwargs.{taken[0]} duplicates a key of its own: set optim.{taken[0]} instead")
    info = get_optimizer_info(str(cfg.name).lower().split("_")[-1])  # lookahead_sgd: sgd inside lookahead
    if info.has_momentum and not cfg.momentum and info.defaults.get("nesterov") and "nesterov" not in extra:
        # timm's sgd is Nesterov SGD, which torch refuses without momentum; with no momentum both are plain SGD.
        extra["nesterov"] = False
    try:
        optimizer = create_optimizer_v2(model, opt=cfg.name, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                        momentum=cfg.momentum, layer_decay=cfg.get("layer_decay"), **extra)
    except TypeError as error:
        if not extra:
            raise
        raise FixedclsError(f"optim.kwargs {extra} do not fit optimizer {cfg.name} ({error}): "
                            f"give only keywords its constructor takes") from None
    except ValueError as error:  # torch's own check of the settings (e.g. Nesterov momentum with momentum 0)
        raise FixedclsError(f"optimizer {cfg.name} refuses optim.lr={cfg.lr}, optim.momentum={cfg.momentum}, "
                            f"optim.weight_decay={cfg.weight_decay}"
                            + (f", optim.kwargs {extra}" if extra else "") + f": {error}; change the setting it names") from None
    for group in optimizer.param_groups:
        if "lr_scale" in group:
            # timm's schedulers apply lr_scale at every step from the unscaled initial_lr; without a schedule
            # (sched=none) nothing would, so the scale is applied here once.
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = group["initial_lr"] * group["lr_scale"]
    # The top group (projection and head, at optim.lr) first: the epoch rows log param_groups[0]'s rate.
    optimizer.param_groups.sort(key=lambda group: -group.get("lr_scale", 1.0))
    return optimizer


def mixing(cfg) -> bool:
    """Whether data.mixup or data.cutmix mixes the training batches."""
    return bool(cfg.data.get("mixup") or cfg.data.get("cutmix"))


def build_mixup(cfg, num_classes: int):
    """timm's Mixup for data.mixup / data.cutmix (soft targets, trainer.label_smoothing folded in), or None.

    The online train collapse estimate feeds on training batches, which would be mixed: it is refused
    (the exact measure reads the unmixed train_eval split and is unaffected).
    """
    if not mixing(cfg):
        return None
    from timm.data import Mixup

    if cfg.collapse.every and choice(cfg.collapse.mode) == "online" and "train" in cfg.collapse.splits:
        raise FixedclsError("collapse.mode=online measures the train split on the training batches, which "
                            "data.mixup/data.cutmix mix: use collapse.mode=exact (it reads unmixed train images) "
                            "or collapse.splits=[test]")
    return Mixup(mixup_alpha=float(cfg.data.mixup), cutmix_alpha=float(cfg.data.cutmix), prob=float(cfg.data.mix_prob),
                 switch_prob=float(cfg.data.mix_switch_prob), label_smoothing=float(cfg.trainer.label_smoothing),
                 num_classes=num_classes)


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


def build_criterion(cfg, model: Classifier, class_counts: Optional[list[int]] = None) -> nn.Module:
    """The training loss; `class_counts` (training samples per head output) for trainer.logit_adjust."""
    # With mixing, timm's Mixup smooths the soft targets itself: smoothing them again would count twice.
    smoothing = 0.0 if mixing(cfg) and cfg.trainer.loss == "ce" else cfg.trainer.label_smoothing
    return create_criterion(cfg.trainer.loss, model.head, label_smoothing=smoothing,
                            logit_adjust=cfg.trainer.logit_adjust, class_counts=class_counts)


def build_ema(cfg, model: nn.Module) -> Optional[nn.Module]:
    if not cfg.trainer.ema:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=cfg.trainer.ema_decay)


def best_selection(cfg, recorded: list[str]) -> tuple[str, str]:
    """(metric, "max" or "min") that chooses best.pt, from checkpoint.best_metric / best_mode and the keys the
    run records (`engine.recorded_keys`): auto means val/acc with a validation split, else test/acc. A metric
    the run never records is refused now, not found missing after training (best.pt would never be written)."""
    metric = str(cfg.best_metric)
    if metric == "auto":
        metric = "val/acc" if "val/acc" in recorded else "test/acc"
    layer = re.fullmatch(r"(collapse|collapse_test)/layer\d+/nc1(_trace)?", metric)
    if metric not in recorded and not (layer and any(k.startswith(f"{layer.group(1)}/layer<i>") for k in recorded)):
        hint = (" (val/* needs a validation split: data.val_fraction=0.1, or data.val_split for image folders)"
                if metric.startswith("val/") else
                " (collapse/* needs collapse.every > 0 and the split in collapse.splits)" if metric.startswith("collapse") else "")
        raise FixedclsError(f"checkpoint.best_metric={metric} is never recorded by this run{hint}: choose one of "
                            f"{', '.join(recorded)}")
    return metric, ckpt.metric_direction(metric, cfg.best_mode)


def build_checkpoints(cfg, directory: Path, *, enabled: bool = True, best: tuple[str, str] = ("test/acc", "max")
                      ) -> ckpt.CheckpointWriter:
    """The checkpoint writer of `checkpoint.*` (close() it when done: it may own a writer thread); `best`: the
    (metric, mode) of `best_selection`."""
    return ckpt.CheckpointWriter(directory, keep=cfg.keep, best_metric=best[0], best_mode=best[1], enabled=enabled,
                                 background=cfg.background, every=cfg.every)


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
        saved = ckpt.meta_of(state)
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
