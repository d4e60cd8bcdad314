"""fixedcls-compare: a real 2x2 multirun summarised by the console script, grouping rules on hand-made run
directories, the W&B source (offline error, a fake API), and the fixed_vs_learned preset's sweep."""
from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fixedcls.commands import compare
from fixedcls.tracking import aggregate
from utils import CONF_DIR, TINY


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """`fixedcls-train -m head=learned,simplex seed=0,1` on the TINY preset, in a subprocess."""
    root = tmp_path_factory.mktemp("sweep")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    args = ["-m", "head=learned,simplex", "seed=0,1", *TINY, "trainer.threads=1", "collapse.plot=false", "collapse.splits=[train]",
            f"hydra.sweep.dir={root}/sweep", f"checkpoint.root={root}/checkpoints"]
    script = Path(sys.executable).with_name("fixedcls-train")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "fixedcls.commands.train"]
    result = subprocess.run(command + args, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "sweep"


def _compare_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("fixedcls-compare")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "fixedcls.commands.compare"]
    env = {**os.environ, "MPLBACKEND": "Agg"}
    return subprocess.run(command + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_a_two_by_two_sweep_gives_two_groups_with_the_seed_means(sweep, tmp_path, monkeypatch):
    data = tmp_path / "sweep"
    shutil.copytree(sweep, data)
    failed = data / "7"  # a job that died before writing its summary
    shutil.copytree(data / "0" / ".hydra", failed / ".hydra")
    result = _compare_cli([str(data), "--out", str(tmp_path / "out"), "--no-plots"], tmp_path)
    assert result.returncode == 0, result.stderr
    monkeypatch.setattr(aggregate, "CURVES", ("test/acc", "collapse/nc1", "collapse/proto_cos"))  # fewer plots: faster
    compare.main([str(data), "--out", str(tmp_path / "out")])

    summaries: dict[str, list[dict]] = {}
    for job in sorted(data.glob("[0-6]")):
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        head = next(o.split("=", 1)[1] for o in overrides if o.startswith("head="))
        summaries.setdefault(head, []).append(json.loads((job / "summary.json").read_text()))
    assert {k: len(v) for k, v in summaries.items()} == {"learned": 2, "simplex": 2}

    with open(tmp_path / "out" / "comparison.csv") as f:
        rows = {row["group"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"head=learned", "head=simplex"}
    for head, group in summaries.items():
        row = rows[f"head={head}"]
        assert row["head"] == head and row["seeds"] == "2" and row["seed_values"] == "0 1"
        for key in ("test/acc", "train/acc", "collapse/nc1", "collapse/nc3", "collapse/proto_cos"):
            values = [s[f"final/{key}"] for s in group]
            assert float(row[f"{key}/mean"]) == pytest.approx(statistics.mean(values)), key
            assert float(row[f"{key}/std"]) == pytest.approx(statistics.stdev(values)), key
        for key in ("params/trainable", "time/train_s_per_epoch", "collapse_speed/auc_log10_nc1"):
            assert float(row[f"{key}/mean"]) == pytest.approx(statistics.mean(s[key] for s in group)), key
        reached = [s["collapse_speed/epochs_to/nc1"] for s in group if s["collapse_speed/epochs_to/nc1"] is not None]
        assert int(row["collapse_speed/epochs_to/nc1/n"]) == len(reached)
        if reached:
            assert float(row["collapse_speed/epochs_to/nc1/mean"]) == pytest.approx(statistics.mean(reached))

    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 3 and table[0].startswith("| head | seeds | train acc % | test acc % | NC1")
    learned = next(line for line in table if line.startswith("| learned |"))
    mean_acc = 100 * statistics.mean(s["final/test/acc"] for s in summaries["learned"])
    assert f"| {mean_acc:.1f} ± " in learned
    assert "skipped 1 job(s)" in result.stdout and f"{failed}: no summary.json" in result.stdout
    out = tmp_path / "out"
    assert "| head | seeds |" in (out / "comparison.md").read_text()
    for name in ("comparison.png", "comparison_plots/test_acc.png", "comparison_plots/collapse_nc1.png",
                 "comparison_plots/collapse_proto_cos.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


# --- grouping rules on hand-made run directories (no training) ---------------------------------------
def _job(path: Path, overrides: list[str], *, backbone="resnet18", head="simplex", seed=0, acc=0.5, nc1=0.1,
         epochs_to=None, finished=True) -> None:
    (path / ".hydra").mkdir(parents=True)
    config = {"head": {"name": head}, "model": {"backbone": backbone}, "seed": seed, "data": {"name": "digits"}}
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    rows = [{"epoch": 1, "test/acc": acc / 2, "collapse/nc1": nc1 * 10}, {"epoch": 2, "test/acc": acc, "collapse/nc1": nc1}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        (path / "summary.json").write_text(json.dumps({
            "final/test/acc": acc, "final/collapse/nc1": nc1, "collapse_speed/epochs_to/nc1": epochs_to,
            "params/trainable": 1000, "time/train_s_per_epoch": 1.5}))


def test_groups_follow_what_varied_across_sweeps(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _job(a / "0", ["head=learned", "seed=0", "hydra.sweep.dir=a"], head="learned", acc=0.6, epochs_to=2)
    _job(a / "1", ["head=learned", "seed=1", "hydra.sweep.dir=a"], head="learned", seed=1, acc=0.8, epochs_to=None)
    _job(a / "2", ["head=simplex", "seed=0", "hydra.sweep.dir=a"], acc=0.7, epochs_to=1)
    _job(a / "3", ["head=simplex", "seed=1", "hydra.sweep.dir=a"], seed=1, finished=False)
    _job(b / "0", ["head=simplex", "model.backbone=test_resnet", "hydra.sweep.dir=b"], backbone="test_resnet", acc=0.9)
    jobs, skipped = aggregate.load_dirs([a, b])
    assert len(jobs) == 4 and skipped == [(str(a / "3"), "no summary.json (the job failed or is still running)")]
    assert aggregate.varied_keys(jobs) == ["head", "model.backbone"]  # seed and hydra.* never group; backbone from config
    result = aggregate.compare(jobs, skipped, tmp_path / "out", plots=False)
    groups = {r["group"]: r for r in result.rows}
    assert list(groups) == ["head=learned, model.backbone=resnet18", "head=simplex, model.backbone=resnet18",
                            "head=simplex, model.backbone=test_resnet"]
    learned = groups["head=learned, model.backbone=resnet18"]
    assert learned["test/acc/mean"] == pytest.approx(0.7) and learned["test/acc/std"] == pytest.approx(statistics.stdev([0.6, 0.8]))
    assert learned["collapse_speed/epochs_to/nc1/n"] == 1  # one seed never reached the threshold
    assert "| learned / resnet18 | 2 | – | 70.0 ± 14.1 |" in result.table and "| 2 (1/2) |" in result.table
    assert "| simplex / test_resnet | 1 | – | 90.0 |" in result.table
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["comparison.csv", "comparison.md"]

    by = aggregate.compare(jobs, skipped, tmp_path / "by", by=["model.backbone"], plots=False)
    assert [r["group"] for r in by.rows] == ["model.backbone=resnet18", "model.backbone=test_resnet"]
    assert by.rows[0]["seeds"] == 3

    compare.main([str(a / "0"), "--out", str(tmp_path / "single"), "--no-plots"])  # a single run directory
    assert "| all | 1 |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        compare.main([str(a / "3")])
    assert exit_info.value.code == 2 and "no finished job to compare" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main([str(tmp_path / "out")])  # a directory without runs
    assert "no run directories under" in capsys.readouterr().err


def test_wandb_source_errors_clearly_when_offline_and_reads_runs_through_the_api(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--wandb", "team/project"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "needs W&B online" in err and "WANDB_MODE=offline" in err

    wandb = pytest.importorskip("wandb")

    class FakeRun:
        def __init__(self, i, head, seed, acc):
            self.id, self.name, self.state = f"r{i}", f"{head}-s{seed}", "finished"
            self.config = {"seed": seed, "head": {"name": head}, "hydra_overrides": [f"head={head}", f"seed={seed}"]}
            self.summary = {"final/test/acc": acc, "params/trainable": 10}
            self.acc = acc

        def scan_history(self):
            return [{"epoch": 1, "_step": 0, "test/acc": self.acc / 2}, {"epoch": 2, "_step": 1, "test/acc": self.acc},
                    {"epoch": 2, "_step": 2, "collapse": {"_type": "image-file"}}]

    class FakeApi:
        def __init__(self, timeout=None):
            pass

        def runs(self, path, filters=None):
            assert path == "team/project" and filters == {"group": "g"}
            running = FakeRun(9, "simplex", 2, 0.0)
            running.state = "running"
            return [FakeRun(0, "learned", 0, 0.5), FakeRun(1, "learned", 1, 0.7), FakeRun(2, "simplex", 0, 0.9), running]

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setattr(wandb, "Api", FakeApi)
    compare.main(["--wandb", "team/project", "--group", "g", "--out", str(tmp_path), "--no-plots"])
    out = capsys.readouterr().out
    assert "| learned | 2 | – | 60.0 ± 14.1 |" in out and "| simplex | 1 | – | 90.0 |" in out
    assert "wandb:team/project/r9 (simplex-s2): state running" in out


def test_the_fixed_vs_learned_preset_sweeps_four_heads_over_three_seeds():
    from hydra import compose, initialize_config_dir

    from fixedcls.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=fixed_vs_learned"], return_hydra_config=True)
    assert cfg.experiment == "fixed_vs_learned" and cfg.data.name == "digits"
    params = cfg.hydra.sweeper.params
    assert params.head.split(",") == ["learned", "simplex", "dcube", "orthoplex"] and params.seed.split(",") == ["0", "1", "2"]
