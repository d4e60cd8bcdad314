"""Configs read back from files someone else may have written are data, never templates.

A config stored in a checkpoint, a run folder (`.hydra/config.yaml`) or a W&B run is shown and rebuilt
from, but an OmegaConf interpolation in it (``${oc.env:WANDB_API_KEY}``) would run on access: it could
copy an environment secret into a W&B tag or a comparison table. `literal` escapes every ``${`` so
OmegaConf reads it as text; the value a user sees is the stored text itself, unchanged.

No torch import here: fixedcls-compare uses it and starts without torch.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Backslashes right before "${" are doubled, then "${" becomes "\${": OmegaConf reads back the original text.
_INTERPOLATION = re.compile(r"(\\*)\$\{")


def literal(value: Any) -> Any:
    """`value` (plain containers, as stored) with every string escaped so OmegaConf never resolves it."""
    if isinstance(value, str):
        return _INTERPOLATION.sub(lambda m: m.group(1) * 2 + r"\${", value)
    if isinstance(value, dict):
        return {key: literal(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [literal(item) for item in value]
    return value


def load_yaml(path: str | Path) -> DictConfig:
    """A YAML config file as data: its ``${...}`` stay text (see `literal`)."""
    return OmegaConf.create(literal(OmegaConf.to_container(OmegaConf.load(path), resolve=False)))
