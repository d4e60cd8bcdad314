"""An image-folder split is exactly the folder it names, however the user typed data.root (issue 28, item 1).

timm's dataset factory joins a split to its root and falls back to the root itself when the joined path is
missing; with a relative root that join happened twice, so every image of the root was trained on and tested on.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_errors import IMAGES, _png, assert_one_line_error, image_folder, train_cli  # noqa: E402
from test_resume import run_cli  # noqa: E402
from utils import compose_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_process")

TRAIN, VALIDATION = {"cat": 3, "dog": 4}, {"cat": 1, "dog": 2}


def files_of(dataset) -> list[str]:
    """The image files a split reads, through the wrappers fixedcls puts around timm's dataset."""
    while not hasattr(dataset, "reader"):
        dataset = getattr(dataset, "dataset")
    return sorted(os.path.realpath(path) for path, _ in dataset.reader.samples)


def files_in(folder: Path) -> list[str]:
    return sorted(os.path.realpath(p) for p in folder.rglob("*.png"))


def bundle_for(root: str, extra: list[str] = ()):
    from fixedcls.data.datasets import create_data

    return create_data(compose_config(IMAGES + [f"data.root={root}", *extra], tiny=False).data)


@pytest.mark.parametrize("form", ["relative", "dot-relative", "absolute", "home", "symlink"])
def test_each_split_reads_exactly_its_folder(tmp_path, monkeypatch, form):
    data = image_folder(tmp_path / "data" / "imgs", TRAIN, VALIDATION)
    work = tmp_path / "work"
    work.mkdir()
    (work / "link").symlink_to(data)
    monkeypatch.chdir(work)  # a working directory that is neither the folder nor its parent
    monkeypatch.setenv("HOME", str(tmp_path / "data"))
    root = {"relative": "../data/imgs", "dot-relative": "./link", "absolute": str(data), "home": "'~/imgs'",
            "symlink": "link"}[form]
    bundle = bundle_for(root)
    assert files_of(bundle.train) == files_in(data / "train")
    assert files_of(bundle.test) == files_in(data / "validation")
    assert len(bundle.train) == sum(TRAIN.values()) and len(bundle.test) == sum(VALIDATION.values())


def test_a_validation_folder_beside_the_test_folder(tmp_path, monkeypatch):
    data = image_folder(tmp_path / "imgs", TRAIN, VALIDATION)
    for c in ("cat", "dog"):
        _png(data / "val" / c / "0.png", seed=7)
    monkeypatch.chdir(tmp_path)
    bundle = bundle_for("imgs", ["data.val_split=val"])
    assert files_of(bundle.val) == files_in(data / "val")
    assert files_of(bundle.test) == files_in(data / "validation")
    assert files_of(bundle.train) == files_in(data / "train")


def test_a_split_that_holds_another_splits_images_is_refused(tmp_path):
    """data.train_split=. would read the root, validation folder included: refused in one line."""
    data = image_folder(tmp_path / "imgs", TRAIN, VALIDATION)
    result = train_cli(tmp_path, ["data.root=imgs", "data.train_split=."], base=IMAGES)
    assert_one_line_error(result, "both", "'validation'", "give each split its own files")
    assert (data / "train").is_dir()


def test_training_with_a_relative_root_logs_the_right_splits(tmp_path):
    image_folder(tmp_path / "imgs", TRAIN, VALIDATION)
    result = run_cli(IMAGES + ["data.root=imgs", "hydra.run.dir=run"], tmp_path, timeout=90)
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"splits: train {sum(TRAIN.values())}" in log, log
    assert f"test {sum(VALIDATION.values())}" in log, log


def test_eval_with_a_relative_root_counts_the_test_folder(tmp_path):
    image_folder(tmp_path / "imgs", TRAIN, VALIDATION)
    trained = train_cli(tmp_path, ["data.root=imgs", "checkpoint.root=ck"], base=IMAGES)
    assert trained.returncode == 0, trained.stderr
    best = next((tmp_path / "ck").rglob("best.pt"))
    result = run_cli([str(best), "--data", "root=imgs", "--json", "eval.json"], tmp_path, module="fixedcls.commands.evaluate",
                     timeout=90)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "eval.json").read_text())["samples"] == sum(VALIDATION.values())
