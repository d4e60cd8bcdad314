"""Bad input through the real CLI: one clear line on stderr, a non-zero exit, never a traceback (issue 7).

Every case runs `fixedcls-train` as its own process (see tests/test_resume.py for how processes are
started quickly) and checks the exit status and the whole of stderr.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_resume import load_state, run_cli  # noqa: E402

# A tiny job (most cases fail before training; the ones that train take about a second).
TINY = [
    "model.backbone=test_resnet",
    "data=synthetic",
    "data.num_classes=4",
    "data.img_size=16",
    "data.train_per_class=8",
    "data.test_per_class=2",
    "data.batch_size=16",
    "trainer.epochs=1",
    "trainer.progress=false",
    "trainer.threads=1",
    "collapse.every=0",
]
IMAGES = ["data=imagefolder" if a == "data=synthetic" else a for a in TINY if not a.startswith("data.num_classes")]
IMAGES += ["data.num_workers=0", "data.batch_size=4"]


def assert_one_line_error(result, *needles: str, code: int = 2) -> str:
    """Exit status `code`, and stderr is exactly one line `fixedcls: error: ...` holding every needle."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith("fixedcls: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert result.returncode == code, (result.returncode, result.stderr)
    return lines[0]


def train_cli(tmp_path: Path, args: list[str], base: list[str] = TINY):
    return run_cli(base + args + ["hydra.run.dir=run", "hydra/job_logging=disabled"], tmp_path, timeout=90)


# ------------------------------------------------------------------ the configuration

@pytest.mark.parametrize("args,needles", [
    # K too large for the polytope's d: names the polytope, K, d and the smallest d that fits.
    (["data.num_classes=10", "model.dim=3"], ["simplex", "K=10", "d=3", "d >= 9", "model.dim=9"]),
    (["head=orthoplex", "data.num_classes=10", "model.dim=4"], ["orthoplex", "d >= 5"]),
    (["head=dcube", "data.num_classes=10", "model.dim=3"], ["dcube", "d >= 4"]),
    # Unknown names: each lists what exists.
    (["head=foo"], ["unknown head 'foo'", "simplex", "dcube", "learned"]),
    (["head.name=foo"], ["unknown head 'foo'", "simplex"]),
    (["model.backbone=no_such_net"], ["no_such_net", "timm"]),
    (["data=foo"], ["unknown data 'foo'", "synthetic", "imagefolder"]),
    (["data.name=foo"], ["data.name='foo'", "synthetic", "imagefolder"]),
    (["optim.name=foo"], ["optim.name='foo'", "sgd", "adamw"]),
    (["sched.name=foo"], ["sched.name='foo'", "cosine"]),
    (["trainer.loss=foo"], ["unknown loss 'foo'", "ce", "dot_regression"]),
    # Wrong values for typed keys (the schema's Enums and types), before anything is built.
    (["trainer.precision=fp8"], ["trainer.precision=fp8", "fp32", "bf16", "fp16"]),
    (["trainer.epochs=many"], ["trainer.epochs=many", "Integer"]),
    (["head.normalize=l3"], ["head.normalize=l3", "none", "l2"]),
    # Mistyped keys: a "did you mean" from the schema.
    (["trainer.epoch=3"], ["unknown config key 'trainer.epoch'", "did you mean trainer.epochs?"]),
    (["trainr.epochs=3"], ["unknown config key 'trainr.epochs'", "did you mean trainer.epochs?"]),
    (["model.backbon=test_vit"], ["did you mean model.backbone?"]),
    (["trainer.epochs.max=3"], ["unknown config key 'trainer.epochs.max'", "trainer.epochs is a value"]),
    # Impossible on this machine.
    (["trainer.precision=fp16", "trainer.device=cpu"], ["fp16", "CUDA", "bf16"]),
    (["trainer.device=cuda"], ["trainer.device=cuda", "no CUDA device"]),
    # A head with fewer outputs than the data has labels.
    (["head.num_prototypes=2"], ["num_prototypes=2", "num_classes=4"]),
    # Resume from a file that does not exist.
    (["resume=/nonexistent/last.pt"], ["resume=/nonexistent/last.pt", "no such checkpoint"]),
], ids=lambda value: " ".join(value) if isinstance(value, list) and value and "=" in value[0] else None)
def test_bad_configuration_is_one_clear_line(tmp_path, args, needles):
    assert_one_line_error(train_cli(tmp_path, args), *needles)


def test_override_check_leaves_additions_sweeps_and_hydra_keys_to_hydra():
    from fixedcls.commands.cli import check_overrides

    fine = ["-m", "--cfg", "job", "hydra.run.dir=x", "hydra/launcher=parallel", "hydra.job.chdir=true", "+trainer.note=1",
            "++seed=3", "~logger", "seed=1,2,3", "trainer.epochs=range(1,3)", "head=simplex,etf", "data=cifar10",
            "collapse.thresholds.nc1=0.2", "collapse.splits=[train]", "model.dim=null", "name=${data.name}-x",
            "optim.lr=1e30", "trainer.precision=bf16", "experiment=fixed_vs_learned", "not an override", "head.name=etf"]
    assert check_overrides(fine) is None
    assert "did you mean trainer.epochs" in check_overrides(fine + ["trainer.epoch=3"])


def test_hydra_additions_and_run_dir_still_work(tmp_path):
    result = train_cli(tmp_path, ["hydra.job.chdir=false", "+hydra.job.env_set.FIXEDCLS_PROBE=1"])
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


# ------------------------------------------------------------------ the run folder (issue 28)

@pytest.mark.parametrize("planted", [".hydra/config.yaml", ".hydra/overrides.yaml", "train.log", ".hydra"])
def test_a_link_planted_in_a_reused_run_folder_is_refused_and_nothing_is_written_through(tmp_path, planted):
    """Hydra writes .hydra/*.yaml and train.log with open() before the job starts: a link under one of those
    names in a fixed hydra.run.dir would send the write into the file it names."""
    victim = tmp_path / "victim"
    victim.mkdir()
    for name in ("config.yaml", "overrides.yaml", "file"):
        (victim / name).write_text("precious\n")
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    if planted == ".hydra":
        (tmp_path / "run" / ".hydra").rmdir()
    (tmp_path / "run" / planted).symlink_to(victim if planted == ".hydra" else victim / "file")
    result = run_cli(TINY + ["hydra.run.dir=run"], tmp_path, timeout=90)
    assert_one_line_error(result, "hydra.run.dir=run", f"symbolic link at run/{planted} (to {victim}",
                          "remove the link, or choose another hydra.run.dir")
    assert all(path.read_text() == "precious\n" for path in victim.iterdir())
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted({".hydra", planted.split("/")[0]})


def test_a_link_planted_in_a_reused_sweep_folder_is_refused(tmp_path):
    (tmp_path / "victim").write_text("precious\n")
    (tmp_path / "sweep" / "1" / ".hydra").mkdir(parents=True)
    (tmp_path / "sweep" / "1" / ".hydra" / "overrides.yaml").symlink_to(tmp_path / "victim")
    result = run_cli(["-m", *TINY, "seed=0,1", "hydra.sweep.dir=sweep"], tmp_path, timeout=90)
    assert_one_line_error(result, "hydra.sweep.dir=sweep", "symbolic link at sweep/1/.hydra/overrides.yaml")
    assert (tmp_path / "victim").read_text() == "precious\n" and not (tmp_path / "sweep" / "0").exists()


def test_links_of_other_tools_in_a_reused_sweep_folder_are_left_alone(tmp_path):
    """W&B keeps wandb/debug.log as a link to its newest run's log: not a file the run writes through."""
    wandb = tmp_path / "sweep" / "0" / "wandb"
    wandb.mkdir(parents=True)
    (wandb / "run-1").mkdir()
    (wandb / "run-1" / "debug.log").write_text("w&b\n")
    (wandb / "debug.log").symlink_to(wandb / "run-1" / "debug.log")
    result = run_cli(["-m", *TINY, "seed=0", "hydra.sweep.dir=sweep"], tmp_path, timeout=90)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "sweep" / "0" / "summary.json").is_file() and (wandb / "debug.log").read_text() == "w&b\n"


@pytest.mark.parametrize("folder", ["a_file/run", "/proc/fixedcls-run"])
def test_a_run_folder_that_cannot_be_created_is_one_line(tmp_path, folder):
    if folder.startswith("/proc") and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc, where no folder can be created")
    (tmp_path / "a_file").write_text("not a folder")
    result = run_cli(TINY + [f"hydra.run.dir={folder}"], tmp_path, timeout=90)
    assert_one_line_error(result, f"hydra.run.dir={folder} cannot be created", "choose a folder you can write")


@pytest.mark.parametrize("args,needles", [
    (["optim.lr=${oops}"], ["Interpolation key 'oops' not found", "optim.lr", "fix the override"]),
    (["seed=${oops}"], ["Interpolation key 'oops' not found", "seed"]),
])
def test_an_override_that_cannot_be_resolved_is_one_line(tmp_path, args, needles):
    assert_one_line_error(train_cli(tmp_path, args), *needles)


def test_a_run_folder_named_by_an_override_that_cannot_be_resolved_is_one_line(tmp_path):
    result = run_cli(TINY + ["seed=${oops}"], tmp_path, timeout=90)  # the default run folder names the seed
    assert_one_line_error(result, "hydra.run.dir cannot be resolved", "Interpolation key 'oops' not found")


def test_an_override_hydra_cannot_parse_exits_2(tmp_path):
    result = train_cli(tmp_path, ["data.root=["])
    assert result.returncode == 2 and "Traceback" not in result.stderr and "override_grammar" in result.stderr


# ------------------------------------------------------------------ data folders

def _png(path: Path, size: int = 20, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype("uint8")
    Image.fromarray(pixels).save(path)


def image_folder(root: Path, train: dict[str, int], validation: dict[str, int]) -> Path:
    """<root>/train/<class>/<i>.png and <root>/validation/<class>/<i>.png (various sizes, as in real folders)."""
    for split, classes in (("train", train), ("validation", validation)):
        for c, count in classes.items():
            for i in range(count):
                _png(root / split / c / f"{i}.png", size=16 + 4 * i, seed=i)
    return root


def test_a_good_image_folder_trains(tmp_path):
    """The control for the cases below: the same layout with readable images trains."""
    root = image_folder(tmp_path / "images", {"cat": 3, "dog": 3}, {"cat": 2, "dog": 2})
    result = train_cli(tmp_path, [f"data.root={root}"], base=IMAGES)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("case", ["unset", "missing", "empty", "file"])
def test_missing_or_empty_data_root(tmp_path, case):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    args = [] if case == "unset" else [f"data.root={tmp_path / case}"]
    needles = {"unset": ["data.root"], "missing": [str(tmp_path / "missing"), "does not exist"],
               "empty": [str(tmp_path / "empty"), "is empty"], "file": [str(tmp_path / "file"), "not a folder"]}[case]
    assert_one_line_error(train_cli(tmp_path, args, base=IMAGES), *needles)


def test_an_image_folder_with_one_class(tmp_path):
    root = image_folder(tmp_path / "images", {"cat": 2}, {"cat": 1})
    assert_one_line_error(train_cli(tmp_path, [f"data.root={root}"], base=IMAGES), str(root), "1 class", "at least 2")


@pytest.mark.parametrize("workers", [0, 1])
def test_an_unreadable_image_is_named(tmp_path, workers):
    """Not skipped (timm's dataset would quietly serve the next file instead): the run stops and names it."""
    root = image_folder(tmp_path / "images", {"cat": 3, "dog": 3}, {"cat": 1, "dog": 1})
    bad = root / "train" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    line = assert_one_line_error(train_cli(tmp_path, [f"data.root={root}", f"data.num_workers={workers}"], base=IMAGES),
                                 "cannot read image", str(bad))
    assert "DataLoader worker" not in line


def test_labels_outside_the_heads_range(tmp_path):
    """A class folder only the test split has would get a label the head has no output for."""
    root = image_folder(tmp_path / "images", {"cat": 2, "dog": 2}, {"cat": 1, "dog": 1, "fox": 1})
    assert_one_line_error(train_cli(tmp_path, [f"data.root={root}"], base=IMAGES), "'fox'", "validation", "train")


def test_test_split_uses_the_train_split_label_ids(tmp_path):
    """A test split missing a class keeps the train split's ids (fox stays 2, it does not become 1)."""
    from utils import compose_config
    from fixedcls.data.datasets import create_data

    root = image_folder(tmp_path / "images", {"cat": 1, "dog": 1, "fox": 1}, {"cat": 1, "fox": 1})
    cfg = compose_config(IMAGES + [f"data.root={root}"], tiny=False)
    bundle = create_data(cfg.data)
    assert bundle.class_names == ["cat", "dog", "fox"]
    assert sorted(bundle.test.targets) == [0, 2]


# ------------------------------------------------------------------ checkpoints that do not fit

@pytest.fixture(scope="module")
def simplex_checkpoint(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("simplex")
    result = train_cli(directory, ["model.dim=5", "checkpoint.dir=ck"])
    assert result.returncode == 0, result.stderr
    return directory / "ck" / "last.pt"


@pytest.mark.parametrize("args,needles", [
    (["head=dcube"], ["head=simplex", "head=dcube"]),
    (["model.dim=6"], ["dim=5", "dim=6"]),
    (["data.num_classes=5"], ["num_classes=4", "num_classes=5"]),
    (["model.backbone=test_vit", "data.img_size=32"], ["backbone=test_resnet", "backbone=test_vit"]),
])
def test_resuming_a_checkpoint_of_another_head_or_polytope(tmp_path, simplex_checkpoint, args, needles):
    line = assert_one_line_error(train_cli(tmp_path, ["model.dim=5", f"resume={simplex_checkpoint}"] + args),
                                 str(simplex_checkpoint), *needles)
    assert re.search(r"trained with \w+=", line)
    assert load_state(simplex_checkpoint)["epoch"] == 1  # untouched
