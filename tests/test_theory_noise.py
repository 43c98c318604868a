"""Exact minibatch gradient noise and the SGD jitter it predicts (theory.noise; issue #13)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linattn import params as P
from linattn import train as T
from linattn.objectives import ObjectiveConfig
from linattn.optim import OptimizerConfig, param_labels, trainable_vector
from theory import noise as N
from theory.optimal import pretrain_optimum
from theory.risk import risk, task_curves

D = 5
THETA0 = np.eye(D)[0] * 0.6 + np.eye(D)[1] * 0.8


def _risk_fn(params, subset, shots=0, theta=THETA0):
    """(R(vec), vec, unflatten) of the exact risk over the subset's trainable vector (float64)."""
    p64 = {k: jnp.asarray(v, jnp.float64) for k, v in params.items()}
    vec, unflatten = trainable_vector(p64, param_labels(p64, subset))
    return (lambda v: risk(unflatten(v), shots, jnp.asarray(theta), 0.1)), vec, unflatten


@pytest.mark.parametrize("subset,merged", [("all", False), ("v", True), ("kq", True)])
def test_mean_gradient_is_the_exact_risk_gradient(subset, merged):
    """E[g] by degree-12 cubature equals the gradient of the exact zero-shot risk (theory.risk)."""
    theta = np.array([0.6, 0.0, 0.8])
    p = P.init_params(jax.random.PRNGKey(0), 3, merged=merged, heads=2, std=0.3)
    m = N.zero_shot_gradient_moments(p, subset, theta, 0.1)
    with jax.enable_x64(True):
        R, vec, _ = _risk_fn(p, subset, theta=theta)
        want = np.asarray(jax.grad(R)(vec))
    np.testing.assert_allclose(m.mean, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())


def test_gradient_covariance_matches_monte_carlo_per_prompt_gradients():
    """Var(u . g) along fixed random directions u (and the trace): exact against the sample variance
    of 200,000 per-prompt gradients, within 4 standard errors."""
    p = P.init_params(jax.random.PRNGKey(1), D, merged=False, std=0.3)
    m = N.zero_shot_gradient_moments(p, "all", THETA0, 0.1)
    n = 200_000
    with jax.enable_x64(True):
        g, vec, _ = N.zero_shot_gradient(p, "all", THETA0, 0.1)
        kx, ke = jax.random.split(jax.random.PRNGKey(2))
        x = jax.random.normal(kx, (n, D), jnp.float64)
        e = jax.random.normal(ke, (n,), jnp.float64)
        G = np.asarray(jax.lax.map(lambda a: g(vec, *a), (x, e), batch_size=10_000))
    U = np.random.default_rng(3).normal(size=(6, G.shape[1]))
    U /= np.linalg.norm(U, axis=1, keepdims=True)
    dev = G - G.mean(0)
    for u in U:
        sq = (dev @ u) ** 2
        z = (sq.mean() - u @ m.cov @ u) / (sq.std(ddof=1) / np.sqrt(n))
        assert abs(z) < 4, z
    tr = (dev**2).sum(1)
    z = (tr.mean() - np.trace(m.cov)) / (tr.std(ddof=1) / np.sqrt(n))
    assert abs(z) < 4, z


def test_sgd_jitter_limits_and_refusals():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(4, 4))
    H, C = A @ A.T + np.eye(4), np.cov(rng.normal(size=(4, 50)))
    stat = N.sgd_jitter(H, C, 0.01, 0.9, 100)
    np.testing.assert_allclose(N.sgd_jitter(H, C, 0.01, 0.9, 100, steps=20_000), stat, rtol=1e-8)
    # plain SGD, one coordinate: Var = lr^2 c / B / (1 - (1 - lr h)^2)
    np.testing.assert_allclose(N.sgd_jitter([[3.0]], [[2.0]], 0.1, 0.0, 10), [[0.01 * 0.2 / (1 - 0.7**2)]])
    flat = np.diag([1.0, 0.0])
    with pytest.raises(ValueError, match="flat directions"):
        N.sgd_jitter(flat, np.eye(2), 0.01, 0.9, 10)
    grow = [N.sgd_jitter(flat, np.eye(2), 0.01, 0.9, 10, steps=k)[1, 1] for k in (100, 200)]
    assert grow[1] > 1.9 * grow[0] > 0  # a random walk along the flat direction
    with pytest.raises(ValueError, match="unstable"):
        N.sgd_jitter(H, C, 10.0, 0.9, 100)


def test_value_only_jitter_excess_risk_matches_simulation():
    """ZS (V) from its exact minimizer: 32 seeds of minibatch SGD (batch 2048, 100 steps, momentum
    0.9, no clip, fresh prompts of theta0); the seed mean of the exact excess zero-shot risk of the
    end points against tr(H Sigma_100) / 2, within 4 SE (the jitter settles in about 15 steps). (At batch 1024 the measured excess is 3 SE
    above this first-order prediction: the noise's own dependence on delta starts to matter.)"""
    lr, B, K, S = 0.01, 2048, 100, 32
    p = {k: np.asarray(v) for k, v in pretrain_optimum(D, 20, 0.1).items()}
    with jax.enable_x64(True):
        R, vec, unflatten = _risk_fn(p, "v")
        H = np.asarray(jax.hessian(R)(vec))
        star = np.asarray(vec) - np.linalg.pinv(H) @ np.asarray(jax.grad(R)(vec))
        p_star = {k: np.asarray(v) for k, v in unflatten(jnp.asarray(star)).items()}
        r_star = float(R(jnp.asarray(star)))
    m = N.zero_shot_gradient_moments(p_star, "v", THETA0, 0.1)
    assert np.abs(m.mean).max() < 1e-9  # the minimizer
    predicted = N.jitter_excess(H, N.sgd_jitter(H, m.cov, lr, 0.9, B, steps=K))
    cfg = T.TrainConfig(steps=K, batch=B, d=D, optimizer=OptimizerConfig(clip_norm=None))
    ctx = T.TaskContext(jnp.asarray(THETA0, jnp.float32), None)
    start = {k: jnp.asarray(v, jnp.float32) for k, v in p_star.items()}
    res = T.train_plan([T.Run(jax.random.PRNGKey(s), start, ctx, "zs", "v", lr, ObjectiveConfig(), cfg)
                        for s in range(S)])
    ends = {k: np.stack([np.asarray(r.params[k], np.float64) for r in res]) for k in res[0].params}
    excess = task_curves(ends, THETA0, [0], 0.1, tasks=("theta0",))[:, 0, 0] - r_star
    se = excess.std(ddof=1) / np.sqrt(S)
    assert abs(excess.mean() - predicted) < 4 * se, (excess.mean(), se, predicted)
    assert predicted > 4 * se  # the jitter itself is resolved, not just consistent with zero
