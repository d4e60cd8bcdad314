"""Checkpoints: atomic writes, safe loads, and finding the run to resume.

A checkpoint is a dict of tensors and plain Python containers only, so it loads with
``torch.load(weights_only=True)``: loading never runs code that a file carries.

Layout of a checkpoint directory::

    epoch_0007.pt   one per finished epoch, the newest `keep` kept
    last.pt         the newest state (a finished epoch, or a mid-epoch stop)
    best.pt         the finished epoch with the best `best_metric`
    run.json        the folder's claim: run identity, name, host, pid, branched_from

One run, one folder: a new run claims `<root>/<safe name>-<identity[:8]>` (or `-2`, `-3`, ... when taken)
with an atomic `os.mkdir`, so two jobs started at once never share one; `resume=auto` finds the folder of
the same identity again (a SLURM requeue), and never one a later branch abandoned.
"""
from __future__ import annotations

import contextlib
import json
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .errors import FixedclsError
from .identity import safe_name

log = logging.getLogger("fixedcls")
LAST, BEST, RUN_FILE = "last.pt", "best.pt", "run.json"
EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")
# Temporary files carry host and pid, so a starting run deletes only those of writers that are dead.
_HOST = re.sub(r"[^A-Za-z0-9-]", "_", socket.gethostname()) or "host"


def _writer_tag() -> str:
    return f"{_HOST}-{os.getpid()}"


def atomic_save(state: dict, path: Path) -> None:
    """Write `state` to `path` so that `path` is either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_writer_tag()}.", suffix=".tmp", dir=path.parent)
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
    tmp = dst.with_name(f".{dst.name}.{_writer_tag()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
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
            damaged = archive.testzip()
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


def _progress(state: dict) -> tuple[int, int]:
    """How far a checkpoint got: (finished epochs, steps into the next one)."""
    return int(state.get("epoch", 0)), int(state.get("step_in_epoch", 0))


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
        if best is not None and (number, 0) <= _progress(best[1]):
            break  # nothing older can be newer than what we have
        try:
            state = load(path)
        except FixedclsError as error:
            warn(f"warning: skipping {error}")
            continue
        if best is None or _progress(state) > _progress(best[1]):
            best = (path, state)
        break
    return best if best is not None else (None, None)


def run_directories(root: Path, name: str) -> list[Path]:
    """`<root>/<name>` and its numbered siblings `<name>-2`, `<name>-3`, ... that exist."""
    name = safe_name(name)
    pattern = re.compile(rf"^{re.escape(name)}(-\d+)?$")
    return [p for p in root.iterdir() if p.is_dir() and pattern.match(p.name)] if root.is_dir() else []


def run_directory(root: str | Path, name: str, *, resume: bool, holds_run: Callable[[Path], bool] = None) -> Path:
    """The folder of run `name` under `root`: with `resume`, the newest folder of that name that holds a run;
    otherwise the first of `<name>`, `<name>-2`, `<name>-3`, ... that holds none, so a new run never writes
    over another.  `holds_run(folder)` says whether a folder holds a run (default: it has checkpoints)."""
    root, holds_run, name = Path(root), holds_run or (lambda d: bool(candidates(d))), safe_name(name)
    taken = [d for d in run_directories(root, name) if holds_run(d)]
    if resume and taken:
        return max(taken, key=_newest_mtime)
    number, directory = 2, root / name
    while directory.exists() and holds_run(directory):
        directory, number = root / f"{name}-{number}", number + 1
    return directory


def _newest_mtime(directory: Path) -> float:
    return max((p.stat().st_mtime for p in directory.rglob("*.pt") if p.is_file()), default=0.0)


def checkpoint_file(path: str | Path, warn=print) -> Path:
    """The one rule for "which file" (resume, fixedcls-compat, the collapse command): a file is itself; a
    folder means its newest good checkpoint."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = _newest_loadable(path, warn)
        if found is None:
            raise FixedclsError(f"checkpoint folder {path} holds no loadable checkpoint (last.pt, epoch_NNNN.pt): "
                                f"pass a checkpoint file or a run's checkpoint folder")
        return found
    if not path.is_file():
        raise FixedclsError(f"checkpoint {path} does not exist: pass a .pt file written by fixedcls-train, or its folder")
    return path


@dataclass
class RunPlan:
    """Where a run saves and what it resumes: `directory` None means "claim a new folder" (`claim`), done
    only after the resumed checkpoint passed its checks, so a refused resume leaves no empty folder."""

    directory: Optional[Path]
    resume_path: Optional[Path]
    parent: Path  # where a new folder is claimed
    base: str  # its name: <safe run name>-<identity[:8]>
    branch_of: Optional[Path] = None  # resume_path is older than its folder's newest state: a new branch

    def claim(self, record: dict) -> Path:
        if self.directory is None:
            self.directory = claim_directory(self.parent, self.base, record)
        else:  # a fresh run in checkpoint.dir records itself; a continued run keeps the record it has
            write_run_record(self.directory, record, replace=self.resume_path is None)
        return self.directory


def run_base(name: str, identity: str) -> str:
    """The folder name of a run before any -2, -3 suffix: `<safe name>-<identity[:8]>`."""
    return f"{safe_name(name)}-{identity[:8]}"


def claim_directory(parent: Path, base: str, record: dict) -> Path:
    """Create the first free folder of `<base>`, `<base>-2`, ... under `parent` and write its run.json.
    `os.mkdir` either creates a folder or fails, so of two jobs racing for one name exactly one gets it."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    number = 1
    while True:
        directory = parent / (base if number == 1 else f"{base}-{number}")
        try:
            os.mkdir(directory)
        except FileExistsError:
            number += 1
            continue
        write_run_record(directory, record)
        return directory


def write_run_record(directory: Path, record: dict, *, replace: bool = True) -> None:
    path = Path(directory) / RUN_FILE
    if path.exists() and not replace:
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    data = {**record, "host": socket.gethostname(), "pid": os.getpid(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    tmp = path.with_name(f".{RUN_FILE}.{_writer_tag()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def release_if_empty(directory: Path) -> None:
    """Remove a claimed folder that holds nothing but its run.json (its run failed before any checkpoint)."""
    directory = Path(directory)
    try:
        if {p.name for p in directory.iterdir()} == {RUN_FILE} and read_run_record(directory).get("pid") == os.getpid():
            (directory / RUN_FILE).unlink()
            directory.rmdir()
    except OSError:
        pass


def read_run_record(directory: Path) -> dict:
    """The run.json of a checkpoint folder ({} when it has none or it is unreadable)."""
    try:
        data = json.loads((Path(directory) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def find_run(root: Path, base: str, identity: str) -> Optional[Path]:
    """The folder under `root` that resume=auto continues: named `<base>` or `<base>-N`, of this identity,
    holding checkpoints, not abandoned by a branch (a folder whose run a later run branched away from);
    the most recently written of them when there are several."""
    root = Path(root)
    pattern = re.compile(rf"^{re.escape(base)}(-\d+)?$")
    folders = [p for p in root.iterdir() if p.is_dir() and pattern.match(p.name)] if root.is_dir() else []
    records = {p: read_run_record(p) for p in folders}
    same = [p for p in folders if records[p].get("identity") == identity]
    abandoned = {Path(records[p]["branched_from"]).parent.resolve() for p in same if records[p].get("branched_from")}
    live = [p for p in same if p.resolve() not in abandoned and candidates(p)]
    return max(live, key=_newest_mtime) if live else None


def resolve(root: str | Path, name: str, explicit_dir: Optional[str], resume: Optional[str], identity: str,
            warn=print) -> RunPlan:
    """Decide where this run saves and what it resumes from.

    - resume=<folder>: its newest good checkpoint, saving in that folder (or checkpoint.dir).
    - resume=<file>: that file, saving next to it, unless its folder holds a newer state: then the run is a
      new branch in a new folder beside it, and the abandoned branch's files stay as they are.
    - resume=auto: the newest good checkpoint of the folder of this name and identity (`find_run`), or of
      checkpoint.dir; none -> a fresh run.
    - no resume: a fresh run in a folder of its own (`claim_directory`), or checkpoint.dir if it is empty.
    """
    root, base = Path(root).expanduser(), run_base(name, identity)
    explicit = Path(explicit_dir).expanduser() if explicit_dir else None

    def fresh(resume_path=None, branch_of=None, parent=root) -> RunPlan:
        if explicit is not None and candidates(explicit):
            raise FixedclsError(
                f"checkpoint.dir={explicit} already holds checkpoints of another run: "
                f"pass resume=auto to continue it, or choose an empty checkpoint.dir"
            )
        return RunPlan(explicit, resume_path, parent, base, branch_of)

    if resume not in (None, "", "auto"):
        path = Path(resume).expanduser()
        if path.is_dir():  # a checkpoint folder: its newest good checkpoint
            found = _newest_loadable(path, warn)
            if found is None:
                raise FixedclsError(f"resume={resume}: the folder holds no loadable checkpoint (last.pt, epoch_NNNN.pt)")
            return RunPlan(explicit or path, found, root, base)
        if not path.is_file():
            raise FixedclsError(f"resume={resume}: no such checkpoint file (pass a .pt path, a checkpoint folder, "
                                f"or resume=auto)")
        if _older_than_its_folder(path, warn):
            return fresh(path, branch_of=path.parent, parent=path.parent.parent)
        return RunPlan(explicit or path.parent, path, root, base)
    if explicit is not None:
        if resume == "auto":
            return RunPlan(explicit, _newest_loadable(explicit, warn), root, base)
        return fresh()
    if resume == "auto":
        found = find_run(root, base, identity)
        if found is not None:
            return RunPlan(found, _newest_loadable(found, warn), root, base)
    return fresh()


def _older_than_its_folder(path: Path, warn) -> bool:
    """Whether the folder of checkpoint `path` holds a state that got further (resuming `path` then branches)."""
    if path.name == LAST:
        return False
    number = EPOCH_FILE.match(path.name)
    if number and any(int(EPOCH_FILE.match(p.name).group(1)) > int(number.group(1)) for p in epoch_files(path.parent)):
        return True
    newest, newest_state = load_newest_good(path.parent, warn)
    if newest is None or _same_file(newest, path):
        return False
    mine = load(path)
    _verified.clear()
    _verified[_state_key(path)] = mine  # train's load of the same file gets it without reading it again
    return _progress(newest_state) > _progress(mine)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def start_branch(directory: Path, source: Path, state: dict, best_metric: str) -> None:
    """Give a new branch folder the history it shares with its source: the resumed file as last.pt (and as its
    epoch file), and as best.pt the best epoch's file when that epoch is at or before the branch point."""
    directory = Path(directory)
    epoch = int(state.get("epoch", 0))
    _link_or_copy(source, directory / LAST)
    if int(state.get("step_in_epoch", 0)) == 0 and epoch > 0:
        _link_or_copy(source, directory / f"epoch_{epoch:04d}.pt")
    best = state.get("best_value")
    if best is None:
        return
    rows = [row for row in state.get("history", []) if row.get(best_metric) == best]
    if rows:
        best_file = source if rows[-1]["epoch"] == epoch else source.parent / f"epoch_{int(rows[-1]['epoch']):04d}.pt"
        if best_file.is_file():
            _link_or_copy(best_file, directory / BEST)


def _newest_loadable(directory: Path, warn) -> Optional[Path]:
    path, state = load_newest_good(directory, warn)
    _verified.clear()
    if path is not None:
        _verified[_state_key(path)] = state  # the load that follows gets it without reading the file again
    return path


class CheckpointWriter:
    """Saves the states of a run: per-epoch files (keeping the newest `keep`), last.pt and best.pt.

    A write that fails (full disk, lost mount) warns and returns None: the run goes on, and the
    previous checkpoints stay as they were (every write is atomic).

    ``background=True`` writes epoch checkpoints in a thread while the next epoch trains: the caller
    pays only for a copy of the state (~15 ms for ResNet-18 and its SGD momentum on a CPU, against
    ~0.1-0.2 s for the durable write with fsync).  Writes stay one at a time and in order; the next
    save, a mid-epoch save and :meth:`wait` wait for the one in flight.  A process killed during a
    background write loses that write only: the previous checkpoints are intact, as with a killed
    foreground write.

    The writer owns ``best_value``: each file records the best `best_metric` among the checkpoints
    actually written, itself included, so a resumed run compares against the right best.
    """

    def __init__(self, directory: Path, *, keep: int = 2, best_metric: str = "test/acc", best_mode: str = "auto",
                 enabled: bool = True, background: bool = False):
        self.directory, self.keep, self.best_metric, self.enabled = Path(directory), keep, best_metric, enabled
        self.best_mode = metric_direction(best_metric, best_mode)
        self.best_value: Optional[float] = None
        self._executor = None
        self._pending = None
        if enabled:
            remove_partial_writes(self.directory)
            if background:
                from concurrent.futures import ThreadPoolExecutor

                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fixedcls-checkpoint")

    def save_epoch(self, state: dict, metrics: dict) -> Optional[Path]:
        """Write a finished epoch's state (in the background when so built); returns the epoch file's path."""
        epoch_path = self.directory / f"epoch_{state['epoch']:04d}.pt"
        if not self.enabled:
            return epoch_path
        if self._executor is None:
            return self._write_epoch(state, metrics.get(self.best_metric), epoch_path)
        state = snapshot(state)  # the live weights change under the next epoch's steps
        self.wait()
        self._pending = self._executor.submit(self._write_epoch, state, metrics.get(self.best_metric), epoch_path)
        return epoch_path

    def _write_epoch(self, state: dict, value: Optional[float], epoch_path: Path) -> Optional[Path]:
        is_best = self._better(value, self.best_value)
        state["best_value"] = value if is_best else self.best_value
        try:
            atomic_save(state, epoch_path)
            _link_or_copy(epoch_path, self.directory / LAST)
            if is_best:
                self.best_value = value
                _link_or_copy(epoch_path, self.directory / BEST)
            for old in epoch_files(self.directory)[max(self.keep, 1) :]:
                old.unlink(missing_ok=True)
        except OSError as error:
            _warn(f"could not write checkpoint {epoch_path} ({error}); training goes on, the previous checkpoints "
                  f"in {self.directory} are intact")
            return None
        return epoch_path

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

    def _better(self, value: Optional[float], than: Optional[float]) -> bool:
        return is_better(value, than, self.best_mode)

    def save_interrupted(self, state: dict) -> Optional[Path]:
        """A mid-epoch state (after a stop signal); it becomes last.pt, the epoch files stay untouched."""
        path = self.directory / LAST
        if self.enabled:
            self.wait()  # the finished epoch's file first: last.pt must end as this newer state
            state["best_value"] = self.best_value
            try:
                atomic_save(state, path)
            except OSError as error:
                _warn(f"could not write checkpoint {path} ({error}); resume=auto will continue from the last "
                      f"epoch checkpoint in {self.directory}")
                return None
        return path


def snapshot(obj: Any) -> Any:
    """A copy of a state whose tensors share no memory with the live ones (and sit on the CPU)."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        copy = type(obj)((key, snapshot(value)) for key, value in obj.items())
        if hasattr(obj, "_metadata"):  # state_dict version info, read by load_state_dict
            copy._metadata = obj._metadata
        return copy
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(value) for value in obj)
    return obj


PARTIAL = re.compile(r"^\..+\.tmp$")  # what atomic_save and _link_or_copy write before the rename
# `.<file>.<host>-<pid>[.<random>].tmp`: the writer of a partial file.
PARTIAL_WRITER = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)(\.[A-Za-z0-9_]+)?\.tmp$")
FOREIGN_PARTIAL_AGE_S = 3600.0  # a write of another host (or an old version) idle this long is dead


def remove_partial_writes(directory: Path) -> None:
    """Delete the temporary files of writes that a killed run never finished (never a real checkpoint).

    Only files of dead writers go: this host's with a pid that no longer runs; another host's (or
    untagged ones) once untouched for an hour. A live writer's file, in a folder shared by mistake, stays."""
    if not Path(directory).is_dir():
        return
    now = time.time()
    for path in Path(directory).iterdir():
        if not (PARTIAL.match(path.name) and path.is_file()):
            continue
        writer = PARTIAL_WRITER.match(path.name)
        if writer and writer.group("host") == _HOST:
            dead = int(writer.group("pid")) != os.getpid() and not _pid_alive(int(writer.group("pid")))
        else:
            try:
                dead = now - path.stat().st_mtime > FOREIGN_PARTIAL_AGE_S
            except OSError:
                continue
        if dead:
            path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs, under another user
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
