"""Values are validated before anything runs (issue 21): every range is declared beside its field in
fixedcls/config.py, and a value outside it is one FixedclsError line naming the key, the value, the range
and a value that works.

Most cases compose the real config and call `validate_config` in-process; three run `fixedcls-train`
to check the exit status and the single stderr line.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
import typing
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_errors import IMAGES, assert_one_line_error, image_folder, train_cli  # noqa: E402
from utils import compose_config, train_tiny  # noqa: E402

from fixedcls.config import Config, checked_fields, validate_config  # noqa: E402
from fixedcls.errors import FixedclsError  # noqa: E402
from fixedcls.commands.cli import check_overrides  # noqa: E402
from fixedcls.training.assemble import train  # noqa: E402

QUICK = ["trainer.epochs=1", "collapse.every=0"]


def refusal(overrides: list[str]) -> str:
    with pytest.raises(FixedclsError) as raised:
        validate_config(compose_config(overrides))
    message = str(raised.value)
    assert "\n" not in message
    return message


# (overrides, what the one line must hold): the key=value as given, the valid range, and a value that works.
OUT_OF_RANGE = [
    # tracebacks before (ZeroDivisionError, DataLoader, torch.set_num_threads, CrossEntropyLoss, SGD, ...)
    (["data.batch_size=0"], ["data.batch_size=0", ">= 2"]),
    (["data.batch_size=1"], ["data.batch_size=1", ">= 2", "BatchNorm"]),
    (["data.eval_batch_size=0"], ["data.eval_batch_size=0", ">= 1"]),
    (["trainer.grad_accum=0"], ["trainer.grad_accum=0", ">= 1", "trainer.grad_accum=1"]),
    (["data.img_size=0"], ["data.img_size=0", ">= 1"]),
    (["data.in_chans=0"], ["data.in_chans=0", ">= 1"]),
    (["trainer.threads=-1"], ["trainer.threads=-1", ">= 1", "unset"]),
    (["trainer.label_smoothing=2"], ["trainer.label_smoothing=2", "[0, 1)"]),
    (["optim.lr=-1"], ["optim.lr=-1", ">= 0", "optim.lr=0.05"]),
    (["optim.lr=nan"], ["optim.lr=nan", "finite"]),
    (["data.num_workers=-1"], ["data.num_workers=-1", ">= 0"]),
    (["seed=-1"], ["seed=-1", "[0, 4294967295]"]),
    # accepted before, and nonsense
    (["head=learned", "model.dim=0"], ["model.dim=0", ">= 1"]),
    (["data.train_per_class=0"], ["data.train_per_class=0", ">= 1"]),
    (["trainer.ema_decay=2"], ["trainer.ema_decay=2", "[0, 1)"]),
    (["sched.warmup_epochs=-3"], ["sched.warmup_epochs=-3", ">= 0"]),
    (["collapse.every=-1"], ["collapse.every=-1", ">= 0"]),
    (["collapse.splits=[foo]"], ["collapse.splits=[foo]", "train, test", "not: foo"]),
    (["checkpoint.keep=-5"], ["checkpoint.keep=-5", ">= 1"]),
    (["trainer.grad_accum=-1"], ["trainer.grad_accum=-1", ">= 1"]),
    (["trainer.epochs=-1"], ["trainer.epochs=-1", ">= 1"]),  # was reported as "unknown scheduler"
    (["optim.momentum=1"], ["optim.momentum=1", "[0, 1)"]),
    (["sched.decay_rate=0"], ["sched.decay_rate=0", "> 0"]),
    (["data.test_fraction=1"], ["data.test_fraction=1", "[0, 1)"]),
    (["data.std=[0.5,0]"], ["data.std=[0.5,0]", "> 0"]),
    (["data.classes=[-1]"], ["data.classes=[-1]", ">= 0"]),
    (["head.num_prototypes=1"], ["head.num_prototypes=1", ">= 2"]),
    (["collapse.thresholds.nc1=inf"], ["collapse.thresholds.nc1=inf", "finite", "collapse.thresholds.nc1=0.1"]),
]


@pytest.mark.parametrize("overrides,needles", OUT_OF_RANGE, ids=lambda v: " ".join(v) if "=" in v[0] else None)
def test_a_value_out_of_range_is_one_line_naming_key_value_range_and_fix(overrides, needles):
    message = refusal(overrides)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert "must be" in message


@pytest.mark.parametrize("overrides,needles", [case for case in OUT_OF_RANGE if "thresholds" not in case[0][0]],
                         ids=lambda v: " ".join(v) if "=" in v[0] else None)
def test_the_command_line_check_refuses_the_same_values_before_hydra_starts(overrides, needles):
    assert check_overrides(overrides) == refusal(overrides)


def test_values_on_the_edge_of_each_range_are_accepted():
    validate_config(compose_config([
        "data.batch_size=2", "data.num_workers=0", "trainer.label_smoothing=0.99", "trainer.ema_decay=0",
        "sched.warmup_epochs=0", "collapse.every=0", "collapse.splits=[test]", "checkpoint.keep=1", "optim.lr=0",
        "trainer.grad_accum=1", "trainer.threads=1", "seed=4294967295", "head=learned", "model.dim=1",
        "data.std=[0.5]", "sched.decay_rate=1e32",
    ]))
    assert check_overrides(["optim.lr=1e30", "model.dim=null", "collapse.splits=[]"]) is None


def test_every_numeric_field_of_the_schema_declares_its_range():
    """A new int or float key must say what it accepts (layers takes any stage index, negative from the end)."""
    ranged = set(checked_fields(Config))
    free = {"collapse.layers"}

    def numeric(schema: type, prefix: str = "") -> set[str]:
        keys, hints = set(), typing.get_type_hints(schema)
        for each in dataclasses.fields(schema):
            hint, key = hints[each.name], prefix + each.name
            if dataclasses.is_dataclass(hint):
                keys |= numeric(hint, key + ".")
            elif re.search(r"\b(int|float)\b", str(hint)):  # also Optional[int], List[List[int]], Dict[str, float]
                keys.add(key)
        return keys

    assert numeric(Config) - free - ranged == set()


@pytest.mark.parametrize("backbone,needles", [
    ("resnet18:x", ["model.backbone='resnet18:x'", "hf-hub:", "local-dir:", "did you mean model.backbone=resnet18"]),
    ("local-dir:/nonexistent", ["/nonexistent", "does not exist"]),
    ("foo/bar", ["model.backbone='foo/bar'", "local-dir:"]),
])
def test_a_backbone_timm_cannot_parse_or_find_is_one_line(backbone, needles):
    message = refusal([f"model.backbone={backbone}"])
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_a_local_dir_backbone_without_config_json_is_named(tmp_path):
    assert f"{tmp_path} has no config.json" in refusal([f"model.backbone=local-dir:{tmp_path}"])


def test_synthetic_data_too_large_for_memory_is_refused_with_its_size():
    message = refusal(["data.num_classes=200000", "data.train_per_class=64", "data.test_per_class=16", "data.img_size=32"])
    assert "183.1 GiB" in message and "8 GiB cap" in message and "data.num_classes" in message
    validate_config(compose_config(["data.num_classes=1000"]))  # 12 MiB: fine


@pytest.mark.parametrize("overrides,needles", [
    (["data.in_chans=2"], ["data.in_chans=2", "L (data.in_chans=1)", "RGB (data.in_chans=3)"]),
    (["data.mean=[0.5,0.5]"], ["data.mean has 2 values", "3 channel"]),
])
def test_image_folder_settings_that_join_keys(overrides, needles):
    with pytest.raises(FixedclsError) as raised:
        validate_config(compose_config(IMAGES + ["data.root=/unused"] + overrides, tiny=False))
    for needle in needles:
        assert needle in str(raised.value)


def test_an_rgb_image_folder_trains_a_one_channel_model(tmp_path):
    """RGB files are converted to L for data.in_chans=1 (they used to reach the model with 3 channels)."""
    root = image_folder(tmp_path / "images", {"cat": 3, "dog": 3}, {"cat": 1, "dog": 1})
    cfg = compose_config(IMAGES + QUICK + [f"data.root={root}", "data.in_chans=1"], tiny=False, tmp_path=tmp_path)
    summary = train(cfg, tmp_path / "run")
    assert summary["epochs"] == 1


@pytest.mark.parametrize("fraction", ["0.001", "0.999"])
def test_an_extreme_digits_split_still_keeps_every_class_in_training_and_test(fraction):
    """carve() takes at least one sample per class for a non-zero share and leaves at least one for training."""
    from fixedcls.data.datasets import create_data, targets_of

    bundle = create_data(compose_config([f"data.test_fraction={fraction}"], tiny=False).data)
    assert set(targets_of(bundle.train)) == set(range(10)) == set(targets_of(bundle.test))


def test_digits_without_a_test_split_is_refused():
    with pytest.raises(FixedclsError, match="data=digits needs a test split"):
        from fixedcls.config import validate_config

        validate_config(compose_config(["data.test_fraction=0"], tiny=False))


# ------------------------------------------------------------------ the checkpoint folder


def _checkpoint_refusal(tmp_path: Path, directory: str) -> str:
    with pytest.raises(FixedclsError) as raised:
        train_tiny(tmp_path, QUICK + [f"checkpoint.dir={directory}"])
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before the first epoch
    return str(raised.value)


def test_a_checkpoint_dir_that_is_a_file_or_under_one_is_refused_before_training(tmp_path):
    (tmp_path / "taken").write_text("x")
    assert "is a file" in _checkpoint_refusal(tmp_path, str(tmp_path / "taken"))
    message = _checkpoint_refusal(tmp_path, str(tmp_path / "taken" / "ck"))
    assert f"is under {tmp_path / 'taken'}, which is a file" in message and "checkpoint.dir" in message


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_checkpoint_dir_is_refused_before_training(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert "is not writable" in _checkpoint_refusal(tmp_path, str(locked / "ck"))
    finally:
        locked.chmod(0o700)


def test_a_tilde_in_the_checkpoint_dir_is_the_home_folder(tmp_path, monkeypatch):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    train_tiny(tmp_path, QUICK + ["checkpoint.dir='~/ck'"])
    assert (home / "ck" / "last.pt").is_file()
    assert not (work / "~").exists()


# ------------------------------------------------------------------ through the real command


@pytest.mark.parametrize("args,needles", [
    (["trainer.grad_accum=0"], ["trainer.grad_accum=0", ">= 1"]),  # the check before Hydra starts
    (["data.num_classes=200000", "data.train_per_class=64", "data.img_size=32"], ["GiB", "8 GiB cap"]),  # in train()
    (["checkpoint.dir=taken"], ["is a file", "checkpoint.dir"]),  # when the checkpoint folder is chosen
])
def test_the_command_exits_2_with_one_line(tmp_path, args, needles):
    (tmp_path / "taken").write_text("x")
    assert_one_line_error(train_cli(tmp_path, args), *needles)
    assert not list(tmp_path.glob("run/metrics.jsonl"))
