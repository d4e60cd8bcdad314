"""fixedcls-train: the Hydra entry point.

`main` (the console script) lets Hydra compose the config; `train(cfg, run_dir)` builds the objects
the config names and hands them to `engine.fit`. Tests call `train` directly with a composed config.
"""
from __future__ import annotations

import logging
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from . import checkpoint as ckpt
from .config import Config, conf_dir, register_configs
from .data import create_data, create_loaders, targets_of
from .distributed import World, close_world, init_world, worker_hydra_args
from .engine import CollapseSettings, TrainingInterrupted, autocast_for, fit, resolve_device
from .errors import FixedclsError
from .heads import create_criterion
from .loggers import MetricsFile, create_tracker
from .model import create_model, format_param_summary

log = logging.getLogger("fixedcls")
register_configs()
FAILED_JOBS: list[str] = []


def plain_config(cfg: DictConfig) -> dict:
    """The resolved config as plain containers (safe to store in a weights_only checkpoint)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _choice(value) -> str:
    return value.value if hasattr(value, "value") else str(value)


def build_optimizer(cfg, model):
    from timm.optim import create_optimizer_v2, list_optimizers

    if cfg.name not in list_optimizers():
        raise FixedclsError(f"unknown optimizer optim.name='{cfg.name}': choose sgd, adamw, adam, lamb, lion, ... "
                            f"(any of timm.optim.list_optimizers())")
    return create_optimizer_v2(model, opt=cfg.name, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)


def build_checkpoints(cfg, directory: Path, *, enabled: bool = True) -> ckpt.CheckpointWriter:
    """The checkpoint writer of `checkpoint.*` (close() it when done: it may own a writer thread)."""
    return ckpt.CheckpointWriter(directory, keep=cfg.keep, best_metric=cfg.best_metric, enabled=enabled,
                                 background=cfg.background)


def build_scheduler(cfg, optimizer, epochs: int):
    from timm.scheduler import create_scheduler_v2

    if cfg.name in ("none", "constant"):
        return None
    try:
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=cfg.name, num_epochs=epochs, warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
            min_lr=cfg.min_lr, decay_epochs=cfg.decay_epochs, decay_rate=cfg.decay_rate,
        )
    except (AssertionError, ValueError, KeyError) as error:
        raise FixedclsError(f"unknown scheduler sched.name='{cfg.name}': choose cosine, step, multistep, plateau, poly, tanh or none") from error
    if scheduler is None:
        raise FixedclsError(f"unknown scheduler sched.name='{cfg.name}': choose cosine, step, multistep, plateau, poly, tanh or none")
    return scheduler


def build_model(cfg, bundle, *, pretrained: Optional[bool] = None):
    """The Classifier a config describes, sized for the data bundle."""
    return create_model(
        cfg.model.backbone, cfg.head.name, bundle.num_classes, dim=cfg.model.dim,
        pretrained=cfg.model.pretrained if pretrained is None else pretrained,
        in_chans=bundle.in_chans, img_size=bundle.img_size, drop_rate=cfg.model.drop_rate,
        normalize=_choice(cfg.head.normalize), scale=cfg.head.scale, learn_scale=cfg.head.learn_scale,
        bias=cfg.head.bias, seed=cfg.head.seed, num_prototypes=cfg.head.num_prototypes,
    )


def load_trained(path: str | Path, *, data_overrides: Optional[dict] = None):
    """Rebuild a trained model from a checkpoint alone: (model in eval mode, its config, its data bundle).

    The checkpoint holds the resolved config, so the same backbone, head and data are built again;
    `data_overrides` (e.g. {"root": ...}) adapt the data section to this machine.
    """
    state = ckpt.load(path)
    if "config" not in state:
        raise FixedclsError(f"checkpoint {path} holds no config: it was not written by fixedcls-train")
    cfg = OmegaConf.merge(OmegaConf.structured(Config), state["config"])
    if data_overrides:
        cfg.data = OmegaConf.merge(cfg.data, data_overrides)
    bundle = create_data(cfg.data)
    model = build_model(cfg, bundle, pretrained=False)
    model.load_state_dict(state["model"])
    return model.eval(), cfg, bundle


def check_resume_matches(state: dict, meta: dict, path: Path) -> None:
    """A checkpoint from another head, polytope or class count cannot continue this run."""
    saved = state.get("meta", {})
    for key in ("head", "num_classes", "dim", "backbone", "head_seed"):
        if key in saved and saved[key] != meta[key]:
            raise FixedclsError(
                f"checkpoint {path} was trained with {key}={saved[key]} but this run has {key}={meta[key]}: "
                f"resume it with the same settings, or start a new run without resume"
            )


def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Build everything `cfg` names and train. Returns the run summary (also written to summary.json)."""
    run_dir = Path(run_dir)
    device = resolve_device(_choice(cfg.trainer.device))
    precision = _choice(cfg.trainer.precision)
    autocast_for(device, precision)  # fail now on an impossible precision, not after building the model
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    world = init_world(device.type)
    if world.distributed and device.type == "cuda":
        device = torch.device("cuda", world.device_index)
    if world.distributed:  # every rank works with rank 0's run directory (ranks > 0 ran Hydra in a scratch dir)
        run_dir = Path(world.broadcast_object(str(run_dir)))
    tracker = checkpoints = None
    exit_code = 1
    try:
        seed_everything(cfg.seed)
        bundle = create_data(cfg.data)
        model = build_model(cfg, bundle)
        labels = targets_of(bundle.train)
        if labels and (min(labels) < 0 or max(labels) >= model.num_classes):
            raise FixedclsError(
                f"labels run from {min(labels)} to {max(labels)} but the head has {model.num_classes} outputs: "
                f"set data.num_classes (or head.num_prototypes) to at least {max(labels) + 1}"
            )
        extra_loss = None
        if cfg.model.init_from or cfg.trainer.distill_weight:  # fine-tuning / feature distillation (CL2R)
            from .compat import prepare_init

            extra_loss = prepare_init(cfg, model, device)
        model.to(device)
        if cfg.trainer.channels_last:
            model.to(memory_format=torch.channels_last)
        meta = {"head": cfg.head.name, "num_classes": model.num_classes, "dim": model.dim,
                "backbone": cfg.model.backbone, "head_seed": cfg.head.seed}
        if world.is_main:
            log.info(f"{cfg.head.name} head on {cfg.model.backbone}, {cfg.data.name} ({bundle.num_classes} classes), "
                     f"d={model.dim}, {device} {precision}")
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
        optimizer = build_optimizer(cfg.optim, model)
        scheduler = build_scheduler(cfg.sched, optimizer, cfg.trainer.epochs)
        criterion = create_criterion(cfg.trainer.loss, model.head, label_smoothing=cfg.trainer.label_smoothing)
        ema = None
        if cfg.trainer.ema:
            from timm.utils import ModelEmaV3

            ema = ModelEmaV3(model, decay=cfg.trainer.ema_decay)
        trained = model
        if world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()) and device.type == "cuda":
                trained = torch.nn.SyncBatchNorm.convert_sync_batchnorm(trained)
            trained = DistributedDataParallel(trained, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.trainer.compile:
            trained = torch.compile(trained)

        resolved = plain_config(cfg)
        run_id = (resume_state or {}).get("meta", {}).get("tracker_run_id")
        tracker = create_tracker(cfg.logger, run_dir=run_dir, resolved_config=resolved, run_id=run_id, enabled=world.is_main)
        meta["tracker_run_id"] = tracker.run_id
        if world.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            log.info(f"run directory {run_dir}, checkpoints in {directory}")
        kind = "learned" if not model.head.is_fixed else "fixed"
        checkpoints = build_checkpoints(cfg.checkpoint, directory, enabled=world.is_main)
        summary = fit(
            trained,
            train_loader=train_loader, train_eval_loader=train_eval_loader, test_loader=test_loader,
            optimizer=optimizer, scheduler=scheduler, criterion=criterion, epochs=cfg.trainer.epochs, extra_loss=extra_loss,
            device=device, run_dir=run_dir,
            checkpoints=checkpoints,
            metrics=MetricsFile(run_dir, enabled=world.is_main), tracker=tracker, precision=precision,
            grad_accum=cfg.trainer.grad_accum, clip_grad=cfg.trainer.clip_grad, ema=ema,
            max_nonfinite=cfg.trainer.max_nonfinite, channels_last=cfg.trainer.channels_last,
            collapse=CollapseSettings(
                every=cfg.collapse.every, mode=_choice(cfg.collapse.mode), splits=tuple(cfg.collapse.splits),
                max_samples=cfg.collapse.max_samples, layers=tuple(cfg.collapse.layers),
                thresholds=dict(cfg.collapse.thresholds), plot=cfg.collapse.plot,
            ),
            world=world, resume_state=resume_state,
            checkpoint_meta={"config": resolved, "meta": meta},
            progress=cfg.trainer.progress,
            title=f"{cfg.head.name} ({kind} head), {cfg.model.backbone}, {cfg.data.name}, seed {cfg.seed}",
            run_info={"run_dir": str(run_dir), "checkpoint_dir": str(directory), "head": cfg.head.name,
                      "head_kind": kind, "backbone": cfg.model.backbone, "data": cfg.data.name, "seed": cfg.seed},
        )
        exit_code = 0
        return summary
    finally:
        if tracker is not None:
            try:
                tracker.finish(exit_code)
            except Exception as error:  # a tracker can only warn: the run and its checkpoints are already safe
                log.warning(f"warning: the tracker's finish failed ({type(error).__name__}: {error})")
        if checkpoints is not None:
            checkpoints.close()
        close_world(world)


def _run_mode() -> Optional[RunMode]:
    try:
        return HydraConfig.get().mode
    except ValueError:
        return None


def _stop_after_interrupt(error: TrainingInterrupted) -> None:
    """Leave as the signal asked; a launcher's own SIGUSR1/SIGUSR2 handler (submitit's requeue: USR2 by
    default since submitit 1.5, SUBMITIT_PREEMPT_SIGNAL) runs after our save."""
    print(f"fixedcls: {error}", file=sys.stderr)
    previous = signal.getsignal(error.signum)
    if callable(previous) and error.signum in (getattr(signal, "SIGUSR1", None), getattr(signal, "SIGUSR2", None)):
        previous(error.signum, None)
    sys.exit(128 + error.signum)


def run_job(task: Callable[[], Any], *, prog: str = "fixedcls") -> Any:
    """Run one Hydra job so that a user error is one line: exit 2, or, in a multirun, a recorded failure
    that lets the other jobs run (`exit_if_jobs_failed` reports them at the end)."""
    try:
        return task()
    except FixedclsError as raised:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        error = str(raised)
        if "Original Traceback" in error and "FixedclsError: " in error:  # re-raised from a DataLoader worker
            error = error.rsplit("FixedclsError: ", 1)[1]
        if _run_mode() == RunMode.MULTIRUN:
            job = HydraConfig.get().job
            FAILED_JOBS.append(f"job {job.num} ({job.override_dirname or 'defaults'}): {error}")
            print(f"{prog}: error in job {job.num}: {error}", file=sys.stderr)
            return None
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(2)
    except TrainingInterrupted as error:
        _stop_after_interrupt(error)


def exit_if_jobs_failed(prog: str = "fixedcls") -> None:
    if FAILED_JOBS:
        print(f"{prog}: {len(FAILED_JOBS)} job(s) failed:", file=sys.stderr)
        for line in FAILED_JOBS:
            print(f"  {line}", file=sys.stderr)
        sys.exit(1)


# An absolute path: a relative one would be read against the module's package (or as a package `conf`),
# which fails outside the repository root; conf_dir() finds the installed copy as well as the repository's.
@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def hydra_main(cfg: DictConfig):
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    return run_job(lambda: train(cfg, run_dir).get("final/test/acc"))


def check_overrides(args: list[str]) -> Optional[str]:
    """One line naming the first command-line override that cannot work, or None (then Hydra takes over).

    Plain `key=value` overrides are checked against the schema (fixedcls/config.py): an unknown key gets a
    "did you mean", a value of the wrong type or enum the allowed values, a config group an option that
    exists in conf/. `+key=`, `++key=`, `~key`, `hydra.*`, packages (`key@pkg=`), Hydra's flags and their
    arguments (`-sc install=bash`, `--cfg job`), and anything this check does not understand are left to Hydra,
    whose own errors still apply.
    """
    import contextlib
    import difflib
    import io

    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType, ValueType
    from omegaconf import ListConfig

    try:  # Hydra's own command-line parser, so that only what Hydra takes as overrides is checked
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            command = get_args_parser().parse_args(list(args))
    except SystemExit:
        return None  # a malformed flag, or --version: Hydra's parser answers when it runs
    if command.shell_completion:
        return None  # `-sc install=bash` / `-sc query=bash`: the words after -sc are completion commands
    args = command.overrides
    groups_dir = conf_dir()
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
        if (groups_dir / key).is_dir():  # a config group: head=, data=, optim=, ...
            if own_search_path:
                continue  # -cd / -cp / -cn can bring options of their own: Hydra checks the choice
            options = sorted(p.stem for p in (groups_dir / key).glob("*.yaml"))
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
    return None


def main() -> None:
    try:
        problem = check_overrides(sys.argv[1:])
    except Exception:  # the check must never stand in the way: Hydra validates again
        problem = None
    if problem is not None:
        print(f"fixedcls: error: {problem}", file=sys.stderr)
        sys.exit(2)
    with worker_hydra_args(sys.argv):  # ranks > 0 of a torchrun/srun launch make no Hydra run dir of their own
        hydra_main()
    exit_if_jobs_failed()


if __name__ == "__main__":
    main()
