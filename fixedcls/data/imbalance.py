"""Long-tailed training splits and the per-class view of accuracy (`data.imbalance`, docs/config.md).

The imbalance is a choice of training indices, taken after the dataset's held-out splits: validation and
test stay balanced, so every class is measured on the same footing. Classes are ranked in label order
(class 0 keeps the most samples), and which samples a class keeps is drawn with `data.split_seed`, so every
seed of a sweep trains on the same long-tailed set.

Class groups (many / medium / few-shot) are set by training counts: they give `<split>/acc_many|medium|few`
and tell the minority-collapse measures which classes are the minority (few) and the majority (many).
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch

from ..errors import FixedclsError
from ..runtime import choice

GROUPS = ("many", "medium", "few")


def profile_counts(num_classes: int, n_max: int, kind: str, ratio: float, step_fraction: float = 0.5) -> list[int]:
    """Training samples per class, in label order, of an imbalance profile whose largest class has n_max.

    exp:  n_i = int(n_max * ratio^(-i/(K-1))), the long-tailed CIFAR profile of Cao et al. (LDAM, 2019);
    step: the last round(step_fraction * K) classes have int(n_max / ratio), the others n_max;
    none: n_max for every class.
    """
    K = int(num_classes)
    if kind == "none":
        return [n_max] * K
    if kind == "exp":
        # (1/ratio)^(i/(K-1)), as LDAM's code writes it, so that the CIFAR-LT counts come out to the sample.
        counts = [int(n_max * (1.0 / ratio) ** (i / (K - 1))) for i in range(K)]
    elif kind == "step":
        minority = round(step_fraction * K)
        if not 0 < minority < K:
            low, high = 0.5 / K, 1 - 0.5 / K
            raise FixedclsError(
                f"data.imbalance.step_fraction={step_fraction} makes {minority} of the {K} classes minority: set it "
                f"between {math.ceil(1000 * low) / 1000} and {math.floor(1000 * high) / 1000} (at least one class each side)"
            )
        counts = [n_max] * (K - minority) + [int(n_max / ratio)] * minority
    else:
        raise FixedclsError(f"unknown data.imbalance.type={kind!r}: choose none, exp or step")
    if min(counts) < 1:
        raise FixedclsError(
            f"data.imbalance.ratio={ratio:g} leaves the smallest class with {min(counts)} training samples "
            f"(the largest has {n_max}): set data.imbalance.ratio <= {n_max}"
        )
    return counts


def imbalanced_indices(labels: Sequence[int], imbalance, seed: int, num_classes: Optional[int] = None) -> list[int]:
    """The sorted indices of `labels` that a long-tailed training split keeps (all of them for type=none).

    n_max is the size of the smallest class of the balanced split, so that every class can supply its count;
    each class keeps a random subset of its samples drawn with `seed` (the data.split_seed).
    """
    kind = choice(imbalance.type)
    if kind == "none":
        return list(range(len(labels)))
    K = int(num_classes if num_classes is not None else max(labels) + 1)
    by_class: list[list[int]] = [[] for _ in range(K)]
    for index, label in enumerate(labels):
        by_class[int(label)].append(index)
    empty = [c for c, members in enumerate(by_class) if not members]
    if empty:
        raise FixedclsError(
            f"data.imbalance needs training samples of every class, but class(es) {empty[:10]} have none: "
            f"check the dataset or set data.imbalance.type=none"
        )
    n_max = min(len(members) for members in by_class)
    counts = profile_counts(K, n_max, kind, float(imbalance.ratio), float(imbalance.step_fraction))
    generator = torch.Generator().manual_seed(int(seed))
    keep: list[int] = []
    for members, count in zip(by_class, counts):
        order = torch.randperm(len(members), generator=generator)[:count].tolist()
        keep += [members[j] for j in order]
    return sorted(keep)


def check_imbalance_config(imbalance) -> None:
    """The rule of `data.imbalance` that joins two keys (single-key ranges: config.py)."""
    many_min, few_max = getattr(imbalance, "many_min", None), getattr(imbalance, "few_max", None)
    if many_min is not None and few_max is not None and few_max >= many_min:
        raise FixedclsError(
            f"data.imbalance.few_max={few_max} is not below data.imbalance.many_min={many_min}: a class cannot be "
            f"both few- and many-shot; set few_max < many_min (or leave both unset to scale them to the counts)"
        )


def class_counts(labels: Sequence[int], num_classes: int) -> list[int]:
    """Samples per class, in label order."""
    return torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=num_classes).tolist()


def group_thresholds(counts: Sequence[int], imbalance) -> tuple[int, int]:
    """(many_min, few_max): a class with at least many_min training samples is many-shot, one with at most
    few_max few-shot, the rest medium.

    Unset thresholds are scaled to the counts: the range from the smallest (n_min) to the largest (n_max)
    non-empty class is cut in three equal parts on a log scale, many_min = ceil(n_max^(2/3) n_min^(1/3)) and
    few_max = floor(n_max^(1/3) n_min^(2/3)), so an exponential profile puts about a third of the classes in
    each group and a step profile its majority in many and its minority in few. Without data.imbalance (and
    no thresholds set) every class is many-shot: a balanced split has no tail.
    """
    present = [n for n in counts if n > 0]
    n_max, n_min = (max(present), min(present)) if present else (0, 0)
    if choice(imbalance.type) == "none":
        default_many, default_few = n_min, -1
    else:
        default_many = math.ceil(n_max ** (2 / 3) * n_min ** (1 / 3) - 1e-9)
        default_few = math.floor(n_max ** (1 / 3) * n_min ** (2 / 3) + 1e-9)
    many_min = default_many if imbalance.many_min is None else int(imbalance.many_min)
    few_max = default_few if imbalance.few_max is None else int(imbalance.few_max)
    if few_max >= many_min:
        raise FixedclsError(
            f"data.imbalance.few_max={few_max} is not below data.imbalance.many_min={many_min}: a class cannot be "
            f"both few- and many-shot; set few_max < many_min (or leave both unset to scale them to the counts)"
        )
    return many_min, few_max


def class_groups(counts: Sequence[int], imbalance) -> dict[str, list[int]]:
    """{"many": [...], "medium": [...], "few": [...]}: the classes (with training samples) of each group."""
    many_min, few_max = group_thresholds(counts, imbalance)
    groups: dict[str, list[int]] = {name: [] for name in GROUPS}
    for c, n in enumerate(counts):
        if n <= 0:  # a class this run does not train on (class-incremental views) belongs to no group
            continue
        groups["many" if n >= many_min else "few" if n <= few_max else "medium"].append(c)
    return groups


def class_accuracy(correct: Sequence[float], count: Sequence[float]) -> list[Optional[float]]:
    """Accuracy of each class (None for a class without evaluated samples)."""
    return [float(k) / float(n) if n > 0 else None for k, n in zip(correct, count)]


def class_accuracy_row(split: str, correct: Sequence[float], count: Sequence[float],
                       groups: Optional[Mapping[str, Sequence[int]]] = None) -> dict[str, float]:
    """`<split>/balanced_acc` (mean accuracy over the classes evaluated) and `<split>/acc_<group>` for each
    group with an evaluated class: the mean accuracy of its classes."""
    accuracy = class_accuracy(correct, count)
    measured = [a for a in accuracy if a is not None]
    row: dict[str, float] = {}
    if measured:
        row[f"{split}/balanced_acc"] = sum(measured) / len(measured)
    for name, classes in (groups or {}).items():
        values = [accuracy[c] for c in classes if c < len(accuracy) and accuracy[c] is not None]
        if values:
            row[f"{split}/acc_{name}"] = sum(values) / len(values)
    return row
