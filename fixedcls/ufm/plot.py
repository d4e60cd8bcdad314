"""The heads-comparison figure: collapse measures of several UFM simulations beside their theory."""

from __future__ import annotations

import os
from collections.abc import Sequence

from .simulate import Simulation
from .theory import Optimum

__all__ = ["COMPARED_MEASURES", "FLOOR", "plot_heads"]

#: (key, label, complement): the panels, one column each; complement plots 1 - value.
COMPARED_MEASURES = (
    ("nc1", "NC1  tr(Σ_W Σ_B⁺)/K", False),
    ("nc2_etf_error", "NC2  distance to a simplex ETF", False),
    ("nc3", "NC3  classifier vs centred means", False),
    ("proto_cos", "1 - proto_cos  (mean to own row)", True),
)
#: Values at or below this are drawn on it: the float64 optimum is exact, the log axis is not.
FLOOR = 1e-16


def _value(row: dict, key: str, complement: bool) -> float:
    value = 1.0 - row[key] if complement else row[key]
    return max(value, FLOOR)


def plot_heads(
    runs: Sequence[tuple[str, str, Simulation, Optimum | None]], path: str | os.PathLike, title: str | None = None
) -> str:
    """Write a grid: one row per setting, one column per measure, one line per head.

    ``runs``: (setting label, head, simulation, its exact optimum or None), in the order the
    lines should appear.  A star at a line's last step marks the theory's value of that measure
    (:meth:`Optimum.metrics`).  Returns the path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    settings = list(dict.fromkeys(label for label, *_ in runs))
    heads = list(dict.fromkeys(head for _, head, *_ in runs))
    colours = {head: f"C{i}" for i, head in enumerate(heads)}
    ncols = len(COMPARED_MEASURES)
    fig = Figure(figsize=(3.6 * ncols, 2.9 * len(settings) + 0.9))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(settings), ncols, squeeze=False)
    for label, head, sim, optimum in runs:
        row = settings.index(label)
        theory = optimum.metrics() if optimum is not None else None
        steps = [entry["step"] for entry in sim.history]
        for col, (key, name, complement) in enumerate(COMPARED_MEASURES):
            ax = axes[row, col]
            ax.plot(steps, [_value(entry, key, complement) for entry in sim.history], color=colours[head],
                    marker="o", markersize=2.5, label=head)
            if theory is not None:
                ax.plot([steps[-1]], [_value(theory, key, complement)], marker="*", markersize=11,
                        color=colours[head], markeredgecolor="black", linestyle="none")
    for row, label in enumerate(settings):
        for col, (_, name, _) in enumerate(COMPARED_MEASURES):
            ax = axes[row, col]
            ax.set_yscale("log")
            ax.set_ylim(FLOOR / 10, None)
            ax.grid(True, which="major", alpha=0.3)
            ax.tick_params(labelsize=7)
            ax.set_title(f"{label}: {name}", fontsize=8)
            ax.set_xlabel("L-BFGS iteration" if runs[0][2].optimizer == "lbfgs" else "gradient step", fontsize=8)
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper right", ncol=len(heads), fontsize=8)
    fig.suptitle(title or f"UFM heads: simulation (lines) and exact optimum (stars); values <= {FLOOR:g} drawn at {FLOOR:g}",
                 fontsize=10, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path = os.fspath(path)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
