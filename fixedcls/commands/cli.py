"""What every fixedcls command shares: the early check of Hydra overrides, one-line errors with documented
exit codes, the list of failed multirun jobs, the value a job hands to a sweeper (`optimized_value`,
`job_value`), and argparse types that refuse bad values in one line.

Exit codes: 0 success; 2 a usage error (bad option, value, path or checkpoint, a file or folder that cannot be
written where the user asked: one line names it and the fix); 1 a runtime failure (a full disk, an I/O error,
checkpoints that could not be written, a failed job of a multirun): a FixedclsError carries its status as
`exit_code`; 128 + N stopped by signal N, with the state saved (continue with resume=auto).
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from ..config import Config, conf_dir, value_problem
from ..errors import FixedclsError
from ..escaping import terminal
from ..training.signals import TrainingInterrupted

EXIT_USAGE, EXIT_FAILURE = 2, 1
FAILED_JOBS: list[str] = []  # the failed jobs of this process's multirun, reported by exit_if_jobs_failed
# What the machine did, not what the user asked for: any other OSError names a path the user can change.
RUNTIME_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO}


def one_line(error: BaseException) -> str:
    """The message of an error as one line (a FixedclsError re-raised from a DataLoader worker included), with
    any control character of a name in it shown escaped."""
    text = str(error)
    if "Original Traceback" in text and "FixedclsError: " in text:
        text = text.rsplit("FixedclsError: ", 1)[1]
    return terminal(" ".join(text.strip().splitlines()[-1:] if "Traceback" in text else text.split()))


def config_error(error: BaseException) -> str:
    """An OmegaConf error (an interpolation that cannot be resolved, a value of the wrong type) as one line
    naming the config key."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    key = getattr(error, "full_key", None)
    return terminal(f"{first}" + (f" (config key {key})" if key else "") + ": fix the override or the config")


def os_error_line(error: OSError) -> tuple[str, int]:
    """An OSError as (one line naming the path and the fix, exit code): 1 for a full disk or an I/O error, 2 for
    a path the user named that cannot be written or read (missing folder, no permission, read-only, a file
    where a folder should be)."""
    where = f": {terminal(error.filename)}" if error.filename else ""
    if error.errno in RUNTIME_ERRNOS:
        return f"{error.strerror or error}{where}", EXIT_FAILURE
    return f"{error.strerror or error}{where}: check the path, or choose another", EXIT_USAGE


def error_line(raised: BaseException) -> tuple[str, int]:
    """The one line and the exit status of a failure a user can cause: a FixedclsError (its own status), an
    OSError (`os_error_line`) or an OmegaConf error (an override such as optim.lr=${oops}: a usage error)."""
    if isinstance(raised, OSError):
        return os_error_line(raised)
    if isinstance(raised, FixedclsError):
        return one_line(raised), raised.exit_code
    return config_error(raised), EXIT_USAGE


def run_command(main: Callable[[], Optional[int]], prog: str) -> int:
    """Run an argparse command so that every failure a user can cause is one line and an exit code."""
    try:
        return int(main() or 0)
    except (FixedclsError, OSError) as error:  # OSError: a full disk, a folder that cannot be written: no traceback
        if isinstance(error, FixedclsError) and os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        line, code = error_line(error)
        print(f"{prog}: error: {line}", file=sys.stderr)
        return code
    except TrainingInterrupted as error:
        stop_after_interrupt(error, prog)
        return 128 + error.signum


def _run_mode():
    from hydra.core.hydra_config import HydraConfig

    try:
        return HydraConfig.get().mode
    except ValueError:
        return None


def stop_after_interrupt(error: TrainingInterrupted, prog: str = "fixedcls") -> None:
    """Leave as the signal asked; a launcher's own SIGUSR1/SIGUSR2 handler (submitit's requeue: USR2 by
    default since submitit 1.5, SUBMITIT_PREEMPT_SIGNAL) runs after our save."""
    print(f"{prog}: {error}", file=sys.stderr)
    previous = signal.getsignal(error.signum)
    if callable(previous) and error.signum in (getattr(signal, "SIGUSR1", None), getattr(signal, "SIGUSR2", None)):
        previous(error.signum, None)
    sys.exit(128 + error.signum)


def run_job(task: Callable[[], Any], *, prog: str = "fixedcls") -> Any:
    """Run one Hydra job so that a user error is one line: exit 2, or, in a multirun, a recorded failure
    that lets the other jobs run (`exit_if_jobs_failed` reports them at the end)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from omegaconf.errors import OmegaConfBaseException

    try:
        return task()
    # OSError: a folder that cannot be written, a full disk; OmegaConf: an override such as optim.lr=${oops}
    except (FixedclsError, OSError, OmegaConfBaseException) as raised:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        error, code = error_line(raised)
        if _run_mode() == RunMode.MULTIRUN:
            job = HydraConfig.get().job
            FAILED_JOBS.append(f"job {job.num} ({job.override_dirname or 'defaults'}): {error}")
            print(f"{prog}: error in job {job.num}: {error}", file=sys.stderr)
            return None
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(code)
    except TrainingInterrupted as error:
        stop_after_interrupt(error, prog)


@contextlib.contextmanager
def hydra_usage_errors():
    """Around a Hydra main: Hydra prints its own short error for an override it cannot parse or a config it
    cannot compose, and exits 1; those are usage errors, so the exit status becomes 2 (a traceback stays 1)."""
    from hydra.errors import CompactHydraException

    try:
        yield
    except SystemExit as stop:
        if stop.code == EXIT_FAILURE and isinstance(stop.__context__, CompactHydraException):
            raise SystemExit(EXIT_USAGE) from None
        raise


def exit_if_jobs_failed(prog: str = "fixedcls") -> None:
    if FAILED_JOBS:
        print(f"{prog}: {len(FAILED_JOBS)} job(s) failed:", file=sys.stderr)
        for line in FAILED_JOBS:
            print(f"  {line}", file=sys.stderr)
        sys.exit(EXIT_FAILURE)


def refuse_bad_overrides(args: Sequence[str], prog: str = "fixedcls") -> None:
    """Exit 2 with one line if a command-line override cannot work (see `check_overrides`)."""
    try:
        problem = check_overrides(list(args))
    except Exception:  # the check must never stand in the way: Hydra validates again
        problem = None
    if problem is not None:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def check_overrides(args: list[str]) -> Optional[str]:
    """One line naming the first command-line override that cannot work, or None (then Hydra takes over).

    Plain `key=value` overrides are checked against the schema (fixedcls/config.py): an unknown key gets a
    "did you mean", a value of the wrong type or enum, or out of its declared range, the allowed values, a
    config group an option that exists in conf/. `+key=`, `++key=`, `~key`, `hydra.*`, packages
    (`key@pkg=`), Hydra's flags and their arguments (`-sc install=bash`, `--cfg job`), and anything this
    check does not understand are left to Hydra, whose own errors still apply.
    """
    import contextlib
    import io

    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType, ValueType

    try:  # Hydra's own command-line parser, so that only what Hydra takes as overrides is checked
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            command = get_args_parser().parse_args(list(args))
    except SystemExit:
        return None  # a malformed flag, or --version: Hydra's parser answers when it runs
    if command.shell_completion:
        return None  # `-sc install=bash` / `-sc query=bash`: the words after -sc are completion commands
    args = command.overrides
    conf = conf_dir()
    own_search_path = bool(command.config_dir or command.config_path or command.config_name
                           or any(a.startswith("hydra.searchpath") for a in args))
    parser = OverridesParser.create()
    schema = OmegaConf.structured(Config)
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            override = parser.parse_override(arg)
        except Exception:
            continue  # Hydra reports grammar errors itself
        key = override.key_or_group
        if override.type != OverrideType.CHANGE or override.package is not None or key.startswith("hydra") or "/" in key:
            continue
        if (conf / key).is_dir():  # a config group: head=, data=, optim=, ...
            if own_search_path:
                continue  # the user's own config folder may hold other options
            options = sorted(p.stem for p in (conf / key).glob("*.yaml"))
            if override.value_type in (ValueType.ELEMENT, ValueType.SIMPLE_CHOICE_SWEEP):
                chosen = override.value() if override.value_type == ValueType.ELEMENT else override.value().list
                for option in chosen if isinstance(chosen, list) else [chosen]:
                    if isinstance(option, str) and option not in options:
                        return f"unknown {key} '{option}': choose one of {', '.join(options)} (conf/{key}/)"
            continue
        node, parts = schema, key.split(".")
        for depth, part in enumerate(parts):
            if isinstance(node, ListConfig) or (isinstance(node, DictConfig) and OmegaConf.get_type(node) is dict):
                node = None  # a free-form dict or a list: any key below is allowed
                break
            if not isinstance(node, DictConfig):
                return f"unknown config key '{key}': {'.'.join(parts[:depth])} is a value, not a section"
            if part not in node:
                here = ".".join(parts[:depth])
                close = difflib.get_close_matches(part, [str(k) for k in node.keys()], n=1, cutoff=0.6)
                if close:
                    return f"unknown config key '{key}': did you mean {'.'.join(parts[:depth] + close + parts[depth + 1:])}?"
                return (f"unknown config key '{key}': {here or 'the config'} has "
                        f"{', '.join(str(k) for k in node.keys())}")
            node = node._get_node(part) if depth + 1 < len(parts) else node
        if node is None or override.value_type != ValueType.ELEMENT:
            continue
        value = override.value()
        if isinstance(value, str) and "${" in value:
            continue  # an interpolation: resolved later
        try:
            OmegaConf.update(schema, key, value, merge=False)
        except Exception as error:
            reason = " ".join(str(error).split("\n")[0].split())
            return f"{arg}: {reason}"
        if (problem := value_problem(key, OmegaConf.select(schema, key))) is not None:
            return problem
    return None


# argparse types: a bad value is refused by argparse itself, with the option named, before any work starts.

def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive: give 1 or more")
    return value


def stage_list(text: str) -> list[int] | str:
    """`all`, or comma-separated backbone stage indices (negative counts from the end)."""
    if text == "all":
        return "all"
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give stage indices such as 0,1,2,3 (or -1), or all") from None


def output_file(text: str) -> Path:
    """A file to write (missing folders are created when it is written): not a folder, not below a file."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder: give a file name inside it, e.g. {path / 'out.json'}")
    _no_file_above(path)
    return path


def _no_file_above(path: Path) -> None:
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(f"{parent} is a file, so nothing can be written below it: choose another path")
            return


def output_folder(text: str) -> Path:
    """A folder to write into (created when missing); it must not be a file."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a file, not a folder: give a folder to write into")
    _no_file_above(path)
    return path


#: What `optimized_metric: null` means, first present wins: the validation split's best, else the test split's.
DEFAULT_OPTIMIZED = ("best/val/acc", "best/test/acc")


def optimized_value(summary: dict, metric: Optional[str] = None) -> float:
    """The number a sweep optimises: `summary[metric]`; with no metric, best/val/acc when the run has a validation
    split, else best/test/acc. A metric the summary does not have is a one-line error naming the keys it has."""
    if metric is None:
        metric = next((key for key in DEFAULT_OPTIMIZED if key in summary), DEFAULT_OPTIMIZED[-1])
    if metric not in summary:
        numeric = sorted(k for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        raise FixedclsError(f"optimized_metric={metric} is not in this run's summary: choose one of "
                            f"{', '.join(numeric[:40])}{' ...' if len(numeric) > 40 else ''}")
    value = summary[metric]
    if value is None:  # a NaN, as summary.json stores it
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FixedclsError(f"optimized_metric={metric} is {value!r}, not a number: choose a numeric summary key "
                            f"such as best/test/acc or final/collapse/nc1")
    return float(value)


def job_value(value: Any) -> float:
    """What a sweep job returns: its value, or NaN for a failed job (cli.run_job returns None for it)."""
    return math.nan if value is None else float(value)
