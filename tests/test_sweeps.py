"""Sweeps: a preset that runs its multirun and writes its own comparison (failed jobs listed), the value a job
returns to a sweeper, the Optuna search on digits, and the W&B Sweeps recipe's command line."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from fixedcls.commands.cli import check_overrides
from fixedcls.errors import FixedclsError
from fixedcls.commands.sweep import CompareSweep, FailNanTrials
from fixedcls.commands.cli import job_value, optimized_value
from utils import CONF_DIR, compose_config

ROOT = Path(__file__).resolve().parents[1]
TINY_CLI = ["model.backbone=test_resnet", "data.img_size=16", "trainer.epochs=1", "trainer.progress=false",
            "trainer.threads=1", "collapse.plot=false"]


def _train(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "fixedcls.commands.train", *args, f"checkpoint.root={tmp_path / 'ck'}",
                           f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)


def test_a_sweep_preset_runs_without_m_and_writes_its_comparison_listing_the_failed_job(tmp_path):
    # No -m: the preset sets hydra.mode=MULTIRUN. head= and seed= on the command line win over the preset's sweep;
    # the simplex cannot hold 4 classes in d=2, so job 2 fails and the others go on.
    done = _train(["experiment=fixed_vs_learned", "head=learned,dcube,simplex", "seed=0", "model.dim=2", "data=synthetic",
                   "data.num_classes=4", "data.train_per_class=12", "data.test_per_class=4", "data.batch_size=16",
                   *TINY_CLI], tmp_path)
    sweep = tmp_path / "sweep"
    assert done.returncode == 1, done.stderr[-2000:]  # a failed job: the multirun exits 1 after the others ran
    assert sorted(p.name for p in sweep.iterdir() if p.name.isdigit()) == ["0", "1", "2"]
    for name in ("comparison.csv", "comparison.md", "comparison.png"):
        assert (sweep / name).is_file(), name
    with open(sweep / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["head"] for r in rows] == ["learned", "dcube"] and all(r["seeds"] == "1" for r in rows)
    for row, job in zip(rows, ("0", "1")):
        summary = json.loads((sweep / job / "summary.json").read_text())
        assert float(row["test/acc/mean"]) == pytest.approx(summary["final/test/acc"])
    report = (sweep / "comparison.md").read_text()
    assert f"- {sweep / '2'}: failed: polytope 'simplex' cannot hold K=4 classes in d=2" in report


def test_the_optuna_search_completes_on_digits_and_a_failed_trial_does_not_stop_it(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    # -m because the command line adds to the search space; d=2 cannot hold digits' 10 classes on the simplex:
    # those trials fail (NaN), are recorded as failed and the search goes on (1 failure of 3 <= max_failure_rate).
    done = _train(["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=3", "model.dim=choice(2,16)", "collapse.every=0",
                   *TINY_CLI], tmp_path)
    sweep = tmp_path / "sweep"
    jobs = sorted(p for p in sweep.iterdir() if p.name.isdigit())
    assert len(jobs) == 3, done.stderr[-2000:]
    finished = [json.loads((job / "summary.json").read_text()) for job in jobs if (job / "summary.json").is_file()]
    failed = [job for job in jobs if "model.dim=2" in (job / ".hydra" / "overrides.yaml").read_text()]
    assert failed and len(finished) == 3 - len(failed)  # seeded sampler (seed 0): trial 1 draws d=2
    assert done.returncode == 1 and "failed or its optimized_metric was NaN" in done.stdout + done.stderr
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    # optimized_metric: null -> best/val/acc (digits has a validation split), else best/test/acc
    assert result["best_value"] == pytest.approx(max(s.get("best/val/acc", s["best/test/acc"]) for s in finished))
    assert set(result["best_params"]) == {"optim.lr", "optim.weight_decay", "head.normalize", "model.dim"}
    assert f"Skipped {len(failed)} job(s)" in (sweep / "comparison.md").read_text()


def test_the_value_a_job_returns():
    summary = {"best/test/acc": 0.9, "best/val/acc": 0.8, "final/collapse/nc1": None, "title": "x"}
    assert optimized_value(summary) == 0.8  # the validation split's best when there is one
    assert optimized_value({"best/test/acc": 0.9}) == 0.9
    assert optimized_value(summary, "best/test/acc") == 0.9
    assert math.isnan(optimized_value(summary, "final/collapse/nc1"))  # NaN as summary.json stores it
    with pytest.raises(FixedclsError, match=r"optimized_metric=best/tset/acc is not in this run's summary: choose one of best/test/acc, best/val/acc$"):
        optimized_value(summary, "best/tset/acc")
    with pytest.raises(FixedclsError, match="not a number"):
        optimized_value(summary, "title")
    assert math.isnan(job_value(None)) and job_value(0.5) == 0.5  # cli.run_job gives None for a failed job


def test_a_nan_job_becomes_a_failed_job_for_the_optuna_sweeper():
    from hydra.core.utils import JobReturn, JobStatus

    nan_job = JobReturn(overrides=["optim.lr=9"], status=JobStatus.COMPLETED)
    nan_job.return_value = float("nan")
    good = JobReturn(overrides=["optim.lr=0.1"], status=JobStatus.COMPLETED)
    good.return_value = 0.7
    for job in (nan_job, good):
        FailNanTrials().on_job_end(config=None, job_return=job)
    assert nan_job.status == JobStatus.FAILED and good.status == JobStatus.COMPLETED and good.return_value == 0.7
    with pytest.raises(FixedclsError, match=r"the job \(optim.lr=9\) failed or its optimized_metric was NaN"):
        float(nan_job.return_value)


def test_the_comparison_callback_can_be_switched_off(tmp_path):
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    CompareSweep(enabled=False).on_multirun_end(config=config)
    assert list(tmp_path.iterdir()) == []
    CompareSweep().on_multirun_end(config=config)  # nothing to compare: a warning, never an exception
    assert list(tmp_path.iterdir()) == []
    job = tmp_path / "0"
    job.mkdir()
    (job / "summary.json").write_text(json.dumps({"final/test/acc": 0.5, "best/test/acc": 0.5}))
    generations = OmegaConf.merge(config, {"generations": {"tasks": [[0, 1], [2]]}})
    CompareSweep().on_multirun_end(config=generations)  # fixedcls-compat train: its jobs report in compat.json
    assert not (tmp_path / "comparison.md").exists()
    CompareSweep(plots=False).on_multirun_end(config=config)
    assert (tmp_path / "comparison.md").is_file() and not (tmp_path / "comparison.png").exists()


def test_presets_and_search_are_multiruns_and_checked():
    from hydra import compose, initialize_config_dir
    from hydra.types import RunMode

    from fixedcls.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        preset = compose(config_name="config", overrides=["experiment=fixed_vs_learned"], return_hydra_config=True)
        search = compose(config_name="config", overrides=["hparams_search=optuna"], return_hydra_config=True)
        plain = compose(config_name="config", return_hydra_config=True)
    assert preset.hydra.mode == RunMode.MULTIRUN and search.hydra.mode == RunMode.MULTIRUN and plain.hydra.mode is None
    assert plain.hydra.callbacks.compare._target_ == "fixedcls.commands.sweep.CompareSweep"
    assert search.hydra.sweeper.max_failure_rate == 0.5 and search.optimized_metric is None
    assert set(search.hydra.sweeper.params) == {"optim.lr", "optim.weight_decay", "head.normalize"}
    assert check_overrides(["hparams_search=optuna"]) is None
    assert check_overrides(["hparams_search=grid"]) == "unknown hparams_search 'grid': choose one of optuna (conf/hparams_search/)"


def test_the_wandb_sweeps_recipe_gives_a_command_line_fixedcls_train_accepts(tmp_path):
    wandb_sweeps = pytest.importorskip("wandb.sdk.launch.sweeps.utils")
    recipe = yaml.safe_load((ROOT / "docs" / "wandb_sweep.yaml").read_text())
    samples = {key: spec.get("min", spec.get("values", [None])[-1]) for key, spec in recipe["parameters"].items()}
    # What `wandb agent` runs for one suggestion (wandb/wandb_agent.py: the macros of `command` expanded).
    args = wandb_sweeps.create_sweep_command_args({"args": {k: {"value": v} for k, v in samples.items()}})
    command = []
    for part in wandb_sweeps.create_sweep_command(recipe["command"]):
        command += args.get(part[2:-1], ["/usr/bin/env"]) if part.startswith("${") else [part]
    assert command[:2] == ["/usr/bin/env", "fixedcls-train"] and "optim.lr=0.001" in command and "head=orthoplex" in command
    overrides = command[2:]
    assert check_overrides(overrides) is None
    cfg = compose_config(overrides, tiny=False)
    assert cfg.optim.lr == 0.001 and cfg.head.name == "orthoplex" and cfg.logger.name == "wandb"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    shown = subprocess.run([sys.executable, "-m", "fixedcls.commands.train", *overrides, "--cfg", "job"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout)["optim"]["weight_decay"] == pytest.approx(1e-6)
