"""Fine-tuning a pretrained timm backbone offline (issue 20).

The "pretrained" backbones are random timm test models written to tmp_path with timm's own `save_for_hf`
(a folder: config.json + model.safetensors), `safetensors` or `torch.save`, so nothing needs the network.
Their data config is deliberately not ImageNet's, so a test can tell whose preprocessing a run used.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.models import save_for_hf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_errors import IMAGES, assert_one_line_error, image_folder  # noqa: E402
from utils import TINY as TINY_ARGS, compose_config, train_tiny  # noqa: E402

pass
from fixedcls.training.factories import build_mixup, build_optimizer, build_scheduler, resolve_preprocessing  # noqa: E402
from fixedcls.data.datasets import create_data  # noqa: E402
from fixedcls.errors import FixedclsError  # noqa: E402
from fixedcls.models.classifier import create_model  # noqa: E402

MEAN, STD = [0.1, 0.2, 0.3], [0.7, 0.6, 0.5]  # not ImageNet's, not timm's test models' (0.5)
QUICK = ["trainer.epochs=1", "collapse.every=0"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> dict:
    """A random test_resnet with a 7-class classifier, written as a save_for_hf folder, a .safetensors and a .pth file."""
    import safetensors.torch

    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(123)
    source = timm.create_model("test_resnet", num_classes=7)
    source.pretrained_cfg = {**source.pretrained_cfg, "mean": tuple(MEAN), "std": tuple(STD), "interpolation": "bicubic",
                             "crop_pct": 0.8}
    save_for_hf(source, root / "resnet_folder", safe_serialization=True)
    state = source.state_dict()
    safetensors.torch.save_file(state, root / "resnet.safetensors")
    torch.save(state, root / "resnet.pth")
    torch.save(timm.create_model("test_vit").state_dict(), root / "vit.pth")
    return {"root": root, "state": state, "folder": root / "resnet_folder"}


def weight_source(pretrained: dict, how: str) -> tuple[str, dict]:
    """(model.backbone, create_model keywords) that load the pretrained test_resnet `how`."""
    if how == "local-dir":
        return f"local-dir:{pretrained['folder']}", {"pretrained": True}
    file = {"folder": pretrained["folder"], "safetensors": pretrained["root"] / "resnet.safetensors",
            "pth": pretrained["root"] / "resnet.pth"}[how]
    return "test_resnet", {"pretrained_file": str(file)}


# ------------------------------------------------------------------ weights


@pytest.mark.parametrize("how", ["folder", "safetensors", "pth", "local-dir"])
def test_the_backbone_gets_the_files_weights_and_the_head_stays_fixedclss(pretrained, how):
    backbone, kwargs = weight_source(pretrained, how)
    model = create_model(backbone, "simplex", 5, **kwargs)
    random = create_model("test_resnet", "simplex", 5)
    own = model.backbone.state_dict()
    assert own.keys() == {k for k in pretrained["state"] if not k.startswith("fc.")}  # the classifier is left out
    for key, value in own.items():
        assert torch.equal(value, pretrained["state"][key]), key
    assert not torch.equal(own["conv1.0.weight"], random.backbone.state_dict()["conv1.0.weight"])
    assert torch.equal(model.head.weight, random.head.weight)  # the same simplex, whatever the backbone's weights
    assert str(pretrained["root"]) in model.weights_source


def test_weights_of_another_architecture_are_refused_in_one_line(pretrained):
    with pytest.raises(FixedclsError) as raised:
        create_model("test_resnet", "simplex", 5, pretrained_file=str(pretrained["root"] / "vit.pth"))
    message = str(raised.value)
    assert "\n" not in message and "do not fit backbone test_resnet" in message and "conv1" in message


def test_a_folder_of_another_architecture_names_it(pretrained):
    with pytest.raises(FixedclsError, match="holds a test_resnet but model.backbone=test_vit: set model.backbone=test_resnet"):
        create_model("test_vit", "simplex", 5, pretrained_file=str(pretrained["folder"]))


@pytest.mark.parametrize("case", ["missing", "not weights", "empty folder"])
def test_a_bad_pretrained_file_is_one_line_naming_it(tmp_path, case):
    path = {"missing": tmp_path / "nope.safetensors", "not weights": tmp_path / "notes.txt",
            "empty folder": tmp_path / "empty"}[case]
    if case == "not weights":
        path.write_text("x")
    if case == "empty folder":
        path.mkdir()
    with pytest.raises(FixedclsError) as raised:
        create_model("test_resnet", "simplex", 5, pretrained_file=str(path))
    assert str(path) in str(raised.value) and "save_for_hf" in str(raised.value) and "\n" not in str(raised.value)


def test_missing_pretrained_weights_are_one_line_naming_pretrained_file(tmp_path, monkeypatch):
    """No network and nothing cached: the hub's traceback becomes one line."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FixedclsError) as raised:
        create_model("test_resnet", "simplex", 5, pretrained=True)
    message = str(raised.value)
    assert "\n" not in message
    assert "model.pretrained=true" in message and "test_resnet" in message and "model.pretrained_file=" in message


def test_cached_hub_weights_are_used_without_the_network(pretrained, tmp_path, monkeypatch):
    """model.pretrained=true takes the weights from the local Hugging Face cache first (here offline)."""
    from huggingface_hub import constants

    repo = timm.models.get_pretrained_cfg("test_resnet").hf_hub_id
    snapshot = tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes((pretrained["root"] / "resnet.safetensors").read_bytes())
    (tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = create_model("test_resnet", "simplex", 5, pretrained=True)
    assert torch.equal(model.backbone.state_dict()["conv1.0.weight"], pretrained["state"]["conv1.0.weight"])
    assert "Hugging Face cache" in model.weights_source


def test_the_command_without_weights_or_network_ends_in_one_line(tmp_path):
    """What a new user met first: `fixedcls-train model.pretrained=true` offline was a 20-line hub traceback."""
    from test_resume import run_cli

    cache = tmp_path / "hf"
    # huggingface_hub reads its environment on import, which a warm test server has done already: set both.
    prelude = f"import huggingface_hub.constants as c; c.HF_HUB_OFFLINE = True; c.HF_HUB_CACHE = {str(cache / 'hub')!r}"
    result = run_cli(TINY_ARGS + ["model.pretrained=true", "hydra.run.dir=run", "hydra/job_logging=disabled"], tmp_path,
                     timeout=90, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(cache)}, prelude=prelude)
    assert_one_line_error(result, "model.pretrained=true", "test_resnet", "model.pretrained_file=", code=2)


def test_a_local_dir_backbone_names_its_run_and_resumes(pretrained, tmp_path):
    """`local-dir:/a/b/folder` must not nest the checkpoint folder (resume=auto looks one level deep)."""
    backbone = f"model.backbone=local-dir:{pretrained['folder']}"
    first = train_tiny(tmp_path, [backbone, "model.pretrained=true", *QUICK], run_name="first")
    directory = Path(first["checkpoint_dir"])
    assert directory.parent == tmp_path / "checkpoints"
    assert directory.name.startswith("synthetic-resnet_folder-simplex-s0-")  # <name>-<identity[:8]>
    again = train_tiny(tmp_path, [backbone, "model.pretrained=true", "resume=auto", "trainer.epochs=2", "collapse.every=0"],
                       run_name="again")
    assert Path(again["checkpoint_dir"]) == directory
    assert [row["epoch"] for row in torch.load(directory / "last.pt", weights_only=True)["history"]] == [1, 2]


# ------------------------------------------------------------------ preprocessing


def test_preprocessing_follows_the_pretrained_data_config(pretrained, tmp_path):
    root = image_folder(tmp_path / "images", {"cat": 2, "dog": 2}, {"cat": 1, "dog": 1})
    cfg = compose_config(IMAGES + [f"data.root={root}", f"model.pretrained_file={pretrained['folder']}",
                                   "data.img_size=null"], tiny=False)
    chosen = resolve_preprocessing(cfg)
    assert chosen == {"img_size": 160, "mean": MEAN, "std": STD, "interpolation": "bicubic", "crop_pct": 0.8,
                      "from_model": ["img_size", "mean", "std", "interpolation", "crop_pct"]}
    bundle = create_data(cfg.data)
    text = str(bundle.test.dataset.transform)
    assert "Normalize(mean=tensor([0.1000, 0.2000, 0.3000])" in text and "bicubic" in text
    assert "CenterCrop(size=(160, 160))" in text and "Resize(size=200" in text  # 160 / 0.8


def test_the_data_config_overrides_the_model_and_no_weights_keep_the_defaults(pretrained):
    explicit = compose_config(["data=imagefolder", "data.root=/x", f"model.pretrained_file={pretrained['folder']}",
                               "model.backbone=test_resnet",
                               "data.mean=[0.4,0.4,0.4]", "data.interpolation=bilinear", "data.img_size=64"], tiny=False)
    chosen = resolve_preprocessing(explicit)
    assert chosen["mean"] == [0.4] * 3 and chosen["interpolation"] == "bilinear" and chosen["img_size"] == 64
    assert chosen["std"] == STD and chosen["from_model"] == ["std", "crop_pct"]
    plain = compose_config(["data=imagefolder", "data.root=/x", "model.backbone=test_resnet"], tiny=False)
    assert resolve_preprocessing(plain)["from_model"] == [] and plain.data.mean is None


def test_img_size_null_is_the_backbones_input_size_for_any_dataset():
    from fixedcls.config import validate_config

    cfg = compose_config(["data.img_size=null", "data.train_per_class=2", "data.test_per_class=1"])  # synthetic
    validate_config(cfg)  # the synthetic memory check waits for the size the model gives
    chosen = resolve_preprocessing(cfg)
    assert chosen["img_size"] == 160 and chosen["from_model"] == ["img_size"] and chosen["mean"] is None
    assert create_data(cfg.data).img_size == 160


def test_a_run_stores_its_preprocessing_and_weights_in_the_checkpoint(pretrained, tmp_path):
    root = image_folder(tmp_path / "images", {"cat": 3, "dog": 3}, {"cat": 1, "dog": 1})
    from fixedcls.training.assemble import train

    cfg = compose_config(IMAGES + [f"model.pretrained_file={pretrained['root'] / 'resnet.safetensors'}",
                                   f"data.root={root}", "data.img_size=32", *QUICK], tiny=False, tmp_path=tmp_path)
    summary = train(cfg, tmp_path / "run")
    meta = torch.load(Path(summary["checkpoint_dir"]) / "last.pt", weights_only=True)["meta"]
    assert meta["preprocessing"]["mean"] == [0.5, 0.5, 0.5]  # a bare file: the registry's test_resnet config
    assert meta["preprocessing"]["from_model"] == ["mean", "std", "interpolation", "crop_pct"]
    assert meta["weights"].endswith("resnet.safetensors")


# ------------------------------------------------------------------ recipe options


def test_drop_path_is_active_in_training_only():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    # A ViT: a ResNet's residual branches start at zero (timm's zero_init_last), so dropping them changes nothing yet.
    model = create_model("test_vit", "simplex", 5, drop_path_rate=0.5, img_size=32)
    plain = create_model("test_vit", "simplex", 5, img_size=32)
    model.train(), plain.train()
    assert not torch.equal(model(x), model(x))  # blocks dropped at random
    assert torch.equal(plain(x), plain(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_drop_path_on_a_model_without_it_is_one_line():
    with pytest.raises(FixedclsError, match="model.drop_path_rate=0.1: dla34 has no stochastic depth"):
        create_model("dla34", "simplex", 5, drop_path_rate=0.1)


@pytest.mark.parametrize("sched", ["none", "cosine"])
def test_layer_decay_scales_each_groups_learning_rate(sched):
    cfg = compose_config(["optim=adamw", "optim.lr=0.1", "optim.layer_decay=0.5", f"sched={sched}"
                          if sched == "cosine" else "sched.name=none"])
    model = create_model("test_resnet", "simplex", 5)
    optimizer = build_optimizer(cfg.optim, model)
    build_scheduler(cfg.sched, optimizer, 10)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    names = dict(model.named_parameters())
    # test_resnet: stem, layer1.0 ... layer4.0, then projection + head on top: 6 groups.
    expected = {"backbone.conv1.0.weight": 0.5 ** 5, "backbone.layer1.0.conv1.weight": 0.5 ** 4,
                "backbone.layer4.0.conv1.weight": 0.5, "proj.weight": 1.0}
    for name, scale in expected.items():
        assert lr_of[id(names[name])] == pytest.approx(0.1 * scale), name


def test_optim_kwargs_reach_the_optimizer_and_a_wrong_one_is_one_line():
    model = create_model("test_resnet", "simplex", 5)
    cfg = compose_config(["optim=adamw", "+optim.kwargs.betas=[0.8,0.9]", "+optim.kwargs.eps=0.001"])
    optimizer = build_optimizer(cfg.optim, model)
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.9) and optimizer.param_groups[0]["eps"] == 0.001
    with pytest.raises(FixedclsError, match="optim.kwargs .*do not fit optimizer adamw"):
        build_optimizer(compose_config(["optim=adamw", "+optim.kwargs.bogus=1"]).optim, model)
    with pytest.raises(FixedclsError, match="set optim.lr instead"):
        build_optimizer(compose_config(["+optim.kwargs.lr=1"]).optim, model)


def test_sgd_with_momentum_zero_is_plain_sgd_and_nesterov_without_momentum_is_one_line():
    model = create_model("test_resnet", "simplex", 5)
    optimizer = build_optimizer(compose_config(["optim.momentum=0"]).optim, model)  # timm's sgd is Nesterov SGD
    assert optimizer.param_groups[0]["momentum"] == 0 and optimizer.param_groups[0]["nesterov"] is False
    weight = model.proj.weight
    weight.grad = torch.ones_like(weight)
    before = weight.detach().clone()
    group = next(g for g in optimizer.param_groups if any(p is weight for p in g["params"]))
    lr, decay = group["lr"], group["weight_decay"]
    optimizer.step()
    assert torch.allclose(weight.detach(), before - lr * (1 + decay * before))  # w - lr (g + wd w): no momentum
    assert build_optimizer(compose_config([]).optim, model).param_groups[0]["nesterov"] is True
    with pytest.raises(FixedclsError, match="optimizer sgd refuses .*optim.momentum=0.0.*Nesterov"):
        build_optimizer(compose_config(["optim.momentum=0", "+optim.kwargs.nesterov=true"]).optim, model)


def test_mixup_makes_soft_targets_and_dot_regression_weights_them():
    from fixedcls.models.heads import DotRegressionLoss

    cfg = compose_config(["data.mixup=1.0", "trainer.label_smoothing=0"])
    mixup = build_mixup(cfg, 4)
    x, y = torch.randn(8, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    mixed, soft = mixup(x.clone(), y)  # timm mixes in place
    lam = float(soft[0, 0])
    assert soft.shape == (8, 4) and torch.allclose(soft.sum(1), torch.ones(8))
    assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    logits = torch.randn(8, 4).clamp(-1, 1)
    loss = DotRegressionLoss(lambda: 1.0)
    assert loss(logits, soft) == pytest.approx(float(lam * loss(logits, y) + (1 - lam) * loss(logits, y.flip(0))), rel=1e-5)
    assert build_mixup(compose_config([]), 4) is None


def test_mixup_trains_and_refuses_online_collapse_of_mixed_batches(tmp_path):
    summary = train_tiny(tmp_path, ["data.mixup=0.8", "data.cutmix=1.0", "trainer.label_smoothing=0.1", "trainer.epochs=1",
                                    "collapse.every=1"])
    assert summary.run.mixup is not None and 0 <= summary["final/train/acc"] <= 1
    assert summary["final/collapse/nc1"] >= 0  # exact collapse reads the unmixed train split
    with pytest.raises(FixedclsError, match="collapse.mode=online .* mix"):
        train_tiny(tmp_path, ["data.mixup=0.8", "collapse.mode=online"], run_name="online")


def test_frozen_backbone_epochs_train_the_projection_only(pretrained, tmp_path):
    summary = train_tiny(tmp_path, [f"model.pretrained_file={pretrained['folder']}", "trainer.freeze_backbone_epochs=1",
                                    "trainer.epochs=2", "collapse.every=0", "optim.weight_decay=0.1"])
    directory = Path(summary["checkpoint_dir"])
    after = {epoch: torch.load(directory / f"epoch_{epoch:04d}.pt", weights_only=True)["model"] for epoch in (1, 2)}
    backbone_keys = [k for k in after[1] if k.startswith("backbone.")]
    for key in backbone_keys:  # weights and BatchNorm statistics held still, weight decay included
        assert torch.equal(after[1][key].cpu(), pretrained["state"][key[len("backbone."):]]), key
    assert any(not torch.equal(after[2][k], after[1][k]) for k in backbone_keys)  # then the backbone trains
    assert not torch.equal(after[1]["proj.weight"], after[2]["proj.weight"])


def test_freezing_a_backbone_with_nothing_after_it_is_one_line(tmp_path):
    with pytest.raises(FixedclsError, match="would train nothing"):
        train_tiny(tmp_path, ["trainer.freeze_backbone_epochs=1", "model.dim=96", *QUICK])  # test_resnet's width


# ------------------------------------------------------------------ augmentation


def _timm_dataset(view):
    """timm's dataset under the subsets (validation carve-out) and ImageFiles fixedcls wraps around it."""
    while not hasattr(view, "transform"):
        view = view.dataset
    return view


def test_auto_augment_and_random_erasing_enter_the_training_transform(tmp_path):
    root = image_folder(tmp_path / "images", {"cat": 2, "dog": 2}, {"cat": 1, "dog": 1})
    for size in (32, 96):  # the CIFAR-sized path and timm's create_transform
        cfg = compose_config(IMAGES + [f"data.root={root}", f"data.img_size={size}", "data.auto_augment=rand-m9-mstd0.5-inc1",
                                       "data.re_prob=0.5"], tiny=False)
        bundle = create_data(cfg.data)
        train_text, eval_text = str(_timm_dataset(bundle.train).transform), str(_timm_dataset(bundle.test).transform)
        assert "RandAugment" in train_text and "RandomErasing" in train_text, size
        assert "RandAugment" not in eval_text and "RandomErasing" not in eval_text
        image, _ = bundle.train[0]
        assert image.shape == (3, size, size)


@pytest.mark.parametrize("overrides,needle", [
    (["data=imagefolder", "data.root=ROOT", "data.auto_augment=v9"], "is not a timm augmentation policy"),
    (["data.auto_augment=rand-m9"], "augments image files"),
    (["data=imagefolder", "data.root=ROOT", "data.re_prob=0.3", "data.augment=false"], "data.augment=false"),
])
def test_bad_augmentation_settings_are_one_line(tmp_path, overrides, needle):
    root = image_folder(tmp_path / "images", {"cat": 2, "dog": 2}, {"cat": 1, "dog": 1})
    cfg = compose_config([o.replace("ROOT", str(root)) for o in overrides], tiny=False)
    with pytest.raises(FixedclsError) as raised:
        create_data(cfg.data)
    assert needle in str(raised.value) and "\n" not in str(raised.value)


def test_the_finetune_preset_composes_and_validates():
    from fixedcls.config import validate_config

    cfg = compose_config(["experiment=finetune_imagefolder", "data.root=/data/flowers"], tiny=False)
    validate_config(cfg)
    assert (cfg.data.name, cfg.head.name, cfg.optim.name) == ("imagefolder", "simplex", "adamw")
    assert cfg.model.pretrained and cfg.data.img_size is None and cfg.trainer.freeze_backbone_epochs == 1
