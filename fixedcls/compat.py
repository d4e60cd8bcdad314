"""Backward-compatible representations (CoReS, Biondi et al. TPAMI 2023; CL2R): SPEC section 4.

Model generations phi_1..phi_T are trained in sequence against the same fixed prototypes (a simplex of
K vertices, one per class of the whole protocol, reserved from generation 1 on), and the compatibility
matrix M[t][i] (t >= i) is a retrieval score with queries embedded by phi_t and the gallery by phi_i.

Two commands::

    # train T generations (class-incremental), then measure them
    fixedcls-compat train experiment=cores_digits [hydra overrides]        # CoReS: cumulative, from scratch
    fixedcls-compat train experiment=cores_digits_finetune                 # CL2R: fine-tune + rehearsal + distillation

    # measure any checkpoints, oldest first
    fixedcls-compat CKPT_1 ... CKPT_T [--json PATH] [--png PATH] [--query SPLIT] [--gallery SPLIT] [--data NAME|KEY=VALUE ...]

Also here, for fixedcls-train: ``prepare_init`` (model.init_from and trainer.distill_weight).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import conf_dir
from .errors import FixedclsError

log = logging.getLogger("fixedcls")
CONF_DIR = conf_dir()
SPLITS = {"train": "train_eval", "train_eval": "train_eval", "test": "test"}
PROTOCOLS = ("cumulative", "finetune")
DISTILL_LOSSES = ("cosine", "l2")


# --------------------------------------------------------------------------- criteria (SPEC 4)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def compatibility_criteria(M: Sequence[Sequence[Optional[float]]]) -> dict:
    """AC, AM, BC, FC of a lower-triangular matrix M (0-based here; SPEC 4 counts models from 1).

    AC: share of pairs t > i with M[t][i] > M[i][i]. AM: mean of M[t][i] over t >= i.
    BC: mean over i < T of M[T][i] - M[i][i]. FC: mean over i > 1 of M[i][i-1] - M[i][i].
    Missing entries (None / NaN: models whose features cannot be compared) fail the criterion and make
    the means NaN; with one model there are no pairs and AC, BC, FC are NaN.
    """
    T = len(M)
    m = [[math.nan if (v := (M[t][i] if i < len(M[t]) else None)) is None else float(v) for i in range(t + 1)] for t in range(T)]
    pairs = [(t, i) for t in range(T) for i in range(t)]
    return {
        "AC": _mean([float(m[t][i] > m[i][i]) for t, i in pairs]),
        "AM": _mean([m[t][i] for t in range(T) for i in range(t + 1)]),
        "BC": _mean([m[T - 1][i] - m[i][i] for i in range(T - 1)]),
        "FC": _mean([m[i][i - 1] - m[i][i] for i in range(1, T)]),
    }


# --------------------------------------------------------------------------- retrieval


@torch.no_grad()
def retrieval_scores(query: torch.Tensor, query_labels: torch.Tensor, gallery: torch.Tensor,
                     gallery_labels: torch.Tensor) -> tuple[float, float]:
    """(top-1 nearest-neighbour accuracy, mAP) of cosine retrieval; features are L2-normalised here.

    A query whose class has no gallery sample counts as a top-1 miss and is left out of the mAP.
    """
    if query.shape[1] != gallery.shape[1]:
        return math.nan, math.nan
    q, g = F.normalize(query.float(), dim=1), F.normalize(gallery.float(), dim=1)
    qy, gy = query_labels.long(), gallery_labels.long()
    G = len(g)
    chunk = max(1, 4_000_000 // max(G, 1))
    ranks = torch.arange(1, G + 1, dtype=torch.float32)
    hits, ap_sum, ap_count = 0, 0.0, 0
    for start in range(0, len(q), chunk):
        sims = q[start:start + chunk] @ g.T
        order = sims.argsort(dim=1, descending=True)
        relevant = gy[order] == qy[start:start + chunk, None]
        hits += int(relevant[:, 0].sum())
        n_relevant = relevant.sum(1)
        precision = relevant.cumsum(1).float() / ranks
        ap = (precision * relevant).sum(1) / n_relevant.clamp_min(1)
        ap_sum += float(ap[n_relevant > 0].sum())
        ap_count += int((n_relevant > 0).sum())
    return hits / max(len(q), 1), (ap_sum / ap_count if ap_count else math.nan)


@torch.no_grad()
def embed(model: nn.Module, dataset, *, device: torch.device, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised head-input features h [N, d] (float32, CPU) and labels [N] of a dataset."""
    from torch.utils.data import DataLoader

    model.eval()
    features, labels = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        features.append(F.normalize(model.forward_features(x.to(device)).float(), dim=1).cpu())
        labels.append(torch.as_tensor(y).long())
    return torch.cat(features), torch.cat(labels)


# --------------------------------------------------------------------------- checkpoints -> models


def checkpoint_file(path: str | Path) -> Path:
    """A checkpoint file; a checkpoint directory means its last.pt."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise FixedclsError(f"checkpoint {path} does not exist: pass the last.pt (or the checkpoint directory) of each model")
    return path


def load_checkpoint(path: str | Path) -> tuple[Path, dict]:
    from . import checkpoint as ckpt

    path = checkpoint_file(path)
    return path, ckpt.load(path)


def checkpoint_config(state: dict, path: Path):
    """The resolved config stored in a checkpoint, on the current schema (keys it lacks take their defaults)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from .config import Config

    if not isinstance(state.get("config"), dict):
        raise FixedclsError(f"checkpoint {path} holds no config: it was not written by fixedcls-train")
    try:
        return OmegaConf.merge(OmegaConf.structured(Config), state["config"])
    except OmegaConfBaseException as error:
        raise FixedclsError(f"checkpoint {path} has a config this fixedcls cannot read ({str(error).splitlines()[0]})") from None


def _in_chans(cfg) -> int:
    return 3 if cfg.data.name in ("cifar10", "cifar100") else int(cfg.data.in_chans)


def _mismatch(model: nn.Module, saved: dict) -> str:
    """What differs between a model's state dict and a saved one, in a few words."""
    own = model.state_dict()
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    shapes = [k for k in own if k in saved and tuple(own[k].shape) != tuple(saved[k].shape)]
    parts = [f"{len(keys)} {what} (e.g. {keys[0]})" for what, keys in
             (("missing tensors", missing), ("unexpected tensors", unexpected), ("tensors of another shape", shapes)) if keys]
    return ", ".join(parts) or "the weights do not load"


def rebuild_model(state: dict, path: Path):
    """(model in eval mode with the checkpoint's weights, its config): backbone and head from the stored config."""
    from .model import create_model

    cfg = checkpoint_config(state, path)
    outputs = state.get("meta", {}).get("num_classes")
    if outputs is None:
        head_rows = [v for k, v in state["model"].items() if k in ("head.prototypes", "head.weight", "head.raw_weight")]
        outputs = int(head_rows[0].shape[0]) if head_rows else cfg.data.num_classes
    choice = lambda value: value.value if hasattr(value, "value") else value  # noqa: E731
    model = create_model(
        cfg.model.backbone, cfg.head.name, int(outputs), dim=cfg.model.dim, pretrained=False,
        in_chans=_in_chans(cfg), img_size=cfg.data.img_size, drop_rate=cfg.model.drop_rate,
        normalize=choice(cfg.head.normalize), scale=cfg.head.scale, learn_scale=cfg.head.learn_scale,
        bias=cfg.head.bias, seed=cfg.head.seed, num_prototypes=cfg.head.num_prototypes,
    )
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        raise FixedclsError(f"checkpoint {path} does not match the model its config describes "
                            f"({_mismatch(model, state['model'])}): it was written by another fixedcls version") from None
    return model.eval(), cfg


# --------------------------------------------------------------------------- fine-tuning hooks (fixedcls-train)


class FeatureDistillation:
    """extra_loss(x, features, y) = weight * distance(h_new, h_old), h_old from a frozen earlier model (CL2R)."""

    def __init__(self, teacher: nn.Module, weight: float, kind: str = "cosine"):
        self.teacher, self.weight, self.kind = teacher, float(weight), kind

    def __call__(self, x: torch.Tensor, features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            old = self.teacher.forward_features(x).float()
        new = features.float()
        if self.kind == "cosine":
            distance = 1.0 - F.cosine_similarity(new, old, dim=1)
        else:
            distance = (new - old).pow(2).sum(1)
        return self.weight * distance.mean()


def prepare_init(cfg, model: nn.Module, device: torch.device) -> Optional[Callable]:
    """model.init_from: load a checkpoint's weights into `model` (strict, prototypes checked).

    trainer.distill_weight > 0: return the feature-distillation extra loss against a frozen copy of the
    init_from model (taken before training, so a resumed run distils from the same model); else None.
    """
    weight = float(cfg.trainer.distill_weight or 0.0)
    kind = str(cfg.trainer.distill_loss)
    path = cfg.model.init_from
    if weight < 0:
        raise FixedclsError(f"trainer.distill_weight={weight} is negative: use 0 (off) or a positive weight")
    if weight and not path:
        raise FixedclsError(f"trainer.distill_weight={weight} distils from the previous model: set model.init_from=<its checkpoint>")
    if weight and kind not in DISTILL_LOSSES:
        raise FixedclsError(f"unknown trainer.distill_loss={kind!r}: choose one of {', '.join(DISTILL_LOSSES)}")
    if not path:
        return None
    path, state = load_checkpoint(path)
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError:
        saved = state.get("meta", {})
        raise FixedclsError(
            f"model.init_from={path} does not fit this model (it holds {saved.get('backbone', '?')} with head "
            f"{saved.get('head', '?')}, {saved.get('num_classes', '?')} outputs, d={saved.get('dim', '?')}; "
            f"{_mismatch(model, state['model'])}): use the checkpoint's model.backbone, head, model.dim and class count"
        ) from None
    log.info(f"initialised from {path}")
    if not weight:
        return None
    teacher = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    log.info(f"feature distillation ({kind}, weight {weight}) from the frozen {path}")
    return FeatureDistillation(teacher, weight, kind)


# --------------------------------------------------------------------------- the compatibility matrix


def _data_config(base, items: Sequence[str] = ()):
    """The evaluation data config: `base` (a model's data section) for all classes, then presets / key=value items."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from .config import DataConfig

    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), base)
    cfg.classes, cfg.old_classes, cfg.rehearsal = None, None, 0
    for item in items:
        try:
            if "=" in item:
                cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
            else:
                preset = CONF_DIR / "data" / f"{item}.yaml"
                if not preset.is_file():
                    names = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml"))
                    raise FixedclsError(f"--data {item}: no such data preset: name one of {', '.join(names)} or give key=value")
                cfg = OmegaConf.merge(cfg, OmegaConf.load(preset))
        except OmegaConfBaseException as error:
            raise FixedclsError(f"--data {item}: {str(error).splitlines()[0]} (keys are those of the data config)") from None
    return cfg


def _split(bundle, name: str, classes: Optional[Sequence[int]]):
    from .data import LabelSubset, targets_of

    if name not in SPLITS:
        raise FixedclsError(f"unknown split {name!r}: choose train or test (other datasets or folders: --data ...)")
    dataset = getattr(bundle, SPLITS[name])
    if classes:
        wanted = {int(c) for c in classes}
        labels = targets_of(dataset)
        dataset = LabelSubset(dataset, [i for i, c in enumerate(labels) if int(c) in wanted], labels)
    if len(dataset) == 0:
        raise FixedclsError(f"the {name} split has no samples of classes {list(classes or [])}: choose other --classes")
    return dataset


def compatibility(checkpoints: Sequence[str | Path], *, query: str = "test", gallery: str = "train",
                  data: Sequence[str] = (), classes: Optional[Sequence[int]] = None, device: str = "auto",
                  batch_size: Optional[int] = None) -> dict:
    """Embed query and gallery with every model and fill M (top-1) and M_map for t >= i; the SPEC 4 criteria.

    Query and gallery default to the test and train splits (all classes) of the first model's data config;
    `data` items change it (a conf/data preset name or key=value), `classes` restricts both sets.
    """
    from .data import create_data
    from .engine import resolve_device

    if not checkpoints:
        raise FixedclsError("no checkpoints given: pass the checkpoints of the model generations, oldest first")
    for name in (query, gallery):
        if name not in SPLITS:
            raise FixedclsError(f"unknown split {name!r}: choose train or test (other datasets or folders: --data ...)")
    loaded = [load_checkpoint(path) for path in checkpoints]  # every path checked before any work
    dev = resolve_device(device)
    models, infos = [], []
    for path, state in loaded:
        model, cfg = rebuild_model(state, path)
        models.append((model, cfg))
        infos.append({"checkpoint": str(path), "backbone": cfg.model.backbone, "head": cfg.head.name,
                      "dim": int(model.dim), "outputs": int(model.num_classes),
                      "classes": list(cfg.data.classes) if cfg.data.classes is not None else None,
                      "old_classes": list(cfg.data.old_classes) if cfg.data.old_classes is not None else None,
                      "epochs": int(state.get("epoch", 0))})
    data_cfg = _data_config(models[0][1].data, data)
    bundle = create_data(data_cfg)
    for t, (model, cfg) in enumerate(models, 1):
        if _in_chans(cfg) != bundle.in_chans:
            raise FixedclsError(f"model {t} ({infos[t - 1]['checkpoint']}) takes {_in_chans(cfg)}-channel images but the "
                                f"evaluation data has {bundle.in_chans}: set --data in_chans={_in_chans(cfg)}")
    fixed = [m.head.prototypes for m, _ in models if getattr(m.head, "is_fixed", False)]
    if len(fixed) > 1 and any(p.shape != fixed[0].shape or not torch.allclose(p, fixed[0]) for p in fixed):
        log.warning("warning: the fixed heads use different prototypes; their features are not expected to be compatible")
    q_set, g_set = _split(bundle, query, classes), _split(bundle, gallery, classes)
    batch = int(batch_size or data_cfg.eval_batch_size)
    q_feats, g_feats = [], []
    for model, _ in models:
        model.to(dev)
        q_feats.append(embed(model, q_set, device=dev, batch_size=batch))
        g_feats.append(embed(model, g_set, device=dev, batch_size=batch))
        model.cpu()
    T = len(models)
    M: list[list[Optional[float]]] = [[None] * T for _ in range(T)]
    M_map: list[list[Optional[float]]] = [[None] * T for _ in range(T)]
    for t in range(T):
        for i in range(t + 1):
            (qf, qy), (gf, gy) = q_feats[t], g_feats[i]
            top1, mean_ap = retrieval_scores(qf, qy, gf, gy)
            M[t][i], M_map[t][i] = top1, mean_ap
            if math.isnan(top1):
                log.warning(f"warning: models {t + 1} and {i + 1} have feature widths {qf.shape[1]} and {gf.shape[1]}: "
                            f"M[{t + 1}][{i + 1}] cannot be measured")
    top1_criteria, map_criteria = compatibility_criteria(M), compatibility_criteria(M_map)
    return {
        "models": infos,
        "query": query, "gallery": gallery, "data": data_cfg.name,
        "classes": sorted({int(c) for c in classes}) if classes else None,
        "num_query": len(q_set), "num_gallery": len(g_set),
        "M": M, "M_map": M_map,
        **top1_criteria,
        **{f"{key}_map": value for key, value in map_criteria.items()},
    }


# --------------------------------------------------------------------------- reporting


def _fmt(value: Optional[float], signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def format_matrix(M: Sequence[Sequence[Optional[float]]], title: str) -> str:
    """The lower triangle as a text table (rows: query model t, columns: gallery model i, in %)."""
    T = len(M)
    lines = [title, "query\\gallery " + "".join(f"{f'phi_{i + 1}':>9}" for i in range(T))]
    for t in range(T):
        cells = []
        for i in range(T):
            value = M[t][i] if i <= t else None
            cells.append(f"{'' if i > t else ('n/a' if value is None or math.isnan(value) else f'{100 * value:.1f}'):>9}")
        lines.append(f"{f'phi_{t + 1}':<14}" + "".join(cells))
    return "\n".join(lines)


def format_report(result: dict) -> str:
    parts = [f"compatibility of {len(result['M'])} models: query {result['query']} ({result['num_query']}), "
             f"gallery {result['gallery']} ({result['num_gallery']}), {result['data']}"]
    for key, title, suffix in (("M", "top-1 NN accuracy (%)", ""), ("M_map", "mAP (%)", "_map")):
        parts.append(format_matrix(result[key], title))
        parts.append(f"AC {_fmt(result['AC' + suffix])}  AM {_fmt(result['AM' + suffix])}  "
                     f"BC {_fmt(result['BC' + suffix], True)}  FC {_fmt(result['FC' + suffix], True)}")
    return "\n".join(parts)


def _jsonable(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_json(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_jsonable(result), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def plot_matrix(result: dict, path: str | Path, title: Optional[str] = None) -> Path:
    """Heatmaps of M (top-1) and M_map: the lower triangle, values in %, criteria in the panel titles."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    T = len(result["M"])
    figure = Figure(figsize=(4.2 * 2 + 1, 3.6 + 0.25 * T))
    FigureCanvasAgg(figure)
    labels = [f"phi_{t + 1}" for t in range(T)]
    for column, (key, name, suffix) in enumerate((("M", "top-1", ""), ("M_map", "mAP", "_map"))):
        ax = figure.add_subplot(1, 2, column + 1)
        values = np.array([[np.nan if i > t or result[key][t][i] is None else 100 * result[key][t][i]
                            for i in range(T)] for t in range(T)], dtype=float)
        image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0, vmax=100)
        for t in range(T):
            for i in range(t + 1):
                text = "n/a" if np.isnan(values[t, i]) else f"{values[t, i]:.1f}"
                ax.text(i, t, text, ha="center", va="center", fontsize=9,
                        color="white" if np.isnan(values[t, i]) or values[t, i] < 60 else "black")
        ax.set_xticks(range(T), labels)
        ax.set_yticks(range(T), labels)
        ax.set_xlabel("gallery model i")
        ax.set_ylabel("query model t")
        ax.set_title(f"{name}: AC {_fmt(result['AC' + suffix])}, AM {_fmt(result['AM' + suffix])}", fontsize=10)
        figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def log_to_tracker(result: dict, logger_cfg, run_dir: Path, png: Optional[Path], resolved_config: dict) -> None:
    """Send the matrices and criteria to the configured tracker (W&B) as a `compat` job; nothing for logger none."""
    if logger_cfg is None or logger_cfg.name == "none":
        return
    from omegaconf import OmegaConf

    from .loggers import create_tracker

    logger_cfg = OmegaConf.merge(logger_cfg, {"job_type": "compat"})
    config = {**resolved_config, "compat": {k: v for k, v in _jsonable(result).items() if k not in ("M", "M_map")}}
    try:
        tracker = create_tracker(logger_cfg, run_dir=Path(run_dir), resolved_config=config)
    except ImportError as error:
        raise FixedclsError(f"logger {logger_cfg.name} is not available here ({error}): use --logger none") from None
    T = len(result["M"])
    for key in ("M", "M_map"):
        rows = [[f"phi_{t + 1}"] + [result[key][t][i] if i <= t else None for i in range(T)] for t in range(T)]
        tracker.log_table(f"compat/{key}", ["query"] + [f"phi_{i + 1}" for i in range(T)], rows)
    tracker.log_summary({f"compat/{k}": v for k, v in _jsonable(result).items()
                         if k[:2] in ("AC", "AM", "BC", "FC")})
    if png is not None:
        tracker.log_image("compat", png)
    tracker.finish(0)


def report(result: dict, *, json_path: Optional[Path], png_path: Optional[Path], title: Optional[str] = None,
           echo: Callable[[str], None] = print) -> None:
    echo(format_report(result))
    if json_path is not None:
        echo(f"wrote {write_json(result, json_path)}")
    if png_path is not None:
        echo(f"wrote {plot_matrix(result, png_path, title)}")


# --------------------------------------------------------------------------- generations (fixedcls-compat train)


def _generations_dir(cfg) -> Path:
    """Where the generations' checkpoints go: checkpoint.dir, or <checkpoint.root>/<name> (suffixed if taken)."""
    from . import checkpoint as ckpt

    if cfg.checkpoint.dir:
        return Path(cfg.checkpoint.dir)
    root, name = Path(cfg.checkpoint.root), str(cfg.name)

    def taken(directory: Path) -> bool:
        return directory.is_dir() and any(ckpt.candidates(g) for g in directory.glob("gen*") if g.is_dir())

    existing = [d for d in ckpt.run_directories(root, name) if taken(d)]
    if cfg.resume == "auto" and existing:
        return max(existing, key=lambda d: max(p.stat().st_mtime for g in d.glob("gen*") for p in ckpt.candidates(g)))
    number, directory = 2, root / name
    while taken(directory):
        directory, number = root / f"{name}-{number}", number + 1
    return directory


def generation_configs(cfg) -> list:
    """One fixedcls-train config per generation of cfg.generations (checkpoint dirs set by the caller)."""
    g = cfg.generations
    tasks = [sorted({int(c) for c in task}) for task in (g.tasks or [])]
    if not tasks or any(not task for task in tasks):
        raise FixedclsError("generations.tasks is empty: list the classes each generation adds, "
                            "e.g. generations.tasks=[[0,1,2,3],[4,5,6],[7,8,9]] (or experiment=cores_digits)")
    flat = [c for task in tasks for c in task]
    if len(flat) != len(set(flat)):
        raise FixedclsError(f"generations.tasks={tasks} repeat a class: each class belongs to one generation")
    if g.protocol not in PROTOCOLS:
        raise FixedclsError(f"unknown generations.protocol={g.protocol!r}: choose cumulative (CoReS) or finetune (CL2R)")
    backbones = list(g.backbones) if g.backbones else [cfg.model.backbone] * len(tasks)
    if len(backbones) != len(tasks):
        raise FixedclsError(f"generations.backbones has {len(backbones)} names for {len(tasks)} generations: give one per generation")
    if g.protocol == "finetune" and len(set(backbones)) > 1:
        raise FixedclsError("generations.protocol=finetune starts each generation from the previous one, so all use one "
                            "backbone: drop generations.backbones or use protocol=cumulative")
    if cfg.data.classes is not None or cfg.data.old_classes is not None:
        raise FixedclsError("data.classes / data.old_classes are set per generation from generations.tasks: leave them unset")
    if g.protocol == "cumulative" and (cfg.data.rehearsal or cfg.trainer.distill_weight):
        raise FixedclsError("data.rehearsal and trainer.distill_weight apply to generations.protocol=finetune "
                            "(cumulative trains on all data seen so far): set protocol=finetune or leave them at 0")
    if cfg.resume not in (None, "auto"):
        raise FixedclsError(f"resume={cfg.resume}: a sequence of generations continues with resume=auto only")
    configs, seen = [], []
    base_name = str(cfg.name)
    for t, (task, backbone) in enumerate(zip(tasks, backbones), 1):
        c = copy.deepcopy(cfg)
        c.name = f"{base_name}-gen{t}"
        c.seed = int(cfg.seed) + t - 1  # generations are trained apart: no shared initialisation or data order
        c.model.backbone = backbone
        if g.protocol == "cumulative":
            c.data.classes = sorted(seen + task)
        else:
            c.data.classes = task
            c.data.old_classes = sorted(seen) or None
            c.data.rehearsal = cfg.data.rehearsal if seen else 0
            c.trainer.distill_weight = cfg.trainer.distill_weight if seen else 0.0
        configs.append(c)
        seen += task
    return configs


def run_generations(cfg, run_dir: str | Path) -> dict:
    """Train the generations of cfg.generations in sequence, then measure their compatibility.

    Writes <run_dir>/gen<t>/ (each generation's run), <run_dir>/generations.json, compat.json and compat.png;
    checkpoints go to <checkpoint dir>/gen<t>/. Generation t runs with seed + t - 1 (models trained apart).
    With resume=auto finished generations are not trained again.
    """
    from .train import train

    run_dir = Path(run_dir)
    configs = generation_configs(cfg)
    base = _generations_dir(cfg)
    log.info(f"{len(configs)} generations ({cfg.generations.protocol}), {cfg.head.name} head; checkpoints in {base}/gen<t>")
    paths, rows = [], []
    for t, c in enumerate(configs, 1):
        c.checkpoint.dir = str(base / f"gen{t}")
        if cfg.generations.protocol == "finetune" and t > 1:
            c.model.init_from = str(paths[-1])
        log.info(f"generation {t}/{len(configs)}: classes {list(c.data.classes)}"
                 + (f" + memory of {c.data.rehearsal} per old class" if c.data.rehearsal else "")
                 + (f", from {c.model.init_from}" if c.model.init_from else ", from scratch"))
        summary = train(c, run_dir / f"gen{t}")
        paths.append(Path(c.checkpoint.dir) / "last.pt")
        rows.append({"generation": t, "classes": list(c.data.classes),
                     "old_classes": list(c.data.old_classes) if c.data.old_classes is not None else None,
                     "backbone": c.model.backbone, "seed": int(c.seed), "checkpoint": str(paths[-1]),
                     "test_acc": summary.get("final/test/acc")})
    if int(os.environ.get("RANK", "0")) != 0:
        return {"generations": rows}
    write_json({"protocol": cfg.generations.protocol, "head": cfg.head.name, "generations": rows},
               run_dir / "generations.json")
    result = compatibility(paths, query=cfg.generations.query, gallery=cfg.generations.gallery,
                           device=cfg.trainer.device.value if hasattr(cfg.trainer.device, "value") else str(cfg.trainer.device))
    result["protocol"] = cfg.generations.protocol
    result["test_acc"] = [row["test_acc"] for row in rows]
    title = f"{cfg.head.name} head, {cfg.generations.protocol}, {cfg.data.name}"
    report(result, json_path=run_dir / "compat.json", png_path=run_dir / "compat.png", title=title, echo=log.info)
    from .train import plain_config

    log_to_tracker(result, cfg.logger, run_dir, run_dir / "compat.png", plain_config(cfg))
    return result


def _generations_hydra_main():
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from . import train as train_module  # registers the config schema

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    def generations_main(cfg):
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        return train_module.run_job(lambda: run_generations(cfg, run_dir).get("AM"), prog="fixedcls-compat")

    generations_main()
    train_module.exit_if_jobs_failed("fixedcls-compat")


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fixedcls-compat",
        description="Compatibility matrix (SPEC 4, CoReS) of model generations: queries embedded by model t, gallery by "
                    "model i <= t, cosine retrieval top-1 and mAP; AC, AM, BC, FC. "
                    "`fixedcls-compat train [hydra overrides]` trains the generations first (see experiment=cores_digits).",
    )
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoints (or checkpoint directories), oldest first")
    parser.add_argument("--json", type=Path, help="write the matrices and criteria here")
    parser.add_argument("--png", type=Path, help="heatmap path (default: next to --json, else compat.png)")
    parser.add_argument("--query", default="test", help="split embedded by the newer model (train or test; default test)")
    parser.add_argument("--gallery", default="train", help="split embedded by the older model (default train)")
    parser.add_argument("--data", nargs="+", default=[], metavar="NAME|KEY=VALUE",
                        help="evaluation data instead of the first model's: a conf/data preset and/or data keys "
                             "(e.g. --data cifar10 root=/data/cifar)")
    parser.add_argument("--classes", type=int, nargs="+", help="only these classes in query and gallery (default: all)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batch-size", type=int, help="embedding batch size (default data.eval_batch_size)")
    parser.add_argument("--logger", default="none", help="wandb: also log to the W&B project of the first model's config")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-sc"], ["--shell-completion"]):
        # The completion script that `fixedcls-compat train -sc install=bash` installs calls
        # `fixedcls-compat -sc query=bash` for the line being typed; Hydra completes the words after the
        # program name, so the `train` word is taken out of that line.
        line = os.environ.get("COMP_LINE")
        if line is not None:
            os.environ["COMP_LINE"] = re.sub(r"^(\s*\S+)\s+train(?=\s|$)", r"\1", line)
        argv = ["train", *argv]
    if argv and argv[0] == "train" and not Path("train").exists():
        try:  # the same early check of the overrides as fixedcls-train
            from .train import check_overrides

            problem = check_overrides(argv[1:])
        except Exception:
            problem = None
        if problem is not None:
            print(f"fixedcls-compat: error: {problem}", file=sys.stderr)
            return 2
        sys.argv = [sys.argv[0], *argv[1:]]
        _generations_hydra_main()
        return 0
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = compatibility(args.checkpoints, query=args.query, gallery=args.gallery, data=args.data,
                               classes=args.classes, device=args.device, batch_size=args.batch_size)
        png = args.png or (args.json.with_suffix(".png") if args.json else Path("compat.png"))
        report(result, json_path=args.json, png_path=png)
        if args.logger != "none":
            from omegaconf import OmegaConf

            path, state = load_checkpoint(args.checkpoints[0])
            logger_cfg = OmegaConf.merge(checkpoint_config(state, path).logger, {"name": args.logger})
            log_to_tracker(result, logger_cfg, (args.json or png).parent, png, state["config"])
    except FixedclsError as error:
        print(f"fixedcls-compat: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
