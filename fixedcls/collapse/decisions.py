"""Classifier and nearest-class-centre (NCC) decisions of the collapse measures (``nc4``, ``ncc_acc``).

* :class:`_NCC` -- argmin_c ||h - mu_c|| over the present class means, in float64;
* :class:`_ChunkedDecisions` -- both decisions over chunks of ``tile`` classes, for K above the tile
  size: no B x K score block wider than the tile, and no K x K table of per-class bases (which the
  exact accumulator keeps for small K, see ``CollapseAccumulator.update_scatter``).

Every chunked reduction keeps the first index among equal scores, as ``argmax``/``argmin`` over the
whole row does, so the chunked decisions are the whole-row ones.
"""

from __future__ import annotations

import torch

from ..errors import FixedclsError
from .pairwise import TILE

_F64 = torch.float64
_F32 = torch.float32
_EPS32 = torch.finfo(_F32).eps


def _decisions(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    if logits.dim() != 2 or logits.shape[1] != num_classes:
        raise FixedclsError(
            f"collapse: logits must have shape [B, {num_classes}] (one column per row of W), got {tuple(logits.shape)}; pass the head's output."
        )
    return logits.argmax(dim=1)


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

    def predict(self, h64: torch.Tensor, tile: int = TILE) -> torch.Tensor:
        """The nearest class of each row of h64 [B, d] (float64), over chunks of ``tile`` classes."""
        x = h64 - self.centre
        best = arg = None
        for k0 in range(0, self.mu.shape[0], tile):
            score = self.mu_sq[k0 : k0 + tile].unsqueeze(0) - 2.0 * (x @ self.mu[k0 : k0 + tile].T)
            low, at = score.min(dim=1)
            if best is None:
                best, arg = low, at
            else:  # strictly lower only: on a tie the earlier class stays, as argmin over the whole row
                take = low < best
                best, arg = torch.where(take, low, best), torch.where(take, at + k0, arg)
        return self.idx[arg]

    def offsets(self, means: torch.Tensor) -> torch.Tensor:
        """[C, Kv] (mu_c - centre).mu_k: with them, (h - centre).mu_k = (h - mu_y).mu_k + offsets[y, k],
        so decisions can be taken from the class-centred features of pass 2 (see decide)."""
        return (means - self.centre) @ self.mu.T

    def decide(self, centred_products: torch.Tensor) -> torch.Tensor:
        """Decisions from (h - centre).mu_k [B, Kv] (e.g. (h - mu_y).mu_k + offsets[y])."""
        return self.idx[(self.mu_sq.unsqueeze(0) - 2.0 * centred_products).argmin(dim=1)]


class _ChunkedDecisions:
    """The classifier decision argmax_k (w_k.h + b_k) (with ``weight``) and the NCC decision, both as the
    argmax of scores x.v_k + base_k with ONE centre c for every row (x = h - c), taken over chunks of
    ``tile`` columns.  The NCC columns are v_k = 2 mu_k and base_k = 2 (c - n).mu_k - ||mu_k||^2 (mu_k
    centred at the NCC centre n), the negated NCC distance up to a per-row constant.

    With ``fast`` the scores are float32: c is the NCC centre rounded to float32 (so for float32 rows h - c
    rounds once, relative to itself), and a row whose best score is not ahead of every other by twice the
    float32 error bound (see ``CollapseAccumulator._fast_decision_plan``: here the bases are per column, so
    the bound takes their largest magnitude) is decided again in float64, centred at n.  The running
    reduction keeps, per row, the best score and whether a second score lies within the bound of it:
    that is the whole row's test, chunk by chunk.  Without ``fast`` every score is float64.
    """

    def __init__(self, ncc: _NCC, weight64: torch.Tensor | None, bias: torch.Tensor | None, *, fast: bool, tile: int):
        self.ncc, self.tile, self.fast = ncc, int(tile), fast
        self.with_cls = weight64 is not None
        self.exact = self._blocks(ncc.centre, weight64, bias)
        if fast:
            self.centre32 = ncc.centre.to(_F32)
            self.centre32_64 = self.centre32.to(_F64)  # float64 rows are centred here in float64, then rounded once
            dim = ncc.mu.shape[1]
            self.approx = []
            for v, base in self._blocks(self.centre32_64, weight64, bias):
                per_norm = 2.0 * (dim + 4) * _EPS32 * float(torch.linalg.vector_norm(v, dim=1).max())
                per_base = 4.0 * _EPS32 * float(base.abs().max())
                self.approx.append((v.to(_F32), base.to(_F32), per_norm, per_base))

    def _blocks(self, centre: torch.Tensor, weight64: torch.Tensor | None, bias: torch.Tensor | None):
        """[(columns v [C, d], bases [C])]: the classifier's (with a weight), then the NCC's, in float64."""
        ncc = self.ncc
        blocks = []
        if weight64 is not None:
            base = weight64 @ centre
            if bias is not None:
                base = base + bias.detach().to(base.device, _F64)
            blocks.append((weight64, base))
        blocks.append((2.0 * ncc.mu, 2.0 * (ncc.mu @ (centre - ncc.centre)) - ncc.mu_sq))
        return blocks

    def decide(self, h: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(classifier decision or None, NCC decision) of the rows h [B, d] (float32 or float64)."""
        if not self.fast:
            found = [self._argmax64(h.to(_F64) - self.ncc.centre, v, base) for v, base in self.exact]
        else:
            x = (h - self.centre32) if h.dtype == _F32 else (h.to(_F64) - self.centre32_64).to(_F32)
            x_norm = torch.linalg.vector_norm(x, dim=1)
            found, ambiguous = [], torch.zeros(h.shape[0], dtype=torch.bool, device=h.device)
            for v, base, per_norm, per_base in self.approx:
                arg, unsure = self._argmax32(x, v, base, x_norm.mul(per_norm).add_(per_base))
                found.append(arg)
                ambiguous |= unsure
            if bool(ambiguous.any()):
                rows = ambiguous.nonzero().squeeze(1)
                x64 = h.index_select(0, rows).to(_F64) - self.ncc.centre
                for arg, (v, base) in zip(found, self.exact):
                    arg[rows] = self._argmax64(x64, v, base)
        nearest = self.ncc.idx[found[-1]]
        return (found[0] if self.with_cls else None), nearest

    def _argmax64(self, x: torch.Tensor, v: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        best = arg = None
        for k0 in range(0, v.shape[0], self.tile):
            high, at = torch.addmm(base[k0 : k0 + self.tile], x, v[k0 : k0 + self.tile].T).max(dim=1)
            if best is None:
                best, arg = high, at
            else:  # strictly higher only: the earlier column wins a tie, as argmax over the whole row
                take = high > best
                best, arg = torch.where(take, high, best), torch.where(take, at + k0, arg)
        return arg

    def _argmax32(self, x: torch.Tensor, v: torch.Tensor, base: torch.Tensor, tol: torch.Tensor):
        """(argmax, ambiguous): ambiguous where the second best score lies within ``tol`` (per row) of the best.
        The two best scores of the row are kept chunk by chunk: the second of the union of two pairs of
        top-two values is max(min(best, best'), max(second, second'))."""
        best = torch.full((x.shape[0],), -torch.inf, dtype=_F32, device=x.device)
        second = best.clone()
        arg = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        for k0 in range(0, v.shape[0], self.tile):
            scores = torch.addmm(base[k0 : k0 + self.tile], x, v[k0 : k0 + self.tile].T)
            high, at = scores.max(dim=1)
            runner = scores.scatter_(1, at.unsqueeze(1), -torch.inf).amax(dim=1) if scores.shape[1] > 1 else torch.full_like(high, -torch.inf)
            second = torch.maximum(torch.minimum(best, high), torch.maximum(second, runner))
            take = high > best
            arg = torch.where(take, at + k0, arg)
            best = torch.maximum(best, high)
        return arg, second >= best - tol
