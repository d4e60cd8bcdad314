"""How well a trained model classifies one split: loss, top-1/top-5, balanced and per-class accuracy, the
confusion matrix, expected calibration error, and the split's collapse measures (`fixedcls-eval` reports them).

The loss and the accuracy are computed batch by batch exactly as the training loop's evaluation does (same
criterion, same batches), so they equal the run's `test/loss` and `test/acc` of the same checkpoint.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..escaping import terminal

ECE_BINS = 15  # the usual choice (Guo et al. 2017), so figures compare with the literature


@torch.no_grad()
def collect_logits(model: nn.Module, loader, criterion: Callable, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(logits [N, K] float32 CPU, labels [N], mean loss) of a loader, the loss summed as the training loop sums it."""
    model.eval()
    logits_all, labels_all = [], []
    loss_sum, count = torch.zeros((), dtype=torch.float64), 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += criterion(logits.float(), y).double().cpu() * len(y)
        count += len(y)
        logits_all.append(logits.float().cpu())
        labels_all.append(y.long().cpu())
    return torch.cat(logits_all), torch.cat(labels_all), float(loss_sum) / max(count, 1)


def expected_calibration_error(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Sum over equal-width confidence bins of |accuracy - mean confidence| weighted by the bin's share."""
    confidence, predicted = probabilities.max(1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    # A confidence of exactly 0 belongs to the first bin; bins are (lo, hi] otherwise.
    which = torch.bucketize(confidence.double(), edges[1:-1], right=False)
    ece = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            ece += float(members.double().mean()) * abs(float(correct[members].mean()) - float(confidence[members].double().mean()))
    return ece


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, loss: float, class_names: Sequence[str]) -> dict:
    """Every figure of a split from its logits: the keys `loss`, `acc`, `top5` (K > 5), `balanced_acc`, `ece`,
    `per_class` ({name: {acc, n}}), `confusion` (rows: true class, columns: predicted; counts)."""
    num_outputs = logits.shape[1]
    predicted = logits.argmax(1)
    confusion = torch.bincount(labels * num_outputs + predicted, minlength=num_outputs * num_outputs)
    confusion = confusion.view(num_outputs, num_outputs)
    support = confusion.sum(1)
    recall = [float(confusion[c, c]) / int(support[c]) if support[c] else None for c in range(num_outputs)]
    present = [r for r in recall if r is not None]
    metrics = {
        "samples": int(len(labels)),
        "loss": float(loss),
        "acc": float((predicted == labels).double().mean()) if len(labels) else math.nan,
    }
    if num_outputs > 5:
        top5 = logits.topk(5, dim=1).indices
        metrics["top5"] = float((top5 == labels[:, None]).any(1).double().mean())
    metrics["balanced_acc"] = sum(present) / len(present) if present else math.nan
    metrics["ece"] = expected_calibration_error(logits.softmax(1), labels)
    metrics["per_class"] = {str(class_names[c]): {"acc": recall[c], "n": int(support[c])}
                            for c in range(num_outputs) if support[c]}
    metrics["confusion"] = confusion.tolist()
    return metrics


def plot_confusion(confusion: Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path, title: str) -> Path:
    """The confusion matrix as a heatmap of row-normalised shares (each true class sums to 1)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(confusion, dtype=float)
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    K = len(counts)
    size = min(12.0, 3.0 + 0.35 * K)
    figure = Figure(figsize=(size + 1, size))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(1, 1, 1)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    if K <= 30:  # beyond that, names and numbers no longer fit
        ax.set_xticks(range(K), [str(n) for n in class_names[:K]], rotation=90)
        ax.set_yticks(range(K), [str(n) for n in class_names[:K]])
        for t in range(K):
            for p in range(K):
                if counts[t, p]:
                    ax.text(p, t, str(int(counts[t, p])), ha="center", va="center", fontsize=7,
                            color="white" if shares[t, p] > 0.6 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10)
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def format_metrics(metrics: dict, collapse: Optional[dict] = None, max_classes: int = 10) -> str:
    """A one-screen table: headline figures, collapse measures, and the per-class accuracies (the worst ones
    when there are more than `max_classes`)."""
    def pct(value) -> str:
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}%"

    lines = [f"loss {metrics['loss']:.4f}   top-1 {pct(metrics['acc'])}"
             + (f"   top-5 {pct(metrics['top5'])}" if "top5" in metrics else "")
             + f"   balanced {pct(metrics['balanced_acc'])}   ECE {metrics['ece']:.4f}"]
    if collapse:
        shown = {k.rpartition("/")[2]: v for k, v in collapse.items() if isinstance(v, (int, float))}
        keys = [k for k in ("nc1", "nc2_etf_error", "nc3", "nc4", "proto_cos") if k in shown]
        if keys:
            lines.append("collapse  " + "   ".join(f"{k} {shown[k]:.4g}" for k in keys))
    per_class = metrics["per_class"]
    names = list(per_class)
    if len(names) > max_classes:
        names = sorted(names, key=lambda n: per_class[n]["acc"])[:max_classes]
        lines.append(f"per-class accuracy, the {max_classes} worst of {len(per_class)}:")
    else:
        lines.append("per-class accuracy:")
    shown = {name: terminal(name) for name in names}  # a class folder's name may hold control characters
    width = max(len(n) for n in shown.values()) if names else 5
    lines += [f"  {shown[name]:<{width}}  {pct(per_class[name]['acc']):>8}  ({per_class[name]['n']})" for name in names]
    return "\n".join(lines)
