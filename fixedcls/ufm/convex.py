"""Exact optimum of the cross-entropy UFM for any class counts, through its convex reformulation.

For d >= K the nonconvex problem over (W, H) has the same minimum as a convex problem over the
logits alone, because min over W H = Z of (lambda_w ||W||^2 + lambda_h ||H||^2) / 2 is
sqrt(lambda_w lambda_h) ||Z||_* (the variational form of the nuclear norm).  By convexity and
the symmetry between samples of one class, all samples of a class share one logit vector, so
the unknown is a K x K matrix and FISTA with singular-value soft-thresholding solves it to
machine precision in milliseconds.  ``docs/ufm.md`` derives the reduction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ._checks import class_counts, nonnegative, positive_int

__all__ = ["ce_convex_oracle"]


def _log_softmax_columns(z: np.ndarray) -> np.ndarray:
    shifted = z - z.max(axis=0, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=0, keepdims=True))


def ce_convex_oracle(
    counts: Sequence[int],
    lambda_w: float,
    lambda_h: float,
    *,
    tol: float = 1e-12,
    max_iter: int = 200_000,
) -> dict:
    """Global optimum of the cross-entropy UFM with weight decay for any class counts (d >= K).

    Objective (n_k samples in class k, N = sum_k n_k, no bias)::

        f(W, H) = (1/N) sum_i CE(W h_i, y_i) + (lambda_w/2) ||W||_F^2 + (lambda_h/2) ||H||_F^2

    Its minimum over W [K, d], H [N, d] with d >= K equals that of the convex problem over
    X [K, K] (column k = sqrt(n_k) times the logits of every class-k sample, lam = sqrt(lambda_w lambda_h))::

        F(X) = sum_k (n_k/N) CE(x_k / sqrt(n_k), k) + lam ||X||_*

    solved by FISTA with adaptive restart and singular-value soft-thresholding (the smooth
    part is 1/(2N)-smooth).  From X = U S V^T one global minimiser of f is
    W = (lambda_h/lambda_w)^(1/4) U S^(1/2) and, for every sample of class k,
    h_k = (lambda_w/lambda_h)^(1/4) S^(1/2) V^T e_k / sqrt(n_k) (unique up to a rotation of R^d).

    Returns a dict of float64 numpy arrays and numbers: ``W`` [K, K], ``features`` [K, K]
    (row k: the feature of every class-k sample), ``logits`` [K, K] (row k: W h_k),
    ``w_norm_sq`` [K], ``h_norm_sq`` [K], ``singular_values`` (of X), ``objective``,
    ``trivial`` (X = 0), ``iterations`` and ``gap`` (the final prox-gradient step, the
    stopping measure; it is below ``tol`` unless ``max_iter`` ran out).
    Minority collapse shows as equal rows of ``W``; see :func:`minority_collapse_threshold`.
    """
    counts = class_counts(counts)
    lambda_w = nonnegative("lambda_w", lambda_w, strict=True)
    lambda_h = nonnegative("lambda_h", lambda_h, strict=True)
    max_iter = positive_int("max_iter", max_iter)
    tol = nonnegative("tol", tol, strict=True)
    n = np.asarray(counts, dtype=np.float64)
    K, N = len(counts), float(n.sum())
    lam = math.sqrt(lambda_w * lambda_h)
    sqrt_n = np.sqrt(n)
    weight = n / N  # class weights n_k / N in the averaged loss
    step = 2.0 * N  # 1/L: the Hessian of CE is at most 1/2 I and column k is scaled by 1/n_k
    eye = np.eye(K)

    # CE ignores a constant added to all logits of a sample, and removing it never increases the
    # nuclear norm, so the optimum has logit columns summing to zero.  Solving for the coordinates
    # in an orthonormal basis of that subspace removes the loss's flat direction, on which FISTA
    # otherwise creeps.
    basis = np.linalg.svd(eye - 1.0 / K)[0][:, : K - 1]  # [K, K-1], orthonormal, orthogonal to 1

    def smooth(coords: np.ndarray) -> tuple[float, np.ndarray]:
        logp = _log_softmax_columns(basis @ coords / sqrt_n)
        value = float(-(weight * np.diagonal(logp)).sum())
        grad = basis.T @ ((np.exp(logp) - eye) * (weight / sqrt_n))
        return value, grad

    def prox(coords: np.ndarray) -> np.ndarray:
        u, s, vt = np.linalg.svd(coords, full_matrices=False)
        return (u * np.maximum(s - step * lam, 0.0)) @ vt

    x = np.zeros((K - 1, K))
    y, momentum = x.copy(), 1.0
    gap = math.inf
    for iteration in range(1, max_iter + 1):
        x_new = prox(y - step * smooth(y)[1])
        gap = float(np.abs(x_new - y).max()) / step
        if gap <= tol:
            x = x_new
            break
        # Gradient-based adaptive restart (O'Donoghue & Candes 2015): drop the momentum when it
        # points uphill.  Unlike the objective test it still works once the objective has stopped
        # changing in floating point.
        if float(((y - x_new) * (x_new - x)).sum()) > 0.0:
            momentum = 1.0
        momentum_new = (1.0 + math.sqrt(1.0 + 4.0 * momentum * momentum)) / 2.0
        y = x_new + ((momentum - 1.0) / momentum_new) * (x_new - x)
        x, momentum = x_new, momentum_new

    objective = smooth(x)[0] + lam * float(np.linalg.svd(x, compute_uv=False).sum())
    u, s, vt = np.linalg.svd(basis @ x)
    # Singular values that the soft-threshold zeroed come back from the SVD of basis @ x as
    # rounding noise (~1e-16), whose square roots (~1e-8) would blur exactly collapsed rows.
    s[s <= 64 * np.finfo(np.float64).eps * max(float(s.max()), 1.0)] = 0.0
    root = np.sqrt(s)
    W = (lambda_h / lambda_w) ** 0.25 * (u * root)
    features = (lambda_w / lambda_h) ** 0.25 * (vt.T * root) / sqrt_n[:, None]
    return {
        "W": W,
        "features": features,
        "logits": features @ W.T,
        "w_norm_sq": (W * W).sum(axis=1),
        "h_norm_sq": (features * features).sum(axis=1),
        "singular_values": s,
        "objective": objective,
        "trivial": bool(s.max() == 0.0),
        "iterations": iteration,
        "gap": gap,
    }
