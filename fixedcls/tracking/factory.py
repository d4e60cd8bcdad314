"""The tracker(s) a `logger` config section names (conf/logger/): `create_tracker`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .base import MultiTracker, Tracker, log_model_mode

#: The trackers `logger=` can name, in the order they are started.
TRACKERS = ("wandb", "tensorboard", "csv")


def chosen_trackers(cfg) -> list[str]:
    """The trackers the `logger` section turns on: every `use.<name>: true` (one per conf/logger/ file
    chosen, so `logger=[wandb,tensorboard]` gives both) and `name` (a hand-built section has only that)."""
    from ..errors import FixedclsError

    names = [str(k) for k, on in (cfg.get("use") or {}).items() if on]
    name = str(cfg.get("name") or "none")
    if name != "none" and name not in names:
        names.append(name)
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise FixedclsError(f"unknown logger '{unknown[0]}': choose none, {', '.join(TRACKERS)}, or several "
                            f"as logger=[wandb,tensorboard]")
    return [n for n in TRACKERS if n in names]


def create_tracker(cfg, *, run_dir: Path, resolved_config: dict, run_id: Optional[str] = None,
                   enabled: bool = True) -> Tracker:
    """The tracker(s) named by the `logger` config section (conf/logger/)."""
    if not enabled:
        return Tracker()
    names = chosen_trackers(cfg)
    log_model_mode(cfg)  # a bad value fails now, whichever tracker uses it
    trackers: list[Tracker] = []
    for name in names:
        if name == "wandb":
            from .wandb_run import WandbTracker

            trackers.append(WandbTracker(cfg, run_dir=run_dir, resolved_config=resolved_config, run_id=run_id))
        elif name == "tensorboard":
            from .local import TensorboardTracker

            trackers.append(TensorboardTracker(cfg, run_dir=run_dir, resolved_config=resolved_config))
        else:
            from .local import CsvTracker

            trackers.append(CsvTracker(cfg, run_dir=run_dir))
    if not trackers:
        return Tracker()
    return trackers[0] if len(trackers) == 1 else MultiTracker(trackers)
