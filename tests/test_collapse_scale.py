"""Collapse at vocabulary scale (issue 29): gnc2_log, gnc2_log_var, unc3, ncc_acc and nc5 against a brute-force
float64 computation, the tiled pairwise reductions and chunked decisions against the untiled ones, the streaming
paths against the in-memory one, and the memory of a measure at many classes."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from fixedcls.collapse import EXTRA_KEYS, METRIC_KEYS, CollapseAccumulator, OnlineCollapse, nc_metrics
from fixedcls.collapse.pairwise import pairwise_measures

NEW_KEYS = EXTRA_KEYS + ("nc5",)


def _clustered(N, d, K, *, spread=1.0, sep=3.0, seed=0, labels=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    centres = sep * torch.randn(K, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (N,), generator=g) if labels is None else labels
    h = centres[y] + spread * torch.randn(N, d, generator=g, dtype=torch.float64)
    W = centres + 0.5 * torch.randn(K, d, generator=g, dtype=torch.float64)
    b = 0.1 * torch.randn(K, generator=g, dtype=torch.float64)
    ood = 0.5 * torch.randn(N // 3, d, generator=g, dtype=torch.float64) + torch.randn(d, generator=g, dtype=torch.float64)
    return h.to(dtype), y, W.to(dtype), b.to(dtype), ood.to(dtype)


def brute_new(features, labels, weight, ood=None) -> dict[str, float]:
    """The new keys straight from their definitions (docs/measures.md), float64 numpy, explicit loops over pairs."""
    H, y, W = features.double().numpy(), labels.numpy(), weight.double().numpy()
    cls = sorted(set(y.tolist()))
    K = len(cls)
    mu = np.stack([H[y == c].mean(0) for c in cls])
    Md = mu - mu.mean(0)
    U = Md / np.linalg.norm(Md, axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):  # two means in one direction from mu_G: -log 0 = inf
        values = np.array([-np.log(np.linalg.norm(U[i] - U[j])) for i in range(K) for j in range(i + 1, K)])
        out = {"gnc2_log": values.mean(), "gnc2_log_var": np.mean((values - values.mean()) ** 2)}
    Wp = W[cls]
    cos = np.sum(Wp * Md, 1) / (np.linalg.norm(Wp, axis=1) * np.linalg.norm(Md, axis=1))
    out["unc3"] = cos.std(ddof=1) / cos.mean()
    dist = ((H[:, None, :] - mu[None, :, :]) ** 2).sum(2)
    out["ncc_acc"] = np.mean(np.array(cls)[np.argmin(dist, axis=1)] == y)  # argmin: the first of equal distances
    if ood is not None:
        m = ood.double().numpy().mean(0)
        out["nc5"] = np.mean(np.abs(mu @ m / (np.linalg.norm(mu, axis=1) * np.linalg.norm(m))))
    return {k: float(v) for k, v in out.items()}


def assert_close(a: dict, b: dict, keys, rel=1e-9, abs_=1e-12):
    for k in keys:
        assert math.isclose(a[k], b[k], rel_tol=rel, abs_tol=abs_), f"{k}: {a[k]!r} vs {b[k]!r}"


# ------------------------------------------------------------------------------------------- the new keys


# d >= 64 takes float32 products by default (class means to ~1e-7 of the spread); scatter_dtype=float64 all float64
@pytest.mark.parametrize("d,scatter_dtype,rel", [(16, torch.float32, 1e-9), (96, torch.float64, 1e-9), (96, torch.float32, 1e-6)])
def test_new_keys_match_bruteforce(d, scatter_dtype, rel):
    h, y, W, b, ood = _clustered(900, d, 9, seed=1)
    m = nc_metrics(h, y, W, b, ood_features=ood, scatter_dtype=scatter_dtype)
    assert set(METRIC_KEYS + NEW_KEYS) <= set(m)
    assert_close(m, brute_new(h, y, W, ood), NEW_KEYS, rel=rel)
    assert 0.0 < m["ncc_acc"] <= 1.0 and m["gnc2_log_var"] > 0
    assert "nc5" not in nc_metrics(h, y, W, b)  # only with OOD features


def test_absent_classes_are_left_out_of_the_new_keys():
    labels = torch.tensor([0, 2, 3, 5, 6] * 60)  # classes 1 and 4 have no sample
    h, y, W, b, ood = _clustered(len(labels), 12, 7, seed=2, labels=labels)
    W[1] *= 40.0  # an absent row must not enter unc3
    W[4] = -W[4]
    m = nc_metrics(h, y, W, b, ood_features=ood)
    assert_close(m, brute_new(h, y, W, ood), NEW_KEYS)
    present = torch.tensor([0, 2, 3, 5, 6])
    compact = nc_metrics(h, torch.searchsorted(present, y), W[present], b[present], ood_features=ood)
    assert_close(m, compact, NEW_KEYS)


def test_near_collapse_known_answers_and_bruteforce():
    K, d = 8, 12
    g = torch.Generator().manual_seed(3)
    centred = torch.eye(K, dtype=torch.float64) - 1.0 / K
    simplex = centred @ torch.linalg.eigh(centred).eigenvectors[:, 1:]  # [K, K-1]: the null direction (ones) dropped
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    W = (simplex / simplex.norm(dim=1, keepdim=True)) @ q[: K - 1]  # a regular simplex in R^d, rows summing to zero
    y = torch.arange(20 * K) % K
    h = 3.0 * W[y] + 1e-7 * torch.randn(20 * K, d, generator=g, dtype=torch.float64)
    m = nc_metrics(h, y, W, scatter_dtype=torch.float64)
    # exact simplex: ||u_c - u_c'|| = sqrt(2 + 2/(K-1)) for every pair, unit cosines to the rows, every sample nearest
    assert m["gnc2_log"] == pytest.approx(-0.5 * math.log(2.0 * K / (K - 1)), abs=1e-6)
    assert m["gnc2_log_var"] < 1e-12 and abs(m["unc3"]) < 1e-9 and m["ncc_acc"] == 1.0
    ref = brute_new(h, y, W)
    assert_close(m, ref, ("gnc2_log", "ncc_acc"), rel=1e-12)
    # the spread of the pair values near collapse (~1e-14) keeps its digits: two-pass moments per tile
    assert m["gnc2_log_var"] == pytest.approx(ref["gnc2_log_var"], rel=1e-4, abs=1e-30)
    assert m["unc3"] == pytest.approx(ref["unc3"], abs=1e-12)


def _tie_data():
    """Integer features: class means 0 (at +s), 1 (at -s), 2 (at 4s) from a common 1000; samples at the midpoint of 0
    and 1 are exactly as near to both (the first, class 0, wins), two labelled 1 and two labelled 2, each with its
    mirror through its class mean so the means stay put.  Every value and mean is exact in float32."""
    d = 64
    s = torch.zeros(d, dtype=torch.float64)
    s[:3] = torch.tensor([6.0, -3.0, 9.0])  # the mean of the means, base + 4s/3, is an integer vector too
    base = torch.full((d,), 1000.0, dtype=torch.float64)
    means = torch.stack([base + s, base - s, base + 4 * s])
    noise = torch.zeros(6, d, dtype=torch.float64)  # orthogonal to s: these samples are nearest their own mean
    noise[:, 10:13] = torch.tensor([[1.0, 0, 0], [0, 2, 0], [0, 0, 3], [1, 1, 0], [0, 1, 1], [2, 0, 1]])
    rows, labels = [], []
    for c in range(3):
        rows += [means[c] + noise, means[c] - noise]
        labels += [c] * 12
    for c in (1, 2):
        rows += [base[None], base[None], (2 * means[c] - base)[None], (2 * means[c] - base)[None]]
        labels += [c] * 4
    return torch.cat(rows), torch.tensor(labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tile", [1, 2, 512])  # 1 and 2: the chunked decisions; 512: the per-class table
def test_ties_in_the_nearest_centre_decision(dtype, tile):
    h, y = _tie_data()
    h = h.to(dtype)
    W = torch.randn(3, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref = brute_new(h, y, W)
    for scatter_dtype in (torch.float32, torch.float64):
        m = nc_metrics(h, y, W, scatter_dtype=scatter_dtype, tile=tile)
        assert m["ncc_acc"] == ref["ncc_acc"]
    # two midpoints labelled 1 and two labelled 2 go to class 0: 4 of 44 samples miss, the rest are nearest their own
    assert ref["ncc_acc"] == pytest.approx(40 / 44)


# ------------------------------------------------------------------------------------------- tiles and chunks


@pytest.mark.parametrize("K", [2, 3, 13])
def test_tiled_pairwise_reductions_equal_the_untiled_ones(K):
    g = torch.Generator().manual_seed(K)
    md = torch.randn(K, 7, generator=g, dtype=torch.float64)
    md -= md.mean(dim=0)
    var = torch.rand(K, generator=g, dtype=torch.float64)
    whole = pairwise_measures(md, var, tile=K)
    for tile in range(1, K + 1):
        assert_close(pairwise_measures(md, var, tile=tile), whole, list(whole), rel=1e-12, abs_=1e-15)


@pytest.mark.parametrize("d,dtype", [(16, torch.float32), (96, torch.float32), (96, torch.float64)])
def test_tiled_nc_metrics_equal_the_untiled_ones(d, dtype):
    h, y, _, b, ood = _clustered(1500, d, 23, spread=math.sqrt(d), seed=5, dtype=dtype)
    W = torch.randn(23, d, generator=torch.Generator().manual_seed(55), dtype=torch.float64).to(dtype)
    whole = nc_metrics(h, y, W, b, ood_features=ood)
    for tile in (1, 4, 7):  # K = 23 > tile: pairwise over tiles, decisions over class chunks
        tiled = nc_metrics(h, y, W, b, ood_features=ood, tile=tile)
        assert tiled["nc4"] == whole["nc4"] and tiled["ncc_acc"] == whole["ncc_acc"]
        assert_close(tiled, whole, METRIC_KEYS + NEW_KEYS, rel=1e-12, abs_=1e-15)
    assert 0 < whole["nc4"] < 1 and 0 < whole["ncc_acc"] < 1  # decisions that can go either way were taken


def test_chunked_decisions_with_logits_and_without_a_classifier():
    h, y, W, b, _ = _clustered(800, 80, 11, spread=2.5, seed=6)
    logits = h @ W.T + b
    results = []
    for tile in (3, 512):
        acc = CollapseAccumulator(11, 80, tile=tile)
        acc.update_means(h, y)
        acc.finalize_means()
        acc.update_scatter(h[:500], y[:500], logits[:500])
        acc.update_scatter(h[500:], y[500:])  # no classifier: ncc_acc still counts these, nc4 does not
        results.append((acc.decisions.clone(), acc.ncc_hits.clone(), acc.compute(W, b)))
    (dec_t, hits_t, tiled), (dec_w, hits_w, whole) = results
    assert torch.equal(dec_t, dec_w) and dec_w[1] == 500
    assert torch.equal(hits_t, hits_w) and hits_w[1] == 800
    assert whole["ncc_acc"] == pytest.approx(brute_new(h, y, W)["ncc_acc"], abs=0)


# ------------------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("tile", [3, 512])
def test_streaming_and_ddp_sums_equal_the_in_memory_measure(tile):
    h, y, W, b, ood = _clustered(1200, 16, 9, seed=7)
    logits = h @ W.T + b
    ref = nc_metrics(h, y, W, b, ood_features=ood, tile=tile)
    shards = [slice(0, 500), slice(500, 1200)]
    ranks = [CollapseAccumulator(9, 16, tile=tile) for _ in shards]
    for acc, s in zip(ranks, shards):
        for i in range(s.start, s.stop, 64):
            acc.update_means(h[i : min(i + 64, s.stop)], y[i : min(i + 64, s.stop)])
    total = [a + b_ for a, b_ in zip(ranks[0].state_tensors(), ranks[1].state_tensors())]
    for acc in ranks:
        for t, value in zip(acc.state_tensors(), total):
            t.copy_(value)
        acc.finalize_means()
    for acc, s, o in zip(ranks, shards, (ood[:100], ood[100:])):
        acc.update_scatter(h[s], y[s], logits[s])
        acc.update_ood(o)  # each rank its own share of the OOD features
    other = [t.clone() for t in ranks[1].state_tensors()]
    it = iter(other)
    m = ranks[0].compute(W, b, reduce_fn=lambda t: t.add_(next(it)))
    assert_close(m, ref, METRIC_KEYS + NEW_KEYS, rel=1e-9)


def test_online_mode_new_keys():
    K, d = 6, 10
    h, y, W, b, ood = _clustered(900, d, K, seed=8)
    logits = h @ W.T + b
    ref = nc_metrics(h, y, W, b, ood_features=ood)
    for tile in (2, 512):
        online = OnlineCollapse(K, d, tile=tile)
        results = []
        for _epoch in range(2):
            for i in range(0, 900, 64):
                online.update(h[i : i + 64], y[i : i + 64], logits[i : i + 64])
            online.update_ood(ood)
            results.append(online.compute(W, b))
        first, second = results
        assert math.isnan(first["ncc_acc"])  # no previous means to be near yet
        assert_close(first, ref, ("gnc2_log", "gnc2_log_var", "unc3", "nc5"), rel=1e-8)
        assert_close(second, ref, NEW_KEYS, rel=1e-8)  # frozen features: the previous means are the means


def test_online_state_written_before_the_new_sums_still_resumes():
    K, d = 4, 6
    h, y, W, b, _ = _clustered(200, d, K, seed=9)
    online = OnlineCollapse(K, d)
    online.update(h, y)
    online.compute(W, b)
    online.update(h[:100], y[:100])
    state = online.state_dict()
    old = {k: v for k, v in state.items() if k not in ("ncc_hits", "ood")}  # what an earlier fixedcls wrote
    resumed = OnlineCollapse(K, d)
    resumed.load_state_dict(old)
    assert torch.equal(resumed.sums, online.sums) and resumed.ncc_hits.sum() == 0


# ------------------------------------------------------------------------------------------- memory


def test_many_classes_in_bounded_memory():
    # K = 12,000: one K x K float64 matrix is 1.15 GB, and the untiled code built several.  The measure must stay far
    # below one of them (peak RSS of a fresh process, before and during the call).
    script = textwrap.dedent("""
        import json, resource, torch
        from fixedcls.collapse import nc_metrics
        torch.set_num_threads(1)
        K, d = 12000, 8
        g = torch.Generator().manual_seed(0)
        centres = 3.0 * torch.randn(K, d, generator=g)
        y = torch.arange(2 * K) % K
        h = centres[y] + torch.randn(2 * K, d, generator=g)
        nc_metrics(h[:64], y[:64] % 8, centres[:8])  # warm up the kernels
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        m = nc_metrics(h, y, centres)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"grew_mb": (after - before) / 1024, "ncc_acc": m["ncc_acc"], "gnc2_log": m["gnc2_log"]}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["grew_mb"] < 300, result
    assert 0 < result["ncc_acc"] <= 1 and math.isfinite(result["gnc2_log"])
