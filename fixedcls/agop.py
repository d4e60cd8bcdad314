"""Deep neural collapse through the average gradient outer product (docs/agop.md).

    from fixedcls import agop
    layers = agop.representative_layers(model, [1, 2, 3, 4])   # {"layer1": conv, ...}
    row = agop.measure_agop(model, test_loader, layers)         # {"agop/layer1/nfa_corr": ..., ...}

* :func:`layer_agop` -- the AGOP of one ``nn.Linear`` / ``nn.Conv2d`` with respect to its input
  (each k x k patch for a convolution), exact or sketched with Rademacher probes.
* :func:`nfa_correlation` -- the Neural Feature Ansatz correlation of W^T W with AGOP^alpha.
* :func:`dnc_decomposition` -- nc1_trace of a layer's input, of its linear part and of its output
  after the nonlinearity, and the share of the NC1 reduction the linear map makes.
* :func:`representative_layers`, :func:`measure_agop` -- the per-stage measurement the training
  loop and the collapse CLI log as ``agop/<layer>/...``.

The AGOP is W^T K W with K the average outer product of the gradients at the layer's output, so
no D x D Jacobian is ever formed: one forward pass and r backward passes per batch, r the rank of
the logits' Jacobian with respect to the head's input (min(K, d)) or the number of probes.
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .collapse import _unwrap  # the one DDP / torch.compile unwrap of the package
from .errors import FixedclsError

__all__ = ["layer_agop", "nfa_correlation", "dnc_decomposition", "representative_layers", "measure_agop"]

_F64 = torch.float64
_NAN = float("nan")
#: Modules whose output is "the layer's output after the nonlinearity" (timm's own classes live in
#: timm.layers.activations*; matched by module so every timm version's set is covered).
_TORCH_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
)  # fmt: skip
#: A float32 forward reproduces W @ mean patch + b to about 1e-6 relative; 1e-3 only catches layers whose
#: forward does not apply module.weight as stored (timm StdConv2d standardises it).
_CONSISTENCY_RTOL = 1e-3
_CHECKED_ROWS = 4


# --------------------------------------------------------------------------------------
# layers: weights as matrices, patches, pooling
# --------------------------------------------------------------------------------------
def _check_layer(module: nn.Module, where: str) -> None:
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise FixedclsError(f"{where}: {type(module).__name__} is not an nn.Linear or nn.Conv2d; pick a linear or 2-d convolution layer.")


def _groups(module: nn.Module) -> int:
    return int(getattr(module, "groups", 1))


def _weight_blocks(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """[groups, C_out / groups, D_g] in float64: one row per output channel, columns in patch order (c, i, j)."""
    w = weight.detach().to(_F64)
    return w.reshape(groups, w.shape[0] // groups, -1)


def _channel_rows(t: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Every (image, position) of a layer's output as a row [*, C_out]: positions are the patches / tokens."""
    if isinstance(module, nn.Conv2d):
        return t.movedim(1, -1).reshape(-1, t.shape[1])
    return t.reshape(-1, t.shape[-1])


def _pool(t: torch.Tensor) -> torch.Tensor:
    """One vector per image: a map's channels averaged over positions ([B,C,H,W]: over H,W; [B,N,C]: over N)."""
    if t.dim() == 4:
        return t.mean(dim=(2, 3))
    return t.reshape(t.shape[0], -1, t.shape[-1]).mean(dim=1)


def _mean_patch(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input variable averaged over output positions, [B, D] (D = C_in k k for a convolution).

    W @ mean patch + b is exactly the average-pooled output, so the linear part of dnc_decomposition is a
    linear function of this representation, as in the papers' fully connected setting.
    """
    if isinstance(module, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1]).mean(dim=1)
    kh, kw = module.kernel_size
    (sh, sw), (dh, dw) = module.stride, module.dilation
    if type(module).__name__ == "Conv2dSame":  # timm pads dynamically in forward
        from timm.layers import pad_same

        x = pad_same(x, [kh, kw], [sh, sw], [dh, dw])
    else:
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    out_h = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    taps = [
        x[:, :, i * dh : i * dh + sh * (out_h - 1) + 1 : sh, j * dw : j * dw + sw * (out_w - 1) + 1 : sw].mean(dim=(2, 3))
        for i in range(kh)
        for j in range(kw)
    ]
    return torch.stack(taps, dim=2).reshape(x.shape[0], -1)  # (c, i, j) order, as weight.reshape(C_out, -1)


def _is_activation(module: nn.Module) -> bool:
    return isinstance(module, _TORCH_ACTIVATIONS) or type(module).__module__.startswith("timm.layers.activations")


def _following_activation(parent: nn.Module, layer: nn.Module) -> nn.Module | None:
    """The first activation registered after ``layer`` in its parent block, if no other linear map comes first."""
    seen = False
    for module in parent.modules():
        if module is layer:
            seen = True
        elif seen and isinstance(module, (nn.Linear, nn.Conv2d)):
            return None
        elif seen and _is_activation(module):
            return module
    return None


def _parent_of(root: nn.Module, layer: nn.Module) -> tuple[str, nn.Module]:
    for name, module in root.named_modules():
        if module is layer:
            parent_name = name.rpartition(".")[0]
            return name, root.get_submodule(parent_name)
    raise FixedclsError(f"agop: the layer {type(layer).__name__} is not a submodule of the model; pass a module of this model.")


# --------------------------------------------------------------------------------------
# representative layers of timm stages
# --------------------------------------------------------------------------------------
def _eligible(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, layer) of every conv / linear in ``root`` that an activation follows in its own block."""
    found = []
    for name, module in root.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            parent = root.get_submodule(name.rpartition(".")[0])
            if _following_activation(parent, module) is not None:
                found.append((name, module))
    return found


def _block_of(path: str) -> str:
    """The block a layer belongs to: its path up to the last numeric segment (an entry of a Sequential)."""
    parts = path.split(".")[:-1]
    numeric = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[: numeric[-1] + 1]) if numeric else ""


def representative_layers(model: nn.Module, stages) -> dict[str, nn.Module]:
    """One conv / linear layer per backbone stage: ``{"layer<i>": module}``.

    ``stages``: indices into ``model.backbone.feature_info`` (negative allowed; the same ``i`` as
    ``collapse``'s ``layer<i>/nc1``, since timm's ``forward_intermediates`` follows feature_info), their
    module names (``"layer1"``, ``"stages.2"``), or ``"all"``.  The rule: among the stage's conv / linear
    layers that an activation follows inside their own block (so dnc_decomposition has an output after the
    nonlinearity), the first one of the stage's last block -- in a ResNet the ``conv1`` of the last block,
    whose input is the stage's representation before that block.  A stage module without such layers
    (ResNet's stem entry ``act1``) takes the last eligible layer registered before it (the stem conv).
    """
    core = _unwrap(model)
    backbone = getattr(core, "backbone", core)
    info = getattr(backbone, "feature_info", None)
    if not isinstance(info, (list, tuple)) or not info:
        raise FixedclsError("representative_layers: the backbone has no timm feature_info; pass {label: module} layers instead.")
    names = [str(entry["module"]) for entry in info]
    items = list(range(len(names))) if stages == "all" else ([stages] if isinstance(stages, (int, str)) else list(stages))
    if not items:
        raise FixedclsError("representative_layers: no stages given; pass stage indices, feature_info module names or 'all'.")
    chosen: dict[str, nn.Module] = {}
    every = _eligible(backbone)
    order = [name for name, _ in backbone.named_modules()]
    for item in items:
        if isinstance(item, str) and not item.lstrip("-").isdigit():
            if item not in names:
                raise FixedclsError(f"representative_layers: unknown stage {item!r}; use one of {', '.join(names)} or 0..{len(names) - 1}.")
            index = names.index(item)
        else:
            index = int(item) + (len(names) if int(item) < 0 else 0)
            if not 0 <= index < len(names):
                raise FixedclsError(f"representative_layers: stage {item} out of range for a backbone with {len(names)} stages; use 0..{len(names) - 1}.")
        stage = names[index]
        inside = [(p, m) for p, m in every if p.startswith(stage + ".")]
        if inside:
            last_block = _block_of(inside[-1][0])
            chosen[f"layer{index}"] = next(m for p, m in inside if _block_of(p) == last_block)
            continue
        before = [(p, m) for p, m in every if order.index(p) < order.index(stage)]
        if not before:
            raise FixedclsError(f"representative_layers: stage {stage!r} has no conv / linear layer followed by an activation; pass {{label: module}} layers.")
        chosen[f"layer{index}"] = before[-1][1]
    return chosen


# --------------------------------------------------------------------------------------
# data and state
# --------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------
# per-class statistics for nc1_trace
# --------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------
# the pass: one forward, r backward passes, hooks on every measured layer
# --------------------------------------------------------------------------------------
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
                linear = _pool(output.detach()).to(_F64)
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
            self.views["output"].add(_pool(output.detach()), self.labels)
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


def _output_factor(core: nn.Module, x: torch.Tensor, probes: int | None, gen: torch.Generator):
    """(out, F): the tensor the backward passes start from and F [B, r, dim(out)] with
    sum_l F_l^T F_l = J^T J, J the Jacobian of the logits with respect to ``out`` (exact), or its
    Rademacher sketch V^T J / sqrt(m) (probes=m).  For a Classifier ``out`` is the head's input h and J
    comes from the tiny head alone, so a d < K head (d-cube) needs only d passes through the backbone.
    """
    head = getattr(core, "head", None)
    if head is not None and callable(getattr(core, "forward_features", None)):
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
    m = _check_probes(probes)
    taps = []
    for label, layer in layers.items():
        _check_layer(layer, f"agop layer {label}")
        activation = None
        if dnc:
            activation = (activations or {}).get(label)
            if activation is None:
                name, parent = _parent_of(core, layer)
                activation = _following_activation(parent, layer)
                if activation is None:
                    raise FixedclsError(f"agop: no activation follows layer {label} ({name}) in its block; pass activation=<module> whose output is the layer's output after the nonlinearity.")
        taps.append(_Tap(label, layer, activation, grads=grads))
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
                    continue
                with torch.enable_grad():
                    out, factor = _output_factor(core, x, m, gen)
                    outputs = [tap.output for tap in taps]
                    missing = [tap.label for tap, o in zip(taps, outputs) if o is None or not o.requires_grad]
                    if missing:
                        raise FixedclsError(f"agop: layers {missing} do not run in the model's forward before its output; pick layers of this model.")
                    for row in range(factor.shape[1]):
                        grads_at = torch.autograd.grad(out, outputs, grad_outputs=factor[:, row], retain_graph=row + 1 < factor.shape[1])
                        for tap, g in zip(taps, grads_at):
                            tap.add_gradients(g)
                for tap in taps:
                    tap.output = None
    finally:
        for tap in taps:
            tap.close()
    return taps


# --------------------------------------------------------------------------------------
# public measures
# --------------------------------------------------------------------------------------
def layer_agop(model: nn.Module, inputs, module: nn.Module, probes="exact", *, samples: int | None = None,
               seed: int = 0, batch_size: int = 256) -> torch.Tensor:  # fmt: skip
    """The AGOP of ``module`` (an ``nn.Linear`` or ``nn.Conv2d`` inside ``model``) in float64.

    (1/N) sum_images sum_positions J^T J, J the Jacobian of the K logits with respect to the layer's input
    variable (the input vector; each k x k patch of a convolution; each token of a [B, N, C] linear), the
    model in eval mode.  [D, D] with D = C_in k k, or [groups, D_g, D_g] for a grouped / depthwise
    convolution (each group's patch is its own input).  ``inputs``: a tensor, an (inputs, labels) batch or a
    loader; ``samples``: a fixed seeded subset of at most that many samples.  ``probes``: ``"exact"`` or the
    number m of Rademacher probes per sample (unbiased; m backward passes instead of min(K, d)).
    """
    (tap,) = _run(model, inputs, {"layer": module}, grads=True, dnc=False, probes=probes, samples=samples, seed=seed, batch_size=batch_size)
    return tap.agop()


def _spectral_pearson(w_sum: torch.Tensor, gram: torch.Tensor, spectrum, alpha: float, dim: int) -> float:
    """Pearson correlation of the entries of W^T W and V diag(lam^alpha) V^T over g groups of D x D entries.

    w_sum = W 1 [g, o]; gram = W W^T [g, o, o]; spectrum = (lam [g, r] >= 0, W V [g, o, r], V^T 1 [g, r]).
    Every sum over the D x D entries is a trace of small matrices, so neither D x D matrix is formed.
    """
    lam, wv, v_sum = spectrum
    entries = gram.shape[0] * dim**2
    power = lam.clamp_min(0).pow(alpha)
    gram_sum = w_sum.square().sum()  # 1^T W^T W 1
    gram_sq = gram.square().sum()  # ||W^T W||_F^2 = ||W W^T||_F^2
    power_sum = (power * v_sum.square()).sum()
    power_sq = power.square().sum()
    cross = (power * wv.square().sum(dim=1)).sum()  # <W^T W, V L V^T> = sum_l lam_l ||W v_l||^2
    cov = cross - gram_sum * power_sum / entries
    var = (gram_sq - gram_sum**2 / entries) * (power_sq - power_sum**2 / entries)
    return float(cov / var.sqrt()) if float(var) > 0 else _NAN


def _check_alpha(alpha) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise FixedclsError(f"nfa_correlation: alpha must be a positive number (the papers use 0.5 and 1), got {alpha!r}.")


def nfa_correlation(weight: torch.Tensor, agop: torch.Tensor, alpha: float = 0.5, init_weight: torch.Tensor | None = None) -> float:
    """Pearson correlation of the entries of W^T W and AGOP^alpha (the Neural Feature Ansatz).

    ``weight``: a Linear [C_out, D] or Conv2d [C_out, C_in / groups, k, k] weight; ``agop``: [D, D], or
    [groups, D_g, D_g] as :func:`layer_agop` returns it for a grouped convolution (then W^T W per group,
    all blocks' entries together).  Both are flattened, centred by their mean entry and compared by cosine.
    AGOP^alpha comes from a symmetric eigendecomposition with negative eigenvalues clamped to 0.
    ``init_weight``: use W - W_init instead of W.  NaN when either matrix is constant (an all-zero AGOP).
    """
    _check_alpha(alpha)
    blocks = agop.detach().to(_F64)
    blocks = blocks.unsqueeze(0) if blocks.dim() == 2 else blocks
    if blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2]:
        raise FixedclsError(f"nfa_correlation: agop must be [D, D] or [groups, D, D], got {tuple(agop.shape)}; pass layer_agop's result.")
    groups, dim = blocks.shape[0], blocks.shape[1]
    if weight.shape[0] % groups or weight.numel() != weight.shape[0] * dim:
        raise FixedclsError(f"nfa_correlation: weight {tuple(weight.shape)} does not fit an agop of {groups} block(s) of {dim} x {dim}; pass the layer's own weight.")
    w = _weight_blocks(weight, groups).to(blocks.device)
    if init_weight is not None:
        if init_weight.shape != weight.shape:
            raise FixedclsError(f"nfa_correlation: init_weight {tuple(init_weight.shape)} differs from weight {tuple(weight.shape)}; pass the same layer's initial weight.")
        w = w - _weight_blocks(init_weight, groups).to(w.device)
    lam, vec = torch.linalg.eigh(0.5 * (blocks + blocks.transpose(1, 2)))
    return _spectral_pearson(w.sum(dim=2), w @ w.transpose(1, 2), (lam, w @ vec, vec.sum(dim=1)), alpha, dim)


def _factored_spectrum(w: torch.Tensor, gram: torch.Tensor, outer: torch.Tensor):
    """The spectrum of AGOP = W^T K W per group for _spectral_pearson, without the D x D matrix.

    With K = Q S^2 Q^T and B = S Q^T W, AGOP = B^T B; the eigenpairs of B B^T = S Q^T (W W^T) Q S give
    AGOP's nonzero eigenvalues s^2 and eigenvectors V = W^T C, C = Q S U / s, so W V = (W W^T) C.
    """
    k_lam, k_vec = torch.linalg.eigh(outer)
    factor = k_vec * k_lam.clamp_min(0).sqrt().unsqueeze(1)  # Q S
    lam, u = torch.linalg.eigh(factor.transpose(1, 2) @ gram @ factor)
    keep = lam > lam.amax(dim=1, keepdim=True).clamp_min(0) * 1e-12  # zero eigenvalues have no defined V
    lam = torch.where(keep, lam, torch.zeros_like(lam))
    coef = factor @ u / torch.where(keep, lam, torch.ones_like(lam)).sqrt().unsqueeze(1)
    return lam, gram @ coef, (coef * w.sum(dim=2).unsqueeze(2)).sum(dim=1)  # V^T 1 = C^T W 1


def _shares(tap: _Tap) -> dict[str, float]:
    before, linear, after = (tap.views[k].nc1_trace() for k in ("input", "linear", "output"))
    reduction = before - after
    return {
        "nc1_trace_input": before,
        "nc1_trace_linear": linear,
        "nc1_trace_output": after,
        "linear_share": (before - linear) / reduction if reduction != 0 else _NAN,
    }


def dnc_decomposition(model: nn.Module, loader, module: nn.Module, *, activation: nn.Module | None = None,
                      samples: int | None = None, seed: int = 0, batch_size: int = 256) -> dict[str, float]:  # fmt: skip
    """How much of a layer's within-class collapse its linear map makes.

    Returns ``nc1_trace_input`` (the layer's input phi(x): the mean patch of a convolution),
    ``nc1_trace_linear`` (S V^T phi(x), whose nc1_trace is that of W phi(x) since U has orthonormal
    columns), ``nc1_trace_output`` (the average-pooled output of ``activation``, by default the first
    activation after the layer in its block) and ``linear_share`` = (input - linear) / (input - output).
    """
    (tap,) = _run(model, loader, {"layer": module}, grads=False, dnc=True, activations={"layer": activation},
                  samples=samples, seed=seed, batch_size=batch_size)  # fmt: skip
    return _shares(tap)


def measure_agop(model: nn.Module, loader_or_batch, layers, samples: int = 512, seed: int = 0, probes="exact",
                 *, batch_size: int = 256) -> dict[str, float]:  # fmt: skip
    """``agop/<layer>/nfa_corr`` (alpha = 1), ``agop/<layer>/nfa_corr_sqrt`` (alpha = 1/2) and
    ``agop/<layer>/linear_share`` for every layer, from one pass over a fixed seeded subset of ``samples``.

    ``layers``: ``{label: module}``, or stages for :func:`representative_layers` (indices, names, "all").
    The model's train/eval flags and the global torch / python / numpy RNG states are left as found.
    """
    chosen = dict(layers) if isinstance(layers, Mapping) else representative_layers(model, layers)
    taps = _run(model, loader_or_batch, chosen, grads=True, dnc=True, probes=probes, samples=samples, seed=seed, batch_size=batch_size)
    row: dict[str, float] = {}
    for tap in taps:
        w = tap.weight.to(tap.outer.device)
        gram = w @ w.transpose(1, 2)
        spectrum = _factored_spectrum(w, gram, tap.outer_blocks())
        row[f"agop/{tap.label}/nfa_corr"] = _spectral_pearson(w.sum(dim=2), gram, spectrum, 1.0, w.shape[2])
        row[f"agop/{tap.label}/nfa_corr_sqrt"] = _spectral_pearson(w.sum(dim=2), gram, spectrum, 0.5, w.shape[2])
        row[f"agop/{tap.label}/linear_share"] = _shares(tap)["linear_share"]
    return row
