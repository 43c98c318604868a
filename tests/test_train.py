"""Training: reference pretraining at reduced size, no recompilation, divergence, vmapped sweeps."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linattn import data, params as P, train as T
from linattn.objectives import ObjectiveConfig
from theory.risk import risk as exact_risk

D_, M_, NOISE = 5, 20, 0.1
C_STAR = (M_ + 1) / (M_ + 1 + D_ + D_ * NOISE)  # SPEC section 4: 0.79245...


@pytest.fixture(scope="module")
def pretrained():
    """Four seeds of reference pretraining at reduced size (1500 steps, batch 2000), one program."""
    cfg = T.TrainConfig(steps=1500, batch=2000, history=10)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    p0 = jax.vmap(lambda k: P.init_params(k, D_))(jax.random.split(jax.random.PRNGKey(1), 4))
    ctx = T.TaskContext(theta0=jnp.zeros(D_))
    res = T.train_many(keys, p0, 0.01, ctx, cfg=cfg, params_batched=True)
    return res


def _c(params):
    """The product that the prediction depends on: mean diagonal of Gamma times w."""
    kq, v = params["KQ"][..., 0, 0, :, :], params["V"][..., 0, 0, -1, -1]
    return jnp.trace(kq[..., 1:-1, 1:-1], axis1=-2, axis2=-1) / D_ * v


def test_pretraining_reaches_the_exact_optimum_risk(pretrained):
    """The training loss is the exact risk of the iterates, which sits just above the optimum R*.

    Reference value: R* = 0.345283, the exact risk (theory.risk) at the closed-form optimum for
    d = 5, m = 20, sigma^2 = 0.1. The late training loss (mean of the last five history buckets of
    four seeds: 20 means of 150 minibatch losses; standard error from their spread) must equal the
    exact risk of the final iterates within 4 combined standard errors. Constant-rate SGD keeps the
    iterates jittering around the optimum, so that risk exceeds R* by the stationary excess, which
    is positive and measured here (2.9e-4 to 5.7e-4, about 1e-3 of R*, in this run).
    """
    with jax.enable_x64(True):
        r_star = float(exact_risk(P.icl_params(D_, C_STAR, 1.0, dtype=jnp.float64), [M_], "sphere", NOISE)[0])
        finals = np.array([
            float(exact_risk(jax.tree.map(lambda a: jnp.asarray(a[i], jnp.float64), pretrained.params),
                             [M_], "sphere", NOISE)[0]) for i in range(4)])
    assert r_star == pytest.approx(0.345283, abs=1e-6)
    late = np.asarray(pretrained.history)[:, -5:].ravel()
    se = np.hypot(late.std(ddof=1) / np.sqrt(late.size), finals.std(ddof=1) / np.sqrt(finals.size))
    assert abs(late.mean() - finals.mean()) <= 4 * se, (late.mean(), finals, se)
    excess = finals - r_star
    assert np.all(excess > 0) and excess.mean() < 0.01 * r_star, excess


def test_pretraining_learns_c(pretrained):
    """g * w matches c = (m+1)/(m+1+d+d sigma^2) within 4 standard errors over seeds (plus float32
    rounding): each seed's c is an independent draw around c* (SGD keeps jittering at a constant
    rate), so their spread is the noise of the run. Measured: 0.79152 +- 0.00061 vs 0.79245."""
    c = np.asarray(_c(pretrained.params), np.float64)
    se = c.std(ddof=1) / np.sqrt(c.size)
    assert abs(c.mean() - C_STAR) <= 4 * se + 1e-6, (c, C_STAR, se)
    # Gamma is isotropic: its off-diagonal entries (4 seeds x 20, zero-mean by the problem's
    # rotation symmetry) average to zero within 4 standard errors.
    gamma = np.asarray(pretrained.params["KQ"][:, 0, 0, 1:-1, 1:-1], np.float64)
    off = gamma[:, ~np.eye(D_, dtype=bool)].ravel()
    assert abs(off.mean()) <= 4 * off.std(ddof=1) / np.sqrt(off.size), off


def test_second_call_does_not_recompile():
    cfg = T.TrainConfig(objective="zs", steps=5, batch=16, d=2)
    fn = chex.assert_max_traces(T.train_fn(cfg), n=1)
    jitted = jax.jit(fn)
    p0 = P.init_params(jax.random.PRNGKey(0), 2)
    ctx = T.TaskContext(theta0=jnp.ones(2))
    for i, lr in enumerate([0.01, 0.02, 0.03]):  # new key and rate each call: still one trace
        jitted(jax.random.PRNGKey(i), p0, jnp.asarray(lr), ctx, ObjectiveConfig())
    chex.clear_trace_counter()


def test_vmapped_sweep_over_seeds_and_rates_matches_single_runs():
    cfg = T.TrainConfig(objective="zsfs", subset="v", steps=20, batch=64, d=3, history=4)
    p0 = P.init_params(jax.random.PRNGKey(0), 3)
    ctx = T.TaskContext(theta0=jnp.array([0.0, 1.0, 0.0]))
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    lrs = jnp.array([0.01, 0.02, 0.05])
    many = T.train_many(keys, p0, lrs, ctx, cfg=cfg)
    assert many.history.shape == (3, 4)
    for i in range(3):
        one = T.train(keys[i], p0, lrs[i], ctx, cfg=cfg)
        np.testing.assert_allclose(many.params["V"][i], one.params["V"], rtol=1e-5, atol=1e-7)


def test_common_random_numbers_across_methods():
    """With one key, ZS and ZS+FS see the same zero-shot minibatches: identical at the first step."""
    p0 = P.init_params(jax.random.PRNGKey(0), 2)
    ctx = T.TaskContext(theta0=jnp.array([1.0, 0.0]))
    key = jax.random.PRNGKey(3)
    r = T.mc_risk(jax.random.fold_in(key, 0), T.TrainConfig(batch=32, d=2), ctx)
    r2 = T.mc_risk(jax.random.fold_in(key, 0), T.TrainConfig(batch=32, d=2, objective="zsfs"), ctx)
    assert float(r(p0, 0, "target")) == float(r2(p0, 0, "target"))
    assert float(r(p0, 0, "target")) != float(r(p0, 3, "target"))


def test_finetune_dataset_prompts():
    ds = data.make_finetune_dataset(jax.random.PRNGKey(0), jnp.array([0.6, 0.8]), size=1000)
    assert ds.x.shape == (1000, 2) and ds.y.shape == (1000,)
    Z, y = data.sample_from_dataset(jax.random.PRNGKey(1), ds, 4, 7)
    assert Z.shape == (7, 5, 4)
    np.testing.assert_array_equal(Z[:, -1, -1], 0.0)
    rows = {tuple(np.round(np.asarray(r), 5)) for r in np.asarray(ds.x)}
    assert all(tuple(np.round(np.asarray(z[1:3]), 5)) in rows for z in Z.reshape(-1, 4))


def test_divergence_reports_step_and_rate():
    p0 = P.init_params(jax.random.PRNGKey(0), 3, std=1.0)
    cfg = T.TrainConfig(objective="pretrain", steps=200, batch=64, d=3,
                        optimizer=T.OptimizerConfig(momentum=0.9, clip_norm=None))
    with pytest.raises(T.TrainingDiverged, match=r"diverged \(non-finite loss\) at step \d+ with learning rate 50") as err:
        T.train(jax.random.PRNGKey(0), p0, 50.0, T.TaskContext(theta0=jnp.ones(3)), cfg=cfg)
    assert 0 <= err.value.step < 200 and err.value.lr == 50.0
    # the non-raising path keeps the last finite parameters
    res = T.train(jax.random.PRNGKey(0), p0, 50.0, T.TaskContext(theta0=jnp.ones(3)), cfg=cfg, check=False)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in res.params.values())


def test_bad_config_and_data_mismatch():
    with pytest.raises(ValueError, match="sampler 'fast' unknown"):
        T.TrainConfig(sampler="fast")
    with pytest.raises(ValueError, match="steps must be >= 1; got 0"):
        T.TrainConfig(steps=0)
    p0 = P.init_params(jax.random.PRNGKey(0), 4)
    with pytest.raises(ValueError, match="d = 5"):
        T.train(jax.random.PRNGKey(0), p0, 0.01, T.TaskContext(theta0=jnp.ones(5)), cfg=T.TrainConfig(steps=2, batch=4))
    with pytest.raises(ValueError, match="subset 'w' unknown"):
        T.train(jax.random.PRNGKey(0), p0, 0.01, T.TaskContext(theta0=jnp.ones(4)),
                cfg=T.TrainConfig(steps=2, batch=4, d=4, subset="w"))
