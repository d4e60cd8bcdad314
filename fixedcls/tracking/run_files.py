"""Where a run's numbers go in its run directory: metrics.jsonl (one row per epoch) and summary.json.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Iterable

from ..atomic import jsonable, write_text_atomic

METRICS_FILE, SUMMARY_FILE = "metrics.jsonl", "summary.json"


class MetricsFile:
    """metrics.jsonl: one JSON object per finished epoch, rewritten from the history on resume."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled

    def reset(self, history: Iterable[dict]) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, "".join(json.dumps({k: jsonable(v) for k, v in row.items()}) + "\n" for row in history))

    def append(self, row: dict) -> None:
        if not self.enabled:
            return
        # O_NOFOLLOW: a symbolic link planted as metrics.jsonl would send the rows into the file it names.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(self.path, flags, 0o666)
            with os.fdopen(fd, "a") as f:
                f.write(json.dumps({k: jsonable(v) for k, v in row.items()}) + "\n")
        except OSError as error:  # a full disk must not end the run: the history lives in the checkpoint too
            reason = "it is a symbolic link, not followed" if self.path.is_symlink() else error
            warnings.warn(f"could not append to {self.path}: {reason}; training continues")


def write_summary(run_dir: Path, summary: dict) -> Path:
    path = Path(run_dir) / SUMMARY_FILE
    try:
        write_text_atomic(path, json.dumps({k: jsonable(v) for k, v in summary.items()}, indent=2) + "\n")
    except OSError as error:
        warnings.warn(f"could not write {path}: {error}")
    return path


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows
