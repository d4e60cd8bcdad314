"""How an image becomes a model input: the tensor transforms of the in-memory data sets (digits, synthetic),
timm's transforms of image files (CIFAR, image folders: augmentation, normalisation, the evaluation crop), and
the evaluation transform as plain values (`preprocessing_spec`) that a checkpoint stores and `fixedcls.load`
rebuilds without the data."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import FixedclsError

# The PIL mode an image file is converted to for each data.in_chans (an RGB folder can train a 1-channel model).
IMAGE_MODES = {1: "L", 3: "RGB"}


def normalizer(mean: Sequence[float], std: Sequence[float]) -> Callable:
    mean_t = torch.tensor(mean).view(-1, 1, 1)
    std_t = torch.tensor(std).view(-1, 1, 1)
    return lambda image: (image - mean_t) / std_t


def random_shift(pad: int) -> Callable:
    """Random translation by up to `pad` pixels (zero padding): cheap augmentation for tiny images."""

    def shift(image: torch.Tensor) -> torch.Tensor:
        size = image.shape[-1]
        padded = F.pad(image, (pad, pad, pad, pad))
        top, left = torch.randint(0, 2 * pad + 1, (2,)).tolist()
        return padded[..., top : top + size, left : left + size]

    return shift


def compose(*fns: Callable) -> Callable:
    def apply(image):
        for fn in fns:
            image = fn(image)
        return image

    return apply


def preprocessing_spec(*, in_chans: int, img_size: int, mean: Sequence[float], std: Sequence[float],
                       crop_pct: Optional[float] = None, interpolation: str = "bilinear") -> dict:
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
        "interpolation": str(interpolation),
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


# Augmentation that works on image files through timm's transforms, not on tensors held in memory.
IMAGE_AUGMENTATION = ("auto_augment", "re_prob")


AUTO_AUGMENT_EXAMPLES = "rand-m9-mstd0.5-inc1, rand-m7-n2, augmix-m5-w4-d2, v0, original"


def _auto_augment(policy: str, img_size: int, mean: Sequence[float], interpolation: str) -> Callable:
    """timm's RandAugment / AugMix / AutoAugment from its policy string, with timm's own hyper-parameters."""
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
    from timm.data.transforms import str_to_pil_interp

    fill = [min(255, round(255 * m)) for m in mean]
    hparams = dict(translate_const=int(img_size * 0.45), img_mean=tuple((fill * 3)[:3]),
                   interpolation=str_to_pil_interp(interpolation))
    build = (rand_augment_transform if policy.startswith("rand") else
             augment_and_mix_transform if policy.startswith("augmix") else auto_augment_transform)
    return build(policy, hparams)


def file_normalization(cfg, in_chans: int) -> tuple[tuple, tuple]:
    """(mean, std) of CIFAR and image folders: data.mean / data.std, else ImageNet's first in_chans values."""
    mean = tuple(cfg.mean) if cfg.mean else (0.485, 0.456, 0.406)[:in_chans] or (0.5,)
    std = tuple(cfg.std) if cfg.std else (0.229, 0.224, 0.225)[:in_chans] or (0.5,)
    return mean, std


def image_file_transforms(cfg, in_chans: int) -> tuple[Callable, Callable, dict]:
    """(train transform, evaluation transform, the evaluation transform's spec) of CIFAR and image folders.

    mean/std, interpolation and crop_pct come from the data config (filled from a pretrained model's data
    config before this runs, see build.resolve_preprocessing), timm's defaults where unset; data.auto_augment
    and data.re_prob in training.  The evaluation transform is timm's, built from the spec a checkpoint stores."""
    from timm.data import create_transform

    mean, std = file_normalization(cfg, in_chans)
    interpolation = cfg.get("interpolation") or "bilinear"  # create_transform's default
    spec = preprocessing_spec(in_chans=in_chans, img_size=cfg.img_size, mean=mean, std=std, crop_pct=cfg.get("crop_pct"),
                              interpolation=interpolation)
    eval_tf = eval_transform(spec)
    if not cfg.augment:
        return eval_tf, eval_tf, spec
    policy, re_prob = cfg.get("auto_augment") or None, float(cfg.get("re_prob") or 0.0)
    try:
        augment = _auto_augment(policy, cfg.img_size, mean, interpolation) if policy else None
    except Exception as error:  # timm asserts on a malformed policy string
        raise FixedclsError(f"data.auto_augment={policy!r} is not a timm augmentation policy ({error or type(error).__name__}): "
                            f"e.g. {AUTO_AUGMENT_EXAMPLES}") from None
    if cfg.img_size <= 64:  # CIFAR-sized images: timm's ImageNet crop policy would throw most of them away
        import torchvision.transforms as T
        from timm.data.random_erasing import RandomErasing
        from timm.data.transforms import str_to_interp_mode

        resize = T.Resize(cfg.img_size, interpolation=str_to_interp_mode(interpolation))
        # Resize first: an image folder's images need not already be img_size (a crop larger than the image fails).
        train_tf = T.Compose([resize, T.RandomCrop(cfg.img_size, padding=cfg.img_size // 8), T.RandomHorizontalFlip()]
                             + ([augment] if augment else []) + [T.ToTensor(), T.Normalize(mean, std)]
                             + ([RandomErasing(re_prob, mode="pixel", device="cpu")] if re_prob else []))
        return train_tf, eval_tf, spec
    # timm's own training recipe (random resized crop, flip, colour jitter); "pixel" erasing as timm's train.py.
    train_tf = create_transform(is_training=True, auto_augment=policy, re_prob=re_prob, re_mode="pixel",
                                input_size=(in_chans, cfg.img_size, cfg.img_size), mean=mean, std=std,
                                interpolation=interpolation, crop_pct=cfg.get("crop_pct"))
    return train_tf, eval_tf, spec
