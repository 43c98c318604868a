"""Parameter subsets through optax: frozen leaves bit-identical, clipping sees trainable leaves only."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from linattn import optim, params as P, train as T


def test_labels_for_named_and_custom_subsets():
    merged = P.init_params(jax.random.PRNGKey(0), 2)
    sep = P.init_params(jax.random.PRNGKey(0), 2, merged=False)
    assert optim.param_labels(merged, "V") == {"KQ": "freeze", "V": "train"}
    assert optim.param_labels(sep, "all") == {"K": "train", "Q": "train", "V": "train"}
    assert optim.param_labels(sep, "q") == {"K": "freeze", "Q": "train", "V": "freeze"}
    assert optim.param_labels(sep, lambda name: name in "KQ") == {"K": "train", "Q": "train", "V": "freeze"}


def test_bad_subsets_raise():
    merged = P.init_params(jax.random.PRNGKey(0), 2)
    with pytest.raises(ValueError, match=r"subset 'attn' unknown; allowed: \['all', 'k', 'kq', 'q', 'v'\]"):
        optim.param_labels(merged, "attn")
    with pytest.raises(ValueError, match="none of which a merged"):
        optim.param_labels(merged, "k")
    with pytest.raises(ValueError, match="leaves no parameter trainable"):
        optim.param_labels(merged, lambda name: False)


def test_clip_counts_only_trainable_leaves():
    p = P.zeros_params(2)
    grads = {"KQ": jnp.full_like(p["KQ"], 100.0), "V": jnp.full_like(p["V"], 0.1)}
    opt = optim.make_optimizer(p, "v", 1.0, optim.OptimizerConfig(momentum=0.0, clip_norm=1.0))
    updates, _ = opt.update(grads, opt.init(p), p)
    # V's gradient norm is 0.1 * 4 = 0.4 < 1: unclipped, although the frozen KQ gradient is huge.
    np.testing.assert_allclose(updates["V"], -grads["V"], rtol=1e-6)
    np.testing.assert_array_equal(updates["KQ"], 0.0)
    assert float(optim.trainable_norm(grads, optim.param_labels(p, "v"))) == pytest.approx(0.4)
    opt_all = optim.make_optimizer(p, "all", 1.0, optim.OptimizerConfig(momentum=0.0, clip_norm=1.0))
    upd_all, _ = opt_all.update(grads, opt_all.init(p), p)
    assert float(optax.tree.norm(upd_all)) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("subset", ["v", "k", "q"])
def test_frozen_leaves_bit_identical_after_training(subset):
    p0 = P.init_params(jax.random.PRNGKey(1), 3, merged=False)
    cfg = T.TrainConfig(steps=20, batch=64, d=3, history=5)
    ctx = T.TaskContext(theta0=jnp.array([1.0, 0.0, 0.0]))
    res = T.train(jax.random.PRNGKey(2), p0, 0.05, ctx, objective="zsfs", subset=subset, cfg=cfg)
    labels = optim.param_labels(p0, subset)
    for k, lab in labels.items():
        if lab == "freeze":
            assert np.array_equal(np.asarray(res.params[k]), np.asarray(p0[k])), k
        else:
            assert not np.array_equal(np.asarray(res.params[k]), np.asarray(p0[k])), k


def test_adam_and_lr_as_array():
    p0 = P.init_params(jax.random.PRNGKey(1), 2)
    cfg = T.TrainConfig(steps=10, batch=32, d=2, optimizer=optim.OptimizerConfig(name="adam"))
    res = T.train(jax.random.PRNGKey(0), p0, jnp.asarray(1e-3), T.TaskContext(theta0=jnp.ones(2)), objective="zs",
                  cfg=cfg)
    assert np.isfinite(float(res.final_loss))
    with pytest.raises(ValueError, match="optimizer 'lbfgs' unknown"):
        optim.OptimizerConfig(name="lbfgs")
