"""Where a run's numbers go: metrics.jsonl and summary.json in the run directory, and trackers.

Trackers (W&B) sit behind one small interface so the training loop never knows which is on,
and a tracker failure can only warn, never stop training.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

METRICS_FILE, SUMMARY_FILE = "metrics.jsonl", "summary.json"
WANDB_MODES = ("online", "offline", "disabled")

log = logging.getLogger("fixedcls")


class TrackerWarning(UserWarning):
    """A tracker (W&B) problem: reported once, and training goes on without (or with an offline) tracker."""


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


class Tracker:
    """No tracker: every call does nothing. Subclasses forward to a dashboard service.

    `active` is True only for a tracker that really records something (so the loop can skip work,
    such as the per-class alignment table, that only a tracker would show).
    """

    run_id: Optional[str] = None
    active: bool = False

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


def wandb_mode(configured: Optional[str]) -> str:
    """online, offline or disabled: WANDB_MODE (or WANDB_DISABLED) wins over `logger.mode`."""
    from .errors import FixedclsError

    if os.environ.get("WANDB_DISABLED", "").strip().lower() in ("1", "true", "yes"):
        return "disabled"
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    mode = env or str(configured or "online").strip().lower()
    mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)
    if mode not in WANDB_MODES:
        where = f"WANDB_MODE={env}" if env else f"logger.mode={configured}"
        raise FixedclsError(f"unknown W&B mode {where}: choose online, offline or disabled")
    return mode


def _hydra_job() -> tuple[Optional[str], list[str]]:
    """(sweep directory name when this is a multirun job, the job's command-line overrides), from Hydra if running."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return None, []
        hydra_cfg = HydraConfig.get()
        sweep = Path(str(hydra_cfg.sweep.dir)).name if hydra_cfg.mode == RunMode.MULTIRUN else None
        return sweep or None, [str(o) for o in hydra_cfg.overrides.task]
    except Exception:  # no Hydra, or a config composed without its hydra section
        return None, []


def _tags(resolved_config: dict, configured: Iterable[str]) -> list[str]:
    from .heads import HEADS_LEARNED

    head = (resolved_config.get("head") or {}).get("name")
    tags = [head, None if head is None else ("learned" if head in HEADS_LEARNED else "fixed"),
            (resolved_config.get("model") or {}).get("backbone"), (resolved_config.get("data") or {}).get("name"),
            *configured]
    out: list[str] = []
    for tag in tags:
        if tag is not None and str(tag) and str(tag)[:64] not in out:  # W&B tags are at most 64 characters
            out.append(str(tag)[:64])
    return out


class WandbTracker(Tracker):
    """Weights & Biases: one W&B run per training run, epochs as the x-axis of every curve.

    * mode: WANDB_MODE (env) wins over `logger.mode`; online, offline or disabled (then nothing is started).
    * An online start that fails (no login, no network) goes on offline, with one warning;
      `wandb sync <dir>` uploads it later.
    * A resumed training run passes the stored run id: the same W&B run continues (resume="allow").
    * Any W&B error while logging warns once and turns the tracker off; training never stops for it.
    * `finish` must always be called (train.py does so in a `finally`), so multirun jobs never share a run;
      `reinit="finish_previous"` also closes a run some earlier job left open in this process.
    """

    def __init__(self, cfg, *, run_dir: Path, resolved_config: dict, run_id: Optional[str] = None):
        self.mode = wandb_mode(cfg.get("mode"))
        self.run = None
        self.run_id = run_id
        self._broken = False
        self._last_epoch: Optional[int] = None
        if self.mode == "disabled":
            return
        try:
            import wandb
        except Exception as error:  # a broken install must not stop training either
            warnings.warn(f"logger=wandb but wandb cannot be imported ({error}): `pip install wandb`; training goes on "
                          f"without W&B", TrackerWarning)
            return
        self._wandb = wandb
        sweep, overrides = _hydra_job()
        config = dict(resolved_config)
        if overrides:
            config["hydra_overrides"] = overrides  # what this job changed: fixedcls-compare --wandb groups by it
        group = cfg.get("group") or resolved_config.get("experiment") or sweep or resolved_config.get("name")
        directory = cfg.get("dir") or (None if os.environ.get("WANDB_DIR") else str(run_dir))
        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
        kwargs = dict(
            project=cfg.get("project") or "fixedcls", entity=cfg.get("entity") or None, group=group,
            job_type=cfg.get("job_type") or "train", tags=_tags(resolved_config, cfg.get("tags") or []),
            name=resolved_config.get("name"), config=config, dir=directory, reinit="finish_previous",
        )
        if run_id:
            kwargs.update(id=run_id, resume="allow")
        try:
            self.run = wandb.init(mode=self.mode, **kwargs)
        except Exception as error:
            if self.mode != "online":
                warnings.warn(f"W&B could not start ({type(error).__name__}: {error}); training goes on without W&B",
                              TrackerWarning)
                return
            try:
                self.run = wandb.init(mode="offline", **kwargs)
                self.mode = "offline"
                warnings.warn(f"W&B could not start online ({type(error).__name__}: {error}); logging offline "
                              f"instead: upload later with `wandb sync {Path(self.run.dir).parent}`", TrackerWarning)
            except Exception as offline_error:
                warnings.warn(f"W&B could not start online ({type(error).__name__}: {error}) nor offline "
                              f"({type(offline_error).__name__}: {offline_error}); training goes on without W&B",
                              TrackerWarning)
                return
        self.run_id = self.run.id
        self.active = True
        self._call("define_metric", self._define_metrics)
        if self.mode == "online":
            where = getattr(self.run, "url", None) or ""
        else:
            where = f"{Path(self.run.dir).parent} (upload with `wandb sync` on it)" if getattr(self.run, "dir", None) else ""
        log.info(f"W&B run {self.run.id} ({self.mode}, group {group}){': ' + where if where else ''}")

    def _define_metrics(self) -> None:
        self.run.define_metric("epoch")
        self.run.define_metric("*", step_metric="epoch")

    def _call(self, what: str, fn: Callable, *args, **kwargs) -> None:
        if self.run is None or self._broken:
            return
        try:
            fn(*args, **kwargs)
        except Exception as error:  # a dashboard problem must never end a training run
            self._broken = True
            self.active = False
            warnings.warn(f"W&B {what} failed ({type(error).__name__}: {error}); W&B logging is off for the rest "
                          f"of this run, training goes on", TrackerWarning)

    def log_epoch(self, row: dict) -> None:
        row = {k: jsonable(v) for k, v in row.items() if v is not None}
        if "epoch" in row:
            self._last_epoch = row["epoch"]
        self._call("log", lambda: self.run.log(row))

    def log_summary(self, summary: dict) -> None:
        values = {k: jsonable(v) for k, v in summary.items() if v is not None}
        self._call("summary", lambda: self.run.summary.update(values))

    def _with_epoch(self, data: dict) -> dict:
        return data if self._last_epoch is None else {**data, "epoch": self._last_epoch}

    def log_image(self, key: str, path: Path) -> None:
        self._call("image", lambda: self.run.log(self._with_epoch({key: self._wandb.Image(str(path))})))

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        self._call("table", lambda: self.run.log(self._with_epoch({key: self._wandb.Table(columns=list(columns),
                                                                                          data=[list(r) for r in rows])})))

    def finish(self, exit_code: int = 0) -> None:
        run, self.run, self.active = self.run, None, False
        if run is None:
            return
        try:
            run.finish(exit_code=exit_code)
        except Exception as error:
            if not self._broken:
                warnings.warn(f"W&B finish failed ({type(error).__name__}: {error})", TrackerWarning)


def create_tracker(cfg, *, run_dir: Path, resolved_config: dict, run_id: Optional[str] = None, enabled: bool = True) -> Tracker:
    """The tracker named by the `logger` config section (conf/logger/)."""
    if not enabled or cfg.name == "none":
        return Tracker()
    if cfg.name == "wandb":
        return WandbTracker(cfg, run_dir=run_dir, resolved_config=resolved_config, run_id=run_id)
    from .errors import FixedclsError

    raise FixedclsError(f"unknown logger '{cfg.name}': choose none or wandb")
