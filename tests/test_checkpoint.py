"""Checkpoints are safe to write, read and resume from, and a run is never lost to a side failure (issue 7).

* atomic writes: a process killed in the middle of a write leaves the previous checkpoint intact;
* a truncated or corrupt file is a one-line error naming it, and resume=auto skips to the newest good one;
* loading is torch.load(weights_only=True) only: a poisoned pickle is refused and none of its code runs;
* the newest `checkpoint.keep` epoch files are kept;
* non-finite losses or weights stop the run with the last good checkpoint intact;
* W&B, disk and plotting failures warn and training goes on.
"""
from __future__ import annotations

import io
import json
import os
import signal
import struct
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_errors import TINY, assert_one_line_error  # noqa: E402
from test_resume import LAUNCH_KEYS, LAUNCH_PREFIXES, load_state, run_cli  # noqa: E402

from fixedcls.runs import checkpoints as ckpt  # noqa: E402
from fixedcls.runs import folders as runs  # noqa: E402
from fixedcls.errors import CheckpointWriteError, FixedclsError  # noqa: E402

from utils import checkpoint_folder  # noqa: E402

NAME = checkpoint_folder(TINY, tiny=False)  # the folder of a fresh run of TINY (more epochs or keep: the same)


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    """The in-process runs here are single-process runs, whatever launch variables an earlier test left."""
    for key in list(os.environ):
        if key in LAUNCH_KEYS or key.startswith(LAUNCH_PREFIXES):
            monkeypatch.delenv(key)


def fake_state(epoch: int, step: int = 0, value: float = 0.0) -> dict:
    layer = nn.Linear(4, 3)
    nn.init.constant_(layer.weight, value)
    return {"model": {**layer.state_dict(), "big": torch.arange(2048, dtype=torch.float32)}, "epoch": epoch,
            "step_in_epoch": step, "history": [], "marker": value}


def cli(tmp_path: Path, args: list[str], **kwargs):
    quiet = [] if any(a.startswith("hydra/job_logging=") for a in args) else ["hydra/job_logging=disabled"]
    return run_cli(TINY + args + quiet, tmp_path, timeout=90, **kwargs)


# ------------------------------------------------------------------ atomic writes

def test_a_kill_in_the_middle_of_a_write_keeps_the_previous_checkpoint(tmp_path):
    """A real process SIGKILLed half-way through writing last.pt: the old last.pt still loads."""
    path = tmp_path / "last.pt"
    ckpt.atomic_save(fake_state(1, value=1.0), path)
    pid = os.fork()
    if pid == 0:  # the child writes half of a new checkpoint, then dies the hard way
        try:
            real_save = torch.save

            def half_then_die(obj, f, *args, **kwargs):
                buffer = io.BytesIO()
                real_save(obj, buffer)
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)

            torch.save = half_then_die
            ckpt.atomic_save(fake_state(2, value=2.0), path)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL
    assert ckpt.load(path)["marker"] == 1.0  # the previous, complete checkpoint
    partial = [p for p in tmp_path.iterdir() if p.name != "last.pt"]
    assert len(partial) == 1 and partial[0].name.startswith(".last.pt.") and partial[0].name.endswith(".tmp")
    with pytest.raises(FixedclsError, match="truncated or corrupt"):
        ckpt.load(partial[0])
    assert ckpt.candidates(tmp_path) == [path]  # never a candidate for resume
    ckpt.CheckpointWriter(tmp_path)  # the next run clears the debris
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    ckpt.atomic_save(fake_state(1, value=1.0), tmp_path / "last.pt")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        ckpt.atomic_save(fake_state(2, value=2.0), tmp_path / "last.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert ckpt.load(tmp_path / "last.pt")["marker"] == 1.0


# ------------------------------------------------------------------ corrupt files

def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(b"definitely not a checkpoint" * 10)
    elif how == "bitflip":  # one bit inside the tensor bytes: caught by the zip records' CRC32
        body = bytearray(data)
        body[data.index(struct.pack("<f", 1000.0))] ^= 0x01
        path.write_bytes(bytes(body))


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage", "bitflip"])
def test_a_damaged_checkpoint_is_a_clear_error_naming_it(tmp_path, how):
    path = tmp_path / "epoch_0003.pt"
    ckpt.atomic_save(fake_state(3), path)
    _damage(path, how)
    with pytest.raises(FixedclsError) as raised:
        ckpt.load(path)
    message = str(raised.value)
    assert str(path) in message and "truncated or corrupt" in message and "\n" not in message
    assert "pickled" not in message


def test_the_newest_good_checkpoint_is_chosen(tmp_path):
    warnings_seen = []
    ckpt.atomic_save(fake_state(1, value=1.0), tmp_path / "epoch_0001.pt")
    ckpt.atomic_save(fake_state(2, value=2.0), tmp_path / "epoch_0002.pt")
    # Killed between writing epoch_0002.pt and pointing last.pt at it: last.pt is older, the epoch file wins.
    ckpt.atomic_save(fake_state(1, value=1.0), tmp_path / "last.pt")
    assert ckpt.load_newest_good(tmp_path, warnings_seen.append)[0].name == "epoch_0002.pt"
    # A mid-epoch stop (epoch 2, step 5) is newer than the end of epoch 2.
    ckpt.atomic_save(fake_state(2, step=5, value=2.5), tmp_path / "last.pt")
    assert ckpt.load_newest_good(tmp_path, warnings_seen.append)[0].name == "last.pt"
    # Damaged files are skipped with a warning naming them.
    _damage(tmp_path / "last.pt", "truncated")
    _damage(tmp_path / "epoch_0002.pt", "bitflip")
    path, state = ckpt.load_newest_good(tmp_path, warnings_seen.append)
    assert path.name == "epoch_0001.pt" and state["marker"] == 1.0
    assert any("last.pt" in w for w in warnings_seen) and any("epoch_0002.pt" in w for w in warnings_seen)
    # resume=auto through resolve, and resume=<folder>.
    identity = "0" * 64
    assert runs.resolve(tmp_path, "x", str(tmp_path), "auto", identity, warn=warnings_seen.append).resume_path.name == "epoch_0001.pt"
    assert runs.resolve(tmp_path, "x", None, str(tmp_path), identity, warn=warnings_seen.append).resume_path.name == "epoch_0001.pt"


def test_resume_auto_falls_back_to_the_newest_good_checkpoint(tmp_path):
    """Real processes: 3 epochs, last.pt and epoch_0003.pt damaged, resume=auto continues from epoch 2."""
    first = cli(tmp_path, ["trainer.epochs=3", "checkpoint.keep=3", "hydra.run.dir=run1"])
    assert first.returncode == 0, first.stderr
    directory = tmp_path / "checkpoints" / NAME
    _damage(directory / "last.pt", "truncated")
    _damage(directory / "epoch_0003.pt", "garbage")
    second = cli(tmp_path, ["trainer.epochs=4", "checkpoint.keep=3", "hydra.run.dir=run2", "resume=auto",
                            "hydra/job_logging=default"])
    assert second.returncode == 0, second.stderr
    output = second.stdout + second.stderr
    assert f"skipping checkpoint {Path('checkpoints') / NAME / 'last.pt'} is truncated or corrupt" in output
    assert "epoch_0003.pt is truncated or corrupt" in output
    assert "resuming from" in output and "epoch_0002.pt" in output
    rows = [json.loads(line) for line in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4]
    assert load_state(directory / "last.pt")["epoch"] == 4
    assert sorted(p.name for p in directory.glob("epoch_*.pt")) == ["epoch_0002.pt", "epoch_0003.pt", "epoch_0004.pt"]


# ------------------------------------------------------------------ poisoned pickles

class Poison:
    """Unpickling this runs open(path, 'w'): it creates a file, the proof that code from a checkpoint ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def poisoned(path: Path, marker: Path, base: dict | None = None) -> Path:
    torch.save({**(base or fake_state(1)), "extra": Poison(marker)}, path)
    return path


def test_the_poison_is_live(tmp_path):
    """The control: loaded the unsafe way, the poisoned file does run code (so the tests below mean something)."""
    marker = tmp_path / "control-marker"
    torch.load(poisoned(tmp_path / "control.pt", marker), weights_only=False)
    assert marker.exists()


def test_a_poisoned_checkpoint_is_refused_in_process(tmp_path):
    marker = tmp_path / "PWNED"
    path = poisoned(tmp_path / "last.pt", marker)
    with pytest.raises(FixedclsError) as raised:
        ckpt.load(path)
    message = str(raised.value)
    assert str(path) in message and "pickled Python object" in message and "open" in message
    assert "weights_only=True" in message and "\n" not in message
    assert ckpt.load_newest_good(tmp_path, lambda _: None) == (None, None)
    assert not marker.exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished one-epoch run (checkpoints/<NAME>/ with last.pt and epoch_0001.pt)."""
    directory = tmp_path_factory.mktemp("trained")
    result = cli(directory, ["hydra.run.dir=run"])
    assert result.returncode == 0, result.stderr
    return directory


def test_a_poisoned_checkpoint_is_refused_by_resume_path(tmp_path, trained):
    marker = tmp_path / "PWNED"
    path = poisoned(tmp_path / "poisoned.pt", marker, load_state(trained / "checkpoints" / NAME / "last.pt"))
    result = cli(tmp_path, [f"resume={path}", "hydra.run.dir=run"])
    assert_one_line_error(result, str(path), "pickled Python object", "refused")
    assert not marker.exists()


def test_a_poisoned_checkpoint_is_skipped_by_resume_auto(tmp_path, trained):
    import shutil

    marker = tmp_path / "PWNED"
    shutil.copytree(trained / "checkpoints", tmp_path / "checkpoints")
    directory = tmp_path / "checkpoints" / NAME
    good = load_state(directory / "epoch_0001.pt")
    (directory / "last.pt").unlink()
    poisoned(directory / "last.pt", marker, {**good, "epoch": 7})  # claims to be newer: still never loaded
    result = cli(tmp_path, ["trainer.epochs=2", "resume=auto", "hydra.run.dir=run", "hydra/job_logging=default"])
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "last.pt carries a pickled Python object" in output and "epoch_0001.pt" in output
    assert "Traceback" not in result.stderr
    assert load_state(directory / "last.pt")["epoch"] == 2
    assert not marker.exists()


@pytest.mark.parametrize("module,args", [
    ("fixedcls.collapse", ["{path}"]),
    ("fixedcls.commands.compat", ["{path}", "{path}"]),
])
def test_a_poisoned_checkpoint_is_refused_by_the_other_clis(tmp_path, trained, module, args):
    pytest.importorskip(module)
    marker = tmp_path / "PWNED"
    path = poisoned(tmp_path / "poisoned.pt", marker, load_state(trained / "checkpoints" / NAME / "last.pt"))
    result = run_cli([a.format(path=path) for a in args], tmp_path, module=module, timeout=90)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert str(path) in result.stderr and "pickled Python object" in result.stderr
    assert not marker.exists()


# ------------------------------------------------------------------ keep

def test_only_the_newest_keep_epoch_files_are_kept(tmp_path):
    writer = ckpt.CheckpointWriter(tmp_path, keep=2, best_metric="test/acc")
    for epoch, acc in zip(range(1, 6), [0.9, 0.5, 0.6, 0.7, 0.8]):  # the best epoch is the first
        writer.save_epoch(fake_state(epoch, value=float(epoch)), {"test/acc": acc})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "epoch_0004.pt", "epoch_0005.pt", "last.pt"]
    assert ckpt.load(tmp_path / "best.pt")["epoch"] == 1  # kept although epoch_0001.pt is gone
    assert ckpt.load(tmp_path / "last.pt")["epoch"] == 5
    writer = ckpt.CheckpointWriter(tmp_path, keep=1)
    writer.save_epoch(fake_state(6), {"test/acc": 0.1})
    assert sorted(p.name for p in tmp_path.glob("epoch_*.pt")) == ["epoch_0006.pt"]


@pytest.mark.parametrize("background", [False, True])
def test_each_checkpoint_records_the_best_among_those_written_itself_included(tmp_path, background):
    writer = ckpt.CheckpointWriter(tmp_path, keep=5, background=background)
    for epoch, acc in zip(range(1, 5), [0.5, 0.9, 0.7, 0.95]):
        writer.save_epoch(fake_state(epoch), {"test/acc": acc})
    writer.wait()
    # a run resumed from epoch 3 must still know that epoch 2 (0.9) is the best, not re-link best.pt to 0.8
    assert [ckpt.load(tmp_path / f"epoch_{e:04d}.pt")["best_value"] for e in range(1, 5)] == [0.5, 0.9, 0.9, 0.95]
    assert ckpt.load(tmp_path / "best.pt")["epoch"] == 4 and writer.best_value == 0.95


def test_background_writes_save_the_state_as_it_was_and_finish_in_order(tmp_path):
    writer = ckpt.CheckpointWriter(tmp_path, keep=2, background=True)
    live = fake_state(1, value=1.0)
    writer.save_epoch(live, {"test/acc": 0.5})
    live["model"]["weight"].fill_(99.0)  # the next epoch's steps change the live weights in place
    live["model"]["big"].zero_()
    writer.save_epoch(fake_state(2, value=2.0), {"test/acc": 0.4})
    writer.save_interrupted({**fake_state(2, step=3, value=3.0), "epoch": 2})  # waits for epoch 2's write first
    first = ckpt.load(tmp_path / "epoch_0001.pt")
    assert torch.equal(first["model"]["weight"], torch.ones(3, 4))
    assert torch.equal(first["model"]["big"], torch.arange(2048, dtype=torch.float32))
    assert ckpt.load(tmp_path / "epoch_0002.pt")["marker"] == 2.0
    assert ckpt.load(tmp_path / "last.pt")["step_in_epoch"] == 3  # the newer, mid-epoch state ends as last.pt
    assert ckpt.load(tmp_path / "best.pt")["epoch"] == 1
    writer.close()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_failed_background_write_warns_and_the_next_one_succeeds(tmp_path, monkeypatch, caplog):
    real_atomic_save = ckpt.atomic_save

    def full_disk_once(state, path):
        if Path(path).name == "epoch_0001.pt":
            raise OSError(28, "No space left on device")
        return real_atomic_save(state, path)

    monkeypatch.setattr(ckpt, "atomic_save", full_disk_once)
    writer = ckpt.CheckpointWriter(tmp_path, background=True)
    writer.save_epoch(fake_state(1), {"test/acc": 0.9})
    writer.save_epoch(fake_state(2), {"test/acc": 0.1})
    writer.close()
    assert "could not write checkpoint" in caplog.text and "epoch_0001.pt" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "epoch_0002.pt", "last.pt"]
    assert ckpt.load(tmp_path / "best.pt")["best_value"] == 0.1  # the best among checkpoints that exist


# ------------------------------------------------------------------ numerical faults

EXPLODE = ["sched=step", "sched.decay_epochs=1", "sched.decay_rate=1e32", "checkpoint.dir=ck", "hydra.run.dir=run",
           "trainer.epochs=3"]  # epoch 1 at lr 0.05, then lr 5e30: the weights blow up in epoch 2


@pytest.mark.parametrize("limit", ["losses", "weights"])
def test_non_finite_training_stops_with_the_last_good_checkpoint(tmp_path, limit):
    args = ["trainer.max_nonfinite=2", "data.batch_size=4"] if limit == "losses" else ["trainer.max_nonfinite=1000"]
    result = cli(tmp_path, EXPLODE + args)
    needle = "non-finite" if limit == "weights" else "steps in a row"
    assert_one_line_error(result, needle, "epoch 2", "last good checkpoint", "ck", "optim.lr")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["best.pt", "epoch_0001.pt", "last.pt", "run.json"]
    state = ckpt.load(tmp_path / "ck" / "last.pt")
    assert state["epoch"] == 1 and all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["epoch"] for row in rows] == [1]


def _nan_criterion(monkeypatch, nan_steps: set[int], factor: float = float("nan")):
    """The training criterion returns NaN (or the loss times `factor`) at the given (1-based) training steps."""
    import fixedcls.training.factories as build_module

    create = build_module.create_criterion
    calls = [0]

    def patched(*args, **kwargs):
        criterion = create(*args, **kwargs)

        def maybe_nan(logits, target):
            loss = criterion(logits, target)
            if torch.is_grad_enabled():
                calls[0] += 1
                if calls[0] in nan_steps:
                    return loss * factor
            return loss

        return maybe_nan

    monkeypatch.setattr(build_module, "create_criterion", patched)


def test_a_non_finite_loss_skips_the_step(tmp_path, monkeypatch):
    """fp32 (no gradient scaler): the NaN steps update nothing, the count restarts after a finite loss."""
    from utils import train_tiny

    _nan_criterion(monkeypatch, {2, 3, 5})  # 3 steps per epoch, 2 epochs: 6 steps, 3 of them NaN
    summary = train_tiny(tmp_path, ["trainer.max_nonfinite=3", "collapse.every=0"])
    state = ckpt.load(Path(summary["checkpoint_dir"]) / "last.pt")
    assert state["global_step"] == 3 and state["nonfinite_in_a_row"] == 0
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert all(torch.isfinite(torch.tensor(row["train/loss"])) for row in state["history"])


def test_an_overflowed_gradient_norm_skips_the_step_instead_of_poisoning_the_weights(tmp_path, monkeypatch):
    """A finite loss whose gradients overflow the clipping norm (bf16 blow-ups): clipping would scale them by 0
    (inf * 0 = NaN); the step is skipped and counted like a non-finite loss."""
    from utils import train_tiny

    _nan_criterion(monkeypatch, {2}, factor=1e37)  # finite loss, gradient norm overflows float32
    summary = train_tiny(tmp_path, ["trainer.clip_grad=1.0", "trainer.max_nonfinite=3", "collapse.every=0"])
    state = ckpt.load(Path(summary["checkpoint_dir"]) / "last.pt")
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert state["nonfinite_in_a_row"] == 0 and summary["epochs"] == 2

    _nan_criterion(monkeypatch, {4, 5, 6}, factor=1e37)
    with pytest.raises(FixedclsError, match=r"gradient norm was non-finite \(inf\) for 3 steps in a row \(epoch 2, step 3\)"):
        train_tiny(tmp_path / "again", ["trainer.clip_grad=1.0", "trainer.max_nonfinite=3", "collapse.every=0"])


def test_non_finite_losses_in_a_row_stop_the_run(tmp_path, monkeypatch):
    from utils import train_tiny

    _nan_criterion(monkeypatch, {4, 5, 6})  # all of epoch 2
    with pytest.raises(FixedclsError, match=r"non-finite \(nan\) for 3 steps in a row \(epoch 2, step 3\)"):
        train_tiny(tmp_path, ["trainer.max_nonfinite=3", "collapse.every=0"])
    state = ckpt.load(tmp_path / "checkpoints" / checkpoint_folder(["trainer.max_nonfinite=3", "collapse.every=0"]) / "last.pt")
    assert state["epoch"] == 1 and state["global_step"] == 3


def test_the_fp16_scaler_path_skips_and_still_stops(tmp_path, monkeypatch):
    """The gradient-scaler branch, run on CPU: the scaler skips NaN steps and backs off; NaNs in a row still stop."""
    import contextlib

    import fixedcls.training.assemble as train_module
    from fixedcls.training import loop as engine
    from utils import train_tiny

    def cpu_fp16(device, precision):  # fp16 is refused on CPU; here it runs unscaled-autocast free, with the scaler on
        return contextlib.nullcontext

    monkeypatch.setattr(engine, "autocast_for", cpu_fp16)
    monkeypatch.setattr(train_module, "autocast_for", cpu_fp16)
    _nan_criterion(monkeypatch, {2})
    summary = train_tiny(tmp_path, ["trainer.precision=fp16", "trainer.max_nonfinite=3", "collapse.every=0"])
    state = ckpt.load(Path(summary["checkpoint_dir"]) / "last.pt")
    assert state["scaler"]["scale"] < 65536.0  # the NaN step was skipped by the scaler, which backed off
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())

    _nan_criterion(monkeypatch, {4, 5, 6})
    with pytest.raises(FixedclsError, match="3 steps in a row"):
        train_tiny(tmp_path / "again", ["trainer.precision=fp16", "trainer.max_nonfinite=3", "collapse.every=0"])


# ------------------------------------------------------------------ side failures never lose a run

def test_tracker_disk_and_plot_failures_warn_and_training_goes_on(tmp_path, monkeypatch, caplog):
    import fixedcls.collapse.report as collapse_module
    import fixedcls.training.assemble as train_module
    from fixedcls.tracking import run_files
    from fixedcls.tracking.base import Tracker
    from utils import train_tiny

    class BrokenTracker(Tracker):
        active = True
        run_id = "broken"

        def _fail(self, *args, **kwargs):
            raise RuntimeError("wandb: network unreachable")

        log_epoch = log_summary = log_image = log_table = finish = _fail

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    def broken_plot(*args, **kwargs):
        raise RuntimeError("matplotlib exploded")

    real_atomic_save = ckpt.atomic_save

    def first_checkpoint_fails(state, path):
        if Path(path).name == "epoch_0001.pt":
            no_space()
        return real_atomic_save(state, path)

    monkeypatch.setattr(train_module, "create_tracker", lambda *args, **kwargs: BrokenTracker())
    monkeypatch.setattr(run_files.MetricsFile, "append", no_space)
    monkeypatch.setattr(collapse_module, "plot_collapse", broken_plot)
    monkeypatch.setattr(ckpt, "atomic_save", first_checkpoint_fails)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(CheckpointWriteError) as failed:
        warnings.simplefilter("always")
        train_tiny(tmp_path, ["collapse.every=1"])
    summary = failed.value.summary  # the run trained to its end; the checkpoint it could not write makes it fail
    assert failed.value.exit_code == 1 and "epoch(s) 1 have no checkpoint" in str(failed.value)
    messages = "\n".join(str(w.message) for w in caught)
    for needle in ("log_epoch failed", "wandb: network unreachable", "log_summary failed", "writing metrics.jsonl failed",
                   "No space left on device", "plotting collapse failed", "matplotlib exploded"):
        assert needle in messages, needle
    logged = caplog.text
    assert "could not write checkpoint" in logged and "epoch_0001.pt" in logged and "No space left" in logged
    assert "the tracker's finish failed" in logged
    assert summary["epochs"] == 2 and "final/test/acc" in summary
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epochs"] == 2
    directory = Path(summary["checkpoint_dir"])
    assert sorted(p.name for p in directory.iterdir()) == ["best.pt", "epoch_0002.pt", "last.pt", "run.json"]
    assert ckpt.load(directory / "last.pt")["epoch"] == 2


def test_overflowed_updates_with_gradient_accumulation_still_stop_the_run(tmp_path, monkeypatch):
    """With grad_accum, the finite micro-steps between two overflowed updates do not reset the count."""
    from utils import train_tiny

    _nan_criterion(monkeypatch, set(range(1, 100)), factor=1e37)  # every step: finite loss, overflowing gradients
    with pytest.raises(FixedclsError, match=r"gradient norm was non-finite \(inf\) for 2 steps in a row"):
        train_tiny(tmp_path, ["trainer.clip_grad=1.0", "trainer.grad_accum=2", "trainer.max_nonfinite=2",
                              "data.batch_size=4", "collapse.every=0"])
