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
METRICS = ("retrieval", "verification")  # verification: top-1 and mAP, and the pair verification of CoReS / CL2R


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def split_classes(num_classes: int, num_tasks: int, seed: Optional[int] = None) -> list[list[int]]:
    """The classes of each task, as the CoReS code splits them: K // num_tasks classes per task, the last task
    also taking the remainder; classes 0..K-1 in order (the authors' code does not shuffle them) or, with
    `seed`, in a seeded random order. Each task's list is sorted."""
    if not 1 <= num_tasks <= num_classes:
        raise FixedclsError(f"generations.num_tasks={num_tasks} for {num_classes} classes: give 2 to {num_classes} tasks")
    order = (list(range(num_classes)) if seed is None
             else torch.randperm(num_classes, generator=torch.Generator().manual_seed(int(seed))).tolist())
    size = num_classes // num_tasks
    return [sorted(order[t * size:(t + 1) * size if t < num_tasks - 1 else num_classes]) for t in range(num_tasks)]


def _check_two_models(T: int) -> None:
    if T < 2:
        raise FixedclsError(f"compatibility needs two models (got {T}): pass the checkpoints of two or more "
                            "generations, oldest first (or give generations more than one task)")


def compatibility_criteria(M: Sequence[Sequence[Optional[float]]]) -> dict:
    """AC, AC_ties, AM, BC, FC of a lower-triangular matrix M of two or more models (0-based here; SPEC 4
    counts models from 1).

    AC: share of pairs t > i with M[t][i] > M[i][i], the strict empirical compatibility criterion of SPEC 4.
    AC_ties: share of pairs that do NOT have M[t][i] < M[i][i], the rule of the CoReS / CL2R authors' code
    (`average_compatibility` in their metrics.py): a tie counts as compatible, and so does a missing entry.
    AM: mean of M[t][i] over t >= i. BC: mean over i < T of M[T][i] - M[i][i].
    FC: mean over i > 1 of M[i][i-1] - M[i][i].
    Missing entries (None / NaN: models whose features cannot be compared) fail AC and make the means NaN.
    """
    T = len(M)
    _check_two_models(T)
    m = [[math.nan if (v := (M[t][i] if i < len(M[t]) else None)) is None else float(v) for i in range(t + 1)] for t in range(T)]
    pairs = [(t, i) for t in range(T) for i in range(t)]
    return {
        "AC": _mean([float(m[t][i] > m[i][i]) for t, i in pairs]),
        # a comparison with NaN is False, so `not <` passes a missing entry, as the authors' code does
        "AC_ties": _mean([float(not m[t][i] < m[i][i]) for t, i in pairs]),
        "AM": _mean([m[t][i] for t in range(T) for i in range(t + 1)]),
        "BC": _mean([m[T - 1][i] - m[i][i] for i in range(T - 1)]),
        "FC": _mean([m[i][i - 1] - m[i][i] for i in range(1, T)]),
    }


@torch.no_grad()
def retrieval_scores(query: torch.Tensor, query_labels: torch.Tensor, gallery: torch.Tensor,
                     gallery_labels: torch.Tensor, *, same_set: bool = False) -> tuple[float, float]:
    """(top-1 nearest-neighbour accuracy, mAP) of cosine retrieval; features are L2-normalised here.

    A query whose class has no gallery sample counts as a top-1 miss and is left out of the mAP.
    same_set: query n and gallery n are one sample (query and gallery are one split), so each query is
    left out of its own gallery; otherwise a model would always find the query itself first.
    """
    if query.shape[1] != gallery.shape[1]:
        return math.nan, math.nan
    if same_set and len(query) != len(gallery):
        raise FixedclsError(f"same_set retrieval needs query and gallery of one split, got {len(query)} and {len(gallery)} samples")
    q, g = F.normalize(query.float(), dim=1), F.normalize(gallery.float(), dim=1)
    qy, gy = query_labels.long(), gallery_labels.long()
    G = len(g) - int(same_set)
    chunk = max(1, 4_000_000 // max(G, 1))
    ranks = torch.arange(1, G + 1, dtype=torch.float32)
    hits, ap_sum, ap_count = 0, 0.0, 0
    for start in range(0, len(q), chunk):
        sims = q[start:start + chunk] @ g.T
        if same_set:  # the sample itself sorts last and is cut off
            rows = torch.arange(len(sims))
            sims[rows, rows + start] = -math.inf
        order = sims.argsort(dim=1, descending=True)[:, :G]
        relevant = gy[order] == qy[start:start + chunk, None]
        hits += int(relevant[:, 0].sum()) if G else 0
        n_relevant = relevant.sum(1)
        precision = relevant.cumsum(1).float() / ranks
        ap = (precision * relevant).sum(1) / n_relevant.clamp_min(1)
        ap_sum += float(ap[n_relevant > 0].sum())
        ap_count += int((n_relevant > 0).sum())
    return hits / max(len(q), 1), (ap_sum / ap_count if ap_count else math.nan)


def verification_pairs(query_labels: torch.Tensor, gallery_labels: torch.Tensor, *, num_pairs: int = 6000,
                       seed: int = 0, same_set: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs for pair verification: (query index, gallery index, same class?), half of the same class.

    As the CoReS / CL2R code draws them: pairs of samples taken uniformly at random, kept until there are
    num_pairs // 2 of the same class and the rest of different classes. Unlike that code, the draws come from
    a seeded generator, a pair is never one sample twice (same_set: query and gallery are one split), and the
    kept pairs are shuffled so that every fold holds both kinds.
    """
    if num_pairs < 2:
        raise FixedclsError(f"{num_pairs} verification pairs: give at least 2 (the authors use 6000)")
    qy, gy = query_labels.long().cpu(), gallery_labels.long().cpu()
    classes = int(max(qy.max(), gy.max())) + 1
    own = len(qy) if same_set else 0  # pairs of a sample with itself, all of the same class
    positives = float((torch.bincount(qy, minlength=classes).double() * torch.bincount(gy, minlength=classes)).sum()) - own
    total = float(len(qy) * len(gy)) - own
    if positives <= 0:
        raise FixedclsError("no query and gallery samples share a class (or each class has one sample): "
                            "verification needs same-class pairs; choose other splits or --classes")
    if positives >= total:
        raise FixedclsError("query and gallery hold one class only: verification needs pairs of different classes; "
                            "choose more --classes")
    generator = torch.Generator().manual_seed(int(seed))
    share = positives / total
    need = {True: num_pairs // 2, False: num_pairs - num_pairs // 2}
    kept: list[tuple[torch.Tensor, torch.Tensor, bool]] = []
    while need[True] or need[False]:
        # enough draws for both quotas in one round on average; rejection keeps the authors' pair distribution
        draws = int(min(5_000_000, 1.5 * max(need[True] / share, need[False] / (1 - share)) + 1024))
        i = torch.randint(len(qy), (draws,), generator=generator)
        j = torch.randint(len(gy), (draws,), generator=generator)
        same = qy[i] == gy[j]
        usable = (i != j) if same_set else torch.ones_like(same)
        for flag in (True, False):
            chosen = (usable & (same == flag)).nonzero().squeeze(1)[:need[flag]]
            kept.append((i[chosen], j[chosen], flag))
            need[flag] -= len(chosen)
    query_index = torch.cat([q for q, _, _ in kept])
    gallery_index = torch.cat([g for _, g, _ in kept])
    same = torch.cat([torch.full((len(q),), flag) for q, _, flag in kept])
    order = torch.randperm(len(same), generator=generator)
    return query_index[order], gallery_index[order], same[order]


# The authors' threshold grid on the squared distance of L2-normalised features, which lies in [0, 4];
# i * 0.001 is what numpy's arange(0, 4, 0.001) computes.
THRESHOLDS = torch.arange(4000, dtype=torch.float64) * 0.001


def _pair_accuracies(distances: torch.Tensor, same: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Accuracy of "same class when distance < threshold" at every threshold, counted through sorted distances."""
    positive = distances[same].sort().values
    negative = distances[~same].sort().values
    true_positives = torch.searchsorted(positive, thresholds, side="left")
    true_negatives = len(negative) - torch.searchsorted(negative, thresholds, side="left")
    return (true_positives + true_negatives).double() / max(len(distances), 1)


@torch.no_grad()
def verification_accuracy(query: torch.Tensor, gallery: torch.Tensor, same: torch.Tensor, *, folds: int = 10) -> float:
    """k-fold pair-verification accuracy of paired features (row n of query with row n of gallery).

    The CoReS / CL2R protocol (their eval.py, after insightface): the squared distance of the L2-normalised
    features; the pairs in `folds` consecutive folds; for each fold, the threshold of THRESHOLDS with the best
    accuracy on the other folds (the smallest on a tie), and the accuracy of "same class when distance <
    threshold" on the fold itself; the mean over the folds. NaN when the feature widths differ.
    """
    if query.shape[1] != gallery.shape[1]:
        return math.nan
    if not 2 <= folds <= len(same):
        raise FixedclsError(f"{folds} verification folds for {len(same)} pairs: give 2 to {len(same)} folds (the authors use 10)")
    q, g = F.normalize(query.float(), dim=1), F.normalize(gallery.float(), dim=1)
    distances = (q - g).pow(2).sum(1).double()
    same = same.bool()
    accuracies = []
    for held_out in torch.tensor_split(torch.arange(len(same)), folds):  # fold sizes as sklearn's KFold
        tuning = torch.ones(len(same), dtype=torch.bool)
        tuning[held_out] = False
        best = THRESHOLDS[_pair_accuracies(distances[tuning], same[tuning], THRESHOLDS).argmax()]
        accuracies.append(float(_pair_accuracies(distances[held_out], same[held_out], best.reshape(1))[0]))
    return sum(accuracies) / len(accuracies)


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


def evaluation_data_config(base, items: Sequence[str] = (), *, all_classes: bool = True):
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
                  batch_size: Optional[int] = None, metric: str = "retrieval", pairs: int = 6000, folds: int = 10,
                  pair_seed: int = 0) -> dict:
    """Embed query and gallery with every model and fill M (top-1) and M_map for t >= i; the SPEC 4 criteria.

    Query and gallery default to the test and train splits (all classes) of the first model's data config;
    `data` items change it (a conf/data preset name or key=value), `classes` restricts both sets.
    metric="verification" also fills M_verification: the `folds`-fold pair-verification accuracy of `pairs`
    query/gallery pairs drawn with `pair_seed` (verification_pairs, verification_accuracy), one pair set
    for every entry.
    """
    from .data import create_data
    from .runtime import resolve_device

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
