"""Where a run's numbers go: metrics.jsonl and summary.json in the run directory, and trackers.

Trackers (W&B) sit behind one small interface so the training loop never knows which is on,
and a tracker failure can only warn, never stop training.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

METRICS_FILE, SUMMARY_FILE = "metrics.jsonl", "summary.json"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else value  # json writes Infinity; NaN becomes null
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return value


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class MetricsFile:
    """metrics.jsonl: one JSON object per finished epoch, rewritten from the history on resume."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled

    def reset(self, history: Iterable[dict]) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _write_text_atomic(self.path, "".join(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n" for row in history))

    def append(self, row: dict) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")
        except OSError as error:  # a full disk must not end the run: the history lives in the checkpoint too
            warnings.warn(f"could not append to {self.path}: {error}; training continues")


def write_summary(run_dir: Path, summary: dict) -> Path:
    path = Path(run_dir) / SUMMARY_FILE
    try:
        _write_text_atomic(path, json.dumps({k: _jsonable(v) for k, v in summary.items()}, indent=2) + "\n")
    except OSError as error:
        warnings.warn(f"could not write {path}: {error}")
    return path


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


class Tracker:
    """No tracker: every call does nothing. Subclasses forward to a dashboard service."""

    run_id: Optional[str] = None

    def log_epoch(self, row: dict) -> None:
        pass

    def log_summary(self, summary: dict) -> None:
        pass

    def log_image(self, key: str, path: Path) -> None:
        pass

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def create_tracker(cfg, *, run_dir: Path, resolved_config: dict, run_id: Optional[str] = None, enabled: bool = True) -> Tracker:
    """The tracker named by the `logger` config section (conf/logger/)."""
    if not enabled or cfg.name == "none":
        return Tracker()
    if cfg.name == "wandb":
        from .wandb_tracker import WandbTracker

        return WandbTracker(cfg, run_dir=run_dir, resolved_config=resolved_config, run_id=run_id)
    from .errors import FixedclsError

    raise FixedclsError(f"unknown logger '{cfg.name}': choose none or wandb")
