"""Shared test set-up: one CPU thread per test process (2-core CI machines), quiet plots, and the CPU only.

The suite asserts CPU behaviour (bit-exact resume, fp16 refused without CUDA, trainer.device=auto meaning the
CPU), so on a machine with a GPU it hides the GPU from every test and every process a test starts; the GPU
paths are checked by the benchmark (`python tools/bench.py --device cuda`), never by unit tests.
"""
import os

os.environ["CUDA_VISIBLE_DEVICES"] = ""

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture
def single_process(monkeypatch):
    """A one-process run whatever launch variables leaked here; the thread count is put back afterwards.
    Modules whose every test trains in-process use it with `pytestmark = pytest.mark.usefixtures(...)`."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
