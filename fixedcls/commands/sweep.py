"""Sweeps that report themselves: the Hydra callbacks of `fixedcls-train -m`.

* `CompareSweep` (conf/config.yaml `hydra.callbacks.compare`): at the end of every multirun, writes what
  `fixedcls-compare <sweep dir>` writes (comparison.csv, comparison.md, comparison.png, comparison_plots/)
  into the sweep directory, failed jobs listed. Off: `hydra.callbacks.compare.enabled=false`.
* `FailNanTrials` (conf/hparams_search/optuna.yaml): the released Optuna sweeper (hydra-optuna-sweeper 1.3.0
  with optuna 2.10) aborts the whole search when a trial returns NaN (hydra issue #2237): it tells Optuna
  the NaN, which refuses it, then fails again marking the trial failed *with* the value. This callback turns
  a NaN job into a failed job, which the sweeper records as a failed trial and counts against
  `max_failure_rate`.

A command-layer module (Hydra loads it from conf/); the library never imports it.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from ..errors import FixedclsError

log = logging.getLogger("fixedcls")


class CompareSweep(Callback):
    """Writes the comparison of a multirun's jobs into its sweep directory when the multirun ends."""

    def __init__(self, enabled: bool = True, plots: bool = True):
        self.enabled, self.plots = enabled, plots

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        if not self.enabled or _generations_sweep(config):
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            write_comparison(sweep_dir, plots=self.plots)
        except Exception as error:  # the jobs are done and saved: a failed summary must not turn the sweep into a failure
            log.warning(f"fixedcls: no comparison written to {sweep_dir} ({error}); run `fixedcls-compare {sweep_dir}`")


def _generations_sweep(config) -> bool:
    """A `fixedcls-compat train` multirun: its jobs hold model generations and compat.json, not one training run."""
    try:
        from omegaconf import OmegaConf

        return bool(OmegaConf.select(config, "generations.tasks", default=None))
    except Exception:
        return False


def write_comparison(sweep_dir: Path, *, plots: bool = True):
    """fixedcls-compare's table and plots of the sweep in `sweep_dir`, written there; returns the Comparison."""
    from ..tracking import aggregate
    from .cli import FAILED_JOBS

    jobs, skipped = aggregate.load_dirs([sweep_dir])
    reasons = {}  # job number -> its one-line error, for jobs that failed in this process
    for line in FAILED_JOBS:
        head, _, error = line.partition(": ")
        number = head.split()[1] if head.startswith("job ") else None
        if number is not None:
            reasons[number] = f"failed: {error}"
    skipped = [(where, reasons.get(Path(where).name, why)) for where, why in skipped]
    result = aggregate.compare(jobs, skipped, sweep_dir, plots=plots, sources=[str(sweep_dir)])
    log.info(f"sweep comparison ({len(jobs)} job(s) finished, {len(skipped)} skipped) in {sweep_dir}:\n{result.table}")
    return result


class FailNanTrials(Callback):
    """Makes a job that returned NaN a failed job (see the module's note on the Optuna sweeper)."""

    def on_job_end(self, config, job_return, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        if job_return.status != JobStatus.COMPLETED:
            return
        value = job_return.return_value
        if isinstance(value, float) and math.isnan(value):
            overrides = " ".join(job_return.overrides or [])
            job_return.return_value = FixedclsError(f"the job ({overrides}) failed or its optimized_metric was NaN")
            job_return.status = JobStatus.FAILED
