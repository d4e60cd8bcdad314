"""What a finished run made, in the last lines of `fixedcls-train`: best.pt and last.pt (only files that exist),
the epoch best.pt holds with its validation and test accuracy, the final test accuracy, NC1 from its first
measurement to its last, summary.json, and the command that evaluates the model, ready to paste."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

from ..escaping import shell_path
from ..runs.checkpoints import BEST, LAST
from ..tracking.run_files import SUMMARY_FILE


def _pct(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{100 * value:.2f}%"


def _nc1_span(history: Sequence[dict], key: str) -> Optional[str]:
    measured = [row for row in history if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])]
    if not measured:
        return None
    first, last = measured[0], measured[-1]
    return f"{first[key]:.3g} (epoch {first['epoch']}) -> {last[key]:.3g} (epoch {last['epoch']})"


def outcome_lines(summary: dict, history: Sequence[dict]) -> list[str]:
    """The closing lines of a run from its summary (summary.json's keys) and its metrics rows."""
    directory, run_dir = Path(summary["checkpoint_dir"]), Path(summary["run_dir"])
    best, last, metric = directory / BEST, directory / LAST, summary.get("best/metric", "test/acc")
    has_best, has_last = best.is_file(), last.is_file()  # looked at once, so the lines cannot disagree
    epochs = summary.get("epochs", len(history))
    lines = [f"finished after {epochs} epoch{'' if epochs == 1 else 's'}: final test acc {_pct(summary.get('final/test/acc'))}"]
    if has_best and "best/epoch" in summary:
        chosen = f"chosen by {metric}"
        if metric.startswith("test/"):
            chosen += ": " + ("" if "best/val/acc" in summary else "no validation split, so ") + "best.pt follows the test split"
        scores = ", ".join(f"{split} acc {_pct(summary[f'best/{split}/acc'])}"
                           for split in ("val", "test") if f"best/{split}/acc" in summary)
        lines.append(f"best.pt  {shell_path(best)}: epoch {summary['best/epoch']} of {epochs}, {chosen} ({scores})")
    else:
        lines.append(f"no best.pt in {shell_path(directory)}: no written epoch had a {metric} to compare (see above)")
    if has_last:
        lines.append(f"last.pt  {shell_path(last)}")
    for key, split in (("collapse/nc1", "train"), ("collapse_test/nc1", "test")):
        span = _nc1_span(history, key)
        if span is not None:
            lines.append(f"NC1 ({split})  {span}")
    if (run_dir / SUMMARY_FILE).is_file():
        lines.append(f"summary  {shell_path(run_dir / SUMMARY_FILE)}")
    model = best if has_best else last if has_last else None
    if model is not None:
        lines.append(f"evaluate the model:  fixedcls-eval {shell_path(model)}")
    return lines
