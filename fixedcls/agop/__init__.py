"""Deep neural collapse through the average gradient outer product (docs/agop.md).

    from fixedcls import agop
    layers = agop.representative_layers(model, [1, 2, 3, 4])   # {"layer1": conv, ...}
    row = agop.measure_agop(model, test_loader, layers)         # {"agop/layer1/nfa_corr": ..., ...}

* :func:`layer_agop` -- the AGOP of one ``nn.Linear`` / ``nn.Conv2d`` with respect to its input
  (each k x k patch for a convolution), exact or sketched with Rademacher probes.
* :func:`nfa_correlation` -- the Neural Feature Ansatz correlation of W^T W with AGOP^alpha.
* :func:`dnc_decomposition` -- nc1_trace of a layer's input, of its linear part and of its output
  after the nonlinearity, and the share of the NC1 reduction the linear map makes.
* :func:`representative_layers`, :func:`measure_agop` -- the per-stage measurement the training
  loop and the collapse CLI log as ``agop/<layer>/...``.

The AGOP is W^T K W with K the average outer product of the gradients at the layer's output, so
no D x D Jacobian is ever formed: one forward pass and r backward passes per batch, r the rank of
the logits' Jacobian with respect to the head's input (min(K, d)) or the number of probes.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .layers import representative_layers
from .passes import _run, _Tap
from .spectral import _factored_spectrum, _spectral_pearson, nfa_correlation

__all__ = ["dnc_decomposition", "layer_agop", "measure_agop", "nfa_correlation", "representative_layers"]

_NAN = float("nan")


def layer_agop(model: nn.Module, inputs, module: nn.Module, probes="exact", *, samples: int | None = None,
               seed: int = 0, batch_size: int = 256) -> torch.Tensor:  # fmt: skip
    """The AGOP of ``module`` (an ``nn.Linear`` or ``nn.Conv2d`` inside ``model``) in float64.

    (1/N) sum_images sum_positions J^T J, J the Jacobian of the K logits with respect to the layer's input
    variable (the input vector; each k x k patch of a convolution; each token of a [B, N, C] linear), the
    model in eval mode.  [D, D] with D = C_in k k, or [groups, D_g, D_g] for a grouped / depthwise
    convolution (each group's patch is its own input).  ``inputs``: a tensor, an (inputs, labels) batch or a
    loader; ``samples``: a fixed seeded subset of at most that many samples.  ``probes``: ``"exact"`` or the
    number m of Rademacher probes per sample (unbiased; m backward passes instead of min(K, d)).
    """
    (tap,) = _run(model, inputs, {"layer": module}, grads=True, dnc=False, probes=probes, samples=samples, seed=seed, batch_size=batch_size)
    return tap.agop()


def _shares(tap: _Tap) -> dict[str, float]:
    before, linear, after = (tap.views[k].nc1_trace() for k in ("input", "linear", "output"))
    reduction = before - after
    return {
        "nc1_trace_input": before,
        "nc1_trace_linear": linear,
        "nc1_trace_output": after,
        "linear_share": (before - linear) / reduction if reduction != 0 else _NAN,
    }


def dnc_decomposition(model: nn.Module, loader, module: nn.Module, *, activation: nn.Module | None = None,
                      samples: int | None = None, seed: int = 0, batch_size: int = 256) -> dict[str, float]:  # fmt: skip
    """How much of a layer's within-class collapse its linear map makes.

    Returns ``nc1_trace_input`` (the layer's input phi(x): the mean patch of a convolution),
    ``nc1_trace_linear`` (S V^T phi(x), whose nc1_trace is that of W phi(x) since U has orthonormal
    columns), ``nc1_trace_output`` (the average-pooled output of ``activation``, by default the first
    activation after the layer in its block) and ``linear_share`` = (input - linear) / (input - output).
    """
    (tap,) = _run(model, loader, {"layer": module}, grads=False, dnc=True, activations={"layer": activation},
                  samples=samples, seed=seed, batch_size=batch_size)  # fmt: skip
    return _shares(tap)


def measure_agop(model: nn.Module, loader_or_batch, layers, samples: int = 512, seed: int = 0, probes="exact",
                 *, batch_size: int = 256) -> dict[str, float]:  # fmt: skip
    """``agop/<layer>/nfa_corr`` (alpha = 1), ``agop/<layer>/nfa_corr_sqrt`` (alpha = 1/2) and
    ``agop/<layer>/linear_share`` for every layer, from one pass over a fixed seeded subset of ``samples``.

    ``layers``: ``{label: module}``, or stages for :func:`representative_layers` (indices, names, "all").
    ``probes``: ``"exact"`` (min(K, d) backward passes per batch) or m Rademacher probes (m passes; the
    sketch's noise biases the correlations low) -- docs/agop.md weighs the two against an epoch's cost.
    The model's train/eval flags and the global torch / python / numpy RNG states are left as found.
    """
    chosen = dict(layers) if isinstance(layers, Mapping) else representative_layers(model, layers)
    taps = _run(model, loader_or_batch, chosen, grads=True, dnc=True, probes=probes, samples=samples, seed=seed, batch_size=batch_size)
    row: dict[str, float] = {}
    for tap in taps:
        w = tap.weight.to(tap.outer.device)
        gram = w @ w.transpose(1, 2)
        spectrum = _factored_spectrum(w, gram, tap.outer_blocks())
        row[f"agop/{tap.label}/nfa_corr"] = _spectral_pearson(w.sum(dim=2), gram, spectrum, 1.0, w.shape[2])
        row[f"agop/{tap.label}/nfa_corr_sqrt"] = _spectral_pearson(w.sum(dim=2), gram, spectrum, 0.5, w.shape[2])
        row[f"agop/{tap.label}/linear_share"] = _shares(tap)["linear_share"]
    return row
