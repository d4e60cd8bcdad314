"""Runs that share a machine share its cores (issue 28, item 7), and never at the cost of their numbers.

The commands shorten how long torch's OpenMP threads spin before they sleep (GOMP_SPINCOUNT), set before
torch loads; the thread count itself is torch's default or `trainer.threads`, recorded in summary.json and
in every checkpoint, and a resumed run keeps it so it stays bit-exact. The speed figures are in
`python tools/bench.py --only share` (docs/benchmarks.md), never in a timed test.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utils import train_tiny  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _environment_of_a_command(**env: str) -> dict:
    """What `import fixedcls.commands` leaves in the environment, and whether torch was loaded before it."""
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    clean.update(env, PYTHONPATH=str(REPO))
    code = ("import os, sys, json; import fixedcls.commands; "
            "print(json.dumps({'spins': os.environ.get('GOMP_SPINCOUNT'), 'torch': 'torch' in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_the_commands_set_the_spin_count_before_torch_loads():
    from fixedcls.commands import OPENMP_SPINCOUNT

    seen = _environment_of_a_command()
    assert seen == {"spins": OPENMP_SPINCOUNT, "torch": False}
    assert int(OPENMP_SPINCOUNT) < 300_000  # shorter than libgomp's own default, or it changes nothing


def test_a_users_own_openmp_setting_wins():
    assert _environment_of_a_command(GOMP_SPINCOUNT="7")["spins"] == "7"
    assert _environment_of_a_command(OMP_WAIT_POLICY="ACTIVE")["spins"] is None


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_thread_count_is_recorded_and_kept_on_resume(tmp_path, torch_threads, caplog):
    first = train_tiny(tmp_path, ["trainer.threads=1", "trainer.epochs=1", "resume=auto"])
    assert first["threads"] == 1
    state = torch.load(next((tmp_path / "checkpoints").glob("*/last.pt")), map_location="cpu", weights_only=False)
    assert state["meta"]["threads"] == 1

    torch.set_num_threads(2)  # what a fresh process on a 2-core machine would start with
    caplog.set_level("INFO", logger="fixedcls")
    resumed = train_tiny(tmp_path, ["trainer.epochs=2", "resume=auto"], run_name="resumed")
    assert resumed["threads"] == 1 and torch.get_num_threads() == 1
    assert "threads: 1 (kept from the resumed checkpoint" in caplog.text
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["threads"] == 1


def test_trainer_threads_overrides_the_resumed_count(tmp_path, torch_threads, caplog):
    train_tiny(tmp_path, ["trainer.threads=1", "trainer.epochs=1", "resume=auto"])
    caplog.set_level("INFO", logger="fixedcls")
    resumed = train_tiny(tmp_path, ["trainer.threads=2", "trainer.epochs=2", "resume=auto"], run_name="resumed")
    assert resumed["threads"] == 2 and torch.get_num_threads() == 2
    assert "threads: 2 (trainer.threads)" in caplog.text
