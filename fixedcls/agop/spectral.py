"""The Neural Feature Ansatz correlation, from a dense AGOP or from its C_out x C_out factor."""

from __future__ import annotations

import torch

from ..errors import FixedclsError
from .layers import _weight_blocks

_F64 = torch.float64
_NAN = float("nan")


def _spectral_pearson(w_sum: torch.Tensor, gram: torch.Tensor, spectrum, alpha: float, dim: int) -> float:
    """Pearson correlation of the entries of W^T W and V diag(lam^alpha) V^T over g groups of D x D entries.

    w_sum = W 1 [g, o]; gram = W W^T [g, o, o]; spectrum = (lam [g, r] >= 0, W V [g, o, r], V^T 1 [g, r]).
    Every sum over the D x D entries is a trace of small matrices, so neither D x D matrix is formed.
    """
    lam, wv, v_sum = spectrum
    entries = gram.shape[0] * dim**2
    power = lam.clamp_min(0).pow(alpha)
    gram_sum = w_sum.square().sum()  # 1^T W^T W 1
    gram_sq = gram.square().sum()  # ||W^T W||_F^2 = ||W W^T||_F^2
    power_sum = (power * v_sum.square()).sum()
    power_sq = power.square().sum()
    cross = (power * wv.square().sum(dim=1)).sum()  # <W^T W, V L V^T> = sum_l lam_l ||W v_l||^2
    cov = cross - gram_sum * power_sum / entries
    var = (gram_sq - gram_sum**2 / entries) * (power_sq - power_sum**2 / entries)
    return float(cov / var.sqrt()) if float(var) > 0 else _NAN


def _check_alpha(alpha) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise FixedclsError(f"nfa_correlation: alpha must be a positive number (the papers use 0.5 and 1), got {alpha!r}.")


def nfa_correlation(weight: torch.Tensor, agop: torch.Tensor, alpha: float = 0.5, init_weight: torch.Tensor | None = None) -> float:
    """Pearson correlation of the entries of W^T W and AGOP^alpha (the Neural Feature Ansatz).

    ``weight``: a Linear [C_out, D] or Conv2d [C_out, C_in / groups, k, k] weight; ``agop``: [D, D], or
    [groups, D_g, D_g] as :func:`layer_agop` returns it for a grouped convolution (then W^T W per group,
    all blocks' entries together).  Both are flattened, centred by their mean entry and compared by cosine.
    AGOP^alpha comes from a symmetric eigendecomposition with negative eigenvalues clamped to 0.
    ``init_weight``: use W - W_init instead of W.  NaN when either matrix is constant (an all-zero AGOP).
    """
    _check_alpha(alpha)
    blocks = agop.detach().to(_F64)
    blocks = blocks.unsqueeze(0) if blocks.dim() == 2 else blocks
    if blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2]:
        raise FixedclsError(f"nfa_correlation: agop must be [D, D] or [groups, D, D], got {tuple(agop.shape)}; pass layer_agop's result.")
    groups, dim = blocks.shape[0], blocks.shape[1]
    if weight.shape[0] % groups or weight.numel() != weight.shape[0] * dim:
        raise FixedclsError(f"nfa_correlation: weight {tuple(weight.shape)} does not fit an agop of {groups} block(s) of {dim} x {dim}; pass the layer's own weight.")
    w = _weight_blocks(weight, groups).to(blocks.device)
    if init_weight is not None:
        if init_weight.shape != weight.shape:
            raise FixedclsError(f"nfa_correlation: init_weight {tuple(init_weight.shape)} differs from weight {tuple(weight.shape)}; pass the same layer's initial weight.")
        w = w - _weight_blocks(init_weight, groups).to(w.device)
    lam, vec = torch.linalg.eigh(0.5 * (blocks + blocks.transpose(1, 2)))
    return _spectral_pearson(w.sum(dim=2), w @ w.transpose(1, 2), (lam, w @ vec, vec.sum(dim=1)), alpha, dim)


def _factored_spectrum(w: torch.Tensor, gram: torch.Tensor, outer: torch.Tensor):
    """The spectrum of AGOP = W^T K W per group for _spectral_pearson, without the D x D matrix.

    With K = Q S^2 Q^T and B = S Q^T W, AGOP = B^T B; the eigenpairs of B B^T = S Q^T (W W^T) Q S give
    AGOP's nonzero eigenvalues s^2 and eigenvectors V = W^T C, C = Q S U / s, so W V = (W W^T) C.
    """
    k_lam, k_vec = torch.linalg.eigh(outer)
    factor = k_vec * k_lam.clamp_min(0).sqrt().unsqueeze(1)  # Q S
    lam, u = torch.linalg.eigh(factor.transpose(1, 2) @ gram @ factor)
    keep = lam > lam.amax(dim=1, keepdim=True).clamp_min(0) * 1e-12  # zero eigenvalues have no defined V
    lam = torch.where(keep, lam, torch.zeros_like(lam))
    coef = factor @ u / torch.where(keep, lam, torch.ones_like(lam)).sqrt().unsqueeze(1)
    return lam, gram @ coef, (coef * w.sum(dim=2).unsqueeze(2)).sum(dim=1)  # V^T 1 = C^T W 1
