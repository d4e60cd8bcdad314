"""Compatibility results for people: the matrices as text and heatmaps, the criteria in one line, and
the same sent to a tracker.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..atomic import jsonable, write_json
from ..errors import FixedclsError


def _fmt(value: Optional[float], signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def format_matrix(M: Sequence[Sequence[Optional[float]]], title: str) -> str:
    """The lower triangle as a text table (rows: query model t, columns: gallery model i, in %)."""
    T = len(M)
    lines = [title, "query\\gallery " + "".join(f"{f'phi_{i + 1}':>9}" for i in range(T))]
    for t in range(T):
        cells = []
        for i in range(T):
            value = M[t][i] if i <= t else None
            cells.append(f"{'' if i > t else ('n/a' if value is None or math.isnan(value) else f'{100 * value:.1f}'):>9}")
        lines.append(f"{f'phi_{t + 1}':<14}" + "".join(cells))
    return "\n".join(lines)


# (matrix key, suffix of its criteria, title, short name); the verification matrix only with --metric verification
MATRICES = (("M", "", "top-1 NN accuracy (%)", "top-1"), ("M_map", "_map", "mAP (%)", "mAP"),
            ("M_verification", "_verification", "pair-verification accuracy (%)", "verification"))


def matrices_of(result: dict) -> list[tuple[str, str, str, str]]:
    return [entry for entry in MATRICES if entry[0] in result]


def format_criteria(result: dict, suffix: str = "") -> str:
    """One line: AC (strict, SPEC 4), AC_ties (a tie is compatible: the CoReS / CL2R code), AM, BC, FC, and with
    three models or more the per-task AC and AC_ties (of the first 2, 3, ... models)."""
    line = (f"AC {_fmt(result['AC' + suffix])}  AC_ties {_fmt(result['AC_ties' + suffix])}  AM {_fmt(result['AM' + suffix])}  "
            f"BC {_fmt(result['BC' + suffix], True)}  FC {_fmt(result['FC' + suffix], True)}")
    per_task = result.get("AC_per_task" + suffix)
    if per_task and len(per_task) > 1:
        line += (f"  |  per task (2..{len(per_task) + 1}): AC {' '.join(_fmt(v) for v in per_task)}, AC_ties "
                 f"{' '.join(_fmt(v) for v in result['AC_ties_per_task' + suffix])}")
    return line


def format_report(result: dict) -> str:
    parts = [f"compatibility of {len(result['M'])} models: query {result['query']} ({result['num_query']}), "
             f"gallery {result['gallery']} ({result['num_gallery']}), {result['data']}"]
    if "verification" in result:
        v = result["verification"]
        parts.append(f"verification: {v['pairs']} pairs ({v['same_class']} of one class), {v['folds']} folds, seed {v['seed']}")
    for key, suffix, title, _ in matrices_of(result):
        parts.append(format_matrix(result[key], title))
        parts.append(format_criteria(result, suffix))
    parts.append("AC: share of pairs t > i with M[t][i] > M[i][i] (strict); "
                 "AC_ties: share without M[t][i] < M[i][i] (a tie passes, as in the CoReS / CL2R code)")
    return "\n".join(parts)


def plot_matrix(result: dict, path: str | Path, title: Optional[str] = None) -> Path:
    """Heatmaps of M (top-1), M_map (and M_verification): the lower triangle, values in %, criteria in the titles."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    T = len(result["M"])
    panels = matrices_of(result)
    figure = Figure(figsize=(4.2 * len(panels) + 1, 3.6 + 0.25 * T))
    FigureCanvasAgg(figure)
    labels = [f"phi_{t + 1}" for t in range(T)]
    for column, (key, suffix, _, name) in enumerate(panels):
        ax = figure.add_subplot(1, len(panels), column + 1)
        values = np.array([[np.nan if i > t or result[key][t][i] is None else 100 * result[key][t][i]
                            for i in range(T)] for t in range(T)], dtype=float)
        image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0, vmax=100)
        for t in range(T):
            for i in range(t + 1):
                text = "n/a" if np.isnan(values[t, i]) else f"{values[t, i]:.1f}"
                ax.text(i, t, text, ha="center", va="center", fontsize=9,
                        color="white" if np.isnan(values[t, i]) or values[t, i] < 60 else "black")
        ax.set_xticks(range(T), labels)
        ax.set_yticks(range(T), labels)
        ax.set_xlabel("gallery model i")
        ax.set_ylabel("query model t")
        ax.set_title(f"{name}: AC {_fmt(result['AC' + suffix])}, AC_ties {_fmt(result['AC_ties' + suffix])}, "
                     f"AM {_fmt(result['AM' + suffix])}", fontsize=9)
        figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def log_to_tracker(result: dict, logger_cfg, run_dir: Path, png: Optional[Path], resolved_config: dict) -> None:
    """Send the matrices and criteria to the configured tracker (W&B) as a `compat` job; nothing for logger none."""
    if logger_cfg is None or logger_cfg.name == "none":
        return
    from omegaconf import OmegaConf

    from ..tracking.factory import create_tracker

    logger_cfg = OmegaConf.merge(logger_cfg, {"job_type": "compat"})
    config = {**resolved_config, "compat": {k: v for k, v in jsonable(result).items() if not k.startswith("M")}}
    try:
        tracker = create_tracker(logger_cfg, run_dir=Path(run_dir), resolved_config=config)
    except ImportError as error:
        raise FixedclsError(f"logger {logger_cfg.name} is not available here ({error}): use --logger none") from None
    T = len(result["M"])
    for key, *_ in matrices_of(result):
        rows = [[f"phi_{t + 1}"] + [result[key][t][i] if i <= t else None for i in range(T)] for t in range(T)]
        tracker.log_table(f"compat/{key}", ["query"] + [f"phi_{i + 1}" for i in range(T)], rows)
    tracker.log_summary({f"compat/{k}": v for k, v in jsonable(result).items()
                         if k[:2] in ("AC", "AM", "BC", "FC")})
    if png is not None:
        tracker.log_image("compat", png)
    tracker.finish(0)


def format_gallery_report(result: dict) -> str:
    """One line per query model: its top-1 and mAP against the stored gallery (the matrix entry M[t][g])."""
    source = result["gallery_model"].get("source", "?")
    lines = [f"queries: {result['query']} ({result['num_query']}), {result['data']}; stored gallery {result['gallery_file']}: "
             f"{result['gallery_source']} ({result['num_gallery']}), embedded by {source}",
             f"{'query model':<48}{'top-1 (%)':>10}{'mAP (%)':>10}"]
    for info, top1, mean_ap in zip(result["models"], result["top1"], result["map"]):
        cells = ["n/a" if v is None or math.isnan(v) else f"{100 * v:.1f}" for v in (top1, mean_ap)]
        lines.append(f"{info['checkpoint'][-48:]:<48}{cells[0]:>10}{cells[1]:>10}")
    return "\n".join(lines)


def report(result: dict, *, json_path: Optional[Path], png_path: Optional[Path], title: Optional[str] = None,
           echo: Callable[[str], None] = print) -> None:
    echo(format_report(result))
    if json_path is not None:
        echo(f"wrote {write_json(json_path, result)}")
    if png_path is not None:
        echo(f"wrote {plot_matrix(result, png_path, title)}")
