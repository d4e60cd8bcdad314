"""Where a run's numbers go: metrics.jsonl and summary.json in the run directory (atomic JSON writes).

The trackers (W&B, TensorBoard, CSV) are in fixedcls/trackers/; `Tracker` and `create_tracker` are
importable from here too.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable

METRICS_FILE, SUMMARY_FILE = "metrics.jsonl", "summary.json"



def jsonable(value: Any) -> Any:
    """`value` with NaN as None (JSON has no NaN), tensors and numpy scalars as numbers, tuples as lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else value  # json writes Infinity; NaN becomes null
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item"):  # a tensor or a numpy value
        try:
            return jsonable(value.item())
        except (ValueError, RuntimeError):  # more than one element
            return jsonable(value.tolist())
    return value


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` in one step: readers see the old file or the new one, never half of it.

    The temporary file is made by mkstemp in the same folder, so a planted link or another writer's
    temporary file is never followed or overwritten."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def file_mode() -> int:
    """The mode a new file of this process gets (0666 less the umask); mkstemp's own 0600 is for the temporary
    file only.  The umask is read from /proc where it can be, since setting it to read it back is not
    thread-safe (checkpoints are written in a background thread)."""
    try:
        with open("/proc/self/status") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def write_json(path: str | Path, value: Any) -> Path:
    """`value` as indented JSON (NaN as null), written atomically; the folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(jsonable(value), indent=2) + "\n")
    return path


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


# The trackers live in fixedcls/trackers/; these names stay importable from here. Imported last: the trackers
# use the file helpers above.
from .trackers import MultiTracker, Tracker, TrackerWarning, create_tracker  # noqa: E402
from .trackers.wandb_run import WANDB_MODES, WandbTracker, wandb_mode  # noqa: E402

__all__ = ["METRICS_FILE", "SUMMARY_FILE", "MetricsFile", "MultiTracker", "Tracker", "TrackerWarning", "WANDB_MODES",
           "WandbTracker", "create_tracker", "jsonable", "read_jsonl", "wandb_mode", "write_json", "write_summary",
           "write_text_atomic"]
