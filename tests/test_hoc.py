"""Stationary representations and model replacement (Biondi et al., CVPR 2024; IAM-CL2R), with BCT (Shen et al.,
CVPR 2020): the HOC loss against a transcription of Eq. 4, the loss weighting of the loop, BCT, replaced
generations, the per-task AC and the iamcl2r presets.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from fixedcls.compatibility.criteria import compatibility_criteria
from fixedcls.compatibility.generations import generation_configs, replacement_configs, run_generations
from fixedcls.compatibility.report import format_criteria
from fixedcls.config import value_problem
from fixedcls.errors import FixedclsError
from fixedcls.models.classifier import create_model
from fixedcls.models.heads import BackwardCompatibleLoss, ExtraLosses, HocDistillation, create_head
from fixedcls.runs import checkpoints as ckpt
from fixedcls.training.factories import init_from_checkpoint
from fixedcls.training.loop import LoopState, train_one_epoch
from utils import compose_config

# 6 well-separated synthetic classes, as in test_compat.py: a tiny model trains in a few seconds.
DATA = ["data.num_classes=6", "data.train_per_class=24", "data.test_per_class=8", "data.noise=0.8",
        "trainer.epochs=2", "collapse.every=0"]
HOC = ["generations.protocol=finetune", "data.rehearsal=3", "trainer.distill_loss=hoc"]


def _train(root: Path, tag: str, overrides: list[str]):
    from fixedcls.training.assemble import train

    cfg = compose_config(DATA + overrides + [f"checkpoint.dir={root / tag}"], tmp_path=root)
    return root / tag / "last.pt", train(cfg, root / f"run-{tag}")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hoc")
    return {
        "a": _train(root, "a", ["seed=0", "data.classes=[0,1,2]"]),
        "b": _train(root, "b", ["seed=1"]),
        "effnet": _train(root, "effnet", ["seed=2", "model.backbone=test_efficientnet"])[0],
        "etf_seed1": _train(root, "etf", ["head=etf", "head.seed=1", "model.dim=5", "trainer.epochs=1"])[0],
    }


# --------------------------------------------------------------------------- the HOC loss


def _eq4(new: torch.Tensor, old: torch.Tensor, labels: list[int], mu: float) -> float:
    """Eq. 4 as SPEC 4 states it, one sample and one term at a time in float64."""
    new = [row / row.norm() for row in new.double()]
    old = [row / row.norm() for row in old.double()]
    total = 0.0
    for i in range(len(labels)):
        s = [mu * float(old[i] @ new[j]) for j in range(len(labels))]
        masked = [0.0 if labels[j] == labels[i] else s[j] for j in range(len(labels))]  # S': own class set to 0
        total += -s[i] + math.log(sum(math.exp(v) for v in masked))
    return total / len(labels)


def test_hoc_loss_equals_a_transcription_of_eq4_on_random_batches():
    from fixedcls.compatibility import hoc_loss

    g = torch.Generator().manual_seed(0)
    for batch, dim, classes, mu in ((2, 3, 2, 10.0), (16, 9, 4, 10.0), (33, 64, 10, 3.5), (40, 1023, 40, 10.0)):
        new, old = torch.randn(batch, dim, generator=g) * 3, torch.randn(batch, dim, generator=g)
        labels = torch.randint(0, classes, (batch,), generator=g)
        got = hoc_loss(new, old, labels, mu=mu)
        assert float(got) == pytest.approx(_eq4(new, old, labels.tolist(), mu), rel=1e-5, abs=1e-5)
    # the roles of the two models are not symmetric: S = mu F_old F_new^T, rows are old samples
    new, old, labels = torch.randn(16, 9, generator=g), torch.randn(16, 9, generator=g), torch.arange(16) % 4
    assert float(hoc_loss(old, new, labels)) != pytest.approx(float(hoc_loss(new, old, labels)), rel=1e-3)
    assert float(hoc_loss(old, new, labels)) == pytest.approx(_eq4(old, new, labels.tolist(), 10.0), rel=1e-5)
    # one class in the batch: every entry of S' is 0, so HOC = log(B) - S_ii
    same = torch.zeros(5, dtype=torch.long)
    x = torch.randn(5, 4, generator=g)
    assert float(hoc_loss(x, x, same, mu=2.0)) == pytest.approx(math.log(5) - 2.0, abs=1e-5)


def test_a_training_step_with_distill_loss_hoc_lowers_it(trained):
    from fixedcls.compatibility import hoc_loss

    old_path, new_path = trained["a"][0], trained["b"][0]
    cfg = compose_config(DATA + ["trainer.distill_loss=hoc", f"model.init_from={new_path}", f"trainer.old_model={old_path}"])
    model = create_model("test_resnet", "simplex", 6, in_chans=3, img_size=16).train()
    extra = init_from_checkpoint(cfg, model, torch.device("cpu"))
    assert isinstance(extra, HocDistillation) and extra.criterion_weight == pytest.approx(0.1) and extra.mu == 10.0
    teacher = extra.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    torch.manual_seed(0)
    x, y = torch.randn(24, 3, 16, 16), torch.arange(6).repeat(4)

    def hoc_now() -> float:
        with torch.no_grad():
            return float(hoc_loss(model.forward_features(x), teacher.forward_features(x), y))

    before = hoc_now()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    logits, features = model(x, return_features=True)
    loss = extra.criterion_weight * F.cross_entropy(logits, y) + extra(x, features, y)  # the loop's rule
    loss.backward()
    optimizer.step()
    assert hoc_now() < before - 1e-3
    assert all(p.grad is None for p in teacher.parameters())


def test_the_loop_weighs_its_criterion_by_the_extra_losses_criterion_weight(trained):
    run = trained["b"][1].run
    run.criterion = lambda logits, target: logits.sum() * 0.0 + 2.0

    class Extra:
        criterion_weight = 0.25

        def __call__(self, x, features, y):
            return features.sum() * 0.0 + 1.0

    run.extra_loss = Extra()
    loop = LoopState()
    train_one_epoch(run, loop, torch.amp.GradScaler("cpu", enabled=False), contextlib.nullcontext,
                    SimpleNamespace(received=None), lambda mid_epoch: {})
    assert float(loop.running[0] / loop.running[2]) == pytest.approx(0.25 * 2.0 + 1.0)


def test_hoc_needs_an_old_model_and_refuses_distill_weight_and_mixing(trained):
    model = create_model("test_resnet", "simplex", 6, in_chans=3, img_size=16)
    cpu = torch.device("cpu")
    with pytest.raises(FixedclsError, match="model.init_from") as error:
        init_from_checkpoint(compose_config(DATA + ["trainer.distill_loss=hoc"]), model, cpu)
    assert "\n" not in str(error.value) and "distill_loss=hoc" in str(error.value)
    # hoc_lambda=1 gives HOC no weight: nothing to learn from, no old model needed
    assert init_from_checkpoint(compose_config(DATA + ["trainer.distill_loss=hoc", "trainer.hoc_lambda=1"]), model, cpu) is None
    init = f"model.init_from={trained['b'][0]}"
    with pytest.raises(FixedclsError, match="hoc_lambda"):
        init_from_checkpoint(compose_config(DATA + ["trainer.distill_loss=hoc", "trainer.distill_weight=1", init]), model, cpu)
    with pytest.raises(FixedclsError, match="mixup"):
        init_from_checkpoint(compose_config(DATA + ["trainer.distill_loss=hoc", "data.mixup=0.2", init]), model, cpu)
    for key, value in (("trainer.hoc_lambda", 1.5), ("trainer.hoc_mu", 0), ("trainer.distill_loss", "kl"),
                       ("trainer.bct_weight", -1)):
        problem = value_problem(key, value)
        assert problem is not None and key in problem and "\n" not in problem


# --------------------------------------------------------------------------- BCT


def test_bct_is_cross_entropy_through_the_frozen_old_classifier_on_its_classes():
    torch.manual_seed(0)
    old_head = create_head("learned", 6, 8).requires_grad_(False)
    features = torch.randn(10, 8, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 1, 4, 2, 0])
    bct = BackwardCompatibleLoss(old_head, 2.0, [2, 0, 1])
    known = torch.tensor([True, True, True, False, False, False, True, False, True, True])
    expected = 2.0 * F.cross_entropy(old_head(features[known])[:, [0, 1, 2]], y[known])
    got = bct(None, features, y)
    assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    got.backward()
    assert features.grad[~known].abs().sum() == 0 and features.grad[known].abs().sum() > 0  # new classes untouched
    assert old_head.weight.grad is None
    nothing = bct(None, features, torch.tensor([3, 4, 5] * 3 + [3]))  # no sample of an old class
    assert float(nothing.detach()) == 0.0 and nothing.requires_grad


def test_bct_with_a_fixed_head_is_cross_entropy_against_the_same_prototypes():
    torch.manual_seed(1)
    model = create_model("test_resnet", "simplex", 6, in_chans=3, img_size=16).eval()
    old = create_model("test_resnet", "simplex", 6, in_chans=3, img_size=16).eval()  # other weights, same prototypes
    x, y = torch.randn(12, 3, 16, 16), torch.arange(6).repeat(2)
    logits, features = model(x, return_features=True)
    bct = BackwardCompatibleLoss(old.head, 1.0, [0, 1, 2, 3])
    known = y < 4
    own = F.cross_entropy(logits[known][:, :4], y[known])
    assert float(bct(x, features, y).detach()) == pytest.approx(float(own.detach()), rel=1e-6)


def test_bct_weight_learns_from_the_old_models_classes_and_combines_with_hoc(trained):
    model = create_model("test_resnet", "simplex", 6, in_chans=3, img_size=16)
    cpu = torch.device("cpu")
    old = f"model.init_from={trained['a'][0]}"  # trained on classes 0-2 only
    extra = init_from_checkpoint(compose_config(DATA + ["trainer.bct_weight=0.5", old]), model, cpu)
    assert isinstance(extra, BackwardCompatibleLoss) and extra.classes.tolist() == [0, 1, 2] and extra.weight == 0.5
    both = init_from_checkpoint(compose_config(DATA + ["trainer.bct_weight=1", "trainer.distill_loss=hoc",
                                                       "trainer.hoc_lambda=0.3", old]), model, cpu)
    assert isinstance(both, ExtraLosses) and both.criterion_weight == pytest.approx(0.3)
    x, y = torch.randn(6, 3, 16, 16), torch.arange(6)
    logits, features = model(x, return_features=True)
    assert float(both(x, features, y).detach()) == pytest.approx(float(sum(p(x, features, y) for p in both.parts).detach()))
    with pytest.raises(FixedclsError, match="bct_weight"):
        init_from_checkpoint(compose_config(DATA + ["trainer.bct_weight=1"]), model, cpu)


# --------------------------------------------------------------------------- per-task AC


def test_per_task_ac_is_the_ac_of_the_first_models():
    M = [[0.80], [0.85, 0.90], [0.70, 0.95, 0.92], [0.90, 0.90, 0.93, 0.95]]
    got = compatibility_criteria(M)
    # first 2 models: (2,1) passes; first 3: (3,1) fails, (3,2) passes; all 4: (4,1) (4,3) pass, (4,2) ties
    assert got["AC_per_task"] == pytest.approx([1.0, 2 / 3, 4 / 6])
    assert got["AC_ties_per_task"] == pytest.approx([1.0, 2 / 3, 5 / 6])
    assert got["AC_per_task"][-1] == got["AC"] and got["AC_ties_per_task"][-1] == got["AC_ties"]
    assert "per task (2..4): AC 1.000 0.667 0.667" in format_criteria(got)


# --------------------------------------------------------------------------- model replacement


def test_replace_is_refused_in_one_line_where_it_cannot_apply(trained):
    base = DATA + HOC + ["generations.tasks=[[0,1],[2,3],[4,5]]"]
    problem = value_problem("generations.replace", [1])
    assert problem is not None and "model.init_from" in problem and "\n" not in problem
    for bad, match in ((["generations.replace=[4]"], "names generation 4, but the protocol has 3"),
                       (["generations.replace=[2,2]"], "twice"),
                       (["generations.replace=[2]", "generations.replace_with=[a.pt,b.pt]"], "one per replaced"),
                       (["generations.replace_with=[a.pt]"], "names no generation"),
                       (["generations.replace=[1]"], "generation 1 has no earlier model"),
                       (["generations.replace=[2]", f"generations.replace_with=[{trained['etf_seed1']}]"],
                        "head etf, but this protocol trains head simplex"),
                       (["generations.replace=[2]", f"generations.replace_with=[{trained['etf_seed1']}]", "head=etf",
                         "model.dim=5"], "other prototypes .*etf.* seed=1")):
        with pytest.raises(FixedclsError, match=match) as error:
            generation_configs(compose_config(base + bad))
        assert "\n" not in str(error.value)
    with pytest.raises(FixedclsError, match="protocol=finetune"):
        generation_configs(compose_config(DATA + ["generations.tasks=[[0,1],[2,3]]", "generations.replace=[2]"]))
    with pytest.raises(FixedclsError, match="finetune"):  # HOC needs an old model: cumulative has none
        generation_configs(compose_config(DATA + ["generations.tasks=[[0,1],[2,3]]", "trainer.distill_loss=hoc"]))
    with pytest.raises(FixedclsError, match="only at a generation of generations.replace"):
        generation_configs(compose_config(base + ["generations.backbones=[test_resnet,test_efficientnet,test_resnet]"]))


def test_a_generation_replaced_from_scratch_trains_with_hoc_against_the_previous_one(tmp_path):
    cfg = compose_config(DATA + HOC + ["trainer.epochs=1", "generations.tasks=[[0,1],[2,3],[4,5]]",
                                       "generations.replace=[2]"], tmp_path=tmp_path)
    configs = generation_configs(cfg)
    assert configs[0].trainer.hoc_lambda == 1.0 and configs[1].trainer.hoc_lambda == pytest.approx(0.1)  # gen 1: no old model
    replacement = replacement_configs(cfg, configs)[2]
    assert list(replacement.data.classes) == [0, 1, 2, 3] and replacement.data.rehearsal == 0
    assert replacement.model.init_from is None and replacement.trainer.hoc_lambda == 1.0
    result = run_generations(cfg, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "generations.json").read_text())
    gen1, gen2, gen3 = record["generations"]
    assert record["replaced"] == [{"generation": 2, "from": "scratch", "checkpoint": gen2["init_from"],
                                   "backbone": "test_resnet", "classes": [0, 1, 2, 3], "old_model": gen1["checkpoint"]}]
    assert "gen2-replacement" in gen2["init_from"] and gen2["replaced_from"] == "scratch"
    assert gen2["old_model"] == gen1["checkpoint"] and gen3["init_from"] == gen3["old_model"] == gen2["checkpoint"]
    assert gen1["replaced_from"] is None and gen1["old_model"] is None
    stored = ckpt.load(gen2["checkpoint"])["config"]
    assert stored["trainer"]["old_model"] == gen1["checkpoint"] and stored["trainer"]["distill_loss"] == "hoc"
    assert ckpt.load(gen2["init_from"])["config"]["data"]["classes"] == [0, 1, 2, 3]
    assert (tmp_path / "run" / "gen2-replacement" / "summary.json").is_file()
    compat = json.loads((tmp_path / "run" / "compat.json").read_text())
    for key in ("AC", "AC_ties", "AM", "BC", "AC_per_task", "AC_ties_per_task"):
        assert key in compat
    assert len(compat["AC_per_task"]) == 2 and compat["replaced"] == [2] and len(result["M"]) == 3


def test_a_generation_replaced_by_a_checkpoint_of_another_backbone(trained, tmp_path):
    cfg = compose_config(DATA + HOC + ["trainer.epochs=1", "generations.tasks=[[0,1],[2,3],[4,5]]",
                                       "generations.replace=[2]", f"generations.replace_with=[{trained['effnet']}]",
                                       "generations.replace_old_model=replacement", "trainer.bct_weight=1"],
                         tmp_path=tmp_path)
    configs = generation_configs(cfg)
    assert [c.model.backbone for c in configs] == ["test_resnet", "test_efficientnet", "test_efficientnet"]
    assert configs[1].model.init_from == str(trained["effnet"]) and not replacement_configs(cfg, configs)
    run_generations(cfg, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "generations.json").read_text())
    assert record["replaced"][0]["from"] == str(trained["effnet"])
    gen2 = record["generations"][1]
    assert gen2["backbone"] == "test_efficientnet" and gen2["old_model"] == str(trained["effnet"])  # the authors' choice
    assert ckpt.load(gen2["checkpoint"])["config"]["trainer"]["old_model"] is None  # the old model is model.init_from


# --------------------------------------------------------------------------- presets


def test_iamcl2r_digits_preset_composes_with_its_variants():
    cfg = compose_config(["experiment=iamcl2r_digits"], tiny=False)
    assert (cfg.trainer.distill_loss, cfg.trainer.hoc_mu, cfg.trainer.hoc_lambda) == ("hoc", 10.0, 0.1)
    configs = generation_configs(cfg)
    assert len(configs) == 4 and list(cfg.generations.replace) == [3] and configs[2].data.rehearsal == 20
    assert list(replacement_configs(cfg, configs)[3].data.classes) == list(range(8))
    bct = generation_configs(compose_config(["experiment=iamcl2r_digits", "head=learned", "trainer.hoc_lambda=1",
                                             "trainer.bct_weight=1"], tiny=False))
    assert bct[0].trainer.bct_weight == 0.0 and bct[1].trainer.bct_weight == 1.0 and bct[1].head.name == "learned"


CIFAR_TASKS = [list(range(10))] + [list(range(10 + 15 * k, 25 + 15 * k)) for k in range(6)]


def test_iamcl2r_cifar100_preset_has_the_authors_hoc_7tasks_settings(tmp_path):
    cfg = compose_config(["experiment=iamcl2r_cifar100", f"data.root={tmp_path}"], tiny=False)
    assert [list(t) for t in cfg.generations.tasks] == CIFAR_TASKS
    assert cfg.model.backbone == "resnet18" and cfg.head.name == "simplex" and cfg.head.num_prototypes == 1024
    assert (cfg.data.rehearsal, cfg.data.batch_size, cfg.optim.lr, cfg.trainer.epochs) == (20, 128, 1e-3, 70)
    assert (cfg.trainer.distill_loss, cfg.trainer.hoc_mu, cfg.trainer.hoc_lambda) == ("hoc", 10.0, 0.1)
    assert list(cfg.generations.replace) == [3, 5] and cfg.generations.protocol == "finetune"
    configs = generation_configs(cfg)
    assert len(configs) == 7 and list(configs[6].data.old_classes) == list(range(85))
    assert sorted(replacement_configs(cfg, configs)) == [3, 5]


def test_iamcl2r_cifar100_smoke_run_on_stand_in_data(tmp_path):
    """The preset's protocol (7 generations, replacements at 3 and 5, 1,024 prototypes, ResNet-18, HOC, memory of
    20 per class) for one epoch of one batch per generation, on synthetic stand-ins for the CIFAR images."""
    cfg = compose_config(["experiment=iamcl2r_cifar100", "data=synthetic", "data.num_classes=100", "data.img_size=8",
                          "data.train_per_class=21", "data.test_per_class=1", "data.val_fraction=0",
                          "data.batch_size=4096", "data.num_workers=0", "trainer.epochs=1", "trainer.progress=false",
                          "generations.eval_data=[]"], tiny=False, tmp_path=tmp_path)
    result = run_generations(cfg, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "generations.json").read_text())
    assert [entry["generation"] for entry in record["replaced"]] == [3, 5]
    assert [len(row["classes"]) for row in record["generations"]] == [10] + [15] * 6
    assert len(result["M"]) == 7 and len(result["AC_per_task"]) == 6
    assert ckpt.load(record["generations"][-1]["checkpoint"])["model"]["head.prototypes"].shape == (1024, 1023)
