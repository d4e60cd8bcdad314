"""Minority collapse (Fang et al., PNAS 2021): on imbalanced data the classifier rows of the rare classes,
and their class means, crowd together, so those classes become hard to tell apart.

:func:`minority_collapse` measures it from the class means and the classifier rows, given which classes
are the minority (the few-shot group of fixedcls.imbalance) and which the majority (the many-shot group):

* ``minority_w_cos`` -- mean over pairs c < c' of minority classes of cos(w_c, w_c');
* ``minority_mu_cos`` -- the same for the centred class means mu_c - mu_G (mu_G: the unweighted mean of the
  means of the classes present, as in SPEC section 3);
* ``minority_w_norm_ratio`` -- mean_minority ||w_c|| / mean_majority ||w_c||;
* ``minority_mu_norm_ratio`` -- the same for ||mu_c - mu_G||.

Collapsed minority rows give cos 1; a regular simplex gives -1/(K-1) for every pair. For a fixed head the
``w`` measures are constants of the polytope (its rows never move), which makes them the reference the
learned head is compared against. Classes without samples are left out (their rows of W too).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

MINORITY_KEYS: tuple[str, ...] = ("minority_w_cos", "minority_mu_cos", "minority_w_norm_ratio", "minority_mu_norm_ratio")

_F64 = torch.float64


def _mean_pairwise_cos(rows: torch.Tensor) -> float:
    """Mean over pairs c < c' of cos(r_c, r_c'), without the n x n matrix of cosines (n can be most of K):
    sum_{c != c'} u_c.u_c' = ||sum_c u_c||^2 - sum_c ||u_c||^2 for the unit rows u_c."""
    unit = rows / torch.linalg.vector_norm(rows, dim=1, keepdim=True).clamp_min(torch.finfo(_F64).tiny)
    n = unit.shape[0]
    off_diagonal = torch.linalg.vector_norm(unit.sum(dim=0)).square() - torch.linalg.vector_norm(unit).square()
    return float(off_diagonal / (n * (n - 1)))


def _norm_ratio(rows: torch.Tensor, minority: list[int], majority: list[int]) -> float:
    norms = torch.linalg.vector_norm(rows, dim=1)
    return float(norms[minority].mean() / norms[majority].mean().clamp_min(torch.finfo(_F64).tiny))


def minority_collapse(
    means: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    minority: Sequence[int],
    majority: Sequence[int] = (),
    present: Optional[torch.Tensor] = None,
) -> dict[str, float]:
    """The minority-collapse measures of class means [K, d] and classifier rows [K, d] (either may be None).

    ``present`` [K] (bool): the classes with samples (default: all). A cosine needs two minority classes
    present, a ratio one minority and one majority class; a measure without them is left out of the result.
    """
    reference = means if means is not None else weight
    if reference is None:
        return {}
    K = reference.shape[0]
    present = torch.ones(K, dtype=torch.bool) if present is None else present.detach().to("cpu", torch.bool)
    minority = [int(c) for c in minority if 0 <= int(c) < K and bool(present[int(c)])]
    majority = [int(c) for c in majority if 0 <= int(c) < K and bool(present[int(c)])]
    out: dict[str, float] = {}
    for name, rows in (("w", weight), ("mu", means)):
        if rows is None:
            continue
        rows = rows.detach().to("cpu", _F64)
        if name == "mu":  # centred by the unweighted mean of the present class means
            rows = rows - rows[present].mean(dim=0, keepdim=True)
        if len(minority) >= 2:
            out[f"minority_{name}_cos"] = _mean_pairwise_cos(rows[minority])
        if minority and majority:
            out[f"minority_{name}_norm_ratio"] = _norm_ratio(rows, minority, majority)
    return {key: out[key] for key in MINORITY_KEYS if key in out}
