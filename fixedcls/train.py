"""fixedcls-train: the Hydra entry point.

`main` (the console script) checks the overrides and lets Hydra compose the config; `train(cfg, run_dir)`
builds what the config names (fixedcls.build), hands it to `engine.fit`, and returns the summary with the
objects it built (`result.run`), so tests and benchmarks use them without patching anything.
"""
from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Optional

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from . import build
from . import checkpoint as ckpt
from .cli import exit_if_jobs_failed, refuse_bad_overrides, run_job
from .config import conf_dir, register_configs, validate_config
from .data import create_data, create_loaders, targets_of
from .distributed import World, close_world, init_world, worker_hydra_args
from .engine import TrainingRun, fit
from .errors import FixedclsError
from .loggers import MetricsFile, create_tracker
from .model import format_param_summary
from .runtime import autocast_for, choice, resolve_device, seed_everything
from .signals import TrainingInterrupted
from .sweep import job_value, optimized_value

log = logging.getLogger("fixedcls")
register_configs()


class TrainResult(dict):
    """The run summary (a dict, as written to summary.json), with `.run`: the TrainingRun that produced it."""

    run: Optional[TrainingRun] = None


def check_resume_matches(state: dict, meta: dict, path: Path) -> None:
    """A checkpoint from another head, polytope or class count cannot continue this run."""
    saved = state.get("meta", {})
    for key in ("head", "num_classes", "dim", "backbone", "head_seed"):
        if key in saved and saved[key] != meta[key]:
            raise FixedclsError(
                f"checkpoint {path} was trained with {key}={saved[key]} but this run has {key}={meta[key]}: "
                f"resume it with the same settings, or start a new run without resume"
            )


def train(cfg: DictConfig, run_dir: str | Path) -> TrainResult:
    """Build everything `cfg` names and train. Returns the run summary (also written to summary.json)."""
    validate_config(cfg)
    device = resolve_device(cfg.trainer.device)
    autocast_for(device, cfg.trainer.precision)  # fail now on an impossible precision, not after building the model
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    world = init_world(device.type)
    if world.distributed and device.type == "cuda":
        device = torch.device("cuda", world.device_index)
    run = None
    exit_code = 1
    try:
        run = build_training(cfg, Path(run_dir), world, device)
        result = TrainResult(fit(run))
        result.run = run
        exit_code = 0
        return result
    except TrainingInterrupted as stopped:
        exit_code = 128 + stopped.signum  # what the process exits with (cli.stop_after_interrupt)
        if run is not None and stopped.signum != signal.SIGINT:  # a scheduler's stop: requeued, not failed
            try:
                run.tracker.mark_preempting()
            except Exception as error:
                log.warning(f"warning: the tracker's mark_preempting failed ({type(error).__name__}: {error})")
        raise
    finally:
        if run is not None:
            try:
                run.tracker.finish(exit_code)
            except Exception as error:  # a tracker can only warn: the run and its checkpoints are already safe
                log.warning(f"warning: the tracker's finish failed ({type(error).__name__}: {error})")
            run.checkpoints.close()
        close_world(world)


def build_training(cfg: DictConfig, run_dir: Path, world: World, device: torch.device) -> TrainingRun:
    """Every object of a run, in the order a failure should be found: data, model, resume, loop parts, files."""
    if world.distributed:  # every rank works with rank 0's run directory (ranks > 0 ran Hydra in a scratch dir)
        run_dir = Path(world.broadcast_object(str(run_dir)))
    seed_everything(cfg.seed)
    bundle = create_data(cfg.data)
    model = build.build_model(cfg, num_classes=bundle.num_classes, in_chans=bundle.in_chans, img_size=bundle.img_size)
    labels = targets_of(bundle.train)
    if labels and (min(labels) < 0 or max(labels) >= model.num_classes):
        raise FixedclsError(
            f"labels run from {min(labels)} to {max(labels)} but the head has {model.num_classes} outputs: "
            f"set data.num_classes (or head.num_prototypes) to at least {max(labels) + 1}"
        )
    extra_loss = build.init_from_checkpoint(cfg, model, device)  # fine-tuning / feature distillation (CL2R)
    model.to(device)
    if cfg.trainer.channels_last:
        model.to(memory_format=torch.channels_last)
    meta = {"head": cfg.head.name, "num_classes": model.num_classes, "dim": model.dim,
            "backbone": cfg.model.backbone, "head_seed": cfg.head.seed}
    if world.is_main:
        log.info(f"{cfg.head.name} head on {cfg.model.backbone}, {cfg.data.name} ({bundle.num_classes} classes), "
                 f"d={model.dim}, {device} {choice(cfg.trainer.precision)}")
        log.info(format_param_summary(model))

    directory, resume_path = world.broadcast_object(
        ckpt.resolve(cfg.checkpoint.root, cfg.name, cfg.checkpoint.dir, cfg.resume, warn=log.warning)
        if world.is_main else None
    )
    resume_state = None
    if resume_path is not None:
        resume_state = ckpt.load(resume_path)
        check_resume_matches(resume_state, meta, resume_path)
        if world.is_main:
            log.info(f"resuming from {resume_path}")
    elif cfg.resume == "auto" and world.is_main:
        log.info(f"resume=auto: no checkpoint of {cfg.name} yet, starting a new run")

    train_loader, train_eval_loader, test_loader = create_loaders(
        bundle, batch_size=cfg.data.batch_size, eval_batch_size=cfg.data.eval_batch_size,
        num_workers=cfg.data.num_workers, seed=cfg.seed, rank=world.rank, world_size=world.world_size,
        pin_memory=device.type == "cuda",
    )
    optimizer = build.build_optimizer(cfg.optim, model)
    scheduler = build.build_scheduler(cfg.sched, optimizer, cfg.trainer.epochs)
    criterion = build.build_criterion(cfg, model)
    ema = build.build_ema(cfg, model)
    trained = model
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()) and device.type == "cuda":
            trained = torch.nn.SyncBatchNorm.convert_sync_batchnorm(trained)
        trained = DistributedDataParallel(trained, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.trainer.compile:
        trained = torch.compile(trained)

    resolved = build.plain_config(cfg)
    run_id = (resume_state or {}).get("meta", {}).get("tracker_run_id")
    tracker = create_tracker(cfg.logger, run_dir=run_dir, resolved_config=resolved, run_id=run_id, enabled=world.is_main)
    meta["tracker_run_id"] = tracker.run_id
    if resume_state is not None:
        tracker.resume(list(resume_state.get("history") or []))
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"run directory {run_dir}, checkpoints in {directory}")
    kind = "learned" if not model.head.is_fixed else "fixed"
    return TrainingRun(
        model=trained, train_loader=train_loader, train_eval_loader=train_eval_loader, test_loader=test_loader,
        optimizer=optimizer, scheduler=scheduler, criterion=criterion,
        checkpoints=build.build_checkpoints(cfg.checkpoint, directory, enabled=world.is_main),
        metrics=MetricsFile(run_dir, enabled=world.is_main), trainer=cfg.trainer, collapse=cfg.collapse,
        device=device, run_dir=run_dir, world=world, tracker=tracker, ema=ema, extra_loss=extra_loss,
        resume_state=resume_state, checkpoint_meta={"config": resolved, "meta": meta},
        title=f"{cfg.head.name} ({kind} head), {cfg.model.backbone}, {cfg.data.name}, seed {cfg.seed}",
        run_info={"run_dir": str(run_dir), "checkpoint_dir": str(directory), "head": cfg.head.name,
                  "head_kind": kind, "backbone": cfg.model.backbone, "data": cfg.data.name, "seed": cfg.seed},
    )


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
