"""Closed-form global optima of the balanced unconstrained-features model (UFM).

Notation: K classes, n samples per class, N = K n, classifier W [K, d] with rows w_k,
features H [N, d] with rows h_i, no bias unless stated.  Every objective here averages the
loss over the N samples and puts weight decay on the *sums* of squares (Zhu et al. 2021):

    f(W, H) = (1/N) sum_i loss(W h_i, y_i) + (lambda_w/2) ||W||_F^2 + (lambda_h/2) ||H||_F^2.

All three results reduce to one number: with lam = sqrt(lambda_w lambda_h), the optimum is
W = H = 0 exactly when K n^(1/2) lam >= 1 (the same threshold for cross-entropy and MSE), and
otherwise a one-dimensional convex problem in the correct-class logit t fixes every norm.
``docs/ufm.md`` derives each formula.
"""

from __future__ import annotations

import math

from ._checks import nonnegative, positive_int

__all__ = ["ce_optimum", "minority_collapse_threshold", "mse_optimum"]


def _balanced_args(num_classes, n_per_class, lambda_w, lambda_h) -> tuple[int, int, float, float]:
    return (
        positive_int("num_classes", num_classes, minimum=2),
        positive_int("n_per_class", n_per_class),
        nonnegative("lambda_w", lambda_w, strict=True),
        nonnegative("lambda_h", lambda_h, strict=True),
    )


def ce_optimum(num_classes: int, n_per_class: int, lambda_w: float, lambda_h: float) -> dict:
    """Global optimum of the balanced cross-entropy UFM with weight decay and no bias.

    Objective (N = K n samples, labels balanced, d >= K-1 dimensions)::

        f(W, H) = (1/N) sum_i CE(W h_i, y_i) + (lambda_w/2) ||W||_F^2 + (lambda_h/2) ||H||_F^2

    Zhu et al. (NeurIPS 2021, Theorem 3.1): at every global minimiser the rows of W form a simplex
    ETF, h_i = sqrt(lambda_w / (n lambda_h)) w_{y_i}, and ||w_k||^2 is the same for every class.
    Writing t = w_y . h (the correct-class logit; the others are -t/(K-1)) and
    c = K sqrt(n lambda_w lambda_h), the problem becomes the 1-D convex
    ``min_{t >= 0} log(1 + (K-1) exp(-t K/(K-1))) + c t``, solved in closed form:

    * ``trivial``: W = H = 0 is the unique optimum iff c >= 1;
    * otherwise, with p = (K-1) sqrt(n lambda_w lambda_h) (the optimal probability mass on the
      wrong classes), t = (K-1)/K log((K-1)(1-p)/p),
      ||w_k||^2 = t sqrt(n lambda_h / lambda_w), ||h_i||^2 = t sqrt(lambda_w / (n lambda_h)).

    Returns a dict: ``trivial``, ``w_norm_sq``, ``h_norm_sq``, ``correct_logit`` (t),
    ``wrong_logit`` (-t/(K-1)), ``correct_prob`` (1-p), ``objective`` (the minimum of f),
    ``lambda_threshold`` (the largest sqrt(lambda_w lambda_h) with a non-trivial optimum,
    1/(K sqrt n)), ``geometry`` ("simplex_etf" or "zero") and ``min_dim`` (K-1).
    """
    K, n, lambda_w, lambda_h = _balanced_args(num_classes, n_per_class, lambda_w, lambda_h)
    lam = math.sqrt(lambda_w * lambda_h)
    c = K * math.sqrt(n) * lam
    out = {"lambda_threshold": 1.0 / (K * math.sqrt(n)), "min_dim": K - 1}
    if c >= 1.0:
        return out | {
            "trivial": True, "geometry": "zero", "w_norm_sq": 0.0, "h_norm_sq": 0.0,
            "correct_logit": 0.0, "wrong_logit": 0.0, "correct_prob": 1.0 / K, "objective": math.log(K),
        }
    wrong_mass = (K - 1) * math.sqrt(n) * lam
    t = (K - 1) / K * math.log((K - 1) * (1.0 - wrong_mass) / wrong_mass)
    # log(1 + (K-1) e^{-tK/(K-1)}) at the optimum is -log(1 - p): (K-1) e^{-tK/(K-1)} = p / (1-p).
    objective = -math.log1p(-wrong_mass) + c * t
    return out | {
        "trivial": False,
        "geometry": "simplex_etf",
        "w_norm_sq": t * math.sqrt(n * lambda_h / lambda_w),
        "h_norm_sq": t * math.sqrt(lambda_w / (n * lambda_h)),
        "correct_logit": t,
        "wrong_logit": -t / (K - 1),
        "correct_prob": 1.0 - wrong_mass,
        "objective": objective,
    }


def mse_optimum(
    num_classes: int, n_per_class: int, lambda_w: float, lambda_h: float, bias: bool = False
) -> dict:
    """Global optimum of the balanced MSE UFM with weight decay, with or without a free bias.

    Objective (N = K n samples, e_y the one-hot target, bias b unregularised when present)::

        f(W, H, b) = (1/(2N)) sum_i ||W h_i + b - e_{y_i}||^2 + (lambda_w/2) ||W||_F^2 + (lambda_h/2) ||H||_F^2

    Through the variational form of the nuclear norm the problem is prox of the logits
    Z = W H (Tirer & Bruna 2022; Zhou et al. 2022): with s = K sqrt(n lambda_w lambda_h),
    the singular values of the (centred, with a bias) target shrink by s.

    * ``trivial`` iff s >= 1 (then W = H = 0 and b = 1/K with a bias).
    * Without bias (d >= K): W W^T = a I (an orthogonal frame), correct logit z = 1 - s, wrong
      logits 0, ||w_k||^2 = z sqrt(n lambda_h / lambda_w), ||h_i||^2 = z sqrt(lambda_w / (n lambda_h)),
      objective s - s^2/2.
    * With bias (d >= K-1): W and the class means form a simplex ETF, b = 1/K, H is centred,
      the correct logit is z (K-1)/K + 1/K and the wrong ones (1-z)/K, both norms are scaled by
      (K-1)/K, objective (K-1)/K (s - s^2/2).

    Returns a dict with ``trivial``, ``w_norm_sq``, ``h_norm_sq``, ``correct_logit``,
    ``wrong_logit``, ``bias`` (the value of every b_k, 0.0 without bias), ``objective``,
    ``lambda_threshold`` (1/(K sqrt n)), ``geometry`` ("orthogonal", "simplex_etf" or "zero")
    and ``min_dim`` (K without bias, K-1 with it).
    """
    K, n, lambda_w, lambda_h = _balanced_args(num_classes, n_per_class, lambda_w, lambda_h)
    s = K * math.sqrt(n * lambda_w * lambda_h)
    z = max(0.0, 1.0 - s)
    # With a bias only the centred target Y - 11^T/K is fitted: its K-1 non-zero singular
    # values carry a fraction (K-1)/K of the energy of the one-hot target.
    share = (K - 1) / K if bias else 1.0
    kept = min(s, 1.0)
    out = {
        "trivial": s >= 1.0,
        "geometry": "zero" if s >= 1.0 else ("simplex_etf" if bias else "orthogonal"),
        "w_norm_sq": share * z * math.sqrt(n * lambda_h / lambda_w),
        "h_norm_sq": share * z * math.sqrt(lambda_w / (n * lambda_h)),
        "bias": 1.0 / K if bias else 0.0,
        "objective": share * (kept - kept * kept / 2.0),
        "lambda_threshold": 1.0 / (K * math.sqrt(n)),
        "min_dim": K - 1 if bias else K,
    }
    if bias:
        out |= {"correct_logit": z * (K - 1) / K + 1.0 / K, "wrong_logit": (1.0 - z) / K}
    else:
        out |= {"correct_logit": z, "wrong_logit": 0.0}
    return out


def minority_collapse_threshold(
    num_majority: int, num_minority: int, n_minority: int, lambda_w: float, lambda_h: float
) -> float:
    """Imbalance ratio n_majority / n_minority at and above which the minority classifiers collapse.

    The UFM of :func:`ce_optimum` (cross-entropy, no bias, d >= K) with ``num_majority`` classes
    of n_A samples and ``num_minority`` >= 2 classes of n_B = ``n_minority`` samples.  Minority
    collapse (Fang et al., PNAS 2021): the rows w_k of all minority classes become one vector,
    so the model cannot tell minority classes apart.  In the convex reformulation of
    :func:`~fixedcls.ufm.ce_convex_oracle` the minority contrast is a separate singular value
    of the logit matrix, and its optimality condition at zero is (``docs/ufm.md``)::

        sqrt(n_B) <= sqrt(lambda_w lambda_h) N,   N = K_A n_A + K_B n_B,

    exactly, whatever the loss's other values.  Solved for the ratio r = n_A / n_B::

        r* = (1 / (sqrt(lambda_w lambda_h) sqrt(n_B)) - K_B) / K_A.

    The same condition holds for any group of classes that share a count, and for n_A = n_B it
    is the trivial threshold of :func:`ce_optimum`; r* <= 1 means the minority rows collapse
    even without imbalance (the whole model is then W = H = 0 when K sqrt(n lam) >= 1).
    """
    K_A = positive_int("num_majority", num_majority)
    K_B = positive_int("num_minority", num_minority, minimum=2)
    n_B = positive_int("n_minority", n_minority)
    lam = math.sqrt(nonnegative("lambda_w", lambda_w, strict=True) * nonnegative("lambda_h", lambda_h, strict=True))
    return (1.0 / (lam * math.sqrt(n_B)) - K_B) / K_A
