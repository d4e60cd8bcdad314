"""Reporting collapse: the speed of collapse over epochs, the collapse plot and the markdown table."""

from __future__ import annotations

import math
import os
import re
import warnings
from typing import TYPE_CHECKING, Callable, Mapping, Optional, Sequence

import torch

from ..errors import FixedclsError
from ..escaping import markdown_row
from .stats import _GROWING_KEYS, EXTRA_KEYS, METRIC_KEYS, OOD_KEYS

if TYPE_CHECKING:
    from ..tracking.base import Tracker

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
    "ncc_acc": (">=", 0.99),
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
    ("gnc2_log_var", "GNC2 variance of -log ||u_c - u_c'||"),
    ("unc3", "UNC3 uniform duality"),
    ("1-ncc_acc", "1 - NCC accuracy"),
    ("nc5", "NC5 |cos(mu_c, mu_OOD)|"),
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
#: Per-stage AGOP measures (docs/agop.md), drawn on a linear scale beside the layer-wise NC1.
_AGOP_PANELS: tuple[tuple[str, str], ...] = (
    ("nfa_corr_sqrt", "NFA correlation (AGOP^1/2) per stage"),
    ("linear_share", "linear share of NC1 reduction per stage"),
)
_AGOP_KEY = re.compile(r"^agop/(.+)/([a-z_]+)$")


def _linear_series(history: Sequence[Mapping], key: str) -> tuple[list, list]:
    xs, ys = [], []
    for i, row in enumerate(history):
        v = row.get(key)
        if _finite(v):
            xs.append(row.get("epoch", i))
            ys.append(float(v))
    return xs, ys


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
        agop_stages = sorted({m.group(1) for row in history for k in row if (m := _AGOP_KEY.match(k))})
        for measure, label in _AGOP_PANELS:
            lines = [(*_linear_series(history, f"agop/{stage}/{measure}"), stage) for stage in agop_stages]
            lines = [line for line in lines if line[0]]
            if lines:
                panels.append((label, lines, "linear"))
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
        for ax, (label, lines, *scale) in zip(axes, panels):
            for xs, ys, name in lines:
                ax.plot(xs, ys, marker="o", markersize=2.5, linestyle="--" if name == "test" else "-", label=name)
            ax.set_yscale(scale[0] if scale else "log")
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
    order = {k: i for i, k in enumerate(METRIC_KEYS + EXTRA_KEYS + OOD_KEYS)}

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
        lines.append(markdown_row((k, fmt(metrics[k]))))
    return "\n".join(lines)


def log_prototype_alignment(tracker: Tracker, model, loader, *, device, autocast: Optional[Callable] = None,
                            key: str = "prototype_alignment") -> None:
    """Log the `prototype_alignment` table to an active tracker; a failure only warns."""
    from .measure import prototype_alignment

    if not tracker.active:
        return
    try:
        columns, rows = prototype_alignment(model, loader, device=device, autocast=autocast)
    except Exception as error:
        warnings.warn(f"could not measure the per-class prototype alignment ({type(error).__name__}: {error})", RuntimeWarning)
        return
    tracker.log_table(key, columns, rows)
