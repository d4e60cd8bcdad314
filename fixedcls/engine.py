"""The training loop: one readable function, `fit`, where every step of an iteration is visible.

Everything it needs is built elsewhere (train.py builds it from the Hydra config; tests build it by
hand), so the loop can be called and tested without Hydra.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from .checkpoint import CheckpointWriter
from .distributed import World
from .errors import FixedclsError
from .loggers import MetricsFile, Tracker, log_prototype_alignment, write_summary

log = logging.getLogger("fixedcls")

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# SIGUSR2: submitit's (>= 1.5) default preemption/timeout signal; SIGUSR1: older submitit and plain sbatch --signal.
STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGINT", None), getattr(signal, "SIGUSR1", None),
                                 getattr(signal, "SIGUSR2", None)) if s)


class TrainingInterrupted(Exception):
    """Raised after a stop signal was honoured: the state was saved at a step boundary."""

    def __init__(self, signum: int, checkpoint: Optional[Path]):
        self.signum, self.checkpoint = signum, checkpoint
        name = signal.Signals(signum).name
        where = f"state saved to {checkpoint}" if checkpoint is not None else "no checkpoint written by this process"
        super().__init__(f"stopped by {name}; {where}; continue with resume=auto")


@dataclass
class CollapseSettings:
    every: int = 1
    mode: str = "exact"
    splits: tuple = ("train", "test")
    max_samples: Optional[int] = None
    layers: tuple = ()
    thresholds: dict = field(default_factory=dict)
    plot: bool = True

    def due(self, epoch: int, epochs: int) -> bool:
        return self.every > 0 and ((epoch + 1) % self.every == 0 or epoch + 1 == epochs)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FixedclsError("trainer.device=cuda but no CUDA device is visible: use trainer.device=cpu or auto")
    return torch.device(name)


def autocast_for(device: torch.device, precision: str):
    """The autocast context of a precision name; fp16 is refused on CPU, where it is slow and unscaled."""
    if precision not in AUTOCAST_DTYPES:
        raise FixedclsError(f"unknown trainer.precision='{precision}': choose one of {', '.join(AUTOCAST_DTYPES)}")
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext
    if precision == "fp16" and device.type != "cuda":
        raise FixedclsError("trainer.precision=fp16 needs a CUDA device (gradient scaling); on CPU use bf16 or fp32")
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


class StopSignals:
    """Turns SIGTERM/SIGINT/SIGUSR1 into a flag the loop checks at each step boundary.

    The previous handlers are kept so a launcher's own handler (submitit's requeue on SIGUSR1)
    can still run once our checkpoint is safely written.
    """

    def __init__(self):
        self.received: Optional[int] = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.received = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _split_rng(world: World) -> None:
    """Give every rank > 0 a torch RNG stream of its own (dropout, drop-path and other random layers).

    Every rank seeds alike so the models start equal; without this each rank would then draw the same
    dropout masks.  Rank 0 keeps its stream, so a one-process run is unchanged.
    """
    if world.rank > 0:
        torch.manual_seed((torch.initial_seed() + 1_000_003 * world.rank) % 2**63)


def _count_skipped_step(in_a_row: int, limit: int, what: str, epoch: int, step: int, directory: Path, fix: str) -> int:
    """One more skipped step in a row; at `limit` the run stops with one line (the last good checkpoint is kept)."""
    in_a_row += 1
    if in_a_row >= limit:
        raise FixedclsError(f"{what} for {in_a_row} steps in a row (epoch {epoch + 1}, step {step + 1}); stopped with "
                            f"the last good checkpoint kept in {directory}: {fix}")
    return in_a_row


def _finite_buffers(model: nn.Module) -> set:
    """The floating-point buffers that are finite now (some backbones keep -inf attention masks: those are not)."""
    return {name for name, b in model.named_buffers() if b.is_floating_point() and bool(torch.isfinite(b).all())}


def _finite_weights(model: nn.Module, buffers: set) -> bool:
    """Every parameter, and every buffer of `buffers` (e.g. BN statistics), is finite."""
    return (all(bool(torch.isfinite(p).all()) for p in model.parameters())
            and all(bool(torch.isfinite(b).all()) for name, b in model.named_buffers() if name in buffers))


def _tolerate(what: str, fn: Callable, *args, **kwargs):
    """Run a side job of the loop (metrics file, plot, tracker): a failure warns and training goes on."""
    try:
        return fn(*args, **kwargs)
    except Exception as error:
        warnings.warn(f"{what} failed ({type(error).__name__}: {error}); training goes on", RuntimeWarning, stacklevel=2)
        return None


def unwrap(model: nn.Module) -> nn.Module:
    """The plain Classifier inside DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


@torch.no_grad()
def evaluate(model: nn.Module, loader, criterion: Callable, *, device: torch.device, autocast, world: World,
             channels_last: bool = False, online=None, collapse_means=None) -> dict:
    """Loss and accuracy over a loader (summed across processes); optionally feeds an online collapse estimate,
    and pass 1 (class means) of an exact `collapse.CollapseAccumulator` with the same forward."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits, features = model(x, return_features=True)
            loss = criterion(logits.float(), y)
        totals += torch.stack([loss.double() * len(y), (logits.argmax(1) == y).sum().double(), torch.tensor(len(y), dtype=torch.float64, device=device)])
        if online is not None:
            online.update(features.detach(), y, logits.detach())
        if collapse_means is not None:
            collapse_means.update_means(features.detach(), y)
    world.all_reduce_sum([totals])
    model.train(was_training)
    loss_sum, correct, count = totals.tolist()
    return {"loss": loss_sum / max(count, 1), "acc": correct / max(count, 1)}


def fit(
    model: nn.Module,
    *,
    train_loader,
    train_eval_loader,
    test_loader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    criterion: Callable,
    epochs: int,
    extra_loss: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    device: torch.device,
    run_dir: Path,
    checkpoints: CheckpointWriter,
    metrics: MetricsFile,
    tracker: Tracker = Tracker(),
    precision: str = "fp32",
    grad_accum: int = 1,
    clip_grad: Optional[float] = None,
    ema: Optional[nn.Module] = None,
    max_nonfinite: int = 5,
    channels_last: bool = False,
    collapse: Optional[CollapseSettings] = None,
    world: World = World(),
    resume_state: Optional[dict] = None,
    checkpoint_meta: Optional[dict] = None,
    progress: Optional[bool] = None,
    title: str = "",
    run_info: Optional[dict] = None,
) -> dict:
    """Train for `epochs`, evaluate and measure collapse after each, checkpoint, and return the summary.

    `extra_loss(x, features, y)` is added to the criterion on every training step.
    """
    from . import collapse as nc  # measurement stays optional for callers that only train

    collapse = collapse or CollapseSettings(every=0)
    base_model = unwrap(model)
    autocast = autocast_for(device, precision)
    scaler = torch.amp.GradScaler(device.type, enabled=(precision == "fp16"))
    train_sampler, train_set = train_loader.sampler, train_loader.dataset
    steps_per_epoch = math.ceil(train_sampler.num_samples / train_loader.batch_size)
    online_train = nc.OnlineCollapse(base_model.num_classes, base_model.dim, device) if collapse.mode == "online" else None
    online_test = nc.OnlineCollapse(base_model.num_classes, base_model.dim, device) if collapse.mode == "online" else None

    # Where the run stands: a fresh start, or exactly where a checkpoint left it.
    epoch, step_in_epoch, global_step, history = 0, 0, 0, []
    running = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, samples of this epoch
    nonfinite_in_a_row = 0
    if resume_state is not None:
        base_model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        if scheduler is not None and resume_state.get("scheduler"):
            scheduler.load_state_dict(resume_state["scheduler"])
        scaler.load_state_dict(resume_state.get("scaler") or scaler.state_dict())
        if ema is not None and resume_state.get("ema"):
            ema.load_state_dict(resume_state["ema"])
        epoch, step_in_epoch = resume_state["epoch"], resume_state["step_in_epoch"]
        global_step, history = resume_state["global_step"], list(resume_state["history"])
        running = resume_state["running"].to(device=device, dtype=torch.float64)
        nonfinite_in_a_row = resume_state.get("nonfinite_in_a_row", 0)
        checkpoints.best_value = resume_state.get("best_value")
        for name, online in (("online_train", online_train), ("online_test", online_test)):
            if online is not None and resume_state.get(name):
                online.load_state_dict(resume_state[name])
        per_rank = resume_state.get("rng_ranks") or []
        if len(per_rank) == world.world_size:
            set_rng_state(per_rank[world.rank])
        else:  # a checkpoint of another world size: rank 0's state, then a stream of each rank's own
            set_rng_state(resume_state["rng"])
            _split_rng(world)
        log.info(f"resumed at epoch {epoch + 1} step {step_in_epoch} of {steps_per_epoch}")
    else:
        _split_rng(world)
    _tolerate("writing metrics.jsonl", metrics.reset, history)

    def state(stopped_mid_epoch: bool, rng_ranks: Optional[list] = None) -> dict:
        return {
            "model": base_model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
            "epoch": epoch, "step_in_epoch": step_in_epoch if stopped_mid_epoch else 0,
            "global_step": global_step, "history": history, "running": running.cpu(),
            "nonfinite_in_a_row": nonfinite_in_a_row,  # best_value: set by the checkpoint writer, which owns it
            "online_train": online_train.state_dict() if online_train is not None else None,
            "online_test": online_test.state_dict() if online_test is not None else None,
            "rng": rng_state(), "rng_ranks": rng_ranks, **(checkpoint_meta or {}),
        }

    show_progress = world.is_main and (sys.stderr.isatty() if progress is None else progress)
    finite_buffers = _finite_buffers(base_model)
    epoch_seconds: list[float] = []
    model.train()
    # Background checkpoint writes end before fit returns or raises (a stop, a crash, non-finite weights).
    with StopSignals() as stop, checkpoints.finish_writes():
        while epoch < epochs:
            # ---- one epoch of training -------------------------------------------------------
            train_sampler.set_epoch(epoch, start=step_in_epoch * train_loader.batch_size)
            if hasattr(train_set, "set_epoch"):
                train_set.set_epoch(epoch)
            if online_train is not None and step_in_epoch == 0:
                online_train.reset()
            lr = optimizer.param_groups[0]["lr"]
            started = time.perf_counter()
            bar = _progress_bar(show_progress, steps_per_epoch, step_in_epoch, f"epoch {epoch + 1}/{epochs}")
            for x, y in train_loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                update_now = (step_in_epoch + 1) % grad_accum == 0 or step_in_epoch + 1 == steps_per_epoch
                sync = contextlib.nullcontext() if update_now or not hasattr(model, "no_sync") else model.no_sync()
                with sync:
                    with autocast():
                        logits, features = model(x, return_features=True)
                        loss = criterion(logits.float(), y)
                        if extra_loss is not None:  # e.g. feature distillation from an earlier model generation
                            loss = loss + extra_loss(x, features, y)
                    # Every rank must agree: a rank that skipped backward alone would leave the others waiting in DDP's all-reduce.
                    finite_here = bool(torch.isfinite(loss))
                    finite = not world.any(not finite_here, device)
                    if finite or scaler.is_enabled():  # the fp16 scaler skips the step itself on inf/nan
                        scaler.scale(loss / grad_accum).backward()
                if not finite:  # counted under the fp16 scaler too: it skips steps, but cannot mend a NaN forward
                    nonfinite_in_a_row = _count_skipped_step(
                        nonfinite_in_a_row, max_nonfinite,
                        f"the loss was non-finite ({loss.item() if not finite_here else 'on another rank'})",
                        epoch, step_in_epoch, checkpoints.directory, "lower optim.lr or set trainer.clip_grad")
                grads_finite = True
                if not finite and not scaler.is_enabled():
                    optimizer.zero_grad(set_to_none=True)  # skip this step (the scaler does so itself)
                elif update_now:
                    if clip_grad is not None:
                        scaler.unscale_(optimizer)
                        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
                        # An overflowed norm scales every gradient by 0 (inf * 0 = NaN): skip, as fp16's scaler does.
                        grads_finite = scaler.is_enabled() or bool(torch.isfinite(grad_norm))
                    if grads_finite:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        nonfinite_in_a_row = _count_skipped_step(
                            nonfinite_in_a_row, max_nonfinite, f"the gradient norm was non-finite ({float(grad_norm)})",
                            epoch, step_in_epoch, checkpoints.directory, "lower optim.lr, or train in fp32")
                    optimizer.zero_grad(set_to_none=True)
                    if ema is not None and grads_finite:
                        ema.update(base_model, step=global_step)
                    global_step += 1
                if finite and grads_finite and update_now:  # a clean update ends a run of skipped steps
                    nonfinite_in_a_row = 0
                if finite:
                    running += torch.stack([loss.detach().double() * len(y), (logits.argmax(1) == y).sum().double(),
                                            torch.tensor(len(y), dtype=torch.float64, device=device)])
                    if online_train is not None:
                        online_train.update(features.detach(), y, logits.detach())
                step_in_epoch += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
                if update_now and world.any(stop.received is not None, device):
                    if bar is not None:
                        bar.close()
                    signum = stop.received or signal.SIGTERM
                    healthy = _finite_weights(base_model, finite_buffers)  # non-finite weights never displace a good last.pt
                    rng_ranks = world.all_gather_object(rng_state()) if world.distributed else None
                    path = (checkpoints.save_interrupted(state(stopped_mid_epoch=True, rng_ranks=rng_ranks))
                            if world.is_main and healthy else None)
                    world.barrier()
                    raise TrainingInterrupted(signum, path)
            if bar is not None:
                bar.close()
            world.all_reduce_sum([running])
            world.broadcast_buffers(base_model, ema)  # one set of BN statistics (rank 0's, the checkpointed one) for eval
            train_seconds = time.perf_counter() - started
            if not _finite_weights(base_model, finite_buffers):
                raise FixedclsError(
                    f"the weights became non-finite (inf or NaN) in epoch {epoch + 1}; stopped before checkpointing "
                    f"them, with the last good checkpoint kept in {checkpoints.directory}: lower optim.lr or set "
                    f"trainer.clip_grad"
                )

            # ---- end of epoch: evaluate, measure, log, checkpoint ------------------------------
            loss_sum, correct, seen = running.tolist()
            row = {"epoch": epoch + 1, "train/loss": loss_sum / max(seen, 1), "train/acc": correct / max(seen, 1)}
            # Exact collapse of the test split: its pass 1 (class means) rides on this evaluation's forward.
            test_means = None
            if (collapse.due(epoch, epochs) and collapse.mode == "exact" and "test" in collapse.splits
                    and collapse.max_samples is None and not collapse.layers and getattr(model, "module", model) is base_model):
                test_means = nc.CollapseAccumulator(base_model.num_classes, base_model.dim, device=device)
            test = evaluate(model, test_loader, criterion, device=device, autocast=autocast, world=world,
                            channels_last=channels_last, online=online_test, collapse_means=test_means)
            row.update({"test/loss": test["loss"], "test/acc": test["acc"], "lr": lr})
            if ema is not None:
                test_ema = evaluate(ema.module, test_loader, criterion, device=device, autocast=autocast, world=world,
                                    channels_last=channels_last)
                row.update({"test/loss_ema": test_ema["loss"], "test/acc_ema": test_ema["acc"]})
            measured = time.perf_counter()
            if collapse.due(epoch, epochs):
                row.update(_measure_collapse(base_model, collapse, train_eval_loader, test_loader, online_train, online_test,
                                             device=device, precision=precision, world=world,
                                             channels_last=channels_last, test_means=test_means))
            collapse_seconds = time.perf_counter() - measured
            history.append(row)
            if scheduler is not None:
                scheduler.step(epoch + 1)
            epoch, step_in_epoch = epoch + 1, 0
            running.zero_()
            epoch_seconds.append(train_seconds)
            rng_ranks = world.all_gather_object(rng_state()) if world.distributed else None
            if world.is_main:
                checkpoints.save_epoch(state(stopped_mid_epoch=False, rng_ranks=rng_ranks), row)
                _tolerate("writing metrics.jsonl", metrics.append, row)
                _tolerate("the tracker's log_epoch", tracker.log_epoch,
                          {**row, "time/train_s": train_seconds, "time/collapse_s": collapse_seconds})
                log.info(_epoch_line(row, epochs, train_seconds, collapse_seconds))
            world.barrier()

    summary = {**(run_info or {}), **_summary(history, collapse, base_model, epoch_seconds, title)}
    if world.is_main:
        if collapse.plot and any(k.startswith("collapse") for row in history for k in row):
            plot = _tolerate("plotting collapse", nc.plot_collapse, history, Path(run_dir) / "collapse.png", title or "collapse")
            if plot is not None:
                _tolerate("the tracker's log_image", tracker.log_image, "collapse", plot)
        _tolerate("writing summary.json", write_summary, run_dir, summary)
        _tolerate("the tracker's log_summary", tracker.log_summary, summary)
        if getattr(tracker, "active", False):  # a real tracker (W&B): per-class table of class-mean vs classifier-row alignment
            _tolerate("the tracker's alignment table", log_prototype_alignment, tracker, base_model, train_eval_loader,
                      device=device, autocast=autocast)
    return summary


def _measure_collapse(model, settings: CollapseSettings, train_eval_loader, test_loader, online_train, online_test,
                      *, device, precision, world: World, channels_last: bool = False, test_means=None) -> dict:
    """The collapse row of an epoch; `test_means`: the test split's pass 1, already taken by `evaluate`."""
    from . import collapse as nc

    row: dict = {}
    head = model.head
    for split, prefix, loader, online in (("train", "collapse/", train_eval_loader, online_train),
                                          ("test", "collapse_test/", test_loader, online_test)):
        if split not in settings.splits:
            continue
        if online is not None:
            world.all_reduce_sum(online.state_tensors())
            values = online.compute(head.weight.detach(), None if head.bias is None else head.bias.detach())
        else:
            values = nc.measure_model(model, loader, device=device, autocast_dtype=AUTOCAST_DTYPES[precision],
                                      max_samples=settings.max_samples, layers=list(settings.layers) or None,
                                      reduce_fn=(lambda t: world.all_reduce_sum([t])) if world.distributed else None,
                                      channels_last=channels_last, accumulator=test_means if split == "test" else None)
        row.update({prefix + key: value for key, value in values.items()})
    return row


def _summary(history: list[dict], collapse: CollapseSettings, model: nn.Module, epoch_seconds: list[float], title: str) -> dict:
    from . import collapse as nc
    from .model import param_summary

    summary: dict = {"title": title, "epochs": len(history)}
    if history:
        summary.update({f"final/{k}": v for k, v in history[-1].items() if k != "epoch"})
        accs = [row["test/acc"] for row in history if row.get("test/acc") is not None]
        if accs:
            summary["best/test/acc"] = max(accs)
    if any("collapse/nc1" in row for row in history):
        summary.update(nc.collapse_speed(history, collapse.thresholds or None))
    summary.update({f"params/{k}": v for k, v in param_summary(model).items()})
    if epoch_seconds:
        summary["time/train_s_per_epoch"] = sum(epoch_seconds) / len(epoch_seconds)
    return summary


def _epoch_line(row: dict, epochs: int, train_seconds: float, collapse_seconds: float) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}",
             f"train loss {row['train/loss']:.4f} acc {100 * row['train/acc']:.2f}%",
             f"test loss {row['test/loss']:.4f} acc {100 * row['test/acc']:.2f}%"]
    if "collapse/nc1" in row:
        parts.append(f"nc1 {row['collapse/nc1']:.3g}")
    if "collapse/proto_cos" in row:
        parts.append(f"proto_cos {row['collapse/proto_cos']:.3f}")
    parts.append(f"lr {row['lr']:.3g}")
    parts.append(f"{train_seconds:.1f}s" + (f" (+{collapse_seconds:.1f}s collapse)" if collapse_seconds > 0.05 else ""))
    return " | ".join(parts)


def _progress_bar(enabled: bool, total: int, initial: int, description: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=description, leave=False, dynamic_ncols=True)
