"""Generic solver (theory/solver.py) against closed forms, and the study's three qualitative
results from the exact risk (SPEC section 4), with the reference protocol: 5000 steps of SGD,
momentum 0.9, lr 0.01, clip 1.0, from the pretraining optimum (g = 1)."""

import functools

import jax
import numpy as np
import pytest

from linattn.objectives import ObjectiveConfig, register_objective, OBJECTIVES
from theory.optimal import pretrain_c, pretrain_optimum, w_star
from theory.risk import risk
from theory.solver import solve

D = 5
THETA0 = np.eye(D)[0]
CFG = ObjectiveConfig()
SHOTS = np.arange(0, 41)


@functools.lru_cache(maxsize=None)
def _flow(name, subset):
    with jax.enable_x64(True):
        return solve(name, pretrain_optimum(D), subset, CFG, THETA0, 0.1, method="flow", steps=5000, lr=0.01)


def _curve(params, theta):
    with jax.enable_x64(True):
        return np.asarray(risk(params, SHOTS, theta, 0.1))


def test_full_zs_flow_lands_on_the_zs_family_and_loses_icl():
    r = _flow("zs", "all")
    kq, v = np.asarray(r.params["KQ"][0, 0]), np.asarray(r.params["V"][0, 0, -1])
    assert abs(r.objective - 0.1) < 1e-10 and r.grad_norm < 1e-8
    # the branch KQ[0,0] = k00, v_x = theta0/k00, Gamma = 0, w kept (theory.optimal.zs_all_member)
    k00 = kq[0, 0]
    np.testing.assert_allclose(v[1 : D + 1], THETA0 / k00, atol=1e-8)
    assert np.max(np.abs(kq[1 : D + 1, 1 : D + 1])) < 1e-8
    assert abs(v[-1] - pretrain_c(D, 20)) < 1e-12
    print(f"full ZS flow endpoint: k00 = {k00:.6f}, b = {1 / k00:.6f} theta0")
    pre, ft = _curve(pretrain_optimum(D), -THETA0), _curve(r.params, -THETA0)
    # the -theta0 error stays above the null predictor's (1 + s2) at every n, far above pretrained
    assert np.all(ft > 1.1)
    assert np.all(ft[1:] > pre[1:])
    assert ft[40] > 3 * pre[40]


def test_value_only_zs_keeps_icl():
    r = _flow("zs", "v")
    v = np.asarray(r.params["V"][0, 0, -1])
    np.testing.assert_allclose(v[1 : D + 1], THETA0 / (D + 4), atol=1e-9)
    assert abs(v[-1] - pretrain_c(D, 20)) < 1e-12
    for theta in (THETA0, -THETA0):
        curve = _curve(r.params, theta)
        assert np.all(np.diff(curve[1:]) < 0)  # falls with n from n = 1 on
    assert _curve(r.params, -THETA0)[40] < 0.35


def test_value_only_zsfs_trades_minus_theta0_for_theta0():
    zs, zsfs = _flow("zs", "v"), _flow("zsfs", "v")
    w_end = float(zsfs.params["V"][0, 0, -1, -1])
    print(f"V-only ZS+FS flow: w = {w_end:.6f} vs w*(20) = {w_star(D, 20, 0.1):.6f}")
    assert abs(w_end - w_star(D, 20, 0.1)) < 2e-3  # approximately w*: the FS weight decays to 0
    n_ft = CFG.n_ft
    assert _curve(zsfs.params, THETA0)[n_ft] < _curve(zs.params, THETA0)[n_ft]
    assert _curve(zsfs.params, -THETA0)[n_ft] > _curve(zs.params, -THETA0)[n_ft]


def test_minimize_matches_closed_forms():
    with jax.enable_x64(True):
        # pretraining from a perturbed start: lands on Gamma = g I, v = w e_y with g w = c
        p0 = pretrain_optimum(D, g=1.0)
        key = jax.random.PRNGKey(0)
        p0 = {k: v + 0.02 * jax.random.normal(jax.random.fold_in(key, i), v.shape) for i, (k, v) in enumerate(sorted(p0.items()))}
        r = solve("pretrain", p0, "all", CFG, None, 0.1, method="minimize", iters=300)
        assert r.grad_norm < 1e-9
        kq, v = np.asarray(r.params["KQ"][0, 0]), np.asarray(r.params["V"][0, 0, -1])
        gam = kq[1 : D + 1, 1 : D + 1]
        g = np.trace(gam) / D
        np.testing.assert_allclose(0.5 * (gam + gam.T), g * np.eye(D), atol=1e-6)
        assert abs(g * v[-1] - pretrain_c(D, 20)) < 1e-6
        # value-only ZS: b = theta0/((d+4) g)
        r = solve("zs", pretrain_optimum(D, g=2.0), "v", CFG, THETA0, 0.1, method="minimize", iters=100)
        assert r.grad_norm < 1e-10
        np.testing.assert_allclose(np.asarray(r.params["V"][0, 0, -1, 1 : D + 1]), THETA0 / (D + 4) / 2.0, atol=1e-9)


def test_user_registered_objective_is_solvable():
    name = "test_theory_zs_plus_random"
    if name not in OBJECTIVES:
        @register_objective(name)
        def _obj(risk_fn, params, progress, cfg):
            """ZS on theta0 + 0.5 * 5-shot error on random tasks."""
            return risk_fn(params, 0, "target") + 0.5 * risk_fn(params, 5, "random")

    with jax.enable_x64(True):
        r = solve(name, pretrain_optimum(D), "v", CFG, THETA0, 0.1, method="minimize", iters=100)
    assert r.grad_norm < 1e-10 and np.isfinite(r.objective)


def test_bad_method():
    with pytest.raises(ValueError, match="method"):
        solve("zs", pretrain_optimum(D), "v", CFG, THETA0, method="newton")
    with pytest.raises(ValueError, match="unknown"):
        solve("no_such_objective", pretrain_optimum(D), "v", CFG, THETA0)
