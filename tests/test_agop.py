"""fixedcls.agop against brute-force Jacobians, closed forms and direct computations (float64 where it matters)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fixedcls import agop
from fixedcls.collapse import nc_metrics
from fixedcls.errors import FixedclsError
from fixedcls.models.classifier import create_model


def _brute_agop(rest, inputs: torch.Tensor) -> torch.Tensor:
    """mean_i J_i^T J_i, J_i the [K, D] Jacobian of rest at one sample's layer input [D]."""
    total = 0
    for row in inputs:
        jac = torch.autograd.functional.jacobian(lambda v: rest(v.unsqueeze(0))[0], row)
        total = total + jac.T @ jac
    return total / inputs.shape[0]


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 4)).double()


def test_linear_layer_agop_matches_brute_force_jacobian():
    model = _mlp()
    x = torch.randn(9, 5, dtype=torch.float64)
    hidden = model[1](model[0](x))
    expected = _brute_agop(lambda v: model[4](model[3](model[2](v))), hidden)
    got = agop.layer_agop(model, x, model[2])
    assert got.dtype == torch.float64 and got.shape == (7, 7)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


class _ConvNet(nn.Module):
    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.act1 = nn.Tanh()
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=groups)
        self.act2 = nn.ReLU(inplace=True)  # in place on the measured layer's output: its gradient must survive
        self.fc = nn.Linear(6 * 3 * 3, 5)

    def forward(self, x):
        return self.fc(self.act2(self.conv2(self.act1(self.conv1(x)))).flatten(1))


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_agop_matches_an_explicitly_unfolded_patch_network(groups):
    torch.manual_seed(1)
    net = _ConvNet(groups).double()
    x = torch.randn(6, 2, 6, 6, dtype=torch.float64)
    conv = net.conv2
    patches = F.unfold(net.act1(net.conv1(x)), 3, padding=1, stride=2)  # [B, D = 4*9, L = 9]
    d_full, positions = patches.shape[1], patches.shape[2]
    w = conv.weight.reshape(groups, 6 // groups, -1)

    def patch_network(p: torch.Tensor) -> torch.Tensor:  # each patch its own input variable
        blocks = p.reshape(p.shape[0], groups, d_full // groups, positions)
        z = torch.einsum("god,bgdl->bgol", w, blocks).reshape(p.shape[0], 6, 3, 3) + conv.bias.view(1, -1, 1, 1)
        return net.fc(torch.relu(z).flatten(1))

    full = 0
    for p in patches:
        jac = torch.autograd.functional.jacobian(lambda v: patch_network(v.unsqueeze(0))[0], p)  # [K, D, L]
        full = full + torch.einsum("kdl,kel->de", jac, jac)
    full = full / x.shape[0]
    per = d_full // groups
    expected = torch.stack([full[g * per : (g + 1) * per, g * per : (g + 1) * per] for g in range(groups)])
    got = agop.layer_agop(net, x, conv)
    assert got.shape == ((per, per) if groups == 1 else (groups, per, per))
    torch.testing.assert_close(got.reshape(expected.shape), expected, rtol=1e-10, atol=1e-12)


class _ChannelsLastMlp(nn.Module):
    """A linear layer applied at every position of a [B, H, W, C] map, as in ConvNeXt blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(3, 5), nn.GELU(), nn.Linear(5, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)).mean(dim=(1, 2)))


def test_linear_on_positions_sums_each_position_and_pools_per_channel():
    torch.manual_seed(9)
    net = _ChannelsLastMlp().double()
    x, y = torch.randn(5, 2, 3, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 2])
    total = 0
    for image in x:
        jac = torch.autograd.functional.jacobian(lambda v: net(v.unsqueeze(0))[0], image).reshape(4, -1, 3)
        total = total + torch.einsum("kpc,kpe->ce", jac, jac)
    torch.testing.assert_close(agop.layer_agop(net, x, net.fc1), total / x.shape[0], rtol=1e-10, atol=1e-12)
    result = agop.dnc_decomposition(net, (x, y), net.fc1)
    with torch.no_grad():
        pooled_in, pooled_act = x.mean(dim=(1, 2)), net.act(net.fc1(x)).mean(dim=(1, 2))
    expected = [nc_metrics(f, y, torch.zeros(3, f.shape[1]))["nc1_trace"] for f in (pooled_in, pooled_in @ net.fc1.weight.T, pooled_act)]
    assert [result["nc1_trace_input"], result["nc1_trace_linear"], result["nc1_trace_output"]] == pytest.approx(expected, rel=1e-9)


def test_balanced_deep_linear_network_agop_is_a_power_of_the_first_gram():
    torch.manual_seed(2)
    n, depth = 5, 3
    spectrum = torch.diag(torch.tensor([2.0, 1.5, 1.0, 0.7, 0.4], dtype=torch.float64))
    rotations = [torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))[0] for _ in range(depth + 1)]
    model = nn.Sequential(*[nn.Linear(n, n, bias=False) for _ in range(depth)]).double()
    with torch.no_grad():
        for i, layer in enumerate(model):  # W_l = Q_l S Q_{l-1}^T: W_{l+1}^T W_{l+1} = W_l W_l^T
            layer.weight.copy_(rotations[i + 1] @ spectrum @ rotations[i].T)
    first = model[0].weight
    result = agop.layer_agop(model, torch.randn(3, n, dtype=torch.float64), first_layer := model[0])
    torch.testing.assert_close(result, torch.linalg.matrix_power(first.T @ first, depth).detach(), rtol=1e-10, atol=1e-10)
    assert agop.nfa_correlation(first_layer.weight, result, alpha=1 / depth) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize(("head", "dim"), [("dcube", None), ("learned", 12)])
def test_classifier_head_paths_match_brute_force(head, dim):
    """A fixed head with d < K (factor from the head's Jacobian) and a learned head with K <= d."""
    torch.manual_seed(3)
    model = create_model("test_resnet", head=head, num_classes=5, dim=dim, in_chans=1).double().eval()
    assert isinstance(model.proj, nn.Linear)
    x = torch.randn(3, 1, 16, 16, dtype=torch.float64)
    expected = _brute_agop(lambda v: model.head(model.proj(v)), model.backbone(x))
    torch.testing.assert_close(agop.layer_agop(model, x, model.proj), expected, rtol=1e-9, atol=1e-12)


def test_a_learned_head_is_measured_from_the_logits():
    torch.manual_seed(4)
    model = create_model("test_resnet", head="learned", num_classes=5, in_chans=1).double().eval()
    x = torch.randn(3, 1, 16, 16, dtype=torch.float64)
    expected = _brute_agop(model.head, model.forward_features(x))
    torch.testing.assert_close(agop.layer_agop(model, x, model.head), expected, rtol=1e-9, atol=1e-12)


def test_stage_layer_matches_brute_force_through_the_backbone():
    torch.manual_seed(8)
    model = create_model("test_resnet", head="simplex", num_classes=4, in_chans=1).double().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):  # timm zero-initialises the last BN of each block
                module.weight.uniform_(0.5, 1.5)
    (conv,) = agop.representative_layers(model, [4]).values()
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    seen = {}
    handle = conv.register_forward_pre_hook(lambda m, args: seen.setdefault("input", args[0]))
    model(x)
    handle.remove()
    patches = F.unfold(seen["input"], conv.kernel_size, padding=conv.padding, stride=conv.stride)
    side = round(patches.shape[-1] ** 0.5)

    def from_patches(p: torch.Tensor) -> torch.Tensor:  # the conv's output from explicit patches, then the rest
        z = (conv.weight.reshape(conv.out_channels, -1) @ p).reshape(1, conv.out_channels, side, side)
        handle = conv.register_forward_hook(lambda m, args, out: z)
        try:
            return model(x[index : index + 1])[0]
        finally:
            handle.remove()

    total = 0
    for index in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(from_patches, patches[index])
        total = total + torch.einsum("kdl,kel->de", jac, jac)
    torch.testing.assert_close(agop.layer_agop(model, x, conv), total / x.shape[0], rtol=1e-9, atol=1e-12)


def test_fixed_tight_frame_head_makes_the_projection_nfa_exact():
    model = create_model("test_resnet", head="simplex", num_classes=4, in_chans=1).eval()
    x = torch.randn(8, 1, 16, 16)
    result = agop.layer_agop(model, x, model.proj)
    assert agop.nfa_correlation(model.proj.weight, result, alpha=1.0) == pytest.approx(1.0, abs=1e-6)


def test_probe_sketch_converges_to_the_exact_agop():
    model = _mlp()
    x = torch.randn(16, 5, dtype=torch.float64)
    exact = agop.layer_agop(model, x, model[2])

    def error(probes: int) -> float:
        sketch = agop.layer_agop(model, x, model[2], probes=probes, seed=4)
        return float(torch.linalg.matrix_norm(sketch - exact) / torch.linalg.matrix_norm(exact))

    few, many = error(1), error(1024)
    assert many < 0.05 < few
    torch.testing.assert_close(agop.layer_agop(model, x, model[2], probes=3, seed=4), agop.layer_agop(model, x, model[2], probes=3, seed=4))


def test_nfa_correlation_matches_a_direct_computation():
    torch.manual_seed(5)
    weight = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    init = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    root = torch.randn(12, 12, dtype=torch.float64)
    matrix = root @ root.T - 0.5 * torch.eye(12, dtype=torch.float64)  # one slightly negative eigenvalue at most
    lam, vec = torch.linalg.eigh(matrix)
    for alpha, w in ((0.5, weight), (1.0, weight), (0.5, weight - init)):
        power = vec @ torch.diag(lam.clamp_min(0) ** alpha) @ vec.T
        w_mat = w.reshape(4, -1)
        expected = np.corrcoef((w_mat.T @ w_mat).flatten().numpy(), power.flatten().numpy())[0, 1]
        got = agop.nfa_correlation(weight, matrix, alpha, init_weight=init if w is not weight else None)
        assert got == pytest.approx(expected, abs=1e-12)
    assert np.isnan(agop.nfa_correlation(weight, torch.zeros(12, 12)))


def test_measure_agop_matches_the_dense_path_and_leaves_state_alone():
    torch.manual_seed(6)
    net = _ConvNet(groups=2)
    layers = {"conv1": net.conv1, "conv2": net.conv2}
    x, y = torch.randn(20, 2, 6, 6), torch.randint(0, 3, (20,))
    net.train()
    net.conv1.eval()
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    row = agop.measure_agop(net, (x, y), layers, samples=16, seed=1, batch_size=7)
    assert torch.equal(torch_state, torch.get_rng_state()) and random.getstate() == py_state
    assert np.array_equal(np_state[1], np.random.get_state()[1])
    assert net.training and not net.conv1.training and net.conv2.training
    assert all(p.grad is None for p in net.parameters())
    assert sorted(row) == sorted(f"agop/{label}/{key}" for label in layers for key in ("nfa_corr", "nfa_corr_sqrt", "linear_share"))
    keep = torch.randperm(20, generator=torch.Generator().manual_seed(1))[:16].sort().values
    for label, layer in layers.items():
        dense = agop.layer_agop(net, x[keep], layer)
        assert row[f"agop/{label}/nfa_corr"] == pytest.approx(agop.nfa_correlation(layer.weight, dense, 1.0), abs=1e-6)
        assert row[f"agop/{label}/nfa_corr_sqrt"] == pytest.approx(agop.nfa_correlation(layer.weight, dense, 0.5), abs=1e-6)
        shares = agop.dnc_decomposition(net, (x[keep], y[keep]), layer)
        assert row[f"agop/{label}/linear_share"] == pytest.approx(shares["linear_share"], rel=1e-9)


def test_dnc_decomposition_matches_collapse_nc1_trace():
    torch.manual_seed(7)
    net = _ConvNet().double().eval()
    x, y = torch.randn(30, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (30,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    result = agop.dnc_decomposition(net, loader, net.conv2)
    with torch.no_grad():
        inputs = net.act1(net.conv1(x))
        patch = F.unfold(inputs, 3, padding=1, stride=2).mean(dim=2)  # the mean patch
        linear = patch @ net.conv2.weight.reshape(6, -1).T
        output = torch.relu(net.conv2(inputs)).mean(dim=(2, 3))

    def nc1_trace(features):
        return nc_metrics(features, y, torch.zeros(3, features.shape[1]))["nc1_trace"]

    expected = [nc1_trace(f) for f in (patch, linear, output)]
    got = [result[k] for k in ("nc1_trace_input", "nc1_trace_linear", "nc1_trace_output")]
    assert got == pytest.approx(expected, rel=1e-9)
    assert result["linear_share"] == pytest.approx((expected[0] - expected[1]) / (expected[0] - expected[2]), rel=1e-9)


def test_representative_layers_pick_the_first_conv_of_each_stage_last_block():
    model = create_model("resnet18", head="simplex", num_classes=10, in_chans=1)
    chosen = agop.representative_layers(model, [0, "layer2", -1])
    backbone = model.backbone
    assert chosen == {"layer0": backbone.conv1, "layer2": backbone.layer2[-1].conv1, "layer4": backbone.layer4[-1].conv1}
    assert list(agop.representative_layers(model, "all")) == [f"layer{i}" for i in range(5)]
    with pytest.raises(FixedclsError, match="unknown stage 'layer9'"):
        agop.representative_layers(model, ["layer9"])
    with pytest.raises(FixedclsError, match="out of range"):
        agop.representative_layers(model, [5])


def test_measure_agop_on_a_loader_with_stages_of_a_classifier():
    model = create_model("test_resnet", head="simplex", num_classes=4, in_chans=1)
    data = torch.utils.data.TensorDataset(torch.randn(24, 1, 16, 16), torch.arange(24) % 4)
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)
    row = agop.measure_agop(model, loader, [1, 3], samples=12, probes=2)
    assert set(row) == {f"agop/layer{i}/{k}" for i in (1, 3) for k in ("nfa_corr", "nfa_corr_sqrt", "linear_share")}
    assert row == agop.measure_agop(model, loader, [1, 3], samples=12, probes=2)  # a fixed subset, fixed probes


def test_bad_input_gets_one_line_errors():
    from timm.layers import StdConv2d

    model = _mlp()
    x = torch.randn(4, 5, dtype=torch.float64)
    with pytest.raises(FixedclsError, match="probes must be"):
        agop.layer_agop(model, x, model[2], probes=0)
    with pytest.raises(FixedclsError, match="not an nn.Linear or nn.Conv2d"):
        agop.layer_agop(model, x, model[1])
    with pytest.raises(FixedclsError, match="alpha must be"):
        agop.nfa_correlation(model[2].weight, torch.eye(7), alpha=0)
    with pytest.raises(FixedclsError, match="does not fit"):
        agop.nfa_correlation(model[2].weight, torch.eye(5))
    with pytest.raises(FixedclsError, match="needs labels"):
        agop.dnc_decomposition(model, x, model[2])
    with pytest.raises(FixedclsError, match="no activation follows"):
        agop.dnc_decomposition(model, (x, torch.arange(4) % 2), model[4])
    with pytest.raises(FixedclsError, match="did not run after it"):
        agop.dnc_decomposition(model, (x, torch.arange(4) % 2), model[2], activation=nn.ReLU())
    with pytest.raises(FixedclsError, match="labels must be class indices"):
        agop.dnc_decomposition(model, (x, torch.tensor([0, 1, -1, 0])), model[0])
    with pytest.raises(FixedclsError, match="not a submodule"):
        agop.layer_agop(model, x, nn.Linear(7, 6).double())
    std = nn.Sequential(StdConv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    with pytest.raises(FixedclsError, match="does not apply module.weight"):
        agop.measure_agop(std, (torch.randn(4, 2, 6, 6), torch.arange(4) % 2), {"std": std[0]})


def test_a_training_run_logs_the_agop_keys_and_plots_them(tmp_path):
    """collapse.agop.layers set: every epoch row holds agop/<stage>/{nfa_corr, nfa_corr_sqrt, linear_share}."""
    import json
    import math

    from utils import train_tiny

    train_tiny(tmp_path, ["collapse.agop.layers=[1,2]", "collapse.agop.samples=32", "collapse.every=0"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    keys = {f"agop/layer{i}/{m}" for i in (1, 2) for m in ("nfa_corr", "nfa_corr_sqrt", "linear_share")}
    assert len(rows) == 2 and all(keys <= set(row) for row in rows)
    assert all(-1.0 <= rows[-1][k] <= 1.0 for k in keys if "nfa" in k and math.isfinite(rows[-1][k]))
    assert (tmp_path / "run" / "collapse.png").is_file()  # plotted even with the collapse measures off
