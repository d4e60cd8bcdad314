"""Trackers through their public interface: W&B best/last summaries, model artifacts, preemption and the default
group (offline runs read back from their .wandb file), TensorBoard and CSV, and several trackers at once."""
from __future__ import annotations

import csv
import json
import os
import signal

import pytest
from omegaconf import OmegaConf

from fixedcls.commands.cli import check_overrides
from fixedcls.errors import FixedclsError
from fixedcls.tracking.base import MultiTracker, Tracker
from fixedcls.tracking.factory import create_tracker
from fixedcls.training.signals import TrainingInterrupted
from fixedcls.tracking.factory import chosen_trackers
from utils import compose_config, train_tiny

wandb = pytest.importorskip("wandb")
from test_wandb import RESOLVED, _logger_cfg, _records, offline, read_offline_run  # noqa: E402,F401


def _artifacts(run: dict) -> list:
    (wandb_file,) = run["dir"].glob("run-*.wandb")
    return [r.artifact for r in _records(wandb_file) if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "model"]


def test_wandb_keeps_the_best_of_every_measure_and_uploads_best_pt(tmp_path, offline):
    summary = train_tiny(tmp_path, ["logger=wandb", "logger.log_model=best", "trainer.epochs=3"])
    (run,) = read_offline_run(offline)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for key, best in (("test/acc", max), ("train/loss", min), ("collapse/nc1", min), ("collapse/nc4", min),
                      ("collapse/proto_cos", max), ("collapse_test/nc1", min)):
        values = [row[key] for row in rows]
        kind = best.__name__
        assert run["summary"][key] == {kind: pytest.approx(best(values)), "last": pytest.approx(values[-1])}, key
    ops = {m.name: (m.summary.min, m.summary.max) for m in run["metrics"] if m.name}
    assert ops["test/acc"] == (False, True) and ops["collapse/nc2_etf_error"] == (True, False) and "lr" not in ops
    (artifact,) = _artifacts(run)  # log_model=best: one upload, at the end
    best_epoch = summary["best/epoch"]  # the epoch best.pt holds (chosen on val/acc)
    assert artifact.name == f"model-{run['run'].run_id}" and "best" in artifact.aliases
    assert f"epoch-{best_epoch}" in artifact.aliases and [e.path for e in artifact.manifest.contents] == ["best.pt"]
    # (W&B itself gives the newest version of an artifact the alias `latest`, so it says nothing here)
    # the test split, per class and as a confusion matrix
    assert run["summary"]["test/per_class/_type"] == "table-file" and run["summary"]["test/per_class/nrows"] == 4
    (table,) = run["dir"].rglob("per_class_*.table.json")
    content = json.loads(table.read_text())
    assert content["columns"] == ["class", "name", "count", "correct", "accuracy"]
    assert sum(r[2] for r in content["data"]) == 16 and sum(r[3] for r in content["data"]) / 16 == pytest.approx(rows[-1]["test/acc"])
    assert run["summary"]["test/confusion_matrix_table/nrows"] > 0


def test_log_model_all_uploads_every_epoch_checkpoint_with_its_aliases(tmp_path, offline):
    train_tiny(tmp_path, ["logger=wandb", "logger.log_model=all", "collapse.every=0"])
    (run,) = read_offline_run(offline)
    first, second = _artifacts(run)
    assert [e.path for e in first.manifest.contents] == ["epoch_0001.pt"] and {"epoch-1", "latest", "best"} <= set(first.aliases)
    assert [e.path for e in second.manifest.contents] == ["epoch_0002.pt"] and {"epoch-2", "latest"} <= set(second.aliases)


def test_a_stop_signal_marks_the_wandb_run_preempting_not_failed(tmp_path, offline, monkeypatch):
    from fixedcls.tracking.wandb_run import WandbTracker

    real_log_epoch = WandbTracker.log_epoch

    def log_then_sigterm(self, row):  # SLURM's SIGTERM arrives after epoch 1
        real_log_epoch(self, row)
        if row.get("epoch") == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(WandbTracker, "log_epoch", log_then_sigterm)
    with pytest.raises(TrainingInterrupted):
        train_tiny(tmp_path, ["logger=wandb", "collapse.every=0", "trainer.epochs=3"])
    (run,) = read_offline_run(offline)
    (wandb_file,) = run["dir"].glob("run-*.wandb")
    kinds = [r.WhichOneof("record_type") for r in _records(wandb_file)]
    assert "preempting" in kinds  # W&B shows preempted, and a W&B sweep requeues the run
    assert run["exit_code"] == 128 + signal.SIGTERM


def test_the_default_group_tells_launches_of_a_preset_apart(tmp_path, offline, monkeypatch):
    monkeypatch.setattr("fixedcls.tracking.wandb_run.hydra_job", lambda: ("2026-01-02_10-00-00", ["head=dcube"]))
    tracker = create_tracker(_logger_cfg(mode="offline"), run_dir=tmp_path, resolved_config={**RESOLVED, "experiment": "fixed_vs_learned"})
    tracker.finish(0)
    (run,) = read_offline_run(offline)
    meta = run["run"]
    config = {u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in meta.config.update}
    assert meta.run_group == "fixed_vs_learned-2026-01-02_10-00-00"
    assert "sweep:2026-01-02_10-00-00" in meta.tags and config["sweep_id"] == "2026-01-02_10-00-00"
    assert config["hydra_overrides"] == ["head=dcube"]
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")  # under `wandb agent`: the W&B sweep is the launch
    from fixedcls.tracking.wandb_run import default_group, launch_id

    assert default_group({"experiment": "fixed_vs_learned"}, launch_id("2026-01-02_10-00-00")) == "fixed_vs_learned-abc123"
    assert default_group({"name": "run"}, None) == "run"


def test_tensorboard_and_csv_at_once_hold_every_epoch_key(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = train_tiny(tmp_path, ["logger=[tensorboard,csv]"])
    assert isinstance(summary.run.tracker, MultiTracker)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for key in ("collapse/nc1", "collapse/nc2_etf_error", "collapse/nc3", "collapse/nc4", "collapse/proto_cos",
                "collapse_test/nc1", "test/acc", "train/loss"):
        assert key in tags, key
        assert [(e.step, e.value) for e in events.Scalars(key)] == [(r["epoch"], pytest.approx(r[key])) for r in rows]
    assert "collapse" in events.Tags()["images"] and "summary/text_summary" in events.Tags()["tensors"]
    with open(tmp_path / "run" / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in table] == [1, 2]
    assert float(table[1]["collapse/nc1"]) == pytest.approx(rows[1]["collapse/nc1"])
    with open(tmp_path / "run" / "summary.csv") as f:
        saved = {k: v for k, v in csv.reader(f)}
    assert float(saved["best/test/acc"]) == pytest.approx(summary["best/test/acc"])


def test_the_logger_choice_is_checked():
    cfg = compose_config(["logger=[wandb,tensorboard]"])
    assert chosen_trackers(cfg.logger) == ["wandb", "tensorboard"]
    assert chosen_trackers(compose_config([]).logger) == []
    assert check_overrides(["logger=[wandb,tensorbord]"]).startswith("unknown logger 'tensorbord': choose one of csv, none, ")
    assert "logger.log_model=sometimes" in check_overrides(["logger.log_model=sometimes"])
    with pytest.raises(FixedclsError, match="unknown logger 'mlflow'"):
        create_tracker(OmegaConf.create({"name": "mlflow"}), run_dir=".", resolved_config={})
    assert type(create_tracker(OmegaConf.create({"name": "none", "use": {}}), run_dir=".", resolved_config={})) is Tracker


def test_several_trackers_each_get_every_call_even_when_one_fails():
    calls = []

    class Failing(Tracker):
        def finish(self, exit_code=0):
            calls.append(("failing", exit_code))
            raise OSError("disk full")

    class Recording(Tracker):
        active, log_model = True, "best"

        def finish(self, exit_code=0):
            calls.append(("recording", exit_code))

    both = MultiTracker([Failing(), Recording()])
    assert both.active and both.log_model == "best" and both.run_id is None
    with pytest.raises(OSError, match="disk full"):
        both.finish(143)
    assert calls == [("failing", 143), ("recording", 143)]
