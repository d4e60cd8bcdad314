"""Geometry, capacity, determinism and RNG hygiene of fixedcls.polytopes (SPEC section 1)."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch

from fixedcls import polytopes
from fixedcls.errors import FixedclsError

NAMES = ["simplex", "dcube", "orthoplex", "hadamard", "etf"]
# Odd K, K a power of two, K one past a power of two, K = 2.
SIZES = [2, 3, 5, 8, 10, 17]


def pairwise_cosines(w: torch.Tensor) -> torch.Tensor:
    w = w.double()
    w = w / w.norm(dim=1, keepdim=True)
    gram = w @ w.T
    return gram[~torch.eye(len(w), dtype=torch.bool)]


def min_hamming_distance(w: torch.Tensor) -> int:
    signs = torch.sign(w).double()
    gram = signs @ signs.T
    gram.fill_diagonal_(-math.inf)
    return int(round((w.shape[1] - gram.max().item()) / 2))


def test_registry_lists_the_spec_polytopes():
    assert set(NAMES) <= set(polytopes.available())
    assert set(polytopes.available()) == set(polytopes.POLYTOPES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_classes", SIZES)
def test_shape_dtype_unit_rows_distinct(name, num_classes):
    w = polytopes.make(name, num_classes)
    assert w.shape == (num_classes, polytopes.natural_dim(name, num_classes))
    assert w.dtype == torch.float32
    assert torch.allclose(w.norm(dim=1), torch.ones(num_classes), atol=1e-6)
    assert len(torch.unique(w, dim=0)) == num_classes
    assert pairwise_cosines(w).max() < 1 - 1e-6


@pytest.mark.parametrize("num_classes", SIZES)
@pytest.mark.parametrize("name", ["simplex", "etf"])
def test_simplex_and_etf_are_regular_simplices(name, num_classes):
    w = polytopes.make(name, num_classes)
    assert w.shape == (num_classes, num_classes - 1)
    cosines = pairwise_cosines(w)
    assert torch.allclose(cosines, torch.full_like(cosines, -1.0 / (num_classes - 1)), atol=1e-6)
    assert w.double().sum(0).abs().max() < 1e-5  # centred at 0


@pytest.mark.parametrize("num_classes,dim", [(3, 2), (4, 10), (10, 9), (10, 64)])
def test_etf_in_larger_dimension(num_classes, dim):
    w = polytopes.make("etf", num_classes, dim, seed=1)
    assert w.shape == (num_classes, dim)
    cosines = pairwise_cosines(w)
    assert torch.allclose(cosines, torch.full_like(cosines, -1.0 / (num_classes - 1)), atol=1e-6)


def test_simplex_above_natural_dim_is_etf():
    assert torch.equal(polytopes.make("simplex", 10, 32, seed=5), polytopes.make("etf", 10, 32, seed=5))


def test_etf_deterministic_and_seed_sensitive():
    a = polytopes.make("etf", 10, 16, seed=0)
    torch.manual_seed(123)
    np.random.seed(123)
    b = polytopes.make("etf", 10, 16, seed=0)
    assert torch.equal(a, b)
    assert not torch.allclose(a, polytopes.make("etf", 10, 16, seed=1), atol=1e-3)
    # make() hands out copies: editing one never changes the next.
    a.zero_()
    assert torch.equal(polytopes.make("etf", 10, 16, seed=0), b)


def test_etf_reference_values():
    # Pins the construction (Helmert simplex, default_rng Gaussian, sign-fixed QR) across machines.
    expected = torch.tensor(
        [
            [0.158047, -0.470693, 0.520669, -0.490809, -0.491405],
            [0.088575, -0.528656, -0.199854, 0.208398, 0.793288],
            [0.366995, 0.322554, -0.683151, 0.247104, -0.483237],
            [-0.613617, 0.676795, 0.362336, 0.035307, 0.181354],
        ]
    )
    assert torch.allclose(polytopes.make("etf", 4, 5, seed=0), expected, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_global_rng_untouched(name):
    polytopes._best_small_code.cache_clear()  # force a real dcube search, not a cached one
    torch_state = torch.get_rng_state()
    np_state = np.random.get_state()
    py_state = random.getstate()
    polytopes.make(name, 7, 12, seed=987)
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]
    assert random.getstate() == py_state


@pytest.mark.parametrize("name", ["simplex", "dcube", "orthoplex", "hadamard"])
def test_seed_free_polytopes_ignore_seed(name):
    assert torch.equal(polytopes.make(name, 6, seed=0), polytopes.make(name, 6, seed=42))


@pytest.mark.parametrize("num_classes", [2, 5, 7, 10])
def test_orthoplex_antipodal_pairs(num_classes):
    w = polytopes.make("orthoplex", num_classes)
    assert w.shape == (num_classes, math.ceil(num_classes / 2))
    for c in range(num_classes):
        expected = torch.zeros(w.shape[1])
        expected[c // 2] = 1.0 if c % 2 == 0 else -1.0
        assert torch.equal(w[c], expected)
    assert set(pairwise_cosines(w).round().tolist()) <= {0.0, -1.0}


def test_orthoplex_in_larger_dimension_leaves_extra_axes_empty():
    w = polytopes.make("orthoplex", 5, 8)
    assert w.shape == (5, 8) and torch.all(w[:, 3:] == 0)


def sylvester(size: int) -> np.ndarray:
    h = np.ones((1, 1))
    while len(h) < size:
        h = np.kron(np.array([[1, 1], [1, -1]]), h)
    return h


@pytest.mark.parametrize("num_classes,dim", [(2, 2), (3, 3), (8, 8), (10, 10), (5, 16), (10, 12), (12, 9)])
def test_hadamard_is_sylvester_block(num_classes, dim):
    w = polytopes.make("hadamard", num_classes, dim)
    size = 2 ** math.ceil(math.log2(max(dim, num_classes)))
    expected = sylvester(size)[:num_classes, :dim] / math.sqrt(dim)
    assert np.allclose(w.numpy(), expected, atol=1e-7)
    assert len(torch.unique(w, dim=0)) == num_classes


def test_hadamard_power_of_two_is_orthonormal():
    w = polytopes.make("hadamard", 8)
    assert torch.allclose(w @ w.T, torch.eye(8), atol=1e-6)


@pytest.mark.parametrize("num_classes", [2, 3, 5, 8, 9, 16, 100])
def test_dcube_natural(num_classes):
    w = polytopes.make("dcube", num_classes)
    dim = max(1, math.ceil(math.log2(num_classes)))
    assert w.shape == (num_classes, dim)
    assert torch.allclose(w.abs(), torch.full_like(w, 1 / math.sqrt(dim)))
    assert len(torch.unique(w, dim=0)) == num_classes


def test_dcube_full_cube():
    w = polytopes.make("dcube", 8, 3)
    signs = {tuple(int(v) for v in row) for row in torch.sign(w).tolist()}
    assert signs == set(itertools.product((-1, 1), repeat=3))


# (d, K, optimal minimum Hamming distance A^-1): known optimal binary codes.
OPTIMAL_CODES = [
    (1, 2, 1),
    (2, 2, 2),
    (3, 2, 3),
    (3, 4, 2),  # even-weight code
    (4, 8, 2),
    (5, 4, 3),  # A(5,3) = 4
    (6, 8, 3),  # A(6,3) = 8
    (7, 8, 4),  # A(7,4) = 8
    (7, 16, 3),  # Hamming [7,4,3]
    (8, 16, 4),  # extended Hamming [8,4,4]
    (8, 2, 8),  # antipodal pair
    (5, 5, 2),  # A(5,3) = 4 < 5
]


@pytest.mark.parametrize("dim,num_classes,optimal", OPTIMAL_CODES)
def test_dcube_max_min_angle_small_cases(dim, num_classes, optimal):
    w = polytopes.make("dcube", num_classes, dim)
    assert min_hamming_distance(w) >= optimal
    max_cos = pairwise_cosines(w).max().item()
    assert max_cos <= 1 - 2 * optimal / dim + 1e-6


@pytest.mark.parametrize("num_classes,dim", [(3, 100), (10, 64), (100, 40)])
def test_dcube_high_dimension_is_well_spread(num_classes, dim):
    w = polytopes.make("dcube", num_classes, dim)
    assert w.shape == (num_classes, dim)
    assert torch.allclose(w.abs(), torch.full_like(w, 1 / math.sqrt(dim)))
    # At least as spread as a random code would typically be, and distinct.
    assert min_hamming_distance(w) >= dim // 4
    assert len(torch.unique(w, dim=0)) == num_classes


def test_dcube_deterministic():
    polytopes._best_small_code.cache_clear()
    a = polytopes.make("dcube", 20, 9)
    polytopes._best_small_code.cache_clear()
    assert torch.equal(a, polytopes.make("dcube", 20, 9))


CAPACITY = [
    ("simplex", 10, 5, 9),
    ("etf", 10, 8, 9),
    ("dcube", 10, 3, 4),
    ("orthoplex", 7, 3, 4),
    ("hadamard", 10, 8, 9),
    ("hadamard", 3, 2, 3),
]


@pytest.mark.parametrize("name,num_classes,dim,needed", CAPACITY)
def test_capacity_error_names_smallest_dim(name, num_classes, dim, needed):
    with pytest.raises(FixedclsError) as info:
        polytopes.make(name, num_classes, dim)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in message
    for part in (repr(name), f"K={num_classes}", f"d={dim}", f"d >= {needed}"):
        assert part in message
    assert polytopes.make(name, num_classes, needed).shape == (num_classes, needed)


@pytest.mark.parametrize("name", NAMES)
def test_min_dim_is_tight(name):
    for num_classes in range(2, 20):
        needed = polytopes.min_dim(name, num_classes)
        polytopes.make(name, num_classes, needed)
        assert polytopes.natural_dim(name, num_classes) >= needed
        if needed > 1:
            with pytest.raises(FixedclsError):
                polytopes.make(name, num_classes, needed - 1)


def test_example_message():
    with pytest.raises(FixedclsError, match=r"set model\.dim=9 or larger, or leave it unset"):
        polytopes.make("simplex", 10, 5)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(FixedclsError) as info:
        polytopes.make("tetrahedron", 4)
    assert all(name in str(info.value) for name in NAMES)


@pytest.mark.parametrize("num_classes", [1, 0, -3])
def test_fewer_than_two_classes(num_classes):
    with pytest.raises(FixedclsError, match="at least 2 classes"):
        polytopes.make("simplex", num_classes)


@pytest.mark.parametrize("dim", [0, -1, 2.5])
def test_bad_dim(dim):
    with pytest.raises(FixedclsError):
        polytopes.make("etf", 3, dim)


def test_register_new_polytope_is_one_function():
    @polytopes.register_polytope("axes_test", natural_dim=lambda k: k)
    def _axes(num_classes, dim, seed):
        return 3.0 * np.eye(num_classes, dim)  # make() normalises the rows

    try:
        w = polytopes.make("axes_test", 4)
        assert torch.equal(w, torch.eye(4))
        with pytest.raises(FixedclsError, match="needs d >= 4"):
            polytopes.make("axes_test", 4, 3)
    finally:
        del polytopes.POLYTOPES["axes_test"]
