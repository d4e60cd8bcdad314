"""Exact streaming neural-collapse measurement: :class:`CollapseAccumulator` and :func:`nc_metrics`.

* :func:`nc_metrics` -- functional entry point on in-memory features (it feeds the whole
  tensor to a :class:`CollapseAccumulator` as one batch, so there is one code path).
* :class:`CollapseAccumulator` -- exact two-pass streaming measurement
  (pass 1: class means; pass 2: scatter around the class means, NCC decisions), float64 sums of
  products taken in float32 of residuals centred in full precision (or all in float64), see the
  class's precision contract.  The measures themselves come from :mod:`.stats`.
"""

from __future__ import annotations

import warnings
from typing import Iterable

import torch

from ..errors import FixedclsError  # user-facing, a ValueError subclass
from .decisions import _NCC, _ChunkedDecisions, _decisions
from .pairwise import TILE
from .stats import _F64, ReduceFn, _check_batch, _check_labels, _check_weight, _metrics_from_stats, ood_sums

#: The d x d scatter is accumulated as its upper block triangle (blocks of this many columns, ~40% fewer
#: flops than a full X^T X for large d) and mirrored once in compute().
_GRAM_BLOCK = 128
#: Below this feature dimension the products cost less than the float32 conversions around them, so they are
#: taken in float64 whatever scatter_dtype says (the default digits run, d = 9, stays all-float64 for free).
_FAST_MIN_DIM = 64
#: Batches are processed in chunks of this many rows: the [chunk, d] temporaries stay in (L3) cache, and there are
#: few chunks -- each op of a chunk is an OpenMP barrier, which stalls on a machine whose cores are busy.
_CHUNK_ROWS = 4096
#: The fast path adds its float32 d x d scatter into the float64 one every this many rows (fewer conversions; a
#: float32 sum over this many residual products stays ~1e-7 accurate), its float32 class sums every
#: _PENDING_ROWS_MEANS rows (the class means carry into every measure of the means).
_PENDING_ROWS = 8192
_PENDING_ROWS_MEANS = 2048
_F32 = torch.float32
_EPS32 = torch.finfo(_F32).eps


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


class CollapseAccumulator:
    """Exact two-pass streaming neural-collapse measurement, O(K d + d^2 + tile^2) memory (no K x K matrix).

    Usage::

        acc = CollapseAccumulator(num_classes, dim, device)
        for h, y in batches: acc.update_means(h, y)           # pass 1
        acc.finalize_means()                                   # (all-reduce pass-1 state first)
        for h, y, logits in batches: acc.update_scatter(h, y, logits)   # pass 2
        metrics = acc.compute(weight, bias)                    # (all-reduce pass-2 state first)

    Pass 1 accumulates float64 class sums, counts and sums of unit-normalised features.
    Pass 2 accumulates the within-class scatter from features centred by their class mean
    (X_c^T X_c; for d > 256 only its upper block triangle is accumulated, mirrored in
    :meth:`compute`), per-class squared distances (cdnv), per-class pass-2 counts and
    the number of samples whose classifier decision (argmax of the logits, over ALL rows)
    differs from the nearest-class-centre decision (over present classes) for ``nc4``.
    When ``logits`` is None in pass 2, the decision is computed as ``h @ weight.T + bias``
    from the ``weight``/``bias`` keywords of :meth:`update_scatter`; when neither is given,
    ``nc4`` is NaN.  The nearest-class-centre decision also counts the samples nearest their own
    class mean (``ncc_acc``).  Above ``tile`` classes both decisions are taken over chunks of
    ``tile`` classes, and the pairwise measures are reduced over tiles of class pairs
    (:mod:`.pairwise`), so no K x K matrix is built.  :meth:`update_ood` adds OOD features for ``nc5``.

    Precision contract (``scatter_dtype``).  Every statistic is accumulated in float64, and every
    product is taken of features already centred in full precision, so a large common offset
    never cancels whatever the dtype:

    * ``torch.float32`` (default, 2-2.5 times as fast for d >= 64): pass 1 subtracts from each
      feature a sample of its own class (the first one seen) and sums the small differences in
      float32 per chunk, added to float64 sums with the shifts added back in float64; pass 2
      subtracts the class mean rounded to float32 (exact for nearby values) and takes the d x d
      scatter, the squared distances and the decision products of these residuals in float32 per
      chunk of ``chunk_size`` rows, their float32 sums added into the float64 accumulators every
      few thousand rows and the float32 rounding of the means corrected in float64.  The float32
      class sums err by ~1e-6 of a class mean's own sampling error.  The relative error is that of a float32
      product of the residuals, about 1e-7 on Sigma_W (and on nc1, cdnv), independent of any
      offset.  Decisions (``nc4``) equal the float64 ones: a sample whose two best scores are
      closer than the float32 error bound is decided again in float64.  Below d = 64 the products
      are taken in float64 anyway (they cost less than the conversions there), and so they are when
      float32 matmuls may run in reduced precision (``torch.set_float32_matmul_precision`` other
      than ``"highest"``, e.g. TF32 on a GPU) at construction.
    * ``torch.float64``: every product in float64 (agreement with a float64 brute force ~1e-14).

    The results are a deterministic function of the sequence of batches (the float32 rounding
    depends on the batch boundaries, so two streams cut differently agree to ~1e-7, or ~1e-14 with
    float64).

    Distributed: :meth:`state_tensors` returns the tensors of the *current* pass; all-reduce
    them with SUM (i) after pass 1, before :meth:`finalize_means`, and (ii) after pass 2,
    before :meth:`compute` -- or pass ``reduce_fn`` to those two methods, which does exactly
    that.  Each rank must feed a disjoint shard of the data.
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        device: torch.device | str | None = None,
        *,
        chunk_size: int = _CHUNK_ROWS,
        scatter_dtype: torch.dtype = torch.float32,
        tile: int = TILE,
        nearest_centre: bool = True,
    ):
        self.num_classes = int(num_classes)
        self.dim = int(dim)
        if self.num_classes < 1 or self.dim < 1:
            raise FixedclsError(f"collapse: num_classes and dim must be positive, got {num_classes} and {dim}.")
        if scatter_dtype not in (torch.float32, torch.float64):
            raise FixedclsError(
                f"collapse: scatter_dtype must be torch.float32 (fast, ~1e-7 relative) or torch.float64 "
                f"(every product in float64), got {scatter_dtype!r}."
            )
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.chunk_size = int(chunk_size)
        if int(tile) < 1:
            raise FixedclsError(f"collapse: tile must be a positive number of classes, got {tile}.")
        self.tile = int(tile)
        self.nearest_centre = bool(nearest_centre)
        self.scatter_dtype = scatter_dtype
        # float32 matmuls allowed to run in TF32/bf16 (torch.set_float32_matmul_precision below "highest") would lose
        # the ~1e-7 of the contract: then every product is float64.
        full_float32 = torch.get_float32_matmul_precision() == "highest" and not torch.backends.cuda.matmul.allow_tf32
        self._fast = scatter_dtype == torch.float32 and self.dim >= _FAST_MIN_DIM and full_float32
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
        self.ncc_hits = torch.zeros(2, **kw)  # [samples whose nearest class mean is their own, decided samples]
        self.ood = torch.zeros(d + 1, **kw)  # [sum of the OOD features, their count] (nc5)
        self.means: torch.Tensor | None = None
        self._ncc: _NCC | None = None
        self._ncc_plans: dict = {}  # the NCC-only decision plan of pass 2 by input kind (it depends on the means alone)
        self._phase = "means"
        # Fast path: per-class shifts of pass 1 (a sample of the class; any value works, a near one keeps the
        # float32 sums accurate), the float32 class means of pass 2 and a reusable float32 d x d product.
        self._shift = torch.zeros(K, d, **kw)
        self._has_shift = torch.zeros(K, dtype=torch.bool, device=self.device)
        self._means32: torch.Tensor | None = None
        self._shift_used: torch.Tensor | None = None  # the shifts in the dtype they are subtracted in
        self._zsums32 = torch.zeros(K, d, dtype=_F32, device=self.device)  # pending pass-1 sums, see _fold_pending
        self._znormsums32 = torch.zeros(K, d, dtype=_F32, device=self.device)
        self._inv_sums = torch.zeros(K, **kw)
        self._pending_counts = torch.zeros(K, **kw)
        self._pending_rows = 0
        self._gram32: torch.Tensor | None = None  # float32 scatter of the rows since the last fold into float64
        self._sqdist32 = torch.zeros(K, dtype=_F32, device=self.device)
        self._gram32_rows = 0
        self._work32: torch.Tensor | None = None
        self._rounded_counts = torch.zeros(K, **kw)  # pass-2 samples centred at the float32 means, not yet corrected

    @property
    def phase(self) -> str:
        """'means' (pass 1), 'scatter' (pass 2) or 'done' (computed)."""
        return self._phase

    def state_tensors(self) -> list[torch.Tensor]:
        """The float64 tensors of the current pass, to be all-reduced with SUM in place.

        Before :meth:`finalize_means`: the pass-1 tensors (sums, counts, normalised sums).
        After it: the pass-2 tensors (scatter, squared distances, pass-2 counts, decisions, NCC hits) and
        the OOD sums of :meth:`update_ood` (fed at any time before :meth:`compute`, reduced with pass 2).
        Reduce each list exactly once, at the end of its pass.  (In pass 2 this first folds the
        pending float64 correction of the fast path into the scatter, so the tensors are complete.)
        """
        self._fold_pending()
        if self._phase == "means":
            return [self.sums, self.counts, self.normsums]
        return [self.scatter, self.sqdist, self.counts2, self.decisions, self.ncc_hits, self.ood]

    def _fold_pending(self) -> None:
        """Fold the fast path's pending float32 sums into the float64 state.

        Pass 1: sums += sum_i (h_i - s_y) + n_c s_c, normsums += sum_i (h_i - s_y)/||h_i|| + (sum_i 1/||h_i||) s_c.
        Pass 2: the float32 scatter and squared distances are added, then what centring at the float32-rounded
        means c = mu - lo added is subtracted: over a whole class sum_i (h_i - c)(h_i - c)^T =
        sum_i (h_i - mu)(h_i - mu)^T + n_c lo lo^T, since sum_i (h_i - mu) = 0; so n_c lo_c lo_c^T goes, in
        float64, once for all the chunks so far (it is linear in the counts)."""
        if self._pending_rows and self._shift_used is not None:
            shift = self._shift_used.to(_F64)
            self.sums += self._zsums32.to(_F64).addcmul_(self._pending_counts.unsqueeze(1), shift)
            self.normsums += self._znormsums32.to(_F64).addcmul_(self._inv_sums.unsqueeze(1), shift)
            for t in (self._zsums32, self._znormsums32, self._inv_sums, self._pending_counts):
                t.zero_()
            self._pending_rows = 0
        if self._gram32_rows:
            self.scatter += self._gram32
            self.sqdist += self._sqdist32
            self._gram32.zero_()
            self._sqdist32.zero_()
            self._gram32_rows = 0
        if self._means32 is None or not bool(self._rounded_counts.any()):
            return
        assert self.means is not None
        lo = self.means - self._means32.to(_F64)
        self.scatter.addmm_((lo * self._rounded_counts.unsqueeze(1)).T, lo, alpha=-1.0)
        self.sqdist -= self._rounded_counts * (lo * lo).sum(dim=1)
        self._rounded_counts.zero_()

    def _chunks(self, h: torch.Tensor, y: torch.Tensor) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        _check_batch(h, y, self.dim)
        y = y.to(self.device, dtype=torch.long)
        _check_labels(y, self.num_classes)
        # the fast path centres float64 input in float64, anything narrower in float32 (exact for bf16/fp16)
        dtype = _F32 if self._fast and h.dtype != _F64 else _F64
        for s in range(0, h.shape[0], self.chunk_size):
            yield h[s : s + self.chunk_size].detach().to(self.device, dtype=dtype), y[s : s + self.chunk_size]

    def _class_sums(self, x: torch.Tensor, yc: torch.Tensor, row_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[K, d] sum_{i: y_i = c} x_i and sum_{i: y_i = c} row_weights_i x_i, in x's dtype.  index_add_ reads x
        once and adds into a cache-sized [K, d]: on the CPU ~15x faster than the equivalent one-hot GEMM."""
        sums = torch.zeros(self.num_classes, x.shape[1], dtype=x.dtype, device=self.device).index_add_(0, yc, x)
        weighted = torch.zeros_like(sums).index_add_(0, yc, x * row_weights.to(x.dtype).unsqueeze(1))
        return sums, weighted

    # -- pass 1 --------------------------------------------------------------------
    @torch.no_grad()
    def update_means(self, h: torch.Tensor, y: torch.Tensor) -> None:
        """Pass 1: add a batch of features h [B, d] with labels y [B]."""
        if self._phase != "means":
            raise RuntimeError("CollapseAccumulator.update_means: pass 1 is over (finalize_means was called); call reset() to start again.")
        K = self.num_classes
        for hc, yc in self._chunks(h, y):
            counts = torch.bincount(yc, minlength=K).to(_F64)
            self.counts += counts
            inv_norm = torch.linalg.vector_norm(hc, dim=1).clamp_min(torch.finfo(hc.dtype).tiny).reciprocal()
            if not self._fast:
                sums, normsums = self._class_sums(hc, yc, inv_norm)
                self.sums += sums
                self.normsums += normsums
                continue
            # sum_i h_i = sum_i (h_i - s_y) + n_c s_c with s_c a sample of class c: the float32 sums only take
            # differences of the size of the spread, so they keep their relative accuracy at any offset.  They are
            # pending in float32 for up to _PENDING_ROWS_MEANS rows, then folded into the float64 sums (_fold_pending).
            if self._take_shifts(hc, yc) or self._shift_used is None or self._shift_used.dtype != hc.dtype:
                self._fold_pending()  # the pending sums were taken around the shifts as they were
                self._shift_used = self._shift.to(hc.dtype)
            z = self._residuals(hc, self._shift_used, yc)
            self._zsums32.index_add_(0, yc, z)
            self._znormsums32.index_add_(0, yc, z.mul_(inv_norm.to(_F32).unsqueeze(1)))
            self._inv_sums.index_add_(0, yc, inv_norm.to(_F64))
            self._pending_counts += counts
            self._pending_rows += hc.shape[0]
            if self._pending_rows >= _PENDING_ROWS_MEANS:
                self._fold_pending()

    def _take_shifts(self, hc: torch.Tensor, yc: torch.Tensor) -> bool:
        """Give every class of this chunk that has no shift yet its first sample here as shift; True if any."""
        if bool(self._has_shift.all()):
            return False
        new = torch.zeros_like(self._has_shift)
        new[yc] = True
        new &= ~self._has_shift
        if not bool(new.any()):
            return False
        first = torch.full((self.num_classes,), hc.shape[0], dtype=torch.long, device=self.device)
        first.scatter_reduce_(0, yc, torch.arange(hc.shape[0], device=self.device), reduce="amin")
        classes = new.nonzero().squeeze(1)
        self._shift[classes] = hc[first[classes]].to(_F64)
        self._has_shift[classes] = True
        return True

    @torch.no_grad()
    def finalize_means(self, reduce_fn: ReduceFn | None = None) -> torch.Tensor:
        """End pass 1: (optionally all-reduce the pass-1 state) and fix the class means."""
        if self._phase != "means":
            raise RuntimeError("CollapseAccumulator.finalize_means: already called; call reset() to start again.")
        self._fold_pending()
        if reduce_fn is not None:
            for t in self.state_tensors():
                reduce_fn(t)
        present = self.counts > 0
        self.means = self.sums / self.counts.clamp_min(1.0).unsqueeze(1)
        self._ncc = _NCC(self.means, present)
        if self._fast:
            self._means32 = self.means.to(_F32)
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
        # Up to K = tile, every product is taken from the class-centred features xc = h - c_y, c_y the class mean (or
        # its float32 rounding, the centre of the fast path): h.w_k + b_k = xc.w_k + (c_y.w_k + b_k) and
        # (h - centre).mu_k = xc.mu_k + (c_y - centre).mu_k, so the classifier and the nearest-class-centre
        # decisions come from ONE GEMM xc @ [W; M]^T plus a per-class float64 base.  That base is K x K: above the
        # tile the decisions are taken over class chunks around one centre instead (_ChunkedDecisions).
        with_weight = logits is None and weight is not None
        decide_cls = with_weight or logits is not None
        decide_ncc = ncc.ready and self.nearest_centre
        fast = self._fast
        if with_weight:
            _check_weight(weight, bias, self.num_classes, self.dim)
            w64 = weight.detach().to(self.device, _F64)
        chunked = plan = None
        if decide_ncc:
            float64_rows = h.dtype == _F64
            if K > self.tile:
                chunked = self._ncc_plans.get(("chunked", float64_rows)) if not with_weight else None
                if chunked is None:
                    chunked = _ChunkedDecisions(ncc, w64 if with_weight else None, bias, fast=fast, tile=self.tile)
                    if not with_weight:
                        self._ncc_plans[("chunked", float64_rows)] = chunked
            else:
                plan = self._ncc_plans.get(float64_rows) if not with_weight else None
                if plan is None:
                    plan = self._decision_plan(w64 if with_weight else None, bias, float64_rows)
                    if not with_weight:  # depends on the means alone: once per pass, not per batch
                        self._ncc_plans[float64_rows] = plan
        _check_batch(h, y, self.dim)
        y_all = y.to(self.device, dtype=torch.long)
        _check_labels(y_all, K)
        counts = torch.bincount(y_all, minlength=K).to(_F64)
        if bool(((counts > 0) & (self.counts == 0)).any()):
            raise RuntimeError("CollapseAccumulator.update_scatter: a class seen in pass 2 had no sample in pass 1; feed both passes the same data.")
        self.counts2 += counts
        if fast and h.dtype != _F64:
            self._rounded_counts += counts  # centred at the float32 means: see _fold_pending
        mismatches = torch.zeros((), dtype=torch.long, device=self.device)
        hits = torch.zeros((), dtype=torch.long, device=self.device)
        pos = 0
        for hc, yc in self._chunks(h, y_all):
            b = hc.shape[0]
            if fast:
                xc, xc_norms = self._scatter_fast(hc, yc)
            else:
                xc = self.means.index_select(0, yc)
                torch.sub(hc, xc, out=xc)
                _add_gram_(self.scatter, xc)
                self.sqdist.index_add_(0, yc, torch.linalg.vector_norm(xc, dim=1).square_())
            if decide_ncc:
                pred = _decisions(logits[pos : pos + b], self.num_classes).to(self.device) if logits is not None else None
                if chunked is not None:
                    cls, nearest = chunked.decide(hc)
                    pred = cls if with_weight else pred
                elif fast:
                    pred, nearest = self._decide_fast(hc, yc, xc, xc_norms, plan, pred, ncc, K, with_weight)
                else:
                    rows, exact_base = plan
                    products = torch.addmm(exact_base.index_select(0, yc), xc, rows.T)
                    if with_weight:
                        pred, products = products[:, :K].argmax(dim=1), products[:, K:]
                    nearest = ncc.decide(products)
                hits += (nearest == yc).sum()
                if decide_cls:
                    mismatches += (pred != nearest).sum()
            pos += b
        if decide_ncc:
            self.ncc_hits[0] += hits
            self.ncc_hits[1] += y_all.shape[0]
            if decide_cls:
                self.decisions[0] += mismatches
                self.decisions[1] += y_all.shape[0]

    def _decision_plan(self, w64: torch.Tensor | None, bias: torch.Tensor | None, float64_rows: bool):
        """The decision columns [W; M] (or M) and their per-class float64 bases; with the fast path, the float32
        plan of _fast_decision_plan around the centres the residuals are taken at."""
        assert self._ncc is not None
        rows = torch.cat([w64, self._ncc.mu]) if w64 is not None else self._ncc.mu
        exact_base = self._decision_base(self.means, w64, bias)
        if not self._fast:
            return rows, exact_base
        centre = self.means if float64_rows else self._means32.to(_F64)  # what _scatter_fast subtracts
        return self._fast_decision_plan(rows, self._decision_base(centre, w64, bias), rows, exact_base, w64 is not None)

    def _decision_base(self, centre: torch.Tensor, w64: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        """[C, K (+K)]: per class c, c_c.w_k + b_k (with a weight) and (c_c - ncc centre).mu_k, float64."""
        assert self._ncc is not None
        offsets = self._ncc.offsets(centre)
        if w64 is None:
            return offsets
        base = centre @ w64.T
        if bias is not None:
            base += bias.detach().to(self.device, _F64)
        return torch.cat([base, offsets], dim=1)

    def _residuals(self, hc: torch.Tensor, centres: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:
        """float32 h - centres[y], in one reused buffer (no fresh [chunk, d] allocations); the subtraction is
        done in the dtype of h and centres (float64 for float64 input), so only the residual is rounded."""
        n = hc.shape[0]
        if self._work32 is None or self._work32.shape[0] < n:
            self._work32 = torch.empty(max(n, self.chunk_size), self.dim, dtype=_F32, device=self.device)
        out = self._work32[:n]
        if hc.dtype == _F32:
            torch.index_select(centres, 0, yc, out=out)
            return torch.sub(hc, out, out=out)
        return out.copy_(hc - centres.index_select(0, yc))

    def _fast_decision_plan(self, rows, base, rows64, exact_base, with_weight: bool):
        """float32 rows and bases of the decision scores (NCC columns turned into 2 h.mu_k - ||mu_k||^2, to be
        maximised like logits; the factor 2 is exact), their norms for the error bound, and the float64 ones."""
        assert self._ncc is not None
        K = self.num_classes
        ncc_cols = slice(K, None) if with_weight else slice(None)
        rows = rows.clone()
        base = base.clone()
        rows[ncc_cols] *= 2.0
        base[:, ncc_cols] = 2.0 * base[:, ncc_cols] - self._ncc.mu_sq.unsqueeze(0)
        # |score error| <= (d + 4) eps32 ||xc|| ||v|| (the product, the residual's and v's rounding, the addition)
        # + 2 eps32 max_k |base[y, k]| (its rounding and the addition's); twice that between two scores.
        tolerances = [(2.0 * (self.dim + 4) * _EPS32 * float(torch.linalg.vector_norm(rows[b], dim=1).max()),
                       (4.0 * _EPS32 * base[:, b].abs().amax(dim=1)).to(_F32))
                      for b in ([slice(0, K), ncc_cols] if with_weight else [ncc_cols])]
        return rows.to(_F32), base.to(_F32), tolerances, rows64, exact_base

    def _scatter_fast(self, hc: torch.Tensor, yc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pass 2 of one chunk with float32 products; returns the float32 residuals h - c_y and their norms."""
        assert self.means is not None and self._means32 is not None
        if hc.dtype == _F64:  # float64 input: centre in float64 at the exact means, round the residual once
            xc = self._residuals(hc, self.means, yc)
        else:  # h and the rounded means are float32 numbers: their difference rounds once, relative to itself
            xc = self._residuals(hc, self._means32, yc)
        if self._gram32 is None:
            self._gram32 = torch.zeros(self.dim, self.dim, dtype=_F32, device=self.device)
        _add_gram_(self._gram32, xc)
        self._gram32_rows += xc.shape[0]
        if self._gram32_rows >= _PENDING_ROWS:
            self._fold_pending()
        norms = torch.linalg.vector_norm(xc, dim=1)
        self._sqdist32.index_add_(0, yc, norms.square())
        return xc, norms

    def _decide_fast(self, hc, yc, xc, xc_norms, plan, pred, ncc: _NCC, K: int, with_cls: bool):
        """Classifier (when ``with_cls``) and nearest-centre decisions from float32 scores, equal to the float64
        ones: rows where another score comes within the float32 error bound of the best are decided in float64."""
        rows32, base32, tolerances, rows64, exact_base = plan
        scores = torch.addmm(base32.index_select(0, yc), xc, rows32.T)  # maximise: [h.w_k + b_k | 2 h.mu_k - ||mu_k||^2]
        blocks = [("cls", slice(0, K)), ("ncc", slice(K, None))] if with_cls else [("ncc", slice(None))]
        ambiguous = torch.zeros(hc.shape[0], dtype=torch.bool, device=self.device)
        for (name, cols), (per_norm, per_class) in zip(blocks, tolerances):
            block = scores[:, cols]
            best, arg = block.max(dim=1)
            threshold = best.sub_(per_class.index_select(0, yc).add_(xc_norms, alpha=per_norm))
            ambiguous |= (block >= threshold.unsqueeze(1)).sum(dim=1) > 1
            if name == "cls":
                pred = arg
            else:
                nearest = ncc.idx[arg]
        if bool(ambiguous.any()):
            idx = ambiguous.nonzero().squeeze(1)
            y_amb = yc.index_select(0, idx)
            xc64 = hc.index_select(0, idx).to(_F64) - self.means.index_select(0, y_amb)
            exact = torch.addmm(exact_base.index_select(0, y_amb), xc64, rows64.T)
            if len(blocks) == 2:  # with a weight: the classifier columns come first
                pred[idx] = exact[:, :K].argmax(dim=1)
                exact = exact[:, K:]
            nearest[idx] = ncc.decide(exact)
        return pred, nearest

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
        nc2_maxangle, nc2_etf_error, nc4, gnc2_log, gnc2_log_var, ncc_acc, and nc5 with OOD
        features).  ``bias`` is only checked: decisions for nc4 and ncc_acc were taken in pass 2.
        ``reduce_fn`` all-reduces the pass-2 state first (once)."""
        if self._phase == "means":
            raise RuntimeError("CollapseAccumulator.compute: run pass 1, finalize_means() and pass 2 first.")
        if weight is not None:
            _check_weight(weight, bias, self.num_classes, self.dim)
        if self._phase == "scatter":
            self._fold_pending()
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
            ncc_hits=self.ncc_hits,
            ood=self.ood,
            tile=self.tile,
        )

    @torch.no_grad()
    def update_ood(self, h: torch.Tensor) -> None:
        """Add out-of-distribution features h [B, d] (any time before :meth:`compute`): with any, ``compute``
        also returns ``nc5`` against their mean.  Their sums are all-reduced with pass 2's tensors."""
        self.add_ood(ood_sums(h, self.dim, self.device))

    def add_ood(self, sums: torch.Tensor) -> None:
        """Add OOD sums as :func:`~fixedcls.collapse.stats.ood_sums` gives them ([d + 1]: feature sum, count)."""
        if self._phase == "done":
            raise RuntimeError("CollapseAccumulator.add_ood: compute() was called; call reset() to start again.")
        self.ood += sums.to(self.device, _F64)


def nc_metrics(
    features: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scatter_dtype: torch.dtype = torch.float32,
    ood_features: torch.Tensor | None = None,
    tile: int = TILE,
) -> dict[str, float]:
    """SPEC section 3 measures of in-memory features, accumulated in float64 for any input dtype.

    features [N, d], labels [N] (integers in [0, K)), weight [K, d] (one row per class, as
    ``model.head.weight``), bias [K] or None.  The classifier decision for ``nc4`` is
    argmax_c (w_c.h + b_c) over all rows of ``weight``.  Runs the streaming
    :class:`CollapseAccumulator` with the whole tensor as one batch.  ``scatter_dtype``: the
    dtype of the products of class-centred features, float32 (~1e-7 relative, immune to
    offsets) or float64 (~1e-14); see :class:`CollapseAccumulator`.  ``ood_features`` [M, d]:
    features of out-of-distribution data, for ``nc5``.  ``tile``: classes per tile of the pairwise
    measures and per chunk of the decisions (memory O(K d + d^2 + tile^2); any value gives the
    same measures up to rounding).
    """
    if not torch.is_tensor(features) or not torch.is_tensor(labels) or not torch.is_tensor(weight):
        raise FixedclsError("nc_metrics: features, labels and weight must be torch tensors; convert with torch.as_tensor.")
    if weight.dim() != 2:
        raise FixedclsError(f"nc_metrics: weight must have shape [K, d], got {tuple(weight.shape)}; pass model.head.weight.")
    acc = CollapseAccumulator(weight.shape[0], weight.shape[1], device=features.device, scatter_dtype=scatter_dtype,
                              tile=tile)
    acc.update_means(features, labels)
    acc.finalize_means()
    acc.update_scatter(features, labels, weight=weight, bias=bias)
    if ood_features is not None:
        acc.update_ood(ood_features)
    return acc.compute(weight, bias)
