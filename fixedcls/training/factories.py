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

from ..config import uses_old_model
from ..data.datasets import IMAGE_FILE_DATASETS
from ..errors import FixedclsError
from ..models.classifier import Classifier, in_chans_of, model_data_config
from ..models.heads import BackwardCompatibleLoss, ExtraLosses, FeatureDistillation, HocDistillation, create_criterion
from ..runs import checkpoints as ckpt
from ..runs.rebuild import load_checkpoint, mismatch, model_from_checkpoint
from ..runs.stored import stored_config
from ..runtime import choice

log = logging.getLogger("fixedcls")

DISTILL_LOSSES = ("cosine", "l2", "hoc")


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
            **({"decay_milestones": [int(m) for m in cfg.decay_milestones]} if cfg.get("decay_milestones") else {}),
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
                            logit_adjust=cfg.trainer.logit_adjust, class_counts=class_counts,
                            dr_length=str(cfg.trainer.dr_length), dr_reg=float(cfg.trainer.dr_reg),
                            dr_balance=str(cfg.trainer.dr_balance))


def loss_settings(cfg) -> dict:
    """The loss of a run as the summary records it: `loss`, and for dot regression its form (`dr_length`,
    `dr_balance`, `dr_reg`)."""
    trainer = cfg.trainer
    if trainer.loss != "dot_regression":
        return {"loss": str(trainer.loss)}
    return {"loss": "dot_regression", "dr_length": str(trainer.dr_length), "dr_balance": str(trainer.dr_balance),
            "dr_reg": float(trainer.dr_reg)}


def describe_loss(cfg) -> str:
    """The loss in words for the run's first log line, e.g. `loss dot_regression (feature length, batch-balanced
    prototypes, reg 0)`."""
    settings = loss_settings(cfg)
    if settings["loss"] != "dot_regression":
        tau = float(cfg.trainer.logit_adjust)
        return f"loss {settings['loss']}" + (f" (logit-adjusted, tau {tau:g})" if tau else "")
    length = "feature length" if settings["dr_length"] == "feature" else f"fixed length {cfg.head.scale or 1:g}"
    balance = ", batch-balanced prototypes" if settings["dr_balance"] == "batch" else ""
    reg = f", reg {settings['dr_reg']:g}" if settings["dr_reg"] else ""
    return f"loss dot_regression ({length}{balance}{reg})"


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


def _known_classes(old_cfg, outputs: int) -> list[int]:
    """The classes an old model trained on: its data.classes and data.old_classes (all its outputs when unset)."""
    if old_cfg.data.classes is None:
        return list(range(outputs))
    return sorted({int(c) for c in old_cfg.data.classes} | {int(c) for c in (old_cfg.data.old_classes or [])})


def init_from_checkpoint(cfg, model: nn.Module, device: torch.device) -> Optional[Callable]:
    """model.init_from: load a checkpoint's weights into `model` (strict, prototypes checked); then the extra loss
    against the frozen old model (trainer.old_model, else the init_from model, taken before training so that a
    resumed run learns from the same model), or None when no loss uses one:

    - trainer.distill_weight > 0 with distill_loss cosine or l2: feature distillation (CL2R);
    - distill_loss=hoc with hoc_lambda < 1: lambda CE + (1 - lambda) HOC (the loop weighs its criterion by lambda);
    - trainer.bct_weight > 0: BCT, cross-entropy of the new features through the old model's frozen head, on the
      samples of the classes the old model trained on.
    """
    trainer = cfg.trainer
    weight = float(trainer.distill_weight or 0.0)
    kind = str(trainer.distill_loss)
    bct = float(trainer.get("bct_weight") or 0.0)
    path, old_path = cfg.model.init_from, trainer.get("old_model")
    if weight < 0:
        raise FixedclsError(f"trainer.distill_weight={weight} is negative: use 0 (off) or a positive weight")
    if kind not in DISTILL_LOSSES:
        raise FixedclsError(f"unknown trainer.distill_loss={kind!r}: choose one of {', '.join(DISTILL_LOSSES)}")
    if kind == "hoc" and weight:
        raise FixedclsError(f"trainer.distill_weight={weight} weighs cosine or l2 distillation, but distill_loss=hoc is "
                            f"weighed by trainer.hoc_lambda: set trainer.distill_weight=0")
    needed = uses_old_model(trainer)
    if needed and not (path or old_path):
        what = (f"trainer.distill_weight={weight}" if weight else f"trainer.bct_weight={bct}" if bct and kind != "hoc"
                else f"trainer.distill_loss=hoc (hoc_lambda={float(trainer.hoc_lambda):g})")
        raise FixedclsError(f"{what} learns from an old model: set model.init_from=<its checkpoint> (or "
                            f"trainer.old_model=<checkpoint>), or turn it off (hoc_lambda=1, distill_weight=0, bct_weight=0)")
    if needed and mixing(cfg) and (kind == "hoc" or bct):
        raise FixedclsError("HOC and BCT use each sample's class, which data.mixup/data.cutmix mix away: "
                            "set data.mixup=0 and data.cutmix=0")
    if path:
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
    if not needed:
        return None
    if old_path:
        teacher, old_cfg, _, old_path = model_from_checkpoint(old_path)
        if int(teacher.dim) != int(model.dim):
            raise FixedclsError(f"trainer.old_model={old_path} has {teacher.dim}-d features but this model {model.dim}-d: "
                                f"distillation, HOC and BCT compare features of one width (set model.dim={teacher.dim})")
    else:
        teacher, old_path = copy.deepcopy(model), path
        old_cfg = stored_config(state, path)
    teacher = teacher.to(device).eval().requires_grad_(False)
    parts: list[Callable] = []
    if weight:
        log.info(f"feature distillation ({kind}, weight {weight}) from the frozen {old_path}")
        parts.append(FeatureDistillation(teacher, weight, kind))
    if kind == "hoc" and float(trainer.hoc_lambda) < 1.0:
        lam, mu = float(trainer.hoc_lambda), float(trainer.hoc_mu)
        log.info(f"HOC loss against the frozen {old_path}: {lam:g} CE + {1 - lam:g} HOC (mu {mu:g})")
        parts.append(HocDistillation(teacher, mu, lam))
    if bct:
        known = _known_classes(old_cfg, int(teacher.num_classes))
        log.info(f"BCT (weight {bct:g}) through the frozen classifier of {old_path} on its {len(known)} classes")
        parts.append(BackwardCompatibleLoss(teacher.head, bct, known))
    return parts[0] if len(parts) == 1 else ExtraLosses(parts)
