"""Datasets and loaders: bundled digits, synthetic classes, CIFAR and image folders through timm.

Every training sample's augmentation is seeded from (seed, epoch, index) and every epoch's order
from (seed, epoch), so a run resumed in the middle of an epoch sees exactly the batches and the
augmented images that an uninterrupted run would have seen, whatever the number of workers.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import FixedclsError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# The PIL mode an image file is converted to for each data.in_chans (an RGB folder can train a 1-channel model).
IMAGE_MODES = {1: "L", 3: "RGB"}
# Synthetic images live in memory as float32 (and the draw briefly needs about twice that): a larger config is
# a typo (data.num_classes=200000), not a benchmark, so it is refused before the allocation.
SYNTHETIC_MAX_GIB = 8


@dataclass
class DataBundle:
    """The three views of one dataset a run needs, and what the model must know about it."""

    train: Dataset  # augmented, order and augmentation seeded per epoch
    train_eval: Dataset  # same samples, evaluation transform (collapse is measured on these)
    test: Dataset
    num_classes: int
    in_chans: int
    img_size: int
    class_names: Sequence[str]
    # How one image file becomes a model input, exactly as the evaluation views do it (`preprocessing_spec`);
    # stored in checkpoints so a trained model can be used without its data.
    preprocessing: Optional[dict] = None


# A split a command can name -> the DataBundle view that evaluates it (the training split without augmentation).
SPLIT_VIEWS = {"train": "train_eval", "test": "test", "val": "val"}


def evaluation_split(bundle: DataBundle, split: str) -> Dataset:
    """The samples of a named split, as evaluation sees them; a missing or empty split is a one-line error."""
    dataset = getattr(bundle, SPLIT_VIEWS.get(split, ""), None)
    if dataset is None or len(dataset) == 0:
        present = [name for name, view in SPLIT_VIEWS.items() if getattr(bundle, view, None) is not None]
        raise FixedclsError(f"this data has no {split} samples: choose a split it has ({', '.join(present)})")
    return dataset


class TensorImages(Dataset):
    """Images held as one float tensor [N, C, H, W] with integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Optional[Callable] = None):
        self.images, self.labels, self.transform = images, labels, transform
        self.targets = labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


class SeededAugmentation(Dataset):
    """Applies a random transform whose randomness depends only on (seed, epoch, index).

    torchvision and timm transforms draw from the global torch and Python RNGs; we fork both
    around each sample so the transform is reproducible and the caller's RNG state is untouched.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample_seed = hash((self.seed, self.epoch, int(index))) & 0x7FFF_FFFF_FFFF_FFFF
        python_state = random.getstate()
        random.seed(sample_seed)
        try:
            with torch.random.fork_rng(devices=[]):
                # The CPU generator only (what the transforms draw from): torch.manual_seed would also queue a
                # lazy reseed of every CUDA/XPU/MTIA generator per sample (a stack capture each, ~15% of a CPU
                # epoch) and, with CUDA up, reseed the GPU generators that fork_rng(devices=[]) does not restore.
                torch.default_generator.manual_seed(sample_seed)
                return self.dataset[index]
        finally:
            random.setstate(python_state)

    @property
    def targets(self):
        return targets_of(self.dataset)


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, sharded across processes, that can start mid-epoch.

    Like torch's DistributedSampler (pads to equal shards so every rank runs the same number of
    steps), plus `start`: the number of this rank's samples already consumed, for exact resume.
    """

    def __init__(self, length: int, *, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 batch_size: Optional[int] = None):
        self.length, self.shuffle, self.seed = length, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0
        # Training pads shards to equal length (every rank must run the same number of steps);
        # evaluation shards are disjoint and unpadded so each sample is measured exactly once.
        self.pad = shuffle
        self.num_samples = math.ceil(length / world_size) if self.pad else len(range(rank, length, world_size))
        # A training batch of one sample stops BatchNorm ("Expected more than 1 value per channel"): that
        # epoch's last sample is left out instead (a new permutation every epoch, so never the same one).
        if self.pad and batch_size and self.num_samples > 1 and self.num_samples % batch_size == 1:
            self.num_samples -= 1

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def epoch_indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        if self.pad:
            total = self.num_samples * self.world_size
            order = (order + order[: max(0, total - self.length)])[:total]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


def targets_of(dataset: Dataset) -> list[int]:
    """Labels of a dataset without decoding its images."""
    for attr in ("targets", "labels"):
        if hasattr(dataset, attr):
            values = getattr(dataset, attr)
            return values.tolist() if torch.is_tensor(values) else list(values)
    reader = getattr(dataset, "reader", None)  # timm ImageDataset
    if reader is not None and hasattr(reader, "samples"):
        return [int(target) for _, target in reader.samples]
    if hasattr(dataset, "dataset") and hasattr(dataset, "indices"):  # torch Subset
        parent = targets_of(dataset.dataset)
        return [parent[i] for i in dataset.indices]
    return [int(dataset[i][1]) for i in range(len(dataset))]


def _normalize(mean: Sequence[float], std: Sequence[float]) -> Callable:
    mean_t = torch.tensor(mean).view(-1, 1, 1)
    std_t = torch.tensor(std).view(-1, 1, 1)
    return lambda image: (image - mean_t) / std_t


def _random_shift(pad: int) -> Callable:
    """Random translation by up to `pad` pixels (zero padding): cheap augmentation for tiny images."""

    def shift(image: torch.Tensor) -> torch.Tensor:
        size = image.shape[-1]
        padded = F.pad(image, (pad, pad, pad, pad))
        top, left = torch.randint(0, 2 * pad + 1, (2,)).tolist()
        return padded[..., top : top + size, left : left + size]

    return shift


def _compose(*fns: Callable) -> Callable:
    def apply(image):
        for fn in fns:
            image = fn(image)
        return image

    return apply


def preprocessing_spec(*, in_chans: int, img_size: int, mean: Sequence[float], std: Sequence[float],
                       crop_pct: Optional[float] = None) -> dict:
    """The evaluation transform as plain values, in the keys of timm's data config (so a timm export can carry
    it): resize the shorter side to img_size / crop_pct, centre-crop img_size, scale to [0, 1], normalise.

    Images up to 64 pixels are not cropped (crop_pct 1.0): timm's ImageNet crop would throw most of them away.
    `image_mode` is the PIL mode a file is converted to first (None: the channels have no image mode).
    """
    if crop_pct is None:
        from timm.data import DEFAULT_CROP_PCT

        crop_pct = 1.0 if img_size <= 64 else DEFAULT_CROP_PCT
    channels = int(in_chans)
    return {
        "input_size": [channels, int(img_size), int(img_size)],
        "interpolation": "bilinear",
        "crop_pct": float(crop_pct),
        "crop_mode": "center",
        "mean": [float(v) for v in (list(mean) * channels if len(mean) == 1 else mean)],
        "std": [float(v) for v in (list(std) * channels if len(std) == 1 else std)],
        "image_mode": IMAGE_MODES.get(channels),
    }


def eval_transform(spec: dict) -> Callable:
    """PIL image (already in spec["image_mode"]) -> normalised tensor: timm's evaluation transform of `spec`."""
    from timm.data import create_transform

    return create_transform(input_size=tuple(spec["input_size"]), is_training=False, interpolation=spec["interpolation"],
                            crop_pct=spec["crop_pct"], crop_mode=spec["crop_mode"], mean=tuple(spec["mean"]),
                            std=tuple(spec["std"]))


def _digits(cfg) -> DataBundle:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    images = F.interpolate(images, size=(cfg.img_size, cfg.img_size), mode="bilinear", align_corners=False)
    images = images.expand(-1, cfg.in_chans, -1, -1).contiguous()
    # A stratified split, fixed by split_seed, so every seed of a sweep sees the same test set.
    generator = torch.Generator().manual_seed(cfg.split_seed)
    train_idx, test_idx = [], []
    for c in range(10):
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_test = round(len(members) * cfg.test_fraction)
        if not 0 < n_test < len(members):  # an empty split: evaluation and collapse would measure nothing
            smallest = min(int((labels == k).sum()) for k in range(10))
            raise FixedclsError(
                f"data.test_fraction={cfg.test_fraction} leaves digit {c} ({len(members)} images) with "
                f"{n_test} test and {len(members) - n_test} training images: set data.test_fraction between "
                f"{math.ceil(1000 / smallest) / 1000} and {math.floor(1000 * (smallest - 1) / smallest) / 1000}"
            )
        test_idx.append(members[:n_test])
        train_idx.append(members[n_test:])
    train_idx, test_idx = torch.cat(train_idx).sort().values, torch.cat(test_idx).sort().values
    mean = cfg.mean or [float(images[train_idx].mean())] * cfg.in_chans
    std = cfg.std or [float(images[train_idx].std())] * cfg.in_chans
    normalize = _normalize(mean, std)
    train_tf = _compose(_random_shift(max(1, cfg.img_size // 16)), normalize) if cfg.augment else normalize
    return DataBundle(
        train=TensorImages(images[train_idx], labels[train_idx], train_tf),
        train_eval=TensorImages(images[train_idx], labels[train_idx], normalize),
        test=TensorImages(images[test_idx], labels[test_idx], normalize),
        num_classes=10, in_chans=cfg.in_chans, img_size=cfg.img_size,
        class_names=[str(c) for c in range(10)],
        # An image file of a digit: grey levels scaled to [0, 1] like the bundled 0..16 values divided by 16.
        preprocessing=preprocessing_spec(in_chans=cfg.in_chans, img_size=cfg.img_size, mean=mean, std=std),
    )


def synthetic_bytes(cfg) -> int:
    """What the images of `data=synthetic` with this config hold in memory (float32, train + test)."""
    per_image = 4 * cfg.in_chans * cfg.img_size * cfg.img_size
    return (cfg.num_classes or 10) * (cfg.train_per_class + cfg.test_per_class) * per_image


def check_data_config(cfg) -> None:
    """The rules of a `data` section that join several keys; no file is read (single-key ranges: config.py)."""
    if cfg.name == "synthetic" and synthetic_bytes(cfg) > SYNTHETIC_MAX_GIB * 2**30:
        raise FixedclsError(
            f"data=synthetic with data.num_classes={cfg.num_classes or 10} x ({cfg.train_per_class} train + "
            f"{cfg.test_per_class} test) images of {cfg.in_chans}x{cfg.img_size}x{cfg.img_size} would hold "
            f"{synthetic_bytes(cfg) / 2**30:.1f} GiB of float32 in memory, over the {SYNTHETIC_MAX_GIB} GiB cap: "
            f"lower data.num_classes, data.train_per_class, data.test_per_class or data.img_size"
        )
    if cfg.name == "imagefolder" and cfg.in_chans not in IMAGE_MODES:
        raise FixedclsError(
            f"data.in_chans={cfg.in_chans} for an image folder: files are read as "
            f"{' or '.join(f'{mode} (data.in_chans={n})' for n, mode in IMAGE_MODES.items())}: set one of those"
        )
    if cfg.name in ("cifar10", "cifar100") and cfg.in_chans != 3:
        raise FixedclsError(f"data.in_chans={cfg.in_chans} but {cfg.name} images have 3 channels: set data.in_chans=3")
    channels = 3 if cfg.name in ("cifar10", "cifar100") else cfg.in_chans
    for key in ("mean", "std"):
        values = cfg.get(key)
        if values is not None and len(values) not in (1, channels):
            raise FixedclsError(
                f"data.{key} has {len(values)} values but the images have {channels} channel(s): "
                f"give one value per channel ({channels}), or one for all"
            )


def _synthetic(cfg) -> DataBundle:
    num_classes = cfg.num_classes or 10
    if num_classes < 2:
        raise FixedclsError(f"data.num_classes={num_classes}: synthetic data needs at least 2 classes")
    generator = torch.Generator().manual_seed(cfg.split_seed)
    shape = (cfg.in_chans, cfg.img_size, cfg.img_size)
    # Smooth class templates (upsampled low-resolution noise) so convolutional models can separate them.
    low = max(2, cfg.img_size // 4)
    templates = torch.randn(num_classes, cfg.in_chans, low, low, generator=generator)
    templates = F.interpolate(templates, size=shape[1:], mode="bilinear", align_corners=False)

    def draw(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(num_classes).repeat_interleave(per_class)
        noise = torch.randn(len(labels), *shape, generator=generator) * cfg.noise
        return templates[labels] + noise, labels

    train_x, train_y = draw(cfg.train_per_class)
    test_x, test_y = draw(cfg.test_per_class)
    train_tf = _random_shift(max(1, cfg.img_size // 16)) if cfg.augment else None
    return DataBundle(
        train=TensorImages(train_x, train_y, train_tf),
        train_eval=TensorImages(train_x, train_y),
        test=TensorImages(test_x, test_y),
        num_classes=num_classes, in_chans=cfg.in_chans, img_size=cfg.img_size,
        class_names=[str(c) for c in range(num_classes)],
        preprocessing=preprocessing_spec(in_chans=cfg.in_chans, img_size=cfg.img_size, mean=[0.0], std=[1.0]),
    )


def _require_root(cfg) -> Path:
    if cfg.root in (None, "", "???"):
        raise FixedclsError(f"data={cfg.name} needs a dataset folder: set data.root=/path/to/{cfg.name}")
    root = Path(os.path.expanduser(str(cfg.root)))
    if not cfg.download and (not root.is_dir() or not any(root.iterdir())):
        what = "does not exist" if not root.exists() else ("is empty" if root.is_dir() else "is not a folder")
        hint = " (or data.download=true)" if cfg.name in ("cifar10", "cifar100") else ""
        raise FixedclsError(f"data.root={root} {what}: point data.root at the {cfg.name} folder{hint}")
    return root


def file_normalization(cfg, in_chans: int) -> tuple[tuple, tuple]:
    """(mean, std) of CIFAR and image folders: data.mean / data.std, else ImageNet's first in_chans values."""
    mean = tuple(cfg.mean) if cfg.mean else (0.485, 0.456, 0.406)[:in_chans] or (0.5,)
    std = tuple(cfg.std) if cfg.std else (0.229, 0.224, 0.225)[:in_chans] or (0.5,)
    return mean, std


def _timm_transforms(cfg, in_chans: int) -> tuple[Callable, Callable, dict]:
    """(train transform, evaluation transform, the evaluation transform's spec) of CIFAR and image folders."""
    from timm.data import create_transform

    mean, std = file_normalization(cfg, in_chans)
    spec = preprocessing_spec(in_chans=in_chans, img_size=cfg.img_size, mean=mean, std=std)
    eval_tf = eval_transform(spec)
    if not cfg.augment:
        return eval_tf, eval_tf, spec
    if cfg.img_size <= 64:  # CIFAR-sized images: timm's ImageNet crop policy would throw most of them away
        import torchvision.transforms as T

        # Resize first: an image folder's images need not already be img_size (a crop larger than the image fails).
        train_tf = T.Compose([T.Resize(cfg.img_size), T.RandomCrop(cfg.img_size, padding=cfg.img_size // 8),
                              T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
        return train_tf, eval_tf, spec
    train_tf = create_transform(is_training=True, input_size=(in_chans, cfg.img_size, cfg.img_size), mean=mean, std=std)
    return train_tf, eval_tf, spec


def _timm_dataset(cfg, name: str, split: str, transform, root: Path, class_map: Optional[dict] = None):
    from timm.data import create_dataset

    try:
        dataset = create_dataset(name, root=str(root), split=split, download=cfg.download, is_training=False,
                                 class_map=class_map)
    except Exception as error:  # timm/torchvision raise many types for a bad folder
        raise FixedclsError(f"cannot read {cfg.name} split '{split}' under data.root={root}: {error}".replace("\n", " ")) from error
    dataset.transform = transform
    return dataset


def _torchvision_cifar(cfg) -> DataBundle:
    root = _require_root(cfg)
    train_tf, eval_tf, spec = _timm_transforms(cfg, 3)
    name = f"torch/{cfg.name}"
    train = _timm_dataset(cfg, name, cfg.train_split, train_tf, root)
    train_eval = _timm_dataset(cfg, name, cfg.train_split, eval_tf, root)
    test = _timm_dataset(cfg, name, cfg.test_split, eval_tf, root)
    classes = list(getattr(train, "classes", []))
    num_classes = len(classes) or (10 if cfg.name == "cifar10" else 100)
    return DataBundle(train, train_eval, test, num_classes, 3, cfg.img_size, classes, preprocessing=spec)


def _imagefolder(cfg) -> DataBundle:
    root = _require_root(cfg)
    train_tf, eval_tf, spec = _timm_transforms(cfg, cfg.in_chans)
    train = _timm_dataset(cfg, "", cfg.train_split, train_tf, root)
    classes = sorted(train.reader.class_to_idx, key=train.reader.class_to_idx.get)
    if len(classes) < 2:
        raise FixedclsError(
            f"image folder {root} has {len(classes)} class folder(s) {classes}: a classifier needs at least 2 "
            f"(lay out <root>/<split>/<class>/<image>)"
        )
    train_eval = _timm_dataset(cfg, "", cfg.train_split, eval_tf, root)
    test = _timm_dataset(cfg, "", cfg.test_split, eval_tf, root)
    # The test split must use the train split's label ids: on its own it numbers only the folders it has.
    mapping = dict(train.reader.class_to_idx)
    extra = sorted(set(test.reader.class_to_idx) - set(mapping))
    if extra:
        raise FixedclsError(
            f"the '{cfg.test_split}' split of {root} has class folder(s) {extra} that the '{cfg.train_split}' split "
            f"lacks, so their labels fall outside the head's {len(classes)} outputs: add them to '{cfg.train_split}' "
            f"or remove them"
        )
    if any(mapping[name] != index for name, index in test.reader.class_to_idx.items()):
        test = _timm_dataset(cfg, "", cfg.test_split, eval_tf, root, class_map=mapping)
    train, train_eval, test = (ImageFiles(d, IMAGE_MODES[cfg.in_chans]) for d in (train, train_eval, test))
    return DataBundle(train, train_eval, test, len(classes), cfg.in_chans, cfg.img_size, classes, preprocessing=spec)


class ImageFiles(Dataset):
    """A timm ImageDataset whose unreadable images fail with an error naming the file, converted to `mode`."""

    def __init__(self, dataset, mode: str = "RGB"):
        self.dataset, self.mode = dataset, mode
        self.targets = [int(target) for _, target in dataset.reader.samples]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        # Decoded here, not by timm's ImageDataset.__getitem__: that one logs a warning and silently serves the
        # next file instead of an unreadable one, so a broken file would go unnoticed (and shift the data).
        from PIL import Image

        dataset = self.dataset
        path, target = dataset.reader.samples[index]
        try:
            with Image.open(path) as image:
                image = image.convert(self.mode)
        except Exception as error:
            raise FixedclsError(f"cannot read image {path}: {error} (remove or replace the file)".replace("\n", " ")) from error
        if dataset.transform is not None:
            image = dataset.transform(image)
        if getattr(dataset, "target_transform", None) is not None:
            target = dataset.target_transform(target)
        return image, target


BUILDERS: dict[str, Callable] = {
    "digits": _digits,
    "synthetic": _synthetic,
    "cifar10": _torchvision_cifar,
    "cifar100": _torchvision_cifar,
    "imagefolder": _imagefolder,
}


def create_data(cfg) -> DataBundle:
    """Build the datasets named by a `data` config section (see conf/data/)."""
    if cfg.name not in BUILDERS:
        raise FixedclsError(f"unknown dataset data.name='{cfg.name}': choose one of {', '.join(BUILDERS)}")
    check_data_config(cfg)
    bundle = BUILDERS[cfg.name](cfg)
    if cfg.num_classes is not None and cfg.num_classes != bundle.num_classes and cfg.name != "synthetic":
        raise FixedclsError(
            f"data.num_classes={cfg.num_classes} but {cfg.name} has {bundle.num_classes} classes: "
            f"drop data.num_classes or set it to {bundle.num_classes}"
        )
    return select_classes(bundle, cfg)


class LabelSubset(Dataset):
    """Some samples of a dataset, labels unchanged (class c stays class c, i.e. head output c)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], parent_targets: Optional[Sequence[int]] = None):
        self.dataset, self.indices = dataset, list(indices)
        parent = targets_of(dataset) if parent_targets is None else parent_targets
        self.targets = [int(parent[i]) for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]


def select_classes(bundle: DataBundle, cfg) -> DataBundle:
    """Class-incremental views (data.classes, data.old_classes, data.rehearsal) with the original label ids.

    train/train_eval: every sample of `classes` plus `rehearsal` samples per old class (drawn with split_seed);
    test: the samples of `classes` and `old_classes`. num_classes stays the dataset's, so the head keeps an
    output (a reserved prototype, for fixed heads) for every class of the whole protocol.
    """
    classes, old = getattr(cfg, "classes", None), getattr(cfg, "old_classes", None)
    rehearsal = int(getattr(cfg, "rehearsal", 0) or 0)
    if classes is None:
        if old is not None or rehearsal:
            raise FixedclsError("data.old_classes / data.rehearsal need data.classes (the classes of this step): set data.classes=[...]")
        return bundle
    K = bundle.num_classes
    classes, old = sorted({int(c) for c in classes}), sorted({int(c) for c in (old or [])})
    bad = [c for c in classes + old if not 0 <= c < K]
    if not classes or bad:
        raise FixedclsError(f"data.classes={classes} / data.old_classes={old}: {cfg.name} has classes 0..{K - 1} "
                            f"{'(got ' + str(bad) + ')' if bad else '(data.classes is empty)'}: list label ids in that range")
    if set(classes) & set(old):
        raise FixedclsError(f"classes {sorted(set(classes) & set(old))} are in both data.classes and data.old_classes: "
                            f"list each class once")
    if rehearsal < 0 or (rehearsal and not old):
        raise FixedclsError(f"data.rehearsal={rehearsal} needs data.old_classes (the earlier classes) and a count >= 0")
    train_targets = targets_of(bundle.train)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(train_targets):
        by_class.setdefault(int(label), []).append(index)
    keep = [i for c in classes for i in by_class.get(c, [])]
    generator = torch.Generator().manual_seed(int(cfg.split_seed))
    for c in old:
        members = by_class.get(c, [])
        order = torch.randperm(len(members), generator=generator).tolist()
        keep += [members[j] for j in order[:rehearsal]]
    keep.sort()
    if not keep:
        raise FixedclsError(f"data.classes={classes} selects no training samples of {cfg.name}: check the label ids")
    seen = set(classes) | set(old)
    test_targets = targets_of(bundle.test)
    test_keep = [i for i, label in enumerate(test_targets) if int(label) in seen]
    return DataBundle(
        train=LabelSubset(bundle.train, keep, train_targets),
        train_eval=LabelSubset(bundle.train_eval, keep, train_targets),
        test=LabelSubset(bundle.test, test_keep, test_targets),
        num_classes=K, in_chans=bundle.in_chans, img_size=bundle.img_size, class_names=bundle.class_names,
        preprocessing=bundle.preprocessing,
    )


def create_loaders(
    bundle: DataBundle, *, batch_size: int, eval_batch_size: int, num_workers: int = 0, seed: int = 0,
    rank: int = 0, world_size: int = 1, pin_memory: bool = False,
) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Train loader (seeded order and augmentation per epoch), train-eval and test loaders (sharded in DDP)."""
    train_set = SeededAugmentation(bundle.train, seed)
    common = dict(num_workers=num_workers, pin_memory=pin_memory, persistent_workers=False)
    # Each loader gets a private generator: without one, every `iter(loader)` draws its workers' base
    # seed from the global torch RNG, so a run resumed mid-epoch (one extra iter) would see other dropout masks.
    train = DataLoader(
        train_set, batch_size=batch_size, drop_last=False,
        sampler=EpochSampler(len(train_set), shuffle=True, seed=seed, rank=rank, world_size=world_size, batch_size=batch_size),
        generator=torch.Generator().manual_seed(seed), **common,
    )

    def eval_loader(dataset):
        sampler = EpochSampler(len(dataset), shuffle=False, rank=rank, world_size=world_size) if world_size > 1 else None
        return DataLoader(dataset, batch_size=eval_batch_size, shuffle=False, sampler=sampler,
                          generator=torch.Generator().manual_seed(seed), **common)

    return train, eval_loader(bundle.train_eval), eval_loader(bundle.test)
