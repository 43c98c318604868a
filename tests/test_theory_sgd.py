"""The SGD-aware prediction (theory.sgd; issue #13): its noise is the minibatch noise of the model's
own gradient covariance, it is the gradient flow without noise and as the batch grows, and it
reproduces the closed-form jitter of a quadratic problem."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linattn import train as T
from linattn.objectives import ObjectiveConfig
from linattn.optim import OptimizerConfig, param_labels, trainable_vector
from theory import noise as N
from theory import sgd as G
from theory.optimal import pretrain_optimum
from theory.risk import risk, task_curves
from theory.solver import flow_plan

THETA3 = np.array([0.6, 0.0, 0.8])


def _start(d, seed=0, std=0.05):
    """The pretraining optimum, perturbed so that no entry is special (float64)."""
    p = pretrain_optimum(d, 20, 0.1)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(p))
    return {k: np.asarray(v, np.float64) + std * np.asarray(jax.random.normal(kk, np.shape(v)))
            for kk, (k, v) in zip(keys, sorted(p.items()))}


def test_diffusion_noise_has_the_exact_minibatch_covariance():
    """Var(u . xi) of the diffusion source's gradient noise at batch B, along fixed random
    directions u and in trace, against u^T C u / B with C the exact per-prompt covariance
    (theory.noise, degree-12 cubature), within 4 SE over 4000 draws."""
    B, n = 1000, 4000
    p = _start(3)
    exact = N.zero_shot_gradient_moments(p, "all", THETA3, 0.1)
    cfg = T.TrainConfig(steps=10, batch=B, d=3)
    ctx = T.TaskContext(jnp.asarray(THETA3))
    with jax.enable_x64(True):
        p64 = {k: jnp.asarray(v) for k, v in p.items()}
        _, unflatten = trainable_vector(p64, param_labels(p64, "all"))
        vec0, _ = trainable_vector(p64, param_labels(p64, "all"))

        def grad(key):
            f = lambda v: G.diffusion_source(key, (unflatten(v),), {(0, "target"): (0,)}, cfg, ctx)[(0, 0, "target")]
            return jax.grad(f)(vec0)

        gs = np.asarray(jax.lax.map(grad, jax.random.split(jax.random.PRNGKey(1), n), batch_size=500))
    np.testing.assert_allclose(gs.mean(0), exact.mean, atol=6 * gs.std(0).max() / np.sqrt(n))
    dev = gs - exact.mean  # the noise around the exact population gradient
    U = np.random.default_rng(2).normal(size=(6, gs.shape[1]))
    U /= np.linalg.norm(U, axis=1, keepdims=True)
    for u in list(U) + [None]:
        sq = (dev**2).sum(1) if u is None else (dev @ u) ** 2
        want = np.trace(exact.cov) if u is None else u @ exact.cov @ u
        z = (sq.mean() * B - want) / (sq.std(ddof=1) * B / np.sqrt(n))
        assert abs(z) < 4, (z, sq.mean() * B, want)


def _run(key, p, subset="all", steps=200, batch=500, opt=OptimizerConfig()):
    cfg = T.TrainConfig(steps=steps, batch=batch, d=3, optimizer=opt)
    return T.Run(key, {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}, T.TaskContext(jnp.asarray(THETA3)),
                 "zs", subset, 0.01, ObjectiveConfig(), cfg)


def test_noise_off_is_the_gradient_flow_bit_for_bit():
    run = _run(jax.random.PRNGKey(0), _start(3))
    off = G.sgd_plan([run], gradient_flow=True)[0]
    flow = flow_plan([run])[0]
    assert off.params["V"].shape[0] == 1
    for k in flow.params:
        np.testing.assert_array_equal(off.params[k][0], flow.params[k])
    np.testing.assert_array_equal(off.history[0], flow.history)


def test_large_batches_recover_the_gradient_flow():
    """The same noise path at batch B and 100 B: the distance to the flow's end point is linear in
    the noise's scale 1/sqrt(B) (ratio 10) and vanishes with it. (No clip: its kink is not smooth.)"""
    p, opt = _start(3), OptimizerConfig(clip_norm=None)
    flow = flow_plan([_run(None, p, opt=opt)])[0].params
    dist = []
    for B in (10**8, 10**10):
        end = G.sgd_plan([_run(jax.random.PRNGKey(3), p, batch=B, opt=opt)], paths=1)[0].params
        dist.append(np.sqrt(sum(np.sum((end[k][0] - flow[k]) ** 2) for k in flow)))
    assert dist[1] < 1e-4
    assert 9.5 < dist[0] / dist[1] < 10.5, dist


def test_diffusion_jitter_of_value_only_zs_matches_the_closed_form():
    """ZS (V) from its exact minimizer, 100 steps at batch 2048, momentum 0.9, no clip: the path mean
    of the exact excess zero-shot risk against tr(H Sigma_100) / 2 (theory.noise.sgd_jitter), within
    4 SE over 64 paths."""
    d, lr, B, K, paths = 5, 0.01, 2048, 100, 64
    theta = np.eye(d)[0] * 0.6 + np.eye(d)[1] * 0.8
    p = {k: np.asarray(v) for k, v in pretrain_optimum(d, 20, 0.1).items()}
    with jax.enable_x64(True):
        p64 = {k: jnp.asarray(v, jnp.float64) for k, v in p.items()}
        vec, unflatten = trainable_vector(p64, param_labels(p64, "v"))
        R = lambda v: risk(unflatten(v), 0, jnp.asarray(theta), 0.1)
        H = np.asarray(jax.hessian(R)(vec))
        star = np.asarray(vec) - np.linalg.pinv(H) @ np.asarray(jax.grad(R)(vec))
        p_star = {k: np.asarray(v) for k, v in unflatten(jnp.asarray(star)).items()}
        r_star = float(R(jnp.asarray(star)))
    C = N.zero_shot_gradient_moments(p_star, "v", theta, 0.1).cov
    predicted = N.jitter_excess(H, N.sgd_jitter(H, C, lr, 0.9, B, steps=K))
    cfg = T.TrainConfig(steps=K, batch=B, d=d, optimizer=OptimizerConfig(clip_norm=None))
    run = T.Run(jax.random.PRNGKey(4), p_star, T.TaskContext(jnp.asarray(theta)), "zs", "v", lr, ObjectiveConfig(), cfg)
    ends = G.sgd_plan([run], paths=paths)[0].params
    excess = task_curves(ends, theta, [0], 0.1, tasks=("theta0",))[:, 0, 0] - r_star
    se = excess.std(ddof=1) / np.sqrt(paths)
    assert abs(excess.mean() - predicted) < 4 * se, (excess.mean(), se, predicted)
    assert predicted > 4 * se


def test_the_probe_size_is_a_setting_of_the_program():
    """TrainConfig.probe keys the compiled program: in one process, probe 16 and 64 give different
    paths, and asking for probe 16 again gives the first bit for bit."""
    p = _start(3)

    def end(probe):
        run = _run(jax.random.PRNGKey(5), p, steps=20)
        run = T.dataclasses.replace(run, cfg=T.dataclasses.replace(run.cfg, probe=probe))
        return G.sgd_plan([run], paths=1)[0].params["V"]

    a, b, again = end(16), end(64), end(16)
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, again)
    with pytest.raises(ValueError, match="probe must be >= 1"):
        T.TrainConfig(probe=0)


def test_end_point_curves_and_refusals():
    p = _start(3)
    stacked = {k: np.stack([v, v]) for k, v in p.items()}
    s = G.end_point_curves(stacked, THETA3, [0, 5], 0.1)
    np.testing.assert_allclose(s.mean, task_curves({k: v[None] for k, v in p.items()}, THETA3, [0, 5], 0.1)[0])
    np.testing.assert_array_equal(s.sd, 0.0)
    with pytest.raises(ValueError, match="paths must be >= 1"):
        G.sgd_plan([_run(jax.random.PRNGKey(0), p)], paths=0)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        G.sgd_plan([_run(None, p)], paths=2)
