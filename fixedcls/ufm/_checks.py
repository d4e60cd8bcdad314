"""Argument checks shared by the UFM solvers: one-line ``FixedclsError`` messages that name the fix."""

from __future__ import annotations

import math
from collections.abc import Sequence

from .. import polytopes
from ..errors import FixedclsError

LOSSES = ("ce", "mse", "dot_regression")
NORMALIZATIONS = ("none", "l2")


def positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):  # int and numpy integers, not floats
        raise FixedclsError(f"{name} must be an integer >= {minimum}, got {value!r}")
    value = int(value)
    if value < minimum:
        raise FixedclsError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def nonnegative(name: str, value, *, strict: bool = False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise FixedclsError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value) or value < 0 or (strict and value == 0):
        bound = "> 0" if strict else ">= 0"
        raise FixedclsError(f"{name} must be a finite number {bound}, got {value}")
    return value


def class_counts(counts: Sequence[int]) -> tuple[int, ...]:
    """Samples per class, at least two classes with at least one sample each."""
    if isinstance(counts, (str, bytes)) or not hasattr(counts, "__len__"):
        raise FixedclsError(f"counts must be a list of samples per class, e.g. [10, 10, 2], got {counts!r}")
    counts = tuple(positive_int("every class count", c) for c in counts)
    if len(counts) < 2:
        raise FixedclsError(f"counts must name at least 2 classes, got {list(counts)}")
    return counts


def choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise FixedclsError(f"unknown {name} {value!r}: choose one of {', '.join(choices)}")
    return value


def parse_counts(text: str) -> tuple[int, ...]:
    """``"10x10"`` (10 classes of 10), ``"5x50,5x2"`` (5 of 50 then 5 of 2) or ``"50,50,2"``."""
    counts: list[int] = []
    for item in text.split(","):
        item = item.strip()
        classes, sep, size = item.partition("x")
        try:
            counts.extend([int(size)] * int(classes) if sep else [int(item)])
        except ValueError:
            raise FixedclsError(
                f"cannot read class counts {text!r}: write KxN (K classes of N samples) or N, joined by commas, "
                "e.g. 5x50,5x2"
            ) from None
    return class_counts(counts)


def polytope_dim(head: str, num_classes: int, dim: int | None) -> int:
    """``dim`` (the natural one when None) checked against the polytope's capacity.

    Checked here rather than left to ``polytopes.make``, whose message names the training key
    ``model.dim``.
    """
    if dim is None:
        return polytopes.natural_dim(head, num_classes)
    dim = positive_int("dim", dim)
    needed = polytopes.min_dim(head, num_classes)
    if dim < needed:
        raise FixedclsError(
            f"head {head!r} cannot hold K={num_classes} classes in dim={dim}: needs dim >= {needed} "
            f"(set dim={needed} or larger)"
        )
    return dim
