"""checkpoint.every (issue 23): epoch checkpoints after every N-th epoch and the last, best.pt among those
written, a stop signal between written epochs still leaves a resumable last.pt, and resuming from any written
file ends bit for bit where the uninterrupted run ends.  In-process tiny runs (3 epochs of 6 steps)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fixedcls.runs import checkpoints as ckpt
from fixedcls.config import validate_config
from fixedcls.errors import FixedclsError
from fixedcls.training.signals import TrainingInterrupted
from utils import compose_config, sigterm_at_training_step, train_tiny

EVERY = ["trainer.epochs=3", "checkpoint.every=2", "checkpoint.keep=5", "checkpoint.background=true",
         "collapse.every=0", "collapse.plot=false", "trainer.threads=1", "data.batch_size=8",
         "model.drop_rate=0.25", "data.augment=true",
         # "best" = the largest training loss: epoch 1's, which every=2 does not write, so best.pt must be another
         "checkpoint.best_metric=train/loss", "checkpoint.best_mode=max"]


pytestmark = pytest.mark.usefixtures("single_process")  # conftest.py


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> dict:
    """One uninterrupted 3-epoch run with checkpoint.every=2."""
    directory = tmp_path_factory.mktemp("whole")
    threads = torch.get_num_threads()
    try:
        summary = train_tiny(directory, EVERY)
    finally:
        torch.set_num_threads(threads)
    return {"summary": summary, "folder": Path(summary["checkpoint_dir"]), "run": directory / "run"}


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_state(a: Path, b: Path) -> None:
    ours, theirs = ckpt.load(a), ckpt.load(b)
    assert (ours["epoch"], ours["global_step"]) == (theirs["epoch"], theirs["global_step"])
    different = [k for k in theirs["model"] if not torch.equal(ours["model"][k], theirs["model"][k])]
    assert not different, different[:5]
    for x, y in zip(ours["optimizer"]["state"].values(), theirs["optimizer"]["state"].values()):
        assert all(torch.equal(x[k], y[k]) for k in x if torch.is_tensor(x[k]))


def test_every_two_writes_the_even_epochs_and_the_last(whole):
    folder = whole["folder"]
    assert sorted(p.name for p in folder.glob("*.pt")) == ["best.pt", "epoch_0002.pt", "epoch_0003.pt", "last.pt"]
    assert ckpt.load(folder / "epoch_0002.pt")["epoch"] == 2 and ckpt.load(folder / "last.pt")["epoch"] == 3
    # the last file was copied into the staging tensors of the one before: it holds the final weights, not those
    live, saved = whole["summary"].run.model.state_dict(), ckpt.load(folder / "last.pt")["model"]
    assert all(torch.equal(live[k], saved[k]) for k in live)
    assert not all(torch.equal(saved[k], v) for k, v in ckpt.load(folder / "epoch_0002.pt")["model"].items())
    history = rows(whole["run"])
    assert [row["epoch"] for row in history] == [1, 2, 3]  # every epoch is still evaluated and logged
    # best.pt: the best of the written epochs (2 and 3), a tie keeping the earlier one
    metric = "train/loss"
    assert max(history, key=lambda row: row[metric])["epoch"] == 1  # the best of all epochs was not written
    best_written = max(history[1:], key=lambda row: (row[metric], -row["epoch"]))
    best = ckpt.load(folder / "best.pt")
    assert best["epoch"] == best_written["epoch"] and best["best_value"] == best_written[metric]
    summary = whole["summary"]  # best/* describe best.pt's epoch
    assert summary["best/epoch"] == best_written["epoch"] and summary[f"best/{metric}"] == best_written[metric]


def test_resuming_a_file_written_every_two_epochs_is_bit_exact(whole, tmp_path):
    resumed = train_tiny(tmp_path, EVERY + [f"resume={whole['folder'] / 'epoch_0002.pt'}"])
    assert_same_state(Path(resumed["checkpoint_dir"]) / "last.pt", whole["folder"] / "last.pt")
    assert rows(tmp_path / "run") == rows(whole["run"])


def test_a_stop_between_written_epochs_leaves_a_resumable_last_pt(whole, tmp_path, monkeypatch):
    steps_per_epoch = math.ceil(len(whole["summary"].run.train_loader.sampler) / 8)
    restore = sigterm_at_training_step(monkeypatch, steps_per_epoch + 2)  # epoch 1 was not written (every=2): only last.pt will be
    with pytest.raises(TrainingInterrupted) as stopped:
        train_tiny(tmp_path, EVERY)
    restore()
    folder = stopped.value.checkpoint.parent
    assert sorted(p.name for p in folder.glob("*.pt")) == ["last.pt"]
    state = ckpt.load(folder / "last.pt")
    assert state["epoch"] == 1 and 0 < state["step_in_epoch"] < steps_per_epoch
    ckpt.check_resumable(state, folder / "last.pt")

    resumed = train_tiny(tmp_path, EVERY + ["resume=auto"], run_name="again")
    assert Path(resumed["checkpoint_dir"]) == folder
    assert sorted(p.name for p in folder.glob("epoch_*.pt")) == ["epoch_0002.pt", "epoch_0003.pt"]
    assert_same_state(folder / "last.pt", whole["folder"] / "last.pt")
    assert rows(tmp_path / "again") == rows(whole["run"])


@pytest.mark.parametrize("value", ["0", "-1"])
def test_the_config_refuses_every_below_one_in_one_line(value):
    with pytest.raises(FixedclsError) as refused:
        validate_config(compose_config([f"checkpoint.every={value}"]))
    message = str(refused.value)
    assert "\n" not in message and f"checkpoint.every={value}" in message and ">= 1" in message


def test_the_writer_refuses_every_below_one(tmp_path):
    with pytest.raises(FixedclsError, match="checkpoint.every=0"):
        ckpt.CheckpointWriter(tmp_path, every=0)
    writer = ckpt.CheckpointWriter(tmp_path, every=3)
    assert [e for e in range(1, 8) if writer.writes_epoch(e, 7)] == [3, 6, 7]


def test_a_snapshot_reuses_the_staging_tensors_of_the_same_layout_only():
    live = {"model": {"w": torch.ones(3, 4), "b": torch.zeros(4)}, "steps": [torch.tensor(5)], "epoch": 1}
    first = ckpt.snapshot(live)
    staging = first["model"]["w"].data_ptr()
    live["model"]["w"].fill_(7.0)
    live["model"]["b"] = torch.zeros(5)  # another shape: a fresh tensor
    second = ckpt.snapshot(live, reuse=first)
    assert second["model"]["w"].data_ptr() == staging and torch.equal(second["model"]["w"], torch.full((3, 4), 7.0))
    assert second["model"]["b"].shape == (5,) and second["model"]["b"].data_ptr() != first["model"]["b"].data_ptr()
    assert second["model"]["w"].data_ptr() != live["model"]["w"].data_ptr()  # never the live tensor itself
    assert torch.equal(second["steps"][0], torch.tensor(5)) and second["epoch"] == 1
