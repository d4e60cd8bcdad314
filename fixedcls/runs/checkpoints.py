"""Checkpoints: atomic writes, safe loads, and finding the run to resume.

A checkpoint is a dict of tensors and plain Python containers only, so it loads with
``torch.load(weights_only=True)``: loading never runs code that a file carries.

Layout of a checkpoint directory::

    epoch_0007.pt   one per written epoch (every `every`-th and the last), the newest `keep` kept
    last.pt         the newest state (a written epoch, or a mid-epoch stop)
    best.pt         the written epoch with the best `best_metric`
    run.json        the folder's claim: run identity, name, host, pid, branched_from

One run, one folder: a new run claims `<root>/<safe name>-<identity[:8]>` (or `-2`, `-3`, ... when taken)
with an atomic `os.mkdir`, so two jobs started at once never share one; `resume=auto` finds the folder of
the same identity again (a SLURM requeue), and never one a later branch abandoned.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import pickle
import re
import socket
import tempfile
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..atomic import file_mode
from ..errors import FixedclsError

log = logging.getLogger("fixedcls")
LAST, BEST, RUN_FILE = "last.pt", "best.pt", "run.json"
EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")
# A write in progress is `.<target>.<host>.<pid>.<random>.fixedcls.tmp` (see `remove_partial_writes`).
TEMP_SUFFIX = ".fixedcls.tmp"
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
PARTIAL = re.compile(r"^\.(?P<target>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.fixedcls\.tmp$")
STALE_SECONDS = 600  # a temporary file unchanged this long belongs to a dead or stuck write, wherever it ran


def atomic_save(state: dict, path: Path) -> None:
    """Write `state` to `path` so that `path` is either the old file or the complete new one.

    The new file gets the mode any file of this process gets (0666 less the umask), as `torch.save(path)`
    would give it; a failed write (torch reports a full disk as RuntimeError) is an OSError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{writer_tag()}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                torch.save(state, f)
            except RuntimeError as error:  # torch's writer turns ENOSPC/EIO into RuntimeError
                raise _write_error(error, path) from error
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def writer_tag() -> str:
    return f"{_HOST}.{os.getpid()}"  # read at each write: a forked process is another writer


# What torch's zip writer says when a write came up short; on a full disk it says nothing more (measured on a
# 1 MiB tmpfs: "unexpected pos 768 vs 662"), so the disk itself is asked (`_out_of_space`).
TORCH_SHORT_WRITE = ("unexpected pos", "file write failed", "PytorchStreamWriter failed writing")
OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)
NEARLY_FULL_BYTES = 2**20  # free space left when a write failed for want of it: the partial file took the rest


def _write_error(error: RuntimeError, path: Path) -> OSError:
    """The OSError a RuntimeError of torch.save stands for: ENOSPC when the disk is full, else EIO."""
    text = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", " ".join(str(error).split()))
    if "No space left" in text or "quota exceeded" in text.lower() or (
            any(words in text for words in TORCH_SHORT_WRITE) and _out_of_space(path.parent)):
        return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (torch.save: {text[:200]})", str(path))
    return OSError(errno.EIO, f"{os.strerror(errno.EIO)} (torch.save: {text[:200]})", str(path))


def _out_of_space(directory: Path) -> bool:
    """Whether `directory`'s file system is (nearly) full; asked while the failed write's partial file still
    takes its space."""
    import shutil

    try:
        return shutil.disk_usage(directory).free < NEARLY_FULL_BYTES
    except OSError:
        return False


def disk_full(error: BaseException) -> bool:
    """Whether a failed write failed for want of space (a full disk, or a quota)."""
    return isinstance(error, OSError) and error.errno in OUT_OF_SPACE


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


def link_or_copy(src: Path, dst: Path) -> None:
    """Point `dst` at the bytes of `src` atomically (a hard link costs no space)."""
    tmp = dst.with_name(f".{dst.name}.{writer_tag()}.link{TEMP_SUFFIX}")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            import shutil

            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dst.parent)


def _first_line(error: BaseException) -> str:
    """The first sentence of an error, on one line (torch's messages run to a paragraph)."""
    text = " ".join(str(error).split())
    text = text.split(". ")[0].rstrip(".")[:200]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _refused_global(message: str) -> str:
    """What a weights_only refusal names ("Unsupported global: GLOBAL io.open was not ..." -> "io.open")."""
    found = re.search(r"GLOBAL ([\w.]+)", message) or re.search(r"WeightsUnpickler error:\s*([^\n.]+)", message)
    return found.group(1).strip() if found else "an object torch does not allow"


def _state_key(path: Path) -> tuple:
    stat = path.stat()
    return (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)


# The state `resolve` verified, kept for the `load` of the same unchanged file that follows (one entry),
# so resuming reads and checks a large checkpoint once, not twice.
_verified: dict[tuple, dict] = {}


def load(path: str | Path, map_location: Any = "cpu") -> dict:
    """Load a checkpoint safely; every failure is a one-line FixedclsError naming the file.

    * Only ``torch.load(weights_only=True)``: tensors and plain containers. A file that carries any other
      pickled object is refused before anything in it is built, so no code from it runs.
    * The CRC32 of every record of the zip archive is checked first, so a truncated file, or one whose
      tensor bytes were damaged on disk or in transfer, is reported instead of loaded with wrong numbers.
    * Before that, a file with compressed records or records larger than itself is refused
      (`_refuse_inflation`): checking or loading it would inflate it first.
    """
    path = Path(path)
    if not path.is_file():
        raise FixedclsError(f"checkpoint {path} does not exist: pass resume=<path to a .pt file> or resume=auto")
    key = _state_key(path)
    if key in _verified and map_location == "cpu":
        return _verified.pop(key)

    def corrupt(reason: str) -> FixedclsError:
        return FixedclsError(f"checkpoint {path} is truncated or corrupt ({reason}): use an earlier checkpoint "
                             f"(epoch_NNNN.pt in the same folder) or resume=auto, which skips it")

    if path.stat().st_size == 0:
        raise corrupt("the file is empty")
    is_zip, damaged = True, None
    try:
        with zipfile.ZipFile(path) as archive:
            _refuse_inflation(archive, path)
            damaged = archive.testzip()
    except FixedclsError:
        raise
    except zipfile.BadZipFile:
        is_zip = False  # truncated (no central directory), garbage, or a legacy checkpoint: torch.load tells
    except (OSError, ValueError, EOFError, RuntimeError) as error:
        raise corrupt(_first_line(error)) from None
    if damaged is not None:
        raise corrupt(f"checksum mismatch in record {damaged}")
    if not is_zip:
        with open(path, "rb") as f:
            head = f.read(4)
        if head == b"PK\x03\x04":
            raise corrupt("truncated: the zip archive ends early")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        message = str(error)
        if re.search(r"GLOBAL|Unsupported global", message):  # a class or function to import: refused
            raise FixedclsError(
                f"checkpoint {path} carries a pickled Python object ({_refused_global(message)}), not only tensors "
                f"and plain containers: refused to load it (torch.load weights_only=True; nothing in it was run). "
                f"fixedcls checkpoints never hold such objects: only load files written by fixedcls-train"
            ) from None
        raise corrupt(_first_line(error) if is_zip else "not a file written by torch.save") from None
    except MemoryError:
        raise
    except Exception as error:  # torch raises RuntimeError, EOFError, KeyError, OSError, ... for broken files
        raise corrupt(_first_line(error) if is_zip else "not a file written by torch.save") from None
    if not isinstance(state, dict) or "model" not in state:
        raise FixedclsError(f"checkpoint {path} is not a fixedcls checkpoint (no 'model' entry)")
    return state


def _refuse_inflation(archive: zipfile.ZipFile, path: Path) -> None:
    """torch.save stores its records uncompressed, so a compressed record, or records larger than the file,
    come from somewhere else: refused before anything is inflated (a 262 KB file could inflate to 256 MiB)."""
    records = archive.infolist()
    compressed = [r.filename for r in records if r.compress_type != zipfile.ZIP_STORED]
    if compressed:
        raise FixedclsError(f"checkpoint {path} holds compressed records (e.g. {compressed[0]}), which torch.save never "
                            f"writes: refused to inflate it; only load files written by fixedcls-train")
    claimed, size = sum(r.file_size for r in records), path.stat().st_size
    if claimed > size:
        raise FixedclsError(f"checkpoint {path} claims {claimed} bytes of records in a file of {size}: refused to "
                            f"read it; only load files written by fixedcls-train")


def progress_of(state: dict) -> tuple[int, int]:
    """How far a checkpoint got: (finished epochs, steps into the next one); (-1, -1) for counts that are
    not whole numbers, so a malformed file never wins (`check_resumable` names what is wrong with it)."""
    epoch, step = state.get("epoch", 0), state.get("step_in_epoch", 0)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (epoch, step)):
        return -1, -1
    return epoch, step


def meta_of(state: dict) -> dict:
    """A checkpoint's `meta` entry (head, num_classes, dim, ...), or {} when it has none or a malformed one."""
    meta = state.get("meta")
    return meta if isinstance(meta, dict) else {}


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_rng(value: Any) -> bool:
    return isinstance(value, dict) and torch.is_tensor(value.get("torch")) and isinstance(value.get("python"), (list, tuple)) \
        and isinstance(value.get("numpy"), (list, tuple)) and len(value["numpy"]) == 5


# What a resumable checkpoint holds: entry -> (what it must be, its test, required). An optional entry may be None.
_RESUMABLE: dict[str, tuple[str, Callable[[Any], bool], bool]] = {
    "model": ("a dict of tensors", lambda v: isinstance(v, dict) and all(torch.is_tensor(t) for t in v.values()), True),
    "optimizer": ("an optimizer state dict (state, param_groups)",
                  lambda v: isinstance(v, dict) and isinstance(v.get("state"), dict)
                  and isinstance(v.get("param_groups"), list)
                  and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in v["param_groups"]), True),
    "epoch": ("a whole number >= 0", _is_count, True),
    "step_in_epoch": ("a whole number >= 0", _is_count, True),
    "global_step": ("a whole number >= 0", _is_count, True),
    "history": ("a list of dicts", lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v), True),
    "running": ("a tensor of 3 numbers", lambda v: torch.is_tensor(v) and v.numel() == 3, True),
    "rng": ("a random-state dict (torch, python, numpy)", _is_rng, True),
    "meta": ("a dict", lambda v: isinstance(v, dict), False),
    "config": ("a dict", lambda v: isinstance(v, dict), False),
    "scheduler": ("a dict", lambda v: isinstance(v, dict), False),
    "scaler": ("a dict", lambda v: isinstance(v, dict), False),
    "ema": ("a dict", lambda v: isinstance(v, dict), False),
    "online_train": ("a dict", lambda v: isinstance(v, dict), False),
    "online_test": ("a dict", lambda v: isinstance(v, dict), False),
    "rng_ranks": ("a list of random-state dicts", lambda v: isinstance(v, list) and all(_is_rng(r) for r in v), False),
    "nonfinite_in_a_row": ("a whole number >= 0", _is_count, False),
    "best_value": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), False),
    "best_epoch": ("a whole number >= 0", _is_count, False),
}


def check_resumable(state: dict, path: Path) -> None:
    """Refuse, in one line, a checkpoint that cannot continue a run: a .pt that torch.save wrote with other
    entries (a model-only file, another program's), or one whose entries have the wrong type."""
    for key, (kind, valid, required) in _RESUMABLE.items():
        if key not in state or state[key] is None:
            if required:
                raise FixedclsError(
                    f"checkpoint {path} cannot be resumed: it has no '{key}' entry (it holds "
                    f"{', '.join(map(str, list(state)[:6]))}), so it was not written by fixedcls-train: resume from a "
                    f"last.pt or epoch_NNNN.pt, or start a new run from its weights with model.init_from={path}")
            continue
        if not valid(state[key]):
            raise FixedclsError(f"checkpoint {path} cannot be resumed: its '{key}' entry is "
                                f"{type(state[key]).__name__}, not {kind}: resume from another checkpoint "
                                f"(epoch_NNNN.pt in the same folder), or start a new run without resume")


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
    """The checkpoint in `directory` that got furthest and loads; broken ones are reported and skipped.

    last.pt is the newest state unless a run was killed between writing epoch_NNNN.pt and pointing
    last.pt at it: then the epoch file is newer, and it wins.
    """
    directory = Path(directory)
    best: Optional[tuple[Path, dict]] = None
    last = directory / LAST
    if last.is_file():
        try:
            best = (last, load(last))
        except FixedclsError as error:
            warn(f"warning: skipping {error}")
    for path in epoch_files(directory):  # newest first
        number = int(EPOCH_FILE.match(path.name).group(1))
        if best is not None and (number, 0) <= progress_of(best[1]):
            break  # nothing older can be newer than what we have
        try:
            state = load(path)
        except FixedclsError as error:
            warn(f"warning: skipping {error}")
            continue
        if best is None or progress_of(state) > progress_of(best[1]):
            best = (path, state)
        break
    return best if best is not None else (None, None)


def checkpoint_file(path: str | Path, warn=print) -> Path:
    """The one rule for "which file" (resume, fixedcls-compat, the collapse command): a file is itself; a
    folder means its newest good checkpoint."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = newest_loadable(path, warn)
        if found is None:
            raise FixedclsError(f"checkpoint folder {path} holds no loadable checkpoint (last.pt, epoch_NNNN.pt): "
                                f"pass a checkpoint file or a run's checkpoint folder")
        return found
    if not path.is_file():
        raise FixedclsError(f"checkpoint {path} does not exist: pass a .pt file written by fixedcls-train, or its folder")
    return path


def keep_verified(path: Path, state: dict) -> None:
    """Keep the state just loaded and checked from `path` for the `load` of the same unchanged file that follows."""
    _verified.clear()
    _verified[_state_key(path)] = state


def newest_loadable(directory: Path, warn) -> Optional[Path]:
    path, state = load_newest_good(directory, warn)
    _verified.clear()
    if path is not None:
        _verified[_state_key(path)] = state  # the load that follows gets it without reading the file again
    return path


class CheckpointWriter:
    """Saves the states of a run: per-epoch files (keeping the newest `keep`), last.pt and best.pt.

    A write that fails (full disk, lost mount) warns in one line (saying when the disk is full, and where)
    and returns None: the previous checkpoints stay as they were (every write is atomic), and the run goes on,
    so that a moment of full disk does not end a long run.  But it is a failure: `failure()` names it, and the
    run ends with exit status 1 (CheckpointWriteError); after two failed writes in a row `stop_reason` is set
    and the run stops at the end of that epoch.  After a failed write the next epoch is written in the
    foreground, so a second failure is known at the end of its own epoch.

    ``background=True`` writes epoch checkpoints in a thread while the next epoch trains: the caller
    pays only for a copy of the state into staging tensors the writer keeps from one epoch to the next
    (~10 ms for ResNet-18 and its momentum; fresh 90 MB tensors took 21-54 ms on a busy VM, which faults
    every new page in), against
    ~0.1-0.2 s for the durable write with fsync.  Writes stay one at a time and in order; the next
    save, a mid-epoch save and :meth:`wait` wait for the one in flight.  A process killed during a
    background write loses that write only: the previous checkpoints are intact, as with a killed
    foreground write.  A foreground writer writes the live state as it is, with no copy.

    ``every``: epoch checkpoints are written after every `every`-th finished epoch and after the last
    (:meth:`writes_epoch`, which the loop asks before it even builds the state); a stop signal's
    mid-epoch state is always written.  The writer owns ``best_value``: each file records the best
    `best_metric` among the checkpoints actually written, itself included, so a resumed run compares
    against the right best, and best.pt is the best of the written epochs; ``best_epoch`` is the epoch best.pt
    holds (None until one is written, or for a resumed checkpoint written before it was recorded).
    """

    FAILURES_TO_STOP = 2  # failed writes in a row that stop the run

    def __init__(self, directory: Path, *, keep: int = 2, best_metric: str = "test/acc", best_mode: str = "auto",
                 enabled: bool = True, background: bool = False, every: int = 1):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise FixedclsError(f"checkpoint.every={every}: use a whole number >= 1 (1 writes every epoch)")
        self.directory, self.keep, self.best_metric, self.enabled = Path(directory), keep, best_metric, enabled
        self.best_mode = metric_direction(best_metric, best_mode)
        self.best_value: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.every = every
        self.failed_epochs: set[int] = set()  # epochs whose checkpoint could not be written
        self.failures_in_a_row = 0
        self.stop_reason: Optional[str] = None  # set after FAILURES_TO_STOP failed writes in a row
        self._failure: Optional[str] = None  # the latest failed write, for the run's last line
        self._executor = None
        self._pending = None
        self._staging = None  # the background copy of the previous epoch, whose tensors the next copy reuses
        if enabled:
            remove_partial_writes(self.directory)
            if background:
                from concurrent.futures import ThreadPoolExecutor

                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fixedcls-checkpoint")

    def writes_epoch(self, finished: int, epochs: int) -> bool:
        """Whether the epoch checkpoint after `finished` epochs (of `epochs`) is written: every `every`-th and
        the last.  The same answer on every rank (under DDP the state is gathered from all of them)."""
        return finished % self.every == 0 or finished >= epochs

    def save_epoch(self, state: dict, metrics: dict) -> Optional[Path]:
        """Write a finished epoch's state (in the background when so built); returns the epoch file's path."""
        epoch_path = self.directory / f"epoch_{state['epoch']:04d}.pt"
        if not self.enabled:
            return epoch_path
        self.wait()  # the staging tensors are free once the previous write is on disk
        if self.stop_reason is not None:  # the run stops at the end of this epoch: no write into a full disk
            return None
        if self._executor is None or self.failures_in_a_row:
            return self._write_epoch(state, metrics.get(self.best_metric), epoch_path)
        self._staging = snapshot(state, reuse=self._staging)  # the live weights change under the next epoch's steps
        self._pending = self._executor.submit(self._write_epoch, self._staging, metrics.get(self.best_metric), epoch_path)
        return epoch_path

    def _write_epoch(self, state: dict, value: Optional[float], epoch_path: Path) -> Optional[Path]:
        is_best = self._better(value, self.best_value)
        state["best_value"] = value if is_best else self.best_value
        state["best_epoch"] = state["epoch"] if is_best else self.best_epoch
        try:
            atomic_save(state, epoch_path)
            link_or_copy(epoch_path, self.directory / LAST)
            if is_best:
                link_or_copy(epoch_path, self.directory / BEST)
                self.best_value, self.best_epoch = value, state["epoch"]
            for old in epoch_files(self.directory)[max(self.keep, 1) :]:
                old.unlink(missing_ok=True)
        except OSError as error:
            self._failed(epoch_path, error, state["epoch"])
            return None
        self.failures_in_a_row = 0
        return epoch_path

    def _failed(self, path: Path, error: OSError, epoch: int) -> None:
        """Warn in one line that `path` (the checkpoint of `epoch`) was not written, and count the failure."""
        self.failed_epochs.add(int(epoch))
        self.failures_in_a_row += 1
        full = disk_full(error)
        self._failure = (f"{'the disk is full: ' if full else ''}could not write checkpoint {path.name} to "
                         f"{self.directory} ({error.strerror or error})")
        kept = ("last.pt and best.pt there still hold the last good checkpoints" if (self.directory / LAST).is_file()
                else "no checkpoint of this run was written yet")
        if self.failures_in_a_row >= self.FAILURES_TO_STOP:
            self.stop_reason = (f"{self._failure}, {self.failures_in_a_row} writes in a row: stopped; {kept}. "
                                f"{'Free space there' if full else 'Make the folder writable'}, then continue "
                                f"with resume=auto")
            _warn(self.stop_reason)
            return
        _warn(f"{self._failure}; {kept}. Training goes on, but the run will end with exit status 1 (a second "
              f"failed write in a row stops it at once)")

    def failure(self) -> Optional[str]:
        """One line for the end of a run some of whose checkpoints were not written, or None when all were."""
        if self.stop_reason is not None:
            return self.stop_reason
        if not self.failed_epochs:
            return None
        epochs = ", ".join(str(e) for e in sorted(self.failed_epochs))
        best = f"best.pt holds epoch {self.best_epoch}" if self.best_epoch is not None else "no best.pt was written"
        return f"{self._failure}; epoch(s) {epochs} have no checkpoint ({best}, as summary.json says)"

    def wait(self) -> None:
        """Return once the write in flight (if any) is on disk; an unexpected error in it is raised here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    @contextlib.contextmanager
    def finish_writes(self):
        """A block at whose end, normal or not, the write in flight is on disk."""
        try:
            yield self
        finally:
            self.wait()

    def close(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._staging = None

    def _better(self, value: Optional[float], than: Optional[float]) -> bool:
        return is_better(value, than, self.best_mode)

    def save_interrupted(self, state: dict) -> Optional[Path]:
        """A mid-epoch state (after a stop signal); it becomes last.pt, the epoch files stay untouched."""
        path = self.directory / LAST
        if self.enabled:
            self.wait()  # the finished epoch's file first: last.pt must end as this newer state
            state["best_value"] = self.best_value
            state["best_epoch"] = self.best_epoch
            try:
                atomic_save(state, path)
            except OSError as error:
                full = "the disk is full: " if disk_full(error) else ""
                _warn(f"{full}could not write checkpoint {path} ({error.strerror or error}); resume=auto will "
                      f"continue from the last epoch checkpoint in {self.directory}")
                return None
        return path


def snapshot(obj: Any, reuse: Any = None) -> Any:
    """A copy of a state whose tensors share no memory with the live ones (and sit on the CPU).

    `reuse`: an earlier snapshot of a state of the same layout, no longer needed; a tensor of it at the same
    place with the same shape, dtype and strides receives the new values in place instead of a new
    allocation (the values are the same either way)."""
    if torch.is_tensor(obj):
        if (torch.is_tensor(reuse) and reuse.device.type == "cpu" and reuse.dtype == obj.dtype
                and reuse.shape == obj.shape and reuse.stride() == obj.stride()):
            return reuse.copy_(obj.detach())
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        earlier = reuse if isinstance(reuse, dict) else {}
        copy = type(obj)((key, snapshot(value, earlier.get(key))) for key, value in obj.items())
        if hasattr(obj, "_metadata"):  # state_dict version info, read by load_state_dict
            copy._metadata = obj._metadata
        return copy
    if isinstance(obj, (list, tuple)):
        earlier = reuse if isinstance(reuse, (list, tuple)) and len(reuse) == len(obj) else [None] * len(obj)
        return type(obj)(snapshot(value, old) for value, old in zip(obj, earlier))
    return obj


def remove_partial_writes(directory: Path) -> None:
    """Delete the temporary files of checkpoint writes that were never finished, and nothing else.

    Only names this module writes (`.<target>.<host>.<pid>.<random>.fixedcls.tmp`) are touched, and only
    stale ones: written on this machine by a process that is no longer running, or unchanged for
    `STALE_SECONDS` (a writer on another node of a shared file system, whose pid means nothing here).
    So a user's own `.something.tmp` and another live run's write in flight are left alone."""
    if not Path(directory).is_dir():
        return
    now = time.time()
    for path in Path(directory).iterdir():
        found = PARTIAL.match(path.name)
        if found is None or path.is_symlink() or not path.is_file():
            continue
        with contextlib.suppress(OSError):
            dead_here = found.group("host") == _HOST and not _process_alive(int(found.group("pid")))
            if dead_here or now - path.stat().st_mtime > STALE_SECONDS:
                path.unlink()


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


#: checkpoint.best_mode=auto: these measures shrink towards collapse or a better model; accuracies and the
#: cosines (proto_cos, sample_cos) grow. The measure is the last part of the key (collapse_test/nc1 -> nc1).
SHRINKING = ("loss", "nc1", "nc1_trace", "cdnv", "nc2_equinorm", "nc2_equinorm_w", "nc2_equiangle", "nc2_maxangle",
             "nc2_etf_error", "nc3", "nc4")
GROWING = ("acc", "proto_cos", "sample_cos")
BEST_MODES = ("auto", "max", "min")


def is_better(value: Optional[float], than: Optional[float], mode: str) -> bool:
    """Whether `value` displaces the best `than` ("max" or "min"): a missing or non-finite value never does (a
    NaN would otherwise freeze the best, as every comparison with it is false), anything finite beats none, a
    tie keeps the earlier epoch."""
    if value is None or not math.isfinite(value):
        return False
    if than is None or not math.isfinite(than):
        return True
    return value < than if mode == "min" else value > than


def metric_direction(metric: str, mode: str = "auto") -> str:
    """"max" or "min": whether a larger or a smaller `metric` is better (checkpoint.best_mode)."""
    mode = str(getattr(mode, "value", mode))
    if mode not in BEST_MODES:
        raise FixedclsError(f"checkpoint.best_mode={mode}: choose one of {', '.join(BEST_MODES)}")
    if mode != "auto":
        return mode
    measure = metric.rsplit("/", 1)[-1]
    if measure.startswith("loss") or measure in SHRINKING:
        return "min"
    if measure.startswith("acc") or measure in GROWING:
        return "max"
    raise FixedclsError(f"checkpoint.best_metric={metric}: best_mode=auto cannot tell whether it should grow or shrink: "
                        f"set checkpoint.best_mode=max or checkpoint.best_mode=min")


def _warn(message: str) -> None:
    log.warning(f"warning: {message}")
