"""A config becomes a training run: `build_training` builds every object it names, in the order a failure
should be found, and `train(cfg, run_dir)` fits it (`training.loop.fit`) and returns the summary with the
objects it built (`result.run`), so tests and benchmarks use them without patching anything.
"""
from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

import torch
from omegaconf import DictConfig

from ..config import validate_config
from ..data.datasets import IMAGE_FILE_DATASETS, create_data, describe_splits, targets_of
from ..data.imbalance import class_counts, class_groups
from ..data.loaders import create_eval_loader, create_loaders, stop_workers
from ..errors import FixedclsError
from ..models import classifier
from ..models.classifier import format_param_summary
from ..runs import checkpoints as ckpt
from ..runs import folders as runs
from ..runs import stored
from ..runs.identity import describe_differences, differences, run_identity
from ..runtime import autocast_for, choice, choose_threads, openmp_waiting, resolve_device, seed_everything
from ..tracking.factory import create_tracker
from ..tracking.run_files import MetricsFile
from . import factories
from .distributed import World, close_world, init_world
from .loop import TrainingRun, TrainResult, fit, recorded_keys
from .signals import TrainingInterrupted

log = logging.getLogger("fixedcls")


def check_same_experiment(state: dict, meta: dict, resolved: dict, identity: str, path: Path, how: str) -> None:
    """A checkpoint continues only the experiment it belongs to: the same identity, or (a checkpoint written
    before identities, or by a version with other keys) no covered key of its stored config differs. A model
    of another head, polytope or class count is named first (its weights cannot even load); either way the
    line names every config key that differs."""
    same = ckpt.meta_of(state).get("identity") == identity
    found = [] if same else differences(stored.plain_config(stored.stored_config(state, path)), resolved)
    listed = describe_differences(found)
    saved = ckpt.meta_of(state)
    for key in ("head", "num_classes", "dim", "backbone", "head_seed", "feature_bn"):
        if key in saved and saved[key] != meta[key]:
            raise FixedclsError(
                f"checkpoint {path} was trained with {key}={saved[key]} but this run has {key}={meta[key]}"
                + (f" (every key that differs: {listed})" if listed else "")
                + ": resume it with the same settings, or start a new run without resume"
            )
    if found:
        raise FixedclsError(
            f"{how}: this config differs from the checkpoint's ({listed}): to continue that run, use its values; "
            f"to start a new run from its weights, pass model.init_from={path} without resume"
        )


def format_preprocessing(preprocessing: dict) -> str:
    """One log line, e.g. ``preprocessing: 224px, bicubic, crop 0.95, mean [0.5, ...], std [...] (... from the model)``."""
    def values(v):
        return "[" + ", ".join(f"{x:.4g}" for x in v) + "]" if v else "default"

    p = preprocessing
    line = (f"preprocessing: {p['img_size']}px, {p['interpolation'] or 'bilinear'}, crop {p['crop_pct'] or 'default'}, "
            f"mean {values(p['mean'])}, std {values(p['std'])}")
    return line + (f" ({', '.join(p['from_model'])} from the model's data config)" if p["from_model"] else "")


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
        result = fit(run)
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
            stop_workers(run.train_loader, run.train_eval_loader, run.test_loader, run.val_loader)
            if exit_code and world.is_main:  # a run that failed before its first checkpoint leaves no empty folder
                runs.release_if_empty(run.checkpoints.directory)
        close_world(world)


PER_RANK_KEYS = ("data.root", "data.num_workers", "trainer.threads", "trainer.progress", "logger.", "checkpoint.",
                 "resume")


def shared_config(cfg: DictConfig) -> dict[str, str]:
    """The config every rank of a distributed run must share, flat (key -> JSON text)."""
    flat: dict[str, str] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        elif not (prefix[:-1] in PER_RANK_KEYS or prefix.startswith(PER_RANK_KEYS)):
            flat[prefix[:-1]] = json.dumps(node)

    walk(stored.plain_config(cfg), "")
    return flat


def build_training(cfg: DictConfig, run_dir: Path, world: World, device: torch.device) -> TrainingRun:
    """Every object of a run, in the order a failure should be found: data, model, resume, loop parts, files.

    Distributed: the ranks first check that they share one config; a failure on any rank stops every rank
    with the same line (World.fail_together, World.on_main) before the next collective could wait forever."""
    if world.distributed:
        world.check_same_config(shared_config(cfg))
        run_dir = Path(world.broadcast_object(str(run_dir)))  # ranks > 0 ran Hydra in a scratch dir
    with world.fail_together():
        seed_everything(cfg.seed)
        preprocessing = factories.resolve_preprocessing(cfg)  # a pretrained model's mean/std, crop, size: before the data
    resolved = stored.plain_config(cfg)
    identity, identity_keys = run_identity(resolved)
    with world.fail_together():
        bundle = create_data(cfg.data)
        best = factories.best_selection(cfg.checkpoint, recorded_keys(validation=bundle.val is not None, ema=cfg.trainer.ema,
                                                                  collapse=cfg.collapse))
        model = classifier.build_model(cfg, num_classes=bundle.num_classes, in_chans=bundle.in_chans, img_size=bundle.img_size)
        if cfg.trainer.freeze_backbone_epochs and not any(
                p.requires_grad for name, p in model.named_parameters() if not name.startswith("backbone.")):
            raise FixedclsError(
                f"trainer.freeze_backbone_epochs={cfg.trainer.freeze_backbone_epochs} would train nothing: the fixed head "
                f"sits right on the backbone (d = its width {model.dim}, so no projection): set model.dim to another d "
                f"(a projection then trains), or trainer.freeze_backbone_epochs=0")
        labels = targets_of(bundle.train)
        if labels and (min(labels) < 0 or max(labels) >= model.num_classes):
            raise FixedclsError(
                f"labels run from {min(labels)} to {max(labels)} but the head has {model.num_classes} outputs: "
                f"set data.num_classes (or head.num_prototypes) to at least {max(labels) + 1}"
            )
        train_counts = class_counts(labels, model.num_classes)
        groups = class_groups(train_counts, cfg.data.imbalance)
        extra_loss = factories.init_from_checkpoint(cfg, model, device)  # fine-tuning / feature distillation (CL2R)
        model.to(device)
        if cfg.trainer.channels_last:
            model.to(memory_format=torch.channels_last)
    meta = {"head": cfg.head.name, "num_classes": model.num_classes, "dim": model.dim,
            "backbone": cfg.model.backbone, "head_seed": cfg.head.seed, "identity": identity,
            "identity_keys": identity_keys, "preprocessing": preprocessing, "weights": model.weights_source,
            "feature_bn": bool(cfg.head.feature_bn)}
    # What using the model needs without its data (fixedcls.load): the built dim, not a None that means "natural".
    inference = {"class_names": [str(name) for name in bundle.class_names], "preprocessing": bundle.preprocessing,
                 "model": {**classifier.model_spec(cfg, num_classes=bundle.num_classes, in_chans=bundle.in_chans,
                                              img_size=bundle.img_size), "dim": int(model.dim)}}
    if world.is_main:
        log.info(f"{cfg.head.name} head on {cfg.model.backbone}, {cfg.data.name} ({bundle.num_classes} classes), "
                 f"d={model.dim}, {device} {choice(cfg.trainer.precision)}, {factories.describe_loss(cfg)}")
        log.info(format_param_summary(model))
        log.info(f"splits: {describe_splits(bundle)}; best.pt by {best[0]} ({best[1]})"
                 + ("; with no validation split (data.val_fraction=0) best.pt follows the test split, so best/test/acc "
                    "is chosen on the test images" if bundle.val is None and best[0].startswith("test/") else ""))
        if cfg.data.name in IMAGE_FILE_DATASETS or preprocessing["from_model"]:
            log.info(format_preprocessing(preprocessing))
        if choice(cfg.data.imbalance.type) != "none":
            log.info(f"long-tailed training split ({choice(cfg.data.imbalance.type)}, ratio {cfg.data.imbalance.ratio:g}): "
                     f"{train_counts} samples per class; many-shot {groups['many']}, medium {groups['medium']}, "
                     f"few-shot {groups['few']}")

    plan = world.on_main(
        lambda: runs.resolve(cfg.checkpoint.root, cfg.name, cfg.checkpoint.dir, cfg.resume, identity, warn=log.warning))
    with world.fail_together():
        resume_state, resume_path = None, plan.resume_path
        if resume_path is not None:
            resume_state = ckpt.load(resume_path)
            ckpt.check_resumable(resume_state, resume_path)
            how = f"resume={cfg.resume}" if cfg.resume != "auto" else f"resume=auto in checkpoint.dir={plan.directory}"
            check_same_experiment(resume_state, meta, resolved, identity, resume_path, how)
        branched_from = str(resume_path) if plan.branch_of is not None else ckpt.meta_of(resume_state or {}).get("branched_from")
        meta["branched_from"] = branched_from
        threads, threads_why = choose_threads(cfg.trainer.threads, ckpt.meta_of(resume_state or {}).get("threads"))
        meta["threads"] = threads
        if world.is_main:
            log.info(f"threads: {threads} ({threads_why}){openmp_waiting()}")
        train_loader, train_eval_loader, test_loader = create_loaders(
            bundle, batch_size=cfg.data.batch_size, eval_batch_size=cfg.data.eval_batch_size,
            num_workers=cfg.data.num_workers, seed=cfg.seed, rank=world.rank, world_size=world.world_size,
            pin_memory=device.type == "cuda",
        )
        val_loader = None if bundle.val is None else create_eval_loader(
            bundle.val, eval_batch_size=cfg.data.eval_batch_size, num_workers=cfg.data.num_workers, seed=cfg.seed,
            rank=world.rank, world_size=world.world_size, pin_memory=device.type == "cuda")
        optimizer = factories.build_optimizer(cfg.optim, model)
        if resume_state is not None:
            factories.check_resume_fits(resume_state, resume_path, model, optimizer)
        scheduler = factories.build_scheduler(cfg.sched, optimizer, cfg.trainer.epochs)
        criterion = factories.build_criterion(cfg, model, class_counts=train_counts)
        mixup = factories.build_mixup(cfg, model.num_classes)
        ema = factories.build_ema(cfg, model)
    trained = model
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()) and device.type == "cuda":
            trained = torch.nn.SyncBatchNorm.convert_sync_batchnorm(trained)
        trained = DistributedDataParallel(trained, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.trainer.compile:
        trained = torch.compile(trained)

    # The folder is claimed once everything that can refuse the run has been built.
    def claim() -> str:
        directory = plan.claim({"identity": identity, "name": str(cfg.name), "branched_from": branched_from})
        if plan.loose:
            runs.start_branch(directory, resume_path, resume_state, best[0], siblings=False)
            log.info(f"resuming from {resume_path}, which is not in a run folder of its own (no run.json of its "
                     f"identity beside it): continuing in a new folder {directory} (nothing in {plan.branch_of} is written)")
        elif plan.branch_of is not None:
            runs.start_branch(directory, resume_path, resume_state, best[0])
            log.info(f"resuming from {resume_path}, older than the newest state of {plan.branch_of}: a new branch in "
                     f"{directory} (the files of {plan.branch_of} stay as they are)")
        elif resume_path is not None:
            log.info(f"resuming from {resume_path}")
        elif cfg.resume == "auto":
            log.info(f"resume=auto: no run of {cfg.name} with identity {identity[:8]} yet, starting a new run")
        return str(directory)

    directory = Path(world.on_main(claim))
    # A branch is a run of its own for the tracker too; a continued run keeps its tracker run.
    run_id = None if plan.branch_of is not None else ckpt.meta_of(resume_state or {}).get("tracker_run_id")
    with world.fail_together():  # only rank 0 starts a tracker and makes the run directory
        tracker = create_tracker(cfg.logger, run_dir=run_dir, resolved_config=resolved, run_id=run_id, enabled=world.is_main)
        if world.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
    meta["tracker_run_id"] = tracker.run_id
    if resume_state is not None:
        tracker.resume(list(resume_state.get("history") or []))
    if world.is_main:
        log.info(f"run directory {run_dir}, checkpoints in {directory}")
    kind = "learned" if not model.head.is_fixed else "fixed"
    return TrainingRun(
        model=trained, train_loader=train_loader, train_eval_loader=train_eval_loader, test_loader=test_loader,
        optimizer=optimizer, scheduler=scheduler, criterion=criterion,
        checkpoints=factories.build_checkpoints(cfg.checkpoint, directory, enabled=world.is_main, best=best),
        metrics=MetricsFile(run_dir, enabled=world.is_main), trainer=cfg.trainer, collapse=cfg.collapse,
        device=device, run_dir=run_dir, world=world, tracker=tracker, ema=ema, extra_loss=extra_loss, mixup=mixup,
        resume_state=resume_state, checkpoint_meta={"config": resolved, "meta": meta, "inference": inference},
        title=f"{cfg.head.name} ({kind} head), {cfg.model.backbone}, {cfg.data.name}, seed {cfg.seed}",
        run_info={"run_dir": str(run_dir), "checkpoint_dir": str(directory), "head": cfg.head.name,
                  "head_kind": kind, "backbone": cfg.model.backbone, "data": cfg.data.name, "seed": cfg.seed,
                  "identity": identity, "identity_keys": identity_keys, "branched_from": branched_from,
                  "data/train_class_counts": train_counts, "data/class_groups": groups, "threads": threads,
                  **factories.loss_settings(cfg)},
        val_loader=val_loader,
        class_groups=groups,
    )
