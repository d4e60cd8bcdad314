"""Compatibility criteria (SPEC section 4): the retrieval scores of one query/gallery pair of models, AC,
AC_ties, AM, BC and FC of a matrix, pair verification as the CoReS / CL2R code measures it, and the
class split of generations.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import FixedclsError


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
    AC_per_task / AC_ties_per_task: AC / AC_ties of the first k models (the leading k x k block of M), for
    k = 2 .. T: how compatibility stood after each task (`AC_per_task` of the authors' iamcl2r code).
    Missing entries (None / NaN: models whose features cannot be compared) fail AC and make the means NaN.
    """
    T = len(M)
    _check_two_models(T)
    m = [[math.nan if (v := (M[t][i] if i < len(M[t]) else None)) is None else float(v) for i in range(t + 1)] for t in range(T)]
    pairs = [(t, i) for t in range(T) for i in range(t)]
    strict = {(t, i): float(m[t][i] > m[i][i]) for t, i in pairs}
    # a comparison with NaN is False, so `not <` passes a missing entry, as the authors' code does
    ties = {(t, i): float(not m[t][i] < m[i][i]) for t, i in pairs}
    return {
        "AC": _mean(list(strict.values())),
        "AC_ties": _mean(list(ties.values())),
        "AC_per_task": [_mean([strict[t, i] for t, i in pairs if t < k]) for k in range(2, T + 1)],
        "AC_ties_per_task": [_mean([ties[t, i] for t, i in pairs if t < k]) for k in range(2, T + 1)],
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
