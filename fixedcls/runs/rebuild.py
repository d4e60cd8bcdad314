"""A trained model rebuilt from a checkpoint: `model_from_checkpoint` is the one rebuild (backbone and head
from the stored config, never downloading), `load_checkpoint` the one "which file" read, `load_trained`
the model with its data.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..errors import FixedclsError
from ..models.classifier import Classifier, build_model, in_chans_of
from . import checkpoints as ckpt
from .stored import stored_config

log = logging.getLogger("fixedcls")


def mismatch(model: nn.Module, saved: dict) -> str:
    """What differs between a model's state dict and a saved one, in a few words."""
    own = model.state_dict()
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    shapes = [k for k in own if k in saved and tuple(own[k].shape) != tuple(saved[k].shape)]
    parts = [f"{len(keys)} {what} (e.g. {keys[0]})" for what, keys in
             (("missing tensors", missing), ("unexpected tensors", unexpected), ("tensors of another shape", shapes)) if keys]
    return ", ".join(parts) or "the weights do not load"


def load_checkpoint(path: str | Path) -> tuple[Path, dict]:
    """(the file, its state): a folder means its newest good checkpoint."""
    path = ckpt.checkpoint_file(path, warn=log.warning)
    return path, ckpt.load(path)


def model_from_checkpoint(path: str | Path) -> tuple[Classifier, DictConfig, dict, Path]:
    """(model in eval mode with the checkpoint's weights, its config, the state, the file): backbone and
    head from the stored config, never downloading pretrained weights."""
    path, state = load_checkpoint(path)
    cfg = stored_config(state, path)
    outputs = ckpt.meta_of(state).get("num_classes")
    if not isinstance(outputs, int) or isinstance(outputs, bool):
        head_rows = [v for k, v in state["model"].items() if k in ("head.prototypes", "head.weight", "head.raw_weight")]
        outputs = int(head_rows[0].shape[0]) if head_rows else cfg.data.num_classes
    with hub_offline():
        try:
            model = build_model(cfg, num_classes=int(outputs), in_chans=in_chans_of(cfg), img_size=cfg.data.img_size,
                                pretrained=False)
        except FixedclsError:
            raise
        except Exception as error:
            if not _from_hub(cfg.model.backbone):
                raise
            raise FixedclsError(
                f"checkpoint {path} names the backbone {cfg.model.backbone}, whose config is not in the local Hugging "
                f"Face cache ({type(error).__name__}); a stored config never downloads: fetch it once on purpose "
                f"(python -c \"import timm; timm.create_model('{cfg.model.backbone}')\"), then run this again"
            ) from None
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        raise FixedclsError(f"checkpoint {path} does not match the model its config describes "
                            f"({mismatch(model, state['model'])}): it was written by another fixedcls version") from None
    return model.eval(), cfg, state, path


def _from_hub(backbone: str) -> bool:
    return str(backbone).split(":", 1)[0].lower() in ("hf-hub", "hf_hub") and ":" in str(backbone)


@contextlib.contextmanager
def hub_offline():
    """A block in which the Hugging Face Hub client makes no network request (its local cache still answers):
    timm fetches an `hf-hub:` backbone's config from the Hub even with pretrained=False."""
    try:
        from huggingface_hub import constants
    except ImportError:  # no Hub client: nothing can reach the Hub
        yield
        return
    previous, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def load_trained(path: str | Path, *, data_overrides: Optional[dict] = None):
    """(model in eval mode, its config, its data bundle) from a checkpoint; `data_overrides` (e.g.
    {"root": ...}) adapt the stored data section to this machine."""
    from ..data.datasets import create_data

    model, cfg, _, _ = model_from_checkpoint(path)
    if data_overrides:
        cfg.data = OmegaConf.merge(cfg.data, data_overrides)
    return model, cfg, create_data(cfg.data)
