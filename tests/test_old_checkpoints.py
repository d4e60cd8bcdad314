"""A checkpoint written before the code moved into commands/ and domain packages (issue 27) still loads,
evaluates and resumes.

tests/fixtures/pre_rehouse/ holds last.pt and run.json of a run made at commit 31d4f7d (the last commit before
the move) with

    fixedcls-train model.backbone=test_efficientnet data=synthetic data.num_classes=4 data.img_size=16 \
        data.train_per_class=12 data.test_per_class=4 data.batch_size=16 trainer.epochs=1 trainer.progress=false \
        collapse.every=0 head=simplex optim.name=momentum optim.momentum=0 checkpoint.root=ck name=pre-rehouse \
        seed=3 trainer.threads=1

and expected.pt the logits that code gave for five seeded random inputs.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

import fixedcls

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_resume import run_cli  # noqa: E402

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "pre_rehouse"
RUN = ["model.backbone=test_efficientnet", "data=synthetic", "data.num_classes=4", "data.img_size=16",
       "data.train_per_class=12", "data.test_per_class=4", "data.batch_size=16", "trainer.progress=false",
       "collapse.every=0", "head=simplex", "optim.name=momentum", "optim.momentum=0", "name=pre-rehouse", "seed=3",
       "trainer.threads=1"]


def copy_of_the_run(tmp_path: Path) -> Path:
    """The fixture as the run folder it was (checkpoints/<name>-<identity[:8]>), in a scratch place."""
    folder = tmp_path / "ck" / "pre-rehouse-5b8c483b"
    folder.mkdir(parents=True)
    for name in ("last.pt", "run.json"):
        shutil.copy2(FIXTURE / name, folder / name)
    return folder


def test_an_old_checkpoint_gives_the_same_logits():
    loaded = fixedcls.load(FIXTURE / "last.pt")
    expected = torch.load(FIXTURE / "expected.pt", weights_only=True)
    assert loaded.class_names == expected["class_names"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(expected["input"]), expected["logits"], rtol=0, atol=1e-6)


def test_an_old_checkpoint_evaluates(tmp_path):
    result = run_cli([str(FIXTURE / "last.pt"), "--json", "eval.json"], tmp_path, module="fixedcls.commands.evaluate",
                     timeout=90)
    assert result.returncode == 0, result.stderr
    figures = json.loads((tmp_path / "eval.json").read_text())
    assert figures["samples"] == 16 and figures["epoch"] == 1


def test_an_old_run_resumes_where_it_stopped(tmp_path):
    folder = copy_of_the_run(tmp_path)
    before = (folder / "last.pt").read_bytes()
    result = run_cli(RUN + ["trainer.epochs=2", f"checkpoint.root={tmp_path / 'ck'}", "resume=auto",
                            "hydra.run.dir=run"], tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    state = torch.load(folder / "last.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 2, "the run went on in its own folder"
    assert (folder / "last.pt").read_bytes() != before
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
