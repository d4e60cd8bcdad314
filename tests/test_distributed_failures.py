"""Ranks that cannot agree stop together with one line (issue 21), instead of waiting in a collective forever.

Two spawned gloo processes run `train.train` (env:// rendezvous, like torchrun), each with its own overrides.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import torch

from fixedcls.errors import FixedclsError
from utils import compose_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_errors import image_folder  # noqa: E402

OVERRIDES = ["trainer.device=cpu", "data.num_classes=3", "data.train_per_class=6", "data.batch_size=6",
             "collapse.every=0", "trainer.epochs=1", "trainer.threads=1"]
TIMEOUT = 150  # a hang (the failure this guards against) ends here


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank: int, port: int, tmp_path: str, overrides: list, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from fixedcls.training.assemble import train

    try:
        train(compose_config(overrides, tmp_path=Path(tmp_path)), Path(tmp_path) / "run")
        outcome = "finished"
    except FixedclsError as error:
        outcome = f"FixedclsError: {error}"
    Path(out).write_text(json.dumps(outcome))


def run_ranks(tmp_path: Path, per_rank: list[list[str]]) -> list[str]:
    context = multiprocessing.get_context("spawn")
    port = _free_port()
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    processes = [context.Process(target=_rank, args=(r, port, str(tmp_path), OVERRIDES + per_rank[r], str(outs[r])))
                 for r in range(2)]
    for process in processes:
        process.start()
    deadline = time.perf_counter() + TIMEOUT
    for process in processes:
        process.join(max(1.0, deadline - time.perf_counter()))
    hung = [rank for rank, p in enumerate(processes) if p.is_alive()]
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    assert not hung, f"ranks {hung} still waiting after {TIMEOUT}s"
    return [json.loads(out.read_text()) if out.is_file() else "no outcome" for out in outs]


def test_ranks_started_with_different_configs_stop_with_one_line_naming_the_rank(tmp_path):
    outcomes = run_ranks(tmp_path, [["optim.lr=0.1"], ["optim.lr=0.2", "data.root=/only/on/rank1"]])
    assert outcomes[0] == outcomes[1], outcomes  # every rank ends with the same line
    assert "rank 1 was started with another config than rank 0: optim.lr=0.2 (rank 0: 0.1)" in outcomes[0]
    assert "data.root" not in outcomes[0]  # a per-node path may differ
    assert not (tmp_path / "checkpoints").exists()


def test_a_failure_on_rank_0_alone_ends_every_rank_with_the_same_line(tmp_path):
    taken = tmp_path / "taken"  # checkpoint.dir of another run: only rank 0 decides where to save, and refuses
    taken.mkdir()
    torch.save({"model": {}}, taken / "last.pt")
    outcomes = run_ranks(tmp_path, [[f"checkpoint.dir={taken}"]] * 2)
    assert outcomes[0] == outcomes[1], outcomes
    assert outcomes[0].startswith("FixedclsError: rank 0: checkpoint.dir=") and "already holds checkpoints" in outcomes[0]


def test_a_failure_on_rank_1_alone_ends_every_rank_with_the_same_line(tmp_path):
    missing = tmp_path / "no-such-images"  # data.root may differ per node: rank 1's does not exist
    images = ["data=imagefolder", "data.img_size=16"]
    root = image_folder(tmp_path / "images", {"a": 2, "b": 2, "c": 2}, {"a": 1, "b": 1, "c": 1})
    outcomes = run_ranks(tmp_path, [images + [f"data.root={root}"], images + [f"data.root={missing}"]])
    assert outcomes[0] == outcomes[1], outcomes
    assert outcomes[0].startswith(f"FixedclsError: rank 1: data.root={missing} does not exist")
