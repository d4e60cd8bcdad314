"""Compatibility (SPEC 4, CoReS / CL2R): criteria, class-incremental data, init_from / distillation, the CLI.

The central check: two models trained apart (different seeds AND different backbones) against the same
fixed simplex retrieve across each other about as well as each alone, while two learned-head models
(same backbone, different seeds) do not.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from fixedcls.runs import checkpoints as ckpt
from fixedcls import polytopes
from fixedcls.training.factories import init_from_checkpoint as prepare_init
from fixedcls.compatibility.generations import generation_configs, run_generations
from fixedcls.commands.compat import main
from fixedcls.compatibility.matrix import compatibility
from fixedcls.compatibility.criteria import compatibility_criteria, retrieval_scores, split_classes, verification_accuracy, verification_pairs
from fixedcls.models.heads import FeatureDistillation
from fixedcls.data.datasets import create_data, targets_of
from fixedcls.data.loaders import SeededAugmentation
from fixedcls.errors import FixedclsError
from fixedcls.models.classifier import create_model
from utils import compose_config

# 6 well-separated synthetic classes, small enough to train a tiny model in a few seconds.
DATA = ["data.num_classes=6", "data.train_per_class=24", "data.test_per_class=8", "data.noise=0.8",
        "trainer.epochs=4", "collapse.every=0"]


def _train(root: Path, tag: str, overrides: list[str]) -> Path:
    from fixedcls.training.assemble import train

    cfg = compose_config(DATA + overrides + [f"checkpoint.dir={root / tag}"], tmp_path=root)
    train(cfg, root / f"run-{tag}")
    return root / tag / "last.pt"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compat")
    return {
        "fixed_a": _train(root, "fixed_a", ["head=simplex", "seed=0"]),
        "fixed_b": _train(root, "fixed_b", ["head=simplex", "seed=1", "model.backbone=test_efficientnet"]),
        "learned_a": _train(root, "learned_a", ["head=learned", "seed=0"]),
        "learned_b": _train(root, "learned_b", ["head=learned", "seed=1"]),
    }


# --------------------------------------------------------------------------- criteria and retrieval


def test_criteria_match_the_spec_formulas_on_a_hand_made_matrix():
    M = [[0.80], [0.85, 0.90], [0.70, 0.95, 0.92]]
    got = compatibility_criteria(M)
    # pairs (t > i): (2,1) 0.85 > 0.80 yes; (3,1) 0.70 > 0.80 no; (3,2) 0.95 > 0.90 yes
    assert got["AC"] == pytest.approx(2 / 3)
    assert got["AM"] == pytest.approx((0.80 + 0.85 + 0.90 + 0.70 + 0.95 + 0.92) / 6)
    assert got["BC"] == pytest.approx(((0.70 - 0.80) + (0.95 - 0.90)) / 2)  # row T against the diagonal
    assert got["FC"] == pytest.approx(((0.85 - 0.90) + (0.95 - 0.92)) / 2)  # M[i][i-1] - M[i][i]
    # the same matrix with the upper triangle filled in (ignored) and as produced by compatibility()
    assert compatibility_criteria([[0.80, None, None], [0.85, 0.90, None], [0.70, 0.95, 0.92]]) == got


def test_criteria_of_one_model_and_of_missing_entries():
    with pytest.raises(FixedclsError, match="needs two models"):
        compatibility_criteria([[0.5]])
    missing = compatibility_criteria([[0.8], [None, 0.9]])  # features that cannot be compared
    assert missing["AC"] == 0.0 and math.isnan(missing["AM"]) and math.isnan(missing["BC"])
    assert missing["AC_ties"] == 1.0  # the authors' code fails a pair only on M[t][i] < M[i][i], never on NaN


def test_strict_ac_and_the_authors_ac_ties_part_on_ties():
    # diagonal 1, 1, 0.9, 1; pairs: three ties at 1.0, (4,1) worse, (4,3) better, (4,2) a tie
    M = [[1.0], [1.0, 1.0], [1.0, 1.0, 0.9], [0.8, 1.0, 0.95, 1.0]]
    got = compatibility_criteria(M)
    assert got["AC"] == pytest.approx(1 / 6)  # only (4,3) beats its self-test
    assert got["AC_ties"] == pytest.approx(5 / 6)  # only (4,1) falls below it
    # the README's digits row (simplex, cumulative, classes 0-3): perfect retrieval everywhere
    perfect = compatibility_criteria([[1.0], [1.0, 1.0], [1.0, 1.0, 1.0]])
    assert perfect["AC"] == 0.0 and perfect["AC_ties"] == 1.0 and perfect["AM"] == 1.0
    # no ties: the two rules agree
    strict = compatibility_criteria([[0.80], [0.85, 0.90], [0.70, 0.95, 0.92]])
    assert strict["AC"] == strict["AC_ties"] == pytest.approx(2 / 3)


def test_retrieval_top1_and_map_by_hand():
    gallery = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    gallery_labels = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    query_labels = torch.tensor([0, 1])
    top1, mean_ap = retrieval_scores(query, query_labels, gallery, gallery_labels)
    # query 0 ranks gallery 0(+), 1(-), 3(+), 2(-): AP = (1/1 + 2/3) / 2
    # query 1 ranks gallery 2(+), 3(-), 1(+), 0(-): AP = (1/1 + 2/3) / 2
    assert top1 == 1.0
    assert mean_ap == pytest.approx((1 + 2 / 3) / 2)
    assert math.isnan(retrieval_scores(query, query_labels, torch.ones(4, 3), gallery_labels)[0])  # widths differ


def test_retrieval_within_one_split_leaves_each_query_out_of_its_gallery():
    features, labels = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), torch.tensor([0, 1, 1])
    assert retrieval_scores(features, labels, features, labels)[0] == 1.0  # each query finds itself
    top1, mean_ap = retrieval_scores(features, labels, features, labels, same_set=True)
    # query 0 has no other sample of its class (a miss, no AP); query 1 ranks 0(-), 2(+); query 2 ranks 1(+), 0(-)
    assert top1 == pytest.approx(1 / 3) and mean_ap == pytest.approx((1 / 2 + 1) / 2)


def _class_features(labels: torch.Tensor, dim: int = 8) -> torch.Tensor:
    return torch.eye(dim)[labels]  # one direction per class: same-class distance 0, other classes 2


def test_verification_of_identical_features_is_perfect_and_of_random_features_is_chance():
    g = torch.Generator().manual_seed(0)
    query_labels, gallery_labels = torch.randint(0, 5, (300,), generator=g), torch.randint(0, 5, (400,), generator=g)
    q_index, g_index, same = verification_pairs(query_labels, gallery_labels, num_pairs=6000, seed=0)
    assert len(same) == 6000 and int(same.sum()) == 3000
    assert torch.equal(same, query_labels[q_index] == gallery_labels[g_index])
    queries, gallery = _class_features(query_labels), _class_features(gallery_labels)
    assert verification_accuracy(queries[q_index], gallery[g_index], same) == 1.0
    noise_q, noise_g = torch.randn(300, 8, generator=g), torch.randn(400, 8, generator=g)
    assert verification_accuracy(noise_q[q_index], noise_g[g_index], same) == pytest.approx(0.5, abs=0.04)
    assert math.isnan(verification_accuracy(queries[q_index], torch.ones(6000, 3), same))  # widths differ
    with pytest.raises(FixedclsError, match="folds"):
        verification_accuracy(queries[q_index], gallery[g_index], same, folds=1)


def test_verification_pairs_are_seeded_balanced_and_never_one_sample_twice():
    labels = torch.arange(4).repeat(3)
    first = verification_pairs(labels, labels, num_pairs=500, seed=3, same_set=True)
    again = verification_pairs(labels, labels, num_pairs=500, seed=3, same_set=True)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    q_index, g_index, same = first
    assert not bool((q_index == g_index).any()) and int(same.sum()) == 250
    assert 0 < int(same[:250].sum()) < 250  # shuffled: both kinds in every fold
    with pytest.raises(FixedclsError, match="one class"):
        verification_pairs(torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long))
    with pytest.raises(FixedclsError, match="share a class"):
        verification_pairs(torch.tensor([0, 0]), torch.tensor([1, 1]))


def test_num_tasks_splits_the_classes_as_cores_does():
    hundred = split_classes(100, 10)
    assert hundred == [list(range(10 * t, 10 * t + 10)) for t in range(10)]
    assert split_classes(10, 5) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert split_classes(10, 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]  # the last task takes the remainder
    shuffled = split_classes(100, 10, seed=1)
    assert shuffled == split_classes(100, 10, seed=1) != hundred
    assert sorted(c for task in shuffled for c in task) == list(range(100)) and {len(t) for t in shuffled} == {10}
    with pytest.raises(FixedclsError, match="num_tasks"):
        split_classes(10, 11)


def test_num_tasks_plans_generations_and_one_task_is_refused():
    cfg = compose_config(DATA + ["generations.num_tasks=3", "generations.class_order_seed=0"])
    configs = generation_configs(cfg)  # K = 6 synthetic classes, shuffled, two per task, cumulative
    assert [len(c.data.classes) for c in configs] == [2, 4, 6]
    assert [list(c.data.classes) for c in configs][0] == sorted(split_classes(6, 3, seed=0)[0])
    with pytest.raises(FixedclsError, match="needs two models"):
        generation_configs(compose_config(DATA + ["generations.num_tasks=1"]))
    with pytest.raises(FixedclsError, match="both set"):
        generation_configs(compose_config(DATA + ["generations.num_tasks=2", "generations.tasks=[[0],[1]]"]))
    for bad, match in (("generations.metric=rank", "metric"), ("generations.checkpoint=first", "checkpoint"),
                       ("generations.eval_data=[nosuchdata]", "nosuchdata")):
        with pytest.raises(FixedclsError, match=match):
            generation_configs(compose_config(DATA + ["generations.num_tasks=2", bad]))


def test_cores_cifar100_preset_composes_to_the_papers_protocol(tmp_path):
    cfg = compose_config(["experiment=cores_cifar100", f"data.root={tmp_path}"], tiny=False)
    assert cfg.data.name == "cifar100" and cfg.model.dim == 99 and cfg.head.name == "simplex"
    assert cfg.generations.metric == "verification" and cfg.generations.checkpoint == "best"
    configs = generation_configs(cfg)
    assert len(configs) == 10 and list(configs[0].data.classes) == list(range(10))
    assert list(configs[-1].data.classes) == list(range(100)) and configs[-1].data.old_classes is None
    assert [c.seed for c in configs] == list(range(10))  # generations trained apart
    learned = generation_configs(compose_config(["experiment=cores_cifar100", f"data.root={tmp_path}", "head=learned"],
                                                tiny=False))
    assert learned[0].head.name == "learned" and learned[0].model.dim == 99


# --------------------------------------------------------------------------- class-incremental data


def test_data_classes_keep_label_ids_and_rehearsal_is_seeded():
    cfg = compose_config(DATA + ["data.classes=[4,5]", "data.old_classes=[0,2]", "data.rehearsal=3"]).data
    bundle = create_data(cfg)
    assert bundle.num_classes == 6  # the head keeps an output for every class of the protocol
    # 24 drawn per class, 2 of which the validation split holds (data.val_fraction=0.1 of synthetic)
    assert Counter(targets_of(bundle.train)) == {4: 22, 5: 22, 0: 3, 2: 3}
    assert Counter(targets_of(bundle.val)) == {0: 2, 2: 2, 4: 2, 5: 2}  # val, like test, covers every seen class
    assert targets_of(bundle.train_eval) == targets_of(bundle.train)
    assert targets_of(SeededAugmentation(bundle.train, 0)) == targets_of(bundle.train)
    assert Counter(targets_of(bundle.test)) == {0: 8, 2: 8, 4: 8, 5: 8}
    assert {int(bundle.train[i][1]) for i in range(len(bundle.train))} == {0, 2, 4, 5}  # original ids
    assert targets_of(create_data(cfg).train) == targets_of(bundle.train)  # same memory every time
    for bad in (["data.classes=[6]"], ["data.classes=[1]", "data.old_classes=[1]"], ["data.rehearsal=2"],
                ["data.classes=[1]", "data.rehearsal=2"]):
        with pytest.raises(FixedclsError):
            create_data(compose_config(DATA + bad).data)


# --------------------------------------------------------------------------- fixed vs learned compatibility


def test_fixed_simplex_models_are_compatible_learned_heads_are_not(trained):
    fixed = compatibility([trained["fixed_a"], trained["fixed_b"]])
    learned = compatibility([trained["learned_a"], trained["learned_b"]])
    assert [m["backbone"] for m in fixed["models"]] == ["test_resnet", "test_efficientnet"]
    F, L = fixed["M"], learned["M"]
    assert F[0][0] >= 0.8 and F[1][1] >= 0.8 and L[0][0] >= 0.8 and L[1][1] >= 0.8  # each model retrieves well
    assert F[1][0] >= min(F[0][0], F[1][1]) - 0.15  # cross-model close to self-test
    assert L[1][0] <= min(L[0][0], L[1][1]) - 0.4  # unrelated feature spaces
    assert fixed["M_map"][1][0] >= fixed["M_map"][0][0] - 0.2
    assert F[0][1] is None and fixed["AM"] > learned["AM"] + 0.2


def test_cli_writes_json_and_png(trained, tmp_path, capsys):
    out = tmp_path / "out" / "compat.json"
    assert main([str(trained["fixed_a"]), str(trained["fixed_b"].parent), "--json", str(out), "--query", "test",
                 "--gallery", "train", "--classes", "0", "1", "2"]) == 0
    result = json.loads(out.read_text())
    for key in ("M", "M_map", "AC", "AC_ties", "AM", "BC", "FC", "AC_map", "AC_ties_map", "AM_map", "BC_map", "FC_map"):
        assert key in result
    assert result["M"][0][1] is None and 0.0 <= result["M"][1][0] <= 1.0
    assert result["num_query"] == 3 * 8 and result["num_gallery"] == 3 * 22  # 24 per class less the validation split
    png = out.with_suffix(".png")
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert "top-1 NN accuracy" in capsys.readouterr().out


def test_verification_matrix_of_fixed_and_learned_generations(trained, tmp_path, capsys):
    fixed = compatibility([trained["fixed_a"], trained["fixed_b"]], metric="verification", pairs=2000, gallery="test")
    learned = compatibility([trained["learned_a"], trained["learned_b"]], metric="verification", pairs=2000, gallery="test")
    assert fixed["verification"] == {"pairs": 2000, "same_class": 1000, "folds": 10, "seed": 0}
    F, L = fixed["M_verification"], learned["M_verification"]
    assert min(F[0][0], F[1][1], F[1][0]) >= 0.85 and F[0][1] is None  # cross-model as good as each model alone
    assert L[0][0] >= 0.85 and L[1][0] <= L[0][0] - 0.2  # unrelated feature spaces
    assert "AC_ties_verification" in fixed and fixed["M"] == compatibility([trained["fixed_a"], trained["fixed_b"]],
                                                                          gallery="test")["M"]
    out = tmp_path / "ver.json"
    assert main([str(trained["fixed_a"]), str(trained["fixed_b"]), "--metric", "verification", "--pairs", "400",
                 "--folds", "5", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["verification"]["folds"] == 5 and 0.0 <= result["AC_ties_verification"] <= 1.0
    text = capsys.readouterr().out
    assert "pair-verification accuracy" in text and "AC_ties" in text


def test_one_checkpoint_is_a_needs_two_models_error(trained, capsys):
    assert main([str(trained["fixed_a"])]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs two models" in err and "\n" not in err


def test_cli_missing_checkpoint_is_one_line_error(trained, tmp_path, capsys):
    assert main([str(trained["fixed_a"]), str(tmp_path / "nope.pt"), "--json", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fixedcls-compat: error:") and "nope.pt" in err and "\n" not in err
    assert not (tmp_path / "x.json").exists()
    assert main([str(trained["fixed_a"]), "--query", "val"]) == 2


# --------------------------------------------------------------------------- fine-tuning: init_from, distillation


def test_init_from_is_strict_about_prototypes(trained, tmp_path):
    cfg = compose_config(DATA + [f"model.init_from={trained['fixed_a']}"])
    model = create_model("test_resnet", "simplex", 6, in_chans=3, img_size=16)
    assert prepare_init(cfg, model, torch.device("cpu")) is None
    saved = ckpt.load(trained["fixed_a"])["model"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    other = create_model("test_resnet", "orthoplex", 6, dim=5, in_chans=3, img_size=16)
    with pytest.raises(FixedclsError, match="prototypes"):
        prepare_init(cfg, other, torch.device("cpu"))
    with pytest.raises(FixedclsError, match="init_from"):
        prepare_init(compose_config(DATA + ["trainer.distill_weight=1"]), model, torch.device("cpu"))
    with pytest.raises(FixedclsError, match="does not exist"):
        prepare_init(compose_config(DATA + [f"model.init_from={tmp_path / 'gone.pt'}"]), model, torch.device("cpu"))


def test_feature_distillation_pulls_towards_the_frozen_model():
    torch.manual_seed(0)
    teacher = create_model("test_resnet", "simplex", 4, in_chans=3, img_size=16).eval()
    student = create_model("test_resnet", "simplex", 4, in_chans=3, img_size=16).eval()
    x = torch.randn(5, 3, 16, 16)
    for kind in ("cosine", "l2"):
        loss = FeatureDistillation(teacher, 2.0, kind)(x, student.forward_features(x), None)
        assert loss > 0
        loss.backward()
        assert all(p.grad is None for p in teacher.parameters())
        same = FeatureDistillation(teacher, 2.0, kind)(x, teacher.forward_features(x), None)
        assert float(same.detach()) == pytest.approx(0.0, abs=1e-5)


def test_generations_reserve_prototypes_and_chain_checkpoints(tmp_path):
    cfg = compose_config(DATA + ["trainer.epochs=1", "generations.tasks=[[0,1,2],[3,4,5]]",
                                 "generations.protocol=finetune", "data.rehearsal=2", "trainer.distill_weight=1.0"],
                         tmp_path=tmp_path)
    result = run_generations(cfg, tmp_path / "run")
    simplex = polytopes.make("simplex", 6)
    first, second = (ckpt.load(m["checkpoint"]) for m in result["models"])
    for state in (first, second):  # every prototype exists from generation 1 on, and none moved
        assert torch.allclose(state["model"]["head.prototypes"], simplex)
    assert first["config"]["data"]["classes"] == [0, 1, 2]
    assert second["config"]["data"]["classes"] == [3, 4, 5] and second["config"]["data"]["old_classes"] == [0, 1, 2]
    assert second["config"]["model"]["init_from"] == result["models"][0]["checkpoint"]
    # generation 1 never saw a label of a reserved prototype
    labels = set(targets_of(create_data(compose_config(DATA + ["data.classes=[0,1,2]"]).data).train))
    assert labels == {0, 1, 2}
    for name in ("compat.json", "compat.png", "generations.json"):
        assert (tmp_path / "run" / name).is_file()
    assert len(result["M"]) == 2 and result["M"][1][0] is not None
    with pytest.raises(FixedclsError, match="tasks"):
        run_generations(compose_config(DATA, tmp_path=tmp_path), tmp_path / "run2")


def test_generations_from_num_tasks_measure_best_checkpoints_with_verification(tmp_path):
    cfg = compose_config(DATA + ["trainer.epochs=2", "generations.num_tasks=2", "generations.checkpoint=best",
                                 "generations.metric=verification", "generations.pairs=300", "generations.folds=5",
                                 "generations.gallery=test"], tmp_path=tmp_path)
    result = run_generations(cfg, tmp_path / "run")
    assert [Path(m["checkpoint"]).name for m in result["models"]] == ["best.pt", "best.pt"]
    assert [m["classes"] for m in result["models"]] == [[0, 1, 2], [0, 1, 2, 3, 4, 5]]
    assert result["verification"]["pairs"] == 300 and len(result["M_verification"]) == 2
    saved = json.loads((tmp_path / "run" / "compat.json").read_text())
    assert saved["M_verification"] == result["M_verification"] and "AC_ties_verification" in saved


def test_compat_train_ends_with_compat_json_and_its_criteria(tmp_path):
    import os
    import subprocess
    import sys

    from utils import TINY

    result = subprocess.run([sys.executable, "-m", "fixedcls.commands.compat", "train", *TINY, *DATA, "trainer.epochs=1",
                             "trainer.threads=1", "generations.tasks=[[0,1,2],[3,4,5]]"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    lines = [line.split("] ", 1)[1] for line in result.stdout.strip().splitlines()[-3:]]
    path = next(tmp_path.glob("outputs/*/*/compat.json"))
    saved = json.loads(path.read_text())
    assert lines[0] == f"compat.json  {path.relative_to(tmp_path)}"
    for line, (name, suffix) in zip(lines[1:], (("top-1", ""), ("mAP", "_map"))):
        assert line.startswith(f"criteria ({name})  AC {saved['AC' + suffix]:.3f}  AC_ties {saved['AC_ties' + suffix]:.3f}  "
                               f"AM {saved['AM' + suffix]:.3f}  BC {saved['BC' + suffix]:+.3f}")
