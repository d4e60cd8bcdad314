"""Classifier heads and losses (SPEC section 2).

Heads map features ``h [B, d]`` to logits ``[B, K]`` and share one small API used by the
model, the engine and the collapse measures::

    head.num_classes   # number of outputs (num_prototypes for a fixed head with reserved ones)
    head.dim           # input width d
    head.is_fixed      # True when the class vectors are not trained
    head.weight        # [K, d] class vectors w_c (prototypes / Linear weight / normalised cosine weight)
    head.bias          # [K] or None

``create_head(name, num_classes, dim, ...)`` builds one by name: ``"learned"``, ``"cosine"``,
or any polytope registered in ``fixedcls.polytopes`` (a ``FixedHead``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .. import polytopes
from ..errors import FixedclsError

__all__ = [
    "CRITERIA",
    "HEADS_LEARNED",
    "CosineHead",
    "DR_BALANCES",
    "DR_LENGTHS",
    "DotRegressionLoss",
    "FeatureDotRegressionLoss",
    "FeatureTap",
    "FixedHead",
    "LinearHead",
    "LogitAdjustedLoss",
    "available_heads",
    "create_criterion",
    "batch_class_lengths",
    "create_head",
    "dot_regression_loss",
]

HEADS_LEARNED = ("learned", "cosine")
NORMALIZATIONS = ("none", "l2")


def available_heads() -> list[str]:
    """Every name ``create_head`` accepts: the learned heads, then the registered polytopes."""
    return [*HEADS_LEARNED, *polytopes.available()]


def _check_normalize(normalize: str) -> str:
    if normalize not in NORMALIZATIONS:
        raise FixedclsError(
            f"unknown head normalisation {normalize!r}: use one of {', '.join(NORMALIZATIONS)}"
        )
    return normalize


def _make_scale(module: nn.Module, scale: float | None, learn_scale: bool) -> None:
    """Attach ``module.scale``: a learned scalar Parameter, or a plain float when fixed."""
    value = 1.0 if scale is None else float(scale)
    if not value > 0:
        raise FixedclsError(f"head scale must be positive, got {scale!r}: set head.scale > 0 or leave it unset")
    if learn_scale:
        module.scale = nn.Parameter(torch.tensor(value))
    else:
        # A plain float keeps a fixed scale out of the state dict and the optimizer.
        module.scale = value


class LinearHead(nn.Linear):
    """The learned baseline: a plain ``nn.Linear(dim, num_classes)`` with bias."""

    is_fixed = False

    def __init__(self, num_classes: int, dim: int, *, bias: bool = True) -> None:
        super().__init__(dim, num_classes, bias=bias)
        self.num_classes = num_classes
        self.dim = dim


class CosineHead(nn.Module):
    """Learned class vectors, logits ``s * cos(h, w_c)`` with a fixed or learned scale ``s``."""

    is_fixed = False

    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        scale: float | None = None,
        learn_scale: bool = False,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dim = dim
        self.raw_weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.normal_(self.raw_weight, std=dim**-0.5)
        self.bias = nn.Parameter(torch.zeros(num_classes)) if bias else None
        _make_scale(self, scale, learn_scale)

    @property
    def weight(self) -> torch.Tensor:
        return F.normalize(self.raw_weight, dim=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        weight = F.normalize(self.raw_weight, dim=1).to(h.dtype)
        return F.linear(F.normalize(h, dim=1) * self.scale, weight, self.bias)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}, learn_scale={isinstance(self.scale, nn.Parameter)}"


class FixedHead(nn.Module):
    """Fixed classifier whose class vectors are the vertices of a regular polytope.

    logits = s * n(h) @ W.T (+ b), with W the polytope (a persistent buffer, never a
    parameter), n the identity or L2 normalisation, s 1 / a fixed float / a learned
    scalar, and b an optional learned bias.  ``num_prototypes > num_classes`` reserves
    vertices for classes added later: the head has ``num_prototypes`` outputs from the
    start and the reserved vertices act only as negatives until their classes appear.
    """

    is_fixed = True

    def __init__(
        self,
        polytope: str,
        num_classes: int,
        dim: int | None = None,
        *,
        normalize: str = "none",
        scale: float | None = None,
        learn_scale: bool = False,
        bias: bool = False,
        seed: int = 0,
        num_prototypes: int | None = None,
    ) -> None:
        super().__init__()
        num_prototypes = num_classes if num_prototypes is None else int(num_prototypes)
        if num_prototypes < num_classes:
            raise FixedclsError(
                f"num_prototypes={num_prototypes} is smaller than num_classes={num_classes}: "
                f"set num_prototypes >= {num_classes} or leave it unset"
            )
        prototypes = polytopes.make(polytope, num_prototypes, dim, seed=seed)
        self.register_buffer("prototypes", prototypes, persistent=True)
        self.polytope = polytope
        self.seed = seed
        self.normalize = _check_normalize(normalize)
        self.num_classes = num_prototypes  # outputs, reserved prototypes included
        self.dim = prototypes.shape[1]
        self.bias = nn.Parameter(torch.zeros(num_prototypes)) if bias else None
        _make_scale(self, scale, learn_scale)
        self._feature_tap: FeatureTap | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.prototypes

    def tap_features(self) -> "FeatureTap":
        """Make every forward leave the vectors it dots with the prototypes (s * n(h)) in the returned tap,
        for a loss that needs the features as well as the logits (`FeatureDotRegressionLoss`)."""
        if self._feature_tap is None:
            self._feature_tap = FeatureTap()
        return self._feature_tap

    @property
    def num_prototypes(self) -> int:
        return self.num_classes

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.normalize == "l2":
            h = F.normalize(h, dim=1)
        h = h * self.scale
        if self._feature_tap is not None:
            self._feature_tap.features = h
        return F.linear(h, self.prototypes.to(h.dtype), self.bias)

    def extra_repr(self) -> str:
        return (
            f"polytope={self.polytope!r}, num_prototypes={self.num_classes}, dim={self.dim}, "
            f"normalize={self.normalize!r}, learn_scale={isinstance(self.scale, nn.Parameter)}, "
            f"bias={self.bias is not None}, seed={self.seed}"
        )

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Check before the parent copies anything: a checkpoint trained against other
        # prototypes would silently become a different model if loaded.
        key = prefix + "prototypes"
        if key in state_dict:
            self._check_prototypes(state_dict[key])
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _check_prototypes(self, loaded: torch.Tensor) -> None:
        mine = self.prototypes
        here = f"this head uses polytope {self.polytope!r} with K={mine.shape[0]}, d={mine.shape[1]}, seed={self.seed}"
        fix = "build the model with the checkpoint's head settings (head, num_classes / num_prototypes, dim, seed)"
        if tuple(loaded.shape) != tuple(mine.shape):
            if loaded.dim() != 2:
                raise FixedclsError(
                    f"checkpoint prototypes have shape {list(loaded.shape)}, expected [K, d]; {here}: {fix}"
                )
            differs = [
                what
                for what, a, b in (("K", loaded.shape[0], mine.shape[0]), ("d", loaded.shape[1], mine.shape[1]))
                if a != b
            ]
            raise FixedclsError(
                f"checkpoint prototypes differ in {' and '.join(differs)}: the checkpoint has "
                f"K={loaded.shape[0]}, d={loaded.shape[1]} but {here}; {fix}"
            )
        loaded32 = loaded.detach().to(device="cpu", dtype=torch.float32)
        mine32 = mine.detach().to(device="cpu", dtype=torch.float32)
        # A tolerance, not bit equality, so checkpoints saved in half precision still load.
        if torch.allclose(loaded32, mine32, rtol=0.0, atol=1e-3):
            return
        origin = _identify_prototypes(loaded32, seeds=(self.seed, *range(10)))
        if origin is None:
            described = "the checkpoint's prototypes match no built-in polytope with seeds 0-9"
        elif origin[0] == self.polytope:
            described = f"the checkpoint's prototypes are polytope {origin[0]!r} with seed={origin[1]}"
        else:
            described = f"the checkpoint's prototypes are polytope {origin[0]!r}"
            described += f" with seed={origin[1]}" if polytopes.POLYTOPES[origin[0]].seeded else ""
        raise FixedclsError(f"checkpoint prototypes differ from this head's: {described} but {here}; {fix}")


def _identify_prototypes(prototypes: torch.Tensor, seeds: tuple[int, ...]) -> tuple[str, int] | None:
    """(polytope, seed) that reproduces ``prototypes``, if any: only used to explain a mismatch."""
    num_classes, dim = prototypes.shape
    for name, spec in polytopes.POLYTOPES.items():
        for seed in dict.fromkeys(seeds if spec.seeded else seeds[:1]):
            try:
                candidate = polytopes.make(name, num_classes, dim, seed=seed)
            except ValueError:
                break
            if torch.allclose(candidate, prototypes, rtol=0.0, atol=1e-3):
                return name, seed
    return None


def create_head(
    name: str,
    num_classes: int,
    dim: int | None = None,
    *,
    normalize: str = "none",
    scale: float | None = None,
    learn_scale: bool = False,
    bias: bool | None = None,
    seed: int = 0,
    num_prototypes: int | None = None,
) -> nn.Module:
    """Build a head by name: ``"learned"``, ``"cosine"``, or a polytope name (a ``FixedHead``).

    ``bias=None`` keeps each head's default: on for ``"learned"`` (the plain
    ``nn.Linear`` baseline), off for the cosine and fixed heads.  ``normalize``,
    ``num_prototypes`` only apply to fixed heads; ``scale``/``learn_scale`` to the cosine
    and fixed heads.  ``dim=None`` is allowed only for fixed heads (the polytope's
    natural dimension).
    """
    if name in HEADS_LEARNED:
        if dim is None:
            raise FixedclsError(f"head {name!r} needs dim: pass dim (the feature width)")
        if num_prototypes not in (None, num_classes):
            raise FixedclsError(
                f"num_prototypes only applies to fixed polytope heads, not {name!r}: leave it unset"
            )
        if name == "learned":
            if normalize != "none" or scale is not None or learn_scale:
                raise FixedclsError(
                    "head 'learned' is a plain nn.Linear: leave normalize/scale/learn_scale unset or use head 'cosine'"
                )
            return LinearHead(num_classes, dim, bias=True if bias is None else bias)
        _check_normalize(normalize)  # cosine normalises anyway; only reject typos
        return CosineHead(num_classes, dim, scale=scale, learn_scale=learn_scale, bias=bool(bias))
    if name not in polytopes.POLYTOPES:
        raise FixedclsError(f"unknown head {name!r}: choose one of {', '.join(available_heads())}")
    return FixedHead(
        name,
        num_classes,
        dim,
        normalize=normalize,
        scale=scale,
        learn_scale=learn_scale,
        bias=bool(bias),
        seed=seed,
        num_prototypes=num_prototypes,
    )


# --------------------------------------------------------------------------- losses


DR_LENGTHS = ("feature", "fixed")
DR_BALANCES = ("none", "batch")


def dot_regression_loss(features: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor, *,
                        length: str = "feature", reg_lam: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    """The dot-regression loss of Yang et al. (NeurIPS 2022), as their code computes it (`methods.dot_loss`).

    ``features`` [B, d]: the vectors the prototypes are dotted with (after the BatchNorm, and after the
    head's normalisation and scale if it has them); ``prototypes`` [K, d], of any lengths (``head.prototypes``,
    or those rows scaled per class as `batch_class_lengths` gives); ``labels`` [B] class ids, or soft targets
    [B, K] (mixup), whose per-class terms are weighted by their share.  Per sample, with L the target length,
    l_i = (1/2) (w_y . h_i - ||w_y|| L_i)^2 / L_i, and the loss is the mean over the batch plus
    ``reg_lam`` * mean_i ||h_i||.

    ``length="feature"``: L_i = ||h_i||, detached (the authors' H_length, clamped at 1e-8), so the gradient
    ||w_y|| (cos_i - 1) w_y turns h towards its prototype and lets it grow; ``length="fixed"``: L_i = ``scale`` (the paper's constant
    sqrt(E_H); for features normalised to length s this equals the feature form).
    """
    if length not in DR_LENGTHS:
        raise FixedclsError(f"unknown dot-regression length {length!r}: use one of {', '.join(DR_LENGTHS)}")
    h = features.float()
    w = prototypes.to(device=h.device, dtype=torch.float32)
    if length == "feature":
        target_length = h.detach().norm(dim=1).clamp_min(1e-8)
    else:
        if not scale > 0:
            raise FixedclsError(f"dot regression with length='fixed' needs a positive scale, got {scale!r}")
        target_length = h.new_full((h.shape[0],), float(scale))
    # The prototypes are constants of the loss (a buffer); the authors take their lengths under no_grad too.
    w_length = w.detach().norm(dim=1)
    if labels.is_floating_point():
        dots = h @ w.T  # [B, K]: every class's term, weighted by the soft target below
        per_class = (dots - w_length * target_length[:, None]).pow(2) / (2.0 * target_length[:, None])
        loss = (labels.to(per_class) * per_class).sum(1).mean()
    else:
        labels = labels.long()
        dot = (h * w[labels]).sum(1)
        loss = ((dot - w_length[labels] * target_length).pow(2) / (2.0 * target_length)).mean()
    if reg_lam:
        loss = loss + reg_lam * h.norm(dim=1).mean()
    return loss


def batch_class_lengths(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[K] prototype lengths sqrt(gamma / n_c) of a batch (the authors' `produce_Ew`, on by default in their
    dot-regression runs): n_c the batch's count of class c, gamma = B / (classes present); absent classes
    keep length 1.  Soft targets count by their column sums, which are the label counts under timm's
    whole-batch mixup and cutmix (the batch mixed with its own permutation)."""
    if target.is_floating_point():
        counts = target.detach().float().sum(0)
    else:
        counts = torch.bincount(target.detach().long(), minlength=num_classes).float()
    present = counts > 1e-6
    gamma = counts.sum() / present.sum().clamp_min(1)
    lengths = torch.ones_like(counts)
    lengths[present] = (gamma / counts[present]).sqrt()
    return lengths


class DotRegressionLoss(nn.Module):
    """Dot regression with the feature length fixed (``trainer.dr_length=fixed``), for fixed unit prototypes.

    The paper fixes the feature length, ||h|| = sqrt(E_H), and the prototype length, ||w|| = sqrt(E_W), and
    regresses the target dot product onto its maximum:
    L = mean_i (w_{y_i} . h_i - sqrt(E_W E_H))^2 / (2 sqrt(E_W E_H)).
    Here the head L2-normalises h and multiplies it by the fixed scale s, so E_H = s^2 and E_W = 1, and
    ``logits[i, y_i]`` is exactly w_{y_i} . h_i:  L = mean_i (logit_i - s)^2 / (2 s) = (s / 2) mean_i (cos_i - 1)^2.
    The loss is computed from the logits alone and plugs in wherever cross-entropy does.  A learned scale
    is refused: the feature length is a constant of the loss (a learned one would shrink s to zero).
    Soft targets (mixed batches) weight each class's term by its share of the target.  ``balance="batch"``
    gives class c the prototype length e_c of `batch_class_lengths`, which multiplies its terms by e_c^2.
    """

    def __init__(self, scale: Callable[[], float | torch.Tensor], balance: str = "none") -> None:
        super().__init__()
        # A callable, not the head itself, so the head is not registered as a submodule
        # of the loss (it would appear twice in parameters(), state_dict(), .to()).
        self._scale = scale
        self.balance = balance

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        length = float(self._scale())  # sqrt(E_W E_H)
        logits = logits.float()
        weights = batch_class_lengths(target, logits.shape[1]).pow(2) if self.balance == "batch" else None
        if target.is_floating_point():
            # Soft targets [B, K] (mixup / cutmix): the loss expected under the target distribution,
            # sum_k t_k (logit_k - s)^2 / (2 s); a mixed pair gives lam * L(a) + (1 - lam) * L(b).
            share = target.float() if weights is None else target.float() * weights
            return (share * (logits - length).pow(2)).sum(1).mean() / (2.0 * length)
        target = target.long()
        terms = (logits.gather(1, target.unsqueeze(1)).squeeze(1) - length).pow(2)
        if weights is not None:
            terms = terms * weights[target]
        return terms.mean() / (2.0 * length)


class FeatureTap:
    """Where a `FixedHead` leaves the features of its latest forward, for the loss that reads them next.

    The training loop, the evaluation and `fixedcls-evaluate` call every criterion as ``criterion(logits,
    target)`` right after the forward that made the logits; the feature form of dot regression needs ||h||
    too, which the logits do not hold (h has components outside the prototypes' span).  A copy of the head
    (``copy.deepcopy``: the EMA model, a distillation teacher) shares the tap, so its evaluation feeds the
    same loss.  The loss takes the features out, so a tap never serves one forward twice."""

    def __init__(self) -> None:
        self.features: torch.Tensor | None = None

    def take(self, batch: int) -> torch.Tensor:
        features, self.features = self.features, None
        if features is None or features.shape[0] != batch:
            raise FixedclsError(
                "dot regression with trainer.dr_length=feature reads the features of the head's latest forward, "
                f"but {'none were left' if features is None else f'they hold {features.shape[0]} samples'} for "
                f"these {batch} logits: call the loss right after the forward of the model built with it"
            )
        return features

    def __deepcopy__(self, memo: dict) -> "FeatureTap":
        return self

    def __getstate__(self) -> dict:
        return {"features": None}  # a pickled head carries no batch of features


class FeatureDotRegressionLoss(nn.Module):
    """Dot regression with the target length the detached feature length (``trainer.dr_length=feature``), as
    Yang et al.'s code trains it: `dot_regression_loss` on the features the head dotted with its prototypes
    (taken from the head's `FeatureTap`), optionally with their batch-balanced prototype lengths and the
    length penalty ``reg_lam``.  The logits only predict (argmax of w_c . h)."""

    def __init__(self, head: "FixedHead", *, reg_lam: float = 0.0, balance: str = "none") -> None:
        super().__init__()
        self._tap = head.tap_features()
        # Callables, not the head: the head must not become a submodule of the loss (see DotRegressionLoss).
        self._prototypes = lambda: head.prototypes
        self.reg_lam = float(reg_lam)
        self.balance = balance

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        features = self._tap.take(logits.shape[0])
        prototypes = self._prototypes().to(device=features.device, dtype=torch.float32)
        if self.balance == "batch":
            prototypes = prototypes * batch_class_lengths(target, prototypes.shape[0]).to(prototypes.device)[:, None]
        return dot_regression_loss(features, target, prototypes, length="feature", reg_lam=self.reg_lam)


class LogitAdjustedLoss(nn.Module):
    """Logit-adjusted cross-entropy (Menon et al., ICLR 2021): CE(logits + tau * log(prior), y), with the prior
    the training class frequencies.  Training against the adjusted logits makes the raw logits, which predict,
    estimate the balanced (per-class averaged) error: the class-balanced baseline for a learned head."""

    def __init__(self, class_counts: list[int], tau: float = 1.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        # A head output without training samples (a reserved prototype, a class of a later task) gets the prior
        # of a class with one sample: a finite offset, where log(0) would push that logit to -inf.
        counts = torch.as_tensor(class_counts, dtype=torch.float64).clamp_min(1.0)
        self.register_buffer("offsets", (tau * torch.log(counts / counts.sum())).float(), persistent=False)
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        adjusted = logits.float() + self.offsets.to(logits.device)
        return F.cross_entropy(adjusted, target, label_smoothing=self.label_smoothing)


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


def hoc_loss(feat_new: torch.Tensor, feat_old: torch.Tensor, labels: torch.Tensor, mu: float = 10.0) -> torch.Tensor:
    """The higher-order compatibility loss (HOC) of Biondi et al., CVPR 2024, Eq. 4, as their code computes it
    (`HocLoss` in miccunifi/iamcl2r, SPEC section 4).

    With F_old and F_new the L2-normalised features of one batch from the old and the new model and
    S = mu F_old F_new^T: HOC = mean_i [ -S_ii + logsumexp_j S'_ij ], where S' is S with every entry of i's own
    class (the diagonal included) set to 0. The features are normalised here, so raw features may be passed.
    """
    new = F.normalize(feat_new.float(), dim=1)
    old = F.normalize(feat_old.float(), dim=1)
    similarity = mu * old @ new.T
    same_class = labels.reshape(-1, 1) == labels.reshape(1, -1)
    # The authors multiply S by the mask of the other classes: a same-class entry becomes 0, so it still adds
    # exp(0) = 1 to the sum (it is not left out, as -inf would do). Kept so that the loss is theirs.
    negatives = similarity.masked_fill(same_class, 0.0)
    return (torch.logsumexp(negatives, dim=1) - similarity.diagonal()).mean()


class HocDistillation:
    """extra_loss(x, features, y) = (1 - lambda) * HOC(h_new, h_old, y), h_old from a frozen old model; the loop
    weighs its criterion by `criterion_weight` = lambda, so the training loss is lambda CE + (1 - lambda) HOC
    (the authors' Eq. 3)."""

    def __init__(self, teacher: nn.Module, mu: float = 10.0, lam: float = 0.1):
        self.teacher, self.mu, self.criterion_weight = teacher, float(mu), float(lam)

    def __call__(self, x: torch.Tensor, features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            old = self.teacher.forward_features(x)
        return (1.0 - self.criterion_weight) * hoc_loss(features, old, y, self.mu)


class BackwardCompatibleLoss:
    """BCT (Shen et al., CVPR 2020): extra_loss(x, features, y) = weight * CE(old_head(h_new), y) over the samples
    of the classes the old model knows, its classifier frozen; the logits are the old head's outputs of those
    classes (its classifier had no others). With a fixed head whose prototypes the new model shares, the old head
    is the new one: the term is cross-entropy against the same prototypes over the old classes."""

    def __init__(self, old_head: nn.Module, weight: float, classes: list[int]):
        self.old_head, self.weight = old_head, float(weight)
        self.classes = torch.tensor(sorted({int(c) for c in classes}), dtype=torch.long)

    def __call__(self, x: torch.Tensor, features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        classes = self.classes.to(y.device)
        known = torch.isin(y, classes)
        if not bool(known.any()):  # a batch of new classes only: nothing of the old classifier to agree with
            return features.sum() * 0.0
        logits = self.old_head(features[known]).float()[:, classes]
        return self.weight * F.cross_entropy(logits, torch.searchsorted(classes, y[known]))


class ExtraLosses:
    """Several extra losses as one extra_loss(x, features, y): their sum. `criterion_weight`: the weight the loop
    gives its criterion, the product of the parts' own (lambda with HOC, else 1)."""

    def __init__(self, parts: list[Callable]):
        self.parts = list(parts)
        self.criterion_weight = 1.0
        for part in self.parts:
            self.criterion_weight *= float(getattr(part, "criterion_weight", 1.0))

    def __call__(self, x: torch.Tensor, features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return sum(part(x, features, y) for part in self.parts)


CRITERIA = ("ce", "dot_regression")


def create_criterion(name: str, head: nn.Module, label_smoothing: float = 0.0, *, logit_adjust: float = 0.0,
                     class_counts: list[int] | None = None, dr_length: str = "feature", dr_reg: float = 0.0,
                     dr_balance: str = "none") -> nn.Module:
    """Loss ``fn(logits, target) -> scalar`` by name: ``"ce"`` or ``"dot_regression"``.

    ``logit_adjust`` > 0 (tau) with ``class_counts`` (training samples per head output): the logit-adjusted
    cross-entropy, for ``"ce"`` only.  ``dr_length`` (``"feature"``: `FeatureDotRegressionLoss`, ``"fixed"``:
    `DotRegressionLoss`), ``dr_reg`` (reg_lam) and ``dr_balance`` (``"none"`` or ``"batch"``, the authors'
    per-batch prototype lengths): dot regression only."""
    if logit_adjust and name != "ce":
        raise FixedclsError(f"trainer.logit_adjust={logit_adjust} adjusts cross-entropy, not loss {name!r}: "
                            f"set trainer.logit_adjust=0 or trainer.loss=ce")
    if name != "dot_regression" and (dr_reg or dr_balance != "none"):
        which = f"trainer.dr_reg={dr_reg}" if dr_reg else f"trainer.dr_balance={dr_balance}"
        raise FixedclsError(f"{which} applies to loss 'dot_regression', not {name!r}: set trainer.loss=dot_regression "
                            f"or leave it out (trainer.dr_reg=0, trainer.dr_balance=none)")
    if name == "ce" and logit_adjust:
        if class_counts is None or len(class_counts) != head.num_classes:
            raise FixedclsError(f"trainer.logit_adjust needs the training count of each of the head's {head.num_classes} "
                                f"outputs: pass class_counts")
        return LogitAdjustedLoss(list(class_counts), logit_adjust, label_smoothing)
    if name == "ce":
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    if name == "dot_regression":
        _check_dot_regression(head, label_smoothing, dr_length, dr_reg, dr_balance)
        if dr_length == "fixed":
            return DotRegressionLoss(lambda: head.scale, balance=dr_balance)
        return FeatureDotRegressionLoss(head, reg_lam=dr_reg, balance=dr_balance)
    raise FixedclsError(f"unknown loss {name!r}: choose one of {', '.join(CRITERIA)}")


def _check_dot_regression(head: nn.Module, label_smoothing: float, length: str, reg: float, balance: str) -> None:
    """One line for each combination with which dot regression cannot train."""
    if length not in DR_LENGTHS:
        raise FixedclsError(f"unknown trainer.dr_length={length!r}: choose one of {', '.join(DR_LENGTHS)}")
    if balance not in DR_BALANCES:
        raise FixedclsError(f"unknown trainer.dr_balance={balance!r}: choose one of {', '.join(DR_BALANCES)}")
    if not reg >= 0:
        raise FixedclsError(f"trainer.dr_reg={reg} is negative: it weighs the mean feature length, use 0 or more")
    if not isinstance(head, FixedHead):
        raise FixedclsError(
            f"loss 'dot_regression' needs a fixed polytope head (e.g. head=etf), got {type(head).__name__}: "
            "use a fixed head or loss=ce"
        )
    if head.bias is not None:
        raise FixedclsError(
            "loss 'dot_regression' regresses w_y . h, which a head bias would leave out of the loss but add to the "
            "logits that predict: set head.bias=false"
        )
    if length == "fixed" and head.normalize != "l2":
        raise FixedclsError(
            f"trainer.dr_length=fixed holds the feature length at head.scale, which needs normalize='l2', got "
            f"normalize={head.normalize!r}: set head.normalize=l2, or trainer.dr_length=feature (the authors' form)"
        )
    if length == "fixed" and reg:
        raise FixedclsError(
            f"trainer.dr_reg={reg} penalises the feature length, which trainer.dr_length=fixed holds constant: "
            "set trainer.dr_reg=0, or trainer.dr_length=feature"
        )
    if label_smoothing:
        raise FixedclsError(
            f"label_smoothing={label_smoothing} has no meaning for loss 'dot_regression': set it to 0 or use loss=ce"
        )
    if isinstance(head.scale, nn.Parameter):
        raise FixedclsError(
            "loss 'dot_regression' leaves the scale of the features to the loss, but head.learn_scale=true would "
            "learn it (and shrink it to 0): set head.learn_scale=false"
        )
