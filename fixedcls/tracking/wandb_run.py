"""The Weights & Biases tracker: one W&B run per training run, epochs as the x-axis of every curve, the best
value of every accuracy, loss and collapse measure in the run summary, checkpoints as `model` artifacts."""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Callable, Iterable, Optional

from ..config import safe_name
from .base import Tracker, TrackerWarning, log_model_mode, warn_once

WANDB_MODES = ("online", "offline", "disabled")
log = logging.getLogger("fixedcls")


def wandb_mode(configured: Optional[str]) -> str:
    """online, offline or disabled: WANDB_MODE (or WANDB_DISABLED) wins over `logger.mode`."""
    from ..errors import FixedclsError

    if os.environ.get("WANDB_DISABLED", "").strip().lower() in ("1", "true", "yes"):
        return "disabled"
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    mode = env or str(configured or "online").strip().lower()
    mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)
    if mode not in WANDB_MODES:
        where = f"WANDB_MODE={env}" if env else f"logger.mode={configured}"
        raise FixedclsError(f"unknown W&B mode {where}: choose online, offline or disabled")
    return mode


def summary_of(key: str) -> Optional[str]:
    """The W&B summary of an epoch key: the best value (max for accuracies and proto_cos, min for losses and
    the collapse measures nc1..nc4, cdnv) and the last one; None for keys whose best means nothing (lr, time)."""
    base = key.rsplit("/", 1)[-1]
    if base.startswith(("acc", "proto_cos")):
        return "max,last"
    if "loss" in base or base.startswith(("nc1", "nc2", "nc3", "nc4", "cdnv")):
        return "min,last"
    return None


def hydra_job() -> tuple[Optional[str], list[str]]:
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


def launch_id(sweep_dir_name: Optional[str]) -> Optional[str]:
    """What tells one launch of a sweep from another: the W&B Sweeps id under `wandb agent`, else the Hydra
    multirun's sweep directory name (its launch time by default, multirun/<date>_<time>)."""
    return os.environ.get("WANDB_SWEEP_ID") or sweep_dir_name


def default_group(resolved_config: dict, launch: Optional[str]) -> str:
    """The preset and the launch (two launches of one preset on different days are two groups), else the launch,
    else the run name."""
    experiment = resolved_config.get("experiment")
    if experiment and launch:
        return f"{experiment}-{launch}"
    return experiment or launch or (safe_name(resolved_config["name"]) if resolved_config.get("name") else "fixedcls")


def tags_of(resolved_config: dict, configured: Iterable[str], launch: Optional[str] = None) -> list[str]:
    from ..models.heads import HEADS_LEARNED

    head = (resolved_config.get("head") or {}).get("name")
    tags = [head, None if head is None else ("learned" if head in HEADS_LEARNED else "fixed"),
            (resolved_config.get("model") or {}).get("backbone"), (resolved_config.get("data") or {}).get("name"),
            *configured, None if launch is None else f"sweep:{launch}"]
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
    * A resumed training run passes the stored run id: the same W&B run continues (resume="allow"); offline,
      the stored history is replayed into the new segment, so the synced run holds every epoch.
    * Every accuracy, loss and collapse measure keeps its best and its last value in the run summary
      (define_metric), so a crashed or preempted run still shows its best.
    * Any W&B error while logging warns once and turns the tracker off; training never stops for it.
    * `finish` must always be called (train.py does so in a `finally`), so multirun jobs never share a run;
      `reinit="finish_previous"` also closes a run some earlier job left open in this process.
    """

    def __init__(self, cfg, *, run_dir: Path, resolved_config: dict, run_id: Optional[str] = None):
        self.mode = wandb_mode(cfg.get("mode"))
        self.log_model = log_model_mode(cfg)
        self.run = None
        self.run_id = run_id
        self._resuming = run_id is not None
        self._broken = False
        self._last_epoch: Optional[int] = None
        self._defined: set[str] = set()
        if self.mode == "disabled":
            self.log_model = "false"
            return
        try:
            import wandb
        except Exception as error:  # a broken install must not stop training either
            warnings.warn(f"logger=wandb but wandb cannot be imported ({error}): `pip install -e .` (wandb is a dependency "
                          f"of fixedcls); training goes on without W&B", TrackerWarning)
            self.log_model = "false"
            return
        self._wandb = wandb
        sweep, overrides = hydra_job()
        launch = launch_id(sweep)
        config = dict(resolved_config)
        if overrides:
            config["hydra_overrides"] = overrides  # what this job changed: fixedcls-compare --wandb groups by it
        if launch:
            config["sweep_id"] = launch
        self.group = cfg.get("group") or default_group(resolved_config, launch)
        directory = cfg.get("dir") or (None if os.environ.get("WANDB_DIR") else str(run_dir))
        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
        kwargs = dict(
            project=cfg.get("project") or "fixedcls", entity=cfg.get("entity") or None, group=self.group,
            job_type=cfg.get("job_type") or "train", tags=tags_of(resolved_config, cfg.get("tags") or [], launch),
            # the run's name as its folders have it (fixedcls.config.safe_name): one rule wherever a name goes
            name=safe_name(resolved_config["name"]) if resolved_config.get("name") else None, config=config,
            dir=directory, reinit="finish_previous",
        )
        if run_id:
            kwargs.update(id=run_id, resume="allow")
        try:
            self.run = self._init(self.mode, kwargs)
        except Exception as error:
            if self.mode != "online":
                warnings.warn(f"W&B could not start ({type(error).__name__}: {error}); training goes on without W&B",
                              TrackerWarning)
                self.log_model = "false"
                return
            try:
                self.run = self._init("offline", kwargs)
                self.mode = "offline"
                warnings.warn(f"W&B could not start online ({type(error).__name__}: {error}); logging offline "
                              f"instead: upload later with `wandb sync {Path(self.run.dir).parent}`", TrackerWarning)
            except Exception as offline_error:
                warnings.warn(f"W&B could not start online ({type(error).__name__}: {error}) nor offline "
                              f"({type(offline_error).__name__}: {offline_error}); training goes on without W&B",
                              TrackerWarning)
                self.log_model = "false"
                return
        self.run_id = self.run.id
        self.active = True
        self._call("define_metric", self._define_step)
        if self.mode == "online":
            where = getattr(self.run, "url", None) or ""
        else:
            where = f"{Path(self.run.dir).parent} (upload with `wandb sync` on it)" if getattr(self.run, "dir", None) else ""
        log.info(f"W&B run {self.run.id} ({self.mode}, group {self.group}){': ' + where if where else ''}")

    def _init(self, mode: str, kwargs: dict):
        """wandb.init in `mode`, with W&B's process-wide settings in the same mode first.

        wandb.init(mode=...) sets the mode of its run only, while W&B's own analytics (an OpenTelemetry exporter in
        this process, seen with wandb 0.31) read the process-wide settings, online unless WANDB_MODE says otherwise:
        an offline run still posted to W&B's server from a background thread and at interpreter exit (the test
        suite's output ended with its failed connection). With the process-wide mode offline the exporter is never
        built. tests/test_wandb.py runs an offline run under a socket guard."""
        self._wandb.setup(settings=self._wandb.Settings(mode=mode))
        return self._wandb.init(mode=mode, **kwargs)

    def _define_step(self) -> None:
        self.run.define_metric("epoch")
        self.run.define_metric("*", step_metric="epoch")

    def _define(self, keys: Iterable[str]) -> None:
        """define_metric for keys seen for the first time: any split (val/, test/) or backbone stage included."""
        for key in keys:
            if key in self._defined or key == "epoch":
                continue
            self._defined.add(key)
            summary = summary_of(key)
            if summary is not None:
                self.run.define_metric(key, step_metric="epoch", summary=summary)

    def _call(self, what: str, fn: Callable, *args, **kwargs) -> None:
        if self.run is None or self._broken:
            return
        try:
            fn(*args, **kwargs)
        except Exception as error:  # a dashboard problem must never end a training run
            warn_once(self, what, error, "W&B")

    def resume(self, history: list[dict]) -> None:
        # Online, W&B appends to the stored run itself. Offline, each resumed part is a run folder of its own, and
        # `wandb sync` of a later part replaces the earlier one (wandb/wandb#4624): the part must hold it all.
        if self.mode == "offline" and self._resuming and self.run is not None:
            for row in history:
                self.log_epoch(row)

    def log_epoch(self, row: dict) -> None:
        from ..atomic import jsonable

        row = {k: jsonable(v) for k, v in row.items() if v is not None}
        if "epoch" in row:
            self._last_epoch = row["epoch"]

        def log() -> None:
            self._define(row)
            self.run.log(row)

        self._call("log", log)

    def log_summary(self, summary: dict) -> None:
        from ..atomic import jsonable

        values = {k: jsonable(v) for k, v in summary.items() if v is not None}
        self._call("summary", lambda: self.run.summary.update(values))

    def _with_epoch(self, data: dict) -> dict:
        return data if self._last_epoch is None else {**data, "epoch": self._last_epoch}

    def log_image(self, key: str, path: Path) -> None:
        self._call("image", lambda: self.run.log(self._with_epoch({key: self._wandb.Image(str(path))})))

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        self._call("table", lambda: self.run.log(self._with_epoch({key: self._wandb.Table(columns=list(columns),
                                                                                          data=[list(r) for r in rows])})))

    def log_class_results(self, targets: list[int], predictions: list[int], class_names: list[str]) -> None:
        """`test/per_class` (a table: class, count, correct, accuracy) and `test/confusion_matrix`."""
        def log() -> None:
            counts, correct = [0] * len(class_names), [0] * len(class_names)
            for target, predicted in zip(targets, predictions):
                counts[target] += 1
                correct[target] += int(target == predicted)
            rows = [[c, class_names[c], counts[c], correct[c], correct[c] / counts[c] if counts[c] else None]
                    for c in range(len(class_names))]
            table = self._wandb.Table(columns=["class", "name", "count", "correct", "accuracy"], data=rows)
            matrix = self._wandb.plot.confusion_matrix(y_true=list(targets), preds=list(predictions),
                                                       class_names=list(class_names), title="test confusion matrix")
            self.run.log(self._with_epoch({"test/per_class": table, "test/confusion_matrix": matrix}))

        self._call("class results", log)

    def log_checkpoint(self, path: Path, aliases: list[str]) -> None:
        """A checkpoint as a version of the run's `model-<run id>` artifact (type model), like Lightning's
        WandbLogger(log_model=...): W&B moves an alias (best, latest) to the newest version that carries it."""
        path = Path(path)

        def log() -> None:
            artifact = self._wandb.Artifact(f"model-{self.run.id}", type="model",
                                            metadata={"epoch": self._last_epoch, "file": path.name})
            artifact.add_file(str(path), name=path.name)  # copied to W&B's staging area: epoch files may rotate away
            self.run.log_artifact(artifact, aliases=list(aliases))

        self._call("log_artifact", log)

    def mark_preempting(self) -> None:
        # With a non-zero exit code afterwards, W&B shows the run as preempted (not failed) and a W&B sweep requeues it.
        self._call("mark_preempting", lambda: self.run.mark_preempting())

    def finish(self, exit_code: int = 0) -> None:
        run, self.run, self.active = self.run, None, False
        if run is None:
            return
        try:
            run.finish(exit_code=exit_code)
        except Exception as error:
            if not self._broken:
                warnings.warn(f"W&B finish failed ({type(error).__name__}: {error})", TrackerWarning)
