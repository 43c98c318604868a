"""Objective registry and schedules; every registered objective trains (registry-driven)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linattn import objectives as O, params as P, train as T


def test_unknown_objective_lists_registered():
    with pytest.raises(ValueError, match=r"objective 'nope' unknown; registered: \[.*'zs'.*\]"):
        O.get_objective("nope")
    with pytest.raises(ValueError, match="objective 'nope' unknown"):
        T.train(jax.random.PRNGKey(0), P.init_params(jax.random.PRNGKey(0), 2), 0.01,
                T.TaskContext(theta0=jnp.ones(2)), objective="nope", cfg=T.TrainConfig(steps=1, batch=2, d=2))


def test_register_new_objective_and_reject_duplicates():
    @O.register_objective("test_fs_only_random")
    def fs_random(risk, params, progress, cfg):
        """n_ft-shot error on random tasks."""
        return risk(params, cfg.n_ft, "random")

    try:
        assert O.get_objective("test_fs_only_random").doc == "n_ft-shot error on random tasks."
        with pytest.raises(ValueError, match="already registered"):
            O.register_objective("test_fs_only_random")(fs_random)
    finally:
        O.OBJECTIVES.pop("test_fs_only_random")


def test_schedules():
    t = jnp.array([0.0, 0.5, 1.0])
    np.testing.assert_allclose(O.schedule_weight("linear", t), [1.0, 0.5, 0.0])
    np.testing.assert_allclose(O.schedule_weight("constant", t, 2.0), [2.0, 2.0, 2.0])
    np.testing.assert_allclose(O.schedule_weight("cosine", t), [1.0, 0.5, 0.0], atol=1e-7)
    with pytest.raises(ValueError, match=r"schedule 'step' unknown; registered: \['constant', 'cosine', 'linear'\]"):
        O.ObjectiveConfig(schedule="step")
    with pytest.raises(ValueError, match="shots must be >= 0"):
        O.ObjectiveConfig(n_ft=-2)


def test_objectives_compose_risk_terms():
    calls = []

    def risk(params, shots, task):
        calls.append((shots, task))
        return 1.0 + shots

    cfg = O.ObjectiveConfig(n_ft=20)
    assert O.evaluate_objective("zsfs", risk, None, 0.25, cfg) == pytest.approx(1 + 0.75 * 21)
    assert calls == [(0, "target"), (20, "target")]
    assert O.evaluate_objective("zs_replay", risk, None, 1.0, cfg) == pytest.approx(1.0)


@pytest.mark.parametrize("name", sorted(O.OBJECTIVES))
def test_every_registered_objective_trains(name):
    p0 = P.init_params(jax.random.PRNGKey(0), 2)
    cfg = T.TrainConfig(steps=30, batch=256, d=2, history=3)
    n = P.flatten(p0).size  # per-run data every objective may read: reference weights and a curvature
    obj = O.ObjectiveConfig(m=5, n_ft=5, ref_params=p0, curvature=jnp.eye(n))
    res = T.train(jax.random.PRNGKey(1), p0, 0.01, T.TaskContext(theta0=jnp.array([0.6, 0.8])), obj, objective=name,
                  cfg=cfg)
    assert res.history.shape == (3,) and np.all(np.isfinite(np.asarray(res.history)))
    assert int(res.diverged_at) == -1
