"""The neural-collapse statistics (SPEC section 3): the measures from float64 statistics, shared checks.

* :func:`_metrics_from_stats` -- every SPEC measure from class means, counts, the scatter, ...
* :class:`OnlineCollapse` -- an approximate one-pass measure fed from the training forward.
* the exact two-pass :class:`~fixedcls.collapse.exact.CollapseAccumulator` and ``nc_metrics`` live in
  :mod:`.exact`.

Notation (SPEC): K classes *present* in the data, mu_c class means, mu_G = mean_c mu_c
(unweighted), M-dot rows mu_c - mu_G, W rows w_c.  Classes with no sample are left out of
every measure (their rows of W too); only ``nc4`` takes the classifier decision over all
rows of W, as the network does.

Numerics: all statistics are accumulated in float64 from features centred by their class
mean (never E[hh^T] - mu mu^T), and Sigma_B^+ comes from a float64 symmetric
eigendecomposition that keeps the top min(d, K-1) eigenpairs (no absolute cut-off).  By default
the exact accumulator takes its large products (class sums, the d x d scatter, the decision
products) in float32, but only of residuals already centred in full precision, so a large common
offset never cancels; ``scatter_dtype=torch.float64`` takes every product in float64 (see
:class:`CollapseAccumulator` for the precision contract).

Distributed use: every accumulator exposes ``state_tensors()``, a list of float64 tensors
that must be all-reduced with SUM across processes at fixed points (see each class), and
``finalize_means``/``compute`` take an optional ``reduce_fn(tensor)`` hook that does this
in place, e.g. ``lambda t: torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)``.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from ..errors import FixedclsError  # user-facing, a ValueError subclass
from .decisions import _NCC, _decisions
from .pairwise import TILE, pairwise_measures

#: Keys of SPEC section 3, in the order of the specification.
METRIC_KEYS: tuple[str, ...] = (
    "nc1",
    "nc1_trace",
    "cdnv",
    "nc2_equinorm",
    "nc2_equinorm_w",
    "nc2_equiangle",
    "nc2_maxangle",
    "nc2_etf_error",
    "nc3",
    "nc4",
    "proto_cos",
    "sample_cos",
)
#: The measures SPEC section 3 added for large K, after METRIC_KEYS: generalized NC2 (hyperspherical uniformity,
#: Liu et al. 2023; Wu & Papyan 2024), uniform duality and nearest-class-centre accuracy.  Always returned.
EXTRA_KEYS: tuple[str, ...] = ("gnc2_log", "gnc2_log_var", "unc3", "ncc_acc")
#: Returned only with OOD features (Ammar et al. 2024).
OOD_KEYS: tuple[str, ...] = ("nc5",)
#: The NC1 family reported per backbone stage by deep-collapse measurement.
NC1_KEYS: tuple[str, ...] = ("nc1", "nc1_trace")
#: Keys that need the classifier rows W.
_WEIGHT_KEYS = frozenset({"nc2_equinorm_w", "nc3", "proto_cos", "sample_cos", "unc3"})
#: Measures that grow towards collapse (all others shrink towards 0; gnc2_log towards its minimum).
_GROWING_KEYS = frozenset({"proto_cos", "sample_cos", "ncc_acc"})

ReduceFn = Callable[[torch.Tensor], object]

_F64 = torch.float64
_NAN = float("nan")


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows divided by their L2 norm; zero rows stay zero (cosine with them is 0)."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def _std_over_mean(v: torch.Tensor) -> float:
    if v.numel() < 2:
        return _NAN
    return float(v.std(unbiased=True) / v.mean())


def _metrics_from_stats(
    *,
    means: torch.Tensor,
    counts: torch.Tensor,
    scatter: torch.Tensor,
    sqdist: torch.Tensor,
    normsums: torch.Tensor,
    mismatches: float,
    scored: float,
    weight: torch.Tensor | None,
    ncc_hits: torch.Tensor | None = None,
    ood: torch.Tensor | None = None,
    tile: int = TILE,
) -> dict[str, float]:
    """All SPEC measures from float64 statistics over all ``num_classes`` rows.

    means [C, d] (rows of absent classes ignored), counts [C] (samples per class),
    scatter [d, d] = sum_i (h_i - mu_y)(h_i - mu_y)^T, sqdist [C] = sum_{i in c} ||h_i - mu_c||^2,
    normsums [C, d] = sum_{i in c} h_i / ||h_i||, mismatches / scored for nc4,
    weight [C, d] or None (then the keys that need W are not returned), ncc_hits [2] = (samples whose
    nearest class mean is their own, samples decided) for ncc_acc, ood [d + 1] = (sum of the OOD
    features, their count) for nc5 (left out when None or empty), tile: the class tile of the pairwise
    measures (:mod:`.pairwise`).
    """
    keys = METRIC_KEYS + EXTRA_KEYS
    out: dict[str, float] = {k: _NAN for k in keys if weight is not None or k not in _WEIGHT_KEYS}
    present = (counts > 0).nonzero().squeeze(1)
    K = int(present.numel())
    out["nc4"] = float(mismatches / scored) if scored > 0 else _NAN
    if ncc_hits is not None and float(ncc_hits[1]) > 0:
        out["ncc_acc"] = float(ncc_hits[0] / ncc_hits[1])
    with_ood = ood is not None and float(ood[-1]) > 0
    if with_ood:
        out["nc5"] = _NAN
    if K == 0:
        return out
    d = means.shape[1]
    n_c = counts[present]
    N = n_c.sum()
    mu = means[present]  # [K, d]
    mu_g = mu.mean(dim=0)
    md = mu - mu_g  # M-dot, [K, d]

    sigma_w = scatter / N
    sigma_b = md.T @ md / K
    sigma_b = 0.5 * (sigma_b + sigma_b.T)
    r = min(d, K - 1)
    if r > 0:
        evals, evecs = torch.linalg.eigh(sigma_b)  # ascending
        v = evecs[:, -r:]
        lam = evals[-r:]
        out["nc1"] = float(((v.T @ sigma_w @ v).diagonal() / lam).sum() / K)
    out["nc1_trace"] = float(sigma_w.trace() / sigma_b.trace())

    if K >= 2:
        norms = md.norm(dim=1)
        out["nc2_equinorm"] = _std_over_mean(norms)
        out.update(pairwise_measures(md, sqdist[present].clamp_min(0.0) / n_c, tile))
    if weight is not None:
        w = weight.detach().to(device=means.device, dtype=_F64)
        wp = w[present]
        out["nc2_equinorm_w"] = _std_over_mean(wp.norm(dim=1))
        diff = wp / torch.linalg.matrix_norm(wp) - md / torch.linalg.matrix_norm(md)
        out["nc3"] = float(torch.linalg.matrix_norm(diff) ** 2)
        out["proto_cos"] = float((_unit_rows(mu) * _unit_rows(wp)).sum(dim=1).mean())
        out["sample_cos"] = float((normsums[present] * _unit_rows(wp)).sum() / N)
        out["unc3"] = _std_over_mean((_unit_rows(wp) * _unit_rows(md)).sum(dim=1))
    if with_ood:
        out["nc5"] = nc5(mu, ood[:-1] / ood[-1])
    return out


def nc5(class_means: torch.Tensor, ood_mean: torch.Tensor) -> float:
    """``nc5`` (Ammar et al. 2024): the mean over the rows of ``class_means`` [K, d] (the uncentred means of the
    classes present) of |cos(mu_c, mu_ood)|, ``ood_mean`` [d] the mean OOD feature; 0 when they are orthogonal."""
    mu = class_means.detach().to(_F64)
    unit_ood = _unit_rows(ood_mean.detach().to(mu.device, _F64).reshape(1, -1)).squeeze(0)
    return float((_unit_rows(mu) @ unit_ood).abs().mean())


def ood_sums(h: torch.Tensor, dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[d + 1] float64: the sum of the OOD feature rows h [B, d] and their count, what ``nc5`` needs of them
    (accumulators add these and all-reduce them like their other sums)."""
    if not torch.is_tensor(h) or h.dim() != 2 or h.shape[1] != dim:
        shape = tuple(h.shape) if torch.is_tensor(h) else type(h).__name__
        raise FixedclsError(f"collapse: OOD features must have shape [M, {dim}], got {shape}; pass the same model's features of the OOD data.")
    h64 = h.detach().to(device if device is not None else h.device, _F64)
    return torch.cat([h64.sum(dim=0), torch.tensor([float(h64.shape[0])], dtype=_F64, device=h64.device)])


def _check_labels(y: torch.Tensor, num_classes: int) -> None:
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise FixedclsError(
            f"collapse: labels must lie in [0, {num_classes}) but range over "
            f"[{int(y.min())}, {int(y.max())}]; pass num_classes / a weight with one row per class."
        )


def _check_batch(h: torch.Tensor, y: torch.Tensor, dim: int) -> None:
    if h.dim() != 2 or h.shape[1] != dim:
        raise FixedclsError(f"collapse: features must have shape [B, {dim}], got {tuple(h.shape)}; pass h from model(x, return_features=True).")
    if y.dim() != 1 or y.shape[0] != h.shape[0]:
        raise FixedclsError(f"collapse: labels must have shape [{h.shape[0]}], got {tuple(y.shape)}; pass one integer label per feature row.")


def _check_weight(weight: torch.Tensor, bias: torch.Tensor | None, num_classes: int, dim: int) -> None:
    if weight.dim() != 2 or tuple(weight.shape) != (num_classes, dim):
        raise FixedclsError(f"collapse: weight must have shape [{num_classes}, {dim}], got {tuple(weight.shape)}; pass model.head.weight.")
    if bias is not None and tuple(bias.shape) != (num_classes,):
        raise FixedclsError(f"collapse: bias must have shape [{num_classes}], got {tuple(bias.shape)}; pass model.head.bias or None.")


class OnlineCollapse:
    """Approximate one-pass collapse measure fed from the training forward.

    Call ``update(h.detach(), y, logits.detach())`` at every training step and
    ``compute(model.head.weight, model.head.bias)`` at the end of the epoch.

    The values are NOT those of a frozen model: features come from the model as it moves
    during the epoch (pass-2 quantities are taken around the epoch's running class means).
    They are exact when the features do not change (e.g. a frozen backbone) apart from
    ``nc4`` of the first measured epoch.

    Numerics: per class it keeps shifted sums sum_i (h_i - s_y) with the shift s_c = the
    class mean of the previous measurement (zero at first), plus ONE d x d accumulator of
    sum_i (h_i - s_y)(h_i - s_y)^T; the within-class scatter is recovered exactly by
    sum_i (h_i-mu_y)(h_i-mu_y)^T = sum_i (h_i-s_y)(h_i-s_y)^T - sum_c n_c (mu_c-s_c)(mu_c-s_c)^T,
    well conditioned once s_c is close to mu_c.  ``nc4`` compares the classifier decision
    (argmax of the step's logits) with the nearest previous-epoch class mean (the shifts);
    it is NaN in the first epoch, when no previous means exist.  ``ncc_acc`` is the share of the
    epoch's samples whose nearest previous-epoch class mean is their own class (NaN in the first
    epoch too); nearest-centre decisions are taken over chunks of ``tile`` classes and the pairwise
    measures over tiles, so the memory is O(K d + d^2 + tile^2) whatever K.  ``nc5``: feed the
    epoch's OOD features to :meth:`update_ood` (or their sums to :meth:`add_ood`) before :meth:`compute`.

    :meth:`compute` returns the measures, moves the shifts to this epoch's means (classes
    seen) and clears the sums for the next epoch.  Distributed: all-reduce
    :meth:`state_tensors` with SUM before :meth:`compute` (or pass ``reduce_fn``).
    """

    def __init__(self, num_classes: int, dim: int, device: torch.device | str | None = None, *, tile: int = TILE):
        self.num_classes = int(num_classes)
        self.dim = int(dim)
        if int(tile) < 1:
            raise FixedclsError(f"collapse: tile must be a positive number of classes, got {tile}.")
        self.tile = int(tile)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        kw = {"dtype": _F64, "device": self.device}
        self.shifts = torch.zeros(self.num_classes, self.dim, **kw)
        self.has_shift = torch.zeros(self.num_classes, dtype=torch.bool, device=self.device)
        self._ncc: _NCC | None = None
        self.reset()

    def reset(self) -> None:
        """Clear the epoch's sums (the shifts -- previous means -- are kept)."""
        K, d, kw = self.num_classes, self.dim, {"dtype": _F64, "device": self.device}
        self.sums = torch.zeros(K, d, **kw)  # sum (h - s_y)
        self.counts = torch.zeros(K, **kw)
        self.scatter = torch.zeros(d, d, **kw)  # sum (h - s_y)(h - s_y)^T
        self.sqdist = torch.zeros(K, **kw)  # sum ||h - s_y||^2
        self.normsums = torch.zeros(K, d, **kw)  # sum h / ||h||
        self.decisions = torch.zeros(2, **kw)  # [mismatches, scored]
        self.ncc_hits = torch.zeros(2, **kw)  # [nearest previous mean is the own class, decided]
        self.ood = torch.zeros(d + 1, **kw)  # [sum of the OOD features, their count]

    _SUMS = ("sums", "counts", "scatter", "sqdist", "normsums", "decisions", "ncc_hits", "ood")
    #: The sums a state written before ncc_hits and ood existed holds (those two then start at zero).
    _FIRST_SUMS = _SUMS[:6]

    def state_tensors(self) -> list[torch.Tensor]:
        """Tensors to all-reduce (SUM, in place) once, after the epoch and before compute()."""
        return [getattr(self, name) for name in self._SUMS]

    def state_dict(self, sums: Sequence[torch.Tensor] | None = None, *, with_sums: bool = True) -> dict[str, torch.Tensor]:
        """The shifts (previous means) and the epoch's partial sums, so that a run resumed mid-epoch measures
        exactly what an uninterrupted run measures.  `sums`: the partial sums to store instead of this
        process's own (under DDP: their all-reduced copies, see :meth:`state_tensors`); `with_sums=False`:
        the shifts alone (at an epoch's end, where the next epoch starts from empty sums anyway)."""
        state = {"shifts": self.shifts.clone(), "has_shift": self.has_shift.clone()}
        if with_sums:
            sums = list(sums) if sums is not None else self.state_tensors()
            state.update({name: t.clone() for name, t in zip(self._SUMS, sums)})
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor], *, with_sums: bool = True) -> None:
        """Restore the shifts, and the partial sums when the state has them and `with_sums` (under DDP one rank
        takes the all-reduced sums, the others start from zero, so the next all-reduce counts them once)."""
        self.shifts.copy_(state["shifts"])
        self.has_shift.copy_(state["has_shift"])
        self._ncc = _NCC(self.shifts, self.has_shift)
        self.reset()
        if with_sums and all(name in state for name in self._FIRST_SUMS):
            for name, target in zip(self._SUMS, self.state_tensors()):
                if name in state:
                    target.copy_(state[name])

    @torch.no_grad()
    def update(self, h: torch.Tensor, y: torch.Tensor, logits: torch.Tensor | None = None) -> None:
        """Add one training batch (features h [B, d], labels y [B], logits [B, K] or None)."""
        h64 = h.detach().to(self.device, _F64)
        y = y.detach().to(self.device, torch.long)
        z = h64 - self.shifts[y]
        ones = torch.ones_like(y, dtype=_F64)
        self.sums.index_add_(0, y, z)
        self.counts.index_add_(0, y, ones)
        self.scatter.addmm_(z.T, z)
        self.sqdist.index_add_(0, y, (z * z).sum(dim=1))
        self.normsums.index_add_(0, y, _unit_rows(h64))
        if self._ncc is not None and self._ncc.ready:
            nearest = self._ncc.predict(h64, self.tile)
            self.ncc_hits[0] += (nearest == y).sum()
            self.ncc_hits[1] += h64.shape[0]
            if logits is not None:
                pred = _decisions(logits.detach(), self.num_classes).to(self.device)
                self.decisions[0] += (pred != nearest).sum()
                self.decisions[1] += h64.shape[0]

    @torch.no_grad()
    def update_ood(self, h: torch.Tensor) -> None:
        """Add out-of-distribution features h [M, d]: ``compute`` then also returns ``nc5``."""
        self.add_ood(ood_sums(h, self.dim, self.device))

    def add_ood(self, sums: torch.Tensor) -> None:
        """Add the OOD sums of :func:`ood_sums` (e.g. taken once per epoch for several accumulators)."""
        self.ood += sums.to(self.device, _F64)

    @torch.no_grad()
    def compute(
        self,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        *,
        reduce_fn: ReduceFn | None = None,
    ) -> dict[str, float]:
        """Measures of the epoch; then shifts := this epoch's means and the sums are cleared."""
        if weight is not None:
            _check_weight(weight, bias, self.num_classes, self.dim)
        if reduce_fn is not None:
            for t in self.state_tensors():
                reduce_fn(t)
        present = self.counts > 0
        n = self.counts.clamp_min(1.0).unsqueeze(1)
        delta = self.sums / n  # mu_c - s_c
        means = self.shifts + delta
        scatter = self.scatter - (delta * self.counts.unsqueeze(1)).T @ delta
        sqdist = self.sqdist - self.counts * (delta * delta).sum(dim=1)
        out = _metrics_from_stats(
            means=means,
            counts=self.counts,
            scatter=scatter,
            sqdist=sqdist,
            normsums=self.normsums,
            mismatches=float(self.decisions[0]),
            scored=float(self.decisions[1]),
            weight=weight,
            ncc_hits=self.ncc_hits,
            ood=self.ood,
            tile=self.tile,
        )
        self.shifts[present] = means[present]
        self.has_shift |= present
        self._ncc = _NCC(self.shifts, self.has_shift)
        self.reset()
        return out
