"""Dot regression as Yang et al.'s code computes it (issue 31): the function against a transcription of their
`methods.dot_loss`, both forms through the criterion and a training run, the refused combinations, and the
presets (head=etf_dr, experiment=long_tailed_cifar)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from fixedcls import polytopes
from fixedcls.config import validate_config
from fixedcls.errors import FixedclsError
from fixedcls.models.heads import (DotRegressionLoss, FeatureDotRegressionLoss, batch_class_lengths, create_criterion,
                                   create_head, dot_regression_loss)
from utils import CONF_DIR, compose_config, train_tiny


# --------------------------------------------------------------------------- the authors' code, transcribed


def authors_dot_loss(output, label, cur_M, H_length, reg_lam=0.0):
    """NeuralCollapseApplications/ImbalancedLearning methods.py `dot_loss` with criterion='reg_dot_loss', line by
    line: output [B, d], cur_M [d, K] (columns are the class vectors), H_length [B] computed under no_grad."""
    target = cur_M[:, label].T
    dot = torch.bmm(output.unsqueeze(1), target.unsqueeze(2)).view(-1)
    with torch.no_grad():
        M_length = torch.sqrt(torch.sum(target ** 2, dim=1, keepdims=False))
    loss = (1 / 2) * torch.mean(((dot - (M_length * H_length)) ** 2) / H_length)
    if reg_lam > 0:
        reg_Eh_l2 = torch.mean(torch.sqrt(torch.sum(output ** 2, dim=1, keepdims=True)))
        loss = loss + reg_Eh_l2 * reg_lam
    return loss


def authors_H_length(feat):
    with torch.no_grad():
        return torch.clamp(torch.sqrt(torch.sum(feat.detach() ** 2, dim=1, keepdims=False)), 1e-8)


def authors_produce_Ew(label, num_classes):
    """methods.py `produce_Ew` (their GivenEw=True default), without the .cuda()."""
    uni_label, count = torch.unique(label, return_counts=True)
    gamma = label.size(0) / uni_label.size(0)
    Ew = torch.ones(1, num_classes)
    for label_id, label_count in zip(uni_label, count):
        Ew[0, label_id] = torch.sqrt(gamma / label_count)
    return Ew


def authors_etf(feat_in, num_classes, generator):
    """Their ETF_Classifier.ori_M [d, K]: sqrt(K / (K-1)) P (I - 11^T / K), P a random orthonormal [d, K]."""
    P, _ = torch.linalg.qr(torch.rand(feat_in, num_classes, generator=generator, dtype=torch.float64))
    M = (num_classes / (num_classes - 1)) ** 0.5 * P @ (torch.eye(num_classes, dtype=torch.float64)
                                                         - torch.ones(num_classes, num_classes, dtype=torch.float64) / num_classes)
    return M.float()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("reg_lam,given_ew", [(0.0, False), (0.0, True), (0.05, False), (0.05, True)])
def test_feature_form_equals_the_authors_dot_loss_in_value_and_gradient(seed, reg_lam, given_ew):
    generator = torch.Generator().manual_seed(seed)
    batch, dim, classes = 32, 16, 7
    cur_M = authors_etf(dim, classes, generator)
    label = torch.randint(0, classes, (batch,), generator=generator)
    if given_ew:
        cur_M = authors_produce_Ew(label, classes) * cur_M
    base = torch.randn(batch, dim, generator=generator) * 3
    theirs_in, ours_in = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    theirs = authors_dot_loss(theirs_in, label, cur_M, authors_H_length(theirs_in), reg_lam=reg_lam)
    ours = dot_regression_loss(ours_in, label, cur_M.T, length="feature", reg_lam=reg_lam)
    theirs.backward()
    ours.backward()
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ours_in.grad, theirs_in.grad, rtol=1e-4, atol=1e-7)
    # their gradient: ||w_y|| (cos - 1) w_y / B, pulling h towards its prototype and letting it grow
    w = cur_M.T[label]
    cos = F.cosine_similarity(base, w, dim=1)
    expected = (w.norm(dim=1) * (cos - 1))[:, None] * w / batch + reg_lam * F.normalize(base, dim=1) / batch
    assert torch.allclose(ours_in.grad, expected, rtol=1e-4, atol=1e-6)


def test_soft_targets_give_the_authors_mixup_mixture_and_balance_is_their_ew():
    generator = torch.Generator().manual_seed(5)
    batch, dim, classes = 24, 12, 5
    cur_M = authors_etf(dim, classes, generator)
    y_a = torch.randint(0, classes, (batch,), generator=generator)
    y_b, lam = y_a.flip(0), 0.3
    feat = torch.randn(batch, dim, generator=generator)
    ew = authors_produce_Ew(y_a, classes)
    H = authors_H_length(feat)
    theirs = lam * authors_dot_loss(feat, y_a, ew * cur_M, H, 0.1) + (1 - lam) * authors_dot_loss(feat, y_b, ew * cur_M, H, 0.1)
    soft = lam * F.one_hot(y_a, classes).float() + (1 - lam) * F.one_hot(y_b, classes).float()
    assert torch.allclose(batch_class_lengths(y_a, classes), ew[0]) and torch.allclose(batch_class_lengths(soft, classes), ew[0])
    ours = dot_regression_loss(feat, soft, (ew * cur_M).T, reg_lam=0.1)
    assert ours == pytest.approx(float(theirs), rel=1e-5)


def test_fixed_form_is_todays_loss_and_equals_the_feature_form_on_normalised_features():
    generator = torch.Generator().manual_seed(1)
    h, y = torch.randn(10, 6, generator=generator), torch.randint(0, 4, (10,), generator=generator)
    w = polytopes.make("etf", 4, 6)
    s = 3.0
    hs = s * F.normalize(h, dim=1)
    todays = (s / 2 * (F.cosine_similarity(h, w[y], dim=1) - 1) ** 2).mean()
    assert dot_regression_loss(hs, y, w, length="fixed", scale=s) == pytest.approx(float(todays), rel=1e-5)
    assert dot_regression_loss(hs, y, w, length="feature") == pytest.approx(float(todays), rel=1e-5)
    # on features of other lengths the two differ: the fixed target is s, the feature target ||h||
    assert dot_regression_loss(h, y, w, length="fixed", scale=s) != pytest.approx(float(dot_regression_loss(h, y, w)))
    with pytest.raises(FixedclsError, match="unknown dot-regression length"):
        dot_regression_loss(h, y, w, length="norm")


# --------------------------------------------------------------------------- through the criterion


def test_feature_criterion_reads_the_features_the_head_dotted_and_the_logits_still_decide():
    head = create_head("etf", 5, 8)  # no normalisation: the authors' form
    criterion = create_criterion("dot_regression", head, dr_balance="batch", dr_reg=0.01)
    assert isinstance(criterion, FeatureDotRegressionLoss) and list(criterion.parameters()) == []
    generator = torch.Generator().manual_seed(2)
    h = (torch.randn(12, 8, generator=generator) * 4).requires_grad_(True)
    y = torch.randint(0, 5, (12,), generator=generator)
    logits = head(h)
    assert torch.allclose(logits, h @ head.prototypes.T)  # the decision stays w_c . h
    loss = criterion(logits, y)
    prototypes = head.prototypes * batch_class_lengths(y, 5)[:, None]
    assert float(loss.detach()) == pytest.approx(dot_regression_loss(h, y, prototypes, reg_lam=0.01).item(), rel=1e-6)
    loss.backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
    with pytest.raises(FixedclsError, match="none were left"):  # one forward feeds one loss
        criterion(logits, y)
    copy.deepcopy(head)(h[:3])  # an EMA copy of the head feeds the same loss
    with pytest.raises(FixedclsError, match="they hold 3 samples"):
        criterion(logits, y)


def test_both_forms_agree_with_an_l2_head_and_balance_weights_the_fixed_form_too():
    generator = torch.Generator().manual_seed(3)
    h, y = torch.randn(16, 10, generator=generator), torch.randint(0, 4, (16,), generator=generator)
    for balance in ("none", "batch"):
        head = create_head("etf", 4, 10, normalize="l2", scale=2.0)
        fixed = create_criterion("dot_regression", head, dr_length="fixed", dr_balance=balance)
        feature = create_criterion("dot_regression", head, dr_length="feature", dr_balance=balance)
        assert isinstance(fixed, DotRegressionLoss)
        logits = head(h)
        assert float(fixed(logits, y)) == pytest.approx(float(feature(logits, y)), rel=1e-5)
    plain = create_criterion("dot_regression", head, dr_length="fixed")
    assert float(plain(head(h), y)) != pytest.approx(float(fixed(head(h), y)))


@pytest.mark.parametrize("kwargs,head_kwargs,match", [
    ({"dr_length": "fixed"}, {}, "needs normalize='l2'"),
    ({"dr_length": "fixed", "dr_reg": 0.1}, {"normalize": "l2"}, "holds constant"),
    ({}, {"bias": True}, "set head.bias=false"),
    ({}, {"scale": 2.0, "learn_scale": True}, "set head.learn_scale=false"),
    ({"dr_length": "norm"}, {}, "unknown trainer.dr_length='norm'"),
    ({"dr_balance": "class"}, {}, "unknown trainer.dr_balance='class'"),
    ({"dr_reg": -1.0}, {}, "is negative"),
])
def test_combinations_that_cannot_train_are_refused(kwargs, head_kwargs, match):
    with pytest.raises(FixedclsError, match=match):
        create_criterion("dot_regression", create_head("etf", 4, 8, **head_kwargs), **kwargs)


def test_dot_regression_keys_on_cross_entropy_are_refused():
    with pytest.raises(FixedclsError, match="trainer.dr_balance=batch applies to loss 'dot_regression'"):
        create_criterion("ce", create_head("etf", 4), dr_balance="batch")
    with pytest.raises(FixedclsError, match="trainer.dr_reg=0.1 applies"):
        create_criterion("ce", create_head("learned", 4, 8), dr_reg=0.1)


def test_config_ranges_of_the_new_keys():
    from fixedcls.config import value_problem

    assert value_problem("trainer.dr_length", "norm") and value_problem("trainer.dr_balance", "class")
    assert value_problem("trainer.dr_reg", -0.5) and value_problem("sched.decay_milestones", [0])
    assert value_problem("trainer.dr_length", "fixed") is None and value_problem("trainer.dr_reg", 0.1) is None


# --------------------------------------------------------------------------- presets and runs


def test_etf_dr_preset_is_the_authors_form_and_the_other_forms_are_one_override_away():
    cfg = compose_config(["head=etf_dr"], tiny=False)
    validate_config(cfg)
    assert (cfg.head.name, cfg.head.normalize.value, cfg.head.feature_bn) == ("etf", "none", True)
    assert (cfg.trainer.loss, cfg.trainer.dr_length, cfg.trainer.dr_balance, cfg.trainer.dr_reg) == \
        ("dot_regression", "feature", "batch", 0.0)
    today = compose_config(["head=etf_dr", "trainer.dr_length=fixed", "head.normalize=l2", "trainer.dr_balance=none"],
                           tiny=False)
    assert (today.head.normalize.value, today.trainer.dr_length, today.trainer.dr_balance) == ("l2", "fixed", "none")
    # ... and one override away: the preset is exactly those overrides; so is their CIFAR classifier's
    cifar = compose_config(["head=etf_dr", "head.normalize=l2"], tiny=False)
    for preset, overrides in (("etf_dr_fixed", today), ("etf_dr_l2", cifar)):
        composed = compose_config([f"head={preset}"], tiny=False)
        validate_config(composed)
        assert OmegaConf.to_container(composed) == OmegaConf.to_container(overrides), preset


def test_new_keys_leave_the_identity_of_older_runs_alone_at_their_defaults():
    from fixedcls.runs.identity import ADDED_KEYS, run_identity
    from fixedcls.runs.stored import plain_config

    def identity(overrides, drop=False):
        config = plain_config(compose_config(overrides))
        if drop:  # a config saved before issue 31 has none of its keys
            del config["sched"]["decay_milestones"]
            for key in ("dr_length", "dr_reg", "dr_balance"):
                del config["trainer"][key]
        return run_identity(config)[0]

    assert {"trainer.dr_length", "trainer.dr_reg", "trainer.dr_balance", "sched.decay_milestones"} <= set(ADDED_KEYS)
    assert identity([]) == identity([], drop=True)
    # a run begun with head=etf_dr before issue 31 (L2-normalised, fixed length) continues with the default
    # dr_length=feature, which on those features is the same loss
    before = ["head=etf", "head.normalize=l2", "head.feature_bn=true", "trainer.loss=dot_regression"]
    assert identity(before, drop=True) == identity(["head=etf_dr", "head.normalize=l2", "trainer.dr_balance=none"])
    for changed in (["trainer.dr_length=fixed"], ["trainer.dr_balance=batch"], ["trainer.dr_reg=0.1"],
                    ["sched.decay_milestones=[5]"]):
        assert identity(before + changed) != identity(before, drop=True), changed


@pytest.mark.parametrize("form", ["feature", "fixed"])
def test_etf_dr_trains_in_either_form_with_mixup_and_says_which(tmp_path, caplog, form):
    extra = ["trainer.dr_length=fixed", "head.normalize=l2", "trainer.dr_balance=none"] if form == "fixed" else []
    with caplog.at_level("INFO", logger="fixedcls"):
        summary = train_tiny(tmp_path, ["head=etf_dr", "data.mixup=1.0", "trainer.ema=true", "collapse.every=0",
                                        "data.imbalance.type=exp", "data.imbalance.ratio=4", *extra])
    assert summary["loss"] == "dot_regression" and summary["dr_length"] == form
    assert summary["dr_balance"] == ("batch" if form == "feature" else "none")
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["dr_length"] == form and 0 <= saved["final/test/acc"] <= 1
    assert saved["final/test/loss_ema"] >= 0  # the EMA model's evaluation reads its own features
    wanted = "feature length, batch-balanced prototypes" if form == "feature" else "fixed length 1"
    assert any(f"loss dot_regression ({wanted}" in record.getMessage() for record in caplog.records)


def test_long_tailed_cifar_composes_the_authors_recipe():
    cfg = compose_config(["experiment=long_tailed_cifar"], tiny=False)
    assert (cfg.data.name, cfg.data.batch_size, cfg.data.mixup, cfg.data.val_fraction) == ("cifar10", 128, 1.0, 0.0)
    assert (cfg.data.imbalance.type.value, cfg.data.imbalance.ratio, cfg.trainer.epochs) == ("exp", 100, 200)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.1, 0.9, 2e-4)
    # their CIFAR classifier: L2 after the BatchNorm, the feature length as the target, per-batch prototype lengths
    assert (cfg.head.name, cfg.head.normalize.value, cfg.head.feature_bn, cfg.model.dim) == ("etf", "l2", True, 64)
    assert (cfg.trainer.loss, cfg.trainer.dr_length, cfg.trainer.dr_balance) == ("dot_regression", "feature", "batch")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        sweep = compose(config_name="config", overrides=["experiment=long_tailed_cifar"], return_hydra_config=True)
    assert sweep.hydra.sweeper.params["data.imbalance.ratio"] == "100,50,200"  # imbalance factors 0.01, 0.02, 0.005
    assert sweep.hydra.sweeper.params["head"] == "learned,etf_dr_l2"
    # the authors' schedule: warm-up 0.02, 0.04, ..., 0.1, then x0.1 at epoch 160 and again at 180
    from fixedcls.training.factories import build_optimizer, build_scheduler

    optimizer = build_optimizer(cfg.optim, nn.Linear(2, 2))
    scheduler = build_scheduler(cfg.sched, optimizer, cfg.trainer.epochs)
    rates = []
    for epoch in range(200):
        scheduler.step(epoch)
        rates.append(optimizer.param_groups[0]["lr"])
    expected = [0.1 * min(e + 1, 5) / 5 * (0.1 if e >= 160 else 1) * (0.1 if e >= 180 else 1) for e in range(200)]
    assert rates == pytest.approx(expected, rel=1e-6)
    cifar100 = compose_config(["experiment=long_tailed_cifar", "data=cifar100", "model.dim=128"], tiny=False)
    assert (cifar100.data.name, cifar100.data.num_classes, cifar100.data.mixup) == ("cifar100", 100, 1.0)


def test_long_tailed_cifar_runs_a_smoke_epoch_on_stand_in_data(tmp_path):
    # The recipe as composed (resnet18, d=64, batch 128, mixup, lr schedule, ratio 100), with synthetic CIFAR-sized
    # images in place of CIFAR-10 (no download): 242 long-tailed training images, two steps.
    cfg = compose_config(["experiment=long_tailed_cifar", "data=synthetic", "data.num_classes=10", "data.train_per_class=100",
                          "data.test_per_class=4", "data.val_fraction=0", "trainer.epochs=1", "collapse.every=0",
                          "trainer.progress=false", "trainer.threads=1"], tiny=False, tmp_path=tmp_path)
    from fixedcls.training.assemble import train

    summary = train(cfg, tmp_path / "run")
    assert summary["data/train_class_counts"] == [100, 59, 35, 21, 12, 7, 4, 2, 1, 1]
    assert summary["dr_length"] == "feature" and summary.run.mixup is not None
    assert summary["final/train/loss"] > 0 and 0 <= summary["final/test/acc"] <= 1
