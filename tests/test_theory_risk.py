"""Exact population risk (theory/risk.py) against Monte Carlo through linattn.model.predict.

SPEC section 6: a check passes when |theory - estimate| <= 4 standard errors (+ float tolerance).
Monte Carlo here uses its own sampler (independent of theory/) and the simulator's predict, in
float64. In all, the checks below draw 1.8 * 10^6 prompts.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linattn.model import predict
from linattn.params import icl_params, init_params, save_params
from theory.risk import population_objective, risk, risk_terms
from linattn.objectives import ObjectiveConfig

D_COV = 5
SAMPLES = 200_000
CHUNK = 50_000


def _sigma_matrix(d):
    a = np.linspace(-1.0, 1.0, d * d).reshape(d, d) * 0.5
    return np.eye(d) * 0.6 + a @ a.T  # a fixed, well-conditioned non-identity covariance


def _mc_risk(params, n, task, noise, sigma, normalization, key):
    """Mean and standard error of (y_hat - y_q)^2 over SAMPLES prompts."""
    d = D_COV
    chol = jnp.linalg.cholesky(jnp.asarray(sigma)) if sigma is not None else jnp.eye(d)

    @jax.jit
    def chunk_errors(k):
        kt, kx, ke = jax.random.split(k, 3)
        if isinstance(task, str):
            g = jax.random.normal(kt, (CHUNK, d))
            theta = g / jnp.linalg.norm(g, axis=1, keepdims=True)
        else:
            theta = jnp.broadcast_to(jnp.asarray(task), (CHUNK, d))
        x = jax.random.normal(kx, (CHUNK, n + 1, d)) @ chol.T
        y = jnp.einsum("bnd,bd->bn", x, theta) + jnp.sqrt(noise) * jax.random.normal(ke, (CHUNK, n + 1))
        Z = jnp.concatenate([jnp.ones((CHUNK, n + 1, 1)), x, y[..., None]], axis=-1)
        Z = Z.at[:, -1, -1].set(0.0)  # the query's label is hidden
        return (predict(params, Z, normalization=normalization) - y[:, -1]) ** 2

    errs = jnp.concatenate([chunk_errors(k) for k in jax.random.split(key, SAMPLES // CHUNK)])
    return float(errs.mean()), float(errs.std(ddof=1) / np.sqrt(errs.size))


# (merged, heads, normalization, task, n, noise, sigma)
CASES = [
    (True, 1, "tokens", "sphere", 0, 0.1, False),
    (True, 2, "shots", "fixed", 3, 0.0, False),
    (False, 1, "tokens", "fixed", 7, 0.1, False),
    (False, 2, "shots", "sphere", 7, 0.1, False),
    (True, 1, "tokens", "sphere", 3, 0.0, False),
    (False, 1, "shots", "fixed", 0, 0.1, False),
    (True, 2, "tokens", "fixed", 3, 0.1, True),
    (False, 2, "tokens", "sphere", 7, 0.1, True),
    (True, 1, "shots", "sphere", 7, 0.0, True),
]


@pytest.mark.parametrize("case", CASES, ids=[f"merged={c[0]}-H{c[1]}-{c[2]}-{c[3]}-n{c[4]}-s2={c[5]}-Sig={c[6]}" for c in CASES])
def test_exact_risk_matches_monte_carlo(case):
    merged, heads, normalization, task, n, noise, use_sigma = case
    seed = CASES.index(case)
    with jax.enable_x64(True):
        params = init_params(jax.random.PRNGKey(100 + seed), D_COV, heads=heads, merged=merged, std=0.3, dtype=jnp.float64)
        sigma = _sigma_matrix(D_COV) if use_sigma else None
        if task == "fixed":
            th = np.array([0.6, -0.3, 0.5, 0.2, -0.4])
            task_spec = th / np.linalg.norm(th)
        else:
            task_spec = "sphere"
        exact = float(risk(params, n, task_spec, noise, sigma, normalization))
        mc, se = _mc_risk(params, n, task_spec, noise, sigma, normalization, jax.random.PRNGKey(seed))
    gap = abs(exact - mc) / se
    print(f"{case}: exact {exact:.6f} mc {mc:.6f} se {se:.2e} gap {gap:.2f} se")
    assert abs(exact - mc) <= 4 * se + 1e-9


def test_gaussian_tasks_match_monte_carlo_identity():
    # theta ~ N(0, I/d): by homogeneity E_gauss = sum over degrees of E|theta|^k E_sphere[p_k];
    # checked here against an independent computation: average of the fixed-task risk over
    # many Gaussian thetas is a Monte Carlo estimate with its own standard error.
    with jax.enable_x64(True):
        params = init_params(jax.random.PRNGKey(7), D_COV, heads=2, std=0.3, dtype=jnp.float64)
        exact = risk(params, [0, 4], "gaussian", 0.1)
        thetas = jax.random.normal(jax.random.PRNGKey(8), (4000, D_COV)) / np.sqrt(D_COV)
        per = jax.vmap(lambda th: risk_terms(params, th, 0.1))(thetas)
        from theory.risk import risk_from_terms

        vals = jax.vmap(lambda t: risk_from_terms(t, jnp.array([0.0, 4.0]), 0.1))(per)
        mc, se = np.asarray(vals.mean(0)), np.asarray(vals.std(0, ddof=1)) / np.sqrt(vals.shape[0])
        exact = np.asarray(exact)
    assert np.all(np.abs(exact - mc) <= 4 * se + 1e-9), (exact, mc, se)


def test_vector_of_shots_and_scalar():
    with jax.enable_x64(True):
        params = init_params(jax.random.PRNGKey(3), D_COV, std=0.3, dtype=jnp.float64)
        curve = risk(params, list(range(6)), "sphere")
        assert curve.shape == (6,) and curve.dtype == jnp.float64
        for n in range(6):
            assert abs(float(risk(params, n, "sphere")) - float(curve[n])) < 1e-12


def test_pretraining_optimum_value():
    # risk of Gamma = I, v = c e_y at its own m (c from SPEC section 4) and its flatness in c
    d, m, s2 = 5, 20, 0.1
    c = (m + 1) / (m + 1 + d + d * s2)
    with jax.enable_x64(True):
        f = lambda w: risk(icl_params(d, 1.0, w, dtype=jnp.float64), m, "sphere", s2)
        assert abs(float(jax.grad(f)(c))) < 1e-12
        # risk(c) = 1 + s2 - 2 c m/(m+1) + c^2 m(m+1+d+d s2)/(m+1)^2, minimal value 1 + s2 - c m/(m+1)
        assert abs(float(f(c)) - (1 + s2 - c * m / (m + 1))) < 1e-12


def test_errors():
    with jax.enable_x64(True):
        params = init_params(jax.random.PRNGKey(0), D_COV, dtype=jnp.float64)
        with pytest.raises(ValueError, match="-3"):
            risk(params, [0, -3], "sphere")
        with pytest.raises(ValueError, match="one-layer"):
            risk(init_params(jax.random.PRNGKey(0), D_COV, layers=2), 0)
        with pytest.raises(ValueError, match="task vector"):
            risk(params, 0, np.ones(3))
        with pytest.raises(ValueError, match="unknown"):
            risk(params, 0, "cube")
        with pytest.raises(ValueError, match="normalization"):
            risk(params, 0, normalization="per-head")


def test_population_objective_and_gradient():
    theta0 = np.eye(D_COV)[0]
    cfg = ObjectiveConfig()
    with jax.enable_x64(True):
        params = init_params(jax.random.PRNGKey(0), D_COV, std=0.3, dtype=jnp.float64)
        zsfs = population_objective("zsfs", params, 0.25, cfg, theta0, 0.1)
        expected = risk(params, 0, theta0) + 0.75 * risk(params, 20, theta0)
        assert abs(float(zsfs) - float(expected)) < 1e-12
        g = jax.grad(lambda p: population_objective("pretrain", p, 0.0, cfg, None, 0.1))(params)
        # finite-difference check of one coordinate
        eps = 1e-6
        bump = {k: v for k, v in params.items()}
        bump["V"] = params["V"].at[0, 0, -1, -1].add(eps)
        fd = (population_objective("pretrain", bump, 0.0, cfg, None, 0.1) - population_objective("pretrain", params, 0.0, cfg, None, 0.1)) / eps
        assert abs(float(fd) - float(g["V"][0, 0, -1, -1])) < 1e-4 * max(1.0, abs(float(fd)))


def test_cli(tmp_path, capsys):
    """The CLI prints the exact risk at the asked shots as JSON (in process, through main(argv); its
    bad input is in tests/test_cli.py's table)."""
    from theory.risk import main

    p = tmp_path / "p.json"
    save_params(p, icl_params(D_COV, 1.0, 0.5))
    assert main(["--params", str(p), "--shots", "0,2,5", "--task", "fixed", "--theta=1,0,0,0,0"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["shots"] == [0, 2, 5] and len(out["risk"]) == 3
    assert main(["--params", str(p), "--shots", "0,10"]) == 0
    assert len(json.loads(capsys.readouterr().out)["risk"]) == 2
