"""Neural-collapse measures (SPEC section 3).

Everything here computes the measures of the product specification from streamed
float64 sufficient statistics, with O(K d + d^2) memory whatever the data size:

* :func:`nc_metrics` -- functional entry point on in-memory features (it feeds the whole
  tensor to a :class:`CollapseAccumulator` as one batch, so there is one code path).
* :class:`CollapseAccumulator` -- exact two-pass streaming measurement
  (pass 1: class means; pass 2: scatter around the class means, NCC decisions).
* :func:`measure_model` -- the two passes over a data loader for a ``fixedcls`` model,
  optionally on a fixed seeded subset and with "deep collapse" NC1 at backbone stages.
* :class:`OnlineCollapse` -- an approximate one-pass measure fed from the training forward.
* :func:`collapse_speed`, :func:`plot_collapse`, :func:`format_table` -- reporting.

Notation (SPEC): K classes *present* in the data, mu_c class means, mu_G = mean_c mu_c
(unweighted), M-dot rows mu_c - mu_G, W rows w_c.  Classes with no sample are left out of
every measure (their rows of W too); only ``nc4`` takes the classifier decision over all
rows of W, as the network does.

Numerics: all statistics are accumulated in float64 from features centred by their class
mean (never E[hh^T] - mu mu^T), and Sigma_B^+ comes from a float64 symmetric
eigendecomposition that keeps the top min(d, K-1) eigenpairs (no absolute cut-off).

Distributed use: every accumulator exposes ``state_tensors()``, a list of float64 tensors
that must be all-reduced with SUM across processes at fixed points (see each class), and
``finalize_means``/``compute`` take an optional ``reduce_fn(tensor)`` hook that does this
in place, e.g. ``lambda t: torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)``.
"""

from __future__ import annotations

import copy
import math
import os
import re
import warnings
from contextlib import nullcontext
from typing import Callable, Iterable, Mapping, Sequence

import torch

from fixedcls.errors import FixedclsError  # user-facing, a ValueError subclass

__all__ = [
    "METRIC_KEYS",
    "NC1_KEYS",
    "DEFAULT_THRESHOLDS",
    "nc_metrics",
    "CollapseAccumulator",
    "OnlineCollapse",
    "measure_model",
    "inference_model",
    "collapse_speed",
    "plot_collapse",
    "format_table",
]

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
#: The NC1 family reported per backbone stage by deep-collapse measurement.
NC1_KEYS: tuple[str, ...] = ("nc1", "nc1_trace")
#: Keys that need the classifier rows W.
_WEIGHT_KEYS = frozenset({"nc2_equinorm_w", "nc3", "proto_cos", "sample_cos"})
#: Measures that grow towards collapse (all others shrink towards 0).
_GROWING_KEYS = frozenset({"proto_cos", "sample_cos"})

ReduceFn = Callable[[torch.Tensor], object]

_F64 = torch.float64
_NAN = float("nan")
#: Class sums of a chunk are taken as one float64 GEMM with a one-hot matrix (on CPU) up to this many
#: classes -- much faster than index_add_ there; beyond it index_add_ is cheaper.
_ONEHOT_MAX_CLASSES = 128
#: The d x d scatter is accumulated as its upper block triangle (blocks of this many columns, ~40% fewer
#: flops than a full X^T X for large d) and mirrored once in compute().
_GRAM_BLOCK = 128


def _add_gram_(out: torch.Tensor, x: torch.Tensor) -> None:
    """out += x^T x on the upper block triangle only (blocks of _GRAM_BLOCK); see _mirror_gram."""
    d = x.shape[1]
    if d <= 2 * _GRAM_BLOCK:
        out.addmm_(x.T, x)
        return
    for i in range(0, d, _GRAM_BLOCK):
        out[i : i + _GRAM_BLOCK, i:].addmm_(x[:, i : i + _GRAM_BLOCK].T, x[:, i:])


def _mirror_gram(g: torch.Tensor) -> torch.Tensor:
    """The full symmetric matrix from an upper-block-triangle accumulation of _add_gram_."""
    if g.shape[0] <= 2 * _GRAM_BLOCK:
        return g
    return torch.triu(g) + torch.triu(g, diagonal=1).T


# --------------------------------------------------------------------------------------
# the mathematics: measures from float64 sufficient statistics
# --------------------------------------------------------------------------------------
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
) -> dict[str, float]:
    """All SPEC measures from float64 statistics over all ``num_classes`` rows.

    means [C, d] (rows of absent classes ignored), counts [C] (samples per class),
    scatter [d, d] = sum_i (h_i - mu_y)(h_i - mu_y)^T, sqdist [C] = sum_{i in c} ||h_i - mu_c||^2,
    normsums [C, d] = sum_{i in c} h_i / ||h_i||, mismatches / scored for nc4,
    weight [C, d] or None (then the keys that need W are not returned).
    """
    out: dict[str, float] = {k: _NAN for k in METRIC_KEYS if weight is not None or k not in _WEIGHT_KEYS}
    present = (counts > 0).nonzero().squeeze(1)
    K = int(present.numel())
    out["nc4"] = float(mismatches / scored) if scored > 0 else _NAN
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
        gram = md @ md.T  # G = M-dot M-dot^T, [K, K]
        sq_norms = gram.diagonal()
        iu = torch.triu_indices(K, K, offset=1, device=gram.device)
        pair_d2 = (sq_norms[iu[0]] + sq_norms[iu[1]] - 2.0 * gram[iu[0], iu[1]]).clamp_min(0.0)
        var_c = sqdist[present].clamp_min(0.0) / n_c
        out["cdnv"] = float(((var_c[iu[0]] + var_c[iu[1]]) / (2.0 * pair_d2)).mean())

        norms = sq_norms.clamp_min(0.0).sqrt()
        out["nc2_equinorm"] = _std_over_mean(norms)
        unit = _unit_rows(md)
        cos = unit @ unit.T
        off = cos[~torch.eye(K, dtype=torch.bool, device=cos.device)]
        out["nc2_equiangle"] = float(off.std(unbiased=True))
        out["nc2_maxangle"] = float((off + 1.0 / (K - 1)).abs().mean())
        eye = torch.eye(K, dtype=_F64, device=gram.device)
        target = (eye - 1.0 / K) / math.sqrt(K - 1)
        out["nc2_etf_error"] = float(torch.linalg.matrix_norm(gram / torch.linalg.matrix_norm(gram) - target))

    if weight is not None:
        w = weight.detach().to(device=means.device, dtype=_F64)
        wp = w[present]
        out["nc2_equinorm_w"] = _std_over_mean(wp.norm(dim=1))
        diff = wp / torch.linalg.matrix_norm(wp) - md / torch.linalg.matrix_norm(md)
        out["nc3"] = float(torch.linalg.matrix_norm(diff) ** 2)
        out["proto_cos"] = float((_unit_rows(mu) * _unit_rows(wp)).sum(dim=1).mean())
        out["sample_cos"] = float((normsums[present] * _unit_rows(wp)).sum() / N)
    return out


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


class _NCC:
    """Nearest-class-centre decisions argmin_c ||h - mu_c|| over a set of class means.

    Computed as argmin_c ||mu_c||^2 - 2 h.mu_c in float64 after translating everything by
    the mean of the means (distances are translation invariant; this avoids cancellation
    with a large common offset).  Classes not in ``valid`` can never be chosen.
    """

    def __init__(self, means: torch.Tensor, valid: torch.Tensor):
        idx = valid.nonzero().squeeze(1)
        self.ready = idx.numel() > 0
        if not self.ready:
            return
        self.centre = means[idx].mean(dim=0)
        self.mu = means[idx] - self.centre  # [Kv, d]
        self.mu_sq = (self.mu * self.mu).sum(dim=1)  # [Kv]
        self.idx = idx

    def predict(self, h64: torch.Tensor) -> torch.Tensor:
        score = self.mu_sq.unsqueeze(0) - 2.0 * (h64 - self.centre) @ self.mu.T
        return self.idx[score.argmin(dim=1)]

    def offsets(self, means: torch.Tensor) -> torch.Tensor:
        """[C, Kv] (mu_c - centre).mu_k: with them, (h - centre).mu_k = (h - mu_y).mu_k + offsets[y, k],
        so decisions can be taken from the class-centred features of pass 2 (see decide)."""
        return (means - self.centre) @ self.mu.T

    def decide(self, centred_products: torch.Tensor) -> torch.Tensor:
        """Decisions from (h - centre).mu_k [B, Kv] (e.g. (h - mu_y).mu_k + offsets[y])."""
        return self.idx[(self.mu_sq.unsqueeze(0) - 2.0 * centred_products).argmin(dim=1)]


def _decisions(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    if logits.dim() != 2 or logits.shape[1] != num_classes:
        raise FixedclsError(
            f"collapse: logits must have shape [B, {num_classes}] (one column per row of W), got {tuple(logits.shape)}; pass the head's output."
        )
    return logits.argmax(dim=1)


# --------------------------------------------------------------------------------------
# exact two-pass streaming accumulator
# --------------------------------------------------------------------------------------
class CollapseAccumulator:
    """Exact two-pass streaming neural-collapse measurement, O(K d + d^2) memory.

    Usage::

        acc = CollapseAccumulator(num_classes, dim, device)
        for h, y in batches: acc.update_means(h, y)           # pass 1
        acc.finalize_means()                                   # (all-reduce pass-1 state first)
        for h, y, logits in batches: acc.update_scatter(h, y, logits)   # pass 2
        metrics = acc.compute(weight, bias)                    # (all-reduce pass-2 state first)

    Pass 1 accumulates float64 class sums, counts and sums of unit-normalised features.
    Pass 2 accumulates the within-class scatter from features centred by their class mean
    (X_c^T X_c in float64; for d > 256 only its upper block triangle is accumulated, mirrored in
    :meth:`compute`), per-class squared distances (cdnv), per-class pass-2 counts and
    the number of samples whose classifier decision (argmax of the logits, over ALL rows)
    differs from the nearest-class-centre decision (over present classes) for ``nc4``.
    When ``logits`` is None in pass 2, the decision is computed as ``h @ weight.T + bias``
    from the ``weight``/``bias`` keywords of :meth:`update_scatter`; when neither is given,
    ``nc4`` is NaN.

    Distributed: :meth:`state_tensors` returns the tensors of the *current* pass; all-reduce
    them with SUM (i) after pass 1, before :meth:`finalize_means`, and (ii) after pass 2,
    before :meth:`compute` -- or pass ``reduce_fn`` to those two methods, which does exactly
    that.  Each rank must feed a disjoint shard of the data.
    """

    def __init__(self, num_classes: int, dim: int, device: torch.device | str | None = None, *, chunk_size: int = 8192):
        self.num_classes = int(num_classes)
        self.dim = int(dim)
        if self.num_classes < 1 or self.dim < 1:
            raise FixedclsError(f"collapse: num_classes and dim must be positive, got {num_classes} and {dim}.")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.chunk_size = int(chunk_size)
        self.reset()

    # -- state ---------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything and start again at pass 1."""
        K, d, kw = self.num_classes, self.dim, {"dtype": _F64, "device": self.device}
        self.sums = torch.zeros(K, d, **kw)
        self.counts = torch.zeros(K, **kw)
        self.normsums = torch.zeros(K, d, **kw)
        self.scatter = torch.zeros(d, d, **kw)
        self.sqdist = torch.zeros(K, **kw)
        self.counts2 = torch.zeros(K, **kw)
        self.decisions = torch.zeros(2, **kw)  # [mismatches, scored samples]
        self.means: torch.Tensor | None = None
        self._ncc: _NCC | None = None
        self._phase = "means"

    @property
    def phase(self) -> str:
        """'means' (pass 1), 'scatter' (pass 2) or 'done' (computed)."""
        return self._phase

    def state_tensors(self) -> list[torch.Tensor]:
        """The float64 tensors of the current pass, to be all-reduced with SUM in place.

        Before :meth:`finalize_means`: the pass-1 tensors (sums, counts, normalised sums).
        After it: the pass-2 tensors (scatter, squared distances, pass-2 counts, decisions).
        Reduce each list exactly once, at the end of its pass.
        """
        if self._phase == "means":
            return [self.sums, self.counts, self.normsums]
        return [self.scatter, self.sqdist, self.counts2, self.decisions]

    def _chunks(self, h: torch.Tensor, y: torch.Tensor) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        _check_batch(h, y, self.dim)
        y = y.to(self.device, dtype=torch.long)
        _check_labels(y, self.num_classes)
        for s in range(0, h.shape[0], self.chunk_size):
            yield h[s : s + self.chunk_size].detach().to(self.device, dtype=_F64), y[s : s + self.chunk_size]

    # -- pass 1 --------------------------------------------------------------------
    @torch.no_grad()
    def update_means(self, h: torch.Tensor, y: torch.Tensor) -> None:
        """Pass 1: add a batch of features h [B, d] with labels y [B]."""
        if self._phase != "means":
            raise RuntimeError("CollapseAccumulator.update_means: pass 1 is over (finalize_means was called); call reset() to start again.")
        K = self.num_classes
        for h64, yc in self._chunks(h, y):
            self.counts += torch.bincount(yc, minlength=K).to(_F64)
            inv_norm = torch.linalg.vector_norm(h64, dim=1).clamp_min(torch.finfo(_F64).tiny).reciprocal()
            if self.device.type == "cpu" and K <= _ONEHOT_MAX_CLASSES:
                # [1{y_i = c}; 1{y_i = c} / ||h_i||] @ h: class sums and sums of unit rows in one GEMM.
                rows = torch.arange(h64.shape[0], device=self.device)
                onehot = torch.zeros(2 * K, h64.shape[0], dtype=_F64, device=self.device)
                onehot[yc, rows] = 1.0
                onehot[yc + K, rows] = inv_norm
                both = onehot @ h64
                self.sums += both[:K]
                self.normsums += both[K:]
            else:
                self.sums.index_add_(0, yc, h64)
                self.normsums.index_add_(0, yc, h64 * inv_norm.unsqueeze(1))

    @torch.no_grad()
    def finalize_means(self, reduce_fn: ReduceFn | None = None) -> torch.Tensor:
        """End pass 1: (optionally all-reduce the pass-1 state) and fix the class means."""
        if self._phase != "means":
            raise RuntimeError("CollapseAccumulator.finalize_means: already called; call reset() to start again.")
        if reduce_fn is not None:
            for t in self.state_tensors():
                reduce_fn(t)
        present = self.counts > 0
        self.means = self.sums / self.counts.clamp_min(1.0).unsqueeze(1)
        self._ncc = _NCC(self.means, present)
        self._phase = "scatter"
        return self.means

    # -- pass 2 --------------------------------------------------------------------
    @torch.no_grad()
    def update_scatter(
        self,
        h: torch.Tensor,
        y: torch.Tensor,
        logits: torch.Tensor | None = None,
        *,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        """Pass 2: add the same samples again, with the classifier's logits [B, K] if known."""
        if self._phase != "scatter":
            raise RuntimeError(
                "CollapseAccumulator.update_scatter: call finalize_means() after pass 1 first"
                if self._phase == "means"
                else "CollapseAccumulator.update_scatter: compute() was called; call reset() to start again."
            )
        assert self.means is not None and self._ncc is not None
        K, ncc = self.num_classes, self._ncc
        # Every product is taken from the class-centred features xc = h - mu_y (well conditioned):
        # h.w_c + b_c = xc.w_c + (mu_y.w_c + b_c) and (h - centre).mu_k = xc.mu_k + offsets[y, k], so the
        # classifier and the nearest-class-centre decisions come from ONE float64 GEMM xc @ [W; M]^T.
        with_weight = logits is None and weight is not None
        if with_weight:
            _check_weight(weight, bias, self.num_classes, self.dim)
            w64 = weight.detach().to(self.device, _F64)
            base = self.means @ w64.T
            if bias is not None:
                base += bias.detach().to(self.device, _F64)
        if ncc.ready and (with_weight or logits is not None):
            rows = torch.cat([w64, ncc.mu]) if with_weight else ncc.mu
            base = torch.cat([base, ncc.offsets(self.means)], dim=1) if with_weight else ncc.offsets(self.means)
        pos = 0
        for h64, yc in self._chunks(h, y):
            if yc.numel() and not bool((self.counts[yc] > 0).all()):
                raise RuntimeError("CollapseAccumulator.update_scatter: a class seen in pass 2 had no sample in pass 1; feed both passes the same data.")
            xc = self.means.index_select(0, yc)
            torch.sub(h64, xc, out=xc)
            _add_gram_(self.scatter, xc)
            self.sqdist.index_add_(0, yc, torch.linalg.vector_norm(xc, dim=1).square_())
            self.counts2 += torch.bincount(yc, minlength=K).to(_F64)
            b = h64.shape[0]
            if ncc.ready and (with_weight or logits is not None):
                products = torch.addmm(base.index_select(0, yc), xc, rows.T)
                if with_weight:
                    pred, products = products[:, :K].argmax(dim=1), products[:, K:]
                else:
                    pred = _decisions(logits[pos : pos + b], self.num_classes).to(self.device)
                self.decisions[0] += (pred != ncc.decide(products)).sum()
                self.decisions[1] += b
            pos += b

    # -- results -------------------------------------------------------------------
    @torch.no_grad()
    def compute(
        self,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        *,
        reduce_fn: ReduceFn | None = None,
    ) -> dict[str, float]:
        """The SPEC measures.  ``weight`` [K, d] (model.head.weight) or None for the
        weight-free family only (nc1, nc1_trace, cdnv, nc2_equinorm, nc2_equiangle,
        nc2_maxangle, nc2_etf_error, nc4).  ``bias`` is only checked: decisions for nc4
        were taken in pass 2.  ``reduce_fn`` all-reduces the pass-2 state first (once)."""
        if self._phase == "means":
            raise RuntimeError("CollapseAccumulator.compute: run pass 1, finalize_means() and pass 2 first.")
        if weight is not None:
            _check_weight(weight, bias, self.num_classes, self.dim)
        if self._phase == "scatter":
            if reduce_fn is not None:
                for t in self.state_tensors():
                    reduce_fn(t)
            self._phase = "done"
            if not torch.equal(self.counts2, self.counts):
                warnings.warn(
                    "collapse: pass 2 saw different samples per class than pass 1 "
                    f"({int(self.counts2.sum())} vs {int(self.counts.sum())} samples); measure with a loader "
                    "without shuffle/drop_last/random augmentation.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        assert self.means is not None
        return _metrics_from_stats(
            means=self.means,
            counts=self.counts2,
            scatter=_mirror_gram(self.scatter),
            sqdist=self.sqdist,
            normsums=self.normsums,
            mismatches=float(self.decisions[0]),
            scored=float(self.decisions[1]),
            weight=weight,
        )


def nc_metrics(
    features: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> dict[str, float]:
    """SPEC section 3 measures of in-memory features, exact in float64 for any input dtype.

    features [N, d], labels [N] (integers in [0, K)), weight [K, d] (one row per class, as
    ``model.head.weight``), bias [K] or None.  The classifier decision for ``nc4`` is
    argmax_c (w_c.h + b_c) over all rows of ``weight``.  Runs the streaming
    :class:`CollapseAccumulator` with the whole tensor as one batch.
    """
    if not torch.is_tensor(features) or not torch.is_tensor(labels) or not torch.is_tensor(weight):
        raise FixedclsError("nc_metrics: features, labels and weight must be torch tensors; convert with torch.as_tensor.")
    if weight.dim() != 2:
        raise FixedclsError(f"nc_metrics: weight must have shape [K, d], got {tuple(weight.shape)}; pass model.head.weight.")
    acc = CollapseAccumulator(weight.shape[0], weight.shape[1], device=features.device)
    acc.update_means(features, labels)
    acc.finalize_means()
    acc.update_scatter(features, labels, weight=weight, bias=bias)
    return acc.compute(weight, bias)


# --------------------------------------------------------------------------------------
# one-pass online estimate during training
# --------------------------------------------------------------------------------------
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
    it is NaN in the first epoch, when no previous means exist.  Memory O(K d + d^2).

    :meth:`compute` returns the measures, moves the shifts to this epoch's means (classes
    seen) and clears the sums for the next epoch.  Distributed: all-reduce
    :meth:`state_tensors` with SUM before :meth:`compute` (or pass ``reduce_fn``).
    """

    def __init__(self, num_classes: int, dim: int, device: torch.device | str | None = None):
        self.num_classes = int(num_classes)
        self.dim = int(dim)
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

    def state_tensors(self) -> list[torch.Tensor]:
        """Tensors to all-reduce (SUM, in place) once, after the epoch and before compute()."""
        return [self.sums, self.counts, self.scatter, self.sqdist, self.normsums, self.decisions]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shifts (previous means), so that a resumed run continues well conditioned."""
        return {"shifts": self.shifts.clone(), "has_shift": self.has_shift.clone()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.shifts.copy_(state["shifts"])
        self.has_shift.copy_(state["has_shift"])
        self._ncc = _NCC(self.shifts, self.has_shift)

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
        if logits is not None and self._ncc is not None and self._ncc.ready:
            pred = _decisions(logits.detach(), self.num_classes).to(self.device)
            self.decisions[0] += (pred != self._ncc.predict(h64)).sum()
            self.decisions[1] += h64.shape[0]

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
        )
        self.shifts[present] = means[present]
        self.has_shift |= present
        self._ncc = _NCC(self.shifts, self.has_shift)
        self.reset()
        return out


# --------------------------------------------------------------------------------------
# measuring a model over a loader
# --------------------------------------------------------------------------------------
_AUTOCAST_NAMES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "16": torch.float16,
    "fp32": None,
    "float32": None,
    "32": None,
}


def _autocast_dtype(value) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return None if value in (None, torch.float32) else value
    key = str(value).lower()
    if key not in _AUTOCAST_NAMES:
        raise FixedclsError(f"measure_model: unknown autocast_dtype {value!r}; use torch.bfloat16, torch.float16, 'bf16', 'fp16' or None.")
    return _AUTOCAST_NAMES[key]


def inference_model(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen eval-mode copy of a fixedcls Classifier for fast measurement passes.

    BatchNorm is folded into the preceding convolutions of ``model.backbone`` (torch.fx; a backbone
    that cannot be traced is copied unfused) and the weights are channels_last: the same function as
    ``model.eval()``, whose float32 features differ from the eval forward's only by rounding (~1e-7
    relative).  Feed it channels_last inputs.  Measured on 2 CPU cores (oneDNN): a ResNet-18 pass at
    16-32 px is 1.1-1.25x faster quiet (1.3-1.6x with memory contention), but building the copy
    (~0.07-0.09 s) and losing the fused test pass cost as much on the digits default run, so the
    training loop does not use it: pass ``inference_copy=True`` to :func:`measure_model` for large
    CPU measurements.
    """
    from torch.fx.experimental.optimization import fuse

    clone = copy.deepcopy(_unwrap(model)).eval()
    clone.requires_grad_(False)
    backbone = getattr(clone, "backbone", None)
    if isinstance(backbone, torch.nn.Module):
        try:
            clone.backbone = fuse(backbone, inplace=True)
        except Exception:  # not symbolically traceable (data-dependent control flow): keep it unfused
            pass
    return clone.to(memory_format=torch.channels_last)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Classifier inside DDP / torch.compile wrappers."""
    for _ in range(4):
        if hasattr(model, "head"):
            return model
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            break
        model = inner
    return model


def _subset_loader(loader, max_samples: int, seed: int):
    """A new DataLoader over a fixed seeded subset of at most ``max_samples`` samples."""
    from torch.utils.data import DataLoader, Subset
    from torch.utils.data.distributed import DistributedSampler

    dataset = loader.dataset
    try:
        n = len(dataset)
    except TypeError as exc:
        raise FixedclsError("measure_model: max_samples needs a map-style dataset with len(); pass max_samples=None.") from exc
    if max_samples < 1:
        raise FixedclsError(f"measure_model: max_samples must be >= 1, got {max_samples}; pass None to measure every sample.")
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(n, generator=g)[: min(int(max_samples), n)].sort().values.tolist()
    subset = Subset(dataset, idx)
    batch_size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None) or 256
    sampler = None
    # A sharded loader (DistributedSampler, fixedcls.data.EpochSampler) gets disjoint, unpadded shards of the
    # subset, so the all-reduced measures count every sample exactly once (DistributedSampler would pad).
    shard = loader.sampler
    world_size = getattr(shard, "num_replicas", None) or getattr(shard, "world_size", None) or 1
    if isinstance(shard, DistributedSampler) or world_size > 1:
        sampler = list(range(int(shard.rank), len(subset), int(world_size)))
    kwargs = {}
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
        kwargs["multiprocessing_context"] = loader.multiprocessing_context
    return DataLoader(
        subset,
        batch_size=batch_size,
        shuffle=False,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=False,
        worker_init_fn=loader.worker_init_fn,
        **kwargs,
    )


def _pool(f: torch.Tensor) -> torch.Tensor:
    """Global average pool an intermediate: [B,C,H,W] -> [B,C]; [B,N,C] (tokens) -> [B,C]."""
    if f.dim() == 4:
        return f.mean(dim=(2, 3))
    if f.dim() == 3:
        return f.mean(dim=1)
    if f.dim() == 2:
        return f
    raise FixedclsError(f"measure_model: cannot pool an intermediate of shape {tuple(f.shape)}; deep collapse supports [B,C,H,W], [B,N,C] and [B,C].")


class _Intermediates:
    """Pooled backbone stage outputs via timm's ``forward_intermediates``."""

    def __init__(self, backbone: torch.nn.Module, layers):
        if not callable(getattr(backbone, "forward_intermediates", None)):
            raise FixedclsError(
                f"measure_model: backbone {type(backbone).__name__} has no forward_intermediates(); "
                "deep collapse (layers=...) needs a timm model that supports it, or pass layers=None."
            )
        self.backbone = backbone
        if isinstance(layers, str):
            if layers != "all":
                raise FixedclsError(f"measure_model: layers must be a list of stage indices or 'all', got {layers!r}.")
            self.requested = None
        else:
            if isinstance(layers, int):
                layers = [layers]
            self.requested = [int(i) for i in layers]
            if not self.requested:
                raise FixedclsError("measure_model: layers is empty; pass stage indices, 'all' or None.")
        self.keys: list[int] | None = None  # absolute stage index of each returned intermediate
        self._indices = None

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.keys is None:  # resolve indices on the first batch
            probe = self._call(x[:1], None)
            total = len(probe)
            if self.requested is None:
                self.keys = list(range(total))
            else:
                absolute = sorted({i + total if i < 0 else i for i in self.requested})
                bad = [i for i in absolute if not 0 <= i < total]
                if bad:
                    raise FixedclsError(
                        f"measure_model: layers {self.requested} out of range for a backbone with {total} stages (0..{total - 1}); pick stage indices in that range."
                    )
                self.keys = absolute
                self._indices = absolute
        feats = self._call(x, self._indices)
        if len(feats) != len(self.keys):
            raise RuntimeError(f"measure_model: forward_intermediates returned {len(feats)} outputs for stages {self.keys}.")
        return [_pool(f) for f in feats]

    def _call(self, x, indices):
        try:
            return self.backbone.forward_intermediates(x, indices=indices, intermediates_only=True)
        except TypeError as exc:
            raise FixedclsError(
                f"measure_model: {type(self.backbone).__name__}.forward_intermediates does not accept "
                f"(indices=..., intermediates_only=True) ({exc}); pass layers=None."
            ) from exc


def _split_batch(batch):
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        for kx, ky in (("image", "label"), ("input", "target"), ("x", "y")):
            if kx in batch and ky in batch:
                return batch[kx], batch[ky]
    raise FixedclsError("measure_model: the loader must yield (inputs, labels, ...) tuples; wrap the dataset to return them.")


def measure_model(
    model: torch.nn.Module,
    loader,
    *,
    device: torch.device | str,
    autocast_dtype: torch.dtype | str | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    layers: Sequence[int] | str | None = None,
    reduce_fn: ReduceFn | None = None,
    channels_last: bool = False,
    accumulator: CollapseAccumulator | None = None,
    inference_copy: bool = False,
) -> dict[str, float]:
    """Exact collapse measures of ``model`` on the data of ``loader`` (two passes).

    Runs the model in eval mode under ``torch.no_grad`` (and autocast when
    ``autocast_dtype`` is given), using ``model(x, return_features=True) -> (logits, h)``;
    the classifier rows are ``model.head.weight`` / ``model.head.bias``.  The loader must
    yield the same samples in both passes: use one without random augmentation or
    ``drop_last`` (a warning is raised otherwise).

    ``max_samples``: measure on a fixed seeded subset of at most that many samples (a new
    DataLoader over ``Subset(loader.dataset, indices)``, same batch size / workers /
    collate_fn; sharded again when the loader uses a DistributedSampler).
    ``layers``: stage indices (negative allowed) or ``"all"``: adds ``layer{i}/nc1`` and
    ``layer{i}/nc1_trace`` for the globally average-pooled outputs of
    ``model.backbone.forward_intermediates``.
    ``reduce_fn``: in-place SUM all-reduce for DDP (every rank must get >= 1 batch).
    ``channels_last``: feed the inputs in channels_last memory format (as a channels_last model is trained).
    ``accumulator``: a :class:`CollapseAccumulator` whose pass 1 was already fed with this model's
    features of exactly this loader's samples (e.g. during the test evaluation of the training loop):
    then only pass 2 runs over the loader.  Not with ``max_samples`` or ``layers``.
    ``inference_copy``: run both passes on :func:`inference_model` (BatchNorm folded, channels_last):
    the same function up to float32 rounding (~1e-7 relative in the features), faster on CPU for
    large inputs (see there).  Ignored with ``layers`` or ``accumulator`` (whose pass 1 came from the
    model itself).
    The train/eval state of every submodule is restored afterwards.
    """
    device = torch.device(device)
    amp = _autocast_dtype(autocast_dtype)
    core = _unwrap(model)
    head = getattr(core, "head", None)
    if head is None or getattr(head, "weight", None) is None:
        raise FixedclsError("measure_model: the model has no head.weight; pass a fixedcls Classifier (model.head.weight [K, d]).")
    weight = head.weight.detach()
    bias = getattr(head, "bias", None)
    bias = bias.detach() if bias is not None else None
    num_classes, dim = weight.shape
    inter = None
    if layers is not None:
        backbone = getattr(core, "backbone", None)
        if backbone is None:
            raise FixedclsError("measure_model: layers=... needs model.backbone (a timm model); pass layers=None.")
        inter = _Intermediates(backbone, layers)
    if max_samples is not None:
        loader = _subset_loader(loader, max_samples, seed)
    stages = (1, 2)
    if accumulator is not None:
        if max_samples is not None or layers is not None:
            raise FixedclsError("measure_model: accumulator= (pass 1 done elsewhere) cannot be combined with max_samples or layers; pass accumulator=None.")
        if (accumulator.num_classes, accumulator.dim) != (num_classes, dim):
            raise FixedclsError(f"measure_model: the accumulator is for {accumulator.num_classes} classes x {accumulator.dim} dims but the head is {num_classes} x {dim}; build it from model.head.weight.shape.")
        stages = (2,)
    net = model
    if inference_copy and inter is None and accumulator is None:
        net, channels_last = inference_model(model), True

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    ctx = (lambda: torch.autocast(device_type=device.type, dtype=amp)) if amp is not None else nullcontext
    acc = accumulator if accumulator is not None else CollapseAccumulator(num_classes, dim, device=device)
    layer_accs: list[CollapseAccumulator] | None = None
    try:
        with torch.no_grad():
            if acc.phase == "means" and stages == (2,):
                if int(acc.counts.sum()) == 0 and reduce_fn is None:
                    raise FixedclsError("measure_model: the accumulator saw no samples in pass 1; feed it the loader's features first.")
                acc.finalize_means(reduce_fn)
            for stage in stages:
                for batch in loader:
                    x, y = _split_batch(batch)
                    x = x.to(device, non_blocking=True)
                    if channels_last and x.dim() == 4:
                        x = x.contiguous(memory_format=torch.channels_last)
                    y = torch.as_tensor(y).to(device, non_blocking=True)
                    with ctx():
                        logits, h = net(x, return_features=True)
                        pooled = inter(x) if inter is not None else []
                    if inter is not None and layer_accs is None:
                        layer_accs = [CollapseAccumulator(num_classes, f.shape[1], device=device) for f in pooled]
                    if stage == 1:
                        acc.update_means(h, y)
                        for a, f in zip(layer_accs or [], pooled):
                            a.update_means(f, y)
                    else:
                        acc.update_scatter(h, y, logits)
                        for a, f in zip(layer_accs or [], pooled):
                            a.update_scatter(f, y)
                if stage == 1:
                    if int(acc.counts.sum()) == 0 and reduce_fn is None:
                        raise FixedclsError("measure_model: the loader yielded no samples; pass a non-empty loader.")
                    acc.finalize_means(reduce_fn)
                    for a in layer_accs or []:
                        a.finalize_means(reduce_fn)
            out = acc.compute(weight, bias, reduce_fn=reduce_fn)
            for i, a in zip(inter.keys if inter is not None and inter.keys else [], layer_accs or []):
                m = a.compute(None, reduce_fn=reduce_fn)
                for k in NC1_KEYS:
                    out[f"layer{i}/{k}"] = m[k]
    finally:
        model.train(True)  # then restore each module's own flag exactly
        for m, flag in modes:
            m.training = flag
    return out


# --------------------------------------------------------------------------------------
# speed of collapse, plot, table
# --------------------------------------------------------------------------------------
#: key -> (comparison, threshold): the epoch at which a measure "has collapsed".
DEFAULT_THRESHOLDS: dict[str, tuple[str, float]] = {
    "nc1": ("<=", 0.1),
    "nc1_trace": ("<=", 0.1),
    "cdnv": ("<=", 0.1),
    "nc2_equinorm": ("<=", 0.1),
    "nc2_equinorm_w": ("<=", 0.1),
    "nc2_equiangle": ("<=", 0.1),
    "nc2_maxangle": ("<=", 0.1),
    "nc2_etf_error": ("<=", 0.2),
    "nc3": ("<=", 0.1),
    "nc4": ("<=", 0.01),
    "proto_cos": (">=", 0.9),
    "sample_cos": (">=", 0.9),
}
_LOG10_FLOOR = 1e-12


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _normalise_thresholds(thresholds) -> dict[str, tuple[str, float]]:
    out = {}
    for key, spec in dict(thresholds).items():
        if isinstance(spec, (tuple, list)):
            if len(spec) != 2 or spec[0] not in ("<=", ">="):
                raise FixedclsError(f"collapse_speed: threshold for {key!r} must be ('<=' or '>=', value), got {spec!r}.")
            op, value = spec[0], float(spec[1])
        else:
            op, value = (">=" if key.rsplit("/", 1)[-1] in _GROWING_KEYS else "<="), float(spec)
        out[key] = (op, value)
    return out


def collapse_speed(
    history: Sequence[Mapping],
    thresholds: Mapping[str, tuple[str, float]] | Mapping[str, float] | None = None,
    *,
    prefix: str = "collapse/",
    out_prefix: str = "collapse_speed/",
) -> dict[str, float | int | None]:
    """Speed of collapse from per-epoch rows like those of metrics.jsonl.

    ``thresholds``: key -> (op, value) with op '<=' (shrinking measures) or '>=' (growing:
    proto_cos, sample_cos), or key -> value (op inferred); default :data:`DEFAULT_THRESHOLDS`.
    Returns ``<out_prefix>epochs_to/<key>``: the first epoch (row's "epoch") whose
    ``<prefix><key>`` meets the threshold, None if never; and ``<out_prefix>auc_log10_nc1``:
    the mean of log10(max(nc1, 1e-12)) over the rows that measured nc1 (None if none).
    Rows without the key (epochs not measured) and non-finite values are skipped.
    """
    thr = _normalise_thresholds(DEFAULT_THRESHOLDS if thresholds is None else thresholds)
    rows = sorted(
        ((row.get("epoch", i), i, row) for i, row in enumerate(history)), key=lambda t: (t[0] is None, t[0] or 0, t[1])
    )
    out: dict[str, float | int | None] = {}
    for key, (op, value) in thr.items():
        hit = None
        for epoch, _, row in rows:
            v = row.get(prefix + key)
            if _finite(v) and (v <= value if op == "<=" else v >= value):
                hit = epoch
                break
        out[f"{out_prefix}epochs_to/{key}"] = hit
    logs = [math.log10(max(float(row[prefix + "nc1"]), _LOG10_FLOOR)) for _, _, row in rows if _finite(row.get(prefix + "nc1"))]
    out[f"{out_prefix}auc_log10_nc1"] = sum(logs) / len(logs) if logs else None
    return out


_PLOT_PANELS: tuple[tuple[str, str], ...] = (
    ("nc1", "NC1  tr(Σw Σb⁺)/K"),
    ("nc1_trace", "NC1  tr Σw / tr Σb"),
    ("cdnv", "CDNV"),
    ("nc2_equinorm", "NC2 equinorm (means)"),
    ("nc2_equinorm_w", "NC2 equinorm (W)"),
    ("nc2_equiangle", "NC2 equiangle (std cos)"),
    ("nc2_maxangle", "NC2 max-angle"),
    ("nc2_etf_error", "NC2 ETF error"),
    ("nc3", "NC3 self-duality"),
    ("nc4", "NC4 NCC mismatch"),
    ("1-proto_cos", "1 - proto_cos"),
    ("1-sample_cos", "1 - sample_cos"),
)


def _series(history: Sequence[Mapping], key: str, complement: bool = False) -> tuple[list, list]:
    """(epochs, values) of ``key`` over the rows that have it, positive values only (log scale)."""
    xs, ys = [], []
    for i, row in enumerate(history):
        v = row.get(key)
        if not _finite(v):
            continue
        v = 1.0 - float(v) if complement else float(v)
        if v > 0:
            xs.append(row.get("epoch", i))
            ys.append(v)
    return xs, ys


_LAYER_KEY = re.compile(r"^layer(-?\d+)/nc1$")


def plot_collapse(
    history: Sequence[Mapping],
    path: str | os.PathLike,
    title: str | None = None,
    *,
    splits: Sequence[tuple[str, str]] = (("collapse/", "train"), ("collapse_test/", "test")),
) -> str | None:
    """Write the collapse figure (e.g. ``collapse.png``): each measure against epochs on a
    log y-scale, train and test splits when present (``splits``: (key prefix, label)),
    deep-collapse NC1 per stage when present.  ``title`` should name the head (learned or
    fixed polytope).  Never raises: on failure it warns and returns None; otherwise it
    returns the path written."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        panels = []
        for key, label in _PLOT_PANELS:
            complement = key.startswith("1-")
            base = key[2:] if complement else key
            lines = []
            for prefix, split in splits:
                xs, ys = _series(history, prefix + base, complement)
                if xs:
                    lines.append((xs, ys, split))
            if lines:
                panels.append((label, lines))
        for prefix, split in splits:
            stages = {}
            for row in history:
                for k in row:
                    m = _LAYER_KEY.match(k[len(prefix):]) if k.startswith(prefix) else None
                    if m:
                        stages[int(m.group(1))] = k
            lines = []
            for stage in sorted(stages):
                xs, ys = _series(history, stages[stage])
                if xs:
                    lines.append((xs, ys, f"stage {stage}"))
            if lines:
                panels.append((f"deep NC1 per stage ({split})", lines))
        if not panels:
            raise ValueError("no collapse measures in the history")
        ncols = min(4, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        width, height = 4.0 * ncols, 3.0 * nrows + 0.6
        fig = Figure(figsize=(width, height))
        FigureCanvasAgg(fig)
        # Fixed margins, in inches: the constrained layout engine took half of the drawing time (~0.7 s of 1.5 s).
        fig.subplots_adjust(left=0.8 / width, right=1 - 0.15 / width, bottom=0.45 / height, top=1 - 0.65 / height,
                            wspace=0.38, hspace=0.55)
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, (label, lines) in zip(axes, panels):
            for xs, ys, name in lines:
                ax.plot(xs, ys, marker="o", markersize=2.5, linestyle="--" if name == "test" else "-", label=name)
            ax.set_yscale("log")
            ax.set_title(label, fontsize=9)
            ax.set_xlabel("epoch", fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
            ax.tick_params(labelsize=7)
            if len(lines) > 1:
                ax.legend(fontsize=7)
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        fig.suptitle(title or "Neural collapse")
        path = os.fspath(path)
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        fig.savefig(path, dpi=110)
        return path
    except Exception as exc:  # plotting must never break a run
        warnings.warn(f"collapse: could not write the collapse plot to {path}: {exc}", RuntimeWarning, stacklevel=2)
        return None


def format_table(metrics: Mapping[str, object]) -> str:
    """A markdown table ``| measure | value |`` of a metrics dict (SPEC keys first, in SPEC
    order, whatever their prefix; then the rest alphabetically)."""
    order = {k: i for i, k in enumerate(METRIC_KEYS)}

    def sort_key(k: str):
        prefix, _, base = k.rpartition("/")
        return (prefix, 0 if base in order else 1, order.get(base, 0), base)

    def fmt(v) -> str:
        if v is None:
            return "–"
        if isinstance(v, bool):
            return str(v)
        if isinstance(v, int):
            return str(v)
        if isinstance(v, float):
            return f"{v:.4g}"
        if torch.is_tensor(v) and v.numel() == 1:
            return f"{float(v):.4g}"
        return str(v)

    lines = ["| measure | value |", "|---|---|"]
    for k in sorted(metrics, key=sort_key):
        lines.append(f"| {k} | {fmt(metrics[k])} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fixedcls.collapse CHECKPOINT``: measure a saved model on its own data and print the table."""
    import argparse
    import json
    import sys

    from .errors import FixedclsError

    parser = argparse.ArgumentParser(prog="python -m fixedcls.collapse", description=main.__doc__)
    parser.add_argument("checkpoint", help="a .pt file written by fixedcls-train (last.pt, best.pt, epoch_NNNN.pt)")
    parser.add_argument("--split", choices=("train", "test", "both"), default="both")
    parser.add_argument("--max-samples", type=int, default=None, help="measure a seeded subset of at most N samples")
    parser.add_argument("--layers", default=None, help="backbone stages for deep collapse, e.g. 0,1,2,3 or all")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-root", default=None, help="where the run's dataset lives on this machine")
    parser.add_argument("--json", default=None, help="also write the measures to this JSON file")
    args = parser.parse_args(argv)
    try:
        from .train import load_trained

        model, cfg, bundle = load_trained(args.checkpoint, data_overrides={"root": args.data_root} if args.data_root else None)
        device = torch.device(args.device)
        model.to(device)
        layers = None
        if args.layers:
            layers = "all" if args.layers == "all" else [int(i) for i in args.layers.split(",")]
        from torch.utils.data import DataLoader

        splits = {"train": bundle.train_eval, "test": bundle.test}
        prefixes = {"train": "collapse/", "test": "collapse_test/"}
        results: dict = {}
        for split in (("train", "test") if args.split == "both" else (args.split,)):
            loader = DataLoader(splits[split], batch_size=cfg.data.eval_batch_size, shuffle=False)
            values = measure_model(model, loader, device=device, max_samples=args.max_samples, layers=layers)
            results.update({prefixes[split] + key: value for key, value in values.items()})
    except FixedclsError as error:
        print(f"fixedcls: error: {error}", file=sys.stderr)
        return 2
    print(f"{args.checkpoint}: {cfg.head.name} head on {cfg.model.backbone}, {cfg.data.name}")
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
