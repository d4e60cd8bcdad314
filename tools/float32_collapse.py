"""Float32 streaming reference of the SPEC section 3 collapse measures (a benchmark contender).

Written here the way the fastest public neural-collapse code computes them: batches of
``batch_size`` samples; pass 1 takes the class sums as one float32 GEMM with a one-hot matrix;
pass 2 takes, per batch, the within-class scatter (X - M[y])^T (X - M[y]), per-class squared
distances (for cdnv), the classifier's and the nearest-class-centre decisions from
X W^T + b and ||x||^2 - 2 X M^T + ||M||^2, and the cosines of the samples to their class's row
of W -- everything in float32, the final measures too.  Same definitions as
``fixedcls.collapse.nc_metrics`` (absent classes left out, K counts present classes, nc4 over all
rows of W), so values can be compared.

It is fast and usually close (NC1 within ~1e-7 relative on well-spread features) but not safe near
collapse: a float32 class sum of features with a large common offset loses their spread, which
is why ``fixedcls.collapse`` accumulates in float64.  It exists as a contender for
``tools/bench.py`` (figure ``nc_metrics_speedup_vs_float32_streaming``), not as library code.
"""

from __future__ import annotations

import math

import torch

_F32 = torch.float32


def _std_over_mean(v: torch.Tensor) -> float:
    return float(v.std(unbiased=True) / v.mean()) if v.numel() > 1 else math.nan


@torch.no_grad()
def float32_nc_metrics(features, labels, weight, bias=None, batch_size: int = 1024) -> dict[str, float]:
    """Collapse measures, the float32 streaming way.  Arguments as ``nc_metrics``."""
    H = features.detach().to(_F32)
    y = labels.detach().to(H.device, torch.long)
    W = weight.detach().to(H.device, _F32)
    b = torch.zeros(W.shape[0], dtype=_F32, device=H.device) if bias is None else bias.detach().to(H.device, _F32)
    C, d = W.shape
    n_total = H.shape[0]
    batches = [(H[s : s + batch_size], y[s : s + batch_size]) for s in range(0, n_total, batch_size)]

    # ---- pass 1: class sums by a one-hot GEMM --------------------------------------------
    sums = torch.zeros(C, d, dtype=_F32, device=H.device)
    counts = torch.zeros(C, dtype=_F32, device=H.device)
    for h, t in batches:
        onehot = torch.nn.functional.one_hot(t, C).to(_F32).T  # [C, B]
        sums.addmm_(onehot, h)
        counts += onehot.sum(dim=1)
    present = (counts > 0).nonzero().squeeze(1)
    K = int(present.numel())
    means = sums / counts.clamp_min(1.0).unsqueeze(1)
    M = means[present]  # [K, d]
    M_sq = (M * M).sum(dim=1)
    w_norm = W.norm(dim=1)

    # ---- pass 2: scatter around the class means, decisions, sample cosines -----------------
    Sw = torch.zeros(d, d, dtype=_F32, device=H.device)
    sq = torch.zeros(C, dtype=_F32, device=H.device)
    mismatch = 0
    cos_sum = 0.0
    for h, t in batches:
        r = h - means[t]
        Sw.addmm_(r.T, r)
        sq.index_add_(0, t, (r * r).sum(dim=1))
        hw = h @ W.T
        net = (hw + b).argmax(dim=1)
        ncc = present[(M_sq.unsqueeze(0) - 2.0 * h @ M.T).argmin(dim=1)]  # ||h||^2 is common to every class
        mismatch += int((net != ncc).sum())
        h_norm = h.norm(dim=1).clamp_min(torch.finfo(_F32).tiny)
        cos_sum += float((hw.gather(1, t.unsqueeze(1)).squeeze(1) / (h_norm * w_norm[t].clamp_min(torch.finfo(_F32).tiny))).sum())

    # ---- the measures, in float32 ---------------------------------------------------------
    out: dict[str, float] = {"nc4": mismatch / n_total if n_total else math.nan}
    N = counts.sum()
    Md = M - M.mean(dim=0)
    Sigma_W = Sw / N
    Sigma_B = Md.T @ Md / K
    r_keep = min(d, K - 1)
    if r_keep > 0:
        lam, V = torch.linalg.eigh(Sigma_B)
        V, lam = V[:, -r_keep:], lam[-r_keep:]
        out["nc1"] = float(((V.T @ Sigma_W @ V).diagonal() / lam).sum() / K)
    else:
        out["nc1"] = math.nan
    out["nc1_trace"] = float(Sigma_W.trace() / Sigma_B.trace())
    Wp = W[present]
    out["nc2_equinorm_w"] = _std_over_mean(Wp.norm(dim=1))
    if K > 1:
        var = sq[present] / counts[present]
        iu = torch.triu_indices(K, K, offset=1, device=H.device)
        pair_d2 = ((M[iu[0]] - M[iu[1]]) ** 2).sum(dim=1)
        out["cdnv"] = float(((var[iu[0]] + var[iu[1]]) / (2.0 * pair_d2)).mean())
        norms = Md.norm(dim=1)
        out["nc2_equinorm"] = _std_over_mean(norms)
        unit = Md / norms.unsqueeze(1)
        off = (unit @ unit.T)[~torch.eye(K, dtype=torch.bool, device=H.device)]
        out["nc2_equiangle"] = float(off.std(unbiased=True))
        out["nc2_maxangle"] = float((off + 1.0 / (K - 1)).abs().mean())
        G = Md @ Md.T
        target = (torch.eye(K, dtype=_F32, device=H.device) - 1.0 / K) / math.sqrt(K - 1)
        out["nc2_etf_error"] = float(torch.linalg.matrix_norm(G / torch.linalg.matrix_norm(G) - target))
    else:
        out.update(cdnv=math.nan, nc2_equinorm=math.nan, nc2_equiangle=math.nan, nc2_maxangle=math.nan,
                   nc2_etf_error=math.nan)
    out["nc3"] = float(torch.linalg.matrix_norm(Wp / torch.linalg.matrix_norm(Wp) - Md / torch.linalg.matrix_norm(Md)) ** 2)
    out["proto_cos"] = float(((M * Wp).sum(dim=1) / (M.norm(dim=1) * Wp.norm(dim=1))).mean())
    out["sample_cos"] = cos_sum / n_total if n_total else math.nan
    return out
