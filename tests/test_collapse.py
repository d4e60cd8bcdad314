"""Tests of fixedcls.collapse (SPEC section 3) and of the naive reference tools/naive_collapse.py."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from fixedcls.collapse import DEFAULT_THRESHOLDS, METRIC_KEYS, CollapseAccumulator, OnlineCollapse, collapse_speed, format_table, measure_model, nc_metrics, plot_collapse

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_naive():
    spec = importlib.util.spec_from_file_location("naive_collapse", ROOT / "tools" / "naive_collapse.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------------------
# helpers: data and an independent brute-force float64 computation
# ---------------------------------------------------------------------------------------
def _simplex(K: int, d: int | None = None, seed: int = 0) -> torch.Tensor:
    """Unit-norm regular simplex, K vertices in R^d (d >= K-1), rows summing to 0."""
    d = K - 1 if d is None else d
    centred = torch.eye(K, dtype=torch.float64) - 1.0 / K
    evals, evecs = torch.linalg.eigh(centred)
    coords = centred @ evecs[:, 1:]  # [K, K-1], the null direction (ones) dropped
    coords = coords / coords.norm(dim=1, keepdim=True)
    if d > K - 1:
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
        coords = coords @ q[:, : K - 1].T
    return coords


def _clustered(N, d, K, *, spread=1.0, sep=3.0, seed=0, labels=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    centres = sep * torch.randn(K, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (N,), generator=g) if labels is None else labels
    h = centres[y] + spread * torch.randn(N, d, generator=g, dtype=torch.float64)
    W = torch.randn(K, d, generator=g, dtype=torch.float64)
    b = torch.randn(K, generator=g, dtype=torch.float64)
    return h.to(dtype), y, W.to(dtype), b.to(dtype)


def brute(features, labels, weight, bias=None) -> dict[str, float]:
    """Straight from the SPEC definitions, float64 numpy, explicit differences."""
    H = features.double().numpy()
    y = labels.numpy()
    W = weight.double().numpy()
    b = np.zeros(W.shape[0]) if bias is None else bias.double().numpy()
    d = H.shape[1]
    cls = sorted(set(y.tolist()))
    K = len(cls)
    N = len(y)
    mu = np.stack([H[y == c].mean(0) for c in cls])
    muG = mu.mean(0)
    Md = mu - muG
    Sw = sum((H[y == c] - mu[i]).T @ (H[y == c] - mu[i]) for i, c in enumerate(cls)) / N
    Sb = Md.T @ Md / K
    lam, V = np.linalg.eigh(Sb)
    r = min(d, K - 1)
    pinv = V[:, -r:] @ np.diag(1.0 / lam[-r:]) @ V[:, -r:].T
    out = {"nc1": np.trace(Sw @ pinv) / K, "nc1_trace": np.trace(Sw) / np.trace(Sb)}
    var = [np.mean(np.sum((H[y == c] - mu[i]) ** 2, 1)) for i, c in enumerate(cls)]
    out["cdnv"] = np.mean(
        [(var[i] + var[j]) / (2 * np.sum((mu[i] - mu[j]) ** 2)) for i in range(K) for j in range(i + 1, K)]
    )
    mn = np.linalg.norm(Md, axis=1)
    Wp = W[cls]
    wn = np.linalg.norm(Wp, axis=1)
    out["nc2_equinorm"] = mn.std(ddof=1) / mn.mean()
    out["nc2_equinorm_w"] = wn.std(ddof=1) / wn.mean()
    cos = (Md / mn[:, None]) @ (Md / mn[:, None]).T
    off = cos[~np.eye(K, dtype=bool)]
    out["nc2_equiangle"] = off.std(ddof=1)
    out["nc2_maxangle"] = np.abs(off + 1 / (K - 1)).mean()
    G = Md @ Md.T
    out["nc2_etf_error"] = np.linalg.norm(G / np.linalg.norm(G) - (np.eye(K) - 1 / K) / np.sqrt(K - 1))
    out["nc3"] = np.linalg.norm(Wp / np.linalg.norm(Wp) - Md / np.linalg.norm(Md)) ** 2
    net = np.argmax(H @ W.T + b, axis=1)
    dist = np.linalg.norm(H[:, None, :] - mu[None, :, :], axis=2)
    ncc = np.array(cls)[np.argmin(dist, axis=1)]
    out["nc4"] = np.mean(net != ncc)
    out["proto_cos"] = np.mean(np.sum(mu * Wp, 1) / (np.linalg.norm(mu, axis=1) * wn))
    out["sample_cos"] = np.mean(np.sum(H * W[y], 1) / (np.linalg.norm(H, axis=1) * np.linalg.norm(W[y], axis=1)))
    return {k: float(v) for k, v in out.items()}


def assert_close(a: dict, b: dict, rel=1e-6, abs_=1e-9, keys=METRIC_KEYS):
    for k in keys:
        assert math.isclose(a[k], b[k], rel_tol=rel, abs_tol=abs_), f"{k}: {a[k]!r} vs {b[k]!r}"


# ---------------------------------------------------------------------------------------
# nc_metrics
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("K,d,dtype,tol", [(5, 4, torch.float64, 1e-9), (6, 12, torch.float64, 1e-9), (10, 9, torch.float32, 1e-6)])
def test_perfect_collapse_known_answer(K, d, dtype, tol):
    # float32 rounding of the simplex itself costs ~1e-8: exact answers are checked in float64
    W = _simplex(K, d, seed=1).to(dtype)
    y = torch.arange(10 * K) % K
    h = 3.0 * W[y]  # features exactly at the (scaled) prototypes
    m = nc_metrics(h, y, W)
    assert set(METRIC_KEYS) <= set(m)
    for k in ("nc1", "nc1_trace", "cdnv", "nc2_equinorm", "nc2_equinorm_w", "nc2_equiangle", "nc2_maxangle", "nc2_etf_error", "nc3", "nc4"):
        assert abs(m[k]) < tol, (k, m[k])
    assert m["proto_cos"] == pytest.approx(1.0, abs=tol)
    assert m["sample_cos"] == pytest.approx(1.0, abs=tol)
    assert all(isinstance(v, float) for v in m.values())


def test_random_matches_bruteforce_with_bias():
    h, y, W, b = _clustered(400, 16, 6, seed=3)
    assert_close(nc_metrics(h, y, W, b), brute(h, y, W, b))
    assert_close(nc_metrics(h.double(), y, W.double()), brute(h, y, W))


def test_d_smaller_than_k_minus_1():
    h, y, W, b = _clustered(500, 3, 10, seed=4)
    m = nc_metrics(h, y, W, b)
    assert_close(m, brute(h, y, W, b))
    assert m["nc1"] > 0 and math.isfinite(m["nc1"])


def test_d_larger_than_k_minus_1():
    h, y, W, b = _clustered(300, 40, 5, seed=5)
    m = nc_metrics(h, y, W, b)
    assert_close(m, brute(h, y, W, b))


def test_absent_class_left_out():
    K, d = 7, 10
    labels = torch.tensor([0, 1, 3, 4, 6] * 40)  # classes 2 and 5 absent
    h, y, W, b = _clustered(len(labels), d, K, seed=6, labels=labels)
    W[2] *= 50.0  # absent rows must not enter nc2_equinorm_w / nc3 / proto_cos ...
    W[5] = 0.0
    m = nc_metrics(h, y, W, b)
    assert_close(m, brute(h, y, W, b))
    present = torch.tensor([0, 1, 3, 4, 6])
    ref = nc_metrics(h, torch.searchsorted(present, y), W[present], b[present])
    # everything except nc4 (which decides over ALL rows of W) equals the compacted problem
    assert_close(m, ref, keys=[k for k in METRIC_KEYS if k != "nc4"])


def test_absent_class_nc4_uses_all_rows():
    K, d = 3, 2
    y = torch.tensor([0, 0, 1, 1])
    h = torch.tensor([[1.0, 0.0], [1.1, 0.0], [-1.0, 0.0], [-1.1, 0.0]])
    W = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([0.0, 0.0, 5.0])  # absent class 2 wins every decision
    m = nc_metrics(h, y, W, b)
    assert m["nc4"] == 1.0
    assert nc_metrics(h, y, W)["nc4"] == 0.0


def test_imbalanced_classes():
    K = 5
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([400, 3, 50, 17, 2])])
    h, y, W, b = _clustered(len(labels), 8, K, seed=7, labels=labels)
    assert_close(nc_metrics(h, y, W, b), brute(h, y, W, b))


@pytest.mark.parametrize("d", [8, 96])  # 96: the float32 products of the default scatter_dtype
def test_large_offset_float32_precision(d):
    N, K = 600, 4
    g = torch.Generator().manual_seed(8)
    centres = 100.0 + 1e-2 * torch.randn(K, d, generator=g, dtype=torch.float64)
    y = torch.arange(N) % K
    h = (centres[y] + 1e-3 * torch.randn(N, d, generator=g, dtype=torch.float64)).float()
    W = torch.randn(K, d, generator=g)
    ref = brute(h, y, W)  # float64 on exactly the float32 input values
    m = nc_metrics(h, y, W)
    assert m["nc1"] == pytest.approx(ref["nc1"], rel=1e-6)
    assert_close(m, ref, rel=1e-6)

    # the test is sensitive: the naive float32 E[hh^T] - mu mu^T formula is badly wrong here
    Sw32 = torch.zeros(d, d)
    for c in range(K):
        hc = h[y == c]
        mu = hc.mean(0)
        Sw32 += (hc.T @ hc / len(hc) - torch.outer(mu, mu)) * len(hc) / N
    mus = torch.stack([h[y == c].mean(0) for c in range(K)]).double()
    md = mus - mus.mean(0)
    lam, V = torch.linalg.eigh(md.T @ md / K)
    pinv = V[:, -(K - 1):] @ torch.diag(1 / lam[-(K - 1):]) @ V[:, -(K - 1):].T
    naive32 = float(torch.trace(Sw32.double() @ pinv) / K)
    assert not math.isclose(naive32, ref["nc1"], rel_tol=0.5), (naive32, ref["nc1"])


def _offset_cloud(N, d, K, *, offset, spread, seed, dtype=torch.float64):
    """Features near collapse: K class centres 1e-2 apart at a large common offset, a tiny spread."""
    g = torch.Generator().manual_seed(seed)
    centres = offset + 1e-2 * torch.randn(K, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (N,), generator=g)
    h = centres[y] + spread * torch.randn(N, d, generator=g, dtype=torch.float64)
    W = torch.randn(K, d, generator=g, dtype=torch.float64)
    b = torch.randn(K, generator=g, dtype=torch.float64)
    return h.to(dtype), y, W, b


def test_float32_products_immune_to_a_harsh_offset():
    # offset 1e4, spread 1e-4: a float32 value of a feature cannot even hold its spread; centred first in float64,
    # the residuals lose nothing, and the float32 products agree with the all-float64 ones to 1e-6.
    h, y, W, b = _offset_cloud(3000, 96, 6, offset=1e4, spread=1e-4, seed=21)
    fast = nc_metrics(h, y, W, b)
    exact = nc_metrics(h, y, W, b, scatter_dtype=torch.float64)
    assert_close(fast, exact, rel=1e-6, abs_=0.0)
    assert fast["nc4"] == exact["nc4"]
    assert_close(exact, brute(h, y, W, b), rel=1e-6)


def test_float64_option_agrees_with_bruteforce_to_1e12():
    h, y, W, b = _clustered(2000, 96, 7, seed=22, dtype=torch.float64)
    assert_close(nc_metrics(h, y, W, b, scatter_dtype=torch.float64), brute(h, y, W, b), rel=1e-12, abs_=0.0)
    with pytest.raises(ValueError, match="scatter_dtype"):
        nc_metrics(h, y, W, b, scatter_dtype=torch.float16)


def test_reduced_precision_matmuls_fall_back_to_float64_products():
    h, y, W, b = _offset_cloud(500, 96, 4, offset=100.0, spread=1e-3, seed=24)
    exact = nc_metrics(h, y, W, b, scatter_dtype=torch.float64)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")  # float32 GEMMs may drop to bf16 / TF32: not good enough
    try:
        assert nc_metrics(h, y, W, b) == exact
    finally:
        torch.set_float32_matmul_precision(previous)


def test_float32_decisions_equal_float64_at_ties():
    # Integer features near 1000: a sample at the midpoint of two class means is exactly as near to both (an NCC
    # tie), and rows 0 and 1 of W differ by 1e-9 (logits 1e-9 apart: one float32 number, two float64 ones, row 1
    # the larger).  The fast path must re-decide such rows in float64 and agree with it sample by sample.
    d, g = 64, torch.Generator().manual_seed(23)
    base = torch.randint(-50, 50, (d,), generator=g).double() + 1000.0
    step = torch.zeros(d, dtype=torch.float64)
    step[:3] = torch.tensor([4.0, -2.0, 6.0])
    mid, c0, c1 = base, base + step, base - step
    noise = torch.randint(-3, 4, (40, d), generator=g).double()
    h = torch.cat([mid[None], 2 * c0[None] - mid, c0 + noise[:20], c0 - noise[:20],
                   mid[None], 2 * c1[None] - mid, c1 + noise[20:], c1 - noise[20:]]).float()
    y = torch.tensor([0] * 42 + [1] * 42)
    W = 0.5 + torch.rand(3, d, generator=g, dtype=torch.float64)
    W[1] = W[0] + 1e-9
    W[2] = -W[0]
    fast = CollapseAccumulator(3, d, chunk_size=16)
    exact = CollapseAccumulator(3, d, scatter_dtype=torch.float64)
    for acc in (fast, exact):
        acc.update_means(h, y)
        acc.finalize_means()
        acc.update_scatter(h, y, weight=W)
    # the classifier says 1 everywhere; the nearest centre says 0 for class 0 and for the tie of class 1 (first wins)
    assert exact.decisions.tolist() == [43, 84]
    assert torch.equal(fast.decisions, exact.decisions)
    assert_close(fast.compute(W), exact.compute(W), rel=1e-6)


def test_low_precision_inputs_are_exact_in_float64():
    h, y, W, b = _clustered(200, 6, 4, seed=9)
    hb = h.to(torch.bfloat16)
    assert_close(nc_metrics(hb, y, W.to(torch.bfloat16)), brute(hb.float(), y, W.to(torch.bfloat16).float()))


def test_input_validation():
    h, y, W, b = _clustered(50, 4, 3, seed=10)
    with pytest.raises(ValueError):
        nc_metrics(h, y + 3, W)  # labels outside [0, K)
    with pytest.raises(ValueError):
        nc_metrics(h, y, W[:, :3])
    with pytest.raises(ValueError):
        nc_metrics(h, y[:-1], W)


# ---------------------------------------------------------------------------------------
# streaming accumulator
# ---------------------------------------------------------------------------------------
# float32 products (d >= 64, the default) round differently when the stream is cut differently: ~1e-7 relative;
# below d = 64, or with scatter_dtype=float64, every product is float64 and two streams agree to ~1e-14.
STREAMS = pytest.mark.parametrize("d,scatter_dtype,rel", [(12, torch.float32, 1e-9), (96, torch.float64, 1e-9),
                                                          (96, torch.float32, 1e-6)])


@STREAMS
def test_streaming_many_batches_equals_functional(d, scatter_dtype, rel):
    h, y, W, b = _clustered(1000, d, 7, seed=11)
    logits = h @ W.T + b
    ref = nc_metrics(h, y, W, b, scatter_dtype=scatter_dtype)
    acc = CollapseAccumulator(7, d, scatter_dtype=scatter_dtype)
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
    batches = [perm[i : i + 37] for i in range(0, 1000, 37)]
    for idx in batches:
        acc.update_means(h[idx], y[idx])
    acc.finalize_means()
    for idx in reversed(batches):
        acc.update_scatter(h[idx], y[idx], logits[idx])
    assert_close(acc.compute(W, b), ref, rel=rel)


@STREAMS
def test_state_tensors_sum_reduction_like_ddp(d, scatter_dtype, rel):
    h, y, W, b = _clustered(600, d, 5, seed=12)
    logits = h @ W.T + b
    ref = nc_metrics(h, y, W, b, scatter_dtype=scatter_dtype)
    shards = [slice(0, 250), slice(250, 600)]
    ranks = [CollapseAccumulator(5, d, scatter_dtype=scatter_dtype) for _ in shards]
    for a, s in zip(ranks, shards):
        a.update_means(h[s], y[s])
    for t0, t1 in zip(ranks[0].state_tensors(), ranks[1].state_tensors()):  # all_reduce(SUM)
        total = t0 + t1
        t0.copy_(total)
        t1.copy_(total)
    for a in ranks:
        a.finalize_means()
        assert a.phase == "scatter"
    for a, s in zip(ranks, shards):
        a.update_scatter(h[s], y[s], logits[s])
    # the reduce_fn hook: each rank adds the other rank's tensors in state_tensors() order
    other = [t.clone() for t in ranks[1].state_tensors()]
    mine = [t.clone() for t in ranks[0].state_tensors()]
    it0, it1 = iter(other), iter(mine)
    m0 = ranks[0].compute(W, b, reduce_fn=lambda t: t.add_(next(it0)))
    m1 = ranks[1].compute(W, b, reduce_fn=lambda t: t.add_(next(it1)))
    assert_close(m0, ref, rel=rel)
    assert_close(m1, ref, rel=rel)
    assert ranks[0].compute(W, b) == m0  # a second compute does not reduce again


def test_compute_without_weight_gives_weight_free_family():
    h, y, W, b = _clustered(300, 6, 4, seed=13)
    acc = CollapseAccumulator(4, 6)
    acc.update_means(h, y)
    acc.finalize_means()
    acc.update_scatter(h, y)
    m = acc.compute(None)
    ref = nc_metrics(h, y, W, b)
    assert_close(m, ref, keys=["nc1", "nc1_trace", "cdnv", "nc2_equinorm", "nc2_equiangle", "nc2_maxangle", "nc2_etf_error"])
    assert "nc3" not in m and "proto_cos" not in m
    assert math.isnan(m["nc4"])  # no decisions were given


def test_accumulator_phase_errors_and_mismatch_warning():
    h, y, W, b = _clustered(100, 4, 3, seed=14)
    acc = CollapseAccumulator(3, 4)
    with pytest.raises(RuntimeError):
        acc.update_scatter(h, y)
    acc.update_means(h, y)
    acc.finalize_means()
    acc.update_scatter(h[:50], y[:50], weight=W, bias=b)
    with pytest.warns(RuntimeWarning, match="different samples"):
        acc.compute(W, b)


# ---------------------------------------------------------------------------------------
# online estimate
# ---------------------------------------------------------------------------------------
def test_online_with_frozen_features_equals_exact():
    K, d = 6, 10
    h, y, W, b = _clustered(900, d, K, seed=15)
    logits = h @ W.T + b
    ref = nc_metrics(h, y, W, b)
    online = OnlineCollapse(K, d, device="cpu")
    results = []
    for _epoch in range(2):
        for i in range(0, 900, 64):
            online.update(h[i : i + 64], y[i : i + 64], logits[i : i + 64])
        results.append(online.compute(W, b))
    first, second = results
    assert math.isnan(first["nc4"])  # no previous means to compare with yet
    assert_close(first, ref, rel=1e-8, keys=[k for k in METRIC_KEYS if k != "nc4"])
    assert_close(second, ref, rel=1e-9)
    # the shifts persist through state_dict
    fresh = OnlineCollapse(K, d)
    fresh.load_state_dict(online.state_dict())
    fresh.update(h, y, logits)
    assert_close(fresh.compute(W, b), ref, rel=1e-9)


# ---------------------------------------------------------------------------------------
# speed, plot, table
# ---------------------------------------------------------------------------------------
def _history():
    rows = []
    nc1 = [10.0, 1.0, 0.5, 0.05, 0.01]
    pc = [0.1, 0.5, 0.95, 0.97, 0.99]
    for e, (a, p) in enumerate(zip(nc1, pc), start=1):
        row = {"epoch": e, "collapse/nc1": a, "collapse/proto_cos": p, "collapse/nc4": 0.5 / e,
               "collapse_test/nc1": 3 * a, "collapse/layer1/nc1": 2 * a, "collapse/layer3/nc1": a}
        rows.append(row)
    rows.insert(2, {"epoch": 2.5, "train/loss": 1.0})  # an epoch without measurement
    return rows


def test_collapse_speed_hand_made_history():
    out = collapse_speed(_history())
    assert out["collapse_speed/epochs_to/nc1"] == 4
    assert out["collapse_speed/epochs_to/proto_cos"] == 3
    assert out["collapse_speed/epochs_to/nc4"] is None  # 0.1 > 0.01 at the end
    assert out["collapse_speed/epochs_to/nc3"] is None
    assert out["collapse_speed/auc_log10_nc1"] == pytest.approx(np.mean(np.log10([10, 1, 0.5, 0.05, 0.01])))
    assert set(f"collapse_speed/epochs_to/{k}" for k in DEFAULT_THRESHOLDS) <= set(out)
    custom = collapse_speed(_history(), {"nc1": 0.6, "proto_cos": (">=", 0.99), "nc4": ("<=", 0.2)})
    assert custom == {
        "collapse_speed/epochs_to/nc1": 3,
        "collapse_speed/epochs_to/proto_cos": 5,
        "collapse_speed/epochs_to/nc4": 3,
        "collapse_speed/auc_log10_nc1": out["collapse_speed/auc_log10_nc1"],
    }
    test = collapse_speed(_history(), {"nc1": 0.2}, prefix="collapse_test/")
    assert test["collapse_speed/epochs_to/nc1"] == 4  # 3 * nc1 = 0.15 at epoch 4
    assert collapse_speed([], {"nc1": 0.1}) == {"collapse_speed/epochs_to/nc1": None, "collapse_speed/auc_log10_nc1": None}
    json.dumps(out)
    with pytest.raises(ValueError):
        collapse_speed(_history(), {"nc1": ("<", 0.1)})


def test_plot_writes_png(tmp_path):
    path = plot_collapse(_history(), tmp_path / "run" / "collapse.png", "resnet + fixed simplex head")
    assert path is not None
    data = pathlib.Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plot_never_raises(tmp_path):
    with pytest.warns(RuntimeWarning):
        assert plot_collapse([{"epoch": 1, "train/loss": 1.0}], tmp_path / "x.png", "t") is None
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.warns(RuntimeWarning):
        assert plot_collapse(_history(), blocker / "collapse.png", "parent is a file") is None


def test_format_table():
    m = nc_metrics(*_clustered(100, 4, 3, seed=16))
    m["layer2/nc1"] = 0.5
    table = format_table({**m, "extra": None})
    lines = table.splitlines()
    assert lines[0] == "| measure | value |" and lines[1] == "|---|---|"
    assert lines[2].startswith("| nc1 |") and lines[3].startswith("| nc1_trace |")
    assert any(line.startswith("| extra | –") for line in lines)
    assert len(lines) == 2 + len(m) + 1


# ---------------------------------------------------------------------------------------
# measure_model
# ---------------------------------------------------------------------------------------
class _Head(nn.Module):
    def __init__(self, K, d):
        super().__init__()
        self.linear = nn.Linear(d, K)

    @property
    def weight(self):
        return self.linear.weight

    @property
    def bias(self):
        return self.linear.bias

    def forward(self, h):
        return self.linear(h)


class TinyClassifier(nn.Module):
    """The ARCH interface: backbone -> proj -> head, model(x, return_features=True)."""

    def __init__(self, backbone, width, d, K):
        super().__init__()
        self.backbone = backbone
        self.proj = nn.Linear(width, d, bias=False)
        self.head = _Head(K, d)
        self.dim, self.num_classes = d, K

    def forward_features(self, x):
        return self.proj(self.backbone(x))

    def forward(self, x, return_features=False):
        h = self.forward_features(x)
        logits = self.head(h)
        return (logits, h) if return_features else logits


def _mlp_model(in_dim=8, d=6, K=4):
    torch.manual_seed(0)
    bb = nn.Sequential(nn.Linear(in_dim, 16), nn.ReLU(), nn.Dropout(0.5))
    return TinyClassifier(bb, 16, d, K)


def _features_of(model, x):
    model.eval()
    with torch.no_grad():
        logits, h = model(x, return_features=True)
    return logits, h


def test_measure_model_matches_nc_metrics_and_restores_mode():
    model = _mlp_model()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(150, 8, generator=g)
    y = torch.arange(150) % 4
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)
    model.train()
    model.backbone[2].eval()  # a submodule in its own mode must be restored as it was
    m = measure_model(model, loader, device="cpu")
    assert model.training and model.proj.training and not model.backbone[2].training
    _, h = _features_of(model, x)
    assert_close(m, nc_metrics(h, y, model.head.weight.detach(), model.head.bias.detach()), rel=1e-9)


def test_measure_model_max_samples_deterministic_subset():
    model = _mlp_model()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 8, generator=g)
    y = torch.arange(300) % 4
    loader = DataLoader(TensorDataset(x, y), batch_size=50, shuffle=True, drop_last=True)
    a = measure_model(model, loader, device="cpu", max_samples=120, seed=7)
    b = measure_model(model, loader, device="cpu", max_samples=120, seed=7)
    c = measure_model(model, loader, device="cpu", max_samples=120, seed=8)
    assert a == b and a != c
    idx = torch.randperm(300, generator=torch.Generator().manual_seed(7))[:120]
    logits, h = _features_of(model, x[idx])
    assert_close(a, nc_metrics(h, y[idx], model.head.weight.detach(), model.head.bias.detach()), rel=1e-9)
    # larger than the dataset: everything, without dropping the last batch
    full = measure_model(model, loader, device="cpu", max_samples=10_000)
    _, h = _features_of(model, x)
    assert_close(full, nc_metrics(h, y, model.head.weight.detach(), model.head.bias.detach()), rel=1e-9)


def test_measure_model_autocast_bf16_runs():
    model = _mlp_model()
    x = torch.randn(64, 8)
    y = torch.arange(64) % 4
    m = measure_model(model, DataLoader(TensorDataset(x, y), batch_size=16), device="cpu", autocast_dtype="bf16")
    assert set(METRIC_KEYS) <= set(m) and all(math.isfinite(m[k]) for k in METRIC_KEYS)


def test_deep_collapse_layers_on_timm_backbone():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    backbone = timm.create_model("test_resnet", num_classes=0)
    model = TinyClassifier(backbone, backbone.num_features, 8, 3)
    x = torch.randn(24, 3, 32, 32)
    y = torch.arange(24) % 3
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    m = measure_model(model, loader, device="cpu", layers=[1, -1])
    assert {"layer1/nc1", "layer1/nc1_trace", "layer4/nc1", "layer4/nc1_trace"} <= set(m)
    assert not any(k.startswith("layer-") for k in m)
    model.eval()
    with torch.no_grad():
        feats = backbone.forward_intermediates(x, indices=[1, 4], intermediates_only=True)
    for i, f in zip((1, 4), feats):
        pooled = f.mean(dim=(2, 3))
        ref = nc_metrics(pooled, y, torch.randn(3, pooled.shape[1]))
        assert m[f"layer{i}/nc1"] == pytest.approx(ref["nc1"], rel=1e-6)
        assert m[f"layer{i}/nc1_trace"] == pytest.approx(ref["nc1_trace"], rel=1e-6)
    everything = measure_model(model, loader, device="cpu", layers="all")
    assert sorted(k for k in everything if k.startswith("layer")) == sorted(
        f"layer{i}/{k}" for i in range(5) for k in ("nc1", "nc1_trace")
    )
    assert everything["layer4/nc1"] == pytest.approx(m["layer4/nc1"], rel=1e-9)
    with pytest.raises(ValueError, match="out of range"):
        measure_model(model, loader, device="cpu", layers=[7])


def test_deep_collapse_needs_forward_intermediates():
    model = _mlp_model()
    loader = DataLoader(TensorDataset(torch.randn(8, 8), torch.arange(8) % 4), batch_size=4)
    with pytest.raises(ValueError, match="forward_intermediates"):
        measure_model(model, loader, device="cpu", layers=[0])


# ---------------------------------------------------------------------------------------
# the naive reference
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("N,d,K,absent", [(300, 16, 6, False), (300, 3, 8, False), (240, 10, 7, True)])
def test_naive_reference_matches(N, d, K, absent):
    naive = _load_naive()
    labels = None
    if absent:
        labels = torch.tensor([0, 1, 2, 4, 6] * (N // 5))
    h, y, W, b = _clustered(N, d, K, seed=17, labels=labels)
    assert_close(naive.naive_nc_metrics(h, y, W, b), nc_metrics(h, y, W, b), rel=1e-6)


# ---------------------------------------------------------------------------------------
# one forward pass: the feature cache
# ---------------------------------------------------------------------------------------
class _CountingLoader:
    """A loader that counts how often it is iterated (one iteration = one forward pass over the split)."""

    def __init__(self, loader):
        self.loader, self.passes = loader, 0
        self.dataset, self.batch_size, self.sampler = loader.dataset, loader.batch_size, loader.sampler

    def __iter__(self):
        self.passes += 1
        return iter(self.loader)


def _same_bits(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key] or (math.isnan(a[key]) and math.isnan(b[key])), (key, a[key], b[key])


@pytest.mark.parametrize("layers, dim", [(None, 6), ([1, -1], 6), (None, 96)])  # d = 96: float32 products
def test_cached_pass_is_bit_for_bit_the_two_pass_measure(layers, dim):
    import timm

    torch.manual_seed(0)
    backbone = timm.create_model("test_resnet", num_classes=0)
    model = TinyClassifier(backbone, backbone.num_features, dim, 4)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(70, 3, 16, 16, generator=g), torch.arange(70) % 4
    streamed_loader = _CountingLoader(DataLoader(TensorDataset(x, y), batch_size=16))
    cached_loader = _CountingLoader(DataLoader(TensorDataset(x, y), batch_size=16))
    streamed = measure_model(model, streamed_loader, device="cpu", layers=layers, cache_mb=0)
    cached = measure_model(model, cached_loader, device="cpu", layers=layers)
    assert (streamed_loader.passes, cached_loader.passes) == (2, 1)
    _same_bits(cached, streamed)
    # a budget too small for the split falls back to the second forward pass, with the same bits
    small_loader = _CountingLoader(DataLoader(TensorDataset(x, y), batch_size=16))
    _same_bits(measure_model(model, small_loader, device="cpu", layers=layers, cache_mb=0.001), streamed)
    assert small_loader.passes == 2


def test_feature_cache_empties_itself_past_its_budget():
    from fixedcls.collapse import FeatureCache
    from fixedcls.errors import FixedclsError

    h, y, logits = torch.zeros(100, 8), torch.zeros(100, dtype=torch.long), torch.zeros(100, 4)
    per_batch = h.numel() * 4 + y.numel() * 8 + logits.numel() * 4
    cache = FeatureCache(2.5 * per_batch / 2**20)
    cache.add(h, y, logits)
    cache.add(h, y, logits)
    assert cache.complete and len(cache.batches) == 2 and cache.nbytes == 2 * per_batch
    cache.add(h, y, logits)
    assert not cache.complete and cache.batches == [] and cache.nbytes == 0
    cache.add(h, y, logits)  # stays off: the caller streams the loader again
    assert not cache.complete and cache.batches == []
    assert not FeatureCache(0).complete
    with pytest.raises(FixedclsError, match="cache_mb must be >= 0"):
        FeatureCache(-1)


def test_cache_without_its_accumulator_is_refused():
    from fixedcls.collapse import FeatureCache
    from fixedcls.errors import FixedclsError

    model = _mlp_model()
    loader = DataLoader(TensorDataset(torch.randn(8, 8), torch.arange(8) % 4), batch_size=4)
    with pytest.raises(FixedclsError, match="cache= holds the outputs of a pass 1"):
        measure_model(model, loader, device="cpu", cache=FeatureCache(1))
