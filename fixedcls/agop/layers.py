"""Layers as linear maps: weights as per-group matrices, patches, pooling, activations, and the
representative layer of a timm stage (docs/agop.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import unwrap as _unwrap  # the one DDP / torch.compile / EMA unwrap
from ..errors import FixedclsError

_F64 = torch.float64
#: Modules whose output is "the layer's output after the nonlinearity" (timm's own classes live in
#: timm.layers.activations*; matched by module so every timm version's set is covered).
_TORCH_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
)  # fmt: skip


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


def _pool(t: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """One vector per image from a map laid out like ``layer``'s output: channels averaged over positions
    (a convolution's [B, C, H, W] over H, W; a linear layer's [B, ..., C] over every middle axis)."""
    if isinstance(layer, nn.Conv2d):
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


def following_activations(root: nn.Module) -> dict[nn.Module, nn.Module]:
    """{layer: activation} for every conv / linear of ``root`` whose next module in registration order,
    among convs, linears and activations, is an activation: the layer's nonlinearity (its BatchNorm, an
    eval-mode affine map, may sit in between).  A layer followed by another linear map first has none."""
    found: dict[nn.Module, nn.Module] = {}
    pending = None
    for module in root.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            pending = module
        elif pending is not None and _is_activation(module):
            found[pending] = module
            pending = None
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
    layers that an activation follows (:func:`following_activations`, so dnc_decomposition has an output
    after the nonlinearity), the first one of the stage's last block -- in a ResNet the ``conv1`` of the
    last block, whose input is the stage's representation before that block.  A stage module without
    such layers (ResNet's stem entry ``act1``) takes the last such layer registered before it (the stem's
    last conv).
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
    activations = following_activations(backbone)
    every = [(path, m) for path, m in backbone.named_modules() if m in activations]  # registration order
    position = {path: i for i, (path, _) in enumerate(backbone.named_modules())}
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
        before = [(p, m) for p, m in every if position[p] < position[stage]]
        if not before:
            raise FixedclsError(f"representative_layers: stage {stage!r} has no conv / linear layer followed by an activation; pass {{label: module}} layers.")
        chosen[f"layer{index}"] = before[-1][1]
    return chosen
