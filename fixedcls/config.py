"""Structured configs: the schema every Hydra config of fixedcls is validated against.

The YAML files under ``conf/`` only set values; these dataclasses say which keys exist and
what type each has, so a mistyped key or a wrong-typed value fails when the run starts,
not an hour into it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from enum import Enum
from typing import Dict, List, Optional

from hydra.core.config_store import ConfigStore


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Normalize(str, Enum):
    none = "none"
    l2 = "l2"


class CollapseMode(str, Enum):
    exact = "exact"
    online = "online"


@dataclass
class HeadConfig:
    name: str = "simplex"  # learned, cosine, or a polytope: simplex, dcube, orthoplex, hadamard, etf
    normalize: Normalize = Normalize.none  # feature normalisation before a fixed head
    scale: Optional[float] = None  # logit scale s; None means 1 (or learned, see learn_scale)
    learn_scale: bool = False
    bias: Optional[bool] = None  # None: on for the learned head, off for cosine and fixed heads
    seed: int = 0  # seeds the random orthonormal map of `etf`
    num_prototypes: Optional[int] = None  # reserve prototypes for classes added later


@dataclass
class ModelConfig:
    backbone: str = "resnet18"  # any timm model name
    dim: Optional[int] = None  # feature dimension d; None = natural dimension of the head
    pretrained: bool = False
    drop_rate: float = 0.0
    init_from: Optional[str] = None  # a checkpoint whose model weights are loaded before training (fine-tuning)


@dataclass
class DataConfig:
    name: str = "digits"  # digits, synthetic, cifar10, cifar100, imagefolder
    root: Optional[str] = None
    download: bool = False
    num_classes: Optional[int] = None  # None = what the dataset has
    img_size: int = 32
    in_chans: int = 3
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0
    augment: bool = True
    test_fraction: float = 0.2  # digits: held-out share, split with split_seed
    split_seed: int = 0
    train_split: str = "train"
    test_split: str = "validation"
    val_fraction: float = 0.0  # validation share carved out of the training split (stratified, split_seed); 0: none
    val_split: Optional[str] = None  # image folders: the folder of the validation split (e.g. val); None: none
    # synthetic data
    train_per_class: int = 64
    test_per_class: int = 16
    noise: float = 0.5
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    # class-incremental training: label ids are kept, so class c is always head output c
    classes: Optional[List[int]] = None  # train and test on these classes only; None = all
    old_classes: Optional[List[int]] = None  # earlier classes: in the test split, and `rehearsal` train samples each
    rehearsal: int = 0  # training samples kept per old class (a memory drawn with split_seed)


@dataclass
class OptimConfig:
    name: str = "sgd"  # any timm optimizer name
    lr: float = 0.05
    weight_decay: float = 5e-4
    momentum: float = 0.9


@dataclass
class SchedConfig:
    name: str = "cosine"  # any timm scheduler name (cosine, step, ...), or none
    warmup_epochs: int = 0
    warmup_lr: float = 1e-5
    min_lr: float = 0.0
    decay_epochs: float = 30.0
    decay_rate: float = 0.1


@dataclass
class TrainerConfig:
    epochs: int = 30
    precision: Precision = Precision.fp32
    device: Device = Device.auto
    loss: str = "ce"  # ce or dot_regression
    label_smoothing: float = 0.0
    grad_accum: int = 1
    clip_grad: Optional[float] = None
    ema: bool = False
    ema_decay: float = 0.998
    channels_last: bool = False
    compile: bool = False
    max_nonfinite: int = 5
    progress: Optional[bool] = None  # None: a progress bar only on a terminal
    threads: Optional[int] = None
    distill_weight: float = 0.0  # feature distillation from the frozen model.init_from model (CL2R)
    distill_loss: str = "cosine"  # cosine (1 - cos) or l2 (squared distance) between new and old features


@dataclass
class CheckpointConfig:
    root: str = "checkpoints"
    dir: Optional[str] = None  # None: <root>/<run name>
    keep: int = 2  # per-epoch checkpoints kept besides last.pt and best.pt
    best_metric: str = "auto"  # a metrics.jsonl key; auto: val/acc with a validation split, else test/acc
    best_mode: str = "auto"  # max, min, or auto (losses and NC measures shrink, accuracies and cosines grow)
    background: bool = True  # write epoch checkpoints in a thread while the next epoch trains (still atomic)


@dataclass
class CollapseConfig:
    every: int = 1  # epochs between measurements; 0 turns measurement off
    mode: CollapseMode = CollapseMode.exact
    splits: List[str] = field(default_factory=lambda: ["train", "test"])
    max_samples: Optional[int] = None
    layers: List[int] = field(default_factory=list)  # backbone stages for deep collapse
    thresholds: Dict[str, float] = field(
        default_factory=lambda: {"nc1": 0.1, "nc2_etf_error": 0.2, "nc3": 0.1, "nc4": 0.01, "proto_cos": 0.9}
    )
    plot: bool = True


@dataclass
class LoggerConfig:
    name: str = "none"  # none or wandb
    project: str = "fixedcls"
    entity: Optional[str] = None
    group: Optional[str] = None  # None: the experiment or sweep name
    job_type: str = "train"
    tags: List[str] = field(default_factory=list)
    mode: str = "online"  # online, offline, disabled (WANDB_MODE wins)
    dir: Optional[str] = None


@dataclass
class GenerationsConfig:
    """Model generations trained in sequence by `fixedcls-compat train` (CoReS / CL2R); fixedcls-train ignores it."""

    tasks: List[List[int]] = field(default_factory=list)  # the classes each generation adds
    protocol: str = "cumulative"  # cumulative: from scratch on all classes so far; finetune: from the previous model
    backbones: Optional[List[str]] = None  # one per generation; None = model.backbone for all
    query: str = "test"  # split embedded by the newer model of each pair
    gallery: str = "train"  # split embedded by the older model


@dataclass
class Config:
    head: HeadConfig = field(default_factory=HeadConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    collapse: CollapseConfig = field(default_factory=CollapseConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    name: str = "${data.name}-${model.backbone}-${head.name}-s${seed}"
    resume: Optional[str] = None  # a checkpoint path, or auto
    experiment: Optional[str] = None  # set by experiment presets; the W&B group by default
    generations: GenerationsConfig = field(default_factory=GenerationsConfig)  # fixedcls-compat train


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)


def conf_dir() -> Path:
    """The folder of the Hydra configs (`conf/` of the repository)."""
    return Path(__file__).resolve().parents[1] / "conf"
