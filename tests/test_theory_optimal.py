"""Closed-form optima (theory/optimal.py): zero gradient of the exact objective on the trainable
subset, and the numbers of SPEC section 4."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linattn.objectives import ObjectiveConfig
from linattn.params import load_params
from theory.optimal import (
    newton_subset,
    pretrain_c,
    pretrain_optimum,
    value_only,
    w_star,
    zs_all_member,
    zs_v_closed_form,
    zsfs_v_limit,
)
from theory.risk import population_objective, risk

D = 5
THETA0 = np.array([0.6, 0.0, -0.8, 0.0, 0.0])
CFG = ObjectiveConfig()
TOL = 1e-12  # float64 gradient norms at exact optima are ~1e-15


def _grad_norm(fn, params, leaves):
    g = jax.grad(fn)(params)
    return float(jnp.sqrt(sum(jnp.sum(g[k] ** 2) for k in leaves)))


def test_spec_numbers():
    assert abs(pretrain_c(5, 20, 0.1) - 0.79245) < 1e-5
    assert abs(pretrain_c(5, 20, 0.1) - 21 / 26.5) < 1e-15
    assert round(w_star(5, 20, 0.1), 4) == 0.6541


@pytest.mark.parametrize("normalization", ["tokens", "shots"])
@pytest.mark.parametrize("task", ["sphere", "gaussian"])
@pytest.mark.parametrize("g", [1.0, 0.6])
def test_pretraining_optimum_is_stationary_in_all_parameters(normalization, task, g):
    with jax.enable_x64(True):
        p = pretrain_optimum(D, 20, 0.1, normalization, task, g=g)
        f = lambda q: risk(q, 20, task, 0.1, None, normalization)
        assert _grad_norm(f, p, ["KQ", "V"]) < TOL
        # and it is a minimum along c: moving c either way raises the risk
        for eps in (-1e-3, 1e-3):
            q = dict(p, V=p["V"] * (1 + eps))
            assert float(f(q)) > float(f(p))


@pytest.mark.parametrize("k00", [0.5, 2.3, -1.0])
def test_zs_all_family_reaches_noise_floor_with_zero_gradient(k00):
    with jax.enable_x64(True):
        pre = pretrain_optimum(D, g=1.4)
        p = zs_all_member(pre, THETA0, k00)
        zs = lambda q: population_objective("zs", q, 0.0, CFG, THETA0, 0.1)
        assert abs(float(zs(p)) - 0.1) < 1e-13
        assert _grad_norm(zs, p, ["KQ", "V"]) < TOL


def test_zs_v_closed_form():
    with jax.enable_x64(True):
        g, c = 1.3, pretrain_c(D, 20)
        p = zs_v_closed_form(D, g, c / g, THETA0)
        zs = lambda q: population_objective("zs", q, 0.0, CFG, THETA0, 0.1)
        assert _grad_norm(zs, p, ["V"]) < TOL
        assert abs(float(zs(p)) - (0.1 + 2 / (D + 4))) < 1e-13
        # the exact quadratic solve from the pretraining optimum lands on the same point
        q, gn = value_only("zs", pretrain_optimum(D, g=g), THETA0, CFG, 0.0)
        assert gn < TOL
        np.testing.assert_allclose(np.asarray(q["V"][0, 0, -1]), np.asarray(p["V"][0, 0, -1]), atol=1e-12)


def test_zsfs_v_limit_point():
    # b minimizes ZS, w minimizes FS at that b: the lam -> 0+ limit of argmin ZS + lam FS
    with jax.enable_x64(True):
        g = 0.9
        p = zsfs_v_limit(D, g, THETA0, n_ft=20)
        zs = lambda q: population_objective("zs", q, 0.0, CFG, THETA0, 0.1)
        fs = lambda q: population_objective("fs", q, 0.0, CFG, THETA0, 0.1)
        assert _grad_norm(zs, p, ["V"]) < TOL
        assert abs(float(jax.grad(fs)(p)["V"][0, 0, -1, -1])) < TOL
        assert abs(float(p["V"][0, 0, -1, -1]) * g - 0.654088) < 1e-6
        # the exact minimizer at a small fixed weight tends to it
        small = ObjectiveConfig(schedule="constant", aux_weight=1e-7)
        q, gn = value_only("zsfs", pretrain_optimum(D, g=g), THETA0, small, 0.0)
        assert gn < 1e-10
        np.testing.assert_allclose(np.asarray(q["V"][0, 0, -1]), np.asarray(p["V"][0, 0, -1]), atol=1e-5)


def test_kq_only_zero_shot_gradient_vanishes_at_pretraining_optimum():
    # v^T z_q = 0 (v0 = 0, b = 0) makes the ZS prediction 0 for every KQ: KQ-only ZS cannot move
    with jax.enable_x64(True):
        p = pretrain_optimum(D)
        zs = lambda q: population_objective("zs", q, 0.0, CFG, THETA0, 0.1)
        assert _grad_norm(zs, p, ["KQ"]) == 0.0
        q, gn = newton_subset(zs, p, "kq")
        assert gn == 0.0 and float(jnp.max(jnp.abs(q["KQ"] - p["KQ"]))) == 0.0


def test_cli(tmp_path, capsys):
    """The CLI's files hold the closed forms (in process, through main(argv); its bad input is in
    tests/test_cli.py's table)."""
    from theory.optimal import main

    out = tmp_path / "pre.json"
    assert main(["--method", "pretrain", "--d", "5", "--shots", "20", "--noise", "0.1", "--out", str(out)]) == 0
    with jax.enable_x64(True):
        p, norm = load_params(out, dtype=jnp.float64)
        assert norm == "tokens"
        assert abs(float(p["KQ"][0, 0, 1, 1] * p["V"][0, 0, -1, -1]) - 21 / 26.5) < 1e-12
    out_v = tmp_path / "zsfs_v.json"
    assert main(["--method", "zsfs_v", "--theta=1,0,0,0,0", "--params", str(out), "--out", str(out_v)]) == 0
    with jax.enable_x64(True):
        q, _ = load_params(out_v, dtype=jnp.float64)
        assert abs(float(q["V"][0, 0, -1, -1]) - w_star(5, 20, 0.1)) < 1e-5
        assert abs(float(q["V"][0, 0, -1, 1]) - 1 / 9) < 1e-5
