"""The pairwise measures of the class means (SPEC section 3), reduced over tiles of class pairs.

``cdnv``, ``nc2_equiangle``, ``nc2_maxangle``, ``nc2_etf_error``, ``gnc2_log`` and ``gnc2_log_var`` are
reductions over the K(K-1)/2 pairs of present classes.  They are taken tile by tile: one T x T block
of the Gram matrix M-dot M-dot^T at a time (the blocks on or above the diagonal, each pair once), so
the memory is O(K d + d^2 + T^2) whatever K, never K x K (8.6 GB in float64 at K = 32,768).

Means and spreads are merged across tiles with the pairwise update of Chan, Golub and LeVeque
(1979): each tile contributes its own two-pass mean and sum of squared deviations, so a spread far
below the mean (the cosines of a near-simplex, all close to -1/(K-1)) keeps its precision, which a
running sum of squares would lose.  With K <= T there is one tile and the reduction is the
untiled one.
"""

from __future__ import annotations

import math

import torch

#: Classes per tile side: a T x T float64 block is 2 MB, so the elementwise passes over a tile run in
#: cache (on a 2-core EPYC the pairwise measures of K = 8,192 take 1.0 s with T = 512, 1.3 s with 1,024,
#: 1.7 s with 2,048); K = 32,768 takes 2,080 tiles, some 50,000 tensor operations in all.
TILE = 512
_F64 = torch.float64
_LN2 = math.log(2.0)


class _Moments:
    """Count, mean and sum of squared deviations of a stream of value blocks (0-dim float64 tensors, so
    no device synchronisation per tile), merged with Chan et al.'s update."""

    def __init__(self, device: torch.device):
        self.n = 0
        self.mean = torch.zeros((), dtype=_F64, device=device)
        self.m2 = torch.zeros((), dtype=_F64, device=device)

    def add(self, values: torch.Tensor) -> None:
        count = values.numel()
        if count == 0:
            return
        mean = values.mean()
        m2 = torch.linalg.vector_norm(values - mean).square()
        total = self.n + count
        delta = mean - self.mean
        self.m2 = self.m2 + m2 + delta.square() * (self.n * count / total)
        self.mean = self.mean + delta * (count / total)
        self.n = total


def _tiles(K: int, tile: int):
    """(start_i, end_i, start_j, end_j) of the blocks on and above the diagonal."""
    for i0 in range(0, K, tile):
        for j0 in range(i0, K, tile):
            yield i0, min(i0 + tile, K), j0, min(j0 + tile, K)


def pairwise_measures(md: torch.Tensor, var_c: torch.Tensor, tile: int = TILE) -> dict[str, float]:
    """The pairwise measures of the centred class means ``md`` [K, d] (rows mu_c - mu_G of the present
    classes, float64) and the per-class variances ``var_c`` [K] (mean squared distance to the class
    mean), over tiles of ``tile`` x ``tile`` class pairs.  K >= 2."""
    K = md.shape[0]
    tile = max(int(tile), 1)
    device = md.device
    sq = (md * md).sum(dim=1)
    inv_norm = sq.sqrt().clamp_min(torch.finfo(_F64).tiny).reciprocal()  # a zero row has cosine 0 with all
    # ||G||_F from the d x d product: ||M M^T||_F^2 = tr((M^T M)^2), so no K x K matrix is needed for it.
    inv_gram_norm = 1.0 / torch.linalg.matrix_norm(md.T @ md)
    off_target = 1.0 / (K * math.sqrt(K - 1))  # -(entry off the diagonal) of (I - 11^T/K)/sqrt(K-1)
    diag_target = 1.0 / math.sqrt(K - 1)  # what the diagonal adds to it
    shift = 1.0 / (K - 1)
    cdnv_sum = torch.zeros((), dtype=_F64, device=device)
    maxangle_sum = torch.zeros((), dtype=_F64, device=device)
    etf_sq = torch.zeros((), dtype=_F64, device=device)
    cosines, logs = _Moments(device), _Moments(device)
    for i0, i1, j0, j1 in _tiles(K, tile):
        gram = md[i0:i1] @ md[j0:j1].T
        # nc2_etf_error: the whole block against the target; a block off the diagonal stands for its mirror too
        err = gram * inv_gram_norm + off_target
        if i0 == j0:
            err.diagonal().sub_(diag_target)
        etf_sq += torch.linalg.vector_norm(err).square() * (1.0 if i0 == j0 else 2.0)
        del err
        if i0 == j0:  # the pairs c < c' of a diagonal block: its strict upper triangle
            rows, cols = torch.triu_indices(i1 - i0, i1 - i0, offset=1, device=device)
            gram = gram[rows, cols]
            a, b = rows + i0, cols + i0
            sq_a, sq_b, var_a, var_b, inv_a, inv_b = sq[a], sq[b], var_c[a], var_c[b], inv_norm[a], inv_norm[b]
        else:
            sq_a, var_a, inv_a = sq[i0:i1, None], var_c[i0:i1, None], inv_norm[i0:i1, None]
            sq_b, var_b, inv_b = sq[None, j0:j1], var_c[None, j0:j1], inv_norm[None, j0:j1]
        # cdnv: (v_c + v_c') / (2 ||mu_c - mu_c'||^2), the squared distance from the Gram entries
        dist2 = (sq_a + sq_b).sub_(gram, alpha=2.0).clamp_min_(0.0)
        cdnv_sum += (var_a + var_b).div_(dist2).sum()
        del dist2
        cos = gram.mul_(inv_a).mul_(inv_b)  # the Gram block is not needed any more
        cosines.add(cos)
        maxangle_sum += torch.linalg.vector_norm(cos + shift, ord=1)
        # gnc2: -log ||u_c - u_c'|| = -(ln 2 + log1p(-cos)) / 2 for unit u; its moments follow from those of log1p(-cos)
        logs.add(torch.log1p(cos.neg_()))
    pairs = cosines.n
    # nc2_equiangle is the Bessel std over the K(K-1) ORDERED pairs: each unordered value twice (same mean,
    # twice the squared deviations, 2 * pairs - 1 degrees of freedom)
    return {
        "cdnv": float(cdnv_sum / (2.0 * pairs)),
        "nc2_equiangle": float((2.0 * cosines.m2 / (2 * pairs - 1)).sqrt()),
        "nc2_maxangle": float(maxangle_sum / pairs),
        "nc2_etf_error": float(etf_sq.sqrt()),
        "gnc2_log": float(-0.5 * (_LN2 + logs.mean)),
        "gnc2_log_var": float(0.25 * logs.m2 / pairs),
    }
