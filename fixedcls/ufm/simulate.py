"""Simulate the unconstrained-features model: train W and H by full-batch descent, measure collapse.

The simulation is the nonconvex problem itself, run by an ordinary optimizer in float64, and its
history is measured by :func:`fixedcls.collapse.nc_metrics`, the function training runs use, so a
measure that misbehaves on a deep network can be checked here against the exact answer of
:mod:`fixedcls.ufm.theory`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import polytopes
from ..collapse import nc_metrics
from ..errors import FixedclsError
from ._checks import LOSSES, NORMALIZATIONS, choice, class_counts, nonnegative, polytope_dim, positive_int

__all__ = ["OPTIMIZERS", "Simulation", "simulate", "ufm_objective"]

OPTIMIZERS = ("lbfgs", "gd")
_F64 = torch.float64
#: Defaults per optimizer: (steps, lr, every).  L-BFGS needs no tuning; gradient descent is
#: preconditioned per sample (see ``simulate``) so that one lr suits W and H alike.
_DEFAULTS = {"lbfgs": (3000, 1.0, 1), "gd": (20000, 0.5, 500)}
_EPS = torch.finfo(torch.float64).eps
#: L-BFGS stops after this many iterations without a decrease of the objective.
_STALL = 50


def ufm_objective(
    W: torch.Tensor,
    H: torch.Tensor,
    labels: torch.Tensor,
    lambda_w: float,
    lambda_h: float,
    *,
    loss: str = "ce",
    bias: torch.Tensor | None = None,
    scale: float = 1.0,
    normalize: str = "none",
    learned: bool = True,
) -> torch.Tensor:
    """The UFM objective that :func:`simulate` minimises (a scalar tensor).

        f = (1/N) sum_i loss(scale * W n(h_i) + b, y_i) + [learned] (lambda_w/2) ||W||_F^2 + (lambda_h/2) ||H||_F^2

    n = identity or L2 normalisation; losses: ``ce`` (cross-entropy), ``mse``
    (1/2 ||logits - e_y||^2) and ``dot_regression`` (1/2 (w_y . n(h) - 1)^2, i.e. the target
    logit over ``scale``, as :class:`fixedcls.models.heads.DotRegressionLoss`).  The bias, when given,
    is not regularised; a fixed head (``learned=False``) carries no weight decay.
    """
    features = F.normalize(H, dim=1) if normalize == "l2" else H
    logits = scale * features @ W.T
    if bias is not None:
        logits = logits + bias
    if loss == "ce":
        data = F.cross_entropy(logits, labels)
    elif loss == "mse":
        data = 0.5 * (logits - F.one_hot(labels, W.shape[0]).to(logits.dtype)).pow(2).sum(dim=1).mean()
    else:
        # Not heads.DotRegressionLoss itself: it casts the logits to float32, and the simulation
        # must stay in float64 to reach the optimum to 1e-10.
        data = 0.5 * (logits.gather(1, labels[:, None]).squeeze(1) / scale - 1.0).pow(2).mean()
    value = data + 0.5 * lambda_h * H.pow(2).sum()
    if learned:
        value = value + 0.5 * lambda_w * W.pow(2).sum()
    return value


@dataclass
class Simulation:
    """The end state of :func:`simulate` and its measured history.

    ``W`` [K, d] (the learned rows, or the fixed polytope), ``H`` [N, d], ``labels`` [N],
    ``bias`` [K] or None, all float64.  ``history``: one dict per measurement with ``step``
    (optimizer iterations so far), ``objective`` and every :func:`~fixedcls.collapse.nc_metrics`
    key, measured on (H, labels) with the classifier the model applies (scale * W, bias).
    """

    W: torch.Tensor
    H: torch.Tensor
    labels: torch.Tensor
    bias: torch.Tensor | None
    history: list[dict]
    counts: tuple[int, ...]
    head: str
    loss: str
    lambda_w: float
    lambda_h: float
    scale: float = 1.0
    normalize: str = "none"
    optimizer: str = "lbfgs"
    steps: int = 0
    converged: bool = False
    objective: float = field(default=float("nan"))

    @property
    def class_means(self) -> torch.Tensor:
        """[K, d] mean feature of each class."""
        sums = torch.zeros(len(self.counts), self.H.shape[1], dtype=_F64).index_add_(0, self.labels, self.H)
        return sums / torch.tensor(self.counts, dtype=_F64)[:, None]

    @property
    def metrics(self) -> dict:
        """The last measurement (the end state)."""
        return self.history[-1]

    def collapse_history(self) -> list[dict]:
        """The history as :func:`fixedcls.collapse.plot_collapse` reads it: ``epoch`` is the step."""
        return [
            {"epoch": row["step"], **{f"collapse/{k}": v for k, v in row.items() if k not in ("step", "objective")}}
            for row in self.history
        ]


def _gradient_max(closure, params: list[torch.Tensor]) -> float:
    """Largest gradient entry at the current point (evaluated afresh: after a line search the
    stored gradients may belong to a trial point)."""
    closure()
    return max(float(p.grad.abs().max()) for p in params)


def _labels(counts: Sequence[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))


def _check_well_posed(head: str, loss: str, normalize: str, lambda_w: float, lambda_h: float, scale: float) -> None:
    learned = head == "learned"
    if learned and scale != 1.0:
        raise FixedclsError(f"scale={scale} applies to fixed heads only (a learned W absorbs it): leave scale=1")
    if learned and normalize != "none":
        raise FixedclsError("normalize='l2' applies to fixed heads only; the learned head is a plain linear layer")
    if loss == "dot_regression" and learned:
        raise FixedclsError("loss 'dot_regression' needs a fixed polytope head (e.g. head='etf'): use a fixed head or loss='ce'")
    if normalize == "l2" and lambda_h > 0:
        raise FixedclsError(
            "normalize='l2' with lambda_h > 0 has no minimiser (the loss sees only directions, weight decay shrinks "
            "H to 0): set lambda_h=0 or normalize='none'"
        )
    if loss == "ce" and normalize == "none" and (lambda_h == 0 or (learned and lambda_w == 0)):
        raise FixedclsError(
            "cross-entropy without weight decay has no minimiser (the logits grow forever): "
            "set lambda_h > 0" + (" and lambda_w > 0" if learned else "")
        )


def simulate(
    counts: Sequence[int],
    dim: int,
    lambda_w: float,
    lambda_h: float,
    head: str = "learned",
    loss: str = "ce",
    steps: int | None = None,
    lr: float | None = None,
    optimizer: str = "lbfgs",
    seed: int = 0,
    every: int | None = None,
    *,
    scale: float = 1.0,
    normalize: str = "none",
    bias: bool = False,
    tol: float = 1e-9,
) -> Simulation:
    """Train the UFM by full-batch descent in float64 and measure collapse along the way.

    Minimises :func:`ufm_objective` over H [N, d] (``counts[k]`` samples of class k, labels in
    order) and, for ``head="learned"``, W [K, d] (plus a free bias with ``bias=True``);
    any other ``head`` fixes W to ``fixedcls.polytopes.make(head, K, dim)`` (promoted to
    float64), with logits scale * W n(h).  W and H start Gaussian (std 1/sqrt(d), ``seed``).

    ``optimizer="lbfgs"`` (default): ``torch.optim.LBFGS`` with a strong-Wolfe line search, one
    step per iteration, stopped when the gradient's largest entry falls below ``tol`` (1e-9 is
    about the float64 floor for K <= 10; it leaves the objective within ~1e-14 of the optimum;
    ``converged`` says whether it got there) or when the objective has not decreased for 50
    iterations.
    ``optimizer="gd"``: plain full-batch gradient descent with step ``lr`` on W and ``lr * N``
    on H, because each h_i sees only its own 1/N share of the loss.  Defaults
    (steps, lr, every): lbfgs (3000, 1, 1), gd (20000, 0.5, 500).  The history is measured at
    step 0, every ``every`` steps and at the end.
    """
    counts = class_counts(counts)
    K = len(counts)
    dim = positive_int("dim", dim)
    loss = choice("loss", loss, LOSSES)
    normalize = choice("normalize", normalize, NORMALIZATIONS)
    optimizer = choice("optimizer", optimizer, OPTIMIZERS)
    heads = ("learned", *polytopes.available())
    head = choice("head", head, heads)
    lambda_w = nonnegative("lambda_w", lambda_w)
    lambda_h = nonnegative("lambda_h", lambda_h)
    scale = nonnegative("scale", scale, strict=True)
    _check_well_posed(head, loss, normalize, lambda_w, lambda_h, scale)
    if bias and head != "learned":
        raise FixedclsError("bias=True applies to the learned head only (fixed heads have no bias here)")
    default_steps, default_lr, default_every = _DEFAULTS[optimizer]
    steps = default_steps if steps is None else positive_int("steps", steps)
    lr = default_lr if lr is None else nonnegative("lr", lr, strict=True)
    every = default_every if every is None else positive_int("every", every)
    seed = positive_int("seed", seed, minimum=0)

    labels = _labels(counts)
    N = len(labels)
    generator = torch.Generator().manual_seed(seed)
    learned = head == "learned"
    if learned:
        W = (torch.randn(K, dim, generator=generator, dtype=_F64) / dim**0.5).requires_grad_()
    else:
        W = polytopes.make(head, K, polytope_dim(head, K, dim)).to(_F64)
    H = (torch.randn(N, dim, generator=generator, dtype=_F64) / dim**0.5).requires_grad_()
    b = torch.zeros(K, dtype=_F64, requires_grad=True) if bias else None
    params = [p for p in (W, H, b) if p is not None and p.requires_grad]

    def objective() -> torch.Tensor:
        return ufm_objective(W, H, labels, lambda_w, lambda_h, loss=loss, bias=b, scale=scale,
                             normalize=normalize, learned=learned)

    def measure(step: int) -> dict:
        with torch.no_grad():
            value = float(objective())
            applied = scale * W.detach()
            measures = nc_metrics(H.detach(), labels, applied, None if b is None else b.detach())
            return {"step": step, "objective": value, **measures}

    history = [measure(0)]
    done, converged = 0, False
    if optimizer == "lbfgs":
        # max_eval: room for every line search, so that a call runs its `every` iterations in full.
        opt = torch.optim.LBFGS(params, lr=lr, max_iter=every, max_eval=50 * every, history_size=100,
                                line_search_fn="strong_wolfe", tolerance_grad=tol, tolerance_change=0.0)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            value = objective()
            value.backward()
            return value

        best, stalled_since = history[0]["objective"], 0
        while done < steps:
            opt.param_groups[0]["max_iter"] = min(every, steps - done)
            start_value = float(opt.step(closure).detach())  # the objective before this call's iterations
            n_iter = opt.state[opt._params[0]]["n_iter"]
            advanced, done = n_iter - done, n_iter
            converged = _gradient_max(closure, params) <= tol
            # Some problems reach the float64 floor of the objective with the gradient still above
            # tol; once the objective has not fallen for _STALL iterations, more would only spin.
            if start_value < best - 4 * _EPS * abs(best):
                best, stalled_since = start_value, done
            if advanced == 0 or converged or done >= steps or done - stalled_since >= _STALL:
                break
            history.append(measure(done))
    else:
        classifier = [p for p in (W, b) if p is not None and p.requires_grad]
        groups = [{"params": [H], "lr": lr * N}] + ([{"params": classifier, "lr": lr}] if classifier else [])
        opt = torch.optim.SGD(groups)
        for done in range(1, steps + 1):
            opt.zero_grad()
            objective().backward()
            opt.step()
            if done % every == 0 and done < steps:
                history.append(measure(done))

        def closure() -> torch.Tensor:
            opt.zero_grad()
            value = objective()
            value.backward()
            return value

        converged = _gradient_max(closure, params) <= tol
    history.append(measure(done))
    return Simulation(
        W=W.detach(), H=H.detach(), labels=labels, bias=None if b is None else b.detach(), history=history,
        counts=counts, head=head, loss=loss, lambda_w=lambda_w, lambda_h=lambda_h, scale=scale,
        normalize=normalize, optimizer=optimizer, steps=done, converged=converged, objective=history[-1]["objective"],
    )
