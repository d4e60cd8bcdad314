"""An image-folder split is exactly the folder it names, however the user typed data.root (issue 28, item 1),
and every data set gets a validation split by default (issue 28, item 4).

timm's dataset factory joins a split to its root and falls back to the root itself when the joined path is
missing; with a relative root that join happened twice, so every image of the root was trained on and tested on.
An image folder with only train/ and validation/, and CIFAR, chose best.pt on the test split.
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
    """The image files a split reads, through the wrappers fixedcls puts around timm's dataset (a subset's
    indices included)."""
    chosen = range(len(dataset))
    while not hasattr(dataset, "reader"):
        if hasattr(dataset, "indices"):
            chosen = [dataset.indices[i] for i in chosen]
        dataset = getattr(dataset, "dataset")
    return sorted(os.path.realpath(dataset.reader.samples[i][0]) for i in chosen)


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
    bundle = bundle_for(root)  # train/ less the validation share carved out of it
    assert sorted(files_of(bundle.train) + files_of(bundle.val)) == files_in(data / "train")
    assert not set(files_of(bundle.train)) & set(files_of(bundle.val))
    assert files_of(bundle.test) == files_in(data / "validation")
    assert len(bundle.train) + len(bundle.val) == sum(TRAIN.values()) and len(bundle.test) == sum(VALIDATION.values())


def test_a_validation_folder_beside_the_test_folder(tmp_path, monkeypatch):
    data = image_folder(tmp_path / "imgs", TRAIN, VALIDATION)
    for c in ("cat", "dog"):
        _png(data / "val" / c / "0.png", seed=7)
    monkeypatch.chdir(tmp_path)
    bundle = bundle_for("imgs", ["data.val_split=val"])  # a named folder wins over the default carve-out
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
    assert f"splits: train 5 (folder {(tmp_path / 'imgs' / 'train').resolve()} less validation)" in log, log
    assert f"test {sum(VALIDATION.values())} (folder {(tmp_path / 'imgs' / 'validation').resolve()})" in log, log


def test_eval_with_a_relative_root_counts_the_test_folder(tmp_path):
    image_folder(tmp_path / "imgs", TRAIN, VALIDATION)
    trained = train_cli(tmp_path, ["data.root=imgs", "checkpoint.root=ck"], base=IMAGES)
    assert trained.returncode == 0, trained.stderr
    best = next((tmp_path / "ck").rglob("best.pt"))
    result = run_cli([str(best), "--data", "root=imgs", "--json", "eval.json"], tmp_path, module="fixedcls.commands.evaluate",
                     timeout=90)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "eval.json").read_text())["samples"] == sum(VALIDATION.values())


def tiny_cifar10(root: Path, monkeypatch, train_per_class: list[int], test_per_class: int) -> None:
    """A CIFAR-10 of a few images in torchvision's own files (pickled batches under cifar-10-batches-py/), read
    by torchvision's own CIFAR10 class through timm's factory, as data=cifar10 reads the real one; only the
    checksums torchvision compares the files against are this data's. Every image is one colour whose red value
    is its index in its split (train 0.., test 200..), so a sample names its source image after any crop or flip."""
    import hashlib
    import pickle

    import numpy as np
    from torchvision.datasets import CIFAR10

    folder = root / CIFAR10.base_folder
    folder.mkdir(parents=True)

    def batch(name: str, labels: list[int], first: int) -> tuple[str, str]:
        data = np.zeros((len(labels), 3, 32, 32), dtype=np.uint8)
        data[:, 0] = (first + np.arange(len(labels)))[:, None, None]
        data[:, 1] = np.array(labels)[:, None, None] * 20
        (folder / name).write_bytes(pickle.dumps({"data": data.reshape(len(labels), -1), "labels": labels}))
        return name, hashlib.md5((folder / name).read_bytes()).hexdigest()

    train = [c for c, n in enumerate(train_per_class) for _ in range(n)]
    test = [c for c in range(10) for _ in range(test_per_class)]
    monkeypatch.setattr(CIFAR10, "train_list", [batch("data_batch_1", train, 0)])
    monkeypatch.setattr(CIFAR10, "test_list", [batch("test_batch", test, 200)])
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{c}" for c in range(10)]}))
    monkeypatch.setattr(CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names",
                                          "md5": hashlib.md5((folder / "batches.meta").read_bytes()).hexdigest()})


def images_of(dataset, preprocessing: dict) -> list[int]:
    """The source image of every sample (its red value, read back through the normalisation), in order."""
    mean, std = preprocessing["mean"][0], preprocessing["std"][0]
    return [round((float(x[0, 16, 16]) * std + mean) * 255) for x, _ in (dataset[i] for i in range(len(dataset)))]


@pytest.mark.parametrize("split_seed", [0, 3])
def test_the_cifar_validation_carve_is_disjoint_complete_and_stratified(tmp_path, monkeypatch, split_seed):
    from collections import Counter

    from fixedcls.data.datasets import create_data, targets_of

    per_class = [6 + c for c in range(10)]  # 105 training images, unbalanced so that stratification shows
    tiny_cifar10(tmp_path / "cifar", monkeypatch, per_class, test_per_class=2)
    cfg = compose_config(["data=cifar10", f"data.root={tmp_path / 'cifar'}", "data.val_fraction=0.2",
                          f"data.split_seed={split_seed}", "data.num_workers=0"], tiny=False)
    bundle = create_data(cfg.data)
    train, train_eval, val, test = (images_of(d, bundle.preprocessing)
                                    for d in (bundle.train, bundle.train_eval, bundle.val, bundle.test))
    assert not set(train) & set(val), "validation images left in the training split"
    assert sorted(train) == sorted(train_eval)  # the augmented and the evaluation view hold the same images
    assert len(train) == len(set(train)) and len(val) == len(set(val))
    assert sorted(train + val) == list(range(sum(per_class)))  # together, every training image once
    assert sorted(test) == list(range(200, 220))  # the test split as it was
    label_of = [c for c, n in enumerate(per_class) for _ in range(n)]  # image index -> its class
    assert [label_of[image] for image in val] == targets_of(bundle.val)  # labels travel with their images
    assert [label_of[image] for image in train] == targets_of(bundle.train)
    val_counts = Counter(targets_of(bundle.val))
    for c, n in enumerate(per_class):  # stratified: each class gives its own 20% (rounded), at least one image
        assert val_counts[c] >= 1 and abs(val_counts[c] - 0.2 * n) <= 0.5, (c, n, val_counts[c])


# ------------------------------------------------------------------ a validation split for every data set

def test_an_image_folder_of_train_and_validation_trains_with_a_carved_validation_split(tmp_path):
    """`validation/` is the test split of the imagefolder preset; the validation split is carved out of train/."""
    image_folder(tmp_path / "imgs", {"cat": 10, "dog": 10}, VALIDATION)
    result = run_cli(IMAGES + ["data.root=imgs", "hydra.run.dir=run"], tmp_path, timeout=90)
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "run" / "train.log").read_text()
    assert "validation 2 (0.1 of 'train' (split_seed 0))" in log and "best.pt by val/acc" in log, log
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "best/val/acc" in summary and "best/test/acc" in summary and summary["best/metric"] == "val/acc"


class StandInCifar:
    """What torchvision's CIFAR10 offers timm's dataset factory (`data`, `targets`, `classes`, `transform`), with
    a few images of 32x32, so the CIFAR path is tested without the download."""

    def __init__(self, train: bool, per_class: int = 10, classes: int = 10):
        import numpy as np

        count = per_class * classes if train else 2 * classes
        self.targets = [i % classes for i in range(count)]
        self.data = np.random.default_rng(0 if train else 1).integers(0, 255, (count, 32, 32, 3), dtype=np.uint8)
        self.classes = [f"class{c}" for c in range(classes)]
        self.transform = None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        from PIL import Image

        image = Image.fromarray(self.data[index])
        return (self.transform(image) if self.transform else image), self.targets[index]


@pytest.fixture
def stand_in_cifar(tmp_path, monkeypatch):
    """data=cifar10 reads StandInCifar (timm's create_dataset is what fixedcls asks for CIFAR)."""
    import timm.data

    made = []

    def create_dataset(name, root, split="train", **kwargs):
        assert name == "torch/cifar10" and Path(root).is_dir()
        made.append(StandInCifar(train=split == "train"))
        return made[-1]

    monkeypatch.setattr(timm.data, "create_dataset", create_dataset)
    root = tmp_path / "cifar"
    (root / "cifar-10-batches-py").mkdir(parents=True)
    return root


def test_cifar_carves_a_validation_split_by_default(stand_in_cifar):
    from fixedcls.data.datasets import create_data, describe_splits, targets_of

    cfg = compose_config(["data=cifar10", f"data.root={stand_in_cifar}", "data.num_workers=0"], tiny=False)
    assert cfg.data.val_fraction == 0.1
    bundle = create_data(cfg.data)
    assert len(bundle.val) == 10 and len(bundle.train) == 90 and len(bundle.test) == 20
    assert sorted(targets_of(bundle.val)) == list(range(10))  # stratified: one of each class
    assert not set(bundle.train.indices) & set(bundle.val.indices)
    assert bundle.train_eval.indices == bundle.train.indices
    assert describe_splits(bundle) == ("train 90 (the 'train' split less validation), validation 10 (0.1 of the "
                                       "'train' split (split_seed 0)), test 20 (the 'test' split)")
    assert create_data(compose_config(["data=cifar10", f"data.root={stand_in_cifar}", "data.val_fraction=0"],
                                      tiny=False).data).val is None


def test_no_validation_split_says_best_pt_follows_the_test_split(tmp_path, caplog):
    from utils import train_tiny

    with caplog.at_level("INFO", logger="fixedcls"):
        summary = train_tiny(tmp_path, ["trainer.epochs=1", "collapse.every=0", "data.val_fraction=0"])
    assert "no validation split, test 16 (4 drawn per class); best.pt by test/acc (max); with no validation " \
           "split (data.val_fraction=0) best.pt follows the test split" in caplog.text
    assert "best/val/acc" not in summary and summary["best/metric"] == "test/acc"
