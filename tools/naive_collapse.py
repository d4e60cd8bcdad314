"""Naive reference implementation of the SPEC section 3 collapse measures.

Written the way the original neural-collapse notebook (Papyan, Han & Donoho 2020) computes
them: a simulated data loader of ``batch_size`` samples, per-class Python loops, the
within-class covariance as a sum of per-sample outer products, per-sample nearest-class-
centre distances, and a numpy/scipy pseudo-inverse (``scipy.sparse.linalg.svds`` with
k = K-1, as in the notebook, when that is below d).  Same definitions as
``fixedcls.collapse.nc_metrics`` (absent classes left out, K counts present classes, nc4
over all rows of W), everything in float64, so both agree to ~1e-6 relative.

It exists as a baseline for the benchmark of ``nc_metrics`` and as an independent check.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg
from scipy.sparse.linalg import svds


def _np64(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def naive_nc_metrics(features, labels, weight, bias=None, batch_size: int = 128) -> dict[str, float]:
    """Collapse measures, the slow notebook way.  Arguments as ``nc_metrics``."""
    H = _np64(features)
    y = _np64(labels).astype(np.int64)
    W = _np64(weight)
    C, d = W.shape
    b = np.zeros(C) if bias is None else _np64(bias)
    n_total = H.shape[0]

    # ---- pass 1: class means ---------------------------------------------------------
    mean = [np.zeros(d) for _ in range(C)]
    N = [0 for _ in range(C)]
    for start in range(0, n_total, batch_size):
        h, t = H[start : start + batch_size], y[start : start + batch_size]
        for c in range(C):
            idxs = np.nonzero(t == c)[0]
            if len(idxs) == 0:
                continue
            h_c = h[idxs, :]
            mean[c] += np.sum(h_c, axis=0)
            N[c] += h_c.shape[0]
    present = [c for c in range(C) if N[c] > 0]
    K = len(present)
    for c in present:
        mean[c] /= N[c]
    M = np.stack([mean[c] for c in present]).T  # d x K

    # ---- pass 2: within-class covariance, NCC, cosines --------------------------------
    Sw = np.zeros((d, d))
    sq = {c: 0.0 for c in present}
    mismatch = 0
    cos_sum = 0.0
    for start in range(0, n_total, batch_size):
        h, t = H[start : start + batch_size], y[start : start + batch_size]
        output = h @ W.T + b
        for c in present:
            idxs = np.nonzero(t == c)[0]
            if len(idxs) == 0:
                continue
            h_c = h[idxs, :]
            z = h_c - mean[c][None, :]
            cov = np.matmul(z[:, :, None], z[:, None, :])  # per-sample outer products
            Sw += np.sum(cov, axis=0)
            sq[c] += float(np.sum(z**2))
            net_pred_for_c = np.argmax(output[idxs, :], axis=1)
            for i in range(h_c.shape[0]):
                ncc_scores = np.linalg.norm(h_c[i, :][:, None] - M, axis=0)
                ncc_pred = present[int(np.argmin(ncc_scores))]
                mismatch += int(ncc_pred != net_pred_for_c[i])
                nh, nw = np.linalg.norm(h_c[i]), np.linalg.norm(W[c])
                cos_sum += float(h_c[i] @ W[c] / (nh * nw)) if nh > 0 and nw > 0 else 0.0
    Sw /= sum(N)

    # ---- between-class statistics ------------------------------------------------------
    muG = np.mean(M, axis=1, keepdims=True)
    M_ = M - muG
    Sb = M_ @ M_.T / K
    Wp = W[present]

    out: dict[str, float] = {}
    r = min(d, K - 1)
    if r <= 0:
        out["nc1"] = math.nan
    else:
        if r < d:
            eigvec, eigval, _ = svds(Sb, k=r, random_state=0)
            inv_Sb = eigvec @ np.diag(eigval ** (-1)) @ eigvec.T
        else:
            inv_Sb = scipy.linalg.pinv(Sb)
        out["nc1"] = float(np.trace(Sw @ inv_Sb) / K)
    out["nc1_trace"] = float(np.trace(Sw) / np.trace(Sb))

    vals = []
    for a in range(K):
        for bb in range(a + 1, K):
            ca, cb = present[a], present[bb]
            va, vb = sq[ca] / N[ca], sq[cb] / N[cb]
            vals.append((va + vb) / (2 * np.sum((mean[ca] - mean[cb]) ** 2)))
    out["cdnv"] = float(np.mean(vals)) if vals else math.nan

    M_norms = np.linalg.norm(M_, axis=0)
    W_norms = np.linalg.norm(Wp.T, axis=0)
    out["nc2_equinorm"] = float(np.std(M_norms, ddof=1) / np.mean(M_norms)) if K > 1 else math.nan
    out["nc2_equinorm_w"] = float(np.std(W_norms, ddof=1) / np.mean(W_norms)) if K > 1 else math.nan

    if K > 1:
        Mn = M_ / M_norms
        cosine = Mn.T @ Mn
        off = []
        coh = 0.0
        for a in range(K):
            for bb in range(K):
                if a != bb:
                    off.append(cosine[a, bb])
                    coh += abs(cosine[a, bb] + 1.0 / (K - 1))
        out["nc2_equiangle"] = float(np.std(off, ddof=1))
        out["nc2_maxangle"] = float(coh / (K * (K - 1)))

        def compute_ETF(Mc):  # noqa: N802 - notebook name
            G = Mc.T @ Mc
            G = G / np.linalg.norm(G, "fro")
            sub = (np.eye(K) - np.ones((K, K)) / K) / math.sqrt(K - 1)
            return float(np.linalg.norm(G - sub, "fro"))

        out["nc2_etf_error"] = compute_ETF(M_)
    else:
        out["nc2_equiangle"] = out["nc2_maxangle"] = out["nc2_etf_error"] = math.nan

    normalized_M = M_ / np.linalg.norm(M_, "fro")
    normalized_W = Wp.T / np.linalg.norm(Wp.T, "fro")
    out["nc3"] = float(np.linalg.norm(normalized_W - normalized_M) ** 2)
    out["nc4"] = mismatch / n_total

    pc = []
    for c in present:
        nm, nw = np.linalg.norm(mean[c]), np.linalg.norm(W[c])
        pc.append(mean[c] @ W[c] / (nm * nw) if nm > 0 and nw > 0 else 0.0)
    out["proto_cos"] = float(np.mean(pc))
    out["sample_cos"] = cos_sum / n_total
    return out
