"""Where a run lives: its checkpoint folder, claimed atomically and named by run name and identity; what
`resume` continues (the same experiment only); branches started from an older checkpoint; and the check
that the folder can be written before a run starts.  The checkpoint files themselves are checkpoint.py's.
"""
from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..atomic import file_mode
from ..config import safe_name
from ..errors import FixedclsError
from .checkpoints import (
    BEST,
    EPOCH_FILE,
    LAST,
    RUN_FILE,
    TEMP_SUFFIX,
    candidates,
    epoch_files,
    keep_verified,
    link_or_copy,
    load,
    load_newest_good,
    meta_of,
    newest_loadable,
    progress_of,
    writer_tag,
)


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


@dataclass
class RunPlan:
    """Where a run saves and what it resumes: `directory` None means "claim a new folder" (`claim`), done
    only after the resumed checkpoint passed its checks, so a refused resume leaves no empty folder."""

    directory: Optional[Path]
    resume_path: Optional[Path]
    parent: Path  # where a new folder is claimed
    base: str  # its name: <safe run name>-<identity[:8]>
    branch_of: Optional[Path] = None  # resume_path continues in a new folder: this one, its own, is not written
    # resume_path is not in a run folder of its own (no run.json of its identity beside it): a loose file, whose
    # neighbours may be another run's files; it continues in a new folder under the checkpoint root
    loose: bool = False

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
    fd, tmp = tempfile.mkstemp(prefix=f".{RUN_FILE}.{writer_tag()}.", suffix=TEMP_SUFFIX, dir=directory)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data, indent=1, default=str) + "\n")
    os.chmod(tmp, file_mode())
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


def ensure_writable(directory: Path) -> None:
    """Fail at start-up if checkpoints cannot be written to `directory`.

    A failed checkpoint write only warns, so that a full disk does not kill a long run; a folder that was
    never writable would otherwise train the whole run and end with no checkpoint at all.  The probe is a
    uniquely named file in the folder, or in its nearest existing parent when the folder does not exist yet
    (creating entries there is what creating the folder needs): nothing is created or removed that another
    run starting at the same moment could be using.
    """
    directory = Path(directory)
    fix = "set checkpoint.dir (or checkpoint.root) to a folder you can write"
    blocking_file = next((p for p in (directory, *directory.parents) if p.exists() and not p.is_dir()), None)
    if blocking_file is not None:
        where = "is a file" if blocking_file == directory else f"is under {blocking_file}, which is a file"
        raise FixedclsError(f"checkpoint folder {directory} {where}, not a folder: {fix}")
    existing = next(p for p in (directory, *directory.parents) if p.is_dir())
    try:
        fd, probe = tempfile.mkstemp(prefix=f".write-probe.{writer_tag()}.", suffix=TEMP_SUFFIX, dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise FixedclsError(f"checkpoint folder {directory} is not writable ({error.strerror or error}): {fix}, "
                            f"or make it writable") from None


def resolve(root: str | Path, name: str, explicit_dir: Optional[str], resume: Optional[str], identity: str,
            warn=print) -> RunPlan:
    """`plan_run`, then a check that checkpoints can be written where the run will save (`ensure_writable`),
    so a run that could never save stops at start-up instead of training with no checkpoint."""
    plan = plan_run(root, name, explicit_dir, resume, identity, warn)
    ensure_writable(plan.directory or plan.parent)
    return plan


def plan_run(root: str | Path, name: str, explicit_dir: Optional[str], resume: Optional[str], identity: str,
             warn=print) -> RunPlan:
    """Decide where this run saves and what it resumes from.

    - resume=<folder>: its newest good checkpoint, saving in that folder (or checkpoint.dir); a folder whose
      run.json records another identity than that checkpoint's is not written: a new folder under the root.
    - resume=<file> in the folder of its own run (a run.json of the file's identity): that file, saving next to
      it, unless its folder holds a newer state: then the run is a new branch in a new folder beside it, and the
      abandoned branch's files stay as they are.
    - resume=<file> anywhere else (a loose file, perhaps beside another run's files): a new folder
      `<base>[-N]` under the checkpoint root (or checkpoint.dir, if empty); nothing beside the file is written.
    - resume=auto: the newest good checkpoint of the folder of this name and identity (`find_run`), or of
      checkpoint.dir; none -> a fresh run.
    - no resume: a fresh run in a folder of its own (`claim_directory`), or checkpoint.dir if it is empty.
    """
    root, base = Path(root).expanduser(), run_base(name, identity)
    explicit = Path(explicit_dir).expanduser() if explicit_dir else None

    def fresh(resume_path=None, branch_of=None, parent=root, loose=False) -> RunPlan:
        if explicit is not None and candidates(explicit):
            raise FixedclsError(
                f"checkpoint.dir={explicit} already holds checkpoints of another run: "
                f"pass resume=auto to continue it, or choose an empty checkpoint.dir"
            )
        return RunPlan(explicit, resume_path, parent, base, branch_of, loose)

    if resume not in (None, "", "auto"):
        path = Path(resume).expanduser()
        if path.is_dir():  # a checkpoint folder: its newest good checkpoint
            found, state = load_newest_good(path, warn)
            if found is None:
                raise FixedclsError(f"resume={resume}: the folder holds no loadable checkpoint (last.pt, epoch_NNNN.pt)")
            keep_verified(found, state)  # train's load of the same file gets it without reading it again
            # A folder of another run's record is never adopted; one with no run.json at all was written before
            # run records existed, and resume=<folder> is how such a run continues (docs/fault_tolerance.md).
            if read_run_record(path) and not _own_run_folder(found, state):
                return fresh(found, branch_of=path, loose=True)
            return RunPlan(explicit or path, found, root, base)
        if not path.is_file():
            raise FixedclsError(f"resume={resume}: no such checkpoint file (pass a .pt path, a checkpoint folder, "
                                f"or resume=auto)")
        state = load(path)
        keep_verified(path, state)
        if not _own_run_folder(path, state):  # its neighbours may be another run's: none of them is written
            return fresh(path, branch_of=path.parent, loose=True)
        if _older_than_its_folder(path, state, warn):
            return fresh(path, branch_of=path.parent, parent=path.parent.parent)
        return RunPlan(explicit or path.parent, path, root, base)
    if explicit is not None:
        if resume == "auto":
            return RunPlan(explicit, newest_loadable(explicit, warn), root, base)
        return fresh()
    if resume == "auto":
        found = find_run(root, base, identity)
        if found is not None:
            return RunPlan(found, newest_loadable(found, warn), root, base)
    return fresh()


def _own_run_folder(path: Path, state: dict) -> bool:
    """Whether checkpoint `path` (holding `state`) sits in the folder of its own run: a run.json there records the
    identity the checkpoint records.  Only such a folder may be written by the run that resumes it."""
    identity = read_run_record(path.parent).get("identity")
    return bool(identity) and meta_of(state).get("identity") == identity


def _older_than_its_folder(path: Path, mine: dict, warn) -> bool:
    """Whether the folder of checkpoint `path` (holding `mine`) holds a state that got further (resuming `path`
    then branches)."""
    if path.name == LAST:
        return False
    number = EPOCH_FILE.match(path.name)
    if number and any(int(EPOCH_FILE.match(p.name).group(1)) > int(number.group(1)) for p in epoch_files(path.parent)):
        return True
    newest, newest_state = load_newest_good(path.parent, warn)
    keep_verified(path, mine)  # load_newest_good may have loaded others: train's load of `path` gets it again
    if newest is None or _same_file(newest, path):
        return False
    return progress_of(newest_state) > progress_of(mine)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def start_branch(directory: Path, source: Path, state: dict, best_metric: str, *, siblings: bool = True) -> None:
    """Give a new branch folder the history it shares with its source: the resumed file as last.pt (and as its
    epoch file), and as best.pt the best epoch's file when that epoch is at or before the branch point.
    `siblings=False` (a loose file, whose neighbours may be another run's): best.pt only when it is `source`."""
    directory = Path(directory)
    epoch = int(state.get("epoch", 0))
    link_or_copy(source, directory / LAST)
    if int(state.get("step_in_epoch", 0)) == 0 and epoch > 0:
        link_or_copy(source, directory / f"epoch_{epoch:04d}.pt")
    best = state.get("best_value")
    if best is None:
        return
    rows = [row for row in state.get("history", []) if row.get(best_metric) == best]
    if rows:
        best_file = source if rows[-1]["epoch"] == epoch else source.parent / f"epoch_{int(rows[-1]['epoch']):04d}.pt"
        if best_file.is_file() and (siblings or best_file == source):
            link_or_copy(best_file, directory / BEST)
