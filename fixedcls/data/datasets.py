"""Datasets: bundled digits, synthetic classes, CIFAR and image folders through timm, with their validation
carve-out, class selection and long-tailed subsampling (`create_data` -> `DataBundle`).

How their samples reach the model (order, seeded augmentation, workers) is `fixedcls.loaders`.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import FixedclsError
from .imbalance import check_imbalance_config, imbalanced_indices
from .transforms import (
    IMAGE_AUGMENTATION,
    IMAGE_MODES,
    compose,
    image_file_transforms,
    normalizer,
    preprocessing_spec,
    random_shift,
)

# Datasets read from image files through timm's transforms: augmentation of files and a pretrained model's
# preprocessing apply to these only.
IMAGE_FILE_DATASETS = ("imagefolder", "cifar10", "cifar100")
# The image files fixedcls-predict and fixedcls-embed read from folders.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# Synthetic images live in memory as float32 (and the draw briefly needs about twice that): a larger config is
# a typo (data.num_classes=200000), not a benchmark, so it is refused before the allocation.
SYNTHETIC_MAX_GIB = 8


@dataclass
class DataBundle:
    """The views of one dataset a run needs, and what the model must know about it."""

    train: Dataset  # augmented, order and augmentation seeded per epoch
    train_eval: Dataset  # same samples, evaluation transform (collapse is measured on these)
    test: Dataset
    num_classes: int
    in_chans: int
    img_size: int
    class_names: Sequence[str]
    val: Optional[Dataset] = None  # held out of training for model selection (checkpoint.best_metric); None: none
    # where each split came from, for the log's `splits:` line (`describe_splits`): "folder train", "0.1 of ..."
    val_source: str = ""
    train_source: str = ""
    test_source: str = ""
    # How one image file becomes a model input, exactly as the evaluation views do it (`preprocessing_spec`);
    # stored in checkpoints so a trained model can be used without its data.
    preprocessing: Optional[dict] = None


# A split a command can name -> the DataBundle view that evaluates it (the training split without augmentation).
SPLIT_VIEWS = {"train": "train_eval", "test": "test", "val": "val"}


def describe_splits(bundle: DataBundle) -> str:
    """`train 1295 (...), validation 143 (0.1 of the training split (split_seed 0)), test 359 (...)`: each split's
    size and where it came from."""
    def part(name: str, dataset: Dataset, source: str) -> str:
        return f"{name} {len(dataset)}" + (f" ({source})" if source else "")

    val = part("validation", bundle.val, bundle.val_source) if bundle.val is not None else "no validation split"
    return f"{part('train', bundle.train, bundle.train_source)}, {val}, {part('test', bundle.test, bundle.test_source)}"


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


def _fraction(cfg, key: str) -> float:
    value = float(getattr(cfg, key, 0) or 0)
    if not 0 <= value < 1:
        raise FixedclsError(f"data.{key}={value}: use a share of the samples in [0, 1), e.g. 0.1 (0 turns it off)")
    return value


def carve(labels: Sequence[int], fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Stratified, seeded split of sample indices: [part for each fraction..., the rest].

    Per class (in label order), one permutation drawn from a generator seeded with `seed`; each part takes
    round(share * what is left) of the class, at least one sample while the class keeps one for the rest,
    so the same seed always carves the same parts (a sweep's seeds share one test and one validation set)."""
    generator = torch.Generator().manual_seed(int(seed))
    labels_t = torch.as_tensor(list(labels), dtype=torch.long)
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for c in sorted(set(labels_t.tolist())):
        members = (labels_t == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)].tolist()
        for i, share in enumerate(fractions):
            take = round(len(members) * share)
            if share > 0:
                take = min(max(take, 1), len(members) - 1)
            parts[i] += members[:take]
            members = members[take:]
        parts[-1] += members
    return [sorted(part) for part in parts]


def _digits(cfg) -> DataBundle:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    images = F.interpolate(images, size=(cfg.img_size, cfg.img_size), mode="bilinear", align_corners=False)
    images = images.expand(-1, cfg.in_chans, -1, -1).contiguous()
    # A stratified split, fixed by split_seed, so every seed of a sweep sees the same test and validation sets;
    # the validation share is taken from what the test split leaves (the training split).
    test_idx, val_idx, train_idx = (torch.tensor(part, dtype=torch.long) for part in
                                    carve(labels.tolist(), [_fraction(cfg, "test_fraction"), _fraction(cfg, "val_fraction")],
                                          cfg.split_seed))
    mean = cfg.mean or [float(images[train_idx].mean())] * cfg.in_chans
    std = cfg.std or [float(images[train_idx].std())] * cfg.in_chans
    normalize = normalizer(mean, std)
    train_tf = compose(random_shift(max(1, cfg.img_size // 16)), normalize) if cfg.augment else normalize
    held_out = " and validation" if len(val_idx) else ""
    return DataBundle(
        train=TensorImages(images[train_idx], labels[train_idx], train_tf),
        train_eval=TensorImages(images[train_idx], labels[train_idx], normalize),
        test=TensorImages(images[test_idx], labels[test_idx], normalize),
        num_classes=10, in_chans=cfg.in_chans, img_size=cfg.img_size,
        class_names=[str(c) for c in range(10)],
        val=TensorImages(images[val_idx], labels[val_idx], normalize) if len(val_idx) else None,
        val_source=f"{_fraction(cfg, 'val_fraction'):g} of the training split (split_seed {cfg.split_seed})",
        train_source=f"the {len(labels)} digits less test{held_out}",
        test_source=f"{_fraction(cfg, 'test_fraction'):g} of the digits (split_seed {cfg.split_seed})",
        # An image file of a digit: grey levels scaled to [0, 1] like the bundled 0..16 values divided by 16.
        preprocessing=preprocessing_spec(in_chans=cfg.in_chans, img_size=cfg.img_size, mean=mean, std=std),
    )


def synthetic_bytes(cfg) -> int:
    """What the images of `data=synthetic` with this config hold in memory (float32, train + test)."""
    per_image = 4 * cfg.in_chans * cfg.img_size * cfg.img_size
    return (cfg.num_classes or 10) * (cfg.train_per_class + cfg.test_per_class) * per_image


def check_data_config(cfg) -> None:
    """The rules of a `data` section that join several keys; no file is read (single-key ranges: config.py)."""
    if cfg.name == "digits" and not cfg.test_fraction:
        raise FixedclsError("data=digits needs a test split: set data.test_fraction in (0, 1), e.g. 0.2 (the default)")
    # img_size=null is the backbone's input size, known (and checked again) once the model's data config is read
    if cfg.name == "synthetic" and cfg.img_size is not None and synthetic_bytes(cfg) > SYNTHETIC_MAX_GIB * 2**30:
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
    if cfg.name not in IMAGE_FILE_DATASETS:
        for key in IMAGE_AUGMENTATION:
            if cfg.get(key):
                raise FixedclsError(f"data.{key}={cfg.get(key)} augments image files (data=imagefolder, cifar10, "
                                    f"cifar100), not data={cfg.name}'s tensors: unset it or use an image dataset")
    for key in IMAGE_AUGMENTATION:
        if cfg.get(key) and not cfg.augment:
            raise FixedclsError(f"data.{key}={cfg.get(key)} is training augmentation but data.augment=false: "
                                f"set data.augment=true or unset data.{key}")
    if getattr(cfg, "imbalance", None) is not None:
        check_imbalance_config(cfg.imbalance)
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
    val_idx, train_idx = (torch.tensor(part, dtype=torch.long) for part in
                          carve(train_y.tolist(), [_fraction(cfg, "val_fraction")], cfg.split_seed))
    val_x, val_y, train_x, train_y = train_x[val_idx], train_y[val_idx], train_x[train_idx], train_y[train_idx]
    train_tf = random_shift(max(1, cfg.img_size // 16)) if cfg.augment else None
    return DataBundle(
        train=TensorImages(train_x, train_y, train_tf),
        train_eval=TensorImages(train_x, train_y),
        test=TensorImages(test_x, test_y),
        num_classes=num_classes, in_chans=cfg.in_chans, img_size=cfg.img_size,
        class_names=[str(c) for c in range(num_classes)],
        val=TensorImages(val_x, val_y) if len(val_y) else None,
        val_source=f"{_fraction(cfg, 'val_fraction'):g} of the training split (split_seed {cfg.split_seed})",
        train_source=f"{cfg.train_per_class} drawn per class" + (" less validation" if len(val_y) else ""),
        test_source=f"{cfg.test_per_class} drawn per class",
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


def _timm_dataset(cfg, name: str, split: str, transform, root: Path, class_map: Optional[dict] = None,
                  search_split: bool = True):
    from timm.data import create_dataset

    try:
        dataset = create_dataset(name, root=str(root), split=split, search_split=search_split, download=cfg.download,
                                 is_training=False, class_map=class_map)
    except Exception as error:  # timm/torchvision raise many types for a bad folder
        raise FixedclsError(f"cannot read {cfg.name} split '{split}' under data.root={root}: {error}".replace("\n", " ")) from error
    dataset.transform = transform
    return dataset


def _folder_dataset(cfg, folder: Path, split: str, transform, class_map: Optional[dict] = None):
    """The images of exactly `folder`. timm's create_dataset joins a split to its root and silently falls back
    to the root itself when that path is missing (a relative split under a relative root is joined twice), so the
    folder is handed over as the root, with the split search off."""
    return _timm_dataset(cfg, "", split, transform, folder, class_map=class_map, search_split=False)


def _image_files_under(folder: Path) -> set[str]:
    """The image files timm's folder reader finds under `folder` (it follows links and walks every level)."""
    from timm.data.readers.reader_image_folder import get_img_extensions

    extensions = {e.lower() for e in get_img_extensions()}
    return {os.path.realpath(os.path.join(here, name)) for here, _, names in os.walk(folder, followlinks=True)
            for name in names if os.path.splitext(name)[1].lower() in extensions}


def _check_split_files(splits: dict[str, tuple[Path, object]]) -> None:
    """Each split holds exactly the image files of its own folder, and no file is in two splits: a split that read
    another folder (or the root) would train and test on the same images without a word."""
    seen: dict[str, str] = {}
    for split, (folder, dataset) in splits.items():
        files = {os.path.realpath(path) for path, _ in dataset.reader.samples}
        expected = _image_files_under(folder)
        if files != expected:
            raise FixedclsError(f"the '{split}' split read {len(files)} images where its folder {folder} holds "
                                f"{len(expected)}: name each split's own folder under data.root")
        for path in files:
            if path in seen:
                raise FixedclsError(f"image {path} is in both the '{seen[path]}' and the '{split}' split: a model "
                                    f"would be tested on images it trained on; give each split its own files")
            seen[path] = split


def _carve_validation(bundle: DataBundle, cfg) -> DataBundle:
    """Take data.val_fraction of the training samples (stratified, split_seed) as the validation split."""
    share = _fraction(cfg, "val_fraction")
    if not share:
        return bundle
    targets = targets_of(bundle.train)
    val_idx, train_idx = carve(targets, [share], cfg.split_seed)
    bundle.val = LabelSubset(bundle.train_eval, val_idx, targets)
    bundle.train = LabelSubset(bundle.train, train_idx, targets)
    bundle.train_eval = LabelSubset(bundle.train_eval, train_idx, targets)
    bundle.val_source = f"{share:g} of the '{cfg.train_split}' split (split_seed {cfg.split_seed})"
    bundle.train_source += " less validation"
    return bundle


def _torchvision_cifar(cfg) -> DataBundle:
    root = _require_root(cfg)
    if getattr(cfg, "val_split", None):
        raise FixedclsError(f"data.val_split={cfg.val_split}: {cfg.name} has only train and test splits: carve a "
                            f"validation split out of the training images with data.val_fraction=0.1 instead")
    train_tf, eval_tf, spec = image_file_transforms(cfg, 3)
    name = f"torch/{cfg.name}"
    train = _timm_dataset(cfg, name, cfg.train_split, train_tf, root)
    train_eval = _timm_dataset(cfg, name, cfg.train_split, eval_tf, root)
    test = _timm_dataset(cfg, name, cfg.test_split, eval_tf, root)
    classes = list(getattr(train, "classes", []))
    num_classes = len(classes) or (10 if cfg.name == "cifar10" else 100)
    return _carve_validation(DataBundle(train, train_eval, test, num_classes, 3, cfg.img_size, classes,
                                         train_source=f"the '{cfg.train_split}' split",
                                         test_source=f"the '{cfg.test_split}' split", preprocessing=spec), cfg)


# The names a split folder is also found under (timm's own aliases for validation).
SPLIT_ALIASES = {"validation": ("val",), "val": ("validation",), "test": (), "train": ()}


def _split_folder(root: Path, split: str, key: str, fix: str) -> Path:
    """The folder of split `split` under `root`. timm falls back to `root` itself when it is missing, which
    would evaluate on the training images; here a missing folder is one line naming it."""
    for name in (split,) + SPLIT_ALIASES.get(split, ()):
        if (root / name).is_dir():
            return root / name
    present = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    aliases = "".join(f" or {root / a}" for a in SPLIT_ALIASES.get(split, ()))
    raise FixedclsError(f"{key}={split}: image folder {root / split}{aliases} does not exist (folders there: "
                        f"{', '.join(present) or 'none'}): {fix}")


def _imagefolder(cfg) -> DataBundle:
    root = _require_root(cfg)
    train_tf, eval_tf, spec = image_file_transforms(cfg, cfg.in_chans)
    test_share, val_share = _fraction(cfg, "test_fraction"), _fraction(cfg, "val_fraction")
    if val_share and cfg.val_split:
        raise FixedclsError(f"data.val_split={cfg.val_split} and data.val_fraction={val_share} both name a validation "
                            f"split: keep one (set the other to null / 0)")
    train_dir = _split_folder(root, cfg.train_split, "data.train_split",
                              "lay out <root>/train/<class>/<image>, or name the training folder with data.train_split")
    train = _folder_dataset(cfg, train_dir, cfg.train_split, train_tf)
    classes = sorted(train.reader.class_to_idx, key=train.reader.class_to_idx.get)
    if len(classes) < 2:
        raise FixedclsError(
            f"image folder {root} has {len(classes)} class folder(s) {classes}: a classifier needs at least 2 "
            f"(lay out <root>/<split>/<class>/<image>)"
        )
    mapping = dict(train.reader.class_to_idx)
    train_eval = ImageFiles(_folder_dataset(cfg, train_dir, cfg.train_split, eval_tf), IMAGE_MODES[cfg.in_chans])
    held_out_folders: list[Path] = []
    split_files = {cfg.train_split: (train_dir, train)}

    def held_out(split: str, key: str, fraction_key: str) -> Dataset:
        """A split from its own folder, labelled with the train split's ids (on its own it numbers only the
        folders it has)."""
        folder = _split_folder(root, split, key, f"add it, name the right folder with {key}=<folder>, or carve "
                                                 f"the split out of the training images with data.{fraction_key}=0.1")
        dataset = _folder_dataset(cfg, folder, split, eval_tf)
        extra = sorted(set(dataset.reader.class_to_idx) - set(mapping))
        if extra:
            raise FixedclsError(
                f"the '{split}' split of {root} has class folder(s) {extra} that the '{cfg.train_split}' split "
                f"lacks, so their labels fall outside the head's {len(classes)} outputs: add them to '{cfg.train_split}' "
                f"or remove them"
            )
        if any(mapping[name] != index for name, index in dataset.reader.class_to_idx.items()):
            dataset = _folder_dataset(cfg, folder, split, eval_tf, class_map=mapping)
        held_out_folders.append(folder.resolve())
        split_files[split] = (folder, dataset)
        return ImageFiles(dataset, IMAGE_MODES[cfg.in_chans])

    train = ImageFiles(train, IMAGE_MODES[cfg.in_chans])
    targets = train.targets
    test_idx, val_idx, train_idx = carve(targets, [test_share, val_share], cfg.split_seed)
    if test_share:
        test, test_source = LabelSubset(train_eval, test_idx, targets), f"{test_share:g} of '{cfg.train_split}'"
    else:
        test = held_out(cfg.test_split, "data.test_split", "test_fraction")
        test_source = f"folder {held_out_folders[-1]}"
    val, val_source = None, ""
    if val_share:
        val, val_source = LabelSubset(train_eval, val_idx, targets), f"{val_share:g} of '{cfg.train_split}' (split_seed {cfg.split_seed})"
    elif cfg.val_split:
        val = held_out(cfg.val_split, "data.val_split", "val_fraction")
        val_source = f"folder {held_out_folders[-1]}"
        if len(set(held_out_folders)) < len(held_out_folders):
            raise FixedclsError(f"data.val_split={cfg.val_split} and data.test_split={cfg.test_split} are one folder: "
                                f"model selection on the test split would inflate its accuracy; name two folders, or "
                                f"carve one split out of the training images (data.val_fraction=0.1)")
    _check_split_files(split_files)
    train_source = f"folder {train_dir.resolve()}"
    if test_share or val_share:
        train, train_eval = LabelSubset(train, train_idx, targets), LabelSubset(train_eval, train_idx, targets)
        train_source += " less " + " and ".join(name for name, share in (("test", test_share), ("validation", val_share))
                                                if share)
    return DataBundle(train, train_eval, test, len(classes), cfg.in_chans, cfg.img_size, classes, val=val,
                      val_source=val_source, train_source=train_source, test_source=test_source, preprocessing=spec)


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
    if getattr(cfg, "val_split", None) and cfg.name in ("digits", "synthetic"):
        raise FixedclsError(f"data.val_split={cfg.val_split} names a folder of an image folder, but {cfg.name} has "
                            f"none: set data.val_fraction (e.g. 0.1) instead")
    bundle = BUILDERS[cfg.name](cfg)
    if cfg.num_classes is not None and cfg.num_classes != bundle.num_classes and cfg.name != "synthetic":
        raise FixedclsError(
            f"data.num_classes={cfg.num_classes} but {cfg.name} has {bundle.num_classes} classes: "
            f"drop data.num_classes or set it to {bundle.num_classes}"
        )
    bundle = long_tailed(bundle, cfg)
    return select_classes(bundle, cfg)


def long_tailed(bundle: DataBundle, cfg) -> DataBundle:
    """The bundle with a long-tailed training split (data.imbalance); every held-out split stays as it is."""
    imbalance = getattr(cfg, "imbalance", None)
    if imbalance is None:
        return bundle
    labels = targets_of(bundle.train)
    keep = imbalanced_indices(labels, imbalance, int(cfg.split_seed), bundle.num_classes)
    if len(keep) == len(labels):
        return bundle
    return dataclasses.replace(bundle, train=LabelSubset(bundle.train, keep, labels),
                               train_eval=LabelSubset(bundle.train_eval, keep, labels),
                               train_source=f"{bundle.train_source}, long-tailed")


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
    test and val: the samples of `classes` and `old_classes`. num_classes stays the dataset's, so the head keeps an
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

    def of_seen_classes(dataset: Optional[Dataset]) -> Optional[Dataset]:
        if dataset is None:
            return None
        targets = targets_of(dataset)
        return LabelSubset(dataset, [i for i, label in enumerate(targets) if int(label) in seen], targets)

    return DataBundle(
        train=LabelSubset(bundle.train, keep, train_targets),
        train_eval=LabelSubset(bundle.train_eval, keep, train_targets),
        test=of_seen_classes(bundle.test),
        num_classes=K, in_chans=bundle.in_chans, img_size=bundle.img_size, class_names=bundle.class_names,
        val=of_seen_classes(bundle.val), val_source=bundle.val_source,
        train_source=f"{bundle.train_source}, the {len(classes)} classes of data.classes"
                     + (f" and {rehearsal} samples of each of {len(old)} old classes" if rehearsal else ""),
        test_source=bundle.test_source, preprocessing=bundle.preprocessing,
    )
