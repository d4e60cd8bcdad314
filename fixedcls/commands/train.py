"""fixedcls-train: the Hydra entry point.

`main` (the console script) checks the overrides and lets Hydra compose the config; the job trains it with
`fixedcls.training.assemble.train` and hands a sweeper the value it optimises.
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ..config import conf_dir, register_configs
from ..training.assemble import train
from ..training.distributed import worker_hydra_args
from .cli import exit_if_jobs_failed, job_value, optimized_value, refuse_bad_overrides, run_job

register_configs()


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def hydra_main(cfg: DictConfig):
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    # The value a sweeper (Optuna) optimises: cfg.optimized_metric of the summary; NaN for a failed job.
    return job_value(run_job(lambda: optimized_value(train(cfg, run_dir), cfg.get("optimized_metric"))))


def main() -> None:
    refuse_bad_overrides(sys.argv[1:])
    with worker_hydra_args(sys.argv):  # ranks > 0 of a torchrun/srun launch make no Hydra run dir of their own
        hydra_main()
    exit_if_jobs_failed()


if __name__ == "__main__":
    main()
