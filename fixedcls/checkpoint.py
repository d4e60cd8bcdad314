"""Checkpoints: atomic writes, safe loads, and finding the run to resume.

A checkpoint is a dict of tensors and plain Python containers only, so it loads with
``torch.load(weights_only=True)``: loading never runs code that a file carries.

Layout of a checkpoint directory::

    epoch_0007.pt   one per finished epoch, the newest `keep` kept
    last.pt         the newest state (a finished epoch, or a mid-epoch stop)
    best.pt         the finished epoch with the best `best_metric`
"""
from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch

from .errors import FixedclsError

LAST, BEST = "last.pt", "best.pt"
EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")


def atomic_save(state: dict, path: Path) -> None:
    """Write `state` to `path` so that `path` is either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Point `dst` at the bytes of `src` atomically (a hard link costs no space)."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)


def load(path: str | Path, map_location: Any = "cpu") -> dict:
    """Load a checkpoint with weights_only=True; every failure is a one-line FixedclsError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FixedclsError(f"checkpoint {path} does not exist: pass resume=<path to a .pt file> or resume=auto")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FixedclsError(
            f"checkpoint {path} holds pickled Python objects, not only tensors and plain containers; "
            f"refused to load it (weights_only=True, no code from it ran): {first}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FixedclsError(f"checkpoint {path} is truncated or corrupt ({first}): use an earlier checkpoint") from None
    if not isinstance(state, dict) or "model" not in state:
        raise FixedclsError(f"checkpoint {path} is not a fixedcls checkpoint (no 'model' entry)")
    return state


def epoch_files(directory: Path) -> list[Path]:
    """Per-epoch checkpoints, newest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := EPOCH_FILE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def candidates(directory: Path) -> list[Path]:
    """Files that may hold the newest good state, in the order to try them."""
    last = directory / LAST
    return ([last] if last.is_file() else []) + epoch_files(directory)


def load_newest_good(directory: Path, warn=print) -> tuple[Optional[Path], Optional[dict]]:
    """The newest checkpoint in `directory` that loads; corrupt ones are reported and skipped."""
    for path in candidates(directory):
        try:
            return path, load(path)
        except FixedclsError as error:
            warn(f"warning: skipping {error}")
    return None, None


def run_directories(root: Path, name: str) -> list[Path]:
    """`<root>/<name>` and its numbered siblings `<name>-2`, `<name>-3`, ... that exist."""
    pattern = re.compile(rf"^{re.escape(name)}(-\d+)?$")
    return [p for p in root.iterdir() if p.is_dir() and pattern.match(p.name)] if root.is_dir() else []


def resolve(root: str | Path, name: str, explicit_dir: Optional[str], resume: Optional[str], warn=print) -> tuple[Path, Optional[Path]]:
    """Decide where this run saves and what it resumes from: (checkpoint directory, checkpoint to load).

    - resume=<file>: load that file; save next to it.
    - resume=auto: the newest good checkpoint of this run name (or of checkpoint.dir); none -> a fresh run.
    - no resume: a fresh run never overwrites another run's checkpoints; a taken name gets a suffix -2, -3...
    """
    root = Path(root)
    if resume not in (None, "", "auto"):
        path = Path(resume).expanduser()
        if not path.is_file():
            raise FixedclsError(f"resume={resume}: no such checkpoint file (pass a .pt path, or resume=auto)")
        return (Path(explicit_dir) if explicit_dir else path.parent), path
    if explicit_dir:
        directory = Path(explicit_dir)
        if resume == "auto":
            return directory, _newest_loadable(directory, warn)
        if candidates(directory):
            raise FixedclsError(
                f"checkpoint.dir={directory} already holds checkpoints of another run: "
                f"pass resume=auto to continue it, or choose an empty checkpoint.dir"
            )
        return directory, None
    taken = [d for d in run_directories(root, name) if candidates(d)]
    if resume == "auto" and taken:
        newest = max(taken, key=lambda d: max(p.stat().st_mtime for p in candidates(d)))
        return newest, _newest_loadable(newest, warn)
    if not (root / name).exists() or not candidates(root / name):
        return root / name, None
    number = 2
    while (root / f"{name}-{number}").exists() and candidates(root / f"{name}-{number}"):
        number += 1
    return root / f"{name}-{number}", None


def _newest_loadable(directory: Path, warn) -> Optional[Path]:
    for path in candidates(directory):
        try:
            load(path)
            return path
        except FixedclsError as error:
            warn(f"warning: skipping {error}")
    return None


class CheckpointWriter:
    """Saves the states of a run: per-epoch files (keeping the newest `keep`), last.pt and best.pt."""

    def __init__(self, directory: Path, *, keep: int = 2, best_metric: str = "test/acc", enabled: bool = True):
        self.directory, self.keep, self.best_metric, self.enabled = Path(directory), keep, best_metric, enabled
        self.best_value: Optional[float] = None

    def save_epoch(self, state: dict, metrics: dict) -> Path:
        epoch_path = self.directory / f"epoch_{state['epoch']:04d}.pt"
        if not self.enabled:
            return epoch_path
        atomic_save(state, epoch_path)
        _link_or_copy(epoch_path, self.directory / LAST)
        value = metrics.get(self.best_metric)
        if value is not None and (self.best_value is None or self._better(value, self.best_value)):
            self.best_value = value
            _link_or_copy(epoch_path, self.directory / BEST)
        for old in epoch_files(self.directory)[max(self.keep, 1) :]:
            old.unlink(missing_ok=True)
        return epoch_path

    def _better(self, value: float, than: float) -> bool:
        return value < than if "loss" in self.best_metric else value > than

    def save_interrupted(self, state: dict) -> Path:
        """A mid-epoch state (after a stop signal); it becomes last.pt, the epoch files stay untouched."""
        path = self.directory / LAST
        if self.enabled:
            atomic_save(state, path)
        return path
