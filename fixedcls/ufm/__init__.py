"""Theory oracles: the unconstrained-features model (UFM), solved exactly and simulated.

In the UFM (also "layer-peeled model") the last-layer features H are free variables next to
the classifier W, and neural collapse becomes a statement about the global optimum of

    f(W, H) = (1/N) sum_i loss(W h_i, y_i) + (lambda_w/2) ||W||_F^2 + (lambda_h/2) ||H||_F^2.

* :func:`ce_optimum`, :func:`mse_optimum` -- closed forms for balanced classes;
* :func:`ce_convex_oracle` -- the exact cross-entropy optimum for any class counts (convex
  reformulation), and :func:`minority_collapse_threshold` for minority collapse;
* :func:`fixed_head_optimum` -- the optimal features when W is a fixed polytope;
* :func:`global_optimum` -- whichever of these answers a given simulation;
* :func:`simulate` -- the nonconvex problem trained by L-BFGS or gradient descent in float64,
  measured by :func:`fixedcls.collapse.nc_metrics` as training runs are.

``python -m fixedcls.ufm --help`` runs simulations beside the theory; ``docs/ufm.md`` derives
every formula.
"""

from .closed_form import ce_optimum, minority_collapse_threshold, mse_optimum
from .convex import ce_convex_oracle
from .fixed import fixed_head_optimum
from .simulate import OPTIMIZERS, Simulation, simulate, ufm_objective
from .theory import Optimum, global_optimum, minority_spread

__all__ = [
    "OPTIMIZERS",
    "Optimum",
    "Simulation",
    "ce_convex_oracle",
    "ce_optimum",
    "fixed_head_optimum",
    "global_optimum",
    "minority_collapse_threshold",
    "minority_spread",
    "mse_optimum",
    "simulate",
    "ufm_objective",
]
