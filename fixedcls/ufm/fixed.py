"""Optimal features when the classifier is fixed (a fixedcls polytope, or any given matrix).

With W fixed the UFM objective is a sum of one term per sample, and every sample of class k
solves the same problem, so the answer is one feature per class.  For ``normalize="none"``
that problem is strictly convex (weight decay on h); for ``normalize="l2"`` only the feature's
direction enters the loss and the answer is the best unit direction.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import FixedclsError
from ._checks import LOSSES, NORMALIZATIONS, choice, class_counts, nonnegative

__all__ = ["fixed_head_optimum"]

_F64 = torch.float64


def _as_weight(W) -> torch.Tensor:
    if isinstance(W, np.ndarray):
        W = torch.from_numpy(W)
    if not torch.is_tensor(W) or W.dim() != 2 or W.shape[0] < 2:
        shape = tuple(W.shape) if hasattr(W, "shape") else type(W).__name__
        raise FixedclsError(
            f"W must be a [K, d] matrix with K >= 2 rows (e.g. fixedcls.polytopes.make('simplex', 10)), got {shape}"
        )
    W = W.detach().to(device="cpu", dtype=_F64)
    if not torch.isfinite(W).all() or (W.norm(dim=1) == 0).any():
        raise FixedclsError("W must be finite with no zero row: every class needs a prototype")
    return W


def _newton_ce(W: torch.Tensor, scale: float, ridge: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """Row k: argmin_h CE(scale W h, k) + ridge_k/2 ||h||^2, for all classes at once (damped Newton)."""
    K, d = W.shape
    eye = torch.eye(K, dtype=_F64)
    h = torch.zeros(K, d, dtype=_F64) if start is None else start.clone()

    def value(h: torch.Tensor) -> torch.Tensor:
        logits = scale * h @ W.T
        return torch.logsumexp(logits, dim=1) - logits.diagonal() + 0.5 * ridge * (h * h).sum(dim=1)

    current = value(h)
    for _ in range(200):
        p = torch.softmax(scale * h @ W.T, dim=1)  # [K, K], row k: the class-k sample
        grad = scale * (p - eye) @ W + ridge[:, None] * h
        curvature = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # [K, K, K]
        hessian = scale**2 * W.T @ curvature @ W + torch.diag_embed(ridge[:, None].expand(K, d))
        direction = torch.linalg.solve(hessian, grad.unsqueeze(-1)).squeeze(-1)
        if float(direction.abs().max()) <= 1e-12 * (1.0 + float(h.abs().max())):
            # Inside Newton's quadratic region: one more full step leaves an error of ~1e-24.
            return h - direction
        step = torch.ones(K, dtype=_F64)
        for _ in range(60):  # backtracking, per class
            trial = h - step[:, None] * direction
            new = value(trial)
            # Rounding slack: near the optimum a full Newton step may "rise" by one ulp.
            worse = new > current + 8 * torch.finfo(_F64).eps * current.abs()
            if not worse.any():
                break
            step = torch.where(worse, step / 2, step)
        h, current = trial, torch.minimum(new, current)
    return h


def _unit_direction_ce(W: torch.Tensor, scale: float) -> torch.Tensor:
    """Row k: argmin over unit u of CE(scale W u, k).

    CE(scale W u) is convex in u with no stationary point, so its minimum over the unit ball lies
    on the sphere and, by the KKT conditions, equals the ridge solution of :func:`_newton_ce`
    whose norm is one.  The norm of that solution falls as the ridge grows: bisect on log(ridge).
    """
    K = W.shape[0]
    low = torch.zeros(K, dtype=_F64)  # log ridge: the solution's norm exceeds 1 at `low`, not at `high`
    high = torch.zeros(K, dtype=_F64)
    for _ in range(40):  # widen the bracket four e-folds at a time
        low_big = _newton_ce(W, scale, low.exp()).norm(dim=1) > 1
        high_big = _newton_ce(W, scale, high.exp()).norm(dim=1) > 1
        if low_big.all() and not high_big.any():
            break
        low = torch.where(low_big, low, low - 4)
        high = torch.where(high_big, high + 4, high)
    else:
        raise FixedclsError(
            "normalize='l2': some class cannot be separated by its own prototype (two rows of W point the same way)"
        )
    h = None
    for _ in range(56):  # bisection down to ~1e-15 of the bracket
        middle = (low + high) / 2
        h = _newton_ce(W, scale, middle.exp(), start=h)
        big = h.norm(dim=1) > 1
        low = torch.where(big, middle, low)
        high = torch.where(big, high, middle)
    return torch.nn.functional.normalize(h, dim=1)


def fixed_head_optimum(
    W,
    lambda_h: float,
    scale: float = 1.0,
    normalize: str = "none",
    loss: str = "ce",
    counts: Sequence[int] | None = None,
) -> dict:
    """Optimal features of the UFM with the classifier W [K, d] fixed (no bias).

    Objective (n_k samples of class k, N = sum_k n_k; ``counts=None`` means one sample per
    class, N = K; n(h) = h, or h/||h|| for ``normalize="l2"``)::

        f(H) = (1/N) sum_i loss(scale * W n(h_i), y_i) + (lambda_h/2) ||H||_F^2

    with loss ``ce`` (cross-entropy), ``mse`` (1/2 ||logits - e_y||^2) or ``dot_regression``
    (1/2 (w_y . n(h) - 1)^2, the fixed-head loss of Yang et al. 2022, which ignores ``scale``).
    The problem separates into one problem per sample; all samples of class k share

        h_k = argmin_h  loss(scale W n(h), k) + (N lambda_h / 2) ||h||^2,

    strictly convex for ``normalize="none"`` (needs lambda_h > 0).  The class counts enter only
    through N: the optimal features do not depend on how the N samples split into classes.
    For ``normalize="l2"`` the loss sees only the direction, the weight decay pushes ||h|| to 0,
    and the infimum is the best unit direction (returned, of norm 1; ``lambda_h`` is ignored;
    ``mse`` is not supported there).

    Returns a dict: ``features`` [K, d] (float64 tensor, row k = h_k), ``logits`` [K, K]
    (row k: scale W n(h_k)), ``proto_cos`` [K] (cos(h_k, w_k)), ``aligned`` (every
    proto_cos > 1 - 1e-9: the feature points at its own prototype), ``h_norm_sq`` [K] and
    ``objective`` (the minimum of f, or its infimum for ``normalize="l2"``).
    """
    W = _as_weight(W)
    K, d = W.shape
    loss = choice("loss", loss, LOSSES)
    normalize = choice("normalize", normalize, NORMALIZATIONS)
    scale = nonnegative("scale", scale, strict=True)
    counts = (1,) * K if counts is None else class_counts(counts)
    if len(counts) != K:
        raise FixedclsError(f"counts name {len(counts)} classes but W has {K} rows: give one count per row of W")
    lambda_h = nonnegative("lambda_h", lambda_h, strict=normalize == "none")
    n = torch.tensor(counts, dtype=_F64)
    N = float(n.sum())
    eye = torch.eye(K, dtype=_F64)

    if normalize == "l2":
        if loss == "mse":
            raise FixedclsError("fixed_head_optimum: loss 'mse' with normalize='l2' is not supported: use normalize='none'")
        features = torch.nn.functional.normalize(W, dim=1) if loss == "dot_regression" else _unit_direction_ce(W, scale)
    elif loss == "ce":
        features = _newton_ce(W, scale, torch.full((K,), N * lambda_h, dtype=_F64))
    elif loss == "mse":
        # Normal equations of 1/2 ||scale W h - e_k||^2 + N lambda_h / 2 ||h||^2, all classes at once.
        gram = scale**2 * W.T @ W + N * lambda_h * torch.eye(d, dtype=_F64)
        features = torch.linalg.solve(gram, scale * W.T).T
    else:
        features = W / ((W * W).sum(dim=1, keepdim=True) + N * lambda_h)

    directions = torch.nn.functional.normalize(features, dim=1) if normalize == "l2" else features
    logits = scale * directions @ W.T
    if loss == "ce":
        per_class = torch.logsumexp(logits, dim=1) - logits.diagonal()
    elif loss == "mse":
        per_class = 0.5 * ((logits - eye) ** 2).sum(dim=1)
    else:
        per_class = 0.5 * ((directions * W).sum(dim=1) - 1.0) ** 2
    h_norm_sq = (features * features).sum(dim=1)
    regulariser = 0.0 if normalize == "l2" else 0.5 * lambda_h * float((n * h_norm_sq).sum())
    proto_cos = torch.nn.functional.cosine_similarity(features, W, dim=1)
    return {
        "features": features,
        "logits": logits,
        "proto_cos": proto_cos,
        "aligned": bool((proto_cos > 1 - 1e-9).all()),
        "h_norm_sq": h_norm_sq,
        "objective": float((n * per_class).sum()) / N + regulariser,
    }
