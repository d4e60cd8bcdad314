"""The Hydra training app: config composition, a short run per head, run files, multirun and resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from fixedcls.collapse import METRIC_KEYS
from fixedcls.data.datasets import create_data
from fixedcls.data.loaders import EpochIndex, EpochSampler, SeededAugmentation, create_loaders
from fixedcls.tracking.run_files import read_jsonl
from utils import CONF_DIR, TINY, compose_config, train_tiny

GROUPS = {group: sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))
          for group in ("head", "data", "optim", "sched", "logger", "experiment")}
HEADS = ["learned", "cosine", "simplex", "dcube", "orthoplex", "hadamard", "etf"]
RECIPES = {"etf_dr": "etf", "etf_dr_l2": "etf", "etf_dr_fixed": "etf"}  # head files that set a head and what trains it (the loss): file -> head name


def test_spec_groups_exist():
    assert set(HEADS) <= set(GROUPS["head"])
    assert {"digits", "synthetic", "cifar10", "cifar100", "imagefolder"} <= set(GROUPS["data"])
    assert {"sgd", "adamw"} <= set(GROUPS["optim"]) and {"cosine", "step"} <= set(GROUPS["sched"])
    assert "none" in GROUPS["logger"] and "fixed_vs_learned" in GROUPS["experiment"]


@pytest.mark.parametrize("group,option", [(g, o) for g, options in GROUPS.items() for o in options])
def test_every_group_option_composes(group, option):
    cfg = compose_config([f"{group}={option}"], tiny=False)
    if group in ("head", "data", "optim", "sched", "logger"):
        assert cfg[group].name == (RECIPES.get(option, option) if group == "head" else option)


def test_default_run_is_a_fixed_simplex_on_digits():
    cfg = compose_config(tiny=False)
    assert (cfg.head.name, cfg.data.name, cfg.model.backbone) == ("simplex", "digits", "resnet18")
    assert cfg.name == "digits-resnet18-simplex-s0"


def test_mistyped_key_fails_at_start():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        compose_config(["trainer.epoch=3"])


def test_wrong_type_fails_at_start():
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_config(["trainer.epochs=many"])
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_config(["trainer.precision=fp8"])


@pytest.mark.parametrize("head", HEADS)
def test_each_head_trains_and_writes_run_files(tmp_path, head):
    summary = train_tiny(tmp_path, [f"head={head}", "trainer.epochs=1"])
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [row["epoch"] for row in rows] == [1]
    row = rows[0]
    for key in ("train/loss", "train/acc", "test/loss", "test/acc", "lr"):
        assert isinstance(row[key], float), key
    for key in METRIC_KEYS:
        assert f"collapse/{key}" in row and f"collapse_test/{key}" in row
    assert torch.isfinite(torch.tensor(row["train/loss"]))
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["head"] == head and saved["head_kind"] == ("learned" if head in ("learned", "cosine") else "fixed")
    assert "collapse_speed/auc_log10_nc1" in saved and "collapse_speed/epochs_to/nc1" in saved
    assert (tmp_path / "run" / "collapse.png").stat().st_size > 0
    checkpoints = Path(summary["checkpoint_dir"])
    assert {"last.pt", "best.pt", "epoch_0001.pt"} <= {p.name for p in checkpoints.iterdir()}


@pytest.mark.parametrize("backbone", ["test_vit", "test_convnext"])
def test_other_timm_backbones_train(tmp_path, backbone):
    train_tiny(tmp_path, [f"model.backbone={backbone}", "data.img_size=32", "trainer.epochs=1", "collapse.every=0"])
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 1


def test_trainer_switches_run_together(tmp_path):
    summary = train_tiny(tmp_path, ["trainer.grad_accum=2", "trainer.clip_grad=1.0",
                                    "trainer.ema=true", "trainer.channels_last=true", "trainer.label_smoothing=0.1",
                                    "optim=adamw", "sched=step", "collapse.mode=online"])
    row = read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]
    assert "test/acc_ema" in row and "collapse/nc1" in row
    assert summary["epochs"] == 2


def test_a_last_training_batch_of_one_sample_is_left_out(tmp_path):
    # 48 samples in batches of 47: a last batch of one sample would stop BatchNorm in train mode
    summary = train_tiny(tmp_path, ["data.batch_size=47", "trainer.epochs=1", "collapse.every=0"])
    assert summary["epochs"] == 1


def test_bf16_autocast_trains_on_cpu(tmp_path):
    # 32x32: at 16x16 test_resnet's last stage is 1x1 and bf16 CPU training sporadically turns a conv weight NaN
    summary = train_tiny(tmp_path, ["trainer.precision=bf16", "trainer.clip_grad=1.0", "optim=adamw", "data.img_size=32"])
    assert summary["epochs"] == 2 and summary["final/train/loss"] < 10


def test_training_learns_the_synthetic_classes(tmp_path):
    summary = train_tiny(tmp_path, ["trainer.epochs=6", "collapse.every=0", "data.noise=0.3"])
    assert summary["final/train/acc"] >= 0.9
    assert summary["final/test/acc"] >= 0.75


def test_resume_from_last_continues_at_the_right_epoch(tmp_path):
    first = train_tiny(tmp_path, [], run_name="first")
    last = Path(first["checkpoint_dir"]) / "last.pt"
    resumed = train_tiny(tmp_path, [f"resume={last}", "trainer.epochs=3"], run_name="second")
    rows = read_jsonl(tmp_path / "second" / "metrics.jsonl")
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert rows[:2] == read_jsonl(tmp_path / "first" / "metrics.jsonl")
    assert resumed["checkpoint_dir"] == first["checkpoint_dir"]


def test_a_new_run_never_overwrites_another_runs_checkpoints(tmp_path):
    first = train_tiny(tmp_path, ["trainer.epochs=1"], run_name="a")
    second = train_tiny(tmp_path, ["trainer.epochs=1"], run_name="b")
    assert second["checkpoint_dir"] == first["checkpoint_dir"] + "-2"
    auto = train_tiny(tmp_path, ["trainer.epochs=2", "resume=auto"], run_name="c")
    assert auto["checkpoint_dir"] == second["checkpoint_dir"]  # the newest run of that name continues
    assert [row["epoch"] for row in read_jsonl(tmp_path / "c" / "metrics.jsonl")] == [1, 2]


def test_digits_is_the_real_bundled_data():
    bundle = create_data(compose_config(tiny=False).data)
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 1797 and bundle.num_classes == 10
    assert abs(len(bundle.test) - 0.2 * 1797) < 10
    # The validation split (data.val_fraction=0.1) comes out of the training split; the test split is unchanged.
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (1295, 143, 359)
    image, label = bundle.train[0]
    assert image.shape == (1, 16, 16) and 0 <= label < 10


def test_epoch_sampler_is_seeded_resumable_and_sharded():
    sampler = EpochSampler(10, seed=3)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.set_epoch(4, start=6)
    assert list(sampler) == full[6:]
    sampler.set_epoch(5)
    assert list(sampler) != full
    shards = [EpochSampler(10, seed=3, rank=r, world_size=3) for r in range(3)]
    for shard in shards:
        shard.set_epoch(4)
    assert {len(list(s)) for s in shards} == {4}  # padded to equal steps
    eval_shards = [list(EpochSampler(10, shuffle=False, rank=r, world_size=3)) for r in range(3)]
    assert sorted(sum(eval_shards, [])) == list(range(10))  # disjoint, unpadded


def test_the_training_sampler_hands_each_index_over_with_its_epoch():
    sampler = EpochSampler(10, seed=3, carry_epoch=True)
    sampler.set_epoch(4, start=6)
    keys = list(sampler)
    assert keys == [EpochIndex(4, i) for i in sampler.epoch_indices()[6:]]
    bundle = create_data(compose_config(["data.augment=true"]).data)
    augmented = SeededAugmentation(bundle.train, seed=0)
    assert torch.equal(augmented[EpochIndex(4, 3)][0], augmented[EpochIndex(4, 3)][0])
    assert not torch.equal(augmented[EpochIndex(4, 3)][0], augmented[EpochIndex(5, 3)][0])
    augmented.set_epoch(5)  # a plain index: the epoch set in this process
    assert torch.equal(augmented[3][0], augmented[EpochIndex(5, 3)][0])


def test_persistent_workers_augment_every_epoch_as_the_main_process_does():
    """Workers started in epoch 0 and kept (persistent_workers) must still see epochs 1 and 2: the epoch travels with
    the indices, not through the dataset copy a worker holds."""
    bundle = create_data(compose_config(["data.augment=true"]).data)
    augmented = SeededAugmentation(bundle.train, seed=5)

    def batches(num_workers: int) -> tuple[list, list]:
        train, _, test = create_loaders(bundle, batch_size=16, eval_batch_size=16, num_workers=num_workers, seed=5)
        assert train.persistent_workers == test.persistent_workers == (num_workers > 0)
        seen, expected = [], []
        for epoch in range(3):
            train.sampler.set_epoch(epoch)
            order = train.sampler.epoch_indices()
            expected += [torch.stack([augmented[EpochIndex(epoch, i)][0] for i in order[s:s + 16]])
                         for s in range(0, len(order), 16)] + [x for x, _ in test]
            seen += [x for x, _ in train] + [x for x, _ in test]
        return seen, expected

    for seen, expected in (batches(0), batches(2)):
        assert len(seen) == len(expected) and all(torch.equal(a, b) for a, b in zip(seen, expected))


def test_a_finished_run_ends_its_loader_workers(tmp_path):
    """Persistent workers end with the run, not at some later garbage collection (a sweep in one process would pile
    them up); the run's loaders still work afterwards."""
    import multiprocessing

    result = train_tiny(tmp_path, ["data.num_workers=2", "data.val_fraction=0.25", "collapse.every=1"])
    assert multiprocessing.active_children() == []
    assert sum(len(y) for _, y in result.run.test_loader) == 16


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "fixedcls.commands.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_multirun_gives_each_job_its_own_run_and_checkpoint_directory(tmp_path):
    result = _cli(["-m", "head=learned,simplex", *TINY, "trainer.epochs=1", f"hydra.sweep.dir={tmp_path}/sweep"], tmp_path)
    assert result.returncode == 0, result.stderr
    jobs = sorted((tmp_path / "sweep").glob("[0-9]*"))
    assert len(jobs) == 2 and all((job / "metrics.jsonl").is_file() for job in jobs)
    # <name>-<identity[:8]>: the two jobs differ in head, so in name and identity.
    names = {p.name for p in (tmp_path / "checkpoints").iterdir()}
    assert {name.rsplit("-", 1)[0] for name in names} == {"synthetic-test_resnet-learned-s0", "synthetic-test_resnet-simplex-s0"}
    assert all(len(name.rsplit("-", 1)[1]) == 8 for name in names)


def test_a_failing_multirun_job_does_not_stop_the_others(tmp_path):
    result = _cli(["-m", "model.dim=2,null", *TINY, "trainer.epochs=1", f"hydra.sweep.dir={tmp_path}/sweep"], tmp_path)
    assert result.returncode == 1
    assert "needs d >= 3" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "sweep" / "1" / "metrics.jsonl").is_file()
    assert not (tmp_path / "sweep" / "0" / "metrics.jsonl").exists()


def _closing_lines(stdout: str, count: int) -> list[str]:
    """The last `count` log lines of a run, without their time stamps."""
    return [line.split("] ", 1)[1] for line in stdout.strip().splitlines()[-count:]]


def test_a_run_ends_by_naming_what_it_made(tmp_path):
    import shlex

    result = _cli([*TINY, "data.val_fraction=0.25", "collapse.every=1", "trainer.threads=1"], tmp_path)
    assert result.returncode == 0, result.stderr
    lines = _closing_lines(result.stdout, 7)
    summary_path = next(tmp_path.glob("outputs/*/*/summary.json"))
    summary = json.loads(summary_path.read_text())
    history = read_jsonl(summary_path.parent / "metrics.jsonl")
    directory = Path(summary["checkpoint_dir"])  # checkpoints/<name>-<identity>: relative, as the user pastes it
    assert lines[0] == f"finished after 2 epochs: final test acc {100 * summary['final/test/acc']:.2f}%"
    assert lines[1] == (f"best.pt  {directory / 'best.pt'}: epoch {summary['best/epoch']} of 2, chosen by val/acc "
                        f"(val acc {100 * summary['best/val/acc']:.2f}%, test acc {100 * summary['best/test/acc']:.2f}%)")
    assert lines[2] == f"last.pt  {directory / 'last.pt'}"
    assert lines[3] == (f"NC1 (train)  {history[0]['collapse/nc1']:.3g} (epoch 1) -> "
                        f"{history[-1]['collapse/nc1']:.3g} (epoch 2)")
    assert lines[4].startswith("NC1 (test)  ")
    assert lines[5] == f"summary  {summary_path.relative_to(tmp_path)}"
    assert lines[6] == f"evaluate the model:  fixedcls-eval {directory / 'best.pt'}"
    for named in (directory / "best.pt", directory / "last.pt", summary_path):
        assert (tmp_path / named).is_file()
    # The command runs as printed, from where the run was started.
    command = shlex.split(lines[6].split(":  ", 1)[1])
    evaluated = subprocess.run([sys.executable, "-m", "fixedcls.commands.evaluate", *command[1:]], cwd=tmp_path,
                               capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert evaluated.returncode == 0, evaluated.stderr


def test_a_run_without_validation_says_best_pt_follows_the_test_split(tmp_path):
    result = _cli([*TINY, "data.val_fraction=0", "collapse.every=0", "trainer.threads=1",
                   f"checkpoint.root={tmp_path / 'elsewhere'}"], tmp_path)
    assert result.returncode == 0, result.stderr
    lines = _closing_lines(result.stdout, 5)
    summary = json.loads(next(tmp_path.glob("outputs/*/*/summary.json")).read_text())
    assert "chosen by test/acc: no validation split, so best.pt follows the test split" in lines[1]
    assert f"(test acc {100 * summary['best/test/acc']:.2f}%)" in lines[1] and "val acc" not in lines[1]
    assert not any(line.startswith("NC1") for line in lines)
    # a checkpoint root given as an absolute path below the working directory is shown relative to it
    assert lines[-1] == f"evaluate the model:  fixedcls-eval {Path(summary['checkpoint_dir']).relative_to(tmp_path) / 'best.pt'}"
