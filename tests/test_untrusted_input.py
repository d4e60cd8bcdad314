"""Files from elsewhere (a checkpoint, a run folder, a W&B run) are data: issue 21.

* a stored config is never a template: ``${oc.env:...}`` in it stays text in `build.stored_config`, in
  fixedcls-compat's tracker logging and in fixedcls-compare's tables;
* a stored config never starts a download (data.download, an hf-hub: backbone) nor writes elsewhere;
* cells that a spreadsheet would run as a formula are quoted in every CSV fixedcls writes (comparison.csv,
  fixedcls-predict --out, the csv logger's metrics.csv and summary.csv), Markdown cells escape | and newlines,
  and control characters in names reach the terminal escaped (issue 28);
* a checkpoint that cannot continue a run, a newer version's config, a summary.json or metrics line that is
  not a JSON object: one line (or a skipped job), never a traceback.
"""
from __future__ import annotations

import csv
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_errors import assert_one_line_error, train_cli  # noqa: E402
from test_resume import LAUNCH_KEYS, LAUNCH_PREFIXES  # noqa: E402

from fixedcls.runs import checkpoints as ckpt  # noqa: E402
from fixedcls.commands import compare  # noqa: E402
from fixedcls.tracking import aggregate  # noqa: E402
from fixedcls.runs.rebuild import model_from_checkpoint  # noqa: E402
from fixedcls.runs.stored import plain_config, stored_config  # noqa: E402
from fixedcls.errors import FixedclsError  # noqa: E402
from utils import train_tiny  # noqa: E402

SECRET = "s3cret-value-from-the-environment"
TEMPLATE = "${oc.env:FIXEDCLS_TEST_SECRET}"


@pytest.fixture(autouse=True)
def secret_in_env(monkeypatch):
    monkeypatch.setenv("FIXEDCLS_TEST_SECRET", SECRET)
    for key in list(os.environ):
        if key in LAUNCH_KEYS or key.startswith(LAUNCH_PREFIXES):
            monkeypatch.delenv(key)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    train_tiny(root, ["trainer.epochs=1", "collapse.every=0", "trainer.threads=1", f"checkpoint.dir={root / 'ckpt'}"])
    return root / "ckpt" / "last.pt"


def crafted(source: Path, target: Path, change) -> Path:
    """A copy of checkpoint `source` whose state `change(state)` edited, saved as `target`."""
    state = ckpt.load(source)
    change(state)
    ckpt.atomic_save(state, target)
    return target


def poison_config(state: dict) -> None:
    config = state["config"]
    config["name"] = TEMPLATE
    config["logger"]["tags"] = [TEMPLATE, f"a\\{TEMPLATE}"]
    config["logger"]["project"] = TEMPLATE
    config["logger"]["dir"] = "/tmp/somewhere-else"


# ------------------------------------------------------------------ stored configs are data

def test_a_stored_interpolation_stays_text(trained, tmp_path):
    path = crafted(trained, tmp_path / "poisoned.pt", poison_config)
    state = ckpt.load(path)
    cfg = stored_config(state, path)
    assert cfg.name == TEMPLATE and cfg.logger.project == TEMPLATE
    assert list(cfg.logger.tags) == [TEMPLATE, f"a\\{TEMPLATE}"]  # a backslash before it is kept as well
    everything = json.dumps(OmegaConf.to_container(cfg, resolve=True))
    assert SECRET not in everything and TEMPLATE in everything
    assert plain_config(cfg)["name"] == TEMPLATE  # stored again, it is the same text
    model, cfg, _, _ = model_from_checkpoint(path)
    assert cfg.name == TEMPLATE


def test_compat_logs_a_stored_config_as_text_and_writes_only_where_told(trained, tmp_path, monkeypatch):
    from fixedcls.commands import compat
    from fixedcls.tracking import base, factory

    path = crafted(trained, tmp_path / "poisoned.pt", poison_config)
    seen = {}

    def capture(cfg, *, run_dir, resolved_config, **kwargs):
        seen.update(cfg=OmegaConf.to_container(cfg, resolve=True), config=resolved_config, run_dir=run_dir)
        return base.Tracker()

    monkeypatch.setattr(factory, "create_tracker", capture)
    # compatibility needs two models: the poisoned checkpoint against itself
    assert compat.main([str(path), str(path), "--json", str(tmp_path / "out" / "generations.json"), "--logger", "wandb"]) == 0
    assert seen["cfg"]["tags"] == [TEMPLATE, f"a\\{TEMPLATE}"] and seen["cfg"]["project"] == TEMPLATE
    assert seen["cfg"]["dir"] is None and seen["run_dir"] == tmp_path / "out"  # not the checkpoint's logger.dir
    assert SECRET not in json.dumps(seen["cfg"]) + json.dumps(seen["config"], default=str)


def test_a_stored_download_never_starts(trained, tmp_path, capsys):
    from fixedcls.commands.collapse import main as collapse_main

    target = tmp_path / "elsewhere" / "cifar"

    def cifar_with_download(state):
        state["config"]["data"].update(name="cifar10", root=str(target), download=True)

    path = crafted(trained, tmp_path / "download.pt", cifar_with_download)
    assert stored_config(ckpt.load(path), path).data.download is False
    assert collapse_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert f"data.root={target} does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "elsewhere").exists()  # nothing was created, let alone downloaded


def test_a_stored_hub_backbone_is_built_offline(trained, tmp_path, monkeypatch):
    import timm
    from huggingface_hub import constants

    real_create = timm.create_model
    offline_during_build = []

    def spy(name, *args, **kwargs):
        offline_during_build.append(constants.is_offline_mode())
        return real_create(name, *args, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    path = crafted(trained, tmp_path / "hub.pt",
                   lambda state: state["config"]["model"].update(backbone="hf-hub:fixedcls-tests/never-cached"))
    with pytest.raises(FixedclsError, match="not in the local Hugging Face cache.*never downloads"):
        model_from_checkpoint(path)
    assert offline_during_build == [True] and constants.HF_HUB_OFFLINE is False  # restored afterwards


def _run(path: Path, overrides: list, config: dict, summary="finished", metrics=None) -> None:
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (path / "metrics.jsonl").write_text(metrics)
    (path / "summary.json").write_text(json.dumps({"final/test/acc": 0.5}) if summary == "finished" else summary)


def test_compare_reads_run_configs_as_data_and_quotes_formulas(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    base = {"seed": 0, "head": {"name": "simplex"}, "data": {"name": "digits"}}
    _run(sweep / "0", [], {**base, "optim": {"lr": TEMPLATE}, "model": {"backbone": "=HYPERLINK(\"http://x\")"}})
    _run(sweep / "1", ["optim.lr=-0.5", "model.backbone=@SUM(1+1)"], {**base, "optim": {"lr": -0.5}})
    _run(sweep / "2", ["optim.lr=0.1", "model.backbone=resnet18"], base)
    _run(sweep / "3", ["optim.lr=0.2"], base, summary="[]")  # JSON, but not an object
    _run(sweep / "4", ["optim.lr=0.3"], base, metrics='{"epoch": 1, "test/acc": 0.5}\n5\n')
    compare.main([str(sweep), "--out", str(tmp_path / "out"), "--no-plots"])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert f"{sweep / '3'}: summary.json holds a JSON list, not an object" in captured.out
    assert f"{sweep / '4'}: metrics.jsonl line 2 holds a JSON int, not an object" in captured.out

    text = (tmp_path / "out" / "comparison.csv").read_text() + (tmp_path / "out" / "comparison.md").read_text()
    assert SECRET not in text and TEMPLATE in text
    with open(tmp_path / "out" / "comparison.csv") as f:
        rows = {row["optim.lr"]: row for row in csv.DictReader(f)}
    assert set(rows) == {TEMPLATE, "-0.5", "0.1"}  # a number stays a number, however it starts
    assert rows[TEMPLATE]["model.backbone"] == "'=HYPERLINK(\"http://x\")"
    assert rows["-0.5"]["model.backbone"] == "'@SUM(1+1)"
    assert rows["0.1"]["model.backbone"] == "resnet18"
    assert all(not cell.startswith(("=", "+", "@")) for row in rows.values() for cell in row.values())



# ------------------------------------------------------------------ output escaped for where it goes (issue 28)

HOSTILE = ["=cmd|' -C calc'!A0", "+SUM(1+1)", "-2+3", "@SUM(A1)", "\tTAB", "\rCR", "a|b", "new\nline", "esc\x1b[2J"]


@pytest.mark.parametrize("value,cell", [
    ("=cmd|' -C calc'!A0", "'=cmd|' -C calc'!A0"), ("+SUM(1+1)", "'+SUM(1+1)"), ("-2+3", "'-2+3"), ("@x", "'@x"),
    ("\tx", "'\tx"), ("\rx", "'\rx"), ("-inf", "'-inf"), ("-0.5", "-0.5"), ("+1e-3", "+1e-3"), (-0.5, -0.5),
    ("cat", "cat"), ("a=b", "a=b"), ("", "")])
def test_one_csv_cell_rule(value, cell):
    from fixedcls.escaping import csv_cell

    assert csv_cell(value) == cell


def test_markdown_cells_and_terminal_text_escape_what_would_break_them():
    from fixedcls.escaping import markdown_cell, shell_path, terminal

    assert terminal("new\nline\x1b[2J\u202eé") == "new\\nline\\x1b[2J\\u202eé"
    assert terminal("plain é ü 猫") == "plain é ü 猫"
    assert markdown_cell("a|b\nc") == "a\\|b\\\\nc"  # renders as a|b\nc in one cell
    assert markdown_cell("a\\|b") == "a\\\\\\|b"  # the value's own backslash cannot escape the escape
    for value in HOSTILE:
        row = f"| {markdown_cell(value)} | x |"
        assert "\n" not in row and len(re.findall(r"(?<!\\)(?:\\\\)*\|", row)) == 3, row
    assert shell_path(Path.cwd() / "a b" / "best.pt") == "'a b/best.pt'"
    assert shell_path("/elsewhere/best.pt") == "/elsewhere/best.pt"


def test_the_comparison_table_keeps_one_cell_per_value(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for i, value in enumerate(["a|b", "new\nline", "c\\|d", "esc\x1b[2J"]):
        _run(sweep / str(i), [f"model.backbone={value}"], {"seed": 0, "model": {"backbone": value}})
    compare.main([str(sweep), "--out", str(tmp_path / "out"), "--no-plots"])
    table = [line for line in (tmp_path / "out" / "comparison.md").read_text().splitlines() if line.startswith("|")]
    assert len(table) == 2 + 4  # header, rule, one row per group: no value split a row
    cells = {len(re.findall(r"(?<!\\)(?:\\\\)*\|", line)) for line in table}
    assert len(cells) == 1, table  # every row has as many unescaped | as the header
    assert "\x1b" not in capsys.readouterr().out


def test_the_csv_logger_quotes_formulas(tmp_path):
    from fixedcls.tracking.local import CsvTracker

    tracker = CsvTracker(None, run_dir=tmp_path)
    tracker.log_epoch({"epoch": 1, "test/acc": -0.5, "=key": "=1+2"})
    tracker.log_summary({"title": "@SUM(1+1)", "data": "+x", "final/test/acc": -0.25})
    cells = [cell for name in ("metrics.csv", "summary.csv") for row in csv.reader((tmp_path / name).open())
             for cell in row]
    assert not [cell for cell in cells if cell.startswith(("=", "+", "@")) or cell.startswith("-") and cell != "-0.5"
                and cell != "-0.25"], cells
    assert "'=1+2" in cells and "'@SUM(1+1)" in cells and "'=key" in cells and "-0.5" in cells


def test_compare_reads_a_wandb_run_config_as_data(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")

    class FakeRun:
        def __init__(self, i, config):
            self.id, self.name, self.state, self.config = f"r{i}", f"run{i}", "finished", config
            self.summary = {"final/test/acc": 0.5}

        def scan_history(self):
            return [{"epoch": 1, "test/acc": 0.5}]

    class FakeApi:
        def __init__(self, timeout=None):
            pass

        def runs(self, path, filters=None):  # the first run does not override head: its config value is shown
            return [FakeRun(0, {"seed": 0, "head": {"name": TEMPLATE}, "hydra_overrides": ["seed=0"]}),
                    FakeRun(1, {"seed": 0, "head": {"name": "simplex"}, "hydra_overrides": ["head=simplex", "seed=0"]})]

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setattr(wandb, "Api", FakeApi)
    compare.main(["--wandb", "team/project", "--out", str(tmp_path), "--no-plots"])
    text = (tmp_path / "comparison.csv").read_text()
    assert SECRET not in text and TEMPLATE in text


def test_compare_refuses_an_output_folder_that_is_a_file(tmp_path, capsys):
    _run(tmp_path / "run", [], {"seed": 0})
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(SystemExit) as stop:
        compare.main([str(tmp_path / "run"), "--out", str(tmp_path / "taken")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "is a file, not a folder" in err and "Traceback" not in err
    assert (tmp_path / "taken").read_text() == "a file"


# ------------------------------------------------------------------ checkpoints that cannot continue a run

def _foreign(state):
    state.clear()
    state.update(model={"fc.weight": torch.zeros(2, 2)}, epochs=3)


RESUME_CASES = {
    "foreign": (_foreign, ["cannot be resumed", "no 'optimizer' entry", "model.init_from="]),
    "no optimizer": (lambda s: s.pop("optimizer"), ["no 'optimizer' entry"]),
    "meta of the wrong type": (lambda s: s.update(meta=["simplex"]), ["'meta' entry is list, not a dict"]),
    "epoch of the wrong type": (lambda s: s.update(epoch="1"), ["'epoch' entry is str, not a whole number"]),
    "negative step": (lambda s: s.update(step_in_epoch=-3), ["'step_in_epoch' entry is int, not a whole number >= 0"]),
    "another model": (lambda s: s.update(model={k + ".x": v for k, v in s["model"].items()}),
                      ["weights of another model", "missing tensors"]),
    "another optimizer": (lambda s: s["optimizer"]["param_groups"].pop(), ["optimizer state for parameter groups"]),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resuming_a_checkpoint_that_cannot_continue_a_run_is_one_line(trained, tmp_path, case):
    change, needles = RESUME_CASES[case]
    path = crafted(trained, tmp_path / "bad.pt", change)
    result = train_cli(tmp_path, [f"resume={path}", "data.train_per_class=12", "data.test_per_class=4"])
    assert_one_line_error(result, str(path), *needles)


def test_a_checkpoint_of_a_newer_version_is_one_line(trained, tmp_path):
    from test_resume import run_cli

    def newer(state):
        state["config"]["trainer"]["warp_drive"] = True

    path = crafted(trained, tmp_path / "newer.pt", newer)
    result = run_cli([str(path)], tmp_path, module="fixedcls.collapse", timeout=90)
    line = result.stderr.strip()
    assert result.returncode == 2 and "\n" not in line and "Traceback" not in line, result.stderr
    assert "'trainer.warp_drive'" in line and "newer fixedcls" in line and "upgrade fixedcls" in line
