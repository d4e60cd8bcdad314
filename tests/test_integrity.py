"""Trustworthy runs (issue 13): run identity, one folder per run, resume only the same experiment, a
validation split for model selection, best.pt that cannot go silently wrong, branches, and no evaluation on
training images by accident.

Most runs are in-process `train()` calls on the tiny synthetic job (tests/utils.py); the real CLI is used
where its exit status and one-line error matter.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import subprocess
import sys
import threading
from copy import deepcopy
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixedcls.runs import checkpoints as ckpt
from fixedcls.runs import folders as runs
from fixedcls.data.datasets import create_data
from fixedcls.errors import FixedclsError
from fixedcls.config import safe_name
from fixedcls.runs.identity import IDENTITY_EXCLUDES, run_identity
from fixedcls.tracking.run_files import read_jsonl
from utils import TINY, checkpoint_folder, compose_config, train_tiny

FAST = ["trainer.epochs=1", "collapse.every=0", "collapse.plot=false"]


def files_of(directory: Path) -> dict[str, tuple[str, int]]:
    """{file name: (sha256 of its bytes, mtime_ns)} of a checkpoint folder."""
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(Path(directory).iterdir()) if p.is_file()}


# ------------------------------------------------------------------ run identity

def test_identity_ignores_bookkeeping_and_covers_the_experiment():
    from fixedcls.runs.stored import plain_config

    config = plain_config(compose_config([]))
    base = run_identity(config)

    def changed(key: str, value) -> str:
        copy = deepcopy(config)
        *sections, leaf = key.split(".")
        node = copy
        for section in sections:
            node = node[section]
        node[leaf] = value
        return run_identity(copy)[0]

    for key, value in (("name", "other"), ("trainer.epochs", 9), ("checkpoint.root", "/elsewhere"), ("resume", "auto"),
                       ("trainer.threads", 1), ("logger.project", "p"), ("data.num_workers", 2),
                       ("generations.protocol", "finetune"), ("checkpoint.every", 3), ("collapse.cache_mb", 0.0)):
        assert changed(key, value) == base[0], key
    for key, value in (("optim.lr", 0.3), ("seed", 1), ("head.name", "dcube"), ("data.val_fraction", 0.2),
                       ("checkpoint.best_metric", "val/loss")):
        assert changed(key, value) != base[0], key
    covered = base[1]
    assert "optim.lr" in covered and "seed" in covered and "name" not in covered and "trainer.epochs" not in covered
    assert not any(key == ex or (ex.endswith(".") and key.startswith(ex)) for key in covered for ex in IDENTITY_EXCLUDES)
    assert run_identity(config, keep=("generations.",))[0] != base[0]  # a compat sequence's identity covers them


# ------------------------------------------------------------------ one run, one directory

def test_a_sweep_over_a_key_outside_the_name_gives_two_runs(tmp_path):
    """Two jobs of a resume=auto sweep share a name but not optim.lr: two folders, two runs; a requeue of
    the first (same config) continues the first, not whichever was written last."""
    a = train_tiny(tmp_path, FAST + ["resume=auto", "optim.lr=0.05"], run_name="a")
    b = train_tiny(tmp_path, FAST + ["resume=auto", "optim.lr=0.2"], run_name="b")
    assert a["checkpoint_dir"] != b["checkpoint_dir"] and a["identity"] != b["identity"]
    assert a["final/train/loss"] != b["final/train/loss"]
    again = train_tiny(tmp_path, FAST[1:] + ["trainer.epochs=2", "resume=auto", "optim.lr=0.05"], run_name="a2")
    assert again["checkpoint_dir"] == a["checkpoint_dir"]
    rows = read_jsonl(tmp_path / "a2" / "metrics.jsonl")
    assert [row["epoch"] for row in rows] == [1, 2] and rows[0] == read_jsonl(tmp_path / "a" / "metrics.jsonl")[0]
    state = ckpt.load(Path(again["checkpoint_dir"]) / "last.pt")
    assert state["meta"]["identity"] == a["identity"] and "optim.lr" in state["meta"]["identity_keys"]


def test_jobs_started_at_once_never_share_a_folder(tmp_path):
    """Eight same-name, same-config starts racing (no resume): eight folders, each claimed once."""
    root, identity = tmp_path / "checkpoints", "ab" * 32
    barrier, claimed, errors = threading.Barrier(8), [], []

    def start():
        try:
            plan = runs.resolve(root, "job", None, None, identity)
            barrier.wait(timeout=60)
            claimed.append(plan.claim({"identity": identity}))
        except Exception as error:  # surfaced below
            errors.append(error)
            barrier.abort()  # the others stop waiting

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(claimed)) == 8
    assert {p.name for p in claimed} == {"job-abababab"} | {f"job-abababab-{n}" for n in range(2, 9)}


def test_partial_writes_of_a_live_writer_are_left_alone(tmp_path):
    host = ckpt._HOST
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        kept = tmp_path / f".last.pt.{host}.{live.pid}.abc{ckpt.TEMP_SUFFIX}"
        gone = tmp_path / f".last.pt.{host}.{dead.pid}.abc{ckpt.TEMP_SUFFIX}"
        for path in (kept, gone):
            path.write_bytes(b"partial")
        assert ckpt.PARTIAL.match(kept.name) and ckpt.PARTIAL.match(gone.name)
        ckpt.remove_partial_writes(tmp_path)
        assert kept.exists() and not gone.exists()
    finally:
        live.kill()
        live.wait()


def test_names_are_one_path_component():
    assert safe_name("hf-hub:timm/vit_tiny") == "hf-hub_timm_vit_tiny"
    assert safe_name("local-dir:/models/x") == "local-dir_models_x"
    for name in ("../../x", "..", "a/../../b", "/etc/passwd", ".hidden", "..\\..\\x", "a\nb", "\x1b[31mred", "\t"):
        safe = safe_name(name)
        assert "/" not in safe and "\\" not in safe and not safe.startswith(".") and safe not in ("", ".", "..")
        assert safe.isprintable() and " " not in safe


def test_a_name_with_slashes_and_colons_resumes_under_the_root(tmp_path):
    first = train_tiny(tmp_path, FAST + ["name=hf-hub:foo/bar"], run_name="a")
    folder = Path(first["checkpoint_dir"])
    assert folder.parent == tmp_path / "checkpoints" and folder.name.startswith("hf-hub_foo_bar-")
    escape = train_tiny(tmp_path, FAST + ["name=../../escape"], run_name="b")
    assert Path(escape["checkpoint_dir"]).parent == tmp_path / "checkpoints"
    auto = train_tiny(tmp_path, FAST[1:] + ["trainer.epochs=2", "name=hf-hub:foo/bar", "resume=auto"], run_name="c")
    assert auto["checkpoint_dir"] == first["checkpoint_dir"]
    assert [row["epoch"] for row in read_jsonl(tmp_path / "c" / "metrics.jsonl")] == [1, 2]


# ------------------------------------------------------------------ resume only the same experiment

@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("one_epoch")
    summary = train_tiny(tmp, FAST + ["optim.lr=0.1"])
    return Path(summary["checkpoint_dir"]) / "last.pt"


def test_resume_under_another_config_names_every_differing_key(one_epoch, tmp_path):
    with pytest.raises(FixedclsError) as refused:
        train_tiny(tmp_path, FAST + [f"resume={one_epoch}", "optim.lr=0.3", "seed=4"])
    message = str(refused.value)
    assert "optim.lr: 0.1 in the checkpoint, 0.3 now" in message and "seed: 0 in the checkpoint, 4 now" in message
    assert "model.init_from" in message and "\n" not in message
    # Bookkeeping may change: more epochs, another name.
    resumed = train_tiny(tmp_path, FAST[1:] + ["trainer.epochs=2", f"resume={one_epoch}", "optim.lr=0.1", "name=x"])
    assert resumed["epochs"] == 2


def test_an_old_checkpoint_without_identity_is_compared_by_its_config(one_epoch, tmp_path):
    """As written before identities and the validation split: no identity, no val_* keys, best by test/acc."""
    state = ckpt.load(one_epoch)
    del state["meta"]["identity"], state["meta"]["identity_keys"]
    del state["config"]["data"]["val_fraction"], state["config"]["data"]["val_split"], state["config"]["checkpoint"]["best_mode"]
    state["config"]["checkpoint"]["best_metric"] = "test/acc"
    old = tmp_path / "old" / "last.pt"
    ckpt.atomic_save(state, old)
    with pytest.raises(FixedclsError) as refused:
        train_tiny(tmp_path, FAST + [f"resume={old}", "optim.lr=0.2"])
    for needle in ("optim.lr: 0.1 in the checkpoint, 0.2 now", "data.val_fraction: 0.0 in the checkpoint, 0.1 now",
                   "checkpoint.best_metric: test/acc in the checkpoint, auto now"):
        assert needle in str(refused.value)
    resumed = train_tiny(tmp_path, FAST[1:] + ["trainer.epochs=2", f"resume={old}", "optim.lr=0.1", "data.val_fraction=0",
                                               "checkpoint.best_metric=test/acc"])
    # Its folder has no run record of its identity: the run continues in a folder of its own under the root.
    assert Path(resumed["checkpoint_dir"]).parent == tmp_path / "checkpoints" and sorted(os.listdir(old.parent)) == ["last.pt"]


def test_the_cli_refuses_a_changed_resume_in_one_line(one_epoch, tmp_path):
    from test_errors import assert_one_line_error
    from test_resume import run_cli

    result = run_cli(TINY + FAST + [f"resume={one_epoch}", "optim.lr=0.3", f"checkpoint.root={tmp_path}",
                                    "hydra.run.dir=run", "hydra/job_logging=disabled"], tmp_path, timeout=90)
    assert_one_line_error(result, "optim.lr: 0.1 in the checkpoint, 0.3 now", "model.init_from", code=2)


# ------------------------------------------------------------------ validation split and model selection

def test_validation_figures_every_epoch_and_best_follows_val_acc(tmp_path):
    summary = train_tiny(tmp_path, ["trainer.epochs=3", "collapse.every=0", "checkpoint.keep=3", "optim.lr=0.2"])
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert all({"val/loss", "val/acc", "test/loss", "test/acc"} <= set(row) for row in rows)
    # The best epoch: highest val/acc, the first of equal ones, whatever the test split says.
    best_row = max(rows, key=lambda row: (row["val/acc"], -row["epoch"]))
    assert summary["best/metric"] == "val/acc" and summary["best/epoch"] == best_row["epoch"]
    assert summary["best/val/acc"] == best_row["val/acc"] and summary["best/test/acc"] == best_row["test/acc"]
    best = ckpt.load(Path(summary["checkpoint_dir"]) / "best.pt")
    assert best["epoch"] == best_row["epoch"]
    bundle = create_data(compose_config([]).data)  # val comes out of the training split, stratified
    assert len(bundle.val) == 4 and len(bundle.train) == 44 and sorted(bundle.val.targets) == [0, 1, 2, 3]


def test_best_by_nc1_keeps_the_smallest(tmp_path):
    summary = train_tiny(tmp_path, ["trainer.epochs=3", "checkpoint.best_metric=collapse/nc1", "checkpoint.keep=3",
                                    "collapse.plot=false", "optim.lr=0.2"])
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    smallest = min(rows, key=lambda row: row["collapse/nc1"])
    assert summary["best/epoch"] == smallest["epoch"] and summary["best/collapse/nc1"] == smallest["collapse/nc1"]
    assert ckpt.load(Path(summary["checkpoint_dir"]) / "best.pt")["epoch"] == smallest["epoch"]


def test_a_nan_never_becomes_or_freezes_the_best(tmp_path):
    writer = ckpt.CheckpointWriter(tmp_path, best_metric="val/acc", best_mode="auto")
    for epoch, value in enumerate([math.nan, 0.5, math.nan, 0.25, 0.75], 1):
        writer.save_epoch({"epoch": epoch, "model": {}}, {"val/acc": value})
        best = tmp_path / "best.pt"
        expected = {1: None, 2: 2, 3: 2, 4: 2, 5: 5}[epoch]
        assert (ckpt.load(best)["epoch"] if best.exists() else None) == expected, epoch
    loss = ckpt.CheckpointWriter(tmp_path / "loss", best_metric="collapse_test/nc1", keep=5)
    for epoch, value in enumerate([0.3, math.nan, 0.1, 0.2], 1):
        loss.save_epoch({"epoch": epoch, "model": {}}, {"collapse_test/nc1": value})
    assert ckpt.load(tmp_path / "loss" / "best.pt")["epoch"] == 3


@pytest.mark.parametrize("overrides,needles", [
    (["checkpoint.best_metric=val/accuracy"], ["val/accuracy", "never recorded", "val/acc", "test/acc"]),
    (["checkpoint.best_metric=collapse/nc1", "collapse.every=0"], ["collapse/nc1", "collapse.every"]),
    (["checkpoint.best_metric=val/acc", "data.val_fraction=0"], ["val/acc", "data.val_fraction"]),
    (["checkpoint.best_metric=lr"], ["best_mode=max", "best_mode=min"]),
    (["checkpoint.best_mode=largest"], ["best_mode=largest", "auto, max, min"]),
])
def test_a_best_metric_the_run_cannot_use_is_refused_before_training(tmp_path, overrides, needles):
    with pytest.raises(FixedclsError) as refused:
        train_tiny(tmp_path, FAST + overrides)
    for needle in needles:
        assert needle in str(refused.value)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("multirun", [False, True])
def test_a_run_name_never_writes_outside_the_working_directorys_folders(tmp_path, multirun):
    """name=../../../../escape (issue 28): the Hydra run folder, the sweep's jobs and the checkpoint folder stay in
    outputs/, multirun/ and checkpoints/ of the working directory; nothing above it changes."""
    from test_errors import TINY as CLI_TINY
    from test_resume import run_cli

    work = tmp_path / "a" / "b" / "c" / "d" / "work"
    work.mkdir(parents=True)

    def outside() -> list[str]:  # every path under tmp_path but the run's three folders and the test's own logs
        def ours(p: Path) -> bool:
            if work not in p.parents:
                return False
            top = p.relative_to(work).parts[0]
            return top in ("outputs", "multirun", "checkpoints") or (p.parent == work and top.startswith("cli"))

        return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if not ours(p))

    before = outside()
    result = run_cli((["-m", "seed=0,1"] if multirun else []) + CLI_TINY + ["name=../../../../escape"], work, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert outside() == before
    written = sorted(p.name for p in work.iterdir() if not p.name.startswith("cli"))
    assert written == (["checkpoints", "multirun"] if multirun else ["checkpoints", "outputs"])
    if not multirun:
        assert [p.name for p in (work / "outputs").iterdir()] == ["_.._.._.._escape"]
    assert all(p.name.startswith("_.._.._.._escape-") for p in (work / "checkpoints").iterdir())


# ------------------------------------------------------------------ branches

def test_resuming_an_older_epoch_starts_a_branch_and_leaves_the_run_alone(tmp_path):
    common = ["collapse.every=0", "collapse.plot=false", "checkpoint.keep=3", "optim.lr=0.2"]
    run = train_tiny(tmp_path, common + ["trainer.epochs=3"], run_name="main")
    folder = Path(run["checkpoint_dir"])
    before = files_of(folder)
    branch = train_tiny(tmp_path, common + ["trainer.epochs=3", f"resume={folder / 'epoch_0001.pt'}"], run_name="branch")
    assert files_of(folder) == before  # best.pt, last.pt and the later epoch files of the old branch untouched
    assert branch["checkpoint_dir"] != run["checkpoint_dir"] and Path(branch["checkpoint_dir"]).parent == folder.parent
    assert branch["branched_from"] == str(folder / "epoch_0001.pt")
    assert ckpt.load(Path(branch["checkpoint_dir"]) / "last.pt")["meta"]["branched_from"] == str(folder / "epoch_0001.pt")
    rows = read_jsonl(tmp_path / "branch" / "metrics.jsonl")
    assert [row["epoch"] for row in rows] == [1, 2, 3] and rows[0] == read_jsonl(tmp_path / "main" / "metrics.jsonl")[0]
    # resume=auto continues the branch, never the abandoned run.
    auto = train_tiny(tmp_path, common + ["trainer.epochs=4", "resume=auto"], run_name="auto")
    assert auto["checkpoint_dir"] == branch["checkpoint_dir"] and auto["branched_from"] == branch["branched_from"]
    assert files_of(folder) == before


def test_a_loose_checkpoint_continues_under_the_root_and_never_writes_its_neighbours(tmp_path, caplog):
    """resume=<a file outside a run folder of its own>, beside another run's best.pt and last.pt (issue 28)."""
    common = ["collapse.every=0", "collapse.plot=false", "optim.lr=0.2"]
    mine = train_tiny(tmp_path, common + ["trainer.epochs=1"], run_name="mine")
    other = train_tiny(tmp_path, common + ["trainer.epochs=1", "seed=1"], run_name="other")
    models = tmp_path / "x" / "models"
    models.mkdir(parents=True)
    for name in ("best.pt", "last.pt"):  # another run's files (no run.json: a folder of downloads, say)
        (models / name).write_bytes((Path(other["checkpoint_dir"]) / name).read_bytes())
    (models / "model.pt").write_bytes((Path(mine["checkpoint_dir"]) / "last.pt").read_bytes())
    before, around = files_of(models), sorted(p.relative_to(models.parent) for p in models.parent.rglob("*"))
    root = tmp_path / "checkpoints"
    landed = []
    for run_name in ("again", "once_more"):  # the second resume of the same file lands under the root too
        with caplog.at_level("INFO", logger="fixedcls"):
            resumed = train_tiny(tmp_path, common + ["trainer.epochs=2", f"resume={models / 'model.pt'}"],
                                 run_name=run_name)
        assert files_of(models) == before, "a file beside the resumed one was written"
        assert sorted(p.relative_to(models.parent) for p in models.parent.rglob("*")) == around  # no branch in x/
        folder = Path(resumed["checkpoint_dir"])
        assert folder.parent == root and folder != Path(mine["checkpoint_dir"]) and folder not in landed
        assert resumed["epochs"] == 2 and ckpt.load(folder / "last.pt")["epoch"] == 2
        assert resumed["branched_from"] == str(models / "model.pt")
        assert "not in a run folder of its own" in caplog.text and str(folder) in caplog.text
        landed.append(folder)
        caplog.clear()
    assert files_of(Path(other["checkpoint_dir"]))["best.pt"][0] == before["best.pt"][0]


def test_a_folder_of_another_runs_record_is_not_adopted(tmp_path):
    folder = tmp_path / "theirs"
    ckpt.atomic_save({"model": {}, "epoch": 1, "meta": {"identity": "a" * 64}}, folder / "last.pt")
    runs.write_run_record(folder, {"identity": "b" * 64, "name": "theirs"})
    plan = runs.plan_run(tmp_path / "checkpoints", "run", None, str(folder), "a" * 64)
    assert plan.directory is None and plan.loose and plan.parent == tmp_path / "checkpoints"
    runs.write_run_record(folder, {"identity": "a" * 64, "name": "theirs"})  # its own run's folder: continued
    assert runs.plan_run(tmp_path / "checkpoints", "run", None, str(folder), "a" * 64).directory == folder


# ------------------------------------------------------------------ no evaluation on training images

def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    Image.fromarray(torch.randint(0, 255, (12, 12, 3), generator=g, dtype=torch.uint8).numpy()).save(path)


def _images(root: Path, splits: dict[str, int]) -> Path:
    for split, count in splits.items():
        for c in ("cat", "dog"):
            for i in range(count):
                _png(root / split / c / f"{i}.png", seed=i + 100 * len(c))
    return root


IMAGES = ["data=imagefolder", "data.img_size=16", "data.num_workers=0"]


def test_an_image_folder_without_its_held_out_split_is_refused(tmp_path):
    root = _images(tmp_path / "images", {"train": 5})
    with pytest.raises(FixedclsError) as refused:
        create_data(compose_config(IMAGES + [f"data.root={root}"], tiny=False).data)
    assert f"{root / 'validation'}" in str(refused.value) and "data.test_fraction" in str(refused.value)
    with pytest.raises(FixedclsError, match=r"data\.val_split=vall: image folder .*vall does not exist"):
        create_data(compose_config(IMAGES + [f"data.root={root}", "data.test_fraction=0.4", "data.val_split=vall"],
                                   tiny=False).data)
    carved = create_data(compose_config(IMAGES + [f"data.root={root}", "data.test_fraction=0.4", "data.val_fraction=0.34"],
                                        tiny=False).data)
    assert (len(carved.train), len(carved.val), len(carved.test)) == (4, 2, 4)
    train_files = {carved.train.dataset.dataset.reader.samples[i][0] for i in carved.train.indices}
    test_files = {carved.test.dataset.dataset.reader.samples[i][0] for i in carved.test.indices}
    assert not train_files & test_files


def test_an_image_folder_with_val_and_test_folders(tmp_path):
    root = _images(tmp_path / "images", {"train": 3, "val": 2, "test": 1})
    bundle = create_data(compose_config(IMAGES + [f"data.root={root}", "data.val_split=val", "data.test_split=test"],
                                        tiny=False).data)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (6, 4, 2)
    with pytest.raises(FixedclsError, match="one folder"):
        create_data(compose_config(IMAGES + [f"data.root={root}", "data.val_split=val"], tiny=False).data)


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(tmp_path):
    with pytest.raises(FixedclsError, match="non-finite"):
        train_tiny(tmp_path, FAST + ["optim.lr=1e32", "trainer.max_nonfinite=1000"])
    assert list((tmp_path / "checkpoints").iterdir()) == []
    assert train_tiny(tmp_path, FAST, run_name="next")["checkpoint_dir"].endswith(checkpoint_folder(FAST))


def test_a_resume_of_another_head_names_the_head_and_every_other_key(one_epoch, tmp_path):
    with pytest.raises(FixedclsError) as refused:
        train_tiny(tmp_path, FAST + [f"resume={one_epoch}", "head=dcube", "optim.lr=0.3"])
    message = str(refused.value)
    assert "trained with head=simplex but this run has head=dcube" in message
    assert "head.name: simplex in the checkpoint, dcube now" in message and "optim.lr: 0.1 in the checkpoint, 0.3 now" in message


def test_two_launches_in_the_same_second_get_two_sweep_folders(tmp_path):
    """The sweep folder name carries microseconds: launches started together never write into one folder."""
    command = [sys.executable, "-m", "fixedcls.commands.train", "-m", "seed=0", *TINY, "trainer.epochs=1", "collapse.every=0",
               "hydra.callbacks.compare.enabled=false", f"checkpoint.root={tmp_path / 'checkpoints'}"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    launches = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]
    for launch in launches:
        out, err = launch.communicate(timeout=240)
        assert launch.returncode == 0, err[-2000:]
    sweeps = sorted(p.name for p in (tmp_path / "multirun").iterdir())
    assert len(sweeps) == 2, sweeps
    assert all((tmp_path / "multirun" / name / "0" / "summary.json").is_file() for name in sweeps)
