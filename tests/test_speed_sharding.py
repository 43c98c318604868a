"""The run-sharded sweep (linattn.sharding) on 8 forced host devices equals the unsharded one.

XLA_FLAGS must be set before JAX starts, and this pytest process has already started it, so the
check runs in a subprocess.
"""

import textwrap

from subprocess_jax import run_ok


SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    from linattn import data as D, train as T, sharding
    from linattn.params import init_params

    assert jax.device_count() == 8, jax.devices()
    d = 3
    theta0 = jnp.ones(d) / jnp.sqrt(d)
    ctx = T.TaskContext(theta0, D.make_finetune_dataset(jax.random.PRNGKey(2), theta0, 500))
    p0 = init_params(jax.random.PRNGKey(1), d, merged=False)
    lrs = jnp.linspace(0.005, 0.02, 11)
    pb = jax.tree.map(lambda a: jnp.stack([a * (1 + 0.1 * i) for i in range(11)]), p0)
    cases = [
        # 11 runs over 8 devices (5 padded), batched initial parameters, raw keys
        (T.TrainConfig(objective="zsfs", subset="q", steps=20, batch=64, d=d, history=5),
         jax.random.split(jax.random.PRNGKey(0), 11), pb, True),
        # shared initial parameters, typed keys, the statistics sampler
        (T.TrainConfig(objective="pretrain", steps=20, batch=32, d=d, sampler="stats", history=4),
         jax.random.split(jax.random.key(3), 11), p0, False),
    ]
    for cfg, keys, params, batched in cases:
        ref = T.train_many(keys, params, lrs, ctx, cfg=cfg, params_batched=batched)
        out = sharding.train_sharded(keys, params, lrs, ctx, cfg=cfg, params_batched=batched)
        assert out.history.shape == (11, cfg.history)
        for k in p0:
            np.testing.assert_allclose(out.params[k], np.asarray(ref.params[k]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.history, np.asarray(ref.history), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out.diverged_at, np.asarray(ref.diverged_at))
    # the cached program of the last case really spreads the runs over all 8 devices
    mesh = sharding.runs_mesh()
    prog = sharding._sharded_program(cfg, False, mesh, jax.random.key_impl(keys))
    shard, repl = sharding.NamedSharding(mesh, sharding.P("runs")), sharding.NamedSharding(mesh, sharding.P())
    res = prog(sharding.put(jax.random.key_data(keys)[:8], shard), sharding.put(p0, repl),
               sharding.put(lrs[:8], shard), sharding.put(ctx, repl), sharding.put(T.ObjectiveConfig(), repl))
    assert len(res.params["V"].sharding.device_set) == 8
    assert res.params["V"].addressable_shards[0].data.shape[0] == 1
    print("OK")
    """
)


def test_sharded_sweep_on_8_host_devices_matches_unsharded():
    run_ok(SCRIPT, xla_flags="--xla_force_host_platform_device_count=8")
