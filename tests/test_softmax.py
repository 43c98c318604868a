"""The softmax transformer (linattn.softmax) on the engine: freezing, save/load, masking, baselines,
and a short pretraining that beats the zero predictor by more than 4 standard errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linattn import baselines as B, evaluate as E, models, optim, softmax as S, train as T
from linattn.data import SAMPLERS
from linattn.objectives import ObjectiveConfig
from linattn.optim import OptimizerConfig

D = 3
CTX = T.TaskContext(theta0=jnp.array([0.6, 0.8, 0.0]))


def small(key=0, **kw):
    return S.init_params(jax.random.PRNGKey(key), D, **{"layers": 2, "heads": 2, "width": 16, "mlp": 16, **kw})


def test_module_tree_is_the_flat_tree_and_predict_is_the_module():
    p = small()
    assert list(p) == list(S.SHAPES)
    S.check_params(p, D)
    module = S.SoftmaxTransformer(D, layers=2, heads=2, width=16, mlp=16)
    Z = jax.random.normal(jax.random.PRNGKey(1), (4, 6, D + 2))
    np.testing.assert_array_equal(module.apply({"params": p}, Z), S.predict(p, Z))
    assert models.model_of(p).name == "softmax" and not models.is_stacked(p)


def test_padding_past_n_is_masked():
    """A prompt zero-padded past n, told n, predicts what the unpadded prompt does (float rounding only)."""
    p = small()
    Z = jax.random.normal(jax.random.PRNGKey(2), (5, 4, D + 2))
    padded = jnp.concatenate([Z[:, :3], jnp.zeros((5, 7, D + 2)), Z[:, 3:]], axis=1)
    eps = float(jnp.finfo(jnp.float32).eps)
    ref = S.predict(p, Z)
    np.testing.assert_allclose(S.predict(p, padded, n=3), ref, rtol=0, atol=64 * eps * float(jnp.max(jnp.abs(ref))))
    assert not np.allclose(S.predict(p, padded), ref)  # without n the zeros are attended to


def test_subsets_label_the_softmax_tree():
    p = small()
    trained = lambda sub: sorted(k for k, lab in optim.param_labels(p, sub).items() if lab == "train")
    assert trained("all") == sorted(S.SHAPES)
    assert trained("v") == ["O", "V"]
    assert trained("kq") == ["K", "Q"]
    assert trained("readout") == ["readout", "readout_bias"]
    with pytest.raises(ValueError, match=r"subset 'k' unknown; allowed: \['all', 'kq', 'readout', 'v'\]"):
        optim.param_labels(p, "k")


@pytest.mark.parametrize("subset,objective", [("v", "zsfs"), ("kq", "zsfs"), ("readout", "zs")])
def test_frozen_leaves_unchanged_bit_for_bit(subset, objective):
    p0 = small(3)
    cfg = T.TrainConfig(steps=10, batch=32, d=D, history=5)
    res = T.train(jax.random.PRNGKey(4), p0, 0.05, CTX, ObjectiveConfig(n_ft=4), objective=objective, subset=subset,
                  cfg=cfg, devices=1)
    for k, lab in optim.param_labels(p0, subset).items():
        same = np.array_equal(np.asarray(res.params[k]), np.asarray(p0[k]))
        assert same == (lab == "freeze"), (k, lab)


def test_the_exact_source_refuses_a_softmax_tree():
    run = T.Run(None, small(), T.TaskContext(theta0=np.ones(D)), cfg=T.TrainConfig(steps=2, batch=4, d=D))
    with pytest.raises(ValueError, match="source 'exact' is the theory of the linear model and its reparametrisations .*; a softmax"):
        T.train_plan([run], source="exact")


def test_save_load_round_trip(tmp_path):
    p = small(5)
    S.save_params(tmp_path / "p.msgpack", p)
    q = S.load_params(tmp_path / "p.msgpack")
    assert list(q) == list(p)
    for k in p:
        assert q[k].dtype == p[k].dtype and np.array_equal(np.asarray(q[k]), np.asarray(p[k])), k
    (tmp_path / "bad.msgpack").write_bytes(b"not msgpack")
    with pytest.raises(ValueError, match="linattn-softmax-v1"):
        S.load_params(tmp_path / "bad.msgpack")


def test_bad_trees_and_settings_raise():
    p = small()
    with pytest.raises(ValueError, match=r"missing leaves \['O'\]"):
        S.check_params({k: v for k, v in p.items() if k != "O"})
    with pytest.raises(ValueError, match="'mlp_out' has shape"):
        S.check_params({**p, "mlp_out": p["mlp_out"][:, :3]})
    with pytest.raises(ValueError, match="data has d = 4"):
        S.check_params(p, 4)
    with pytest.raises(ValueError, match="width 10 must be a multiple of heads 4"):
        S.init_params(jax.random.PRNGKey(0), D, heads=4, width=10)
    with pytest.raises(ValueError, match="ridge lambda must be a finite number >= 0; got -1"):
        B.ridge(-1.0)
    with pytest.raises(ValueError, match="noise variance > 0; got 0"):
        B.bayes_sphere(jax.random.PRNGKey(0), D, 0.0)


def test_ridge_baseline_is_ridge_regression():
    Z = jax.random.normal(jax.random.PRNGKey(6), (2, 8, D + 2))
    X, y, xq = (np.asarray(a, np.float64) for a in (Z[:, :-1, 1:-1], Z[:, :-1, -1], Z[:, -1, 1:-1]))
    for lam in (0.0, 0.3):
        want = [xq[i] @ np.linalg.solve(X[i].T @ X[i] + lam * np.eye(D), X[i].T @ y[i]) for i in range(2)]
        got = np.asarray(B.predict_ridge(B.ridge(lam), Z), np.float64)
        eps = float(jnp.finfo(jnp.float32).eps)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e3 * eps * np.max(np.abs(want)))


def test_sphere_bayes_predictor_is_the_posterior_mean():
    """d = 2: the importance-sampling posterior mean against the posterior mean on a fine grid of the
    circle, within 4 of its own importance-sampling standard errors."""
    d = 2
    th = jnp.array([[0.6, 0.8], [-1.0, 0.0], [0.0, 1.0]])
    for n in (3, 20):
        Z, _ = SAMPLERS["tokens"](jax.random.PRNGKey(n), n, 3, d, th, 0.1, None, jnp.float32)
        theta, ess, se = B.bayes_sphere_stats(B.bayes_sphere(jax.random.PRNGKey(1), d, 0.1, 1024), Z)
        ang = np.linspace(0, 2 * np.pi, 100_000, endpoint=False)
        U = np.stack([np.cos(ang), np.sin(ang)], 1)
        Zn = np.asarray(Z, np.float64)
        for i in range(3):
            X, y = Zn[i, :-1, 1:-1], Zn[i, :-1, -1]
            logp = (2 * U @ (X.T @ y) - np.einsum("ki,ij,kj->k", U, X.T @ X, U)) / (2 * 0.1)
            w = np.exp(logp - logp.max())
            exact = (w / w.sum()) @ U
            assert np.all(np.abs(np.asarray(theta[i]) - exact) <= 4 * np.asarray(se[i])), (n, i, theta[i], exact)
            assert float(ess[i]) > 100


def test_short_pretraining_beats_the_zero_predictor_by_4_se():
    """Adam on the pretraining objective; 10-shot error on random tasks against the zero predictor's
    (1 + sigma^2 in expectation), both measured on the same prompts."""
    p0 = small(7)
    cfg = T.TrainConfig(steps=150, batch=128, d=D, history=5, optimizer=OptimizerConfig(name="adam"))
    res = T.train(jax.random.PRNGKey(8), p0, 3e-3, CTX, ObjectiveConfig(m=10), cfg=cfg, devices=1)
    key = jax.random.PRNGKey(9)
    kw = dict(samples=2000, chunk=1000)
    model = E.test_errors(key, res.params, [10], CTX.theta0, **kw)["random"]
    zero = E.test_errors(key, B.zero(), [10], CTX.theta0, **kw)["random"]
    gap, se = zero.mean[0] - model.mean[0], np.hypot(zero.se[0], model.se[0])
    assert gap > 4 * se, (model, zero)
