"""The W&B tracker, without network: offline runs read back from their .wandb file, the online->offline
fallback, failures that only warn, finish on a failing job, and a resumed run continuing the same W&B run."""
from __future__ import annotations

import json
import struct
import time
import warnings
from pathlib import Path

import pytest
import torch

wandb = pytest.importorskip("wandb")
from omegaconf import OmegaConf  # noqa: E402
from wandb.proto import wandb_internal_pb2 as pb  # noqa: E402

from fixedcls.collapse import log_prototype_alignment, prototype_alignment  # noqa: E402
from fixedcls.tracking.base import Tracker, TrackerWarning
from fixedcls.tracking.factory import create_tracker  # noqa: E402
from fixedcls.tracking.wandb_run import WandbTracker  # noqa: E402
from utils import compose_config, train_tiny  # noqa: E402


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb_dir").mkdir()
    wandb.teardown()  # wandb keeps the settings (WANDB_DIR) of its first start in a process-wide singleton
    yield tmp_path / "wandb_dir"
    wandb.teardown()


# --- reading an offline run back: the .wandb file is a LevelDB-style log of protobuf records -------------
def _records(path: Path) -> list:
    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    records, pos, block, pending = [], 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        if kind in (1, 4):  # FULL, LAST
            record = pb.Record()
            record.ParseFromString(pending + payload)
            records.append(record)
            pending = b""
        else:  # FIRST, MIDDLE
            pending += payload
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(wandb_dir: Path, run_id: str | None = None) -> list[dict]:
    """Every finished offline run (of that id) under wandb_dir, oldest first, as {run, history, summary, exit_code}.

    `run.finish()` returns before wandb-core has flushed the file: wait for the exit record (the last one).
    """
    runs = []
    for run_dir in sorted(Path(wandb_dir).rglob("offline-run-*")):
        if run_id and not run_dir.name.endswith(run_id):
            continue
        (wandb_file,) = run_dir.glob("run-*.wandb")
        deadline = time.monotonic() + 30
        while not any(r.WhichOneof("record_type") == "exit" for r in _records(wandb_file)) and time.monotonic() < deadline:
            time.sleep(0.1)
        out = {"dir": run_dir, "run": None, "history": [], "summary": {}, "exit_code": None, "metrics": []}
        for record in _records(wandb_file):
            which = record.WhichOneof("record_type")
            if which == "run":
                out["run"] = record.run
            elif which == "history":
                out["history"].append({_key(i): json.loads(i.value_json) for i in record.history.item})
            elif which == "summary":
                out["summary"].update({_key(u): json.loads(u.value_json) for u in record.summary.update})
            elif which == "metric":
                out["metrics"].append(record.metric)
            elif which == "exit":
                out["exit_code"] = record.exit.exit_code
        runs.append(out)
    return runs


# --- tests ----------------------------------------------------------------------------------------------
def test_offline_run_holds_every_epoch_key_the_summary_and_the_alignment_table(tmp_path, offline):
    from fixedcls.training.assemble import train

    cfg = compose_config(["logger=wandb", "logger.tags=[mine]"], tmp_path=tmp_path)
    cfg.experiment = "unit"  # as an experiment preset sets it: the default W&B group
    summary = train(cfg, tmp_path / "run")
    (run,) = read_offline_run(offline)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [h for h in run["history"] if "train/loss" in h]
    assert [h["epoch"] for h in epochs] == [1, 2]
    for logged, row in zip(epochs, rows):  # every key of the metrics.jsonl row, same value
        for key, value in row.items():
            assert logged[key] == pytest.approx(value, nan_ok=True), key
        assert "time/train_s" in logged
    for key in ("collapse_speed/epochs_to/nc1", "collapse_speed/auc_log10_nc1", "final/test/acc", "final/collapse/nc1",
                "params/trainable"):
        if summary.get(key) is not None:
            assert run["summary"][key] == pytest.approx(summary[key]), key
    assert run["summary"]["prototype_alignment/_type"] == "table-file"
    assert run["summary"]["collapse/_type"] == "image-file"
    (table,) = run["dir"].rglob("prototype_alignment_*.table.json")
    content = json.loads(table.read_text())
    assert content["columns"] == ["class", "count", "cos(mu_c, w_c)", "||mu_c - mu_G||"]
    # 12 training images per class, 1 of which the validation split holds (data.val_fraction=0.1 of synthetic)
    assert [r[0] for r in content["data"]] == [0, 1, 2, 3] and all(r[1] == 11 for r in content["data"])
    meta = run["run"]
    assert meta.run_group == "unit" and meta.job_type == "train" and meta.display_name == "synthetic-test_resnet-simplex-s0"
    assert list(meta.tags) == ["simplex", "fixed", "test_resnet", "synthetic", "mine"]
    config = {_key(u): json.loads(u.value_json) for u in meta.config.update}
    assert config["head"]["name"] == "simplex" and config["trainer"]["epochs"] == 2
    metrics = {m.name or m.glob_name: m.step_metric for m in run["metrics"]}
    assert metrics.pop("epoch") == "" and metrics.pop("*") == "epoch"
    assert metrics and set(metrics.values()) == {"epoch"}  # the keys with a best value (tests/test_trackers.py)
    assert run["exit_code"] == 0 and wandb.run is None


def test_the_run_is_finished_with_an_error_code_when_the_job_raises(tmp_path, offline, monkeypatch):
    finished = []
    real_finish = WandbTracker.finish
    monkeypatch.setattr(WandbTracker, "finish", lambda self, exit_code=0: (finished.append(exit_code), real_finish(self, exit_code)))

    def broken_fit(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("fixedcls.training.assemble.fit", broken_fit)
    with pytest.raises(RuntimeError, match="boom"):
        train_tiny(tmp_path, ["logger=wandb"])
    assert finished == [1]
    (run,) = read_offline_run(offline)
    assert run["exit_code"] == 1 and wandb.run is None


def _logger_cfg(**values):
    return OmegaConf.create({"name": "wandb", "project": "fixedcls-test", "entity": None, "group": None,
                             "job_type": "train", "tags": [], "mode": "online", "dir": None, **values})


RESOLVED = {"name": "synthetic-test_resnet-learned-s0", "experiment": None, "seed": 0, "head": {"name": "learned"},
            "model": {"backbone": "test_resnet"}, "data": {"name": "synthetic"}}


def test_a_failing_online_start_goes_on_offline_with_one_warning(tmp_path, offline, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")  # logger.mode=online decides
    real_init, calls = wandb.init, []

    def flaky_init(*args, **kwargs):
        calls.append(kwargs["mode"])
        if len(calls) == 1:
            raise wandb.errors.CommError("no network")
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", flaky_init)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = create_tracker(_logger_cfg(), run_dir=tmp_path / "run", resolved_config=RESOLVED)
        tracker.log_epoch({"epoch": 1, "train/loss": 0.5})
        tracker.finish(0)
    ours = [w for w in caught if issubclass(w.category, TrackerWarning)]
    assert calls == ["online", "offline"]
    assert len(ours) == 1 and "offline" in str(ours[0].message) and "no network" in str(ours[0].message)
    assert tracker.mode == "offline" and tracker.run_id
    (run,) = read_offline_run(offline, tracker.run_id)
    assert [h["train/loss"] for h in run["history"]] == [0.5]
    assert run["run"].run_group == RESOLVED["name"]  # no experiment, no sweep: the run name


def test_an_error_while_logging_warns_once_and_turns_the_tracker_off(tmp_path, offline):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = create_tracker(_logger_cfg(mode="offline"), run_dir=tmp_path / "run", resolved_config=RESOLVED)
        tracker.run.log = lambda *a, **k: (_ for _ in ()).throw(OSError("disk full"))
        for epoch in (1, 2, 3):
            tracker.log_epoch({"epoch": epoch, "train/loss": 1.0})
        tracker.log_table("t", ["a"], [[1]])
        tracker.log_summary({"x": 1.0})
        assert not tracker.active
        tracker.finish(0)
    ours = [w for w in caught if issubclass(w.category, TrackerWarning)]
    assert len(ours) == 1 and "disk full" in str(ours[0].message)
    assert wandb.run is None


def test_jobs_in_one_process_never_share_a_run(tmp_path, offline):
    first = create_tracker(_logger_cfg(mode="offline"), run_dir=tmp_path / "0", resolved_config=RESOLVED)
    first.log_epoch({"epoch": 1, "train/loss": 1.0})  # and this job never calls finish...
    second = create_tracker(_logger_cfg(mode="offline"), run_dir=tmp_path / "1", resolved_config=RESOLVED)
    second.log_epoch({"epoch": 1, "train/loss": 2.0})
    second.finish(0)
    assert first.run_id != second.run_id
    (one,), (two,) = read_offline_run(offline, first.run_id), read_offline_run(offline, second.run_id)
    assert [h["train/loss"] for h in one["history"]] == [1.0] and [h["train/loss"] for h in two["history"]] == [2.0]
    first.finish(0)  # finishing a run the next job already closed is harmless


def test_env_mode_wins_and_disabled_starts_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(wandb, "init", lambda *a, **k: pytest.fail("wandb.init called in disabled mode"))
    tracker = create_tracker(_logger_cfg(mode="online"), run_dir=tmp_path, resolved_config=RESOLVED, run_id="keepme")
    assert isinstance(tracker, WandbTracker) and not tracker.active and tracker.run_id == "keepme"
    tracker.log_epoch({"epoch": 1})
    tracker.finish(0)
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ValueError, match="WANDB_MODE=sometimes"):
        create_tracker(_logger_cfg(), run_dir=tmp_path, resolved_config=RESOLVED)
    assert type(create_tracker(_logger_cfg(name="none"), run_dir=tmp_path, resolved_config=RESOLVED)) is Tracker


def test_a_run_name_reaches_wandb_as_its_folders_have_it(tmp_path, monkeypatch):
    """One rule for a run name wherever it goes (fixedcls.config.safe_name): the W&B run name and default group too."""
    seen = []

    def init(**kwargs):
        seen.append(kwargs)
        raise RuntimeError("no run needed")

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(wandb, "init", init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        create_tracker(_logger_cfg(mode="offline"), run_dir=tmp_path, resolved_config={**RESOLVED, "name": "../../x\x1b[1m"})
    assert seen[0]["name"] == seen[0]["group"] == "_.._x_1m"


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, offline):
    # logger.dir per part: offline folders are named <date_time>-<id>, and both parts may start within one second
    first = train_tiny(tmp_path, ["logger=wandb", "trainer.epochs=1", "collapse.every=0", f"logger.dir={offline}/a"], run_name="a")
    state = torch.load(Path(first["checkpoint_dir"]) / "last.pt", weights_only=True)
    run_id = state["meta"]["tracker_run_id"]
    assert run_id
    train_tiny(tmp_path, ["logger=wandb", "trainer.epochs=2", "collapse.every=0", "resume=auto", f"logger.dir={offline}/b"],
               run_name="b")
    (part1,), (part2,) = read_offline_run(offline / "a", run_id), read_offline_run(offline / "b", run_id)
    assert part1["run"].run_id == part2["run"].run_id == run_id
    assert [h["epoch"] for h in part1["history"] if "train/loss" in h] == [1]
    # Offline, the resumed part replays the stored epochs, then goes on: `wandb sync` of it alone is the whole run.
    assert [h["epoch"] for h in part2["history"] if "train/loss" in h] == [1, 2]
    assert part2["history"][0]["train/loss"] == pytest.approx(part1["history"][0]["train/loss"])


def test_prototype_alignment_matches_the_class_means():
    from fixedcls.models.classifier import create_model

    torch.manual_seed(0)
    model = create_model("test_resnet", "orthoplex", 4, in_chans=3, img_size=16)
    x, y = torch.randn(20, 3, 16, 16), torch.tensor([0, 1, 2] * 6 + [0, 1])  # class 3 absent
    loader = [(x[:8], y[:8]), (x[8:], y[8:])]
    columns, rows = prototype_alignment(model, loader, device="cpu")
    assert model.training  # the mode it was in is restored
    with torch.no_grad():
        model.eval()
        h = model.forward_features(x).double()
    means = torch.stack([h[y == c].mean(0) for c in range(3)])
    w = model.head.weight.double()[:3]
    assert [r[0] for r in rows] == [0, 1, 2] and [r[1] for r in rows] == [7, 7, 6]
    assert [r[2] for r in rows] == pytest.approx(torch.nn.functional.cosine_similarity(means, w).tolist(), abs=1e-6)
    assert [r[3] for r in rows] == pytest.approx((means - means.mean(0)).norm(dim=1).tolist(), abs=1e-5)
    assert log_prototype_alignment(Tracker(), model, loader, device="cpu") is None  # inactive: nothing done


# --- offline means offline -------------------------------------------------------------------------------
NETWORK_GUARD = """
import os, socket, traceback

def _refuse(what):
    with open(os.environ["FIXEDCLS_NETWORK_LOG"], "a") as log:
        log.write(f"{what}\\n{''.join(traceback.format_stack(limit=12))}\\n")
    raise OSError(f"network access refused by the test's guard: {what}")

_LOCAL = ("localhost", "127.0.0.1", "::1")
_getaddrinfo, _connect = socket.getaddrinfo, socket.socket.connect

def getaddrinfo(host, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else host
    if name is not None and name not in _LOCAL and not str(name).startswith("127."):
        _refuse(f"getaddrinfo({name!r})")
    return _getaddrinfo(host, *args, **kwargs)

def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and str(address[0]) not in _LOCAL \\
            and not str(address[0]).startswith("127."):
        _refuse(f"connect({address!r})")
    return _connect(self, address)

socket.getaddrinfo, socket.socket.connect = getaddrinfo, connect
"""


@pytest.mark.parametrize("logger", [["logger=[wandb,tensorboard,csv]", "logger.mode=offline"],
                                    ["logger=wandb", "logger.mode=disabled"], ["logger=none"]])
def test_an_offline_run_opens_no_network_connection(tmp_path, logger):
    """Every Python process of the run (W&B's service is a Go binary that speaks to it over a Unix socket) gets a
    sitecustomize that refuses and records any lookup or connection beyond this machine. WANDB_MODE is unset, so
    logger.mode alone says offline: W&B's process-wide settings are then online unless fixedcls sets them."""
    import os
    import subprocess
    import sys

    from test_errors import TINY
    from test_resume import cli_env

    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(NETWORK_GUARD)
    attempts = tmp_path / "network.log"
    env = cli_env({"FIXEDCLS_NETWORK_LOG": str(attempts), "WANDB_CONSOLE": "off"})
    env.pop("WANDB_MODE")
    env["PYTHONPATH"] = os.pathsep.join([str(guard), env["PYTHONPATH"]])
    result = subprocess.run([sys.executable, "-m", "fixedcls.commands.train", *TINY, *logger, "hydra.run.dir=run"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert not attempts.exists(), attempts.read_text()
    if "logger.mode=offline" in logger:
        assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "the offline W&B run was not written"
        assert list((tmp_path / "run" / "tensorboard").iterdir()) and (tmp_path / "run" / "metrics.csv").is_file()
