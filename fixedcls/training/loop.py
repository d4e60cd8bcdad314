"""The training loop: `fit` runs epochs of `train_one_epoch`, then `end_of_epoch` (evaluate, measure, log,
checkpoint), and returns the run's summary.

Everything it needs arrives built in a `TrainingRun` (train.py builds one from the Hydra config; a test or
a benchmark can build one by hand), and where the run stands is a `LoopState`, which is exactly what a
checkpoint restores.
"""
from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from .. import collapse as nc
from ..collapse import report as collapse_report
from ..collapse.minority import MINORITY_KEYS
from ..data.imbalance import class_accuracy, class_accuracy_row
from ..errors import CheckpointWriteError, FixedclsError
from ..runs.checkpoints import CheckpointWriter, is_better
from ..runtime import AUTOCAST_DTYPES, autocast_for, choice, rng_state, set_rng_state, split_rng, unwrap
from ..tracking.base import Tracker
from ..tracking.run_files import MetricsFile, write_summary
from .distributed import World
from .signals import StopSignals, TrainingInterrupted

log = logging.getLogger("fixedcls")


@dataclass
class TrainingRun:
    """Everything `fit` needs.  `trainer` and `collapse` are the config sections of the same names (any
    object with their attributes); `model` is what trains: the Classifier, or its DDP / compiled wrapper."""

    model: nn.Module
    train_loader: Any
    train_eval_loader: Any
    test_loader: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    criterion: Callable
    checkpoints: CheckpointWriter
    metrics: MetricsFile
    trainer: Any
    collapse: Any
    device: torch.device
    run_dir: Path
    world: World = field(default_factory=World)
    tracker: Tracker = field(default_factory=Tracker)
    ema: Optional[nn.Module] = None
    # (x, features, y) -> a term added to the criterion's loss; one with a `criterion_weight` attribute also weighs
    # the criterion (HOC: lambda CE + (1 - lambda) HOC)
    extra_loss: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = None
    mixup: Optional[Callable] = None  # timm Mixup: (x, y) -> (mixed x, soft targets [B, K])
    resume_state: Optional[dict] = None
    checkpoint_meta: dict = field(default_factory=dict)  # stored in every checkpoint: config, meta
    title: str = ""
    run_info: dict = field(default_factory=dict)  # copied into the summary
    val_loader: Any = None  # the validation split (model selection), or None
    # many/medium/few classes by training count (fixedcls.imbalance.class_groups): the group accuracies of
    # every evaluated split, and the minority (few) and majority (many) of the minority-collapse measures
    class_groups: dict = field(default_factory=dict)
    ood_loader: Any = None  # collapse.ood's samples (nc5); fit builds it from checkpoint_meta when None


@dataclass
class LoopState:
    """Where a run stands; a checkpoint stores it and `restore` puts it back."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    history: list = field(default_factory=list)
    running: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))  # loss sum, correct, samples
    nonfinite_in_a_row: int = 0
    epoch_seconds: list = field(default_factory=list)
    class_accuracy: dict = field(default_factory=dict)  # split -> per-class accuracy of the latest evaluation

    def restore(self, state: dict, device: torch.device) -> None:
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.history = state["global_step"], list(state["history"])
        self.running = state["running"].to(device=device, dtype=torch.float64)
        self.nonfinite_in_a_row = state.get("nonfinite_in_a_row", 0)


class TrainResult(dict):
    """The run summary (a dict, as written to summary.json), with `.history`: its metrics rows, and `.run`: the
    TrainingRun that produced it (set by `assemble.train`)."""

    history: list = []
    run: Optional[TrainingRun] = None


def recorded_keys(*, validation: bool, ema: bool, collapse) -> list[str]:
    """The keys of the metrics rows `end_of_epoch` writes for a run of these settings (collapse keys on the
    epochs collapse is measured; `layer<i>` keys with collapse.layers)."""
    keys = ["train/loss", "train/acc"] + (["val/loss", "val/acc"] if validation else []) + ["test/loss", "test/acc", "lr"]
    for split in (["val"] if validation else []) + ["test"]:  # per_class_row: every evaluated split
        keys += [f"{split}/balanced_acc"] + [f"{split}/acc_{group}" for group in ("many", "medium", "few")]
    if ema:
        keys += ["test/loss_ema", "test/acc_ema"]
    if collapse.every > 0:
        for split, prefix in (("train", "collapse/"), ("test", "collapse_test/")):
            if split in collapse.splits:
                keys += [prefix + key for key in nc.METRIC_KEYS + nc.EXTRA_KEYS + MINORITY_KEYS]
                keys += [prefix + key for key in nc.OOD_KEYS] if getattr(collapse, "ood", None) else []
                if collapse.layers:
                    keys += [f"{prefix}layer<i>/{key}" for key in nc.NC1_KEYS]
    if collapse.agop.layers:
        keys += [f"agop/layer<i>/{key}" for key in ("nfa_corr", "nfa_corr_sqrt", "linear_share")]
    return keys


def collapse_due(settings, epoch: int, epochs: int) -> bool:
    return settings.every > 0 and ((epoch + 1) % settings.every == 0 or epoch + 1 == epochs)


def fit(run: TrainingRun) -> TrainResult:
    """Train for `trainer.epochs`, evaluate and measure collapse after each epoch, checkpoint, return the summary."""
    model, world, device = unwrap(run.model), run.world, run.device
    precision = choice(run.trainer.precision)
    autocast = autocast_for(device, precision)
    scaler = torch.amp.GradScaler(device.type, enabled=(precision == "fp16"))
    online = None
    if run.collapse.every > 0 and choice(run.collapse.mode) == "online":
        online = {split: nc.OnlineCollapse(model.num_classes, model.dim, device) for split in ("train", "test")}

    if run.collapse.every > 0 and getattr(run.collapse, "ood", None) and run.ood_loader is None:
        from ..inference.ood import ood_loader_of_run  # before the first epoch: a source that cannot be read fails now

        run.ood_loader, source = ood_loader_of_run(run.collapse.ood, run.checkpoint_meta, world=world)
        if world.is_main:
            log.info(f"collapse.ood: {source}, measured with each collapse measurement (nc5)")
    loop = LoopState(running=torch.zeros(3, dtype=torch.float64, device=device))
    if run.resume_state is not None:
        _restore(run, loop, model, scaler, online)
    else:
        split_rng(world.rank)
    _tolerate("writing metrics.jsonl", run.metrics.reset, loop.history)

    def online_state(accumulator, mid_epoch: bool) -> dict:
        """An online accumulator with the epoch's partial sums of every rank (summed: one rank restores them);
        at an epoch's end the shifts alone, since the next epoch starts from empty sums (no collective then)."""
        if not mid_epoch:
            return accumulator.state_dict(with_sums=False)
        sums = [t.clone() for t in accumulator.state_tensors()]
        world.all_reduce_sum(sums)
        return accumulator.state_dict(sums)

    def snapshot(mid_epoch: bool) -> dict:
        """The checkpoint of this moment (every rank's RNG gathered when distributed)."""
        rng_ranks = world.all_gather_object(rng_state()) if world.distributed else None
        return {
            "model": model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
            "scaler": scaler.state_dict(), "ema": run.ema.state_dict() if run.ema is not None else None,
            "epoch": loop.epoch, "step_in_epoch": loop.step_in_epoch if mid_epoch else 0,
            "global_step": loop.global_step, "history": loop.history, "running": loop.running.cpu(),
            "nonfinite_in_a_row": loop.nonfinite_in_a_row,  # best_value: set by the checkpoint writer, which owns it
            **{f"online_{split}": online_state(online[split], mid_epoch) if online else None for split in ("train", "test")},
            "rng": rng_state(), "rng_ranks": rng_ranks, **run.checkpoint_meta,
        }

    run.model.train()
    stopped = False
    # Background checkpoint writes end before fit returns or raises (a stop, a crash, non-finite weights).
    with StopSignals() as stop, run.checkpoints.finish_writes():
        while loop.epoch < run.trainer.epochs:
            train_seconds = train_one_epoch(run, loop, scaler, autocast, stop, snapshot,
                                            online=online["train"] if online else None)
            end_of_epoch(run, loop, autocast, snapshot, train_seconds, online)
            # Two failed checkpoint writes in a row (a full disk): every rank stops, with the summary written.
            if world.any(run.checkpoints.stop_reason is not None, device):
                stopped = True
                break
    result = TrainResult(finish(run, loop))
    result.history = loop.history
    failure = run.checkpoints.failure() if run.checkpoints.enabled else None
    if failure is not None or stopped:
        raise CheckpointWriteError(failure or "rank 0 could not write two checkpoints in a row: stopped", result)
    return result


def _restore(run: TrainingRun, loop: LoopState, model: nn.Module, scaler, online) -> None:
    state, world = run.resume_state, run.world
    model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scheduler is not None and state.get("scheduler"):
        run.scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state.get("scaler") or scaler.state_dict())
    if run.ema is not None and state.get("ema"):
        run.ema.load_state_dict(state["ema"])
    loop.restore(state, run.device)
    run.checkpoints.best_value, run.checkpoints.best_epoch = state.get("best_value"), state.get("best_epoch")
    for split, acc in (online or {}).items():
        if state.get(f"online_{split}"):
            acc.load_state_dict(state[f"online_{split}"], with_sums=world.rank == 0)
    per_rank = state.get("rng_ranks") or []
    if len(per_rank) == world.world_size:
        set_rng_state(per_rank[world.rank])
    else:  # a checkpoint of another world size: rank 0's state, then a stream of each rank's own
        set_rng_state(state["rng"])
        split_rng(world.rank)
    steps = math.ceil(run.train_loader.sampler.num_samples / run.train_loader.batch_size)
    log.info(f"resumed at epoch {loop.epoch + 1} step {loop.step_in_epoch} of {steps}")


def train_one_epoch(run: TrainingRun, loop: LoopState, scaler, autocast, stop: StopSignals,
                    snapshot: Callable[[bool], dict], online=None) -> float:
    """One epoch of optimizer steps from where `loop` stands; returns its seconds.  A stop signal saves the
    state at the next update and raises TrainingInterrupted."""
    model, base, loader, world, device, trainer = run.model, unwrap(run.model), run.train_loader, run.world, run.device, run.trainer
    grad_accum, directory = trainer.grad_accum, run.checkpoints.directory
    steps_per_epoch = math.ceil(loader.sampler.num_samples / loader.batch_size)
    # The sampler hands each index over with this epoch (loaders.EpochIndex), so persistent workers augment for it.
    loader.sampler.set_epoch(loop.epoch, start=loop.step_in_epoch * loader.batch_size)
    if online is not None and loop.step_in_epoch == 0:
        online.reset()
    finite_buffers = _finite_buffers(base)
    frozen = _freeze_backbone(run, base, loop.epoch < getattr(trainer, "freeze_backbone_epochs", 0))
    started = time.perf_counter()
    bar = _progress_bar(run, steps_per_epoch, loop.step_in_epoch, f"epoch {loop.epoch + 1}/{trainer.epochs}")
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if trainer.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x, targets, mixed = _mix(run.mixup, x, y)
        update_now = (loop.step_in_epoch + 1) % grad_accum == 0 or loop.step_in_epoch + 1 == steps_per_epoch
        sync = contextlib.nullcontext() if update_now or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast():
                logits, features = model(x, return_features=True)
                loss = run.criterion(logits.float(), targets)
                if run.extra_loss is not None:  # e.g. feature distillation from an earlier model generation
                    loss = getattr(run.extra_loss, "criterion_weight", 1.0) * loss + run.extra_loss(x, features, y)
            # Every rank must agree: a rank that skipped backward alone would leave the others waiting in DDP's all-reduce.
            finite_here = bool(torch.isfinite(loss))
            finite = not world.any(not finite_here, device)
            if finite or scaler.is_enabled():  # the fp16 scaler skips the step itself on inf/nan
                scaler.scale(loss / grad_accum).backward()
        if not finite:  # counted under the fp16 scaler too: it skips steps, but cannot mend a NaN forward
            loop.nonfinite_in_a_row = _count_skipped_step(
                loop, trainer.max_nonfinite, f"the loss was non-finite ({loss.item() if not finite_here else 'on another rank'})",
                directory, "lower optim.lr or set trainer.clip_grad")
        grads_finite = True
        if not finite and not scaler.is_enabled():
            run.optimizer.zero_grad(set_to_none=True)  # skip this step (the scaler does so itself)
        elif update_now:
            for param in frozen:  # no gradient: no step, no weight decay, no momentum (and DDP still all-reduces)
                param.grad = None
            grads_finite = _optimizer_step(run, loop, scaler, base)
        if finite and grads_finite and update_now:  # a clean update ends a run of skipped steps
            loop.nonfinite_in_a_row = 0
        if finite:
            # A mixed sample counts as right when the prediction is its target's largest share.
            truth = targets.argmax(1) if targets.ndim == 2 else y
            loop.running += torch.stack([loss.detach().double() * len(y), (logits.argmax(1) == truth).sum().double(),
                                         torch.tensor(len(y), dtype=torch.float64, device=device)])
            if online is not None and not mixed:  # a mixed image belongs to no class: collapse skips it
                online.update(features.detach(), y, logits.detach())
        loop.step_in_epoch += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if update_now and world.any(stop.received is not None, device):
            if bar is not None:
                bar.close()
            healthy = _finite_weights(base, finite_buffers)  # non-finite weights never displace a good last.pt
            state = snapshot(True)
            path = run.checkpoints.save_interrupted(state) if world.is_main and healthy else None
            world.barrier()
            raise TrainingInterrupted(stop.received or signal.SIGTERM, path)
    if bar is not None:
        bar.close()
    world.all_reduce_sum([loop.running])
    world.broadcast_buffers(base, run.ema)  # one set of BN statistics (rank 0's, the checkpointed one) for eval
    if not _finite_weights(base, finite_buffers):
        raise FixedclsError(
            f"the weights became non-finite (inf or NaN) in epoch {loop.epoch + 1}; stopped before checkpointing "
            f"them, with the last good checkpoint kept in {directory}: lower optim.lr or set trainer.clip_grad"
        )
    return time.perf_counter() - started


def _mix(mixup, x: torch.Tensor, y: torch.Tensor):
    """(x, targets, mixed): timm's Mixup makes soft targets [B, K].  It pairs a batch with its reverse, so an
    odd-sized batch (an epoch's last) is left unmixed, its targets smoothed as Mixup's are."""
    if mixup is None:
        return x, y, False
    if len(y) % 2 == 0:
        mixed_x, soft = mixup(x, y)
        return mixed_x, soft, True
    from timm.data.mixup import mixup_target

    return x, mixup_target(y, mixup.num_classes, lam=1.0, smoothing=mixup.label_smoothing), False


def _freeze_backbone(run: TrainingRun, base: nn.Module, freeze: bool) -> list:
    """trainer.freeze_backbone_epochs: hold the backbone still (its BatchNorm statistics too), so only the
    projection and head train; returns the parameters whose gradients the optimizer must not see.

    Alone, the backbone stops needing gradients (backward ends at the projection); under DDP, whose reducer
    fixes the trained parameters when it wraps the model, the gradients are computed and dropped instead."""
    if not getattr(run.trainer, "freeze_backbone_epochs", 0):
        return []
    backbone = base.backbone
    backbone.train(not freeze and run.model.training)
    if not run.world.distributed:
        backbone.requires_grad_(not freeze)
    return list(backbone.parameters()) if freeze else []


def _optimizer_step(run: TrainingRun, loop: LoopState, scaler, base: nn.Module) -> bool:
    """Clip, step, EMA-update and zero the gradients; returns whether the gradients were finite (else the step
    is skipped and counted)."""
    grads_finite = True
    if run.trainer.clip_grad is not None:
        scaler.unscale_(run.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.trainer.clip_grad)
        # An overflowed norm scales every gradient by 0 (inf * 0 = NaN): skip, as fp16's scaler does.
        grads_finite = scaler.is_enabled() or bool(torch.isfinite(grad_norm))
    if grads_finite:
        scaler.step(run.optimizer)
        scaler.update()
    else:
        loop.nonfinite_in_a_row = _count_skipped_step(
            loop, run.trainer.max_nonfinite, f"the gradient norm was non-finite ({float(grad_norm)})",
            run.checkpoints.directory, "lower optim.lr, or train in fp32")
    run.optimizer.zero_grad(set_to_none=True)
    loop.global_step += 1
    if run.ema is not None and grads_finite:
        # timm's step counts the updates made, this one included (as in timm's train.py): its first update
        # copies the weights, and each later one averages; the count before this update would copy twice.
        run.ema.update(base, step=loop.global_step)
    return grads_finite


@torch.no_grad()
def evaluate(model: nn.Module, loader, criterion: Callable, *, device: torch.device, autocast, world: World,
             channels_last: bool = False, online=None, collapse_means=None, collapse_cache=None) -> dict:
    """Loss and accuracy over a loader (summed across processes); optionally feeds an online collapse estimate,
    and pass 1 (class means) of an exact `collapse.CollapseAccumulator` with the same forward, whose outputs
    `collapse_cache` (a `collapse.FeatureCache`) keeps for pass 2.
    Returns loss, acc, and class_correct / class_count (lists over the head's outputs)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    per_class = torch.zeros(2, unwrap(model).num_classes, dtype=torch.float64, device=device)  # correct, count
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits, features = model(x, return_features=True)
            loss = criterion(logits.float(), y)
        hits = logits.argmax(1) == y
        totals += torch.stack([loss.double() * len(y), hits.sum().double(), torch.tensor(len(y), dtype=torch.float64, device=device)])
        per_class[0].index_add_(0, y, hits.double())
        per_class[1].index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        if online is not None:
            online.update(features.detach(), y, logits.detach())
        if collapse_means is not None:
            collapse_means.update_means(features.detach(), y)
        if collapse_cache is not None:
            collapse_cache.add(features, y, logits)
    world.all_reduce_sum([totals, per_class])
    model.train(was_training)
    loss_sum, correct, count = totals.tolist()
    return {"loss": loss_sum / max(count, 1), "acc": correct / max(count, 1),
            "class_correct": per_class[0].tolist(), "class_count": per_class[1].tolist()}


def per_class_row(run: TrainingRun, loop: LoopState, split: str, result: dict) -> dict:
    """`<split>/balanced_acc` and `<split>/acc_many|medium|few` of an `evaluate` result; keeps the per-class
    accuracies for the summary."""
    loop.class_accuracy[split] = class_accuracy(result["class_correct"], result["class_count"])
    return class_accuracy_row(split, result["class_correct"], result["class_count"], run.class_groups)


def end_of_epoch(run: TrainingRun, loop: LoopState, autocast, snapshot: Callable[[bool], dict], train_seconds: float,
                 online: Optional[dict]) -> dict:
    """Evaluate, measure collapse, step the schedule, checkpoint and log the epoch that just ended; returns its row."""
    model, world, trainer, settings = unwrap(run.model), run.world, run.trainer, run.collapse
    epochs, channels_last = trainer.epochs, trainer.channels_last
    loss_sum, correct, seen = loop.running.tolist()
    row = {"epoch": loop.epoch + 1, "train/loss": loss_sum / max(seen, 1), "train/acc": correct / max(seen, 1)}
    due = collapse_due(settings, loop.epoch, epochs)
    # Exact collapse of the test split rides on this evaluation's forward: its pass 1 (class means), and the
    # features that pass 2 reads back from the cache (no extra pass while they fit collapse.cache_mb).
    test_means = test_cache = None
    if (due and choice(settings.mode) == "exact" and "test" in settings.splits and settings.max_samples is None
            and not settings.layers and getattr(run.model, "module", run.model) is model):
        test_means = nc.CollapseAccumulator(model.num_classes, model.dim, device=run.device)
        test_cache = nc.FeatureCache(settings.cache_mb)
    if run.val_loader is not None:
        val = evaluate(run.model, run.val_loader, run.criterion, device=run.device, autocast=autocast, world=world,
                       channels_last=channels_last)
        row.update({"val/loss": val["loss"], "val/acc": val["acc"], **per_class_row(run, loop, "val", val)})
    online_test = online["test"] if online and due else None  # fed by this epoch's evaluation alone
    if online_test is not None:
        online_test.reset()
    test = evaluate(run.model, run.test_loader, run.criterion, device=run.device, autocast=autocast, world=world,
                    channels_last=channels_last, online=online_test, collapse_means=test_means,
                    collapse_cache=test_cache)
    row.update({"test/loss": test["loss"], "test/acc": test["acc"], **per_class_row(run, loop, "test", test),
                "lr": run.optimizer.param_groups[0]["lr"]})
    if run.ema is not None:
        test_ema = evaluate(run.ema.module, run.test_loader, run.criterion, device=run.device, autocast=autocast,
                            world=world, channels_last=channels_last)
        row.update({"test/loss_ema": test_ema["loss"], "test/acc_ema": test_ema["acc"]})
    measured = time.perf_counter()
    if due:
        row.update(measure_collapse(run, model, online, test_means, test_cache))
    if settings.agop.layers and collapse_due(settings.agop, loop.epoch, epochs) and world.is_main:
        row.update(measure_agop(run, model))  # no collective inside: rank 0 measures the unwrapped model alone
    collapse_seconds = time.perf_counter() - measured
    loop.history.append(row)
    if run.scheduler is not None:
        run.scheduler.step(loop.epoch + 1)
    loop.epoch, loop.step_in_epoch = loop.epoch + 1, 0
    loop.running.zero_()
    loop.epoch_seconds.append(train_seconds)
    # checkpoint.every: an epoch that is not written costs no state either (the rule is the same on every rank)
    state = snapshot(False) if run.checkpoints.writes_epoch(loop.epoch, epochs) else None
    if world.is_main:
        best_before = run.checkpoints.best_value
        epoch_path = run.checkpoints.save_epoch(state, row) if state is not None else None
        _tolerate("writing metrics.jsonl", run.metrics.append, row)
        _tolerate("the tracker's log_epoch", run.tracker.log_epoch,
                  {**row, "time/train_s": train_seconds, "time/collapse_s": collapse_seconds})
        if getattr(run.tracker, "log_model", "false") == "all" and run.checkpoints.enabled:
            _tolerate("the tracker's log_checkpoint", _log_epoch_checkpoint, run, epoch_path, row["epoch"], best_before)
        log.info(_epoch_line(row, epochs, train_seconds, collapse_seconds))
    world.barrier()
    return row


def measure_collapse(run: TrainingRun, model: nn.Module, online: Optional[dict], test_means=None,
                     test_cache=None) -> dict:
    """The collapse row of an epoch; `test_means` and `test_cache`: the test split's pass 1 and its features,
    already taken by `evaluate`."""
    row: dict = {}
    settings, world, head = run.collapse, run.world, model.head
    minority, majority = run.class_groups.get("few", []), run.class_groups.get("many", [])
    amp = AUTOCAST_DTYPES[choice(run.trainer.precision)]
    # the OOD features' sums, once for both splits: each rank sums its shard, the accumulators all-reduce them
    ood = None if run.ood_loader is None else nc.ood_feature_sums(model, run.ood_loader, device=run.device,
                                                                   autocast_dtype=amp, channels_last=run.trainer.channels_last)
    for split, prefix, loader in (("train", "collapse/", run.train_eval_loader), ("test", "collapse_test/", run.test_loader)):
        if split not in settings.splits:
            continue
        if online is not None:
            if ood is not None:
                online[split].add_ood(ood)
            world.all_reduce_sum(online[split].state_tensors())
            values = online[split].compute(head.weight.detach(), None if head.bias is None else head.bias.detach())
            if minority:  # compute() moved the shifts to this epoch's class means
                values.update(nc.minority_collapse(online[split].shifts, head.weight.detach(), minority, majority,
                                                   present=online[split].has_shift))
        else:
            values = nc.measure_model(model, loader, device=run.device, autocast_dtype=amp,
                                      max_samples=settings.max_samples, layers=list(settings.layers) or None,
                                      reduce_fn=(lambda t: world.all_reduce_sum([t])) if world.distributed else None,
                                      channels_last=run.trainer.channels_last,
                                      accumulator=test_means if split == "test" else None,
                                      cache=test_cache if split == "test" else None, cache_mb=settings.cache_mb,
                                      minority=minority, majority=majority, ood=ood)
        row.update({prefix + key: value for key, value in values.items()})
    return row


def measure_agop(run: TrainingRun, model: nn.Module) -> dict:
    """`agop/<stage>/...` of the epoch on a fixed seeded subset of the training split (docs/agop.md)."""
    from .. import agop

    settings = run.collapse.agop
    stages = [int(s) if str(s).lstrip("-").isdigit() else str(s) for s in settings.layers]
    stages = "all" if stages == ["all"] else stages
    return agop.measure_agop(model, run.train_eval_loader, agop.representative_layers(model, stages),
                             samples=settings.samples, probes="exact" if settings.probes is None else settings.probes)


def finish(run: TrainingRun, loop: LoopState) -> dict:
    """The run's summary, plot and end-of-run tracker tables (rank 0 writes them)."""
    model, history = unwrap(run.model), loop.history
    epochs = run.trainer.epochs
    summary = {**run.run_info, **summarize(history, run.collapse, model, loop.epoch_seconds, run.title,
                                           best_metric=run.checkpoints.best_metric,
                                           best_mode=run.checkpoints.best_mode,
                                           written=lambda epoch: run.checkpoints.writes_epoch(epoch, epochs)
                                           and epoch not in run.checkpoints.failed_epochs,
                                           best_written=run.checkpoints.best_epoch)}
    summary.update({f"final/{split}/class_acc": accuracy for split, accuracy in loop.class_accuracy.items()})
    if run.world.is_main:
        if run.collapse.plot and any(k.startswith(("collapse", "agop/")) for row in history for k in row):
            plot = _tolerate("plotting collapse", collapse_report.plot_collapse, history, Path(run.run_dir) / "collapse.png",
                             run.title or "collapse")
            if plot is not None:
                _tolerate("the tracker's log_image", run.tracker.log_image, "collapse", plot)
        _tolerate("writing summary.json", write_summary, run.run_dir, summary)
        _tolerate("the tracker's log_summary", run.tracker.log_summary, summary)
        if getattr(run.tracker, "active", False):  # a real tracker (W&B): per-class alignment of class means and rows
            autocast = autocast_for(run.device, run.trainer.precision)
            _tolerate("the tracker's alignment table", nc.log_prototype_alignment, run.tracker, model, run.train_eval_loader,
                      device=run.device, autocast=autocast)
            if run.test_loader is not None:
                _tolerate("the tracker's class results", _log_class_results, run, model, autocast)
        if getattr(run.tracker, "log_model", "false") == "best" and run.checkpoints.enabled:
            _tolerate("the tracker's log_checkpoint", _log_best_checkpoint, run, history)
    return summary


def best_epoch(history: list[dict], metric: str, mode: str) -> Optional[dict]:
    """The row of the best epoch by `metric` ("max" or "min"), by the checkpoint writer's rule (best.pt)."""
    best = None
    for row in history:
        if is_better(row.get(metric), None if best is None else best[metric], mode):
            best = row
    return best


def _log_epoch_checkpoint(run: TrainingRun, path: Optional[Path], epoch: int, best_before: Optional[float]) -> None:
    """logger.log_model=all: the epoch file, once written, with its aliases (best when it became best.pt)."""
    run.checkpoints.wait()  # the tracker copies the file: the background write must be complete
    if path is None or not Path(path).is_file():
        return
    became_best = run.checkpoints.best_value is not None and run.checkpoints.best_value != best_before
    run.tracker.log_checkpoint(Path(path), ["latest", f"epoch-{epoch}"] + (["best"] if became_best else []))


def _log_best_checkpoint(run: TrainingRun, history: list[dict]) -> None:
    """logger.log_model=best: best.pt at the end of the run, named by the epoch it holds."""
    from ..runs.checkpoints import BEST

    path, metric, best = run.checkpoints.directory / BEST, run.checkpoints.best_metric, run.checkpoints.best_value
    if not path.is_file():
        return
    epochs = [row["epoch"] for row in history if best is not None and row.get(metric) == best]
    aliases = ["best"]
    if epochs:
        aliases.append(f"epoch-{epochs[0]}")
        if history and epochs[0] == history[-1]["epoch"]:
            aliases.append("latest")
    run.tracker.log_checkpoint(path, aliases)


@torch.no_grad()
def _log_class_results(run: TrainingRun, model: nn.Module, autocast) -> None:
    """The test split's labels and predictions for the tracker's per-class accuracy and confusion matrix
    (under DDP: rank 0's shard of the test split)."""
    was_training = model.training
    model.eval()
    targets, predictions = [], []
    try:
        for x, y in run.test_loader:
            with autocast():
                logits = model(x.to(run.device, non_blocking=True))
            targets += y.tolist()
            predictions += logits.argmax(1).cpu().tolist()
    finally:
        model.train(was_training)
    names = getattr(run.test_loader.dataset, "classes", None)
    names = [str(n) for n in names] if names is not None and len(names) == model.num_classes else \
        [str(c) for c in range(model.num_classes)]
    run.tracker.log_class_results(targets, predictions, names)


def summarize(history: list[dict], settings, model: nn.Module, epoch_seconds: list[float], title: str, *,
              best_metric: str = "test/acc", best_mode: str = "max",
              written: Callable[[int], bool] = lambda epoch: True, best_written: Optional[int] = None) -> dict:
    """The run summary. `best/*` describe the epoch `best_metric` chose (best.pt): its `best/<metric>`,
    `best/epoch`, and the test figures of that epoch (`best/test/acc` is the test accuracy at the best
    validation epoch when the metric is val/acc), never the maximum over the test split's epochs.
    `best_written`: the epoch best.pt holds, as the checkpoint writer knows it; else the best of the epochs
    whose checkpoint was written (`written(epoch)`: checkpoint.every, no failed write), the only ones best.pt
    can be."""
    from ..models.classifier import param_summary

    summary: dict = {"title": title, "epochs": len(history)}
    if history:
        summary.update({f"final/{k}": v for k, v in history[-1].items() if k != "epoch"})
        held = [row for row in history if row["epoch"] == best_written]
        best = held[-1] if held else best_epoch([row for row in history if written(row["epoch"])], best_metric, best_mode)
        summary["best/metric"] = best_metric
        if best is not None:
            summary["best/epoch"] = best["epoch"]
            summary[f"best/{best_metric}"] = best[best_metric]
            summary.update({f"best/{k}": best[k] for k in ("val/acc", "val/loss", "test/acc", "test/loss") if k in best})
    if any("collapse/nc1" in row for row in history):
        summary.update(nc.collapse_speed(history, dict(settings.thresholds) or None))
    summary.update({f"params/{k}": v for k, v in param_summary(model).items()})
    if epoch_seconds:
        summary["time/train_s_per_epoch"] = sum(epoch_seconds) / len(epoch_seconds)
    return summary


def _count_skipped_step(loop: LoopState, limit: int, what: str, directory: Path, fix: str) -> int:
    """One more skipped step in a row; at `limit` the run stops with one line (the last good checkpoint is kept)."""
    in_a_row = loop.nonfinite_in_a_row + 1
    if in_a_row >= limit:
        raise FixedclsError(f"{what} for {in_a_row} steps in a row (epoch {loop.epoch + 1}, step {loop.step_in_epoch + 1}); "
                            f"stopped with the last good checkpoint kept in {directory}: {fix}")
    return in_a_row


def _finite_buffers(model: nn.Module) -> set:
    """The floating-point buffers that are finite now (some backbones keep -inf attention masks: those are not)."""
    return {name for name, b in model.named_buffers() if b.is_floating_point() and _all_finite(b)}


def _finite_weights(model: nn.Module, buffers: set) -> bool:
    """Every parameter, and every buffer of `buffers` (e.g. BN statistics), is finite."""
    return (all(_all_finite(p) for p in model.parameters())
            and all(_all_finite(b) for name, b in model.named_buffers() if name in buffers))


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element is finite.  For real floating tensors: min and max propagate NaN and +-inf, and unlike
    isfinite they allocate no mask of the tensor's size (a quarter of the time for ResNet-18's weights on a CPU)."""
    if tensor.numel() == 0:
        return True
    if not tensor.is_floating_point():
        return bool(torch.isfinite(tensor).all())
    return bool(torch.isfinite(torch.stack(torch.aminmax(tensor.detach()))).all())


def _tolerate(what: str, fn: Callable, *args, **kwargs):
    """Run a side job of the loop (metrics file, plot, tracker): a failure warns and training goes on."""
    try:
        return fn(*args, **kwargs)
    except Exception as error:
        warnings.warn(f"{what} failed ({type(error).__name__}: {error}); training goes on", RuntimeWarning, stacklevel=2)
        return None


def _epoch_line(row: dict, epochs: int, train_seconds: float, collapse_seconds: float) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}",
             f"train loss {row['train/loss']:.4f} acc {100 * row['train/acc']:.2f}%",
             f"test loss {row['test/loss']:.4f} acc {100 * row['test/acc']:.2f}%"]
    if "val/acc" in row:
        parts.insert(2, f"val loss {row['val/loss']:.4f} acc {100 * row['val/acc']:.2f}%")
    if "collapse/nc1" in row:
        parts.append(f"nc1 {row['collapse/nc1']:.3g}")
    if "collapse/proto_cos" in row:
        parts.append(f"proto_cos {row['collapse/proto_cos']:.3f}")
    parts.append(f"lr {row['lr']:.3g}")
    parts.append(f"{train_seconds:.1f}s" + (f" (+{collapse_seconds:.1f}s collapse)" if collapse_seconds > 0.05 else ""))
    return " | ".join(parts)


def _progress_bar(run: TrainingRun, total: int, initial: int, description: str):
    progress = run.trainer.progress
    if not run.world.is_main or not (sys.stderr.isatty() if progress is None else progress):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=description, leave=False, dynamic_ncols=True)
