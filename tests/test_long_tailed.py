"""Long-tailed training: imbalance profiles, untouched held-out splits, per-class accuracy, class groups,
minority-collapse measures, the losses and layers of the ETF recipe, and the long_tailed preset."""
from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fixedcls import polytopes
from fixedcls.collapse import minority_collapse
from fixedcls.config import validate_config
from fixedcls.data.datasets import create_data, targets_of
from fixedcls.training.distributed import World
from fixedcls.training.loop import evaluate
from fixedcls.errors import FixedclsError
from fixedcls.models.heads import LogitAdjustedLoss, create_criterion, create_head
from fixedcls.data.imbalance import class_accuracy_row, class_counts, class_groups, group_thresholds, imbalanced_indices, profile_counts
from fixedcls.models.classifier import create_model

from utils import CONF_DIR, compose_config, train_tiny


def imbalance(kind="exp", ratio=10.0, step_fraction=0.5, many_min=None, few_max=None):
    return SimpleNamespace(type=kind, ratio=ratio, step_fraction=step_fraction, many_min=many_min, few_max=few_max)


# --------------------------------------------------------------------------- profiles


def test_exponential_profile_gives_the_long_tailed_cifar_counts():
    # The published class counts of CIFAR-10-LT (ratio 100) and the totals of the CIFAR-LT benchmarks.
    assert profile_counts(10, 5000, "exp", 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(profile_counts(10, 5000, "exp", 10)) == 20431
    assert sum(profile_counts(100, 500, "exp", 100)) == 10847
    assert sum(profile_counts(100, 500, "exp", 10)) == 19573


@pytest.mark.parametrize("num_classes", [2, 3, 10, 37])
@pytest.mark.parametrize("ratio", [1.0, 2.5, 10.0, 100.0])
def test_exponential_profile_runs_from_n_max_to_n_max_over_ratio(num_classes, ratio):
    counts = profile_counts(num_classes, 1000, "exp", ratio)
    assert len(counts) == num_classes and counts[0] == 1000
    assert counts == sorted(counts, reverse=True)
    assert abs(counts[-1] - 1000 / ratio) <= 1
    for i, n in enumerate(counts):  # n_i = int(n_max * ratio^(-i/(K-1))), up to the rounding of the power
        exact = 1000 * ratio ** (-i / (num_classes - 1))
        assert exact - 1 < n <= exact + 1e-6


@pytest.mark.parametrize("num_classes,fraction,minority", [(10, 0.5, 5), (4, 0.25, 1), (10, 0.8, 8), (3, 0.5, 2)])
def test_step_profile(num_classes, fraction, minority):
    counts = profile_counts(num_classes, 200, "step", 10, fraction)
    assert counts == [200] * (num_classes - minority) + [20] * minority


def test_profiles_refuse_what_cannot_be_drawn():
    with pytest.raises(FixedclsError, match=r"data.imbalance.ratio <= 50"):
        profile_counts(10, 50, "exp", 100)
    with pytest.raises(FixedclsError, match="step_fraction=0.01 makes 0 of the 10 classes minority"):
        profile_counts(10, 50, "step", 10, 0.01)
    with pytest.raises(FixedclsError, match="data.imbalance.ratio=0.5 is out of range"):
        validate_config(compose_config(["data.imbalance.ratio=0.5"]))


def test_imbalanced_indices_are_seeded_and_follow_the_profile():
    labels = [i % 4 for i in range(400)]  # 100 per class
    keep = imbalanced_indices(labels, imbalance("exp", 8), seed=3, num_classes=4)
    assert keep == sorted(keep) and keep == imbalanced_indices(labels, imbalance("exp", 8), seed=3, num_classes=4)
    assert class_counts([labels[i] for i in keep], 4) == [100, 50, 25, 12]
    assert keep != imbalanced_indices(labels, imbalance("exp", 8), seed=4, num_classes=4)
    assert imbalanced_indices(labels, imbalance("none"), seed=3) == list(range(400))


@pytest.mark.parametrize("overrides", [
    ["data=digits", "data.img_size=8"],
    ["data=synthetic", "data.train_per_class=30", "data.test_per_class=7", "data.num_classes=5", "data.img_size=8"],
])
def test_only_the_training_split_becomes_long_tailed(overrides):
    balanced = create_data(compose_config(overrides, tiny=False).data)
    cfg = compose_config(overrides + ["data.imbalance.type=exp", "data.imbalance.ratio=10"], tiny=False)
    tailed = create_data(cfg.data)
    K = balanced.num_classes
    before, after = class_counts(targets_of(balanced.train), K), class_counts(targets_of(tailed.train), K)
    assert after == profile_counts(K, min(before), "exp", 10)
    assert class_counts(targets_of(tailed.train_eval), K) == after
    # The test split is the balanced run's, sample for sample.
    assert targets_of(tailed.test) == targets_of(balanced.test)
    assert all(torch.equal(tailed.test[i][0], balanced.test[i][0]) for i in range(0, len(balanced.test), 17))
    # Same split_seed, same long-tailed set; the training images are those of the balanced split.
    again = create_data(cfg.data)
    assert all(torch.equal(again.train_eval[i][0], tailed.train_eval[i][0]) for i in range(len(tailed.train_eval)))


# --------------------------------------------------------------------------- class groups and per-class accuracy


def test_default_groups_cut_the_count_range_in_log_thirds():
    counts = profile_counts(10, 139, "exp", 100)  # the digits training split at ratio 100
    assert counts == [139, 83, 49, 29, 17, 10, 6, 3, 2, 1]
    assert group_thresholds(counts, imbalance("exp", 100)) == (27, 5)
    assert class_groups(counts, imbalance("exp", 100)) == {"many": [0, 1, 2, 3], "medium": [4, 5, 6], "few": [7, 8, 9]}
    step = profile_counts(6, 60, "step", 10, 0.5)
    assert class_groups(step, imbalance("step", 10)) == {"many": [0, 1, 2], "medium": [], "few": [3, 4, 5]}
    assert class_groups([50, 48, 51], imbalance("none")) == {"many": [0, 1, 2], "medium": [], "few": []}


def test_explicit_group_thresholds():
    counts = [120, 100, 60, 20, 19, 0]
    groups = class_groups(counts, imbalance("none", many_min=101, few_max=19))
    assert groups == {"many": [0], "medium": [1, 2, 3], "few": [4]}  # class 5 has no training sample: no group
    with pytest.raises(FixedclsError, match="few_max=30 is not below data.imbalance.many_min=20"):
        class_groups(counts, imbalance("exp", many_min=20, few_max=30))
    with pytest.raises(FixedclsError, match="few_max=30 is not below data.imbalance.many_min=20"):
        validate_config(compose_config(["data.imbalance.many_min=20", "data.imbalance.few_max=30"]))


class FixedLogits(nn.Module):
    """A 'model' whose inputs are its logits and whose features are the inputs."""

    num_classes = 3

    def forward(self, x, return_features=False):
        return (x, x) if return_features else x


def test_per_class_accuracy_against_a_hand_count():
    # labels 0 0 0 0 | 1 1 | 2 2 2 ; predictions 0 0 1 0 | 1 0 | 2 1 1  (hand count: 3/4, 1/2, 1/3)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])
    predicted = torch.tensor([0, 0, 1, 0, 1, 0, 2, 1, 1])
    logits = F.one_hot(predicted, 3).float()
    loader = [(logits[:5], labels[:5]), (logits[5:], labels[5:])]
    result = evaluate(FixedLogits(), loader, nn.CrossEntropyLoss(), device=torch.device("cpu"),
                      autocast=contextlib.nullcontext, world=World())
    assert result["class_correct"] == [3, 1, 1] and result["class_count"] == [4, 2, 3]
    assert result["acc"] == pytest.approx(5 / 9)
    row = class_accuracy_row("test", result["class_correct"], result["class_count"],
                             {"many": [0], "medium": [], "few": [1, 2]})
    assert row == pytest.approx({"test/balanced_acc": (3 / 4 + 1 / 2 + 1 / 3) / 3, "test/acc_many": 3 / 4,
                                 "test/acc_few": (1 / 2 + 1 / 3) / 2})  # an empty group gets no key


# --------------------------------------------------------------------------- minority collapse


def test_minority_measures_on_constructed_rows():
    K, d = 6, 5
    simplex = polytopes.make("simplex", K, d).double()
    out = minority_collapse(None, simplex, minority=[3, 4, 5], majority=[0, 1, 2])
    assert out == pytest.approx({"minority_w_cos": -1 / (K - 1), "minority_w_norm_ratio": 1.0})
    # Collapsed minority classifier rows: one direction, shorter than the majority rows.
    collapsed = simplex.clone()
    collapsed[3:] = 0.25 * simplex[3]
    out = minority_collapse(None, collapsed, minority=[3, 4, 5], majority=[0, 1, 2])
    assert out["minority_w_cos"] == pytest.approx(1.0) and out["minority_w_norm_ratio"] == pytest.approx(0.25)
    # Class means: centred by their unweighted mean first (a shared offset changes nothing).
    means = 3.0 * simplex + torch.tensor([1.0, -2.0, 0.5, 0.0, 4.0], dtype=torch.float64)
    out = minority_collapse(means, None, minority=[3, 4, 5], majority=[0, 1, 2])
    assert out == pytest.approx({"minority_mu_cos": -1 / (K - 1), "minority_mu_norm_ratio": 1.0})
    # A class without samples is left out; one minority class left: no cosine.
    out = minority_collapse(means, simplex, minority=[4, 5], majority=[0], present=torch.tensor([1, 1, 1, 1, 1, 0]).bool())
    assert set(out) == {"minority_w_norm_ratio", "minority_mu_norm_ratio"}


# --------------------------------------------------------------------------- the ETF recipe and the baselines


def test_logit_adjustment_is_cross_entropy_on_prior_shifted_logits():
    head = create_head("learned", 3, 4)
    criterion = create_criterion("ce", head, logit_adjust=1.5, class_counts=[60, 30, 10])
    assert isinstance(criterion, LogitAdjustedLoss)
    logits, target = torch.randn(7, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 2, 1, 0, 0])
    prior = torch.tensor([0.6, 0.3, 0.1])
    assert criterion(logits, target) == pytest.approx(float(F.cross_entropy(logits + 1.5 * prior.log(), target)), rel=1e-6)
    with pytest.raises(FixedclsError, match="trainer.logit_adjust=1.0 adjusts cross-entropy"):
        create_criterion("dot_regression", create_head("etf", 3, normalize="l2"), logit_adjust=1.0)


def test_feature_bn_normalises_the_features_the_head_sees():
    model = create_model("test_resnet", "etf", 4, feature_bn=True, in_chans=1, img_size=16)
    assert isinstance(model.feature_bn, nn.BatchNorm1d) and model.feature_bn.num_features == model.dim
    h = model.train().forward_features(torch.randn(16, 1, 16, 16))
    assert h.mean(0).abs().max() < 1e-4 and (h.var(0, unbiased=False) - 1).abs().max() < 1e-2
    plain = create_model("test_resnet", "etf", 4, in_chans=1, img_size=16)
    assert isinstance(plain.feature_bn, nn.Identity) and "feature_bn" not in " ".join(plain.state_dict())


# --------------------------------------------------------------------------- the preset and a run


def test_long_tailed_preset_composes():
    cfg = compose_config(["experiment=long_tailed", "head=etf_dr"], tiny=False)
    validate_config(cfg)
    assert cfg.experiment == "long_tailed" and cfg.data.name == "digits"
    assert cfg.data.imbalance.type.value == "exp"
    assert (cfg.head.name, cfg.head.normalize.value, cfg.head.feature_bn, cfg.trainer.loss) == ("etf", "none", True, "dot_regression")
    from hydra import compose, initialize_config_dir


    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        sweep = compose(config_name="config", overrides=["experiment=long_tailed"], return_hydra_config=True)
    params = sweep.hydra.sweeper.params
    assert params["head"].split(",") == ["learned", "simplex", "etf_dr"]
    assert params["data.mixup"] == "0.0,1.0"  # every head with and without the authors' mixup
    assert params["data.imbalance.ratio"] == "10,100" and params["seed"] == "0,1,2"


@pytest.mark.parametrize("mode", ["exact", "online"])
def test_a_long_tailed_run_records_counts_groups_and_minority_measures(tmp_path, mode):
    summary = train_tiny(tmp_path, ["data.num_classes=6", "data.train_per_class=16", "data.imbalance.type=exp",
                                    "data.imbalance.ratio=8", "head=learned", "trainer.epochs=1",
                                    f"collapse.mode={mode}", "trainer.logit_adjust=1.0", "data.val_fraction=0"])
    assert summary["data/train_class_counts"] == [16, 10, 6, 4, 3, 2]
    assert summary["data/class_groups"] == {"many": [0, 1], "medium": [2], "few": [3, 4, 5]}  # thresholds 8 and 4
    assert len(summary["final/test/class_acc"]) == 6
    for key in ("test/balanced_acc", "test/acc_many", "test/acc_medium", "test/acc_few",
                "collapse/minority_w_cos", "collapse/minority_mu_cos", "collapse/minority_w_norm_ratio",
                "collapse/minority_mu_norm_ratio", "collapse_test/minority_mu_cos"):
        assert f"final/{key}" in summary, key
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["test/balanced_acc"] == pytest.approx(sum(summary["final/test/class_acc"]) / 6)


def test_compare_shows_the_long_tailed_columns_only_when_runs_recorded_them(tmp_path):
    from fixedcls.tracking import aggregate

    def job(head, seed, **final):
        return aggregate.Job(source=f"{head}{seed}", settings={"head": head}, seed=seed, order=["head"],
                           summary={"final/test/acc": 0.5, **{f"final/{k}": v for k, v in final.items()}})

    tailed = [job("learned", 0, **{"test/balanced_acc": 0.4, "test/acc_few": 0.1, "collapse/minority_w_cos": 0.3}),
              job("learned", 1, **{"test/balanced_acc": 0.6, "test/acc_few": 0.3, "collapse/minority_w_cos": 0.5}),
              job("simplex", 0, **{"test/balanced_acc": 0.7, "test/acc_few": 0.5, "collapse/minority_w_cos": -0.111})]
    table = aggregate.compare(tailed, [], tmp_path / "a", plots=False).table
    header = table.splitlines()[0]
    assert "balanced acc %" in header and "few-shot acc %" in header and "minority w cos" in header
    assert "minority mu cos" not in header  # no run recorded it
    learned = next(line for line in table.splitlines() if line.startswith("| learned"))
    assert "| 50.0 ± 14.1 | 20.0 ± 14.1 | 0.400 ± 0.141 |" in learned
    plain = aggregate.compare([job("learned", 0), job("simplex", 0)], [], tmp_path / "b", plots=False).table
    assert "few-shot" not in plain and "minority" not in plain


def test_resuming_with_another_feature_bn_is_refused(tmp_path):
    first = train_tiny(tmp_path, ["trainer.epochs=1", "collapse.every=0", "name=bn"])
    # resume=auto would start a new run (another config is another identity); an explicit resume is refused
    with pytest.raises(FixedclsError, match="trained with feature_bn=False but this run has feature_bn=True"):
        train_tiny(tmp_path, ["trainer.epochs=2", "collapse.every=0", "name=bn", f"resume={first['checkpoint_dir']}",
                              "head.feature_bn=true"], run_name="again")
