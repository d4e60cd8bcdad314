"""Runs that share a machine (issue 28, item 7), timed for `python tools/bench.py --only share`, which makes
the figures (bench.bench_share, with the ratio statistics of every other figure).

Whole `fixedcls-train` processes of the default config, 3 epochs each, timed by the wall clock: two runs
one after the other and at once, a two-job sweep with the sequential and the parallel launcher, and two
lone runs with libgomp's own spin count.  Each round runs every contender once, in an order that flips
every round.  The epoch times are the runs' own (summary.json's time/train_s_per_epoch), so start-up cost
does not dilute them.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN = ["trainer.epochs=3", "collapse.plot=false", "trainer.progress=false"]
LIBGOMP_DEFAULT_SPINS = "300000"  # libgomp's spin count when neither OMP_WAIT_POLICY nor GOMP_SPINCOUNT is set


def _command() -> list[str]:
    found = shutil.which("fixedcls-train")
    return [found] if found else [sys.executable, "-m", "fixedcls.commands.train"]


def _environment(spins: str | None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update({"WANDB_MODE": "disabled", "MPLBACKEND": "Agg"})
    if spins is not None:
        env["GOMP_SPINCOUNT"] = spins
    return env


def _start(workdir: Path, tag: str, spins: str | None, sweep: list[str] = ()) -> subprocess.Popen:
    folder = workdir / tag
    folder.mkdir(parents=True, exist_ok=True)
    log = open(folder / "log", "w")
    flags = ["-m"] if sweep else []  # Hydra wants its flags before the overrides
    process = subprocess.Popen([*_command(), *flags, *RUN, *sweep], cwd=folder, env=_environment(spins), stdout=log,
                               stderr=subprocess.STDOUT)
    process.log_path = folder / "log"
    return process


def _wait(*processes: subprocess.Popen) -> None:
    for p in processes:
        if p.wait() != 0:
            last = p.log_path.read_text().strip().splitlines()[-3:]
            raise RuntimeError(f"bench share: a training run failed (exit {p.returncode}): {' '.join(map(str, p.args))}: "
                               + " / ".join(last))


def epoch_seconds(workdir: Path, tag: str) -> float:
    """A run's mean training seconds per epoch, from its summary.json (full precision, unlike the log line)."""
    summary, = (workdir / tag).glob("outputs/*/*/summary.json")
    return json.loads(summary.read_text())["time/train_s_per_epoch"]


def _timed(start) -> float:
    t = time.perf_counter()
    start()
    return time.perf_counter() - t


def time_sharing(*, rounds: int = 3) -> dict[str, list[float]]:
    """Seconds of every contender per round (`one_after_other`, `at_once`, `sweep_sequential`,
    `sweep_parallel`), and the seconds per epoch of every lone run (`lone_epoch`: the commands' spin count;
    `lone_epoch_spinning`: libgomp's own), two of each kind per round."""
    times: dict[str, list[float]] = {k: [] for k in ("one_after_other", "at_once", "sweep_sequential",
                                                       "sweep_parallel", "lone_epoch", "lone_epoch_spinning")}
    for r in range(rounds):
        with tempfile.TemporaryDirectory(prefix="fixedcls-share-") as tmp:
            work = Path(tmp)

            def one_after_other():
                _wait(_start(work, f"a{r}", None))
                _wait(_start(work, f"b{r}", None))

            def at_once():
                _wait(_start(work, f"c{r}", None), _start(work, f"d{r}", None))

            def sweep(launcher: str, tag: str):
                return lambda: _wait(_start(work, tag, None, [f"hydra/launcher={launcher}", "seed=0,1"]))

            def spinning():  # two runs, as one_after_other makes two with the commands' spin count
                _wait(_start(work, f"s{r}", LIBGOMP_DEFAULT_SPINS))
                _wait(_start(work, f"t{r}", LIBGOMP_DEFAULT_SPINS))

            order = [("one_after_other", one_after_other), ("at_once", at_once),
                     ("sweep_sequential", sweep("basic", f"q{r}")), ("sweep_parallel", sweep("parallel", f"p{r}")),
                     ("spinning", spinning)]
            if r % 2:
                order.reverse()
            took = {name: _timed(fn) for name, fn in order}
            for key in ("one_after_other", "at_once", "sweep_sequential", "sweep_parallel"):
                times[key].append(took[key])
            times["lone_epoch"] += [epoch_seconds(work, f"a{r}"), epoch_seconds(work, f"b{r}")]
            times["lone_epoch_spinning"] += [epoch_seconds(work, f"s{r}"), epoch_seconds(work, f"t{r}")]
        print(f"[bench] share round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
              file=sys.stderr, flush=True)
    return times
