"""Configs read back: the resolved config a checkpoint stores (`plain_config` writes it, `stored_config` reads
it onto today's schema), and a stored data section adapted to this machine (`evaluation_data_config`).

Configs read back from files someone else may have written are data, never templates.

A config stored in a checkpoint, a run folder (`.hydra/config.yaml`) or a W&B run is shown and rebuilt
from, but an OmegaConf interpolation in it (``${oc.env:WANDB_API_KEY}``) would run on access: it could
copy an environment secret into a W&B tag or a comparison table. `literal` escapes every ``${`` so
OmegaConf reads it as text; the value a user sees is the stored text itself, unchanged.

No torch import here: fixedcls-compare uses it and starts without torch.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from ..config import Config, conf_dir
from ..errors import FixedclsError

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


def plain_config(cfg: DictConfig) -> dict:
    """The resolved config as plain containers (safe to store in a weights_only checkpoint)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def stored_config(state: dict, path: Path) -> DictConfig:
    """The resolved config stored in a checkpoint, on the current schema (keys it lacks take their defaults).

    It is data: a ``${...}`` in a stored value stays text (`stored.literal`), and `data.download` is off, so
    a checkpoint can neither read the environment nor start a download (a user's own override may turn
    it back on)."""
    if not isinstance(state.get("config"), dict):
        raise FixedclsError(f"checkpoint {path} holds no config: it was not written by fixedcls-train")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), literal(state["config"]))
        cfg.data.download = False
        return cfg
    except ConfigKeyError as error:
        key = error.full_key or str(error.key)
        raise FixedclsError(f"checkpoint {path} has the config key '{key}', which this fixedcls does not know: it was "
                            f"written by a newer fixedcls; upgrade fixedcls to read it") from None
    except OmegaConfBaseException as error:
        raise FixedclsError(f"checkpoint {path} has a config this fixedcls cannot read ({str(error).splitlines()[0]}): "
                            f"it was written by another fixedcls version; read it with that version") from None


def evaluation_data_config(base, items: Sequence[str] = (), *, all_classes: bool = True):
    """The evaluation data config: `base` (a model's data section), for all classes unless `all_classes` is
    False (then the run's own class selection stays), then presets / key=value items."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from ..config import DataConfig

    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), base)
    if all_classes:
        cfg.classes, cfg.old_classes, cfg.rehearsal = None, None, 0
    for item in items:
        try:
            if "=" in item:
                cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
            else:
                preset = conf_dir() / "data" / f"{item}.yaml"
                if not preset.is_file():
                    names = sorted(p.stem for p in (conf_dir() / "data").glob("*.yaml"))
                    raise FixedclsError(f"--data {item}: no such data preset: name one of {', '.join(names)} or give key=value")
                cfg = OmegaConf.merge(cfg, OmegaConf.load(preset))
        except OmegaConfBaseException as error:
            raise FixedclsError(f"--data {item}: {str(error).splitlines()[0]} (keys are those of the data config)") from None
    return cfg
