"""Compatibility between model generations (CoReS, Biondi et al. TPAMI 2023; CL2R): SPEC section 4.

Model generations phi_1..phi_T are trained against the same fixed prototypes; the compatibility matrix
M[t][i] (t >= i) is a retrieval score with queries embedded by phi_t and the gallery by phi_i, and the
criteria AC, AM, BC, FC summarise it.  `fixedcls-compat` (the command) trains generations and reports.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .build import in_chans_of, load_checkpoint, model_from_checkpoint
from .config import conf_dir
from .errors import FixedclsError

log = logging.getLogger("fixedcls")
SPLITS = {"train": "train_eval", "train_eval": "train_eval", "test": "test"}


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


def data_config(base, items: Sequence[str] = (), *, all_classes: bool = True):
    """The evaluation data config: `base` (a model's data section), for all classes unless `all_classes` is
    False (then the run's own class selection stays), then presets / key=value items."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from .config import DataConfig

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
    from .runtime import resolve_device

    if not checkpoints:
        raise FixedclsError("no checkpoints given: pass the checkpoints of the model generations, oldest first")
    for name in (query, gallery):
        if name not in SPLITS:
            raise FixedclsError(f"unknown split {name!r}: choose train or test (other datasets or folders: --data ...)")
    loaded = [load_checkpoint(path) for path in checkpoints]  # every path checked before any work
    dev = resolve_device(device, key="--device")
    models, infos = [], []
    for path, _ in loaded:
        model, cfg, state, path = model_from_checkpoint(path)
        models.append((model, cfg))
        infos.append({"checkpoint": str(path), "backbone": cfg.model.backbone, "head": cfg.head.name,
                      "dim": int(model.dim), "outputs": int(model.num_classes),
                      "classes": list(cfg.data.classes) if cfg.data.classes is not None else None,
                      "old_classes": list(cfg.data.old_classes) if cfg.data.old_classes is not None else None,
                      "epochs": int(state.get("epoch", 0))})
    data_cfg = data_config(models[0][1].data, data)
    bundle = create_data(data_cfg)
    for t, (model, cfg) in enumerate(models, 1):
        if in_chans_of(cfg) != bundle.in_chans:
            raise FixedclsError(f"model {t} ({infos[t - 1]['checkpoint']}) takes {in_chans_of(cfg)}-channel images but the "
                                f"evaluation data has {bundle.in_chans}: set --data in_chans={in_chans_of(cfg)}")
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


def gallery_compatibility(checkpoints: Sequence[str | Path], gallery_file: str | Path, *, query: str = "test",
                          data: Sequence[str] = (), classes: Optional[Sequence[int]] = None, device: str = "auto",
                          batch_size: Optional[int] = None) -> dict:
    """Each model's queries searched against a stored gallery (`fixedcls-embed`): the M[t][g] entries of the
    matrix, g being the model that embedded the gallery, top-1 and mAP, without re-indexing the gallery.

    The queries are the `query` split of the first model's data config (all classes), as `compatibility` takes
    them; `classes` restricts queries and gallery alike.
    """
    from .data import create_data
    from .gallery import load_gallery, same_feature_space
    from .inference import model_identity
    from .runtime import resolve_device

    if not checkpoints:
        raise FixedclsError("no checkpoints given: pass the checkpoints whose queries search the gallery")
    gallery = load_gallery(gallery_file)
    for path in checkpoints:
        load_checkpoint(path)  # every path checked before any work
    dev = resolve_device(device, key="--device")
    g_feats, g_labels = gallery.features, gallery.labels
    if classes:
        keep = torch.isin(g_labels, torch.tensor(sorted({int(c) for c in classes})))
        g_feats, g_labels = g_feats[keep], g_labels[keep]
        if not len(g_labels):
            raise FixedclsError(f"the gallery holds no samples of classes {list(classes)}: choose other --classes")
    infos, top1, mean_ap = [], [], []
    data_cfg, q_set = None, None
    for path in checkpoints:
        model, cfg, state, path = model_from_checkpoint(path)
        if q_set is None:
            data_cfg = data_config(cfg.data, data)
            q_set = _split(create_data(data_cfg), query, classes)
        identity = model_identity(model, path, state)
        shared = same_feature_space(identity, gallery.identity)
        if shared is False:
            log.warning(f"warning: {path} and the gallery's model use different prototypes; their features are not "
                        f"expected to be compatible")
        model.to(dev)
        qf, qy = embed(model, q_set, device=dev, batch_size=int(batch_size or data_cfg.eval_batch_size))
        model.cpu()
        scores = retrieval_scores(qf, qy, g_feats, g_labels)
        if math.isnan(scores[0]):
            log.warning(f"warning: {path} has feature width {qf.shape[1]} but the gallery {g_feats.shape[1]}: "
                        f"its entry cannot be measured")
        top1.append(scores[0])
        mean_ap.append(scores[1])
        infos.append({"checkpoint": str(path), "backbone": cfg.model.backbone, "head": cfg.head.name,
                      "dim": int(model.dim), "epochs": int(state.get("epoch", 0)), "same_prototypes": shared})
    return {"models": infos, "gallery_file": str(gallery_file), "gallery_model": gallery.identity,
            "gallery_source": gallery.source, "query": query, "data": data_cfg.name,
            "classes": sorted({int(c) for c in classes}) if classes else None,
            "num_query": len(q_set), "num_gallery": int(len(g_labels)), "top1": top1, "map": mean_ap}
