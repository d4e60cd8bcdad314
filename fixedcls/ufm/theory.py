"""One entry point to the exact optimum of any UFM that :func:`~fixedcls.ufm.simulate` runs.

:func:`global_optimum` picks the right solver (closed form, convex oracle or fixed-head solver)
and returns the optimum as matrices, so that a simulation's end state and the theory can be
compared entry by entry and measured by the same :func:`fixedcls.collapse.nc_metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .. import polytopes
from ..collapse import nc_metrics
from ..errors import FixedclsError
from ._checks import LOSSES, NORMALIZATIONS, choice, class_counts, nonnegative, polytope_dim, positive_int
from .closed_form import ce_optimum, mse_optimum
from .convex import ce_convex_oracle
from .fixed import fixed_head_optimum

__all__ = ["Optimum", "global_optimum", "minority_spread"]

_F64 = torch.float64


@dataclass(frozen=True)
class Optimum:
    """A global optimum of the UFM: every sample of class k sits at ``features[k]``.

    ``W`` [K, d] and ``features`` [K, d] float64 (for the learned head unique up to a rotation
    of R^d: compare ``logits`` or Gram matrices, not the matrices themselves), ``bias`` [K] or
    None, ``scale`` (the fixed head's logit scale, 1 for the learned head), ``objective`` (the
    minimum, or the infimum for L2-normalised features) and ``solver`` (which function gave it).
    """

    W: torch.Tensor
    features: torch.Tensor
    bias: torch.Tensor | None
    counts: tuple[int, ...]
    objective: float
    solver: str
    scale: float = 1.0

    @property
    def logits(self) -> torch.Tensor:
        """[K, K]: row k holds the logits scale * W h_k (+ b) of every class-k sample (h_k unnormalised)."""
        out = self.scale * self.features @ self.W.T
        return out if self.bias is None else out + self.bias

    def samples(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(H [N, d], labels [N]): the optimum written out sample by sample, labels in class order."""
        labels = torch.repeat_interleave(torch.arange(len(self.counts)), torch.tensor(self.counts))
        return self.features[labels], labels

    def metrics(self) -> dict[str, float]:
        """:func:`~fixedcls.collapse.nc_metrics` of the optimum, with the classifier the model applies."""
        H, labels = self.samples()
        return nc_metrics(H, labels, self.scale * self.W, self.bias)


def _simplex_etf(num_classes: int, dim: int) -> torch.Tensor:
    """[K, dim] float64 simplex ETF (unit rows, cosines -1/(K-1)) in the first coordinates.

    Built here in float64 because ``polytopes.make`` returns float32 rows, 1e-7 away from the
    exact ETF, which would cap the agreement between theory and simulation.
    """
    centred = np.eye(num_classes) - 1.0 / num_classes
    if dim >= num_classes:
        rows = np.pad(centred, ((0, 0), (0, dim - num_classes)))
    else:  # dim == K-1: coordinates in an orthonormal basis of the sum-zero subspace
        rows = centred @ np.linalg.svd(centred)[0][:, : num_classes - 1]
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return torch.from_numpy(rows)


def _pad(matrix: np.ndarray, dim: int) -> torch.Tensor:
    return torch.from_numpy(np.pad(matrix, ((0, 0), (0, dim - matrix.shape[1]))))


def _need_dim(dim: int, needed: int, what: str) -> None:
    if dim < needed:
        raise FixedclsError(f"{what} needs dim >= {needed}, got dim={dim}: set dim={needed} or larger")


def _learned(counts, dim, lambda_w, lambda_h, loss, bias) -> Optimum:
    K = len(counts)
    balanced = len(set(counts)) == 1
    if loss == "dot_regression":
        raise FixedclsError("loss 'dot_regression' needs a fixed polytope head: use a fixed head or loss='ce'")
    if loss == "ce":
        if bias:
            raise FixedclsError("the cross-entropy theory has no bias (the balanced optimum does not use one): set bias=False")
        if balanced:
            _need_dim(dim, K - 1, "the balanced cross-entropy optimum (a simplex ETF)")
            best = ce_optimum(K, counts[0], lambda_w, lambda_h)
            etf = _simplex_etf(K, dim)
            return Optimum(math.sqrt(best["w_norm_sq"]) * etf, math.sqrt(best["h_norm_sq"]) * etf, None, counts,
                           best["objective"], "ce_optimum")
        _need_dim(dim, K, "the convex oracle for imbalanced counts")
        best = ce_convex_oracle(counts, lambda_w, lambda_h)
        return Optimum(_pad(best["W"], dim), _pad(best["features"], dim), None, counts, best["objective"],
                       "ce_convex_oracle")
    if not balanced:
        raise FixedclsError("the MSE theory covers balanced counts only: use equal counts, or loss='ce' for imbalance")
    best = mse_optimum(K, counts[0], lambda_w, lambda_h, bias=bias)
    _need_dim(dim, best["min_dim"], f"the MSE optimum ({'simplex ETF' if bias else 'orthogonal frame'})")
    frame = _simplex_etf(K, dim) if bias else _pad(np.eye(K), dim)
    return Optimum(
        math.sqrt(best["w_norm_sq"]) * frame,
        math.sqrt(best["h_norm_sq"]) * frame,
        torch.full((K,), best["bias"], dtype=_F64) if bias else None,
        counts,
        best["objective"],
        "mse_optimum",
    )


def global_optimum(
    counts: Sequence[int],
    lambda_w: float,
    lambda_h: float,
    head: str = "learned",
    loss: str = "ce",
    dim: int | None = None,
    *,
    scale: float = 1.0,
    normalize: str = "none",
    bias: bool = False,
) -> Optimum:
    """The exact optimum of the problem ``simulate(counts, dim, lambda_w, lambda_h, head, loss, ...)`` solves.

    Learned head: :func:`ce_optimum` (balanced counts), :func:`ce_convex_oracle` (any counts,
    dim >= K) or :func:`mse_optimum` (balanced, with or without ``bias``); ``dim=None`` means K.
    Fixed head: :func:`fixed_head_optimum` on ``polytopes.make(head, K, dim)`` in float64 (the
    simulation's classifier), ``dim=None`` the polytope's natural dimension; ``lambda_w`` is
    unused there.  Raises ``FixedclsError`` for a problem no solver covers (imbalanced MSE,
    cross-entropy with a bias, dot regression on a learned head).
    """
    counts = class_counts(counts)
    K = len(counts)
    loss = choice("loss", loss, LOSSES)
    normalize = choice("normalize", normalize, NORMALIZATIONS)
    head = choice("head", head, ("learned", *polytopes.available()))
    if head == "learned":
        dim = K if dim is None else positive_int("dim", dim)
        if normalize != "none" or scale != 1.0:
            raise FixedclsError("scale and normalize='l2' apply to fixed heads only; the learned head is a plain linear layer")
        return _learned(counts, dim, nonnegative("lambda_w", lambda_w), nonnegative("lambda_h", lambda_h), loss, bias)
    if bias:
        raise FixedclsError("bias=True applies to the learned head only (fixed heads have no bias here)")
    W = polytopes.make(head, K, polytope_dim(head, K, dim)).to(_F64)
    best = fixed_head_optimum(W, lambda_h, scale=scale, normalize=normalize, loss=loss, counts=counts)
    return Optimum(W, best["features"], None, counts, best["objective"], "fixed_head_optimum", scale)


def minority_spread(W, counts: Sequence[int]) -> float:
    """How far apart the classifier rows of the smallest classes are: ||W_B - mean||_F / ||W_B||_F.

    B is the set of classes with the smallest count (at least two of them).  0 means minority
    collapse (all rows of B equal); 0 is also returned when those rows are all zero.
    """
    counts = class_counts(counts)
    W = torch.as_tensor(W, dtype=_F64)
    if W.dim() != 2 or W.shape[0] != len(counts):
        raise FixedclsError(f"W must have one row per class ({len(counts)}), got shape {tuple(W.shape)}")
    smallest = min(counts)
    group = [k for k, c in enumerate(counts) if c == smallest]
    if len(group) < 2:
        raise FixedclsError(f"minority collapse needs at least two classes with the smallest count, got counts {list(counts)}")
    rows = W[group]
    size = float(rows.norm())
    return float((rows - rows.mean(dim=0)).norm()) / size if size > 0 else 0.0
