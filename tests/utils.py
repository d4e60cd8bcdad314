"""Helpers shared by tests: compose the real Hydra config, and run a tiny training job in-process."""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from fixedcls.config import conf_dir

CONF_DIR = str(conf_dir())

# A job small enough for a 2-core CI machine: a tiny timm model, a few samples, one or two epochs.
TINY = [
    "model.backbone=test_resnet",
    "data=synthetic",
    "data.num_classes=4",
    "data.img_size=16",
    "data.train_per_class=12",
    "data.test_per_class=4",
    "data.batch_size=16",
    "trainer.epochs=2",
    "trainer.progress=false",
]


def compose_config(overrides: list[str] = (), *, tiny: bool = True, tmp_path: Path | None = None) -> DictConfig:
    """The config `fixedcls-train <overrides>` would run with (checkpoints under tmp_path when given)."""
    from fixedcls.config import register_configs

    register_configs()
    extra = list(TINY) if tiny else []
    if tmp_path is not None:
        extra.append(f"checkpoint.root={tmp_path / 'checkpoints'}")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=extra + list(overrides))


def train_tiny(tmp_path: Path, overrides: list[str] = (), run_name: str = "run") -> dict:
    """Train a tiny job in-process; the run directory is tmp_path/run_name."""
    from fixedcls.training.assemble import train

    cfg = compose_config(overrides, tmp_path=tmp_path)
    return train(cfg, tmp_path / run_name)


def checkpoint_folder(overrides: list[str] = (), *, tiny: bool = True) -> str:
    """The name of the folder a fresh run of `fixedcls-train <overrides>` claims first under checkpoint.root:
    `<safe name>-<identity[:8]>` (a second fresh run of the same config gets `-2`)."""
    from fixedcls.runs.stored import plain_config
    from fixedcls.runs.folders import run_base
    from fixedcls.runs.identity import run_identity

    cfg = compose_config(overrides, tiny=tiny)
    return run_base(str(cfg.name), run_identity(plain_config(cfg))[0])


def sigterm_at_training_step(monkeypatch, step: int):
    """Make the next run built in this process send itself SIGTERM at its `step`-th training step (counted
    from 1), as a scheduler's stop would: the loss of every criterion `fixedcls.training.factories.create_criterion` makes
    counts the steps that have gradients.  Returns the function that puts the plain criterion back."""
    import os
    import signal

    import torch

    from fixedcls.training import factories

    create, calls = factories.create_criterion, [0]

    def stopping_criterion(*args, **kwargs):
        criterion = create(*args, **kwargs)

        def loss(logits, target):
            if torch.is_grad_enabled():
                calls[0] += 1
                if calls[0] == step:
                    os.kill(os.getpid(), signal.SIGTERM)
            return criterion(logits, target)

        return loss

    monkeypatch.setattr(factories, "create_criterion", stopping_criterion)
    return lambda: monkeypatch.setattr(factories, "create_criterion", create)
