#!/usr/bin/env python
"""fixedcls benchmarks: speed and overhead, measured side by side in one process.

    python tools/bench.py                 # full run on the CPU (the default run's settings)
    python tools/bench.py --quick         # a few minutes on 2 CPU cores
    python tools/bench.py --json bench.json
    python tools/bench.py --device cuda --precision bf16   # GPU variant (adds images/s, ResNet-50 224px)
    python tools/bench.py --device cuda --precision bf16 --compile   # the same under torch.compile

Every figure is a ratio of two contenders timed in the same process and the same run, with the
contenders ALTERNATED (the order flips every round; garbage collected before each call) after
warm-up, so that machine noise (other processes, frequency changes, caches) hits both alike.  A figure
is the MEDIAN over rounds of the per-round ratio.  Next to each one (`ratio_stats` in the JSON, two
columns of the table) stand the interquartile range of the per-round ratios and the ratio of the two
contenders' medians: when the IQR is wide, or the ratio of medians far from the figure, the rounds
scatter and the figure holds only to about that width.  The raw per-contender medians, the same ratio
in process CPU time, and the machine (CPU, cores, threads, torch, device, load average, the cores other
processes kept busy) are reported too.
On a busy machine use --threads 1: with more threads than free cores OpenMP stalls at every barrier.
The loop and collapse figures time whole epochs of the default run as conf/config.yaml composes it
(digits at 16x16, resnet18, batch 64, fixed simplex head, exact collapse on the train and test splits),
--quick included (fewer rounds).

Figures and targets:

  step_ratio_fixed_vs_learned   training-step time, fixed simplex head / learned head (same backbone,
                                same batch)                                              <= 1.03
  loop_overhead_vs_plain        a 4-epoch fixedcls.training.loop.fit call with its epoch checkpoints not written
                                (collapse off; everything built by fixedcls.training.assemble.build_training, the writer
                                with enabled=False) / a minimal hand-written PyTorch loop doing the same work
                                (same model, loaders, precision, optimizer: train, validation and test
                                accuracy; no torch.save either)                          <= 1.05
  checkpoint_write_s_per_epoch  what the durable epoch checkpoint costs: fit (writes as configured, in the
                                background by default) minus fit without writes, seconds per epoch (median
                                over rounds, with its IQR), and as a share of a plain epoch; with the
                                breakdown of one write timed step by step (`checkpoint_write_ms`: state copy,
                                serialisation with its CRC32, page-cache write, fsync, atomic_save, links).
                                No target: it is the disk's price of a checkpoint that survives a power
                                cut, which a plain torch.save (page cache only) never pays.  On this
                                2-core VM it is 3-6% of an epoch, so fit with writes / plain
                                (`loop_with_checkpoints_vs_plain`, reported) cannot be held to 1.05 there;
                                checkpoint.every=N divides it by N.
  collapse_overhead_online      fit epoch with collapse.mode=online every epoch / collapse off  <= 1.05
                                (this and the next two: both contenders without checkpoint writes, so the
                                figure is the measurement's cost, not the disk's)
  collapse_overhead_exact       fit epoch with collapse.mode=exact every epoch / collapse off   <= 1.12
                                (one forward pass over the training split; the test split's features
                                come from its evaluation: collapse.cache_mb)
  agop_overhead                 fit epoch with the AGOP of 4 stages every epoch (512 seeded samples,
                                collapse.agop defaults) / collapse off                          <= 1.25
  nc_metrics_speedup_vs_naive   tools/naive_collapse.naive_nc_metrics / fixedcls.collapse.nc_metrics
                                at N=50,000, d=512, K=100, values checked equal (1e-6 rel.)     >= 20
  nc_metrics_speedup_vs_float32_streaming
                                tools/float32_collapse.float32_nc_metrics (the fastest public way: batches
                                of 1,024, one-hot GEMM class sums, (X - M[y])^T (X - M[y]), decisions, all
                                float32) / fixedcls.collapse.nc_metrics (float64 accumulation), same sizes,
                                alternated with the naive one; its max rel. difference is reported  >= 1.0
  collapse memory               the streaming measurer's float64 state (O(Kd + d^2)) against the
                                N x d float32 features it avoids storing (both in MB, and the ratio)
  scale (nc_metrics at many classes)
                                one nc_metrics call at K = 1,024, 4,096, 16,384 and 32,768 classes (--quick:
                                the first two; --scale-k to choose), d = 256, 8 samples per class, each size
                                in a fresh process: its seconds and peak RSS (the child's ru_maxrss, torch
                                and the inputs included), and the growth exponents in K (slopes on log K) of
                                the time, of the peak RSS and of the RSS the call added
                                  scale_peak_rss_gb_k32768                                <= 3
                                  scale_seconds_k32768                                    <= 300
  workers_epoch_speedup_persistent
                                an epoch of data loading (5,000 CIFAR-sized synthetic training images with
                                conf/data/cifar10.yaml's seeded augmentation, then 1,000 test images; num_workers=2,
                                no model) through loaders that respawn their workers every epoch / through
                                fixedcls's loaders, whose workers persist                 informative
                                Not in the default set (about a minute on a busy 2-core machine): --only workers
  share_*                       runs that share a machine: two default-config training processes at once
                                against one after the other, a parallel local sweep against a sequential one,
                                and a lone run's epoch against libgomp's own spin count; see
                                tools/share_cores.py.  Not in the default set (about 8 minutes): --only share
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

#: figure -> (comparison, target)
TARGETS: dict[str, tuple[str, float]] = {
    "step_ratio_fixed_vs_learned": ("<=", 1.03),
    "loop_overhead_vs_plain": ("<=", 1.05),
    "collapse_overhead_online": ("<=", 1.05),
    "collapse_overhead_exact": ("<=", 1.12),
    "agop_overhead": ("<=", 1.25),
    "nc_metrics_speedup_vs_naive": (">=", 20.0),
    "nc_metrics_speedup_vs_float32_streaming": (">=", 1.0),
    "memory_ratio_features_over_measurer": (">=", 1.0),
    "share_at_once_vs_one_after_other": ("<=", 1.3),
    "share_sweep_parallel_vs_sequential": ("<=", 1.3),
    "share_lone_epoch_vs_spinning": ("<=", 1.03),
    "scale_peak_rss_gb_k32768": ("<=", 3.0),
    "scale_seconds_k32768": ("<=", 300.0),
}
NC_REL_TOL = 1e-6


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


share_cores = _load_tool("share_cores")  # whole training processes side by side: their timing is its own module

AGOP_STAGES = ("1", "2", "3", "4")  # resnet18's four residual stages (docs/agop.md)
DEFAULT_BACKBONE = "resnet18"  # conf/config.yaml's; --quick runs the same model, fewer rounds (and the naive nc on a subset)
GPU_STEP = dict(backbone="resnet50", img_size=224, batch_size=64, in_chans=3, num_classes=1000)


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def alternate(contenders: dict[str, Callable[[], object]], *, rounds: int, warmup: int = 1,
              sync: Callable[[], None] = lambda: None, cpu_times: Optional[dict] = None) -> dict[str, list[float]]:
    """Wall time of each contender, called once per round, in an order that flips every round.

    Even rounds run the contenders in the given order, odd rounds in reverse: every pair runs once in
    each order per two rounds, so a load that drifts during a round hits both alike; list a baseline
    next to what is compared with it (they then run back to back).
    The garbage collector and os.sync() run before each call (untimed), so no contender pays for another's
    garbage or for the disk writes another left in the page cache (a plain torch.save returns before its
    90 MB reach the disk, and the kernel would write them back during the next contender's turn).
    The first `warmup` rounds are run and discarded.  Returns name -> list of `rounds` seconds.
    `cpu_times`, when given, receives name -> list of this process's CPU seconds (all threads) per call:
    on a busy machine a CPU-time ratio at one thread shows the work ratio that wall time blurs.
    """
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        for name in (names[::-1] if r % 2 else names):
            gc.collect()
            if hasattr(os, "sync"):
                os.sync()  # the page cache a contender left dirty is written back now, not during the next one's turn
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            contenders[name]()
            sync()
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            if r >= warmup:
                times[name].append(elapsed)
                if cpu_times is not None:
                    cpu_times.setdefault(name, []).append(cpu)
    return times


def median_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Median over rounds of the per-round ratio numerator / denominator."""
    return statistics.median(a / b for a, b in zip(times[numerator], times[denominator]))


def spread(values: list[float]) -> dict:
    """Median, quartiles and interquartile range of per-round values (one value: a spread of 0)."""
    values = sorted(values)
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else (values[0],) * 3
    return {"median": statistics.median(values), "q1": q1, "q3": q3, "iqr": q3 - q1, "rounds": len(values)}


def ratio_stats(times: dict[str, list[float]], numerator: str, denominator: str, *, scale: float = 1.0) -> dict:
    """How far one ratio figure can be trusted: the median of the per-round ratios (the figure) with their
    quartiles and interquartile range, and the ratio of the two contenders' medians.  A wide IQR, or a ratio
    of medians far from the median ratio, says the rounds scatter (a disk flush or another process landing
    in one contender's turn) and the figure holds only to about that width.  `scale` multiplies every ratio
    (a contender timed on a subset and scaled to the whole)."""
    per_round = [scale * a / b for a, b in zip(times[numerator], times[denominator])]
    return {**spread(per_round),
            "ratio_of_medians": scale * statistics.median(times[numerator]) / statistics.median(times[denominator])}


def add_figure(out: dict, key: str, times: dict, cpu: Optional[dict], numerator: str, denominator: str, *,
               scale: float = 1.0) -> None:
    """Put one ratio figure into a section's result: the figure (median per-round ratio), its `ratio_stats`
    (wall time) and, when process CPU times were taken, the same median ratio in CPU time."""
    stats = ratio_stats(times, numerator, denominator, scale=scale)
    out[key] = stats["median"]
    out.setdefault("ratio_stats", {})[key] = stats
    if cpu is not None:
        out.setdefault("cpu_ratios", {})[key] = ratio_stats(cpu, numerator, denominator, scale=scale)["median"]


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(ts) for name, ts in times.items()}


# --------------------------------------------------------------------------------------------
# machine
# --------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine_busy_seconds() -> Optional[float]:
    """CPU seconds all processes have spent busy since boot (Linux /proc/stat), or None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def other_processes_load(start: tuple, process_cpu_end: float, wall_start: float) -> Optional[float]:
    """Average number of cores other processes kept busy since `start` (process CPU, machine busy seconds).

    The load average cannot tell: it counts the benchmark's own threads, so a quiet 2-core machine
    running a 2-thread benchmark shows a load of 2.  Pass `own_cpu_seconds()` as the process CPU, so the
    data-loader workers of the workers figure count as the benchmark's own.
    """
    process_cpu_start, busy_start = start
    busy_end = _machine_busy_seconds()
    if busy_start is None or busy_end is None:
        return None
    wall = time.perf_counter() - wall_start
    return max(0.0, (busy_end - busy_start) - (process_cpu_end - process_cpu_start)) / max(wall, 1e-9)


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of its ended child processes (data-loader workers, once joined)."""
    times = os.times()
    return time.process_time() + times.children_user + times.children_system


def machine_info(device: torch.device) -> dict:
    import timm

    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
    }
    try:
        from threadpoolctl import threadpool_info

        info["blas_threads"] = {i["internal_api"]: i["num_threads"] for i in threadpool_info()}
    except ImportError:
        pass
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


# --------------------------------------------------------------------------------------------
# 1. training step: fixed simplex head vs learned head
# --------------------------------------------------------------------------------------------
def bench_step(*, backbone: str, img_size: int, in_chans: int, num_classes: int, batch_size: int,
               device: torch.device, precision: str = "fp32", channels_last: bool = False,
               steps: int = 3, rounds: int = 10, warmup: int = 1, batch: Optional[tuple] = None,
               compile: bool = False) -> dict:
    """Time `steps` training steps per round for both heads on the same backbone and the same batch.

    `batch` (x, y) defaults to a seeded synthetic batch placed on the device.  `compile` wraps each model in
    torch.compile as trainer.compile=true does; the warm-up rounds then include the compilation, so keep warmup >= 1.
    """
    from fixedcls.training.factories import build_optimizer
    from fixedcls.models.heads import create_criterion
    from fixedcls.models.classifier import create_model
    from fixedcls.runtime import autocast_for
    from omegaconf import OmegaConf

    autocast = autocast_for(device, precision)
    if batch is None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch_size, in_chans, img_size, img_size, generator=g)
        y = torch.randint(0, num_classes, (batch_size,), generator=g)
    else:
        x, y = batch
    x, y = x.to(device), y.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    optim_cfg = OmegaConf.create({"name": "sgd", "lr": 0.01, "weight_decay": 5e-4, "momentum": 0.9})

    def make(head: str):
        torch.manual_seed(0)  # same backbone initialisation for both heads
        model = create_model(backbone, head, num_classes, in_chans=in_chans, img_size=img_size).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        model.train()
        optimizer = build_optimizer(optim_cfg, model)
        criterion = create_criterion("ce", model.head)
        stepped = torch.compile(model) if compile else model

        def run_steps():
            for _ in range(steps):
                with autocast():
                    logits = stepped(x)
                    loss = criterion(logits.float(), y)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        return run_steps, model

    fixed, fixed_model = make("simplex")
    learned, learned_model = make("learned")
    cpu: dict = {}
    times = alternate({"fixed": fixed, "learned": learned}, rounds=rounds, warmup=warmup, sync=_sync(device), cpu_times=cpu)
    med = medians(times)
    out: dict = {}
    add_figure(out, "step_ratio_fixed_vs_learned", times, cpu, "fixed", "learned")
    return {
        **out,
        "medians": {"step_s_fixed": med["fixed"] / steps, "step_s_learned": med["learned"] / steps},
        "images_per_second_fixed": batch_size * steps / med["fixed"],
        "images_per_second_learned": batch_size * steps / med["learned"],
        "settings": {"backbone": backbone, "img_size": img_size, "batch_size": batch_size, "num_classes": num_classes,
                     "dim_fixed": fixed_model.dim, "dim_learned": learned_model.dim, "precision": precision,
                     "channels_last": channels_last, "compile": compile, "steps_per_round": steps, "rounds": rounds, "warmup": warmup},
        "raw": times,
    }


# --------------------------------------------------------------------------------------------
# 2-3. the training loop: fixedcls.training.loop.fit vs a plain loop; collapse measurement on/off
# --------------------------------------------------------------------------------------------
def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    from fixedcls.config import conf_dir, register_configs

    register_configs()  # the schema the config is checked against (fixedcls-train registers it on start)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def build_run(overrides: list[str], workdir: Path) -> dict:
    """Everything `fixedcls.training.assemble.train` builds for a config (`build_training`: the very objects of a real run),
    with the settings the plain loop needs beside them."""
    import torch

    from fixedcls.training.distributed import World
    from fixedcls.runtime import choice, resolve_device
    from fixedcls.training.assemble import build_training

    cfg = compose([f"checkpoint.root={workdir / 'checkpoints'}", "trainer.progress=false", *overrides])
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    training = build_training(cfg, workdir / "run", World(), resolve_device(cfg.trainer.device))
    training.checkpoints.close()  # each fit() call below gets a writer of its own
    return {"training": training, "cfg": cfg, "model": training.model, "optimizer": training.optimizer,
            "criterion": training.criterion, "train_loader": training.train_loader, "test_loader": training.test_loader,
            "device": training.device, "precision": choice(cfg.trainer.precision),
            "channels_last": bool(cfg.trainer.channels_last), "collapse": cfg.collapse}


def fit_epochs(run: dict, collapse_every: int, mode: str = "exact", *, epochs: int = 1, agop_layers=(),
               write_checkpoints: bool = True) -> Callable[[], dict]:
    """`epochs` epochs of the real training loop (one fit() call), collapse measured every epoch or off.

    Several epochs per call, as in a real run: fit()'s once-per-call costs are spread over them, and an
    epoch checkpoint written in the background overlaps the next epoch (fit waits only for the last).
    `write_checkpoints=False` gives fit a writer built with ``enabled=False`` (what every rank but rank 0
    gets under DDP): the loop is unchanged, only the epoch files are not written.
    """
    import copy

    from fixedcls.training.factories import build_checkpoints
    from fixedcls.training.loop import fit

    training, cfg = run["training"], run["cfg"]
    trainer, collapse = copy.deepcopy(cfg.trainer), copy.deepcopy(cfg.collapse)
    trainer.epochs, trainer.progress = epochs, False
    collapse.every, collapse.mode, collapse.plot = collapse_every, mode, False
    collapse.agop.layers = list(agop_layers)
    # built the same way as train() builds it (background writes as configured)
    checkpoints = build_checkpoints(cfg.checkpoint, training.checkpoints.directory, enabled=write_checkpoints)
    return lambda: fit(dataclasses.replace(training, checkpoints=checkpoints, trainer=trainer, collapse=collapse,
                                           resume_state=None))


def plain_epochs(run: dict, *, epochs: int = 1) -> Callable[[], None]:
    """A minimal hand-written PyTorch loop doing the same work as fit() without collapse and without
    checkpoints, `epochs` times: train over the same loader (same model, optimizer, precision), then the
    accuracy of the validation split (when the run has one: the default digits run does, and fit evaluates
    it every epoch) and of the test split.  Its counterpart is fit() with its checkpoint writes off; what a
    durable checkpoint costs is its own figure."""
    model, optimizer, criterion = run["model"], run["optimizer"], run["criterion"]
    train_loader, test_loader, device = run["train_loader"], run["test_loader"], run["device"]
    eval_loaders = [loader for loader in (run["training"].val_loader, test_loader) if loader is not None]
    from fixedcls.runtime import AUTOCAST_DTYPES

    dtype = AUTOCAST_DTYPES[run["precision"]]
    channels_last = run["channels_last"]

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def train_epochs():
        for epoch in range(epochs):
            model.train()
            train_loader.sampler.set_epoch(epoch)
            train_loader.dataset.set_epoch(epoch)
            loss_sum = torch.zeros((), device=device)
            for x, y in train_loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast():
                    loss = criterion(model(x).float(), y)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach()
            model.eval()
            for loader in eval_loaders:
                correct = torch.zeros((), device=device, dtype=torch.long)
                with torch.no_grad():
                    for x, y in loader:
                        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                        if channels_last:
                            x = x.contiguous(memory_format=torch.channels_last)
                        with autocast():
                            correct += (model(x).argmax(1) == y).sum()
                int(correct)  # the accuracy reaches Python, as fit's metrics row does
            model.train()
            float(loss_sum)

    return train_epochs


def checkpoint_write_breakdown(state: dict, directory: Path, *, repeats: int = 5) -> dict:
    """Milliseconds of each step of one durable epoch checkpoint of `state`, each the median of `repeats`
    calls made one after another (not alternated: these are absolute costs, they say where the write cost
    goes).  `serialise` is torch.save into memory (pickling, the zip records and their CRC32);
    `crc32` is zlib's CRC32 over the same bytes, for scale; `page_cache_write` is torch.save into a new
    file (what a plain loop pays); `fsync` is the flush of that file to the disk; `atomic_save` is the
    whole durable write of fixedcls (temporary file, fsync, rename, directory fsync); `links` is
    last.pt and best.pt pointed at it."""
    import io
    import zlib

    from fixedcls.runs import checkpoints as ckpt

    directory.mkdir(parents=True, exist_ok=True)
    raw = io.BytesIO()
    torch.save(state, raw)
    data = raw.getvalue()
    target = directory / "breakdown.pt"

    def timed(fn: Callable[[], object]) -> float:
        samples = []
        for _ in range(repeats):
            gc.collect()
            if hasattr(os, "sync"):
                os.sync()
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return 1000 * statistics.median(samples)

    def page_cache_write():
        with open(target, "wb") as f:
            torch.save(state, f)

    def fsync_after_write() -> float:
        page_cache_write()
        start = time.perf_counter()
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return time.perf_counter() - start

    fsync_samples = []
    for _ in range(repeats):
        os.sync()
        fsync_samples.append(fsync_after_write())
    staging: dict = {}
    out = {
        "bytes": len(data),
        "snapshot_copy_fresh": timed(lambda: ckpt.snapshot(state)),
        "snapshot_copy_reused": timed(lambda: staging.__setitem__("s", ckpt.snapshot(state, reuse=staging.get("s")))),
        "serialise": timed(lambda: torch.save(state, io.BytesIO())),
        "crc32": timed(lambda: zlib.crc32(data)),
        "page_cache_write": timed(page_cache_write),
        "fsync": 1000 * statistics.median(fsync_samples),
        "atomic_save": timed(lambda: ckpt.atomic_save(state, target)),
        "links": timed(lambda: (ckpt.link_or_copy(target, directory / ckpt.LAST),
                                ckpt.link_or_copy(target, directory / ckpt.BEST))),
    }
    return {key: value if key == "bytes" else round(value, 2) for key, value in out.items()}


def bench_loop(run: dict, workdir: Path, *, rounds: int = 5, warmup: int = 1, epochs: int = 3, collapse: bool = True,
               loop: bool = True, agop: bool = True) -> dict:
    """fit() runs of `epochs` epochs with collapse off / online / exact and the plain loop, alternated round by round.

    The loop figure compares like with like: `fit_nowrite` (fit with its epoch checkpoints not written) /
    `plain` (no torch.save either).  The durable checkpoint write is a figure of its own: `fit` (writes as
    configured, background by default) minus `fit_nowrite`, in seconds per epoch and as a share of a plain
    epoch, with a breakdown of one write timed step by step.  The collapse and AGOP figures compare with
    `fit_nowrite` and write no checkpoints either: they measure the measurement alone, not the disk.
    """
    contenders: dict[str, Callable] = {}  # in this order, each ratio's two contenders run back to back or one apart
    if loop:
        contenders["plain"] = plain_epochs(run, epochs=epochs)
        contenders["fit"] = fit_epochs(run, 0, epochs=epochs)
    contenders["fit_nowrite"] = fit_epochs(run, 0, epochs=epochs, write_checkpoints=False)
    if collapse:
        contenders["fit_online"] = fit_epochs(run, 1, "online", epochs=epochs, write_checkpoints=False)
        contenders["fit_exact"] = fit_epochs(run, 1, "exact", epochs=epochs, write_checkpoints=False)
    if agop:
        contenders["fit_agop"] = fit_epochs(run, 0, epochs=epochs, agop_layers=AGOP_STAGES, write_checkpoints=False)
    cpu: dict = {}
    times = alternate(contenders, rounds=rounds, warmup=warmup, sync=_sync(run["device"]), cpu_times=cpu)
    out: dict = {"medians": {f"epoch_s_{k}": v / epochs for k, v in medians(times).items()}, "raw": times}
    for key, num, den in (("loop_overhead_vs_plain", "fit_nowrite", "plain"),
                          ("loop_with_checkpoints_vs_plain", "fit", "plain"),
                          ("collapse_overhead_online", "fit_online", "fit_nowrite"),
                          ("collapse_overhead_exact", "fit_exact", "fit_nowrite"),
                          ("agop_overhead", "fit_agop", "fit_nowrite")):
        if num in times and den in times:
            add_figure(out, key, times, cpu, num, den)
    if loop:
        plain_epoch = statistics.median(times["plain"]) / epochs
        write = spread([(a - b) / epochs for a, b in zip(times["fit"], times["fit_nowrite"])])
        out["checkpoint_write_s_per_epoch"] = write["median"]
        out["checkpoint_write_share_of_plain_epoch"] = write["median"] / plain_epoch
        out["checkpoint_write_spread"] = {**write, "plain_epoch_s": plain_epoch}
        last = run["training"].checkpoints.directory / "last.pt"
        if last.is_file():
            from fixedcls.runs.checkpoints import load

            out["checkpoint_write_ms"] = checkpoint_write_breakdown(load(last), workdir / "breakdown",
                                                                    repeats=max(3, rounds))
    cfg = run["cfg"]
    out["settings"] = {"backbone": cfg.model.backbone, "data": cfg.data.name, "img_size": cfg.data.img_size,
                       "batch_size": cfg.data.batch_size, "eval_batch_size": cfg.data.eval_batch_size,
                       "head": cfg.head.name, "precision": run["precision"], "device": str(run["device"]),
                       "collapse_splits": list(run["collapse"].splits), "steps_per_epoch": len(run["train_loader"]),
                       "epochs_per_round": epochs, "checkpoint_background": bool(cfg.checkpoint.background),
                       "checkpoint_every": int(cfg.checkpoint.every), "rounds": rounds, "warmup": warmup}
    return out


# --------------------------------------------------------------------------------------------
# 4. nc_metrics vs the naive notebook-style computation and the float32 streaming one
# --------------------------------------------------------------------------------------------
def load_naive():
    return _load_tool("naive_collapse")


def load_float32():
    return _load_tool("float32_collapse")


def collapse_features(N: int, d: int, K: int, seed: int = 0):
    """Clustered float32 features (a partly collapsed representation), labels, a classifier W and bias."""
    g = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(K, d, generator=g)
    y = torch.randint(0, K, (N,), generator=g)
    h = centres[y] + torch.randn(N, d, generator=g)
    W = centres + 0.5 * torch.randn(K, d, generator=g)
    b = 0.1 * torch.randn(K, generator=g)
    return h, y, W, b


def max_rel_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for key in a:
        if key not in b:
            continue
        x, y = float(a[key]), float(b[key])
        if math.isnan(x) and math.isnan(y):
            continue
        worst = max(worst, abs(x - y) / max(abs(x), abs(y), 1e-300))
    return worst


def bench_nc_metrics(*, N: int = 50_000, d: int = 512, K: int = 100, naive_samples: Optional[int] = None,
                     rounds: int = 3, warmup: int = 1, device: torch.device = torch.device("cpu")) -> dict:
    """Time fixedcls.collapse.nc_metrics, the naive reference and the float32 streaming one, alternated.

    `naive_samples` < N times the naive computation on the first naive_samples rows and scales its time
    linearly to N (it is linear in N: per-batch, per-class and per-sample loops); the values are then
    compared on that subset.  The float32 streaming contender always runs on all N samples.
    """
    from fixedcls.collapse import nc_metrics

    naive = load_naive().naive_nc_metrics
    float32_streaming = load_float32().float32_nc_metrics
    h, y, W, b = collapse_features(N, d, K)
    hd, yd, Wd, bd = (t.to(device) for t in (h, y, W, b))
    n_naive = N if naive_samples is None else min(int(naive_samples), N)
    scale = N / n_naive
    hs, ys = h[:n_naive], y[:n_naive]
    sync = _sync(device)
    for _ in range(warmup):  # warm the torch contenders only: the naive numpy loops have nothing to warm, and take a minute
        nc_metrics(hd, yd, Wd, bd)
        float32_streaming(hd, yd, Wd, bd)
    cpu: dict = {}
    last: dict = {}  # the values of the last timed call of each
    times = alternate({"nc_metrics": lambda: last.__setitem__("fast", nc_metrics(hd, yd, Wd, bd)),
                       "naive": lambda: last.__setitem__("naive", naive(hs, ys, W, b)),
                       "float32": lambda: last.__setitem__("float32", float32_streaming(hd, yd, Wd, bd))},
                      rounds=rounds, warmup=0, sync=sync, cpu_times=cpu)
    fast_values = last["fast"] if n_naive == N else nc_metrics(hd[:n_naive], yd[:n_naive], Wd, bd)
    naive_values = last["naive"]
    diff = max_rel_diff(fast_values, naive_values)
    med = medians(times)
    out: dict = {}
    add_figure(out, "nc_metrics_speedup_vs_naive", times, cpu, "naive", "nc_metrics", scale=scale)
    add_figure(out, "nc_metrics_speedup_vs_float32_streaming", times, cpu, "float32", "nc_metrics")
    out.update({
        "nc_metrics_max_rel_diff": diff,
        "nc_metrics_equal": bool(diff <= NC_REL_TOL),
        # informative: how far the float32 computation lands from the float64-accumulated values
        "float32_streaming_max_rel_diff": max_rel_diff(last["fast"], last["float32"]),
        "medians": {"nc_metrics_s": med["nc_metrics"], "naive_s": med["naive"] * scale,
                    "naive_s_measured": med["naive"], "float32_streaming_s": med["float32"]},
        "settings": {"N": N, "d": d, "K": K, "naive_samples": n_naive, "naive_scaled": n_naive < N,
                     "device": str(device), "rounds": rounds, "warmup": warmup},
        "raw": times,
    })
    if n_naive < N:
        out["note_naive"] = (f"naive_nc_metrics timed on {n_naive} of {N} samples and scaled linearly x{scale:g}; "
                             f"values compared on those {n_naive} samples")
    return out


# --------------------------------------------------------------------------------------------
# 5. memory of the streaming measurer vs the features it does not store
# --------------------------------------------------------------------------------------------
def _tensor_bytes(obj, seen: set) -> int:
    total = 0
    for value in vars(obj).values():
        if torch.is_tensor(value):
            key = (value.untyped_storage().data_ptr(), value.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += value.untyped_storage().nbytes()
        elif hasattr(value, "__dict__") and type(value).__module__.startswith("fixedcls"):
            total += _tensor_bytes(value, seen)
    return total


def bench_memory(*, N: int = 50_000, d: int = 512, K: int = 100, batch: int = 256) -> dict:
    """Bytes held by a CollapseAccumulator (after both passes, every tensor it keeps) against N x d float32.

    Also reports the transient working memory of one update at `batch` rows (float64 copy of the
    batch and its centred version), which is freed after each batch.
    """
    from fixedcls.collapse import CollapseAccumulator

    h, y, W, b = collapse_features(min(N, 4 * batch), d, K)
    acc = CollapseAccumulator(K, d)
    for s in range(0, h.shape[0], batch):
        acc.update_means(h[s:s + batch], y[s:s + batch])
    acc.finalize_means()
    for s in range(0, h.shape[0], batch):
        acc.update_scatter(h[s:s + batch], y[s:s + batch], weight=W, bias=b)
    state = _tensor_bytes(acc, set())
    features = N * d * 4
    mb = 1024.0 ** 2
    return {
        "collapse_memory_mb": state / mb,
        "stored_features_mb": features / mb,
        "memory_ratio_features_over_measurer": features / state,
        "collapse_batch_working_mb": 2 * batch * d * 8 / mb,
        "settings": {"N": N, "d": d, "K": K, "batch": batch},
    }


# --------------------------------------------------------------------------------------------
# 5b. nc_metrics at many classes: time and peak memory against K (a fresh process per size)
# --------------------------------------------------------------------------------------------
SCALE_SIZES = (1024, 4096, 16384, 32768)
QUICK_SCALE_SIZES = (1024, 4096)


def scale_point(K: int, d: int, per_class: int, seed: int = 0) -> dict:
    """One size of the scale figure, in THIS process: clustered float32 features, `per_class` samples of each
    of K classes, a classifier and bias; the seconds of one nc_metrics call and the process's peak RSS
    (ru_maxrss) after it, with the RSS before the call (torch and the inputs)."""
    import resource

    from fixedcls.collapse import nc_metrics

    g = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(K, d, generator=g)
    y = torch.arange(K * per_class) % K
    # sample i is of class i % K, so the rows viewed [per_class, K, d] take the centres by broadcasting: no
    # N x d temporaries, so the peak RSS is the call's and not the making of its inputs
    h = torch.randn(K * per_class, d, generator=g)
    h.view(per_class, K, d).add_(centres)
    W = centres + 0.5 * torch.randn(K, d, generator=g)
    b = 0.1 * torch.randn(K, generator=g)
    nc_metrics(h[:256], y[:256] % 16, W[:16], b[:16])  # load the kernels the call uses (not timed)
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    values = nc_metrics(h, y, W, b)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"K": K, "d": d, "N": K * per_class, "seconds": seconds, "peak_rss_mb": peak / 1024.0,
            "rss_before_call_mb": before / 1024.0, "inputs_mb": (h.numel() + W.numel()) * 4 / 2**20,
            "ncc_acc": values["ncc_acc"], "nc1": values["nc1"], "threads": torch.get_num_threads()}


def bench_scale(*, sizes=SCALE_SIZES, d: int = 256, per_class: int = 8, threads: Optional[int] = None) -> dict:
    """nc_metrics at each K of `sizes` in a process of its own (so one size's peak memory cannot hide another's):
    seconds and peak RSS per K, and the growth exponent of the time, the slope of log(seconds) on log(K)."""
    import subprocess

    points = []
    for K in sizes:
        command = [sys.executable, str(Path(__file__).resolve()), "--scale-point", f"{K},{d},{per_class}"]
        if threads:
            command += ["--threads", str(threads)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"bench: the scale point K={K} failed: {done.stderr.strip().splitlines()[-1:]}")
        points.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"[bench] scale K={K}: {points[-1]['seconds']:.1f}s, peak RSS {points[-1]['peak_rss_mb']:.0f} MB",
              file=sys.stderr, flush=True)
    out: dict = {"scale": points, "settings": {"sizes": list(sizes), "d": d, "per_class": per_class}}
    if len(points) >= 2:
        xs = [math.log(p["K"]) for p in points]
        mx = statistics.fmean(xs)

        def slope(values):  # least-squares slope of log(value) on log(K)
            ys = [math.log(max(v, 1e-9)) for v in values]
            my = statistics.fmean(ys)
            return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)

        out["scale_time_exponent"] = slope([p["seconds"] for p in points])
        # of the peak RSS itself (torch's own few hundred MB included, so it reads below the growth of the
        # measure's memory at small K) and of what the call added to the RSS before it
        out["scale_rss_exponent"] = slope([p["peak_rss_mb"] for p in points])
        added = [p["peak_rss_mb"] - p["rss_before_call_mb"] for p in points]
        if min(added) > 0:  # ru_maxrss is a high-water mark: a call below the making of its inputs adds nothing
            out["scale_call_rss_exponent"] = slope(added)
    for p in points:
        if p["K"] == 32768:
            out["scale_peak_rss_gb_k32768"] = p["peak_rss_mb"] / 1024.0
            out["scale_seconds_k32768"] = p["seconds"]
    return out


# --------------------------------------------------------------------------------------------
# 6. an epoch of data loading with workers: persistent (fixedcls's loaders) vs respawned every epoch
# --------------------------------------------------------------------------------------------
class CifarSizedImages(torch.utils.data.Dataset):
    """Seeded random 32x32 RGB images as CIFAR holds them (uint8 H x W x C, a PIL image per sample), labels 0..9."""

    def __init__(self, count: int, transform: Callable, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.pixels = torch.randint(0, 256, (count, 32, 32, 3), dtype=torch.uint8, generator=g).numpy()
        self.targets = torch.randint(0, 10, (count,), generator=g).tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.pixels[index])), self.targets[index]


def respawning(loader):
    """The same loader (dataset, sampler, batch size, workers, generator) with persistent_workers=False: new worker
    processes at every `iter()`, as fixedcls's loaders had before they kept theirs."""
    from torch.utils.data import DataLoader

    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=loader.sampler, num_workers=loader.num_workers,
                      pin_memory=loader.pin_memory, persistent_workers=False, generator=loader.generator,
                      worker_init_fn=loader.worker_init_fn, multiprocessing_context=loader.multiprocessing_context)


def bench_workers(*, images: int = 5000, num_workers: int = 2, batch_size: int = 128, epochs: int = 1,
                  rounds: int = 5, warmup: int = 1) -> dict:
    """`epochs` epochs of data loading per round, as fit() iterates its loaders (the training split, then the
    test split), through fixedcls.data.loaders.create_loaders with persistent workers and through the same loaders
    respawning their workers every epoch, alternated.  CIFAR-sized synthetic images (`images` for training, a
    fifth as many for the test split) with conf/data/cifar10.yaml's seeded training augmentation (random crop with
    padding, flip, normalisation); no model, so the figure is the loading time alone, where respawning costs most."""
    from fixedcls.config import register_configs
    from fixedcls.data.datasets import DataBundle
    from fixedcls.data.loaders import create_loaders
    from fixedcls.data.transforms import image_file_transforms

    register_configs()
    data_cfg = compose(["data=cifar10", "data.root=unused"]).data  # the transforms read no file
    train_tf, eval_tf, spec = image_file_transforms(data_cfg, 3)
    train_images = CifarSizedImages(images, train_tf)
    bundle = DataBundle(train=train_images, train_eval=CifarSizedImages(images, eval_tf),
                        test=CifarSizedImages(max(1, images // 5), eval_tf, seed=1), num_classes=10, in_chans=3,
                        img_size=32, class_names=[str(c) for c in range(10)], preprocessing=spec)
    train, _, test = create_loaders(bundle, batch_size=batch_size, eval_batch_size=2 * batch_size,
                                    num_workers=num_workers, seed=0)
    next_epoch = [0]

    def epochs_of(train_loader, test_loader) -> Callable[[], None]:
        def run_epochs():
            for _ in range(epochs):
                train_loader.sampler.set_epoch(next_epoch[0])  # every call loads new epochs (new augmentation)
                next_epoch[0] += 1
                for x, _ in train_loader:
                    x.sum()
                for x, _ in test_loader:
                    x.sum()

        return run_epochs

    times = alternate({"persistent": epochs_of(train, test), "respawn": epochs_of(respawning(train), respawning(test))},
                      rounds=rounds, warmup=warmup)
    med = medians(times)
    out: dict = {}
    add_figure(out, "workers_epoch_speedup_persistent", times, None, "respawn", "persistent")
    return {
        **out,
        "medians": {"epoch_s_workers_persistent": med["persistent"] / epochs,
                    "epoch_s_workers_respawn": med["respawn"] / epochs},
        "settings": {"train_images": images, "test_images": len(bundle.test), "image": "3x32x32 uint8 -> PIL",
                     "augmentation": "conf/data/cifar10.yaml (random crop, flip, normalise; seeded per sample)",
                     "num_workers": num_workers, "batch_size": batch_size, "epochs_per_round": epochs,
                     "rounds": rounds, "warmup": warmup},
        "raw": times,
    }


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def bench_share(*, rounds: int = 3) -> dict:
    """The figures of runs that share a machine, from tools/share_cores.py's timings: two runs at once and a
    parallel sweep against their sequential twins (median per-round ratios), and a lone run's epoch against
    libgomp's own spin count.  A lone run's epoch time is bimodal on this project's VM (1.8 or 2.1 s, whatever
    the spin count), so that figure is the ratio of the medians over every run of each kind."""
    times = share_cores.time_sharing(rounds=rounds)
    out: dict = {"medians": {f"share {key} (s)": value for key, value in medians(times).items()},
                 "settings": {"rounds": rounds, "run": share_cores.RUN,
                              "spins_compared_with": share_cores.LIBGOMP_DEFAULT_SPINS}}
    add_figure(out, "share_at_once_vs_one_after_other", times, None, "at_once", "one_after_other")
    add_figure(out, "share_sweep_parallel_vs_sequential", times, None, "sweep_parallel", "sweep_sequential")
    lone = ratio_stats(times, "lone_epoch", "lone_epoch_spinning")
    out["share_lone_epoch_vs_spinning"] = lone["ratio_of_medians"]
    out["ratio_stats"]["share_lone_epoch_vs_spinning"] = lone
    return out


def verdict(key: str, value: Optional[float]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    op, target = TARGETS[key]
    ok = value <= target if op == "<=" else value >= target
    return "PASS" if ok else "MISS"


def format_table(results: dict) -> str:
    columns = ("figure", "value (wall)", "IQR of rounds", "ratio of medians", "cpu-time ratio", "target", "verdict")
    rows = [columns]
    cpu, stats = results.get("cpu_ratios", {}), results.get("ratio_stats", {})

    def number(value: float) -> str:
        return f"{value:.3f}" if value < 100 else f"{value:.1f}"

    def figure_row(key: str, target: str = "", verdict_text: str = "info") -> tuple:
        spread_of = stats.get(key, {})
        return (key, number(results[key]), number(spread_of["iqr"]) if "iqr" in spread_of else "",
                number(spread_of["ratio_of_medians"]) if "ratio_of_medians" in spread_of else "",
                number(cpu[key]) if key in cpu else "", target, verdict_text)

    for key, (op, target) in TARGETS.items():
        if key in results:
            rows.append(figure_row(key, f"{op} {target:g}", verdict(key, results[key])))
    for key in (k for k in stats if k not in TARGETS and k in results):  # ratios without a target
        rows.append(figure_row(key))
    if "checkpoint_write_s_per_epoch" in results:
        write = results.get("checkpoint_write_spread", {})
        rows.append(("checkpoint_write_s_per_epoch (fit - fit_nowrite)", f"{results['checkpoint_write_s_per_epoch']:.4f}",
                     f"{write['iqr']:.4f}" if "iqr" in write else "", "", "", "", "info"))
        rows.append(("checkpoint_write_share_of_plain_epoch", f"{results['checkpoint_write_share_of_plain_epoch']:.3f}",
                     "", "", "", "", "info"))
    for key, value in results.get("checkpoint_write_ms", {}).items():
        rows.append((f"checkpoint write: {key}" + ("" if key == "bytes" else " (ms)"),
                     f"{value}" if key == "bytes" else f"{value:.1f}", "", "", "", "", "info"))
    if "nc_metrics_equal" in results:
        rows.append(("nc_metrics equal to naive (max rel diff)", f"{results['nc_metrics_max_rel_diff']:.1e}", "", "", "",
                     f"<= {NC_REL_TOL:g}", "PASS" if results["nc_metrics_equal"] else "MISS"))
    if "float32_streaming_max_rel_diff" in results:
        rows.append(("float32 streaming vs nc_metrics (max rel diff)", f"{results['float32_streaming_max_rel_diff']:.1e}",
                     "", "", "", "", "info"))
    for key in ("collapse_memory_mb", "stored_features_mb", "images_per_second_fixed", "images_per_second_learned",
                "workers_epoch_speedup_persistent"):
        if key in results:
            rows.append((key, f"{results[key]:.2f}", "", "", "", "", "info"))
    for point in results.get("scale", []):
        rows.append((f"nc_metrics K={point['K']}, d={point['d']}, N={point['N']}: seconds | peak RSS MB",
                     f"{point['seconds']:.2f} | {point['peak_rss_mb']:.0f}", "", "", "", "", "info"))
    for key, what in (("scale_time_exponent", "time"), ("scale_rss_exponent", "peak RSS"),
                      ("scale_call_rss_exponent", "peak RSS added by the call")):
        if key in results:
            rows.append((f"nc_metrics growth exponent in K of the {what}", f"{results[key]:.2f}", "", "", "", "", "info"))
    for key, value in results.get("medians", {}).items():
        rows.append((f"median {key}", f"{value:.4f}", "", "", "", "", "info"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but no CUDA device is visible")
    limiter = None
    if args.threads:
        torch.set_num_threads(args.threads)
        try:  # numpy's BLAS too (the naive reference's outer products and norms run on it)
            from threadpoolctl import threadpool_limits

            limiter = threadpool_limits(limits=args.threads)
        except ImportError:
            pass
    try:
        return _run(args, device)
    finally:
        if limiter is not None:
            limiter.restore_original_limits()


def _run(args, device: torch.device) -> dict:
    quick = args.quick
    results: dict = {"machine": machine_info(device), "quick": quick, "medians": {}, "cpu_ratios": {}, "ratio_stats": {},
                     "settings": {},
                     "notes": []}
    started, cpu_start = time.perf_counter(), (own_cpu_seconds(), _machine_busy_seconds())

    def merge(part: dict, section: str):
        results["medians"].update(part.pop("medians", {}))
        results["cpu_ratios"].update(part.pop("cpu_ratios", {}))
        results["ratio_stats"].update(part.pop("ratio_stats", {}))
        results["settings"][section] = part.pop("settings", {})
        raw = part.pop("raw", None)
        if args.raw and raw is not None:
            results.setdefault("raw", {})[section] = raw
        for key in [k for k in part if k.startswith("note")]:
            results["notes"].append(part.pop(key))
        results.update(part)
        print(f"[bench] {section} done ({time.perf_counter() - started:.0f}s)", file=sys.stderr, flush=True)

    backbone = args.backbone or DEFAULT_BACKBONE
    if backbone != DEFAULT_BACKBONE:
        results["notes"].append(f"loop and collapse figures on backbone {backbone}, not the default run's {DEFAULT_BACKBONE}")
    sections = set(args.only.split(",")) if args.only else {"step", "loop", "nc", "memory", "scale"}
    with tempfile.TemporaryDirectory(prefix="fixedcls-bench-") as tmp:
        workdir = Path(tmp)
        run_objects = None
        if sections & {"step", "loop"}:
            overrides = [f"model.backbone={backbone}", f"trainer.device={device.type}",
                         f"trainer.precision={args.precision}", f"trainer.compile={str(args.compile).lower()}", *args.override]
            run_objects = build_run(overrides, workdir)
        if "step" in sections:
            if device.type == "cuda":
                part = bench_step(**GPU_STEP, device=device, precision=args.precision, channels_last=True,
                                  steps=args.steps or 5, rounds=args.rounds or (6 if quick else 10), warmup=args.warmup,
                                  compile=args.compile)
            else:
                x, y = next(iter(run_objects["train_loader"]))
                cfg = run_objects["cfg"]
                part = bench_step(backbone=backbone, img_size=cfg.data.img_size, in_chans=x.shape[1],
                                  num_classes=run_objects["model"].num_classes, batch_size=x.shape[0],
                                  device=device, precision=args.precision, channels_last=cfg.trainer.channels_last,
                                  steps=args.steps or (3 if quick else 5), rounds=args.rounds or (10 if quick else 20), batch=(x, y),
                                  warmup=args.warmup, compile=args.compile)
            merge(part, "step")
        if "loop" in sections:
            # --quick takes five rounds, not three: a median of five per-round ratios is not moved by one
            # disturbed round, a median of three was (a loop figure of 1.07 amid runs of 1.01)
            merge(bench_loop(run_objects, workdir, rounds=args.rounds or (5 if quick else 8), warmup=args.warmup,
                             epochs=args.epochs or 4), "loop")
        if "nc" in sections:
            merge(bench_nc_metrics(N=args.nc_n, d=args.nc_d, K=args.nc_k,
                                   naive_samples=(args.naive_samples or (5000 if quick else None)),
                                   rounds=args.rounds or (4 if quick else 3), warmup=args.warmup, device=device), "nc_metrics")
        if "memory" in sections:
            merge(bench_memory(N=args.nc_n, d=args.nc_d, K=args.nc_k), "memory")
        if "scale" in sections:
            sizes = tuple(int(k) for k in args.scale_k.split(",")) if args.scale_k else (
                QUICK_SCALE_SIZES if quick else SCALE_SIZES)
            merge(bench_scale(sizes=sizes, d=args.scale_d, per_class=args.scale_per_class, threads=args.threads), "scale")
        if "share" in sections:
            merge(bench_share(rounds=args.rounds or 3), "share")
        if "workers" in sections:
            merge(bench_workers(images=args.workers_images, rounds=args.rounds or (4 if quick else 8),
                                warmup=args.warmup), "workers")
    if hasattr(os, "getloadavg"):
        results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    other = other_processes_load(cpu_start, own_cpu_seconds(), started)
    if other is not None:
        results["machine"]["other_processes_load"] = round(other, 2)
        if device.type == "cpu" and other > 0.25:
            results["notes"].append(
                f"busy machine: other processes kept {other:.2f} of {os.cpu_count()} cores busy on average during the "
                f"run; the ratios of alternated contenders still compare like with like, but with more torch threads "
                f"than free cores OpenMP stalls at every barrier (use --threads 1; re-run on a quiet machine for "
                f"release figures)")
    results["seconds"] = time.perf_counter() - started
    results["targets"] = {k: {"op": op, "target": t, "verdict": verdict(k, results.get(k))}
                          for k, (op, t) in TARGETS.items() if k in results}
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer rounds, the naive nc_metrics timed on a subset")
    p.add_argument("--json", type=Path, help="write the results to this JSON file")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the models of the step and loop figures (trainer.compile=true); warm-up rounds compile")
    p.add_argument("--backbone", help="backbone of the loop/collapse/step figures (default: the default run's)")
    p.add_argument("--rounds", type=int, help="measured rounds per figure")
    p.add_argument("--warmup", type=int, default=1, help="discarded warm-up rounds before the measured ones")
    p.add_argument("--steps", type=int, help="training steps per round in the step benchmark")
    p.add_argument("--epochs", type=int, help="epochs per fit() call (and per plain-loop call) in the loop benchmark")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--only", help="comma list of sections: step,loop,nc,memory,scale,workers,share")
    p.add_argument("--scale-k", help="comma list of class counts K of the scale section (default 1024,4096,16384,32768; "
                                     "--quick: 1024,4096)")
    p.add_argument("--scale-d", type=int, default=256, help="feature dimension d of the scale section")
    p.add_argument("--scale-per-class", type=int, default=8, help="samples per class of the scale section")
    p.add_argument("--scale-point", help=argparse.SUPPRESS)  # K,d,per_class: one size, in this process (bench_scale)
    p.add_argument("--nc-n", type=int, default=50_000, help="samples N of the nc_metrics and memory figures")
    p.add_argument("--nc-d", type=int, default=512, help="feature dimension d of the nc_metrics and memory figures")
    p.add_argument("--nc-k", type=int, default=100, help="classes K of the nc_metrics and memory figures")
    p.add_argument("--workers-images", type=int, default=5000, help="training images of the workers figure")
    p.add_argument("--naive-samples", type=int, help="time the naive reference on this many samples, scaled to N")
    p.add_argument("--raw", action="store_true", help="include every timing in the JSON")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override for the built run")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.scale_point:  # a child of bench_scale: one size, its figures as one JSON line
        if args.threads:
            torch.set_num_threads(args.threads)
        K, d, per_class = (int(v) for v in args.scale_point.split(","))
        print(json.dumps(scale_point(K, d, per_class)))
        return 0
    results = run(args)
    print(format_table(results))
    m = results["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), torch {m['torch']}, "
          f"device {m['device_name']}; other processes' load {m.get('other_processes_load')}; "
          f"{results['seconds']:.0f}s")
    for note in results["notes"]:
        print(f"note: {note}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
