"""The unconstrained-features model as an oracle: closed forms and the convex oracle against an
independent numerical minimisation, and the simulator (measured by nc_metrics) against both."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from fixedcls import polytopes
from fixedcls import ufm
from fixedcls.errors import FixedclsError
from fixedcls.commands.ufm import main as ufm_main

F64 = torch.float64


# --------------------------------------------------------------------------- an independent minimiser


def minimise(objective, shapes, seeds=(0, 1, 2)):
    """L-BFGS in float64 from several Gaussian starts; returns (values per start, params of the best)."""
    results = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        params = [torch.randn(*shape, generator=gen, dtype=F64).requires_grad_() for shape in shapes]
        opt = torch.optim.LBFGS(params, lr=1, max_iter=4000, max_eval=20000, tolerance_grad=1e-10,
                                tolerance_change=0, history_size=50, line_search_fn="strong_wolfe")

        def closure(opt=opt, params=params):  # bound now: the loop rebinds both
            opt.zero_grad()
            value = objective(*params)
            value.backward()
            return value

        opt.step(closure)
        with torch.no_grad():
            results.append((float(objective(*params)), [p.detach() for p in params]))
    values = [value for value, _ in results]
    return values, min(results, key=lambda r: r[0])[1]


def labels_of(counts):
    return torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))


def ce_problem(counts, lambda_w, lambda_h):
    y = labels_of(counts)

    def f(W, H):
        return F.cross_entropy(H @ W.T, y) + lambda_w / 2 * W.pow(2).sum() + lambda_h / 2 * H.pow(2).sum()

    return f, y


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


# --------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("K, n, lambda_w, lambda_h, d", [(4, 3, 1e-2, 2e-2, 4), (3, 2, 5e-2, 1e-2, 2)])
def test_ce_closed_form_is_the_numerical_minimum(K, n, lambda_w, lambda_h, d):
    best = ufm.ce_optimum(K, n, lambda_w, lambda_h)
    f, y = ce_problem([n] * K, lambda_w, lambda_h)
    values, (W, H) = minimise(f, [(K, d), (K * n, d)])
    assert not best["trivial"]
    for value in values:  # every start finds the same minimum: the landscape has no spurious minima
        assert rel(value, best["objective"]) < 1e-6
    assert torch.allclose(W.pow(2).sum(1), torch.full((K,), best["w_norm_sq"], dtype=F64), rtol=1e-6)
    assert torch.allclose(H.pow(2).sum(1), torch.full((K * n,), best["h_norm_sq"], dtype=F64), rtol=1e-6)
    logits = H @ W.T
    correct = logits.gather(1, y[:, None]).squeeze(1)
    assert torch.allclose(correct, torch.full_like(correct, best["correct_logit"]), rtol=1e-6)
    wrong = logits[F.one_hot(y, K) == 0]
    assert torch.allclose(wrong, torch.full_like(wrong, best["wrong_logit"]), rtol=1e-5)
    assert math.isclose(best["correct_prob"], float(torch.softmax(logits, 1)[0, 0]), rel_tol=1e-6)


@pytest.mark.parametrize("side", [0.9, 1.1])
def test_ce_trivial_threshold_from_both_sides(side):
    K, n, lambda_w = 3, 2, 0.05
    threshold = ufm.ce_optimum(K, n, lambda_w, lambda_w)["lambda_threshold"]  # on sqrt(lambda_w lambda_h)
    lambda_h = (side * threshold) ** 2 / lambda_w
    best = ufm.ce_optimum(K, n, lambda_w, lambda_h)
    f, _ = ce_problem([n] * K, lambda_w, lambda_h)
    values, (W, H) = minimise(f, [(K, K), (K * n, K)])
    assert best["trivial"] is (side > 1)
    assert max(rel(v, best["objective"]) for v in values) < 1e-6
    if side > 1:
        assert best["objective"] == math.log(K) and float(W.abs().max()) < 1e-5 and float(H.abs().max()) < 1e-5
    else:
        assert best["objective"] < math.log(K) - 1e-4 and rel(float(W.pow(2).sum(1).mean()), best["w_norm_sq"]) < 1e-5


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("side", [0.5, 1.2])
def test_mse_closed_form_is_the_numerical_minimum(bias, side):
    K, n, lambda_w = 4, 3, 0.02
    lambda_h = (side / (K * math.sqrt(n))) ** 2 / lambda_w
    best = ufm.mse_optimum(K, n, lambda_w, lambda_h, bias=bias)
    y = labels_of([n] * K)
    target = F.one_hot(y, K).to(F64)

    def f(W, H, b):
        logits = H @ W.T + (b if bias else 0)
        regulariser = lambda_w / 2 * W.pow(2).sum() + lambda_h / 2 * H.pow(2).sum()
        return 0.5 * (logits - target).pow(2).sum(1).mean() + regulariser

    values, (W, H, b) = minimise(f, [(K, K), (K * n, K), (K,)])
    assert best["trivial"] is (side > 1)
    assert max(rel(v, best["objective"]) for v in values) < 1e-6
    if bias:
        assert torch.allclose(b, torch.full((K,), best["bias"], dtype=F64), atol=1e-6)
    if side > 1:
        assert float(W.abs().max()) < 1e-5
        return
    gram = W @ W.T
    assert torch.allclose(gram.diagonal(), torch.full((K,), best["w_norm_sq"], dtype=F64), rtol=1e-6)
    off = gram[~torch.eye(K, dtype=torch.bool)] / best["w_norm_sq"]
    # Without bias an orthogonal frame, with bias a simplex ETF (cosine -1/(K-1)).
    assert torch.allclose(off, torch.full_like(off, -1 / (K - 1) if bias else 0.0), atol=1e-6)
    assert torch.allclose(H.pow(2).sum(1), torch.full((K * n,), best["h_norm_sq"], dtype=F64), rtol=1e-6)
    logits = H @ W.T + (b if bias else 0)
    assert math.isclose(float(logits[0, 0]), best["correct_logit"], rel_tol=1e-6)
    assert math.isclose(float(logits[0, 1]), best["wrong_logit"], rel_tol=1e-6, abs_tol=1e-8)


# --------------------------------------------------------------------------- the convex oracle


def test_convex_oracle_is_the_nonconvex_minimum_on_imbalanced_counts():
    counts, lambda_w, lambda_h = [6, 6, 2, 1], 0.01, 0.02
    oracle = ufm.ce_convex_oracle(counts, lambda_w, lambda_h)
    f, y = ce_problem(counts, lambda_w, lambda_h)
    K = len(counts)
    values, (W, H) = minimise(f, [(K, K), (len(y), K)])
    assert oracle["gap"] <= 1e-12
    assert max(rel(v, oracle["objective"]) for v in values) < 1e-6
    # W and H are unique up to a rotation of R^d: compare what a rotation keeps.
    class_features = H[[sum(counts[:k]) for k in range(K)]]  # the first sample of each class
    assert torch.allclose(class_features @ W.T, torch.from_numpy(oracle["logits"]), atol=1e-5)
    assert torch.allclose(W @ W.T, torch.from_numpy(oracle["W"] @ oracle["W"].T), atol=1e-5)
    recovered = float(f(torch.from_numpy(oracle["W"]), torch.from_numpy(oracle["features"])[y]))
    assert rel(recovered, oracle["objective"]) < 1e-12  # the factors reproduce the convex minimum


def test_convex_oracle_reduces_to_the_closed_form_when_balanced():
    oracle = ufm.ce_convex_oracle([5] * 6, 0.01, 0.004)
    best = ufm.ce_optimum(6, 5, 0.01, 0.004)
    assert rel(oracle["objective"], best["objective"]) < 1e-12
    assert max(rel(float(v), best["w_norm_sq"]) for v in oracle["w_norm_sq"]) < 1e-9
    assert max(rel(float(v), best["h_norm_sq"]) for v in oracle["h_norm_sq"]) < 1e-9


def test_minority_collapse_threshold_is_exact_in_the_oracle():
    lambda_w, lambda_h, K_A, K_B, n_B = 0.02, 0.03, 2, 3, 4
    ratio = ufm.minority_collapse_threshold(K_A, K_B, n_B, lambda_w, lambda_h)
    below, above = math.floor(ratio * n_B), math.ceil(ratio * n_B)  # the integer counts either side
    spreads = {}
    for n_A in (below, above):
        counts = [n_A] * K_A + [n_B] * K_B
        spreads[n_A] = ufm.minority_spread(ufm.ce_convex_oracle(counts, lambda_w, lambda_h)["W"], counts)
    assert below / n_B < ratio < above / n_B
    assert spreads[below] > 0.1 and spreads[above] < 1e-12


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_simulator_collapses_minority_classifiers_above_the_threshold_only(factor):
    lambda_w, lambda_h, K_A, K_B, n_B = 0.02, 0.03, 2, 3, 4
    ratio = ufm.minority_collapse_threshold(K_A, K_B, n_B, lambda_w, lambda_h)
    counts = [round(factor * ratio * n_B)] * K_A + [n_B] * K_B
    sim = ufm.simulate(counts, len(counts), lambda_w, lambda_h)
    assert sim.converged
    spread = ufm.minority_spread(sim.W, counts)
    assert (spread < 1e-6) if factor > 1 else (spread > 0.5)


# --------------------------------------------------------------------------- the simulator


@pytest.mark.parametrize("dim", [9, 10])
def test_simulate_balanced_ce_reaches_the_closed_form(dim):
    K, n, lambda_w, lambda_h = 10, 5, 5e-3, 5e-3
    sim = ufm.simulate([n] * K, dim, lambda_w, lambda_h)
    best = ufm.ce_optimum(K, n, lambda_w, lambda_h)
    assert sim.converged
    assert rel(sim.objective, best["objective"]) < 1e-10
    assert max(rel(float(v), best["w_norm_sq"]) for v in sim.W.pow(2).sum(1)) < 1e-4
    assert max(rel(float(v), best["h_norm_sq"]) for v in sim.H.pow(2).sum(1)) < 1e-4
    end = sim.metrics
    assert end["nc1"] < 1e-4 and end["nc2_etf_error"] < 1e-4 and end["nc3"] < 1e-4
    assert [row["step"] for row in sim.history] == sorted({row["step"] for row in sim.history})
    assert sim.history[0]["step"] == 0 and sim.history[-1]["step"] == sim.steps
    assert sim.history[0]["nc1"] > 1  # it starts uncollapsed: the measures see the whole way


@pytest.mark.parametrize("loss, bias", [("mse", False), ("mse", True)])
def test_simulate_mse_reaches_the_closed_form(loss, bias):
    sim = ufm.simulate([4] * 5, 5, 0.01, 0.02, loss=loss, bias=bias)
    best = ufm.mse_optimum(5, 4, 0.01, 0.02, bias=bias)
    assert sim.converged and rel(sim.objective, best["objective"]) < 1e-10
    assert rel(float(sim.W.pow(2).sum(1).mean()), best["w_norm_sq"]) < 1e-4
    # Centred, an orthogonal frame is a simplex ETF too, so nc2 cannot tell the two optima apart;
    # nc3 can: without bias W is not centred and differs from the centred means.
    assert sim.metrics["nc2_etf_error"] < 1e-4
    assert (sim.metrics["nc3"] < 1e-4) is bias


@pytest.mark.parametrize("head", ["simplex", "dcube", "orthoplex", "hadamard", "etf"])
@pytest.mark.parametrize("counts", [[4] * 6, [9, 9, 9, 2, 1, 1]])
def test_simulate_fixed_heads_end_at_the_fixed_head_optimum(head, counts):
    theory = ufm.global_optimum(counts, 0.0, 0.01, head=head)
    sim = ufm.simulate(counts, theory.W.shape[1], 0.0, 0.01, head=head)
    assert sim.converged and rel(sim.objective, theory.objective) < 1e-10
    assert torch.allclose(sim.class_means, theory.features, atol=1e-6)
    assert torch.allclose(sim.W, theory.W)
    for key in ("nc2_etf_error", "nc3", "proto_cos"):
        assert abs(sim.metrics[key] - theory.metrics()[key]) < 1e-5


def test_fixed_simplex_features_align_whatever_the_counts():
    W = polytopes.make("simplex", 6)
    seen = []
    for counts in ([5] * 6, [25, 1, 1, 1, 1, 1], [1, 2, 3, 4, 10, 10]):  # all N = 30
        best = ufm.fixed_head_optimum(W, 0.01, counts=counts)
        assert best["aligned"] and float((best["proto_cos"] - 1).abs().max()) < 1e-12
        seen.append(best["features"])
    assert all(torch.allclose(seen[0], other, atol=1e-12) for other in seen[1:])
    sim = ufm.simulate([25, 1, 1, 1, 1, 1], 5, 0.0, 0.01, head="simplex")
    assert sim.metrics["proto_cos"] > 1 - 1e-10 and sim.metrics["nc3"] < 1e-10


def test_which_fixed_heads_let_features_reach_their_prototype():
    # Symmetric polytopes (every vertex alike, its stabiliser fixing only its own axis) align;
    # a partial d-cube and the Hadamard rows do not.
    aligned = {}
    for head, K in [("simplex", 10), ("orthoplex", 10), ("dcube", 8), ("dcube", 10), ("hadamard", 8), ("hadamard", 10)]:
        aligned[head, K] = ufm.fixed_head_optimum(polytopes.make(head, K), 0.01)["aligned"]
    assert aligned == {("simplex", 10): True, ("orthoplex", 10): True, ("dcube", 8): True,
                       ("dcube", 10): False, ("hadamard", 8): False, ("hadamard", 10): False}


def test_hadamard_head_as_it_really_behaves():
    """K = d = 8: orthonormal rows, and cross-entropy ignores a shift of all logits, so weight decay
    strips the common mean w_bar from every feature: h_k = a (w_k - w_bar).  The class means form a
    simplex ETF, but one offset from the prototypes: proto_cos = sqrt(1 - 1/K) and
    nc3 = 2 - 2 sqrt(1 - 1/K), whatever lambda_h.  MSE and dot regression do align."""
    K = 8
    W = polytopes.make("hadamard", K).double()
    assert torch.allclose(W @ W.T, torch.eye(K, dtype=F64), atol=1e-6)
    for lambda_h in (0.001, 0.1):
        features = ufm.fixed_head_optimum(W, lambda_h, counts=[3] * K)["features"]
        centred = W - W.mean(dim=0)
        ratio = features.norm() / centred.norm()
        assert torch.allclose(features, ratio * centred, atol=1e-9)
    theory = ufm.global_optimum([3] * K, 0.0, 0.01, head="hadamard").metrics()
    assert theory["nc2_etf_error"] < 1e-6 and theory["nc1"] < 1e-20
    assert math.isclose(theory["proto_cos"], math.sqrt(1 - 1 / K), rel_tol=1e-6)
    assert math.isclose(theory["nc3"], 2 - 2 * math.sqrt(1 - 1 / K), rel_tol=1e-5)
    for loss in ("mse", "dot_regression"):
        assert ufm.fixed_head_optimum(W, 0.01, loss=loss)["aligned"]
    # K = 10 in its natural d = 10: the rows are not orthogonal and the features not even equinorm.
    ten = ufm.global_optimum([3] * 10, 0.0, 0.01, head="hadamard").metrics()
    assert ten["nc2_equinorm"] > 0.01 and ten["nc2_etf_error"] > 0.1 and ten["proto_cos"] < 0.95


def test_l2_normalised_head_ends_at_the_best_unit_direction():
    counts = [3, 3, 3, 1, 1]
    theory = ufm.global_optimum(counts, 0.0, 0.0, head="dcube", normalize="l2", scale=4.0)
    sim = ufm.simulate(counts, 3, 0.0, 0.0, head="dcube", normalize="l2", scale=4.0)
    assert sim.converged and rel(sim.objective, theory.objective) < 1e-10
    assert torch.allclose(F.normalize(sim.class_means, dim=1), theory.features, atol=1e-6)
    dr = ufm.simulate(counts, 3, 0.0, 0.0, head="dcube", normalize="l2", loss="dot_regression")
    # Dot regression aligns any head; its loss is quartic in the angle there, so L-BFGS stops ~1e-6 short.
    assert dr.converged and dr.objective < 1e-10 and dr.metrics["proto_cos"] > 1 - 1e-4


def test_gradient_descent_approaches_the_optimum():
    best = ufm.ce_optimum(3, 2, 0.05, 0.05)
    sim = ufm.simulate([2] * 3, 3, 0.05, 0.05, optimizer="gd", steps=4000, every=1000)
    assert [row["step"] for row in sim.history] == [0, 1000, 2000, 3000, 4000]
    assert rel(sim.objective, best["objective"]) < 1e-6


def test_collapse_history_feeds_the_training_plot():
    sim = ufm.simulate([3] * 4, 4, 0.01, 0.01)
    rows = sim.collapse_history()
    assert [r["epoch"] for r in rows] == [r["step"] for r in sim.history]
    assert rows[-1]["collapse/nc3"] == sim.metrics["nc3"] and "collapse/step" not in rows[-1]


# --------------------------------------------------------------------------- errors and the command


@pytest.mark.parametrize("call, fragment", [
    (lambda: ufm.ce_optimum(1, 3, 0.1, 0.1), "num_classes must be an integer >= 2"),
    (lambda: ufm.ce_optimum(3, 3, 0.0, 0.1), "lambda_w must be a finite number > 0"),
    (lambda: ufm.ce_convex_oracle([3], 0.1, 0.1), "at least 2 classes"),
    (lambda: ufm.ce_convex_oracle([3, 0], 0.1, 0.1), "every class count must be an integer >= 1"),
    (lambda: ufm.simulate([3, 3], 2, 0.1, 0.0), "set lambda_h > 0"),
    (lambda: ufm.simulate([3, 3], 2, 0.1, 0.1, head="cube"), "choose one of learned, simplex"),
    (lambda: ufm.simulate([3, 3], 2, 0.1, 0.1, loss="dot_regression"), "needs a fixed polytope head"),
    (lambda: ufm.simulate([3, 3], 1, 0.0, 0.1, head="simplex", normalize="l2"), "set lambda_h=0"),
    (lambda: ufm.simulate([3] * 5, 2, 0.0, 0.1, head="simplex"), "needs dim >= 4 (set dim=4 or larger)"),
    (lambda: ufm.simulate([3, 3], 2, 0.1, 0.1, scale=2.0), "applies to fixed heads only"),
    (lambda: ufm.fixed_head_optimum(torch.ones(3), 0.1), "[K, d] matrix"),
    (lambda: ufm.fixed_head_optimum(polytopes.make("simplex", 3), 0.1, counts=[1, 2]), "one count per row"),
    (lambda: ufm.global_optimum([3, 3, 1], 0.1, 0.1, loss="mse"), "balanced counts only"),
    (lambda: ufm.global_optimum([3, 3, 1], 0.1, 0.1, dim=2), "needs dim >= 3"),
    (lambda: ufm.minority_collapse_threshold(2, 1, 3, 0.1, 0.1), "num_minority must be an integer >= 2"),
])
def test_bad_arguments_raise_one_line_errors(call, fragment):
    with pytest.raises(FixedclsError, match=None) as info:
        call()
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_command_prints_theory_beside_the_simulation_and_writes_plots(tmp_path, capsys):
    assert ufm_main(["--counts", "4,4,1,1", "--heads", "learned", "simplex", "--lambda-w", "0.05",
                     "--lambda-h", "0.05", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| 4,4,1,1 | learned | 4 |" in out and "| 4,4,1,1 | simplex | 3 |" in out
    # ratio 4 against a threshold of (1/(0.05 * 1) - 2)/2 = 9: not collapsed, and the simulation agrees.
    assert "minority collapse: ratio 4, threshold 9 -> not collapsed in theory" in out
    assert {p.name for p in tmp_path.iterdir()} == {"4+4+1+1-learned.png", "4+4+1+1-simplex.png", "summary.json",
                                                    "ufm_heads.png"}
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert all(r["logit_error"] < 1e-5 and abs(r["objective"] - r["objective_theory"]) < 1e-10 for r in rows)


def test_command_exits_2_on_usage_errors(tmp_path, capsys):
    assert ufm_main(["--counts", "ten", "--out", str(tmp_path)]) == 2
    assert "cannot read class counts 'ten'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        ufm_main(["--heads", "cube"])
    assert info.value.code == 2
