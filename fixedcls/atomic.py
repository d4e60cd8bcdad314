"""Files a run writes and readers must never see half-written: atomic text and JSON writes, the mode a new
file gets, and values made JSON-safe.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


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


@contextlib.contextmanager
def errors_name(path: str | Path):
    """A block whose OSError names `path`, the file or folder the user asked for, rather than the temporary
    file written on its way there (`.summary.json.x7obmav2.tmp` means nothing to the user)."""
    try:
        yield
    except OSError as error:
        if error.errno is None or error.filename == os.fspath(path):
            raise
        raise OSError(error.errno, error.strerror, os.fspath(path)) from error


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` in one step: readers see the old file or the new one, never half of it.

    The temporary file is made by mkstemp in the same folder, so a planted link or another writer's
    temporary file is never followed or overwritten."""
    path = Path(path)
    with errors_name(path):
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
