"""Cubature rules integrate monomials exactly (theory/cubature.py)."""

import itertools

import numpy as np
import pytest

from theory.cubature import (
    gauss_hermite,
    gaussian_monomial_moment,
    smolyak_gauss,
    sphere_degree5,
    sphere_monomial_moment,
)


def _monomials(d, max_degree):
    for alpha in itertools.product(range(max_degree + 1), repeat=d):
        if sum(alpha) <= max_degree:
            yield alpha


def _integrate(nodes, weights, alpha):
    return float(np.sum(weights * np.prod(nodes ** np.asarray(alpha), axis=1)))


@pytest.mark.parametrize("k", [1, 2, 4, 6])
def test_gauss_hermite_exact_to_degree_2k_minus_1(k):
    x, w = gauss_hermite(k)
    for p in range(2 * k):
        assert abs(np.sum(w * x**p) - gaussian_monomial_moment((p,))) < 1e-11 * max(1, gaussian_monomial_moment((p,)))


@pytest.mark.parametrize("d", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("degree", [5, 7])
def test_smolyak_exact_for_total_degree(d, degree):
    x, w = smolyak_gauss(d, degree)
    assert abs(w.sum() - 1) < 1e-13
    for alpha in _monomials(d, degree):
        exact = gaussian_monomial_moment(alpha)
        assert abs(_integrate(x, w, alpha) - exact) < 1e-11 * max(1.0, exact), alpha


def test_smolyak_not_exact_beyond_its_degree():
    # a sanity check that the test above can fail: degree-8 monomials are off for the degree-7 rule
    x, w = smolyak_gauss(3, 7)
    errs = [abs(_integrate(x, w, a) - gaussian_monomial_moment(a)) for a in _monomials(3, 8) if sum(a) == 8]
    assert max(errs) > 1e-3


@pytest.mark.parametrize("d", [1, 2, 3, 4, 5, 8])
def test_sphere_rule_exact_to_degree_5(d):
    x, w = sphere_degree5(d)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-15)
    for alpha in _monomials(d, 5):
        exact = sphere_monomial_moment(alpha)
        assert abs(_integrate(x, w, alpha) - exact) < 1e-13, alpha


def test_bad_arguments():
    with pytest.raises(ValueError, match="k >= 1"):
        gauss_hermite(0)
    with pytest.raises(ValueError, match="dimension"):
        smolyak_gauss(0, 5)
    with pytest.raises(ValueError, match="dimension"):
        sphere_degree5(0)
