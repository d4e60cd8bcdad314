#!/usr/bin/env python
"""fixedcls GPU check: one prepared script that measures a GPU in under 8 minutes and writes one JSON.

    python tools/gpu_check.py                          # on a CUDA machine: every section, 450 s budget
    python tools/gpu_check.py --json gpu_check.json --budget-s 450
    python tools/gpu_check.py --smoke                  # the same sections at the smallest sizes (a first try)
    python tools/gpu_check.py --device cpu --smoke     # on a CPU-only machine: the same code paths, tiny sizes
    python tools/gpu_check.py --only 'train/*,ddp'     # a subset (comma list of shell patterns)

Sections, run in this order (the first ones matter most on a first contact with a GPU):

  train/<fp32|bf16|fp16>   a 2-epoch default-style run through the real command (python -m fixedcls.commands.train,
                           what fixedcls-train runs) in a subprocess: exit code, wall seconds, final test
                           accuracy, NC1 on the train and test splits
  ddp                      torchrun with one process per visible GPU (NCCL; gloo on the CPU) on the config
                           of tests/test_distributed.py, then that test's checks: one run directory, one
                           checkpoint set, each rank's RNG state, the logged collapse measures and
                           accuracies equal to a one-process measurement of the saved checkpoint
  step/<bf16|fp16>/<eager|compile>   tools/bench.py's bench_step: images/s of the fixed simplex head and
                           of the learned head, channels_last (ResNet-50 at 224x224, batch 64)
  loop/<bf16|fp16>/<eager|compile>   tools/bench.py's bench_loop on the default run (build_run with
                           trainer.device, precision, compile, channels_last): fit against the plain loop,
                           collapse online/exact and AGOP against collapse off

The budget (--budget-s) is enforced: a section that would start after it is skipped with the reason
"time budget", and one still running when it runs out is stopped (a subprocess is killed with its
process group) and recorded the same way.  A section that fails is recorded with one line and the next
one runs; the exit status is 1 when any section failed, 2 on a usage error, 0 otherwise.  Sections
this machine cannot run (no CUDA device, fp16 on the CPU, torch.compile in a CPU smoke run) are skipped with
their reason, also printed on stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import gc
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

BENCH_PRECISIONS = ("bf16", "fp16")
TRAIN_PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_BUDGET_S = 450.0  # 8 minutes minus start-up, the JSON and the slack of a section stopped mid-way

# The run of tests/test_distributed.py (odd split sizes: uneven shards, a padded last batch).
DDP_OVERRIDES = [
    "model.backbone=test_resnet", "data=synthetic", "data.num_classes=3", "data.img_size=16",
    "data.train_per_class=13", "data.test_per_class=5", "data.batch_size=16", "data.eval_batch_size=1",
    "trainer.epochs=2", "trainer.progress=false", "collapse.max_samples=25",
]
# The tiny job of tests/utils.py (TINY), at 32x32: at 16x16 the toy model's last stages are 1x1 and CPU bf16
# overflows its gradients in most seeds (README, "Numerical faults"), which would fail the bf16 sections.
SMOKE_RUN = [
    "model.backbone=test_resnet", "data=synthetic", "data.num_classes=4", "data.img_size=32",
    "data.train_per_class=12", "data.test_per_class=4", "data.batch_size=16",
]
# How close a DDP run's logged collapse measures must be to a one-process measurement (the test's rel and abs 1e-6).
DDP_REL_TOL = 1e-6
DDP_CHECKPOINT_FILES = ["best.pt", "epoch_0001.pt", "epoch_0002.pt", "last.pt", "run.json"]
_LAUNCH_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SUBMITIT_EXECUTOR")


class BudgetExhausted(BaseException):
    """The time budget ran out inside a section (a BaseException: no `except Exception` in the library swallows it)."""


class SectionFailed(Exception):
    """A section that ran to its end and found a fault: the message is the one line, `results` what it measured."""

    def __init__(self, message: str, results: dict):
        super().__init__(message)
        self.results = results


@dataclass
class Section:
    name: str
    run: Callable[[Path], dict]
    skip: Optional[str] = None  # the reason, decided before anything runs
    outcome: dict = field(default_factory=dict)


def load_bench():
    spec = importlib.util.spec_from_file_location("fixedcls_bench", ROOT / "tools" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def say(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# the machine
# --------------------------------------------------------------------------------------------
def environment(bench, device: torch.device) -> dict:
    """tools/bench.py's machine record, with the CUDA stack and the GPU's properties."""
    import hydra

    info = bench.machine_info(device)
    info.update(hydra=hydra.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                device_count=torch.cuda.device_count() if torch.cuda.is_available() else 0,
                cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(compute_capability=f"{props.major}.{props.minor}", device_memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count, bf16_supported=torch.cuda.is_bf16_supported())
        try:  # a build without NCCL still measures everything but the DDP section
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except (AttributeError, RuntimeError) as error:
            info["nccl"] = f"unknown ({type(error).__name__}: {error})"
    return info


# --------------------------------------------------------------------------------------------
# sections: the benchmark (in this process)
# --------------------------------------------------------------------------------------------
def release(device: torch.device, compiled: bool) -> None:
    """Free what a section left: its models on the GPU and, after torch.compile, dynamo's caches.

    dynamo keys its cache on the code of forward(), shared by every model instance: without a reset the
    next section's models count towards the recompile limit and silently fall back to eager."""
    gc.collect()
    if compiled:
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        counters.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def dynamo_counts() -> dict:
    """What torch.compile did since the last release(): graphs compiled and graph breaks (each break runs eager)."""
    from torch._dynamo.utils import counters

    return {"unique_graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "frames_compiled": counters["frames"]["ok"]}


def step_section(bench, device: torch.device, precision: str, compiled: bool, smoke: bool) -> Callable[[Path], dict]:
    def run(workdir: Path) -> dict:
        if smoke:
            sizes = {"backbone": "test_resnet", "img_size": 16, "in_chans": 3, "num_classes": 4, "batch_size": 8}
            rounds = {"steps": 1, "rounds": 1, "warmup": 1 if compiled else 0}
        else:
            sizes = dict(bench.GPU_STEP)
            rounds = {"steps": 5, "rounds": 8, "warmup": 1}  # the warm-up round compiles both models
        release(device, compiled)
        try:
            out = bench.bench_step(**sizes, **rounds, device=device, precision=precision, channels_last=True,
                                   compile=compiled)
            if compiled:
                out["dynamo"] = dynamo_counts()
        finally:
            release(device, compiled)
        return out

    return run


def loop_section(bench, device: torch.device, precision: str, compiled: bool, smoke: bool,
                 extra: list[str]) -> Callable[[Path], dict]:
    def run(workdir: Path) -> dict:
        overrides = [f"trainer.device={device.type}", f"trainer.precision={precision}",
                     f"trainer.compile={str(compiled).lower()}", "trainer.channels_last=true"]
        if smoke:
            overrides = [*SMOKE_RUN, *overrides]
        release(device, compiled)
        try:
            built = bench.build_run([*overrides, *extra], workdir)
            out = bench.bench_loop(built, workdir, rounds=1 if smoke else 3, warmup=1 if compiled or not smoke else 0,
                                   epochs=1 if smoke else 2)
            if compiled:
                out["dynamo"] = dynamo_counts()
        finally:
            built = None
            release(device, compiled)
        if precision == "fp16":
            out["note"] = ("fit trains fp16 with a GradScaler (unscale and inf checks each step); the plain loop "
                           "has none, so loop_overhead_vs_plain charges the scaler to fit")
        return out

    return run


# --------------------------------------------------------------------------------------------
# sections: real commands (subprocesses)
# --------------------------------------------------------------------------------------------
def child_env(workdir: Path) -> dict:
    scratch = workdir / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, WANDB_MODE="disabled", HYDRA_FULL_ERROR="1", MPLBACKEND="Agg", TMPDIR=str(scratch),
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    for key in _LAUNCH_KEYS:  # this process may itself run under a launcher: the child starts its own world
        env.pop(key, None)
    return env


def launch(cmd: list[str], workdir: Path) -> dict:
    """Run `cmd` in `workdir` in a process group of its own; killed with its children if this process is
    interrupted (the budget, Ctrl-C).  Returns exit code, seconds, and the output's tail."""
    log_path = workdir / "output.log"
    started = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.Popen(cmd, cwd=workdir, env=child_env(workdir), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            code = process.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    return {"command": " ".join(cmd), "exit_code": code, "seconds": time.perf_counter() - started, "output_tail": lines[-20:]}


def failure_line(lines: list[str]) -> str:
    """The line that says why a command failed: fixedcls's one-line error, else a traceback's last line."""
    for line in reversed(lines):
        if "fixedcls: error:" in line:
            return line[line.index("fixedcls: error:"):]
    return lines[-1] if lines else "no output"


def train_section(device: torch.device, precision: str, smoke: bool, extra: list[str]) -> Callable[[Path], dict]:
    def run(workdir: Path) -> dict:
        overrides = [*(SMOKE_RUN if smoke else []), "trainer.epochs=2", f"trainer.device={device.type}",
                     f"trainer.precision={precision}", "trainer.progress=false",
                     f"checkpoint.root={workdir / 'checkpoints'}", f"hydra.run.dir={workdir / 'run'}", *extra]
        out = launch([sys.executable, "-m", "fixedcls.commands.train", *overrides], workdir)
        if out["exit_code"] != 0:
            raise SectionFailed(f"exit code {out['exit_code']}: {failure_line(out['output_tail'])}", out)
        summary = json.loads((workdir / "run" / "summary.json").read_text())
        out.update({key: summary.get(f"final/{key}") for key in
                    ("test/acc", "val/acc", "train/loss", "collapse/nc1", "collapse_test/nc1")})
        out.update(epochs=summary.get("epochs"), train_s_per_epoch=summary.get("time/train_s_per_epoch"))
        del out["output_tail"]
        missing = [key for key in ("test/acc", "collapse/nc1") if out[key] is None]
        if missing or out["epochs"] != 2:
            raise SectionFailed(f"summary.json of a 2-epoch run has epochs={out['epochs']} and lacks "
                                f"{', '.join('final/' + key for key in missing) or 'nothing'}", out)
        return out

    return run


def ddp_section(bench, device: torch.device, nproc: int, extra: list[str]) -> Callable[[Path], dict]:
    def run(workdir: Path) -> dict:
        overrides = [*DDP_OVERRIDES, f"trainer.device={device.type}", f"checkpoint.root={workdir / 'checkpoints'}", *extra]
        out = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                      "-m", "fixedcls.commands.train", *overrides], workdir)
        out.update(nproc=nproc, backend="nccl" if device.type == "cuda" else "gloo")
        if nproc == 1:
            out["note"] = ("one process: torchrun --nproc_per_node=1 is a world of one in fixedcls (no process group, "
                           "no DDP wrapper; fixedcls.distributed.launch_env)"
                           + ("; NCCL refuses two ranks on one GPU" if device.type == "cuda" else ""))
        if out["exit_code"] != 0:
            raise SectionFailed(f"exit code {out['exit_code']}: {failure_line(out['output_tail'])}", out)
        del out["output_tail"]
        checks, details = ddp_checks(bench, workdir, device, nproc)
        out.update(checks=checks, **details, matches_tests=all(checks.values()))
        if not out["matches_tests"]:
            raise SectionFailed(f"the DDP run differs from what tests/test_distributed.py checks: "
                                f"{', '.join(k for k, ok in checks.items() if not ok)}", out)
        return out

    return run


def ddp_checks(bench, workdir: Path, device: torch.device, world_size: int) -> tuple[dict, dict]:
    """tests/test_distributed.py's checks of a torchrun launch, on the launch folder `workdir`."""
    from fixedcls.runs.rebuild import load_trained
    from fixedcls.collapse import measure_model
    from fixedcls.data.loaders import create_loaders

    checks: dict[str, bool] = {}
    metrics = sorted(workdir.rglob("metrics.jsonl"))
    checks["one_run_dir"] = len(metrics) == 1 and metrics[0].parent.parent.parent == workdir / "outputs"
    if not metrics:
        return checks, {}
    run_dir = metrics[0].parent
    checks["no_rank_hydra_dirs"] = sorted(p.parent for p in workdir.rglob(".hydra")) == [run_dir]
    checks["rank_scratch_removed"] = not list((workdir / "tmp").glob("fixedcls-rank*"))
    folders = list((workdir / "checkpoints").iterdir())
    checks["one_checkpoint_set"] = (len(folders) == 1
                                    and sorted(p.name for p in folders[0].iterdir()) == DDP_CHECKPOINT_FILES)
    rows = [json.loads(line) for line in metrics[0].read_text().splitlines()]
    checks["epochs_logged"] = [row["epoch"] for row in rows] == [1, 2]
    last = rows[-1]

    model, cfg, bundle = load_trained(folders[0] / "last.pt")
    state = torch.load(folders[0] / "last.pt", map_location="cpu", weights_only=True)
    ranks = state.get("rng_ranks")
    checks["rng_state_per_rank"] = (state["epoch"] == 2 and
                                    (len(ranks) == world_size if world_size > 1 else ranks is None))
    model = model.to(device)
    _, train_eval, test = create_loaders(bundle, batch_size=cfg.data.batch_size, eval_batch_size=cfg.data.eval_batch_size,
                                         seed=cfg.seed)
    differing: list[str] = []
    measured, worst = 0, 0.0
    for prefix, loader in (("collapse/", train_eval), ("collapse_test/", test)):
        single = measure_model(model, loader, device=device, max_samples=cfg.collapse.max_samples)
        measured += len(single)
        differing += [prefix + key for key, value in single.items() if not same_value(last.get(prefix + key), value)]
        logged = {key: last[prefix + key] for key in single if prefix + key in last}
        worst = max(worst, bench.max_rel_diff(logged, single))
    checks["collapse_equals_one_process"] = measured > 0 and not differing
    # One sample at a time, as the run evaluated (data.eval_batch_size=1): on a GPU, convolutions of another
    # batch shape may take other (TF32) kernels and flip a near tie.
    accuracy_diff = 0.0
    for split, dataset in (("test", bundle.test), ("val", bundle.val)):
        with torch.no_grad():
            samples = (dataset[i] for i in range(len(dataset)))
            correct = sum(int(model(x.unsqueeze(0).to(device)).argmax(1).item() == int(y)) for x, y in samples)
        accuracy_diff = max(accuracy_diff, abs(last[f"{split}/acc"] - correct / len(dataset)))
    checks["accuracy_equals_one_process"] = accuracy_diff <= 1e-12
    return checks, {"collapse_measures_compared": measured, "collapse_differing": differing, "collapse_max_rel_diff": worst,
                    "accuracy_max_diff": accuracy_diff, "test/acc": last["test/acc"], "collapse/nc1": last.get("collapse/nc1")}


def same_value(logged: Optional[float], measured: float) -> bool:
    """The test's pytest.approx(measured, rel=1e-6, abs=1e-6); NaN equals NaN (a measure undefined in both)."""
    if logged is None:
        return False
    if math.isnan(logged) or math.isnan(measured):
        return math.isnan(logged) and math.isnan(measured)
    return abs(logged - measured) <= max(DDP_REL_TOL * abs(measured), DDP_REL_TOL)


# --------------------------------------------------------------------------------------------
# the plan and the run
# --------------------------------------------------------------------------------------------
def plan(bench, args, device: torch.device) -> list[Section]:
    cuda = device.type == "cuda"
    sections: list[Section] = []
    for precision in TRAIN_PRECISIONS:
        sections.append(Section(f"train/{precision}", train_section(device, precision, args.smoke, args.override)))
    nproc = args.nproc or (torch.cuda.device_count() if cuda and torch.cuda.is_available() else 2)
    sections.append(Section("ddp", ddp_section(bench, device, nproc, args.override)))
    for compiled in (False, True):  # eager first: the budget cuts compilation (minutes per model) before anything else
        mode = "compile" if compiled else "eager"
        for precision in BENCH_PRECISIONS:
            sections.append(Section(f"step/{precision}/{mode}", step_section(bench, device, precision, compiled, args.smoke)))
            sections.append(Section(f"loop/{precision}/{mode}",
                                    loop_section(bench, device, precision, compiled, args.smoke, args.override)))
    patterns = [p.strip() for p in args.only.split(",")] if args.only else None
    for section in sections:
        section.skip = skip_reason(section.name, device, args, patterns)
    return sections


def skip_reason(name: str, device: torch.device, args, patterns: Optional[list[str]]) -> Optional[str]:
    if patterns is not None and not any(fnmatch.fnmatchcase(name, p) for p in patterns):
        return f"not selected by --only {args.only}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return ("needs CUDA: no CUDA device is visible (torch.cuda.is_available() is False); "
                "--device cpu --smoke runs the same code paths on the CPU")
    if "/bf16" in name and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return f"bf16 is not supported by {torch.cuda.get_device_name(device)}"
    if "/fp16" in name and device.type != "cuda":
        return "fp16 needs CUDA: fixedcls refuses trainer.precision=fp16 on the CPU (no gradient scaling there)"
    if name.endswith("/compile") and args.smoke and device.type == "cpu":
        return ("torch.compile is skipped in a CPU smoke run: compiling even the toy model takes minutes on a small "
                "CPU; a CUDA run compiles, --smoke included")
    return None


def one_line(error: BaseException) -> str:
    return (" ".join(str(error).split()) or type(error).__name__)[:2000]


def run_sections(sections: list[Section], *, budget_s: float, workdir: Path,
                 after_each: Callable[[], None] = lambda: None) -> None:
    """Run the sections in order within `budget_s` seconds, each in a folder of its own under `workdir`;
    `after_each()` is called when a section's outcome is known (main writes the JSON then, so a run killed
    from outside keeps what it measured)."""
    started = time.perf_counter()

    def out_of_time(signum, frame):
        raise BudgetExhausted

    previous = signal.signal(signal.SIGALRM, out_of_time)
    try:
        for section in sections:
            if section.skip is not None:
                section.outcome = {"status": "skipped", "reason": section.skip}
                say(f"skip {section.name}: {section.skip}")
                after_each()
                continue
            left = budget_s - (time.perf_counter() - started)
            if left <= 0:
                section.outcome = {"status": "skipped", "reason": f"time budget ({budget_s:g} s spent)"}
                say(f"skip {section.name}: time budget")
                after_each()
                continue
            say(f"{section.name} ...")
            folder = workdir / section.name.replace("/", "-")
            folder.mkdir(parents=True, exist_ok=False)
            begin = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3))  # below a microsecond setitimer would disarm
            try:
                section.outcome = {"status": "ok", "results": section.run(folder)}
            except BudgetExhausted:
                section.outcome = {"status": "skipped",
                                   "reason": f"time budget ({budget_s:g} s): stopped after {time.perf_counter() - begin:.0f} s"}
            except SectionFailed as failure:
                section.outcome = {"status": "failed", "error": one_line(failure), "results": failure.results}
            except Exception as error:  # one line per failure; the next section still runs
                section.outcome = {"status": "failed", "error": f"{type(error).__name__}: {one_line(error)}"}
                log = folder / "output.log"
                if log.is_file():
                    section.outcome["output_tail"] = log.read_text(errors="replace").splitlines()[-20:]
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            section.outcome["seconds"] = round(time.perf_counter() - begin, 2)
            status = section.outcome["status"]
            detail = section.outcome.get("error") or section.outcome.get("reason") or ""
            say(f"{section.name}: {status} ({section.outcome['seconds']:.1f} s){' - ' + detail if detail else ''}")
            after_each()
    finally:
        signal.signal(signal.SIGALRM, previous)


#: section kind -> the figures gathered into the report's "figures" (everything else stays under "sections").
HEADLINES = {
    "train": ("seconds", "test/acc", "collapse/nc1", "collapse_test/nc1", "train_s_per_epoch"),
    "ddp": ("matches_tests", "seconds", "nproc", "backend", "collapse_max_rel_diff"),
    "step": ("images_per_second_fixed", "images_per_second_learned", "step_ratio_fixed_vs_learned"),
    "loop": ("loop_overhead_vs_plain", "collapse_overhead_online", "collapse_overhead_exact", "agop_overhead"),
}


def headline(sections: list[Section]) -> dict:
    figures = {}
    for section in sections:
        results = section.outcome.get("results")
        if results and section.outcome["status"] == "ok":
            keys = HEADLINES[section.name.split("/")[0]]
            figures[section.name] = {key: results[key] for key in keys if key in results}
    return figures


def report(sections: list[Section], env: dict, args, seconds: float) -> dict:
    return {
        "tool": "tools/gpu_check.py", "started_utc": args.started_utc, "argv": sys.argv[1:],
        "smoke": args.smoke, "budget_s": args.budget_s, "seconds": round(seconds, 2),
        "device_name": env.get("device_name"), "environment": env,
        "figures": headline(sections),
        "sections": {s.name: s.outcome or {"status": "not run yet"} for s in sections},
        "failed": [s.name for s in sections if s.outcome.get("status") == "failed"],
        "skipped": {s.name: s.outcome["reason"] for s in sections if s.outcome.get("status") == "skipped"},
    }


def write_report(sections: list[Section], env: dict, args, started: float) -> dict:
    """Write the report as it stands (a file replaced whole, never half written) and return it."""
    results = report(sections, env, args, time.perf_counter() - started)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    partial = args.json.with_name(args.json.name + ".partial")
    partial.write_text(json.dumps(results, indent=2, default=str) + "\n")
    os.replace(partial, args.json)
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cuda (default) or cpu (with --smoke)")
    p.add_argument("--smoke", action="store_true", help="every section at its smallest size (toy model, 1 round)")
    p.add_argument("--json", type=Path, default=Path("gpu_check.json"), help="where the results go (default: %(default)s)")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help="seconds after which the remaining sections are skipped (default: %(default)g)")
    p.add_argument("--only", help="comma list of section patterns, e.g. 'train/*,ddp,step/bf16/*'")
    p.add_argument("--nproc", type=int, help="processes of the DDP run (default: the visible GPUs; 2 on the CPU)")
    p.add_argument("--override", action="append", default=[],
                   help="extra Hydra override for every run (train, ddp, loop sections)")
    p.add_argument("--keep", type=Path, help="keep the runs' folders (logs, checkpoints) here instead of a temp dir")
    args = p.parse_args(argv)
    if args.device == "cpu" and not args.smoke:
        p.error("--device cpu runs the check at its smallest sizes only: add --smoke")
    if args.budget_s <= 0:
        p.error(f"--budget-s must be positive, got {args.budget_s:g}")
    if args.keep is not None and args.keep.exists() and any(args.keep.iterdir()):
        p.error(f"--keep {args.keep} is not empty: name a new or empty folder (the DDP checks read every file in it)")
    if args.nproc is not None and args.nproc < 1:
        p.error(f"--nproc must be at least 1, got {args.nproc}")
    args.started_utc = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device)
    bench = load_bench()
    visible = device.type == "cpu" or torch.cuda.is_available()
    env = environment(bench, device if visible else torch.device("cpu"))
    if not visible:
        env["device"] = "cuda (not visible: the device name is the CPU's)"
    sections = plan(bench, args, device)
    with contextlib.ExitStack() as stack:
        if args.keep:
            workdir = args.keep
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            # A section stopped at the budget may leave a background checkpoint write behind: clean up what can be.
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fixedcls-gpu-check-",
                                                                           ignore_cleanup_errors=True)))
        run_sections(sections, budget_s=args.budget_s, workdir=workdir,
                     after_each=lambda: write_report(sections, env, args, started))
    results = write_report(sections, env, args, started)
    ran = sum(s.outcome.get("status") == "ok" for s in sections)
    say(f"{ran} sections ran, {len(results['skipped'])} skipped, {len(results['failed'])} failed "
        f"in {results['seconds']:.0f} s on {results['device_name']}; results in {args.json}")
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
