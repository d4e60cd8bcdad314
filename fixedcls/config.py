"""Structured configs: the schema every Hydra config of fixedcls is validated against.

The YAML files under ``conf/`` only set values; these dataclasses say which keys exist and
what type each has, so a mistyped key or a wrong-typed value fails when the run starts,
not an hour into it.

Each field that has a valid range declares it beside its default (``checked(default, rule)``), and
`validate_config` checks every one of them, plus the few rules that join several fields, before
anything is built: a value out of range is one `FixedclsError` line naming the key, the value,
the valid range and a value that works.  `fixedcls-train` also checks each command-line value
against its field's range before Hydra starts (`value_problem`).

Choices made here, for the rules that are not plain ranges:

* ``data.in_chans`` of an image folder: files are converted on reading to the configured channels,
  ``L`` (PIL's luminance) for 1 and ``RGB`` for 3, so an RGB folder trains a 1-channel model and a
  grey folder a 3-channel one; other counts have no PIL mode and are refused. CIFAR images always
  have 3 channels.
* ``data=synthetic`` holds its images in memory (float32): a config whose images would take more than
  ``fixedcls.data.SYNTHETIC_MAX_GIB`` GiB is refused with the size it would allocate.
* ``model.backbone``: a timm registry name, ``hf-hub:<repo id>`` or ``local-dir:<folder with config.json>``.
* ``checkpoint.root`` / ``checkpoint.dir``: ``~`` is expanded, and the folder must be creatable and
  writable when the run starts (checked with a probe file), or the run would end with no checkpoint.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import re
import typing
from dataclasses import MISSING, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from .errors import FixedclsError

RULE = "fixedcls_rule"  # the key of a field's range in dataclasses.field(metadata=...)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(float(value))


@dataclass(frozen=True)
class Range:
    """Finite numbers between two bounds (None: unbounded); an open bound is excluded."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def allows(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.integer and not float(value).is_integer():
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.low is not None and self.high is not None:
            return (f"{kind} in {'(' if self.low_open else '['}{_number(self.low)}, "
                    f"{_number(self.high)}{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {_number(self.low)}"
        if self.high is not None:
            return f"{kind} {'<' if self.high_open else '<='} {_number(self.high)}"
        return kind


@dataclass(frozen=True)
class OneOf:
    choices: tuple

    def allows(self, value: Any) -> bool:
        return value in self.choices

    def __str__(self) -> str:
        return f"one of {', '.join(map(str, self.choices))}"


@dataclass(frozen=True)
class Each:
    """Every entry of a list (or every value of a mapping) follows `rule`."""

    rule: Any
    container: str = "list"  # or "mapping": then the rule is on the values

    def allows(self, value: Any) -> bool:
        if self.container == "mapping":
            return isinstance(value, dict) and all(self.rule.allows(entry) for entry in value.values())
        return isinstance(value, (list, tuple)) and all(self.rule.allows(entry) for entry in value)

    def __str__(self) -> str:
        return f"a {self.container} whose every {'value' if self.container == 'mapping' else 'entry'} is {self.rule}"


@dataclass(frozen=True)
class DataSource:
    """A folder that exists on this machine, or a conf/data preset name followed by key=value data items
    (one string, split on spaces): what `collapse.ood` names as out-of-distribution data."""

    def allows(self, value: Any) -> bool:
        if not isinstance(value, str) or not value.strip():
            return False
        if Path(value).expanduser().is_dir():
            return True
        first, *rest = value.split()
        return (conf_dir() / "data" / f"{first}.yaml").is_file() and all("=" in item for item in rest)

    def __str__(self) -> str:
        presets = ", ".join(sorted(p.stem for p in (conf_dir() / "data").glob("*.yaml")))
        return f"an existing folder of images or a data preset ({presets}) with optional key=value items"


def integer(low: Optional[int] = None, high: Optional[int] = None) -> Range:
    return Range(low, high, integer=True)


def real(low: Optional[float] = None, high: Optional[float] = None, *, above: Optional[float] = None,
         below: Optional[float] = None) -> Range:
    """[low, high]; `above` / `below` give an open bound instead."""
    return Range(low if above is None else above, high if below is None else below,
                 low_open=above is not None, high_open=below is not None)


def one_of(*choices: str) -> OneOf:
    return OneOf(tuple(choices))


def checked(default: Any, rule: Any, *, why: str = "") -> Any:
    """A dataclass field whose value must satisfy `rule` (None is always allowed for Optional fields);
    `why` says in a few words what the range protects. A list or dict default is copied for each instance."""
    metadata = {RULE: rule, "why": why}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# numpy's seed range; torch and random take it too.
SEED = integer(0, 2**32 - 1)
FRACTION_BELOW_ONE = real(0, below=1)  # [0, 1): probabilities, decays, momentum


def conf_dir() -> Path:
    """The folder of fixedcls's Hydra configs (config.yaml and the groups head/, data/, ...).

    An installed wheel carries them as package data in fixedcls/conf/ (pyproject.toml maps the repository's
    top-level conf/ there); an editable install or a plain checkout on PYTHONPATH reads the repository's conf/.
    """
    package = Path(__file__).resolve().parent
    packaged = package / "conf"
    return packaged if (packaged / "config.yaml").is_file() else package.parent / "conf"


def backbone_tag(backbone: str) -> str:
    """The part of a model.backbone that names a run: ``local-dir:/models/vit_s`` -> ``vit_s``,
    ``hf-hub:timm/vit_small_patch16_224.augreg_in21k`` -> ``vit_small_patch16_224.augreg_in21k``.

    A ``/`` in a run name would nest its checkpoint folder one level deeper than ``resume=auto`` looks,
    and a ``:`` is not allowed in a Windows path.
    """
    tail = str(backbone).rstrip("/\\").replace("\\", "/")
    return tail.rsplit("/", 1)[-1].rsplit(":", 1)[-1] or "backbone"


# ${fixedcls.tag:${model.backbone}} in the default run name (Config.name); registered on import, before Hydra composes.
OmegaConf.register_new_resolver("fixedcls.tag", backbone_tag, replace=True)

_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


def safe_name(name: str, limit: int = 96) -> str:
    """A run name as ONE path component, the one rule for every folder named after a run (the Hydra run folder,
    the checkpoint folder) and for the W&B run name: `/`, `\\`, `:`, control characters and every other character
    but letters, digits and `._=+-` become `_`, leading dots go (so `..` cannot climb out of its root), long names
    are cut.  `hf-hub:timm/vit` -> `hf-hub_timm_vit`; `../../escape` -> `_.._escape`."""
    text = _UNSAFE.sub("_", str(name)).lstrip(".")
    text = text[:limit].rstrip(".") or "run"
    return text


# ${fixedcls.safe:${name}} in hydra.run.dir (conf/config.yaml): the run folder stays under outputs/ whatever the name.
OmegaConf.register_new_resolver("fixedcls.safe", safe_name, replace=True)


def validation_share(val_split: Optional[str], share: float) -> float:
    """data.val_fraction of a data set that may have a validation folder (conf/data/imagefolder.yaml):
    `share` of the training split, or 0 when data.val_split names the folder, so that a named folder wins
    and a run that reads one keeps the identity it had before the carve-out became the default."""
    return 0.0 if val_split else float(share)


OmegaConf.register_new_resolver("fixedcls.val_share", validation_share, replace=True)


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


class ImbalanceType(str, Enum):
    none = "none"
    exp = "exp"  # n_i = int(n_max * ratio^(-i/(K-1))), the long-tailed CIFAR profile (Cao et al., 2019)
    step = "step"  # the last step_fraction of the classes have n_max / ratio samples, the others n_max


@dataclass
class HeadConfig:
    name: str = "simplex"  # learned, cosine, or a polytope: simplex, dcube, orthoplex, hadamard, etf
    normalize: Normalize = Normalize.none  # feature normalisation before a fixed head
    scale: Optional[float] = checked(None, real(above=0))  # logit scale s; None means 1 (or learned, see learn_scale)
    learn_scale: bool = False
    bias: Optional[bool] = None  # None: on for the learned head, off for cosine and fixed heads
    seed: int = checked(0, SEED)  # seeds the random orthonormal map of `etf`
    num_prototypes: Optional[int] = checked(None, integer(2))  # reserve prototypes for classes added later
    feature_bn: bool = False  # BatchNorm1d on the features before the head (Yang et al. 2022 put one before the ETF)


@dataclass
class ModelConfig:
    backbone: str = "resnet18"  # any timm model name (checked by fixedcls.model.check_backbone)
    dim: Optional[int] = checked(None, integer(1))  # feature dimension d; None = natural dimension of the head
    pretrained: bool = False
    drop_rate: float = checked(0.0, FRACTION_BELOW_ONE)
    init_from: Optional[str] = None  # a checkpoint whose model weights are loaded before training (fine-tuning)
    # pretrained backbone weights on disk: a .safetensors/.pth/.bin file or a folder saved by timm's save_for_hf
    # (its config.json's preprocessing is used too); loaded into the backbone only; implies pretrained weights
    pretrained_file: Optional[str] = None
    drop_path_rate: float = checked(0.0, FRACTION_BELOW_ONE, why="stochastic depth: the chance a residual block is dropped")


@dataclass
class ImbalanceConfig:
    """A long-tailed training split (fixedcls/imbalance.py); validation and test stay balanced."""

    type: ImbalanceType = ImbalanceType.none
    ratio: float = checked(100.0, real(1), why="the largest class count over the smallest")
    step_fraction: float = checked(0.5, real(above=0, below=1), why="the share of minority classes of type=step")
    # Class groups by training count, for acc_many/medium/few and the minority measures; None: scaled to the
    # counts (docs/config.md). A class with at least many_min samples is many-shot, with at most few_max few-shot.
    many_min: Optional[int] = checked(None, integer(1))
    few_max: Optional[int] = checked(None, integer(0))


@dataclass
class DataConfig:
    name: str = "digits"  # digits, synthetic, cifar10, cifar100, imagefolder
    root: Optional[str] = None
    download: bool = False
    num_classes: Optional[int] = checked(None, integer(2))  # None = what the dataset has
    img_size: Optional[int] = checked(32, integer(1))  # null: the backbone's own input size (its data config)
    in_chans: int = checked(3, integer(1))  # image folders: 1 (files read as L) or 3 (RGB)
    batch_size: int = checked(64, integer(2), why="BatchNorm cannot train on a batch of one sample")
    eval_batch_size: int = checked(256, integer(1))
    num_workers: int = checked(0, integer(0))
    augment: bool = True
    # held-out test share, split with split_seed (digits needs one; image folders: 0 = their test folder)
    test_fraction: float = checked(0.2, real(0, below=1))
    split_seed: int = checked(0, SEED)
    train_split: str = "train"
    test_split: str = "validation"
    # validation share carved out of the training split (stratified, split_seed); 0: none. Every preset sets
    # 0.1 (imagefolder: unless val_split names a folder); 0 here is what checkpoints written before it read as
    val_fraction: float = checked(0.0, real(0, below=1))
    val_split: Optional[str] = None  # image folders: the folder of the validation split (e.g. val); None: none
    # synthetic data
    train_per_class: int = checked(64, integer(1))
    test_per_class: int = checked(16, integer(1))
    noise: float = checked(0.5, real(0))
    mean: Optional[List[float]] = checked(None, Each(real()))  # one per channel, or one for all
    std: Optional[List[float]] = checked(None, Each(real(above=0)))
    # class-incremental training: label ids are kept, so class c is always head output c
    classes: Optional[List[int]] = checked(None, Each(integer(0)))  # train and test on these classes only; None = all
    # earlier classes: in the test split, and `rehearsal` train samples each
    old_classes: Optional[List[int]] = checked(None, Each(integer(0)))
    rehearsal: int = checked(0, integer(0))  # training samples kept per old class (a memory drawn with split_seed)
    # preprocessing of image files; None: the pretrained model's data config (model.pretrained), else timm's default
    interpolation: Optional[str] = checked(None, one_of("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming"))
    crop_pct: Optional[float] = checked(None, real(above=0, high=1), why="the centre crop's share of the resized image")
    # timm augmentation of image files (data=imagefolder, cifar10, cifar100)
    auto_augment: Optional[str] = None  # timm's policy strings: rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, v0, original
    re_prob: float = checked(0.0, real(0, 1), why="random erasing: the chance a training image gets an erased box")
    # batch mixing (timm Mixup): alpha of the Beta distribution of mixup / cutmix; 0 turns each off
    mixup: float = checked(0.0, real(0))
    cutmix: float = checked(0.0, real(0))
    mix_prob: float = checked(1.0, real(0, 1), why="the chance a batch is mixed at all")
    mix_switch_prob: float = checked(0.5, real(0, 1), why="with both on: the chance of cutmix instead of mixup")
    imbalance: ImbalanceConfig = field(default_factory=ImbalanceConfig)  # long-tailed training split


@dataclass
class OptimConfig:
    name: str = "sgd"  # any timm optimizer name
    lr: float = checked(0.05, real(0))
    weight_decay: float = checked(5e-4, real(0))
    momentum: float = checked(0.9, FRACTION_BELOW_ONE)
    # layer-wise learning-rate decay: lr x layer_decay^(depth from the top); None = off (timm create_optimizer_v2)
    layer_decay: Optional[float] = checked(None, real(above=0, high=1), why="1 keeps every layer's lr, 0 would freeze all")
    kwargs: Dict[str, Any] = field(default_factory=dict)  # more keywords for timm's create_optimizer_v2 (betas, eps, ...)


@dataclass
class SchedConfig:
    name: str = "cosine"  # any timm scheduler name (cosine, step, ...), or none
    warmup_epochs: int = checked(0, integer(0))
    warmup_lr: float = checked(1e-5, real(0))
    min_lr: float = checked(0.0, real(0))
    decay_epochs: float = checked(30.0, real(above=0))
    decay_rate: float = checked(0.1, real(above=0), why="the step factor, or the power of sched=poly")
    # sched=multistep: the epochs (counted from 1, as the log does) from which the rate is multiplied by decay_rate
    # once more (timm's decay_milestones); None: timm's (90, 180, 270)
    decay_milestones: Optional[List[int]] = checked(None, Each(integer(1)))


@dataclass
class TrainerConfig:
    epochs: int = checked(30, integer(1))
    precision: Precision = Precision.fp32
    device: Device = Device.auto
    loss: str = "ce"  # ce or dot_regression
    label_smoothing: float = checked(0.0, FRACTION_BELOW_ONE, why="1 would make every target uniform")
    grad_accum: int = checked(1, integer(1), why="batches whose gradients add up to one optimizer step")
    clip_grad: Optional[float] = checked(None, real(above=0))  # max gradient norm; None: no clipping
    ema: bool = False
    ema_decay: float = checked(0.998, FRACTION_BELOW_ONE)
    channels_last: bool = False
    compile: bool = False
    max_nonfinite: int = checked(5, integer(1), why="skipped non-finite steps in a row before the run stops")
    progress: Optional[bool] = None  # None: a progress bar only on a terminal
    threads: Optional[int] = checked(None, integer(1))  # None: torch's default
    distill_weight: float = checked(0.0, real(0))  # feature distillation from the frozen old model (CL2R)
    # cosine (1 - cos) or l2 (squared distance) between new and old features, weighted by distill_weight; or hoc:
    # the HOC loss (Biondi et al., CVPR 2024), lambda CE + (1 - lambda) HOC whenever there is an old model
    distill_loss: str = checked("cosine", one_of("cosine", "l2", "hoc"))
    hoc_mu: float = checked(10.0, real(above=0), why="mu, the scale of the feature similarities of HOC")
    hoc_lambda: float = checked(0.1, real(0, 1), why="loss = lambda CE + (1 - lambda) HOC; 1 turns HOC off")
    # BCT (Shen et al., CVPR 2020): + bct_weight x CE of the new features through the old model's frozen classifier
    bct_weight: float = checked(0.0, real(0), why="the weight of the BCT term; 0 turns it off")
    old_model: Optional[str] = None  # checkpoint of the frozen old model (distillation, HOC, BCT); None: model.init_from
    # epochs that train only the projection and head (the fixed head's projection), the backbone held still
    freeze_backbone_epochs: int = checked(0, integer(0))
    # Logit adjustment (Menon et al., ICLR 2021): cross-entropy on logits + tau * log(training class prior); 0: off
    logit_adjust: float = checked(0.0, real(0), why="tau, the weight of the log prior (1 in the paper)")
    # Dot regression (trainer.loss=dot_regression, Yang et al. 2022): the target length of each feature, `feature`
    # (its own detached length, the authors' code) or `fixed` (head.scale, on L2-normalised features)
    dr_length: str = checked("feature", one_of("feature", "fixed"))
    dr_reg: float = checked(0.0, real(0), why="reg_lam, the weight of the mean feature length")
    # prototype lengths sqrt(gamma / n_c) from each batch's class counts (the authors' GivenEw), or none
    dr_balance: str = checked("none", one_of("none", "batch"))


@dataclass
class CheckpointConfig:
    root: str = "checkpoints"  # ~ is expanded
    dir: Optional[str] = None  # None: <root>/<run name>
    # per-epoch checkpoints kept besides last.pt and best.pt
    keep: int = checked(2, integer(1), why="last.pt is a link to the newest epoch file, so one is always kept")
    best_metric: str = "auto"  # a metrics.jsonl key; auto: val/acc with a validation split, else test/acc
    # max, min, or auto (losses and NC measures shrink, accuracies and cosines grow)
    best_mode: str = checked("auto", one_of("auto", "max", "min"))
    background: bool = True  # write epoch checkpoints in a thread while the next epoch trains (still atomic)
    # epoch checkpoints after every N-th epoch and the last (a stop signal always writes last.pt); best.pt is
    # the best of the written epochs
    every: int = checked(1, integer(1), why="epochs between epoch checkpoints (the last epoch is always written)")


@dataclass
class AgopConfig:
    """Per-stage AGOP and Neural Feature Ansatz measures during training (docs/agop.md); off while layers is empty."""

    layers: List[str] = field(default_factory=list)  # timm stages: indices (0 = stem, 1..4 for a ResNet), names, or all
    every: int = checked(1, integer(1), why="epochs between measurements (the last epoch is always measured)")
    samples: int = checked(512, integer(2), why="a fixed, seeded subset of the training split")
    # Rademacher probes per sample; null = exact (min(K, d) backward passes per batch)
    probes: Optional[int] = checked(1, integer(1), why="probes per sample, or null for the exact AGOP")


@dataclass
class CollapseConfig:
    every: int = checked(1, integer(0))  # epochs between measurements; 0 turns measurement off
    mode: CollapseMode = CollapseMode.exact
    splits: List[str] = checked(["train", "test"], Each(one_of("train", "test")))
    max_samples: Optional[int] = checked(None, integer(1))
    # exact mode: the features of a split are kept for the second statistics pass while they fit this many MB
    # (one forward pass instead of two; the test split's comes from its evaluation); 0 streams twice
    cache_mb: float = checked(256.0, real(0), why="megabytes of features kept per split; 0 turns the cache off")
    layers: List[int] = field(default_factory=list)  # backbone stages for deep collapse (negative: from the end)
    thresholds: Dict[str, float] = checked(
        {"nc1": 0.1, "nc2_etf_error": 0.2, "nc3": 0.1, "nc4": 0.01, "proto_cos": 0.9}, Each(real(), "mapping")
    )
    plot: bool = True
    agop: AgopConfig = field(default_factory=AgopConfig)
    # out-of-distribution data measured at the end of each measured epoch (nc5): a folder of images, or a data
    # preset with optional key=value items applied to the run's data (its test split), e.g. "synthetic split_seed=1"
    ood: Optional[str] = checked(None, DataSource(), why="the OOD data of nc5")


@dataclass
class LoggerConfig:
    name: str = "none"  # none, wandb, tensorboard or csv (conf/logger/)
    project: str = "fixedcls"
    entity: Optional[str] = None
    group: Optional[str] = None  # None: the preset and its launch (sweep id or time), else the sweep, else the run
    job_type: str = "train"
    tags: List[str] = field(default_factory=list)
    mode: str = "online"  # online, offline, disabled (WANDB_MODE wins)
    dir: Optional[str] = None
    # Every tracker chosen: conf/logger/<name>.yaml sets use.<name>, so logger=[wandb,tensorboard] turns on both
    # (`name` is then the last one).
    use: Dict[str, bool] = field(default_factory=dict)
    log_model: str = checked("false", one_of("false", "False", "best", "all"),
                             why="W&B model artifacts: none, best.pt at the end, or every epoch checkpoint")
    tensorboard_dir: Optional[str] = None  # None: <run dir>/tensorboard


@dataclass
class GenerationsConfig:
    """Model generations trained in sequence by `fixedcls-compat train` (CoReS / CL2R); fixedcls-train ignores it."""

    tasks: List[List[int]] = checked([], Each(Each(integer(0))))  # the classes each generation adds
    protocol: str = "cumulative"  # cumulative: from scratch on all classes so far; finetune: from the previous model
    backbones: Optional[List[str]] = None  # one per generation; None = model.backbone for all
    query: str = "test"  # split embedded by the newer model of each pair
    gallery: str = "train"  # split embedded by the older model
    # instead of tasks: the K classes in this many equal tasks (CoReS), the last takes the rest
    num_tasks: Optional[int] = checked(None, integer(2), why="compatibility needs two models")
    # num_tasks: None keeps classes 0..K-1 in order (the authors' code); a seed shuffles them
    class_order_seed: Optional[int] = checked(None, integer(0, 2**32 - 1))
    checkpoint: str = "last"  # the checkpoint of each generation that is measured (and fine-tuned from): last or best
    metric: str = "retrieval"  # retrieval (top-1, mAP) or verification (also the CoReS / CL2R pair verification)
    pairs: int = checked(6000, integer(2), why="verification pairs, half of the same class")
    folds: int = checked(10, integer(2), why="verification folds: a threshold chosen on all but one")
    eval_data: List[str] = field(default_factory=list)  # evaluation data: conf/data preset and/or key=value items
    # IAM-CL2R model replacement (protocol=finetune): these generations (counting from 1) start from an independently
    # trained model instead of the previous generation's, then train on their task like any other
    replace: List[int] = checked([], Each(integer(2)), why="generation 1 has no earlier model to replace: start it "
                                 "from a checkpoint with model.init_from")
    # one checkpoint per replaced generation (any backbone, the same head and prototypes); [] trains each
    # replacement from scratch on all classes seen so far
    replace_with: List[str] = field(default_factory=list)
    # the old model of a replaced generation's HOC / BCT / distillation: the previous generation, or the
    # replacement itself (what the authors' iamcl2r code does)
    replace_old_model: str = checked("previous", one_of("previous", "replacement"))


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
    seed: int = checked(0, SEED)
    name: str = "${data.name}-${fixedcls.tag:${model.backbone}}-${head.name}-s${seed}"
    resume: Optional[str] = None  # a checkpoint path, or auto
    experiment: Optional[str] = None  # set by experiment presets; the W&B group by default
    generations: GenerationsConfig = field(default_factory=GenerationsConfig)  # fixedcls-compat train
    # The summary key a sweep's job returns (Optuna optimises it); None: best/val/acc when the run has a
    # validation split, else best/test/acc.
    optimized_metric: Optional[str] = None


def uses_old_model(trainer) -> bool:
    """Whether a trainer section trains against a frozen old model: feature distillation (distill_weight > 0),
    HOC (distill_loss=hoc with hoc_lambda < 1) or BCT (bct_weight > 0)."""
    hoc = str(trainer.distill_loss) == "hoc" and float(trainer.hoc_lambda) < 1.0
    return bool(float(trainer.distill_weight or 0.0) > 0 or hoc or float(trainer.get("bct_weight") or 0.0) > 0)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)


# ------------------------------------------------------------------ validation


def checked_fields(schema: type = Config, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every field with a declared range, by dotted key (e.g. "trainer.grad_accum")."""
    found: dict[str, dataclasses.Field] = {}
    hints = typing.get_type_hints(schema)
    for each in dataclasses.fields(schema):
        key = f"{prefix}{each.name}"
        if dataclasses.is_dataclass(hints[each.name]):
            found.update(checked_fields(hints[each.name], key + "."))
        elif each.metadata.get(RULE) is not None:
            found[key] = each
    return found


@functools.lru_cache(maxsize=None)
def _checked_fields_of_config() -> dict[str, dataclasses.Field]:
    return checked_fields(Config)


def _as_override(value: Any) -> str:
    """A value written as on the command line (lists in brackets, no quotes)."""
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, float):
        return _number(value) if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_as_override(entry) for entry in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_as_override(v)}" for k, v in value.items()) + "}"
    return "null" if value is None else str(value)


def _default(each: dataclasses.Field) -> Any:
    return each.default_factory() if each.default_factory is not MISSING else each.default


def value_problem(key: str, value: Any) -> Optional[str]:
    """One line saying why `value` does not fit the declared range of `key`, or None when it fits (or has none)."""
    from omegaconf import Container, OmegaConf

    each = _checked_fields_of_config().get(key)
    if each is None:
        return None
    if isinstance(value, Container):
        value = OmegaConf.to_container(value, resolve=True)
    if value is None:  # null is only accepted for Optional keys, which the schema already enforces
        return None
    rule = each.metadata[RULE]
    if rule.allows(value):
        return None
    default = _default(each)
    if isinstance(rule, Each) and rule.container == "mapping" and isinstance(value, dict):
        # Name the one bad entry: the whole mapping would bury it.
        name, entry = next((k, v) for k, v in value.items() if not rule.rule.allows(v))
        fix = (f"e.g. {key}.{name}={_as_override(default[name])} (the default)" if name in default
               else f"set one, or drop {key}.{name}")
        return f"{key}.{name}={_as_override(entry)} is out of range: it must be {rule.rule}; {fix}"
    why = f" ({each.metadata['why']})" if each.metadata.get("why") else ""
    if isinstance(rule, Each) and isinstance(value, (list, tuple)):
        why += f" (not: {', '.join(_as_override(entry) for entry in value if not rule.rule.allows(entry))})"
    fix = (f"leave it unset (the default) or give {rule}" if default is None
           else f"e.g. {key}={_as_override(default)} (the default)")
    verdict = "is out of range" if isinstance(rule, Range) else "is not valid"
    return f"{key}={_as_override(value)} {verdict}: {key} must be {rule}{why}; {fix}"


def validate_config(cfg) -> None:
    """Refuse a config before anything runs: every declared range, then the rules that join several keys.

    Raises a one-line FixedclsError naming the key, the value, the valid range and the fix.
    """
    from omegaconf import OmegaConf

    from .data.datasets import check_data_config
    from .models.classifier import check_backbone

    for key in _checked_fields_of_config():
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=False)
        except Exception:  # an interpolation that does not resolve: Hydra/OmegaConf report it when it is used
            continue
        problem = value_problem(key, value)
        if problem is not None:
            raise FixedclsError(problem)
    check_data_config(cfg.data)
    check_backbone(cfg.model.backbone)
