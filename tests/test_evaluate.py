"""Monte Carlo evaluation: curves with standard errors agree with the exact risk."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linattn import evaluate, params as P
from theory.risk import risk as exact_risk

SHOTS = [0, 1, 3, 8, 20, 40]


@pytest.mark.parametrize("sampler", ["tokens", "stats"])
def test_curves_match_exact_risk_within_4_se(sampler):
    p = P.init_params(jax.random.PRNGKey(0), 3, heads=2, std=0.4)
    theta0 = jnp.array([0.6, 0.0, 0.8])
    curves = evaluate.test_errors(jax.random.PRNGKey(1), p, SHOTS, theta0, samples=20_000, sampler=sampler)
    assert set(curves) == {"theta0", "minus_theta0", "random"}
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), p)
        exact = {"theta0": exact_risk(p64, SHOTS, np.asarray(theta0, np.float64), 0.1),
                 "minus_theta0": exact_risk(p64, SHOTS, -np.asarray(theta0, np.float64), 0.1),
                 "random": exact_risk(p64, SHOTS, "sphere", 0.1)}
    for name, c in curves.items():
        assert c.mean.shape == c.se.shape == (len(SHOTS),)
        z = np.abs(c.mean - np.asarray(exact[name])) / c.se
        assert np.all(z <= 4), (name, z)


def test_multilayer_curve_and_bad_input():
    p = P.init_params(jax.random.PRNGKey(0), 2, layers=2)
    c = evaluate.test_error(jax.random.PRNGKey(1), p, [0, 5], "sphere", samples=1000, chunk=500)
    assert np.all(c.se > 0) and np.all(np.isfinite(c.mean))
    with pytest.raises(ValueError, match="got -3"):
        evaluate.test_error(jax.random.PRNGKey(1), p, [0, -3], "sphere")
    with pytest.raises(ValueError, match="one-layer"):
        evaluate.test_error(jax.random.PRNGKey(1), p, [0, 1], "sphere", sampler="stats")


@pytest.mark.parametrize("layers", [1, 2])
def test_a_point_does_not_depend_on_the_other_shot_counts(layers):
    p = P.init_params(jax.random.PRNGKey(0), 3, layers=layers, std=0.3)
    key, theta = jax.random.PRNGKey(4), jnp.array([0.6, 0.0, 0.8])
    few = evaluate.test_error(key, p, [3], theta, samples=256, chunk=128, sampler="tokens")
    many = evaluate.test_error(key, p, [0, 3, 9], theta, samples=256, chunk=128, sampler="tokens")
    np.testing.assert_allclose(few.mean[0], many.mean[1], rtol=1e-5)
    np.testing.assert_allclose(few.se[0], many.se[1], rtol=1e-5)
