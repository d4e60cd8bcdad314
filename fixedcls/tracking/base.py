"""The tracker interface: where a run's numbers are shown besides its own files (W&B, TensorBoard, a CSV file).

All trackers sit behind `Tracker`, so the training loop never knows which are on, and a tracker failure can
only warn, never stop training. `logger=[wandb,tensorboard]` runs several at once through `MultiTracker`.
The trackers themselves: `wandb_run`, `local`; the one that a `logger` section names: `factory.create_tracker`.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, Optional

#: `logger.log_model`: which checkpoints a tracker that stores files (W&B) uploads as `model` artifacts.
LOG_MODEL = ("false", "best", "all")


class TrackerWarning(UserWarning):
    """A tracker problem: reported once, and training goes on without (or with an offline) tracker."""


class Tracker:
    """No tracker: every call does nothing. Subclasses forward to a dashboard service or a file.

    `active` is True only for a tracker that really records something (so the loop can skip work,
    such as the per-class tables, that only a tracker would show). `log_model` says which checkpoints
    the loop should hand to `log_checkpoint`: "false" (none), "best" (best.pt at the end) or "all"
    (every epoch file as it is written).
    """

    run_id: Optional[str] = None
    active: bool = False
    log_model: str = "false"

    def resume(self, history: list[dict]) -> None:
        """A resumed run's earlier epochs (from the checkpoint), before the first new `log_epoch`."""

    def log_epoch(self, row: dict) -> None:
        pass

    def log_summary(self, summary: dict) -> None:
        pass

    def log_image(self, key: str, path: Path) -> None:
        pass

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        pass

    def log_class_results(self, targets: list[int], predictions: list[int], class_names: list[str]) -> None:
        """The test split's labels and predictions at the end of the run (per-class accuracy, confusion matrix)."""

    def log_checkpoint(self, path: Path, aliases: list[str]) -> None:
        pass

    def mark_preempting(self) -> None:
        """A stop signal of a scheduler ended the run; it will be requeued and resumed, it did not fail."""

    def finish(self, exit_code: int = 0) -> None:
        pass


class MultiTracker(Tracker):
    """Several trackers as one: each call goes to every tracker, in the order given."""

    def __init__(self, trackers: Iterable[Tracker]):
        self.trackers = list(trackers)

    @property
    def active(self) -> bool:
        return any(t.active for t in self.trackers)

    @property
    def run_id(self) -> Optional[str]:  # the id a resumed run hands back to W&B: the first tracker that has one
        return next((t.run_id for t in self.trackers if t.run_id), None)

    @property
    def log_model(self) -> str:
        modes = {t.log_model for t in self.trackers}
        return "all" if "all" in modes else "best" if "best" in modes else "false"

    def _each(self, method: str, *args) -> None:
        """Every tracker gets the call, also when one before it fails; the first failure is raised after."""
        failures = []
        for tracker in self.trackers:
            try:
                getattr(tracker, method)(*args)
            except Exception as error:
                failures.append(error)
        if failures:
            raise failures[0]

    def resume(self, history):
        self._each("resume", history)

    def log_epoch(self, row):
        self._each("log_epoch", row)

    def log_summary(self, summary):
        self._each("log_summary", summary)

    def log_image(self, key, path):
        self._each("log_image", key, path)

    def log_table(self, key, columns, rows):
        self._each("log_table", key, columns, rows)

    def log_class_results(self, targets, predictions, class_names):
        self._each("log_class_results", targets, predictions, class_names)

    def log_checkpoint(self, path, aliases):
        for tracker in self.trackers:
            if tracker.log_model != "false":
                tracker.log_checkpoint(path, aliases)  # only W&B stores files; it never raises (warns once)

    def mark_preempting(self):
        self._each("mark_preempting")

    def finish(self, exit_code: int = 0):
        self._each("finish", exit_code)


def log_model_mode(cfg) -> str:
    """`logger.log_model` as false, best or all (YAML's false arrives as a bool or the text False)."""
    from ..errors import FixedclsError

    value = cfg.get("log_model")
    text = "false" if value in (None, False) else str(value).strip().lower()
    text = {"none": "false", "0": "false", "no": "false", "off": "false", "true": "best", "1": "best"}.get(text, text)
    if text not in LOG_MODEL:
        raise FixedclsError(f"logger.log_model={value} is not valid: choose false, best (best.pt at the end) or "
                            f"all (every epoch checkpoint)")
    return text


def warn_once(tracker, what: str, error: Exception, name: str) -> None:
    """Turn `tracker` off after its first failure, with one warning."""
    tracker._broken = True
    tracker.active = False
    warnings.warn(f"{name} {what} failed ({type(error).__name__}: {error}); {name} logging is off for the rest "
                  f"of this run, training goes on", TrackerWarning)
