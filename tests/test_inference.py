"""Using a trained model after training (issue 15): fixedcls.load without the data, fixedcls-eval, fixedcls-predict,
fixedcls-export (timm, fixedcls, ONNX, TorchScript) and the stored retrieval gallery.

A tiny model is trained for two epochs on an image folder of real PNG files that the test writes, and the
folder is deleted before the model is used: nothing below may need it (except fixedcls-eval, which gets a
fresh copy through --data root=...).
"""
from __future__ import annotations

import csv
import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fixedcls
from fixedcls.runs import checkpoints as ckpt
from fixedcls.errors import FixedclsError
from utils import TINY, compose_config

CLASSES = {"cat": (200, 40, 40), "dog": (40, 200, 40), "fox": (40, 40, 200)}
IMAGES = ["data=imagefolder" if a == "data=synthetic" else a for a in TINY if not a.startswith("data.num_classes")]
IMAGES += ["data.num_workers=0", "data.batch_size=6", "data.eval_batch_size=4", "collapse.every=1"]


def write_image_folder(root: Path) -> Path:
    """<root>/{train,validation}/<class>/<i>.png: a colour per class plus seeded noise, sizes 16 to 26 pixels."""
    for split, count in (("train", 6), ("validation", 3)):
        for c, (name, colour) in enumerate(CLASSES.items()):
            for i in range(count):
                rng = np.random.default_rng(100 * c + i + (50 if split == "validation" else 0))
                size = 16 + 2 * (i % 6)
                pixels = np.clip(np.array(colour) + rng.normal(0, 40, (size, size, 3)), 0, 255).astype("uint8")
                path = root / split / name / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(path)
    return root


def _train(tmp: Path, tag: str, overrides: list[str], tiny: bool = True) -> dict:
    from fixedcls.training.assemble import train

    cfg = compose_config(overrides + [f"checkpoint.dir={tmp / tag}"], tiny=tiny, tmp_path=tmp)
    train(cfg, tmp / f"run-{tag}")
    return {"checkpoint": tmp / tag, "history": json.loads((tmp / f"run-{tag}" / "metrics.jsonl").read_text().splitlines()[-1])}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """The image-folder model (its data folder deleted, a few of its PNGs kept loose) and two synthetic ones."""
    tmp = tmp_path_factory.mktemp("inference")
    data = write_image_folder(tmp / "images")
    # every training image trains (no validation carve-out): six a class are few enough
    run = _train(tmp, "folder", IMAGES + [f"data.root={data}", "data.img_size=16", "head=simplex", "data.val_fraction=0"],
                 tiny=False)
    loose = tmp / "loose"
    shutil.copytree(data / "validation", loose)
    shutil.rmtree(data)
    synthetic = ["trainer.epochs=2", "collapse.every=0"]
    return {
        "folder": run["checkpoint"], "last_row": run["history"], "loose": loose, "tmp": tmp,
        "l2": _train(tmp, "l2", synthetic + ["head=simplex", "head.normalize=l2", "head.scale=10", "seed=0"])["checkpoint"],
        "plain": _train(tmp, "plain", synthetic + ["head=simplex", "seed=1", "trainer.ema=true"]),
    }


def loose_images(trained) -> list[Path]:
    return sorted(trained["loose"].rglob("*.png"))


# --------------------------------------------------------------------------- fixedcls.load


def test_load_needs_no_data_and_names_the_classes(trained):
    assert not (trained["tmp"] / "images").exists()
    loaded = fixedcls.load(trained["folder"])
    assert loaded.class_names == ["cat", "dog", "fox"]
    assert not loaded.model.training
    assert loaded.config["data"]["name"] == "imagefolder"
    assert loaded.preprocessing["input_size"] == [3, 16, 16] and loaded.preprocessing["image_mode"] == "RGB"
    image = Image.open(loose_images(trained)[0])
    x = loaded.transform(image)
    assert x.shape == (3, 16, 16)
    with torch.no_grad():
        assert loaded.model(x[None]).shape == (1, 3)
    # the trained model separates the colours: most held-out images go to their own folder's class
    right = [loaded.predict([Image.open(p)], topk=1)[0][0][0] == p.parent.name for p in loose_images(trained)]
    assert sum(right) >= len(right) - 2


def test_a_checkpoint_without_the_inference_entry_still_loads(trained, tmp_path):
    state = ckpt.load(ckpt.checkpoint_file(trained["plain"]["checkpoint"]))
    del state["inference"]
    ckpt.atomic_save(state, tmp_path / "old.pt")
    old, new = fixedcls.load(tmp_path / "old.pt"), fixedcls.load(trained["plain"]["checkpoint"])
    assert old.class_names == new.class_names == ["0", "1", "2", "3"]
    assert old.preprocessing == new.preprocessing
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(old.model(x), new.model(x))


@pytest.mark.parametrize("case", ["missing", "not_torch", "not_fixedcls"])
def test_load_refuses_what_is_not_a_checkpoint_in_one_line(tmp_path, case):
    path = tmp_path / "model.pt"
    if case == "not_torch":
        path.write_text("not a checkpoint")
    elif case == "not_fixedcls":
        torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(FixedclsError) as error:
        fixedcls.load(path)
    assert "\n" not in str(error.value)
    assert {"missing": "does not exist", "not_torch": "corrupt", "not_fixedcls": "not a fixedcls checkpoint"}[case] in str(error.value)


def test_ema_weights_load_and_evaluate_as_in_training(trained, tmp_path):
    from fixedcls.commands.evaluate import main

    plain = trained["plain"]["checkpoint"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert not torch.equal(fixedcls.load(plain, ema=True).model(x), fixedcls.load(plain).model(x))
    with pytest.raises(FixedclsError, match="no EMA weights"):
        fixedcls.load(trained["l2"], ema=True)
    out = tmp_path / "ema.json"
    assert main([str(plain), "--ema", "--no-collapse", "--json", str(out), "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert result["acc"] == pytest.approx(trained["plain"]["history"]["test/acc_ema"], abs=1e-12)
    assert result["loss"] == pytest.approx(trained["plain"]["history"]["test/loss_ema"], rel=1e-6)


# --------------------------------------------------------------------------- fixedcls-predict


def test_predict_agrees_with_the_model_and_writes_a_csv(trained, tmp_path, capsys):
    from fixedcls.commands.predict import main

    out = tmp_path / "pred.csv"
    assert main([str(trained["folder"]), str(trained["loose"]), "--topk", "2", "--out", str(out), "--device", "cpu"]) == 0
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["path", "class_1", "prob_1", "class_2", "prob_2"]
    files = loose_images(trained)
    assert [Path(r[0]) for r in rows[1:]] == files
    loaded = fixedcls.load(trained["folder"])
    for row, path in zip(rows[1:], files):
        with torch.no_grad():
            probabilities = loaded.model(loaded.transform(Image.open(path))[None]).softmax(1)[0]
        best = int(probabilities.argmax())
        assert row[1] == loaded.class_names[best]
        assert float(row[2]) == pytest.approx(float(probabilities[best]), abs=1e-6)
    assert len(capsys.readouterr().out.splitlines()) >= len(files)


def test_predict_names_the_checkpoint_it_used(trained, capsys):
    from fixedcls.commands.predict import main

    assert main([str(trained["folder"]), str(loose_images(trained)[0]), "--device", "cpu"]) == 0
    first = capsys.readouterr().out.splitlines()[0]  # given a run's folder: the file chosen in it, and its epoch
    assert first == f"{trained['folder'] / 'last.pt'} (epoch 2, 3 classes)"


def test_the_onnx_hint_names_the_readmes_install(trained, tmp_path, monkeypatch, capsys):
    from fixedcls.commands.export import main

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the export extra were not installed
    assert main([str(trained["folder"]), "--out", str(tmp_path / "onnx"), "--format", "onnx"]) == 2
    assert capsys.readouterr().err.strip().endswith('pip install -e ".[export]"')
    assert not (tmp_path / "onnx").exists()


def test_predict_skips_unreadable_files_in_one_line_each(trained, tmp_path, capsys):
    from fixedcls.commands.predict import main

    folder = tmp_path / "mixed"
    shutil.copytree(trained["loose"] / "cat", folder)
    (folder / "broken.png").write_text("this is not an image")
    out = tmp_path / "pred.csv"
    assert main([str(trained["folder"]), str(folder), "--out", str(out), "--device", "cpu"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert any("broken.png" in line for line in errors) and not any("Traceback" in line for line in errors)
    assert len(list(csv.reader(out.open()))) == 1 + 3  # header + the three readable images
    assert main([str(trained["folder"]), str(tmp_path / "nowhere")]) == 2


def test_predict_escapes_names_for_the_spreadsheet_and_the_terminal(trained, tmp_path, capsys, monkeypatch):
    """Class and file names are data: in the CSV a cell that a spreadsheet would run as a formula gets a leading
    ', and on the terminal a control character is shown escaped, never sent (issue 28)."""
    from fixedcls.commands.predict import main

    names = ["=cmd|' -C calc'!A0", "+SUM(1+1)", "new\nline\x1b[2J"]
    state = ckpt.load(trained["folder"] / "last.pt")
    state["inference"]["class_names"] = names
    ckpt.atomic_save(state, tmp_path / "hostile.pt")
    images = tmp_path / "images"
    images.mkdir()
    files = ["=HYPERLINK(x).png", "-1+2.png", "@a.png", "tab\tand\nnewline.png"]
    for name, source in zip(files, loose_images(trained)):
        shutil.copy(source, images / name)
    monkeypatch.chdir(images)  # relative paths, as a user types them: the path cell starts with the file's name
    out = tmp_path / "pred.csv"
    assert main(["--topk", "3", "--out", str(out), "--device", "cpu", str(tmp_path / "hostile.pt"), "--", *files]) == 0
    rows = list(csv.reader(out.open(newline="")))[1:]
    assert sorted(row[0] for row in rows) == sorted("'" + name if name[0] in "=-@" else name for name in files)
    assert {row[1] for row in rows} <= {"'" + names[0], "'" + names[1], names[2]}
    assert {cell for row in rows for cell in row[1::2]} == {"'" + names[0], "'" + names[1], names[2]}
    shown = capsys.readouterr().out
    assert "\x1b" not in shown and "\\x1b[2J" in shown and "new\\nline" in shown and "tab\\tand\\nnewline.png" in shown
    assert len(shown.splitlines()) == 1 + len(files) + 1  # the model's line, one line per image, the CSV's line


# --------------------------------------------------------------------------- fixedcls-export


def _inputs(trained) -> torch.Tensor:
    loaded = fixedcls.load(trained["folder"])
    return torch.stack([loaded.transform(Image.open(p)) for p in loose_images(trained)])


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_timm_export_is_a_plain_timm_model_with_the_same_logits(trained, tmp_path):
    import timm

    from fixedcls.commands.export import main

    out = tmp_path / "timm"
    assert main([str(trained["folder"]), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["label_names"] == ["cat", "dog", "fox"]
    plain = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = _inputs(trained)
    with torch.no_grad():
        assert _relative(plain(x), fixedcls.load(trained["folder"]).model(x)) < 1e-5
    # timm's own preprocessing of the export is the training's evaluation transform
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=plain))
    image = Image.open(loose_images(trained)[0]).convert("RGB")
    assert torch.allclose(transform(image), fixedcls.load(trained["folder"]).transform(image))
    with pytest.raises(FixedclsError, match="plain timm export"):  # fixedcls.load points to timm for it
        fixedcls.load(out)


def test_onnx_and_torchscript_exports_give_the_same_logits(trained, tmp_path):
    import onnxruntime

    from fixedcls.commands.export import main

    x = _inputs(trained)
    with torch.no_grad():
        expected = fixedcls.load(trained["folder"]).model(x)
    assert main([str(trained["folder"]), "--out", str(tmp_path / "onnx"), "--format", "onnx"]) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    assert _relative(got, expected) < 1e-4
    assert main([str(trained["folder"]), "--out", str(tmp_path / "ts"), "--format", "torchscript"]) == 0
    with warnings.catch_warnings(), torch.no_grad():
        # docs/using_a_model.md loads it so: torch's deprecation notice, and nothing else, is filtered
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", FutureWarning)
        assert _relative(torch.jit.load(str(tmp_path / "ts" / "model.pt"))(x), expected) < 1e-5
    assert json.loads((tmp_path / "ts" / "fixedcls.json").read_text())["class_names"] == ["cat", "dog", "fox"]


def test_fixedcls_export_loads_back_for_every_head_and_refuses_an_existing_folder(trained, tmp_path, capsys):
    from fixedcls.commands.export import main

    out = tmp_path / "export"
    assert main([str(trained["l2"]), "--out", str(out), "--format", "fixedcls"]) == 0
    again, original = fixedcls.load(out), fixedcls.load(trained["l2"])
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(again.model(x), original.model(x))
    assert again.class_names == original.class_names and again.preprocessing == original.preprocessing
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    capsys.readouterr()
    assert main([str(trained["plain"]["checkpoint"]), "--out", str(out), "--format", "fixedcls"]) == 2
    assert "--force" in capsys.readouterr().err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before
    assert main([str(trained["plain"]["checkpoint"]), "--out", str(out), "--format", "fixedcls", "--force"]) == 0
    assert fixedcls.load(out).identity["source"].startswith(str(trained["plain"]["checkpoint"]))


def test_a_head_that_cannot_fold_is_refused_and_nothing_is_left(trained, tmp_path, capsys):
    from fixedcls.commands.export import main

    assert main([str(trained["l2"]), "--out", str(tmp_path / "timm")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "normalize=l2" in error and "--format fixedcls" in error
    assert list(tmp_path.iterdir()) == []


def test_bad_checkpoints_are_one_line_and_exit_2(tmp_path, capsys):
    from fixedcls.commands.evaluate import main as evaluate
    from fixedcls.commands.export import main as export

    (tmp_path / "junk.pt").write_bytes(b"\x00" * 64)
    assert export([str(tmp_path / "junk.pt"), "--out", str(tmp_path / "out")]) == 2
    assert evaluate([str(tmp_path / "missing.pt")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 2 and "corrupt" in errors[0] and "does not exist" in errors[1]
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no file can be created")
def test_an_output_that_cannot_be_written_is_one_line_naming_the_users_path(trained, tmp_path, capsys):
    """Exit 2 (the user named the path), and the line names that path, never the temporary file written on its
    way (`/proc/.x.json.k3j2.tmp`), nor a traceback (issue 28)."""
    from fixedcls.commands.collapse import main as collapse
    from fixedcls.commands.embed import main as embed
    from fixedcls.commands.export import main as export

    model = str(trained["folder"])
    assert export([model, "--out", "/proc/fixedcls-export"]) == 2
    assert collapse([str(trained["plain"]["checkpoint"]), "--split", "test", "--json", "/proc/fixedcls.json"]) == 2
    assert embed([model, str(trained["loose"]), "--out", "/proc/fixedcls.safetensors"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 3, errors
    for line, path in zip(errors, ("/proc/fixedcls-export", "/proc/fixedcls.json", "/proc/fixedcls.safetensors")):
        assert line.endswith(f": {path}: check the path, or choose another") and ".tmp" not in line and ".partial" not in line


# --------------------------------------------------------------------------- fixedcls-eval


def test_eval_equals_the_training_runs_last_test_row(trained, tmp_path, capsys):
    from fixedcls.commands.evaluate import main

    data = write_image_folder(tmp_path / "images")  # the same files again, in another place
    out = tmp_path / "eval.json"
    assert main([str(trained["folder"]), "--data", f"root={data}", "--json", str(out), "--device", "cpu"]) == 0
    result, row = json.loads(out.read_text()), trained["last_row"]
    assert result["loss"] == pytest.approx(row["test/loss"], rel=1e-6)
    assert result["acc"] == pytest.approx(row["test/acc"], abs=1e-12)
    assert result["collapse"]["collapse_test/nc1"] == pytest.approx(row["collapse_test/nc1"], rel=1e-6)
    assert result["samples"] == 9 and "top5" not in result  # 3 classes: no top-5
    confusion = np.array(result["confusion"])
    assert confusion.sum() == 9 and np.trace(confusion) / 9 == pytest.approx(result["acc"])
    per_class = [v["acc"] for v in result["per_class"].values()]
    assert result["balanced_acc"] == pytest.approx(sum(per_class) / 3)
    assert 0 <= result["ece"] <= 1
    assert (tmp_path / "eval.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "top-1" in printed and "balanced" in printed and "cat" in printed


# --------------------------------------------------------------------------- the stored gallery


def test_a_stored_gallery_gives_the_matrix_entry_of_the_two_checkpoints(trained, tmp_path, capsys):
    from fixedcls.commands.compat import main as compat
    from fixedcls.commands.embed import main as embed
    from fixedcls.compatibility.gallery import load_gallery

    old, new = trained["l2"], trained["plain"]["checkpoint"]
    gallery = tmp_path / "gallery.safetensors"
    assert embed([str(old), "--split", "train", "--out", str(gallery), "--device", "cpu"]) == 0
    stored = load_gallery(gallery)
    assert stored.features.shape[0] == len(stored.paths) == len(stored.labels) == 4 * 11  # 12 per class less 10% validation
    assert torch.allclose(stored.features.norm(dim=1), torch.ones(len(stored.paths)))
    assert stored.identity["head"] == "simplex" and stored.class_names == ["0", "1", "2", "3"]
    assert compat([str(new), "--gallery", str(gallery), "--json", str(tmp_path / "g.json"), "--device", "cpu"]) == 0
    assert compat([str(old), str(new), "--json", str(tmp_path / "m.json"), "--device", "cpu"]) == 0
    searched, matrix = json.loads((tmp_path / "g.json").read_text()), json.loads((tmp_path / "m.json").read_text())
    assert searched["top1"][0] == pytest.approx(matrix["M"][1][0], abs=1e-12)
    assert searched["map"][0] == pytest.approx(matrix["M_map"][1][0], abs=1e-9)
    assert searched["models"][0]["same_prototypes"] is True
    capsys.readouterr()
    assert embed([str(old), "--out", str(gallery), "--device", "cpu"]) == 2  # exists: refused without --force
    assert compat([str(new), "--gallery", str(tmp_path / "none.safetensors")]) == 2
    assert len([line for line in capsys.readouterr().err.splitlines() if line.strip()]) == 2


def test_embedding_image_files_labels_them_by_folder(trained, tmp_path):
    from fixedcls.commands.embed import main as embed
    from fixedcls.compatibility.gallery import load_gallery

    out = tmp_path / "files.safetensors"
    assert embed([str(trained["folder"]), str(trained["loose"]), "--out", str(out), "--device", "cpu"]) == 0
    stored = load_gallery(out)
    names = ["cat", "dog", "fox"]
    assert [names[int(label)] for label in stored.labels] == [Path(p).parent.name for p in stored.paths]


@pytest.mark.parametrize("head, kwargs", [
    ("simplex", {"scale": 3.0, "bias": True}),       # projection 96 -> 3, fixed scale, bias
    ("dcube", {"learn_scale": True, "scale": 2.0}),  # a learned scale without normalisation folds too
    ("learned", {}),                                 # a learned linear head: weight @ projection
])
def test_linear_heads_fold_into_one_layer_with_the_same_logits(head, kwargs):
    from fixedcls.inference.formats import folded_classifier, timm_model
    from fixedcls.models.classifier import create_model

    torch.manual_seed(0)
    model = create_model("test_resnet", head, num_classes=4, dim=3 if head != "learned" else None, **kwargs).eval()
    if model.head.bias is not None:
        torch.nn.init.normal_(model.head.bias)
    x = torch.randn(2, 3, 16, 16)
    weight, bias = folded_classifier(model)
    with torch.no_grad():
        expected = model(x)
        assert _relative(model.backbone(x) @ weight.T + bias, expected) < 1e-5
        assert _relative(timm_model(model)(x), expected) < 1e-5


@pytest.mark.parametrize("head, kwargs, needle", [
    ("cosine", {}, "cosine head"),
    ("simplex", {"normalize": "l2", "learn_scale": True, "scale": 5.0}, "with a learned scale"),
])
def test_normalising_heads_do_not_fold(head, kwargs, needle):
    from fixedcls.inference.formats import folded_classifier
    from fixedcls.models.classifier import create_model

    model = create_model("test_resnet", head, num_classes=4, dim=3 if head != "cosine" else None, **kwargs)
    with pytest.raises(FixedclsError, match=needle) as error:
        folded_classifier(model)
    assert "--format fixedcls" in str(error.value)
