"""The compatibility matrix of trained models: embed query and gallery with each model (`compatibility`),
or search a stored gallery (`gallery_compatibility`).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FixedclsError
from ..models.classifier import in_chans_of
from ..runs.rebuild import load_checkpoint, model_from_checkpoint
from ..runs.stored import evaluation_data_config
from .criteria import (
    _check_two_models,
    compatibility_criteria,
    retrieval_scores,
    verification_accuracy,
    verification_pairs,
)

log = logging.getLogger("fixedcls")

SPLITS = {"train": "train_eval", "train_eval": "train_eval", "test": "test"}

METRICS = ("retrieval", "verification")  # verification: top-1 and mAP, and the pair verification of CoReS / CL2R


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


def _split(bundle, name: str, classes: Optional[Sequence[int]]):
    from ..data.datasets import LabelSubset, targets_of

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
                  batch_size: Optional[int] = None, metric: str = "retrieval", pairs: int = 6000, folds: int = 10,
                  pair_seed: int = 0) -> dict:
    """Embed query and gallery with every model and fill M (top-1) and M_map for t >= i; the SPEC 4 criteria.

    Query and gallery default to the test and train splits (all classes) of the first model's data config;
    `data` items change it (a conf/data preset name or key=value), `classes` restricts both sets.
    metric="verification" also fills M_verification: the `folds`-fold pair-verification accuracy of `pairs`
    query/gallery pairs drawn with `pair_seed` (verification_pairs, verification_accuracy), one pair set
    for every entry.
    """
    from ..data.datasets import create_data
    from ..runtime import resolve_device

    if not checkpoints:
        raise FixedclsError("no checkpoints given: pass the checkpoints of the model generations, oldest first")
    _check_two_models(len(checkpoints))
    for name in (query, gallery):
        if name not in SPLITS:
            raise FixedclsError(f"unknown split {name!r}: choose train or test (other datasets or folders: --data ...)")
    if metric not in METRICS:
        raise FixedclsError(f"unknown metric {metric!r}: choose {' or '.join(METRICS)}")
    if metric == "verification" and (pairs < 2 or folds < 2 or folds > pairs):
        raise FixedclsError(f"{pairs} verification pairs in {folds} folds: give at least 2 pairs and 2 to {max(pairs, 2)} "
                            "folds (the authors use 6000 pairs in 10 folds)")
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
    data_cfg = evaluation_data_config(models[0][1].data, data)
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
    same_set = SPLITS[query] == SPLITS[gallery]
    M: list[list[Optional[float]]] = [[None] * T for _ in range(T)]
    M_map: list[list[Optional[float]]] = [[None] * T for _ in range(T)]
    for t in range(T):
        for i in range(t + 1):
            (qf, qy), (gf, gy) = q_feats[t], g_feats[i]
            top1, mean_ap = retrieval_scores(qf, qy, gf, gy, same_set=same_set)
            M[t][i], M_map[t][i] = top1, mean_ap
            if math.isnan(top1):
                log.warning(f"warning: models {t + 1} and {i + 1} have feature widths {qf.shape[1]} and {gf.shape[1]}: "
                            f"M[{t + 1}][{i + 1}] cannot be measured")
    result = {
        "models": infos,
        "query": query, "gallery": gallery, "data": data_cfg.name,
        "classes": sorted({int(c) for c in classes}) if classes else None,
        "num_query": len(q_set), "num_gallery": len(g_set), "metric": metric,
        "M": M, "M_map": M_map,
        **compatibility_criteria(M),
        **{f"{key}_map": value for key, value in compatibility_criteria(M_map).items()},
    }
    if metric == "verification":
        query_index, gallery_index, same = verification_pairs(
            q_feats[0][1], g_feats[0][1], num_pairs=pairs, seed=pair_seed, same_set=same_set)
        M_ver: list[list[Optional[float]]] = [[None] * T for _ in range(T)]
        for t in range(T):
            for i in range(t + 1):
                M_ver[t][i] = verification_accuracy(q_feats[t][0][query_index], g_feats[i][0][gallery_index], same,
                                                    folds=folds)
        result["verification"] = {"pairs": len(same), "same_class": int(same.sum()), "folds": folds, "seed": pair_seed}
        result["M_verification"] = M_ver
        result.update({f"{key}_verification": value for key, value in compatibility_criteria(M_ver).items()})
    return result


def gallery_compatibility(checkpoints: Sequence[str | Path], gallery_file: str | Path, *, query: str = "test",
                          data: Sequence[str] = (), classes: Optional[Sequence[int]] = None, device: str = "auto",
                          batch_size: Optional[int] = None) -> dict:
    """Each model's queries searched against a stored gallery (`fixedcls-embed`): the M[t][g] entries of the
    matrix, g being the model that embedded the gallery, top-1 and mAP, without re-indexing the gallery.

    The queries are the `query` split of the first model's data config (all classes), as `compatibility` takes
    them; `classes` restricts queries and gallery alike.
    """
    from ..data.datasets import create_data
    from ..inference.loading import model_identity
    from ..runtime import resolve_device
    from .gallery import load_gallery, same_feature_space

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
            data_cfg = evaluation_data_config(cfg.data, data)
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
