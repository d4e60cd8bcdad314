"""The measurement pass: a fixed seeded subset, one forward and r backward passes per batch, with hooks
on every measured layer collecting the gradient outer product and the three NC1 representations."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from ..runtime import unwrap as _unwrap
from ..errors import FixedclsError
from .layers import _channel_rows, _check_layer, _groups, _mean_patch, _pool, _weight_blocks, following_activations

_F64 = torch.float64
_NAN = float("nan")
#: A float32 forward reproduces W @ mean patch + b to about 1e-6 relative; 1e-3 only catches layers whose
#: forward does not apply module.weight as stored (timm StdConv2d standardises it).
_CONSISTENCY_RTOL = 1e-3
_CHECKED_ROWS = 4


def _split(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    if torch.is_tensor(batch):
        return batch, None
    if isinstance(batch, (list, tuple)) and batch and torch.is_tensor(batch[0]):
        return batch[0], (torch.as_tensor(batch[1]) if len(batch) > 1 else None)
    if isinstance(batch, Mapping):
        for kx, ky in (("image", "label"), ("input", "target"), ("x", "y")):
            if kx in batch:
                return batch[kx], (torch.as_tensor(batch[ky]) if ky in batch else None)
    raise FixedclsError("agop: inputs must be a tensor, an (inputs, labels) batch or a loader of them; wrap the dataset to return tuples.")


def _batches(inputs, samples: int | None, seed: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Batches of a fixed seeded subset of at most ``samples`` samples (all when None)."""
    if samples is not None and int(samples) < 1:
        raise FixedclsError(f"agop: samples must be >= 1, got {samples}; pass None to use every sample.")
    g = torch.Generator().manual_seed(int(seed))
    dataset = getattr(inputs, "dataset", None)
    if dataset is None:  # one in-memory batch
        x, y = _split(inputs)
        if samples is not None and samples < x.shape[0]:
            keep = torch.randperm(x.shape[0], generator=g)[: int(samples)].sort().values
            x, y = x[keep], (y[keep] if y is not None else None)
        for s in range(0, x.shape[0], batch_size):
            yield x[s : s + batch_size], (y[s : s + batch_size] if y is not None else None)
        return
    try:
        n = len(dataset)
    except TypeError:
        n = None
    if samples is None or n is None:  # the whole loader, or the first samples of an iterable dataset
        left = samples
        for batch in inputs:
            x, y = _split(batch)
            if left is not None:
                x, y, left = x[:left], (y[:left] if y is not None else None), left - min(left, x.shape[0])
            if x.shape[0]:
                yield x, y
            if left == 0:
                return
        return
    from torch.utils.data import default_collate

    collate = getattr(inputs, "collate_fn", None) or default_collate
    idx = torch.randperm(n, generator=g)[: min(int(samples), n)].sort().values.tolist()
    for s in range(0, len(idx), batch_size):
        yield _split(collate([dataset[i] for i in idx[s : s + batch_size]]))


@contextmanager
def _measurement_state(model: nn.Module) -> Iterator[None]:
    """Eval mode and a private RNG stream; every module's train flag and the global RNG states come back."""
    import numpy as np

    modes = [(m, m.training) for m in model.modules()]
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            model.eval()
            yield
    finally:
        for m, flag in modes:
            m.training = flag
        random.setstate(py_state)
        np.random.set_state(np_state)


class _ClassScatter:
    """Streaming float64 class means and within-class sums of squares (Chan's pairwise update, centred).

    nc1_trace = tr(Sigma_W) / tr(Sigma_B) with the conventions of ``fixedcls.collapse``: Sigma_W the scatter
    around the class means over all N samples, Sigma_B over the K present classes around their unweighted mean.
    Only traces are needed, so this costs O(K D) where the full measures cost a D x D eigendecomposition.
    """

    def __init__(self) -> None:
        self.counts = torch.zeros(0, dtype=_F64)
        self.means = torch.zeros(0, 0, dtype=_F64)
        self.within = torch.zeros(0, dtype=_F64)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.detach().to("cpu", _F64), y.to("cpu", torch.long)
        if int(y.min()) < 0:
            raise FixedclsError(f"agop: labels must be class indices >= 0, got {int(y.min())}; pass integer labels 0..K-1.")
        k = max(int(y.max()) + 1, self.counts.numel())
        if self.means.shape != (k, x.shape[1]):
            grow = k - self.counts.numel()
            self.counts = torch.cat([self.counts, torch.zeros(grow, dtype=_F64)])
            self.within = torch.cat([self.within, torch.zeros(grow, dtype=_F64)])
            self.means = torch.cat([self.means.reshape(-1, x.shape[1]), torch.zeros(grow, x.shape[1], dtype=_F64)])
        n_b = torch.bincount(y, minlength=k).to(_F64)
        mean_b = torch.zeros(k, x.shape[1], dtype=_F64).index_add_(0, y, x) / n_b.clamp_min(1).unsqueeze(1)
        within_b = torch.zeros(k, dtype=_F64).index_add_(0, y, (x - mean_b[y]).square().sum(dim=1))
        total = self.counts + n_b
        delta = mean_b - self.means
        weight = (n_b / total.clamp_min(1)).unsqueeze(1)
        self.within += within_b + delta.square().sum(dim=1) * self.counts * weight.squeeze(1)
        self.means += delta * weight
        self.counts = total

    def nc1_trace(self) -> float:
        present = self.counts > 0
        if int(present.sum()) < 2:
            return _NAN
        mu = self.means[present]
        between = (mu - mu.mean(dim=0)).square().sum() / mu.shape[0]
        return float(self.within.sum() / self.counts.sum() / between)


class _Tap:
    """Hooks on one layer: its output (for the gradients) and the three NC1 representations."""

    def __init__(self, label: str, layer: nn.Module, activation: nn.Module | None, *, grads: bool) -> None:
        self.label, self.layer, self.activation, self.grads = label, layer, activation, grads
        groups = _groups(layer)
        self.weight = _weight_blocks(layer.weight, groups)
        c_out = self.weight.shape[0] * self.weight.shape[1]
        self.outer = torch.zeros(c_out, c_out, dtype=_F64)
        self.images = 0
        self.views = {"input": _ClassScatter(), "linear": _ClassScatter(), "output": _ClassScatter()} if activation is not None else {}
        self.handles = [layer.register_forward_hook(self._on_output)]
        if activation is not None:
            self.handles.append(layer.register_forward_pre_hook(self._on_input))
            self.handles.append(activation.register_forward_hook(self._on_activation))
        self.start_batch(None)

    def start_batch(self, labels: torch.Tensor | None) -> None:
        self.labels, self.output, self.calls, self.pending = labels, None, 0, None

    def finish_batch(self) -> None:
        if self.pending is not None:
            raise FixedclsError(
                f"agop: the activation {type(self.activation).__name__} given for layer {self.label} did not run after it; "
                "pass the module applied to the layer's output."
            )
        self.output = None

    def _on_input(self, module, args) -> None:
        if self.labels is None:
            return
        with torch.no_grad():
            self.pending = _mean_patch(module, args[0].detach())

    def _on_output(self, module, args, output):
        self.calls += 1
        if self.calls > 1:
            raise FixedclsError(f"agop: layer {self.label} runs more than once per forward (shared weights); pick a layer used once.")
        if self.pending is not None:
            patch = self.pending
            with torch.no_grad():
                # W phi(x) is the pooled output less the bias; W @ mean patch on a few rows checks that the
                # forward applies module.weight as stored, so W, the AGOP and the representations agree.
                linear = _pool(output.detach(), module).to(_F64)
                if module.bias is not None:
                    linear = linear - module.bias.detach().to(_F64)
                groups, check = self.weight.shape[0], patch[:_CHECKED_ROWS].to(_F64)
                direct = torch.einsum("god,bgd->bgo", self.weight.to(check.device), check.reshape(check.shape[0], groups, -1))
                scale = linear[:_CHECKED_ROWS].abs().max().clamp_min(1e-12)
                if float((linear[:_CHECKED_ROWS] - direct.reshape(check.shape[0], -1)).abs().max() / scale) > _CONSISTENCY_RTOL:
                    raise FixedclsError(
                        f"agop: layer {self.label} ({type(module).__name__}) does not apply module.weight as stored "
                        "(it transforms the weight in forward); pick a plain nn.Conv2d / nn.Linear layer."
                    )
            self.views["input"].add(patch, self.labels)
            self.views["linear"].add(linear, self.labels)
        if not self.grads:
            return None
        if not output.requires_grad:  # frozen parameters and inputs: start the graph here
            output = output.detach().requires_grad_(True)
        self.output = output
        # A clone goes on downstream, so an in-place activation right after the layer cannot overwrite the
        # tensor whose gradient is taken.
        return output.clone()

    def _on_activation(self, module, args, output) -> None:
        if self.labels is not None and self.pending is not None:
            self.views["output"].add(_pool(output.detach(), self.layer), self.labels)
            self.pending = None  # an activation module called again later in the block is not this layer's

    def add_gradients(self, grad: torch.Tensor) -> None:
        rows = _channel_rows(grad, self.layer).to(_F64)
        self.outer = self.outer.to(rows.device).addmm_(rows.T, rows)

    def outer_blocks(self) -> torch.Tensor:
        """K_gg [g, o, o]: each group's block of the gradient outer product, averaged over images."""
        if self.images == 0:
            raise FixedclsError("agop: the inputs held no samples; pass a non-empty batch or loader.")
        groups, per = self.weight.shape[0], self.weight.shape[1]
        blocks = [self.outer[g * per : (g + 1) * per, g * per : (g + 1) * per] for g in range(groups)]
        return torch.stack(blocks) / self.images

    def agop(self) -> torch.Tensor:
        """W_g^T K_gg W_g per group: [D, D], or [groups, D_g, D_g] for a grouped convolution."""
        w = self.weight.to(self.outer.device)
        result = w.transpose(1, 2) @ self.outer_blocks() @ w
        return result[0] if result.shape[0] == 1 else result

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _check_probes(probes) -> int | None:
    if probes == "exact":
        return None
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise FixedclsError(f"agop: probes must be 'exact' or a positive number of Rademacher probes, got {probes!r}.")
    return int(probes)


def _output_factor(core: nn.Module, x: torch.Tensor, probes: int | None, gen: torch.Generator, *, through_head: bool):
    """(out, F): the tensor the backward passes start from and F [B, r, dim(out)] with
    sum_l F_l^T F_l = J^T J, J the Jacobian of the logits with respect to ``out`` (exact), or its
    Rademacher sketch V^T J / sqrt(m) (probes=m).  For a Classifier ``out`` is the head's input h and J
    comes from the tiny head alone, so a d < K head (d-cube) needs only d passes through the backbone;
    ``through_head`` (a measured layer inside the head) starts at the logits instead.
    """
    head = getattr(core, "head", None)
    if head is not None and callable(getattr(core, "forward_features", None)) and not through_head:
        out = core.forward_features(x)
        h = out.detach().requires_grad_(True)
        logits = head(h)
        jac = torch.stack(
            [torch.autograd.grad(logits[:, k].sum(), h, retain_graph=True)[0] for k in range(logits.shape[1])], dim=1
        )
    else:
        out = core(x)
        if out.dim() != 2:
            raise FixedclsError(f"agop: the model returns {tuple(out.shape)}; it must return logits [B, K].")
        jac = torch.eye(out.shape[1], dtype=out.dtype, device=out.device).expand(out.shape[0], -1, -1)
    batch, classes, dim = jac.shape
    if probes is not None:
        signs = torch.randint(0, 2, (batch, probes, classes), generator=gen).to(jac) * 2 - 1
        return out, signs @ jac / math.sqrt(probes)
    if classes <= dim:
        return out, jac
    lam, vec = torch.linalg.eigh(jac.transpose(1, 2).to(_F64) @ jac.to(_F64))
    return out, (vec * lam.clamp_min(0).sqrt().unsqueeze(1)).transpose(1, 2).to(jac.dtype)


def _model_device(core: nn.Module) -> torch.device:
    for t in list(core.parameters()) + list(core.buffers()):
        return t.device
    return torch.device("cpu")


def _run(model, inputs, layers: Mapping[str, nn.Module], *, grads: bool, dnc: bool, activations=None,
         probes="exact", samples=None, seed=0, batch_size=256) -> list[_Tap]:  # fmt: skip
    """One pass over the samples feeding every layer's _Tap; the taps come back closed."""
    core = _unwrap(model)
    probe_count = _check_probes(probes)
    taps = []
    names = {module: name for name, module in core.named_modules()}
    followers = following_activations(core) if dnc else {}
    for label, layer in layers.items():
        _check_layer(layer, f"agop layer {label}")
        if layer not in names:
            raise FixedclsError(f"agop: layer {label} ({type(layer).__name__}) is not a submodule of the model; pass modules of this model.")
        activation = ((activations or {}).get(label) or followers.get(layer)) if dnc else None
        if dnc and activation is None:
            raise FixedclsError(
                f"agop: no activation follows layer {label} ({names[layer]}) before the next linear map; "
                "pass activation=<module> whose output is the layer's output after the nonlinearity."
            )
        taps.append(_Tap(label, layer, activation, grads=grads))
    head = getattr(core, "head", None)
    in_head = isinstance(head, nn.Module) and any(tap.layer is module for tap in taps for module in head.modules())
    gen = torch.Generator().manual_seed(int(seed) + 1)  # independent of the subset's stream
    device = _model_device(core)
    try:
        with _measurement_state(model):
            for x, y in _batches(inputs, samples, seed, int(batch_size)):
                if dnc and y is None:
                    raise FixedclsError("agop: the linear share needs labels; pass (inputs, labels) batches or a loader of them.")
                x = x.to(device)
                for tap in taps:
                    tap.start_batch(y if dnc else None)
                    tap.images += x.shape[0]
                if not grads:
                    with torch.no_grad():
                        core(x)
                else:
                    _backward_passes(core, x, taps, probe_count, gen, through_head=in_head)
                for tap in taps:
                    tap.finish_batch()
    finally:
        for tap in taps:
            tap.close()
    return taps


def _backward_passes(core: nn.Module, x: torch.Tensor, taps: list[_Tap], probes: int | None, gen, *, through_head: bool) -> None:
    """One forward, then one backward pass per row of the output factor, feeding every tap's gradients."""
    with torch.enable_grad():
        out, factor = _output_factor(core, x, probes, gen, through_head=through_head)
        outputs = [tap.output for tap in taps]
        missing = [tap.label for tap, o in zip(taps, outputs, strict=True) if o is None]
        if missing:
            raise FixedclsError(f"agop: layers {missing} do not run in the model's forward; pick layers the forward uses.")
        for row in range(factor.shape[1]):
            grads_at = torch.autograd.grad(out, outputs, grad_outputs=factor[:, row], retain_graph=row + 1 < factor.shape[1])
            for tap, g in zip(taps, grads_at, strict=True):
                tap.add_gradients(g)
