"""Exact resume after any interruption, proved with real processes (issue 7).

A run stopped at any moment (SIGTERM, SIGINT, SIGUSR1, SIGUSR2 mid-epoch; SIGKILL, also in the
middle of a checkpoint write; a crash; twice in one epoch; with other numbers of data-loader
workers, which persist across epochs) and restarted with `resume=auto` must end with the same
weights, bit for bit on CPU, and the same metrics.jsonl as a run that was never stopped (one
uninterrupted reference run, shared).

Every run here is a real OS process running the real `fixedcls-train` entry point
(`fixedcls.commands.train.main` with its own argv, cwd, environment, stdout/stderr, exit code and signals).
Starting Python and importing torch/timm/hydra costs ~5 s per process on a busy 2-core machine,
so by default the processes are forked from one warm server that has imported them once
(`CliServer`); set FIXEDCLS_TEST_PLAIN_SUBPROCESS=1 to start every run as a plain
`fixedcls-train ...` / `python -m ...` subprocess instead (same tests, same assertions, slower).
The helpers are shared by tests/test_checkpoint.py and tests/test_errors.py.
"""
from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utils import checkpoint_folder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PLAIN = os.environ.get("FIXEDCLS_TEST_PLAIN_SUBPROCESS") == "1"

# A run small enough for a shared 2-core machine, with augmentation and dropout on (so the
# augmentation and dropout randomness must be restored exactly), and enough steps per epoch
# (128 samples / 8 = 16) to stop it in the middle of an epoch: 36 per class, of which the validation
# split (data.val_fraction=0.1 of synthetic) holds 4, so its evaluation is resumed exactly too.
RUN = [
    "model.backbone=test_resnet",
    "model.drop_rate=0.25",
    "data=synthetic",
    "data.num_classes=4",
    "data.img_size=16",
    "data.train_per_class=36",
    "data.test_per_class=4",
    "data.batch_size=8",
    "data.augment=true",
    "data.num_workers=0",
    "trainer.epochs=2",
    "trainer.progress=false",
    "trainer.threads=1",
    "collapse.plot=false",
]


# Variables of a distributed launch (torchrun, SLURM, submitit): a test run is one process, whatever leaked here.
LAUNCH_KEYS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
               "MASTER_PORT"}
LAUNCH_PREFIXES = ("SLURM_", "SUBMITIT_", "TORCHELASTIC_")


def cli_env(extra: Optional[dict] = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_", "HYDRA_") + LAUNCH_PREFIXES) and k not in LAUNCH_KEYS}
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg", "WANDB_MODE": "disabled",
                "WANDB_SILENT": "true"})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(extra or {})
    return env


# ---------------------------------------------------------------------------------------------
# Real processes: a warm fork server (default) or plain subprocesses.

_SERVER_CODE = r"""
import atexit, gc, json, os, runpy, signal, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: F401  (plot_collapse imports it lazily; warm it up once)
import fixedcls.commands.train  # noqa: F401  (torch, timm, hydra, the configs)
import fixedcls.collapse  # noqa: F401
for optional in ("fixedcls.commands.compat",):
    try:
        __import__(optional)
    except Exception:
        pass
children = set()
gc.freeze()  # keep the warm heap shared with the children (no copy-on-write from the collector)

def reply(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()

def child(req):
    os.chdir(req["cwd"])
    for fd, name, flags in ((0, os.devnull, os.O_RDONLY), (1, req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        new = os.open(name, flags, 0o644)
        os.dup2(new, fd)
        os.close(new)
    os.environ.clear()
    os.environ.update(req["env"])
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):  # what a fresh interpreter has
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    sys.argv = list(req["argv"])
    code = 0
    try:
        if req.get("prelude"):
            exec(req["prelude"], {"__name__": "__prelude__"})
        if req["module"] == "fixedcls.commands.train":  # exactly what the fixedcls-train console script does
            from fixedcls.commands.train import main
            sys.exit(main())
        runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
    except SystemExit as stop:  # CPython's rules for the exit status
        if stop.code is None:
            code = 0
        elif isinstance(stop.code, int):
            code = stop.code
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())  # the traceback an uncaught exception prints
        code = 130 if isinstance(sys.exc_info()[1], KeyboardInterrupt) else 1
    # Exit as CPython does (atexit handlers, flushed stdio) but skip tearing down the module graph:
    # after a fork that would copy every page of torch and take seconds.
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)

reply({"ready": True})
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "run":
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(req)  # never returns: SystemExit or an uncaught exception ends the child like a real CLI
        children.add(pid)
        reply({"pid": pid})
    elif req["op"] == "poll":
        pid, status = os.waitpid(req["pid"], os.WNOHANG)
        if pid == 0:
            reply({"code": None})
        else:
            children.discard(pid)
            reply({"code": os.waitstatus_to_exitcode(status)})
for pid in children:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except OSError:
        pass
"""


class CliServer:
    """One warm Python process that forks a fresh process per CLI run."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER_CODE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=cli_env(), cwd=REPO, text=True, bufsize=1)
        self._read(timeout=300)
        atexit.register(self.close)

    def _read(self, timeout: float = 60) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError("the CLI fork server did not answer")
        return json.loads(line)

    def request(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


_server: Optional[CliServer] = None


def server() -> CliServer:
    global _server
    if _server is None or _server.proc.poll() is not None:
        _server = CliServer()
    return _server


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


class Proc:
    """A running CLI process: its pid, its output files, signals, wait()."""

    def __init__(self, args: list[str], cwd: Path, *, module: str = "fixedcls.commands.train", prelude: str = "",
                 env: Optional[dict] = None, name: Optional[str] = None):
        cwd = Path(cwd)
        cwd.mkdir(parents=True, exist_ok=True)
        name = name or next(f"cli{n}" for n in range(1, 1000) if not (cwd / f"cli{n}.stderr").exists())
        self.stdout_path, self.stderr_path = cwd / f"{name}.stdout", cwd / f"{name}.stderr"
        self.returncode: Optional[int] = None
        env = cli_env(env)
        if PLAIN:
            if prelude:  # the prelude patches the imported modules, so run the console script's code, not runpy
                entry = ("from fixedcls.commands.train import main\nsys.exit(main())" if module == "fixedcls.commands.train" else
                         f"import runpy\nrunpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
                launcher = [sys.executable, "-c", f"{prelude}\nimport sys\nsys.argv[0] = {module!r}\n{entry}"]
            elif module == "fixedcls.commands.train" and shutil.which("fixedcls-train", path=str(Path(sys.executable).parent)):
                launcher = [str(Path(sys.executable).parent / "fixedcls-train")]
            else:
                launcher = [sys.executable, "-m", module]
            with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
                self._popen = subprocess.Popen(launcher + list(args), cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                               stdout=out, stderr=err)
            self.pid = self._popen.pid
        else:
            self._popen = None
            self.pid = server().request(op="run", argv=[module] + list(args), cwd=str(cwd), env=env, module=module,
                                        prelude=prelude, stdout=str(self.stdout_path), stderr=str(self.stderr_path))["pid"]

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            self.returncode = self._popen.poll() if self._popen else server().request(op="poll", pid=self.pid)["code"]
        return self.returncode

    def wait(self, timeout: float = 120) -> Result:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.kill(signal.SIGKILL)
                while self.poll() is None:
                    time.sleep(0.05)
                raise AssertionError(f"process timed out after {timeout}s; stderr:\n{self.stderr}")
            time.sleep(0.02)
        return Result(self.returncode, self.stdout, self.stderr)

    def kill(self, signum: int) -> None:
        os.kill(self.pid, signum)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""


def run_cli(args: list[str], cwd: Path, *, timeout: float = 120, **kwargs) -> Result:
    """Run a CLI to the end: fixedcls-train by default, `module=` for `python -m <module>`."""
    return Proc(args, cwd, **kwargs).wait(timeout)


def wait_for(predicate, proc: Proc, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended (exit {proc.returncode}) before {what}; stderr:\n{proc.stderr}\nstdout:\n{proc.stdout}")
        if time.monotonic() > deadline:
            proc.kill(signal.SIGKILL)
            raise AssertionError(f"timed out waiting for {what}; stderr:\n{proc.stderr}")
        time.sleep(0.01)


def load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(path_a: Path, path_b: Path) -> None:
    a, b = load_state(path_a)["model"], load_state(path_b)["model"]
    assert a.keys() == b.keys()
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


# ---------------------------------------------------------------------------------------------
# The tests.

# The folder a fresh run of RUN claims: checkpoints/<run name>-<identity[:8]>/ (interruptions and workers
# change neither the name nor the identity, so every case here writes there).
NAME = checkpoint_folder(RUN, tiny=False)

# Stretches each training step of the second epoch by 100 ms (evaluation is untouched, the maths
# is unchanged) so a signal sent after the first epoch checkpoint lands in the middle of epoch 2.
SLOW = """
import time, torch, fixedcls.training.factories as _train
_create = _train.create_criterion
def _slow_criterion(*args, **kwargs):
    criterion = _create(*args, **kwargs)
    calls = [0]
    def slow(logits, target):
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] > AFTER:
                time.sleep(0.1)
        return criterion(logits, target)
    return slow
_train.create_criterion = _slow_criterion
"""
SLOW_FROM_START = "AFTER = 0\n" + SLOW
SLOW = "AFTER = 16\n" + SLOW

# An unexpected exception in the middle of epoch 2 (training step 24 of 32): a bug, an OOM, a lost disk.
CRASH = """
import torch, fixedcls.training.factories as _train
_create = _train.create_criterion
def _crashing_criterion(*args, **kwargs):
    criterion = _create(*args, **kwargs)
    calls = [0]
    def crash(logits, target):
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] == 24:
                raise RuntimeError("injected crash at training step 24")
        return criterion(logits, target)
    return crash
_train.create_criterion = _crashing_criterion
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted run, shared by every interruption case."""
    directory = tmp_path_factory.mktemp("reference")
    result = run_cli(RUN + ["hydra.run.dir=run"], directory)
    assert result.returncode == 0, result.stderr
    return directory


def assert_same_end(run: Path, checkpoints: Path, reference: Path) -> None:
    """Bit-identical weights (and optimizer state) and an identical metrics.jsonl."""
    assert_same_weights(checkpoints / "last.pt", reference / "checkpoints" / NAME / "last.pt")
    ours, theirs = load_state(checkpoints / "last.pt"), load_state(reference / "checkpoints" / NAME / "last.pt")
    assert (ours["epoch"], ours["step_in_epoch"], ours["global_step"]) == (theirs["epoch"], 0, theirs["global_step"])
    for a, b in zip(ours["optimizer"]["state"].values(), theirs["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))
    expected = (reference / "run" / "metrics.jsonl").read_text()
    assert [json.loads(line)["epoch"] for line in expected.splitlines()] == [1, 2]
    assert (run / "metrics.jsonl").read_text() == expected


# The run sends itself SIGTERM during training step 6 of epoch 1 (of 16), so it stops there at the next update
# whatever the machine's speed: no sleep, no race with the first epoch's end.
STOP_AT_STEP_6 = """
import os, signal, torch, fixedcls.training.factories as _train
_create = _train.create_criterion
def _stopping_criterion(*args, **kwargs):
    criterion = _create(*args, **kwargs)
    calls = [0]
    def stop(logits, target):
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] == 6:
                os.kill(os.getpid(), signal.SIGTERM)
        return criterion(logits, target)
    return stop
_train.create_criterion = _stopping_criterion
"""

# SIGKILL in the middle of writing the epoch-2 checkpoint (half of it on disk, in the temporary file).
KILL_IN_WRITE = """
import io, os, signal, torch
_save, _calls = torch.save, [0]
def _half_then_die(obj, f, *args, **kwargs):
    _calls[0] += 1
    if _calls[0] == 2 and hasattr(f, "write"):
        buffer = io.BytesIO()
        _save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return _save(obj, f, *args, **kwargs)
torch.save = _half_then_die
"""

STOPS = {"SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT, "SIGUSR1": signal.SIGUSR1, "SIGUSR2": signal.SIGUSR2,
         "SIGKILL": signal.SIGKILL}
DELAY = {"SIGTERM": 0.0, "SIGINT": 0.3, "SIGUSR1": 0.6, "SIGUSR2": 0.2, "SIGKILL": 0.3}  # after epoch 1: other steps


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGKILL", "crash", "SIGKILL-in-write",
                                 "SIGTERM+workers"])
def test_an_interrupted_run_resumes_bit_for_bit(reference, tmp_path, how):
    checkpoints = tmp_path / "checkpoints" / NAME
    # "+workers": loaded by 2 worker processes, resumed with 1 (the reference used none): the same batches.
    first_extra, second_extra = (["data.num_workers=2"], ["data.num_workers=1"]) if how.endswith("+workers") else ([], [])
    how = how.split("+")[0]
    if how == "crash":
        first = run_cli(RUN + ["hydra.run.dir=run1"], tmp_path, prelude=CRASH)
        assert first.returncode == 1 and "injected crash at training step 24" in first.stderr
    elif how == "SIGKILL-in-write":
        first = run_cli(RUN + ["hydra.run.dir=run1"], tmp_path, prelude=KILL_IN_WRITE)
        assert first.returncode == -signal.SIGKILL
        partial = [p.name for p in checkpoints.iterdir() if p.name.endswith(".tmp")]
        assert len(partial) == 1 and partial[0].startswith(".epoch_0002.pt."), partial
        assert load_state(checkpoints / "last.pt")["epoch"] == 1  # the previous checkpoint, intact
    else:
        proc = Proc(RUN + first_extra + ["hydra.run.dir=run1"], tmp_path, prelude=SLOW)
        wait_for(lambda: (checkpoints / "epoch_0001.pt").exists(), proc, what="the first epoch checkpoint")
        time.sleep(DELAY[how])
        proc.kill(STOPS[how])
        first = proc.wait()
        if how == "SIGKILL":
            assert first.returncode == -signal.SIGKILL
        else:
            # Honoured at the next step boundary: a mid-epoch checkpoint, a clear line, exit 128+signum.
            assert first.returncode == 128 + STOPS[how], first.stderr
            assert f"stopped by {how}" in first.stderr and "resume=auto" in first.stderr
            assert "Traceback" not in first.stderr
            stopped = load_state(checkpoints / "last.pt")
            assert stopped["epoch"] == 1 and 0 < stopped["step_in_epoch"] < 16, stopped["step_in_epoch"]
            assert stopped["global_step"] == 16 + stopped["step_in_epoch"]
            assert {p.name for p in checkpoints.glob("epoch_*.pt")} == {"epoch_0001.pt"}
    written = [json.loads(line)["epoch"] for line in (tmp_path / "run1" / "metrics.jsonl").read_text().splitlines()]
    # SIGKILL may land between checkpoint and row; a killed background write leaves its epoch's row without its
    # checkpoint (the resumed run rewrites metrics.jsonl from the checkpoint it resumes, checked below).
    assert written == [1] or (how == "SIGKILL" and written == []) or (how == "SIGKILL-in-write" and written == [1, 2])

    second = run_cli(RUN + second_extra + ["hydra.run.dir=run2", "resume=auto"], tmp_path)
    assert second.returncode == 0, second.stderr
    assert "resuming from" in second.stdout + second.stderr
    assert not [p for p in checkpoints.iterdir() if p.name.endswith(".tmp")]  # no debris of the killed write
    assert_same_end(tmp_path / "run2", checkpoints, reference)


def test_a_run_stopped_in_its_first_epoch_resumes_bit_for_bit_with_persistent_workers(reference, tmp_path):
    """Both runs load with 2 worker processes that persist across epochs (the reference used none): the resumed
    run starts mid-epoch 1 and its workers, started then, augment epoch 2 too; the evaluation loaders keep theirs."""
    checkpoints = tmp_path / "checkpoints" / NAME
    first = run_cli(RUN + ["data.num_workers=2", "hydra.run.dir=run1"], tmp_path, prelude=STOP_AT_STEP_6)
    assert first.returncode == 128 + signal.SIGTERM, first.stderr
    stopped = load_state(checkpoints / "last.pt")
    assert (stopped["epoch"], stopped["step_in_epoch"]) == (0, 6)
    second = run_cli(RUN + ["data.num_workers=2", "hydra.run.dir=run2", "resume=auto"], tmp_path)
    assert second.returncode == 0, second.stderr
    assert "resumed at epoch 1 step 6" in second.stdout + second.stderr
    assert_same_end(tmp_path / "run2", checkpoints, reference)


def test_a_run_interrupted_twice_mid_epoch_resumes_bit_for_bit(reference, tmp_path):
    """Stopped mid-epoch, resumed, stopped again later in the same epoch, resumed again: still the same end."""
    checkpoints = tmp_path / "checkpoints" / NAME
    proc = Proc(RUN + ["hydra.run.dir=run1"], tmp_path, prelude=SLOW)
    wait_for(lambda: (checkpoints / "epoch_0001.pt").exists(), proc, what="the first epoch checkpoint")
    proc.kill(signal.SIGTERM)
    assert proc.wait().returncode == 128 + signal.SIGTERM
    first_stop = load_state(checkpoints / "last.pt")["step_in_epoch"]

    proc = Proc(RUN + ["hydra.run.dir=run2", "resume=auto"], tmp_path, prelude=SLOW_FROM_START)
    wait_for(lambda: "resumed at epoch 2" in proc.stdout, proc, what="the resumed run")
    time.sleep(0.25)
    proc.kill(signal.SIGUSR1)
    assert proc.wait().returncode == 128 + signal.SIGUSR1
    second = load_state(checkpoints / "last.pt")
    assert second["epoch"] == 1 and first_stop < second["step_in_epoch"] < 16
    assert [json.loads(line)["epoch"] for line in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()] == [1]

    third = run_cli(RUN + ["hydra.run.dir=run3", "resume=auto"], tmp_path)
    assert third.returncode == 0, third.stderr
    assert_same_end(tmp_path / "run3", checkpoints, reference)
