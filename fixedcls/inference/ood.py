"""Out-of-distribution (OOD) detection with a trained classifier: how well its scores tell the samples of its
own data (in-distribution, ID) from samples of other data, and ``nc5``, how orthogonal the mean OOD feature is
to the class means.

    import fixedcls
    from fixedcls.inference.ood import detect_ood, ood_dataset
    trained = fixedcls.load("checkpoints/digits-resnet18-simplex-s0")
    ood = ood_dataset(["/data/other_images"], trained.config["data"], trained.preprocessing)
    report = detect_ood(trained.model, id_loader, DataLoader(ood, batch_size=256), train_loader, device="cpu")

Scores, each higher for a sample that looks in-distribution (z the logits, h the features):

* ``msp``: max_k softmax(z)_k, the maximum softmax probability (Hendrycks & Gimpel, ICLR 2017);
* ``max_logit``: max_k z_k (Hendrycks et al., ICML 2022);
* ``energy``: logsumexp_k z_k, the negative free energy at temperature 1 (Liu et al., NeurIPS 2020);
* ``neco``: ||P (h - m)|| / ||h||, P the projection onto the top principal components of the TRAINING
  features and m their mean (Ammar et al., ICLR 2024; like their code, which takes scikit-learn's
  PCA.transform, the projection is of the feature centred at the training mean).  K - 1 components by
  default (the dimension of a collapsed simplex), at most d.

Per score: ``auroc``, the area under the ROC curve with the ID samples as positives (0.5: no better than
chance), and ``fpr95``, the share of OOD samples scored at or above the highest threshold that keeps at least
95% of the ID samples (the first point of scikit-learn's ROC curve with TPR >= 0.95).
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ..collapse.stats import nc5 as nc5_of, ood_sums
from ..errors import FixedclsError
from ..runtime import autocast_dtype_of, rng_state, set_rng_state, unwrap
from .loading import ImageFileDataset, ImageTransform, find_images, read_image

SCORES: tuple[str, ...] = ("msp", "max_logit", "energy", "neco")
TPR_LEVEL = 0.95
_F64 = torch.float64


# --------------------------------------------------------------------------------------------- the scores


def logit_scores(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """``msp``, ``max_logit`` and ``energy`` of logits [B, K], float64 [B] each."""
    z = logits.detach().to(_F64)
    top = z.max(dim=1).values
    lse = torch.logsumexp(z, dim=1)
    return {"msp": torch.exp(top - lse), "max_logit": top, "energy": lse}


class PrincipalSubspace:
    """The mean and top principal directions of a stream of features (float64, O(d^2) memory).

    Sums are taken around the mean of the first batch, so the covariance (1/n) sum (h - m)(h - m)^T is well
    conditioned at any offset: sum (h - s)(h - s)^T - n (m - s)(m - s)^T with s close to m."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        kw = {"dtype": _F64, "device": torch.device(device)}
        self.dim, self.count = int(dim), 0
        self.shift: Optional[torch.Tensor] = None
        self.sums = torch.zeros(self.dim, **kw)
        self.scatter = torch.zeros(self.dim, self.dim, **kw)

    @torch.no_grad()
    def update(self, h: torch.Tensor) -> None:
        h64 = h.detach().to(self.sums.device, _F64)
        if self.shift is None:
            self.shift = h64.mean(dim=0)
        z = h64 - self.shift
        self.sums += z.sum(dim=0)
        self.scatter.addmm_(z.T, z)
        self.count += h64.shape[0]

    def top(self, components: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean [d], basis [d, components]): the top ``components`` eigenvectors of the covariance."""
        if self.count == 0 or self.shift is None:
            raise FixedclsError("NECO needs training features: the training split yielded no samples")
        delta = self.sums / self.count
        covariance = self.scatter / self.count - torch.outer(delta, delta)
        _, vectors = torch.linalg.eigh(0.5 * (covariance + covariance.T))  # ascending eigenvalues
        return self.shift + delta, vectors[:, -components:].flip(1)


def neco_score(features: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """NECO of features [B, d]: ||(h - mean) @ basis|| / ||h||, float64 [B]."""
    h = features.detach().to(_F64)
    projected = torch.linalg.vector_norm((h - mean) @ basis, dim=1)
    return projected / torch.linalg.vector_norm(h, dim=1).clamp_min(torch.finfo(_F64).tiny)


# --------------------------------------------------------------------------------------------- the figures


def _labelled(id_scores, ood_scores):
    import numpy as np

    id_scores = torch.as_tensor(id_scores, dtype=_F64).cpu().numpy()
    ood_scores = torch.as_tensor(ood_scores, dtype=_F64).cpu().numpy()
    if id_scores.size == 0 or ood_scores.size == 0:
        raise FixedclsError("OOD detection needs samples of both the in-distribution split and the OOD data")
    return np.concatenate([np.ones(id_scores.size), np.zeros(ood_scores.size)]), np.concatenate([id_scores, ood_scores])


def auroc(id_scores, ood_scores) -> float:
    """Area under the ROC curve, ID samples the positives (a tie counts half)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(*_labelled(id_scores, ood_scores)))


def fpr_at_tpr(id_scores, ood_scores, tpr: float = TPR_LEVEL) -> float:
    """The false-positive rate (share of OOD samples accepted) at the highest threshold whose true-positive rate
    (share of ID samples accepted, score >= threshold) is at least ``tpr``."""
    import numpy as np
    from sklearn.metrics import roc_curve

    fpr, tpr_curve, _ = roc_curve(*_labelled(id_scores, ood_scores), drop_intermediate=False)
    return float(fpr[int(np.searchsorted(tpr_curve, tpr, side="left"))])


# --------------------------------------------------------------------------------------------- the data


class OODImages(ImageFileDataset):
    """Image files through a model's evaluation transform, as (input, -1): OOD samples have no class (and an
    unreadable file is an error, not a skipped sample)."""

    def __getitem__(self, index: int):
        return self.transform(read_image(self.files[index])), -1


def ood_dataset(source: str | Sequence[str], data_cfg, preprocessing: dict, *, what: str = "--ood"):
    """(dataset, description) of an OOD source: a folder of images (found recursively, read through the model's
    own evaluation transform ``preprocessing``), or data presets / key=value items applied to the model's data
    config ``data_cfg`` as ``--data`` applies them (its test split).  ``what`` names the setting in errors."""
    from ..config import conf_dir

    items = source.split() if isinstance(source, str) and not Path(source).expanduser().is_dir() else (
        [source] if isinstance(source, str) else [str(item) for item in source])
    if not items:
        raise FixedclsError(f"{what} is empty: give a folder of images or a data preset")
    folder = Path(items[0]).expanduser()
    if len(items) == 1 and folder.is_dir():
        files = find_images([folder])
        if not files:
            raise FixedclsError(f"{what} {folder}: no image files in that folder: give a folder of images "
                                f"(.png, .jpg, ...) or a data preset")
        return OODImages(files, ImageTransform(preprocessing)), f"image folder {folder} ({len(files)} images)"
    presets = sorted(p.stem for p in (conf_dir() / "data").glob("*.yaml"))
    for item in items:
        if "=" not in item and item not in presets:
            raise FixedclsError(f"{what} {item}: neither a folder nor a data preset: give an existing folder of "
                                f"images, or one of {', '.join(presets)} (with key=value items if needed)")
    from ..data.datasets import create_data, evaluation_split
    from ..runs.stored import evaluation_data_config

    try:
        cfg = evaluation_data_config(data_cfg, items, all_classes=True)
    except FixedclsError as error:  # its lines name --data, the flag of the evaluated split
        raise FixedclsError(str(error).replace("--data ", f"{what} ", 1)) from None
    bundle = create_data(cfg)
    channels = int(preprocessing["input_size"][0])
    if bundle.in_chans != channels:
        raise FixedclsError(f"{what} {' '.join(items)}: the model takes {channels}-channel images but this data has "
                            f"{bundle.in_chans}: add in_chans={channels}")
    dataset = evaluation_split(bundle, "test")
    return dataset, f"{cfg.name} test split ({len(dataset)} samples)"


def ood_loader(source: str | Sequence[str], data_cfg, preprocessing: dict, *, batch_size: int, num_workers: int = 0,
               rank: int = 0, world_size: int = 1, what: str = "collapse.ood"):
    """(loader, description) of an OOD source (see :func:`ood_dataset`), in a fixed order, sharded without
    padding across ``world_size`` processes; its workers end with each pass (it runs once per measured epoch)."""
    from torch.utils.data import DataLoader

    from ..data.loaders import EpochSampler

    dataset, description = ood_dataset(source, data_cfg, preprocessing, what=what)
    sampler = EpochSampler(len(dataset), shuffle=False, rank=rank, world_size=world_size) if world_size > 1 else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=sampler, num_workers=num_workers), description


def ood_loader_of_run(source: str | Sequence[str], meta: dict, *, world=None):
    """(loader, description) of a training run's ``collapse.ood``: read with the run's own data config and
    evaluation preprocessing, the ``config`` and ``inference`` entries its checkpoints store (a TrainingRun's
    ``checkpoint_meta``), sharded across the ranks of ``world``.  Every random stream is restored afterwards
    (building a data preset may draw from them), so the run trains as it would without ``collapse.ood``."""
    config, inference = meta.get("config") or {}, meta.get("inference") or {}
    if "data" not in config or "preprocessing" not in inference:
        raise FixedclsError("collapse.ood needs the run's data config and preprocessing (the 'config' and 'inference' "
                            "entries build_training puts in checkpoint_meta): build the run with build_training")
    data = config["data"]
    streams = rng_state()
    try:
        return ood_loader(source, data, inference["preprocessing"], batch_size=int(data.get("eval_batch_size") or 256),
                          num_workers=int(data.get("num_workers") or 0), rank=getattr(world, "rank", 0),
                          world_size=getattr(world, "world_size", 1))
    finally:
        set_rng_state(streams)


# --------------------------------------------------------------------------------------------- detection


def _outputs(model: nn.Module, loader, device: torch.device, amp):
    """(logits, features) of each batch of a loader of (inputs, labels, ...) tuples, under no_grad/eval."""
    for batch in loader:
        x, y = (batch[0], batch[1]) if isinstance(batch, (list, tuple)) else (batch, None)
        with torch.no_grad(), (torch.autocast(device_type=device.type, dtype=amp) if amp is not None else nullcontext()):
            logits, h = model(x.to(device, non_blocking=True), return_features=True)
        yield logits.float(), h.float(), y


def detect_ood(model: nn.Module, id_loader, ood_loader, train_loader, *, device: torch.device | str = "cpu",
               components: Optional[int] = None, autocast_dtype=None) -> dict:
    """AUROC and FPR95 of each score of :data:`SCORES` (``id_loader``'s samples against ``ood_loader``'s), and
    ``nc5`` of the ID split's class means against the mean OOD feature.

    ``train_loader``: the training split without augmentation, whose features give NECO's principal
    components (``components`` of them, default min(K - 1, d)).  The loaders yield (inputs, labels, ...); the
    OOD labels are ignored.  Returns ``{"scores": {score: {"auroc", "fpr95"}}, "nc5", "neco_components",
    "id_samples", "ood_samples"}``; the train/eval state of every submodule is restored."""
    device = torch.device(device)
    amp = autocast_dtype_of(autocast_dtype)
    core = unwrap(model)
    num_classes, dim = core.head.weight.shape
    k = min(num_classes - 1, dim) if components is None else int(components)
    if not 1 <= k <= dim:
        raise FixedclsError(f"NECO components must lie in [1, {dim}] (the feature dimension), got {k}: "
                            f"pass --neco-dim between 1 and {dim}, or leave it out for min(K - 1, d)")
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        subspace = PrincipalSubspace(dim, device)
        for _, h, _ in _outputs(model, train_loader, device, amp):
            subspace.update(h)
        mean, basis = subspace.top(k)
        scores = {"id": {name: [] for name in SCORES}, "ood": {name: [] for name in SCORES}}
        class_sums = torch.zeros(num_classes, dim, dtype=_F64, device=device)
        class_counts = torch.zeros(num_classes, dtype=_F64, device=device)
        ood = torch.zeros(dim + 1, dtype=_F64, device=device)  # feature sum and count, as collapse.ood_sums
        for side, loader in (("id", id_loader), ("ood", ood_loader)):
            for logits, h, y in _outputs(model, loader, device, amp):
                batch_scores = {**logit_scores(logits), "neco": neco_score(h, mean, basis)}
                for name in SCORES:
                    scores[side][name].append(batch_scores[name].cpu())
                if side == "id":
                    y = torch.as_tensor(y).to(device, torch.long)
                    class_sums.index_add_(0, y, h.to(_F64))
                    class_counts += torch.bincount(y, minlength=num_classes).to(_F64)
                else:
                    ood += ood_sums(h, dim, device)
    finally:
        for m, flag in modes:
            m.training = flag
    joined = {side: {name: torch.cat(values) if values else torch.zeros(0, dtype=_F64) for name, values in per.items()}
              for side, per in scores.items()}
    ood_count = int(ood[-1])
    present = class_counts > 0
    report = {"scores": {name: {"auroc": auroc(joined["id"][name], joined["ood"][name]),
                                "fpr95": fpr_at_tpr(joined["id"][name], joined["ood"][name])} for name in SCORES},
              "nc5": nc5_of(class_sums[present] / class_counts[present].unsqueeze(1), ood[:-1] / max(ood_count, 1)),
              "neco_components": k, "id_samples": int(class_counts.sum()), "ood_samples": ood_count}
    return report


def format_ood(report: dict, title: str = "") -> str:
    """The figures of :func:`detect_ood` as a small table."""
    lines = [title] if title else []
    lines.append(f"  {'score':<10} {'AUROC':>7} {'FPR95':>7}")
    for name in SCORES:
        figures = report["scores"][name]
        lines.append(f"  {name:<10} {figures['auroc']:>7.4f} {figures['fpr95']:>7.4f}"
                     + (f"   (on {report['neco_components']} principal components)" if name == "neco" else ""))
    nc5 = report["nc5"]
    lines.append(f"  nc5 {nc5:.4g}" if math.isfinite(nc5) else "  nc5 n/a")
    return "\n".join(lines)
