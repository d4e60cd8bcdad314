"""A config, or a checkpoint's stored config, becomes objects here and nowhere else.

Every command calls these builders: `fixedcls-train` for a new run, `fixedcls-compat` and the collapse
command to rebuild trained models (`model_from_checkpoint` is the one rebuild), a benchmark for the very
objects of a real run.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import re
from pathlib import Path
from typing import Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException
from torch import nn

from . import checkpoint as ckpt
from .config import Config
from .data import IMAGE_FILE_DATASETS
from .errors import FixedclsError
from .heads import FeatureDistillation, create_criterion
from .model import Classifier, create_model, model_data_config
from .runtime import choice
from .stored import literal

log = logging.getLogger("fixedcls")
DISTILL_LOSSES = ("cosine", "l2")


def plain_config(cfg: DictConfig) -> dict:
    """The resolved config as plain containers (safe to store in a weights_only checkpoint)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def stored_config(state: dict, path: Path) -> DictConfig:
    """The resolved config stored in a checkpoint, on the current schema (keys it lacks take their defaults).

    It is data: a ``${...}`` in a stored value stays text (`stored.literal`), and `data.download` is off, so
    a checkpoint can neither read the environment nor start a download (a user's own override may turn
    it back on)."""
    if not isinstance(state.get("config"), dict):
        raise FixedclsError(f"checkpoint {path} holds no config: it was not written by fixedcls-train")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), literal(state["config"]))
        cfg.data.download = False
        return cfg
    except ConfigKeyError as error:
        key = error.full_key or str(error.key)
        raise FixedclsError(f"checkpoint {path} has the config key '{key}', which this fixedcls does not know: it was "
                            f"written by a newer fixedcls; upgrade fixedcls to read it") from None
    except OmegaConfBaseException as error:
        raise FixedclsError(f"checkpoint {path} has a config this fixedcls cannot read ({str(error).splitlines()[0]}): "
                            f"it was written by another fixedcls version; read it with that version") from None


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


def mismatch(model: nn.Module, saved: dict) -> str:
    """What differs between a model's state dict and a saved one, in a few words."""
    own = model.state_dict()
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    shapes = [k for k in own if k in saved and tuple(own[k].shape) != tuple(saved[k].shape)]
    parts = [f"{len(keys)} {what} (e.g. {keys[0]})" for what, keys in
             (("missing tensors", missing), ("unexpected tensors", unexpected), ("tensors of another shape", shapes)) if keys]
    return ", ".join(parts) or "the weights do not load"


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


def load_checkpoint(path: str | Path) -> tuple[Path, dict]:
    """(the file, its state): a folder means its newest good checkpoint."""
    path = ckpt.checkpoint_file(path, warn=log.warning)
    return path, ckpt.load(path)


def model_from_checkpoint(path: str | Path) -> tuple[Classifier, DictConfig, dict, Path]:
    """(model in eval mode with the checkpoint's weights, its config, the state, the file): backbone and
    head from the stored config, never downloading pretrained weights."""
    path, state = load_checkpoint(path)
    cfg = stored_config(state, path)
    outputs = ckpt.meta_of(state).get("num_classes")
    if not isinstance(outputs, int) or isinstance(outputs, bool):
        head_rows = [v for k, v in state["model"].items() if k in ("head.prototypes", "head.weight", "head.raw_weight")]
        outputs = int(head_rows[0].shape[0]) if head_rows else cfg.data.num_classes
    with hub_offline():
        try:
            model = build_model(cfg, num_classes=int(outputs), in_chans=in_chans_of(cfg), img_size=cfg.data.img_size,
                                pretrained=False)
        except FixedclsError:
            raise
        except Exception as error:
            if not _from_hub(cfg.model.backbone):
                raise
            raise FixedclsError(
                f"checkpoint {path} names the backbone {cfg.model.backbone}, whose config is not in the local Hugging "
                f"Face cache ({type(error).__name__}); a stored config never downloads: fetch it once on purpose "
                f"(python -c \"import timm; timm.create_model('{cfg.model.backbone}')\"), then run this again"
            ) from None
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        raise FixedclsError(f"checkpoint {path} does not match the model its config describes "
                            f"({mismatch(model, state['model'])}): it was written by another fixedcls version") from None
    return model.eval(), cfg, state, path


def _from_hub(backbone: str) -> bool:
    return str(backbone).split(":", 1)[0].lower() in ("hf-hub", "hf_hub") and ":" in str(backbone)


@contextlib.contextmanager
def hub_offline():
    """A block in which the Hugging Face Hub client makes no network request (its local cache still answers):
    timm fetches an `hf-hub:` backbone's config from the Hub even with pretrained=False."""
    try:
        from huggingface_hub import constants
    except ImportError:  # no Hub client: nothing can reach the Hub
        yield
        return
    previous, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def load_trained(path: str | Path, *, data_overrides: Optional[dict] = None):
    """(model in eval mode, its config, its data bundle) from a checkpoint; `data_overrides` (e.g.
    {"root": ...}) adapt the stored data section to this machine."""
    from .data import create_data

    model, cfg, _, _ = model_from_checkpoint(path)
    if data_overrides:
        cfg.data = OmegaConf.merge(cfg.data, data_overrides)
    return model, cfg, create_data(cfg.data)


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """timm's create_optimizer_v2 with the `optim` section: optim.layer_decay gives each layer group (the
    backbone's stages from the stem up, then projection and head on top) lr x layer_decay^(groups above it);
    optim.kwargs go to the optimizer as they are (betas, eps, nesterov, ...)."""
    from timm.optim import create_optimizer_v2, list_optimizers

    if cfg.name not in list_optimizers():
        raise FixedclsError(f"unknown optimizer optim.name='{cfg.name}': choose sgd, adamw, adam, lamb, lion, ... "
                            f"(any of timm.optim.list_optimizers())")
    extra = OmegaConf.to_container(cfg.kwargs) if isinstance(cfg.get("kwargs"), DictConfig) else dict(cfg.get("kwargs") or {})
    extra = {key: tuple(value) if isinstance(value, list) else value for key, value in extra.items()}
    taken = sorted(set(extra) & {"opt", "lr", "weight_decay", "momentum", "layer_decay", "model_or_params"})
    if taken:
        raise FixedclsError(f"optim.kwargs.{taken[0]} duplicates a key of its own: set optim.{taken[0]} instead")
    try:
        optimizer = create_optimizer_v2(model, opt=cfg.name, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                        momentum=cfg.momentum, layer_decay=cfg.get("layer_decay"), **extra)
    except TypeError as error:
        if not extra:
            raise
        raise FixedclsError(f"optim.kwargs {extra} do not fit optimizer {cfg.name} ({error}): "
                            f"give only keywords its constructor takes") from None
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
