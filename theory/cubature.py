"""Exact cubature rules for the population risk (SPEC section 5).

Shape notation: K nodes, d dimension. A rule is (nodes (K, d), weights (K,)) as float64 numpy
arrays; the weights sum to 1 and the rule integrates against a probability measure.

- `gauss_hermite(k)`: the k-point Gauss-Hermite rule for N(0, 1), exact to degree 2k - 1.
- `smolyak_gauss(d, degree)`: a Smolyak sparse grid of Gauss-Hermite rules for N(0, I_d), exact
  for every polynomial of total degree <= `degree` (Novak & Ritter 1999; see DERIVATIONS.md).
- `sphere_degree5(d)`: Stroud's degree-5 rule for the uniform distribution on the unit sphere
  S^{d-1} (Stroud 1971, rule U_n 5-2): exact for polynomials of degree <= 5.

All rules are symmetric under x -> -x, so odd moments come out exactly zero.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
from numpy.polynomial.hermite_e import hermegauss


@functools.lru_cache(maxsize=None)
def _gh(k: int) -> tuple[np.ndarray, np.ndarray]:
    x, w = hermegauss(k)
    return x, w / w.sum()


def gauss_hermite(k: int) -> tuple[np.ndarray, np.ndarray]:
    """k-point rule for N(0, 1): nodes (k,), weights (k,) summing to 1; exact to degree 2k - 1."""
    if k < 1:
        raise ValueError(f"a Gauss-Hermite rule needs k >= 1 points; got {k}")
    x, w = _gh(k)
    return x.copy(), w.copy()


def _compositions(total: int, parts: int):
    """All tuples of `parts` integers >= 0 summing to `total`."""
    if parts == 1:
        yield (total,)
        return
    for first in range(total + 1):
        for rest in _compositions(total - first, parts - 1):
            yield (first,) + rest


def _merge(nodes: np.ndarray, weights: np.ndarray, decimals: int = 12):
    """Add the weights of coinciding nodes and drop nodes whose weight cancels."""
    keys = np.round(nodes, decimals)
    uniq, inv = np.unique(keys, axis=0, return_inverse=True)
    inv = np.reshape(inv, -1)
    w = np.zeros(len(uniq))
    np.add.at(w, inv, weights)
    # representative (unrounded) node per group
    rep = np.zeros_like(uniq)
    rep[inv] = nodes
    keep = np.abs(w) > 1e-15
    return rep[keep], w[keep]


@functools.lru_cache(maxsize=None)
def _smolyak(d: int, degree: int) -> tuple[np.ndarray, np.ndarray]:
    # Combination form of A(q, d), q = d + k with 2k + 1 >= degree:
    #   A(q, d) = sum_{q-d+1 <= |i| <= q} (-1)^(q-|i|) C(d-1, q-|i|) U^{i_1} x ... x U^{i_d},
    # U^i the i-point Gauss-Hermite rule (exact to degree 2i - 1, i >= 1).
    k = degree // 2  # smallest k with 2k + 1 >= degree
    # (q = d + k)
    all_nodes, all_weights = [], []
    for extra in range(max(0, k - d + 1), k + 1):  # extra = |i| - d
        coef = (-1) ** (k - extra) * math.comb(d - 1, k - extra)
        if coef == 0:
            continue
        for comp in _compositions(extra, d):
            rules = [_gh(c + 1) for c in comp]
            grids = np.meshgrid(*[r[0] for r in rules], indexing="ij")
            wgrid = np.ones_like(grids[0])
            for ax, r in enumerate(rules):
                shape = [1] * d
                shape[ax] = -1
                wgrid = wgrid * np.reshape(r[1], shape)
            all_nodes.append(np.stack([g.reshape(-1) for g in grids], axis=1))
            all_weights.append(coef * wgrid.reshape(-1))
    return _merge(np.concatenate(all_nodes), np.concatenate(all_weights))


def smolyak_gauss(d: int, degree: int) -> tuple[np.ndarray, np.ndarray]:
    """Sparse-grid rule for N(0, I_d), exact for polynomials of total degree <= `degree`.

    Returns nodes (K, d) and weights (K,) (some weights are negative; they sum to 1).
    """
    if d < 1:
        raise ValueError(f"dimension must be >= 1; got {d}")
    if degree < 0:
        raise ValueError(f"degree must be >= 0; got {degree}")
    x, w = _smolyak(int(d), int(degree))
    return x.copy(), w.copy()


@functools.lru_cache(maxsize=None)
def _sphere5(d: int) -> tuple[np.ndarray, np.ndarray]:
    eye = np.eye(d)
    nodes = [eye, -eye]
    weights = [np.full(2 * d, (4.0 - d) / (2.0 * d * (d + 2.0)))]
    pairs = list(itertools.combinations(range(d), 2))
    if pairs:
        pn = []
        for i, j in pairs:
            for si, sj in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
                v = np.zeros(d)
                v[i], v[j] = si / math.sqrt(2.0), sj / math.sqrt(2.0)
                pn.append(v)
        nodes.append(np.array(pn))
        weights.append(np.full(len(pn), 1.0 / (d * (d + 2.0))))
    x, w = np.concatenate(nodes), np.concatenate(weights)
    keep = w != 0.0  # d = 4: the axis nodes carry no weight
    return x[keep], w[keep]


def sphere_degree5(d: int) -> tuple[np.ndarray, np.ndarray]:
    """Stroud's degree-5 rule for the uniform distribution on the unit sphere in R^d.

    Nodes +-e_i with weight (4-d)/(2d(d+2)) and (+-e_i +- e_j)/sqrt(2), i < j, with weight
    1/(d(d+2)). Exact for all polynomials of degree <= 5 in theta.
    """
    if d < 1:
        raise ValueError(f"dimension must be >= 1; got {d}")
    x, w = _sphere5(int(d))
    return x.copy(), w.copy()


# ---------------------------------------------------------------- reference moments (for tests)
def gaussian_monomial_moment(alpha) -> float:
    """E[prod_k g_k^alpha_k] for g ~ N(0, I): prod of (alpha_k - 1)!! for even alpha_k, else 0."""
    out = 1.0
    for a in alpha:
        if a % 2:
            return 0.0
        out *= math.prod(range(a - 1, 0, -2)) if a > 0 else 1
    return float(out)


def sphere_monomial_moment(alpha) -> float:
    """E[prod_k theta_k^alpha_k] for theta uniform on S^{d-1}, d = len(alpha).

    By homogeneity: E_gauss[g^alpha] = E[|g|^k] E_sphere[theta^alpha], k = |alpha|, and
    E|g|^k = 2^{k/2} Gamma((d+k)/2) / Gamma(d/2).
    """
    d, k = len(alpha), sum(alpha)
    num = gaussian_monomial_moment(alpha)
    if num == 0.0:
        return 0.0
    norm_k = 2.0 ** (k / 2) * math.exp(math.lgamma((d + k) / 2) - math.lgamma(d / 2))
    return num / norm_k
