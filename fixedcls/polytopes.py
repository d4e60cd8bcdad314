"""Regular-polytope prototypes for fixed classifier heads (SPEC section 1).

One entry point::

    W = make("simplex", num_classes=10)            # [10, 9] float32, unit rows
    W = make("etf", num_classes=10, dim=64, seed=3)

Every polytope is built in float64 with numpy and cast to float32 once, so the same
arguments give the same tensor on every machine.  Randomness (only ``etf``, and
``simplex`` above its natural dimension) comes from a local
``numpy.random.default_rng(seed)``: the global torch / numpy / python RNGs are never
read or reseeded.

A new polytope is one registered function returning a ``[K, d]`` float64 array::

    @register_polytope("mine", natural_dim=lambda k: k, min_dim=lambda k: k)
    def _mine(num_classes: int, dim: int, seed: int) -> np.ndarray: ...

``make`` does the argument checks, the capacity check (``min_dim``), the per-row
normalisation and the float32 conversion, so the builder only has to build.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .errors import FixedclsError

__all__ = [
    "POLYTOPES",
    "PolytopeSpec",
    "available",
    "make",
    "min_dim",
    "natural_dim",
    "register_polytope",
]

BuildFn = Callable[[int, int, int], np.ndarray]
DimFn = Callable[[int], int]


@dataclass(frozen=True)
class PolytopeSpec:
    name: str
    build: BuildFn  # (num_classes, dim, seed) -> float64 array [K, d]
    natural_dim: DimFn  # dimension used when dim=None
    min_dim: DimFn  # smallest dimension that holds K distinct vertices
    seeded: bool  # whether the seed changes the result (only then is it worth varying)
    description: str


POLYTOPES: dict[str, PolytopeSpec] = {}


def register_polytope(
    name: str,
    *,
    natural_dim: DimFn,
    min_dim: DimFn | None = None,
    seeded: bool = False,
) -> Callable[[BuildFn], BuildFn]:
    """Register ``fn(num_classes, dim, seed) -> np.ndarray [K, d]`` under ``name``."""

    def decorator(fn: BuildFn) -> BuildFn:
        doc = (fn.__doc__ or "").strip().splitlines()
        POLYTOPES[name] = PolytopeSpec(
            name=name,
            build=fn,
            natural_dim=natural_dim,
            min_dim=min_dim or natural_dim,
            seeded=seeded,
            description=doc[0] if doc else "",
        )
        return fn

    return decorator


def available() -> list[str]:
    """Names of the registered polytopes, in registration order."""
    return list(POLYTOPES)


def _spec(name: str) -> PolytopeSpec:
    if name not in POLYTOPES:
        raise FixedclsError(
            f"unknown polytope {name!r}: choose one of {', '.join(available())}"
        )
    return POLYTOPES[name]


def _check_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise FixedclsError(f"num_classes must be an integer, got {num_classes!r}")
    if num_classes < 2:
        raise FixedclsError(
            f"a classifier needs at least 2 classes, got num_classes={num_classes}: set num_classes >= 2"
        )
    return int(num_classes)


def natural_dim(name: str, num_classes: int) -> int:
    """The dimension ``make(name, num_classes)`` uses when ``dim`` is None."""
    return _spec(name).natural_dim(_check_num_classes(num_classes))


def min_dim(name: str, num_classes: int) -> int:
    """The smallest ``dim`` in which polytope ``name`` holds ``num_classes`` distinct unit vertices."""
    return _spec(name).min_dim(_check_num_classes(num_classes))


def make(name: str, num_classes: int, dim: int | None = None, seed: int = 0) -> torch.Tensor:
    """Prototype matrix ``[num_classes, dim]`` (float32, unit rows) of polytope ``name``.

    ``dim=None`` picks the polytope's natural dimension.  Deterministic in
    ``(name, num_classes, dim, seed)``; never touches the global RNG state.
    Raises ``FixedclsError`` (a ``ValueError``) when the polytope cannot hold
    ``num_classes`` vertices in ``dim`` dimensions, naming the smallest ``dim`` that fits.
    """
    spec = _spec(name)
    num_classes = _check_num_classes(num_classes)
    if dim is None:
        dim = spec.natural_dim(num_classes)
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise FixedclsError(f"dim must be a positive integer or None, got {dim!r}")
    dim = int(dim)
    needed = spec.min_dim(num_classes)
    if dim < needed:
        raise FixedclsError(
            f"polytope {name!r} cannot hold K={num_classes} classes in d={dim}: needs d >= {needed} "
            f"(set model.dim={needed} or larger, or leave it unset)"
        )
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise FixedclsError(f"seed must be an integer, got {seed!r}")
    return torch.from_numpy(_build(name, num_classes, dim, int(seed)))


def _build(name: str, num_classes: int, dim: int, seed: int) -> np.ndarray:
    vertices = np.asarray(POLYTOPES[name].build(num_classes, dim, seed), dtype=np.float64)
    if vertices.shape != (num_classes, dim):
        raise RuntimeError(
            f"polytope {name!r} built shape {vertices.shape}, expected {(num_classes, dim)}"
        )
    norms = np.linalg.norm(vertices, axis=1, keepdims=True)
    if not np.all(norms > 0):
        raise RuntimeError(f"polytope {name!r} built a zero vertex for K={num_classes}, d={dim}")
    # Per-row normalisation (not by the matrix norm, a known defect of public code).
    return (vertices / norms).astype(np.float32)


# --------------------------------------------------------------------------- simplex / etf


def _canonical_simplex(num_classes: int) -> np.ndarray:
    """Regular simplex ``[K, K-1]`` centred at 0, from the Helmert basis (no randomness, no LAPACK).

    The Helmert rows v_j = (1, .., 1, -j, 0, ..) / sqrt(j (j+1)), j = 1..K-1, are an
    orthonormal basis of the sum-zero subspace of R^K; the columns of that (K-1) x K
    matrix are the centred standard basis vectors e_i - 1/K expressed in it.
    """
    k = num_classes
    helmert = np.zeros((k - 1, k), dtype=np.float64)
    for j in range(1, k):
        helmert[j - 1, :j] = 1.0
        helmert[j - 1, j] = -float(j)
        helmert[j - 1] /= math.sqrt(j * (j + 1))
    # Column norms are sqrt(1 - 1/K); rescale so rows have unit norm and cosines -1/(K-1).
    return helmert.T * math.sqrt(k / (k - 1))


def _random_orthonormal_columns(dim: int, cols: int, seed: int) -> np.ndarray:
    """Haar-random ``[dim, cols]`` matrix with orthonormal columns from a local seeded generator."""
    rng = np.random.default_rng(seed)
    gaussian = rng.standard_normal((dim, cols))
    q, r = np.linalg.qr(gaussian)
    # Fixing the signs by diag(R) makes Q unique, independent of the LAPACK sign convention.
    signs = np.sign(np.diag(r))
    signs[signs == 0] = 1.0
    return q * signs


# The seed matters only above the natural dimension, where simplex is etf.
@register_polytope("simplex", natural_dim=lambda k: k - 1, seeded=True)
def _simplex(num_classes: int, dim: int, seed: int) -> np.ndarray:
    """Regular simplex: K unit vectors with pairwise cosine -1/(K-1); d > K-1 is the same as 'etf'."""
    if dim > num_classes - 1:
        return _etf(num_classes, dim, seed)
    return _canonical_simplex(num_classes)


@register_polytope("etf", natural_dim=lambda k: k - 1, seeded=True)
def _etf(num_classes: int, dim: int, seed: int) -> np.ndarray:
    """Simplex equiangular tight frame embedded in R^d (d >= K-1) by a seeded random orthonormal map."""
    simplex = _canonical_simplex(num_classes)  # [K, K-1]
    embed = _random_orthonormal_columns(dim, num_classes - 1, seed)  # [d, K-1]
    return simplex @ embed.T


# --------------------------------------------------------------------------- orthoplex


@register_polytope("orthoplex", natural_dim=lambda k: (k + 1) // 2)
def _orthoplex(num_classes: int, dim: int, seed: int) -> np.ndarray:
    """Cross-polytope +-e_j: classes 2j and 2j+1 are the antipodal pair +e_j, -e_j."""
    vertices = np.zeros((num_classes, dim), dtype=np.float64)
    classes = np.arange(num_classes)
    vertices[classes, classes // 2] = np.where(classes % 2 == 0, 1.0, -1.0)
    return vertices


# --------------------------------------------------------------------------- hadamard


def _sylvester_block(rows: int, cols: int) -> np.ndarray:
    """Top-left ``rows x cols`` block of Sylvester's Hadamard matrix, H[i, j] = (-1)^popcount(i & j).

    The entry formula does not depend on the matrix size, so no full 2^n x 2^n matrix is built.
    """
    parity = np.zeros((rows, cols), dtype=np.int64)
    anded = np.arange(rows, dtype=np.int64)[:, None] & np.arange(cols, dtype=np.int64)[None, :]
    while np.any(anded):
        parity ^= anded & 1
        anded >>= 1
    return 1.0 - 2.0 * parity.astype(np.float64)


def _hadamard_min_dim(num_classes: int) -> int:
    # The first d columns of Sylvester's matrix see bits 0..floor(log2(d-1)) of the row index,
    # so the first K rows stay distinct exactly when K <= 2^ceil(log2 d).
    return 2 ** (math.ceil(math.log2(num_classes)) - 1) + 1


@register_polytope("hadamard", natural_dim=lambda k: k, min_dim=_hadamard_min_dim)
def _hadamard(num_classes: int, dim: int, seed: int) -> np.ndarray:
    """First K rows and d columns of the Sylvester Hadamard matrix of size 2^ceil(log2 max(d, K)) (Hoffer et al. 2018)."""
    vertices = _sylvester_block(num_classes, dim)
    if len(np.unique(vertices, axis=0)) != num_classes:  # guarded by min_dim; kept as a safety net
        raise FixedclsError(
            f"polytope 'hadamard' cannot hold K={num_classes} classes in d={dim}: rows repeat; "
            f"needs d >= {_hadamard_min_dim(num_classes)} (set model.dim or leave it unset)"
        )
    return vertices / math.sqrt(dim)


# --------------------------------------------------------------------------- dcube
#
# Choosing K of the 2^d vertices of {-1,+1}^d to maximise the smallest pairwise angle is
# choosing a binary code of K words with the largest minimum Hamming distance
# (cos = 1 - 2 dist / d).  We use lexicodes (Conway & Sloane 1986): scan the vertices in
# index order and keep each one at Hamming distance >= delta from all kept so far.  They
# are deterministic and linear, and give the even-weight, Hamming and extended Hamming
# codes; they can miss nonlinear optima (d=10, K=12: distance 4, where A(10,5) = 12).  We
# take the largest delta whose lexicode has at least K words and keep its first K words.
#
# - K > 2^(d-1) (always the case at the natural d = ceil(log2 K)): no code of K words has
#   distance 2, so any K vertices reach the optimum distance 1; we take the even-weight
#   vertices first, then odd-weight ones in index order, which keeps distance-1 pairs few.
# - d <= _DCUBE_EXHAUSTIVE_DIM: exhaustive lexicode search over all 2^d vertices, skipping
#   distances ruled out by the Plotkin and sphere-packing bounds.
# - larger d: the best small lexicode (length d0 <= _DCUBE_EXHAUSTIVE_DIM) repeated along
#   the d coordinates (coordinate j uses column j mod d0), which multiplies its distance.
# Vertex index v maps to coordinates x_j = 1 - 2 * bit_j(v), so index 0 is all +1.

_DCUBE_EXHAUSTIVE_DIM = 16


def _popcount(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.int64, copy=True)
    count = np.zeros(values.shape, dtype=np.int64)
    while np.any(values):
        count += values & 1
        values >>= 1
    return count


def _vertex_coordinates(indices: np.ndarray, dim: int) -> np.ndarray:
    bits = (np.asarray(indices, dtype=np.int64)[:, None] >> np.arange(dim)[None, :]) & 1
    return 1.0 - 2.0 * bits.astype(np.float64)


def _lexicode(dim: int, min_distance: int, limit: int) -> np.ndarray:
    """Indices of the first ``limit`` words of the length-``dim`` lexicode with distance ``min_distance``."""
    all_vertices = np.arange(1 << dim, dtype=np.int64)
    weights = _popcount(all_vertices)
    blocked = np.zeros(all_vertices.shape, dtype=bool)
    words: list[int] = []
    start = 0
    while len(words) < limit:
        free = np.flatnonzero(~blocked[start:])
        if free.size == 0:
            break
        word = start + int(free[0])
        words.append(word)
        blocked |= weights[all_vertices ^ word] < min_distance
        start = word + 1
    return np.asarray(words, dtype=np.int64)


def _plotkin_bound(num_classes: int, dim: int) -> int:
    # Each coordinate separates at most floor(K/2) * ceil(K/2) of the K(K-1)/2 pairs.
    pairs = num_classes * (num_classes - 1) // 2
    separated = (num_classes // 2) * ((num_classes + 1) // 2)
    return min(dim, dim * separated // pairs)


def _sphere_packing_bound(dim: int, distance: int) -> int:
    """Upper bound on the size of a binary code of length ``dim`` and minimum distance ``distance``."""
    if distance % 2 == 0:  # A(n, 2t+2) = A(n-1, 2t+1): puncturing one coordinate
        dim, distance = dim - 1, distance - 1
    radius = (distance - 1) // 2
    ball = sum(math.comb(dim, i) for i in range(radius + 1))
    return (1 << dim) // ball


@functools.lru_cache(maxsize=64)
def _best_small_code(num_classes: int, dim: int) -> tuple[np.ndarray, int]:
    """(vertex indices, min Hamming distance) of K words in {0,1}^d, read-only.

    Exhaustive, so only for d <= _DCUBE_EXHAUSTIVE_DIM or K > 2^(d-1) (then 2^d < 2K).
    """
    if num_classes <= 2 ** (dim - 1):
        for distance in range(_plotkin_bound(num_classes, dim), 2, -1):
            if _sphere_packing_bound(dim, distance) < num_classes:
                continue  # no code that large exists: skip the costly search
            words = _lexicode(dim, distance, num_classes)
            if len(words) == num_classes:
                words.setflags(write=False)
                return words, distance
    # The distance-2 lexicode is the even-weight code (2^(d-1) words); past that size every
    # code has distance 1, and the odd-weight vertices follow in index order.
    all_vertices = np.arange(1 << dim, dtype=np.int64)
    even = _popcount(all_vertices) % 2 == 0
    words = np.concatenate([all_vertices[even], all_vertices[~even]])[:num_classes]
    words.setflags(write=False)
    return words, 2 if num_classes <= 2 ** (dim - 1) else 1


def _min_hamming_distance(codes: np.ndarray) -> int:
    dim = codes.shape[1]
    gram = codes @ codes.T  # entries are d - 2 * distance, exact in float64
    np.fill_diagonal(gram, -np.inf)
    return int(round((dim - gram.max()) / 2))


@register_polytope("dcube", natural_dim=lambda k: max(1, math.ceil(math.log2(k))))
def _dcube(num_classes: int, dim: int, seed: int) -> np.ndarray:
    """Hypercube {-1,+1}^d / sqrt(d); for K < 2^d a deterministic max-min-angle choice of K vertices (lexicode)."""
    if dim <= _DCUBE_EXHAUSTIVE_DIM or num_classes > 2 ** (dim - 1):
        words, _ = _best_small_code(num_classes, dim)
        return _vertex_coordinates(words, dim) / math.sqrt(dim)
    best, best_distance = None, -1
    smallest = max(1, math.ceil(math.log2(num_classes)))
    for block_dim in range(smallest, max(smallest, _DCUBE_EXHAUSTIVE_DIM) + 1):
        words, block_distance = _best_small_code(num_classes, block_dim)
        block = _vertex_coordinates(words, block_dim)
        tiled = block[:, np.arange(dim) % block_dim]
        # The exact distance needs a K x K Gram matrix; past that size the repetition bound is used.
        if num_classes <= 2048:
            distance = _min_hamming_distance(tiled)
        else:
            distance = (dim // block_dim) * block_distance
        if distance > best_distance:
            best, best_distance = tiled, distance
    return best / math.sqrt(dim)
