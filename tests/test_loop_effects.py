"""Each training option changes what the loop does (issue 21): a test here fails when the loop drops it.

Gradient accumulation, gradient clipping, EMA, channels_last and label smoothing are checked against the
weights, inputs and losses of a real `engine.fit`; the exact collapse of the test split (whose first pass
rides on evaluation) against a separate `measure_model`.  Tiny runs: 24 samples, 2 steps an epoch.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fixedcls.training import factories
from fixedcls.collapse import measure_model
from fixedcls.training.distributed import World
from fixedcls.training.loop import fit
from fixedcls.runtime import unwrap
from fixedcls.training.assemble import build_training
from utils import compose_config, sigterm_at_training_step

SMALL = ["data.num_classes=4", "data.train_per_class=6", "data.test_per_class=3", "data.batch_size=12",
         "trainer.epochs=1", "trainer.threads=1", "collapse.every=0", "collapse.plot=false", "sched.name=none",
         "optim.name=sgd", "optim.lr=0.5", "optim.momentum=0.9", "optim.weight_decay=0", "head=learned"]


pytestmark = pytest.mark.usefixtures("single_process")  # conftest.py


def prepare(tmp_path: Path, overrides: list[str], name: str = "run"):
    """(the TrainingRun that `fixedcls-train` would fit, its config), nothing trained yet."""
    cfg = compose_config(SMALL + overrides + [f"checkpoint.dir={tmp_path / name / 'ckpt'}"], tmp_path=tmp_path)
    torch.set_num_threads(1)
    return build_training(cfg, tmp_path / name, World(), torch.device("cpu")), cfg


def run_fit(run) -> dict:
    try:
        return fit(run)
    finally:
        run.checkpoints.close()


def epoch_batches(run) -> list:
    """The batches the loop's first epoch will see (the loader is seeded per epoch)."""
    loader = run.train_loader
    loader.sampler.set_epoch(0, start=0)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(0)
    return list(loader)


def params(model) -> dict:
    return {k: v.detach().clone() for k, v in unwrap(model).named_parameters()}


def distance(a: dict, b: dict) -> float:
    return math.sqrt(sum(float((a[k] - b[k]).double().pow(2).sum()) for k in a))


def test_gradient_accumulation_makes_one_update_of_the_summed_micro_batches(tmp_path):
    run, cfg = prepare(tmp_path, ["trainer.grad_accum=2"], "accum2")
    start = params(run.model)
    batches = epoch_batches(run)
    assert len(batches) == 2
    by_hand = copy.deepcopy(unwrap(run.model)).train()
    optimizer, criterion = factories.build_optimizer(cfg.optim, by_hand), factories.build_criterion(cfg, by_hand)
    for x, y in batches:  # one update from the mean of the two micro-batch losses
        (criterion(by_hand(x).float(), y) / 2).backward()
    optimizer.step()
    run_fit(run)
    accumulated = params(run.model)
    for key, value in by_hand.named_parameters():
        assert torch.allclose(accumulated[key], value.detach(), rtol=1e-5, atol=1e-6), key

    plain, _ = prepare(tmp_path, ["trainer.grad_accum=1"], "accum1")
    assert distance(params(plain.model), start) == 0.0  # the same initial weights
    run_fit(plain)
    assert distance(params(plain.model), accumulated) > 1e-3  # two updates, not one
    assert unwrap(plain.model) is not unwrap(run.model)


def test_gradient_clipping_bounds_the_weight_change(tmp_path):
    clip, lr, momentum, steps = 1e-4, 0.5, 0.9, 2
    clipped, _ = prepare(tmp_path, [f"trainer.clip_grad={clip}"], "clipped")
    start = params(clipped.model)
    run_fit(clipped)
    moved = distance(params(clipped.model), start)
    # Each step moves the weights by lr x a momentum buffer of norm <= clip x (1 + m + m^2 + ...).
    assert 0 < moved <= steps * lr * clip / (1 - momentum) * 1.001
    free, _ = prepare(tmp_path, [], "free")
    run_fit(free)
    assert distance(params(free.model), start) > 100 * moved


def test_ema_weights_follow_the_model_without_being_it(tmp_path):
    run, _ = prepare(tmp_path, ["trainer.ema=true", "trainer.ema_decay=0.5"])
    start = params(run.model)
    run_fit(run)
    trained = params(run.model)
    ema = {k: v.detach() for k, v in run.ema.module.named_parameters()}
    # timm's EMA copies the model on its first update, then averages: 0.5 w1 + 0.5 w2 after the epoch's two.
    assert distance(ema, start) > 1e-4 and distance(ema, trained) > 1e-4


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_reaches_the_convolutions(tmp_path, channels_last):
    run, _ = prepare(tmp_path, [f"trainer.channels_last={str(channels_last).lower()}"])
    model = unwrap(run.model)
    seen = []
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    handle = conv.register_forward_pre_hook(
        lambda module, inputs: seen.append((module.training, inputs[0].is_contiguous(memory_format=torch.channels_last),
                                            module.weight.is_contiguous(memory_format=torch.channels_last))))
    try:
        run_fit(run)
    finally:
        handle.remove()
    training = [(x, w) for is_training, x, w in seen if is_training]
    assert len(training) == 2
    assert all(x == channels_last and w == channels_last for x, w in training), training


def test_label_smoothing_changes_the_training_loss(tmp_path):
    first_losses = {}
    for smoothing in (0.0, 0.3):
        run, _ = prepare(tmp_path, [f"trainer.label_smoothing={smoothing}"], f"smooth{smoothing}")
        model = copy.deepcopy(unwrap(run.model)).train()
        x, y = epoch_batches(run)[0]
        expected = F.cross_entropy(model(x).float(), y, label_smoothing=smoothing)
        losses = []
        criterion = run.criterion
        run.criterion = lambda logits, target: losses.append(loss := criterion(logits, target)) or loss
        run_fit(run)
        assert losses[0].item() == pytest.approx(expected.item(), rel=1e-5)
        first_losses[smoothing] = losses[0].item()
    assert abs(first_losses[0.3] - first_losses[0.0]) > 1e-3  # the same weights and batch, another loss


def test_test_split_collapse_equals_a_separate_measurement(tmp_path):
    run, _ = prepare(tmp_path, ["collapse.every=1", "collapse.splits=[train,test]", "head=simplex"])
    summary = run_fit(run)
    separate = measure_model(unwrap(run.model), run.test_loader, device=torch.device("cpu"))
    measured = {k[len("final/collapse_test/"):]: v for k, v in summary.items() if k.startswith("final/collapse_test/")}
    assert {"nc1", "nc2_etf_error", "nc3", "nc4"} <= set(measured)
    for key, value in measured.items():
        assert math.isfinite(value), key  # NaN never passes as "measured"
        assert value == pytest.approx(separate[key], rel=1e-6, abs=1e-9), key


class CountingLoader:
    """A loader that counts its passes (one iteration = one forward pass over its split)."""

    def __init__(self, loader):
        self.loader, self.passes = loader, 0
        self.dataset, self.sampler, self.batch_size = loader.dataset, loader.sampler, loader.batch_size
        self.num_workers = loader.num_workers

    def __iter__(self):
        self.passes += 1
        return iter(self.loader)


def test_exact_collapse_costs_one_train_pass_and_no_test_pass_with_the_same_bits(tmp_path):
    """collapse.cache_mb keeps the features of the one forward pass; with the cache off every split is
    streamed twice.  Both runs measure the very same numbers, and the cached run makes two passes fewer."""
    import dataclasses

    histories, passes = {}, {}
    for cache_mb in (256, 0):
        run, _ = prepare(tmp_path, ["collapse.every=1", "collapse.splits=[train,test]", "head=simplex",
                                    "trainer.epochs=2", f"collapse.cache_mb={cache_mb}"], name=f"cache{cache_mb}")
        loaders = {name: CountingLoader(getattr(run, name)) for name in ("train_eval_loader", "test_loader")}
        run_fit(dataclasses.replace(run, **loaders))
        histories[cache_mb] = _history(run.run_dir)
        passes[cache_mb] = {name: loader.passes for name, loader in loaders.items()}
    assert passes[256] == {"train_eval_loader": 2, "test_loader": 2}  # per epoch: one train pass, the evaluation
    assert passes[0] == {"train_eval_loader": 4, "test_loader": 4}
    cached, streamed = histories[256], histories[0]
    assert len(cached) == 2 and any(key.startswith("collapse_test/") for key in cached[0])
    for row_cached, row_streamed in zip(cached, streamed):
        for key, value in row_cached.items():
            if key.startswith(("collapse/", "collapse_test/")):
                assert value == row_streamed[key] or (math.isnan(value) and math.isnan(row_streamed[key])), key


def _history(run_dir) -> list:
    import json

    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_online_collapse_after_a_mid_epoch_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, single_process):
    """The checkpoint carries the online accumulator's partial sums of the epoch, so a run stopped mid-epoch
    and resumed measures exactly what the uninterrupted run measures (the weights are bit-exact already)."""
    from fixedcls.training.signals import TrainingInterrupted
    from utils import train_tiny

    settings = ["collapse.mode=online", "collapse.splits=[train]", "data.train_per_class=24", "data.batch_size=8",
                "trainer.epochs=2", "collapse.plot=false"]
    whole = train_tiny(tmp_path / "whole", settings)
    steps_per_epoch = math.ceil(len(whole.run.train_loader.sampler) / 8)
    restore = sigterm_at_training_step(monkeypatch, steps_per_epoch + 3)  # the third step of epoch 2: its sums are partial
    with pytest.raises(TrainingInterrupted):
        train_tiny(tmp_path / "stopped", settings)
    restore()
    resumed = train_tiny(tmp_path / "stopped", settings + ["resume=auto"], run_name="again")
    measures = [key for key in whole if key.startswith("final/collapse/")]
    assert measures and {key: resumed[key] for key in measures} == {key: whole[key] for key in measures}
