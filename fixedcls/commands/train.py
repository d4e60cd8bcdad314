"""fixedcls-train: the Hydra entry point.

`main` (the console script) checks the overrides and lets Hydra compose the config; the job trains it with
`fixedcls.training.assemble.train` and hands a sweeper the value it optimises.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ..config import conf_dir, register_configs
from ..training.assemble import train
from ..training.distributed import worker_hydra_args
from ..training.outcome import outcome_lines
from .cli import exit_if_jobs_failed, hydra_usage_errors, job_value, optimized_value, refuse_bad_overrides, run_job

register_configs()
log = logging.getLogger("fixedcls")


def train_and_report(cfg: DictConfig, run_dir: Path) -> float:
    """Train, end with what the run made (rank 0), and return the value a sweeper (Optuna) optimises:
    cfg.optimized_metric of the summary."""
    result = train(cfg, run_dir)
    if result.run.world.is_main:
        for line in outcome_lines(result, result.history):
            log.info(line)
    return optimized_value(result, cfg.get("optimized_metric"))


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def hydra_main(cfg: DictConfig):
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    return job_value(run_job(lambda: train_and_report(cfg, run_dir)))  # NaN for a failed job


def main() -> None:
    refuse_bad_overrides(sys.argv[1:])
    # Ranks > 0 of a torchrun/srun launch make no Hydra run dir of their own.
    with worker_hydra_args(sys.argv), hydra_usage_errors():
        hydra_main()
    exit_if_jobs_failed()


if __name__ == "__main__":
    main()
