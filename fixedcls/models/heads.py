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
    "DotRegressionLoss",
    "FixedHead",
    "LinearHead",
    "LogitAdjustedLoss",
    "available_heads",
    "create_criterion",
    "create_head",
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

    @property
    def weight(self) -> torch.Tensor:
        return self.prototypes

    @property
    def num_prototypes(self) -> int:
        return self.num_classes

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.normalize == "l2":
            h = F.normalize(h, dim=1)
        return F.linear(h * self.scale, self.prototypes.to(h.dtype), self.bias)

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


class DotRegressionLoss(nn.Module):
    """Dot-regression loss of Yang et al. (NeurIPS 2022), in the paper's form, for fixed unit prototypes.

    The paper fixes the feature length, ||h|| = sqrt(E_H), and the prototype length, ||w|| = sqrt(E_W), and
    regresses the target dot product onto its maximum:
    L = mean_i (w_{y_i} . h_i - sqrt(E_W E_H))^2 / (2 sqrt(E_W E_H)).
    Here the head L2-normalises h and multiplies it by the fixed scale s, so E_H = s^2 and E_W = 1, and
    ``logits[i, y_i]`` is exactly w_{y_i} . h_i:  L = mean_i (logit_i - s)^2 / (2 s) = (s / 2) mean_i (cos_i - 1)^2.
    The loss is computed from the logits alone and plugs in wherever cross-entropy does.  A learned scale
    is refused: the feature length is a constant of the loss (a learned one would shrink s to zero).
    Soft targets (mixed batches) weight each class's term by its share of the target.
    """

    def __init__(self, scale: Callable[[], float | torch.Tensor]) -> None:
        super().__init__()
        # A callable, not the head itself, so the head is not registered as a submodule
        # of the loss (it would appear twice in parameters(), state_dict(), .to()).
        self._scale = scale

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        length = float(self._scale())  # sqrt(E_W E_H)
        if target.is_floating_point():
            # Soft targets [B, K] (mixup / cutmix): the loss expected under the target distribution,
            # sum_k t_k (logit_k - s)^2 / (2 s); a mixed pair gives lam * L(a) + (1 - lam) * L(b).
            return (target.float() * (logits.float() - length).pow(2)).sum(1).mean() / (2.0 * length)
        target_logit = logits.float().gather(1, target.long().unsqueeze(1)).squeeze(1)
        return (target_logit - length).pow(2).mean() / (2.0 * length)


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
                     class_counts: list[int] | None = None) -> nn.Module:
    """Loss ``fn(logits, target) -> scalar`` by name: ``"ce"`` or ``"dot_regression"``.

    ``logit_adjust`` > 0 (tau) with ``class_counts`` (training samples per head output): the logit-adjusted
    cross-entropy, for ``"ce"`` only."""
    if logit_adjust and name != "ce":
        raise FixedclsError(f"trainer.logit_adjust={logit_adjust} adjusts cross-entropy, not loss {name!r}: "
                            f"set trainer.logit_adjust=0 or trainer.loss=ce")
    if name == "ce" and logit_adjust:
        if class_counts is None or len(class_counts) != head.num_classes:
            raise FixedclsError(f"trainer.logit_adjust needs the training count of each of the head's {head.num_classes} "
                                f"outputs: pass class_counts")
        return LogitAdjustedLoss(list(class_counts), logit_adjust, label_smoothing)
    if name == "ce":
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    if name == "dot_regression":
        if not isinstance(head, FixedHead):
            raise FixedclsError(
                f"loss 'dot_regression' needs a fixed polytope head (e.g. head=etf), got {type(head).__name__}: "
                "use a fixed head or loss=ce"
            )
        if head.normalize != "l2" or head.bias is not None:
            raise FixedclsError(
                f"loss 'dot_regression' needs a fixed head with normalize='l2' and no bias, got "
                f"normalize={head.normalize!r}, bias={head.bias is not None}: set head.normalize=l2 and head.bias=false"
            )
        if label_smoothing:
            raise FixedclsError(
                f"label_smoothing={label_smoothing} has no meaning for loss 'dot_regression': set it to 0 or use loss=ce"
            )
        if isinstance(head.scale, nn.Parameter):
            raise FixedclsError(
                "loss 'dot_regression' keeps the feature length constant (head.scale), but head.learn_scale=true "
                "would learn it (and shrink it to 0): set head.learn_scale=false"
            )
        return DotRegressionLoss(lambda: head.scale)
    raise FixedclsError(f"unknown loss {name!r}: choose one of {', '.join(CRITERIA)}")
