"""Data parallelism (linattn.sharding.train_data_parallel): each step's minibatch split over 2 host devices.

Checked in a subprocess with 2 forced host CPU devices (the device count is fixed when JAX
starts its backend, and this pytest process has already started it):
(a) one data-parallel step's loss and gradients equal the mean over devices of single-device
    losses and gradients computed with the per-device keys fold_in(fold_in(key, step), i) and
    batch B / 2 (up to float rounding), for pretraining (statistics sampler) and ZS+FS (dataset);
(b) a 6-step data-parallel run equals a plain Python loop of those averaged gradients through the
    same optimizer, and the fused methods program equals the single-method data-parallel runs;
(c) second calls with a new key and learning rate do not recompile; results live on both devices.
"""

import textwrap

from subprocess_jax import run_ok, run_python


SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    from linattn import data as D, train as T, sharding as S
    from linattn.objectives import ObjectiveConfig, get_objective
    from linattn.optim import apply_updates, make_optimizer, param_labels
    from linattn.params import init_params

    assert jax.device_count() == 2, jax.devices()
    n_dev, d = 2, 5
    theta0 = jnp.ones(d) / jnp.sqrt(d)
    ctx = T.TaskContext(theta0, D.make_finetune_dataset(jax.random.PRNGKey(2), theta0, 1000))
    p0 = init_params(jax.random.PRNGKey(1), d, merged=False)
    obj = ObjectiveConfig(m=20, n_ft=20)
    key = jax.random.PRNGKey(0)

    def single_device_mean(cfg, key, params, step):
        # mean over devices i of the single-device loss/grad with key fold_in(fold_in(key, step), i)
        local, objective = T.local_config(cfg, n_dev), get_objective(cfg.objective).fn

        @jax.jit
        def vg(params, i):
            def loss(p):
                risk = T.mc_risk(jax.random.fold_in(jax.random.fold_in(key, step), i), local, ctx)
                return objective(risk, p, step / max(cfg.steps - 1, 1), obj)
            return jax.value_and_grad(loss)(params)

        outs = [vg(params, i) for i in range(n_dev)]
        return (sum(o[0] for o in outs) / n_dev,
                jax.tree.map(lambda *g: sum(g) / n_dev, *[o[1] for o in outs]))

    def close(a, b, rtol=2e-5, atol=1e-6):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)

    # (a) one step
    for cfg in (T.TrainConfig(objective="pretrain", steps=10, batch=512, d=d, sampler="stats"),
                T.TrainConfig(objective="zsfs", steps=10, batch=512, d=d)):
        loss, grads = S.data_parallel_value_and_grad(cfg)(key, p0, 3, ctx, obj)
        ref_loss, ref_grads = single_device_mean(cfg, key, p0, 3)
        close(loss, ref_loss)
        close(grads, ref_grads)
        # the two devices really drew different prompts (else this test would prove little)
        l0 = single_device_mean(T.TrainConfig(**{**cfg.__dict__, "batch": 256}), key, p0, 3)[0]
        assert abs(float(loss) - float(l0)) > 1e-6

    # (b) a short run equals the Python loop of averaged gradients through the same optimizer
    cfg = T.TrainConfig(objective="pretrain", steps=6, batch=512, d=d, sampler="stats", history=6)
    lr = 0.05
    res = S.train_data_parallel(key, p0, lr, ctx, obj, cfg=cfg)
    opt, labels = make_optimizer(p0, "all", jnp.asarray(lr)), param_labels(p0, "all")
    params, state, losses = p0, opt.init(p0), []
    for step in range(cfg.steps):
        loss, grads = single_device_mean(cfg, key, params, step)
        updates, state = opt.update(grads, state, params)
        params, losses = apply_updates(params, updates, labels), losses + [float(loss)]
    close(res.params, params)
    close(res.history, np.asarray(losses))
    assert len(res.params["V"].sharding.device_set) == 2 and res.params["V"].sharding.is_fully_replicated

    # fused methods (one program) = single-method data-parallel runs (same keys, same minibatches)
    methods = [("zsfs", "q"), ("zs", "v")]
    fcfg = T.TrainConfig(steps=6, batch=256, d=d, history=3)
    fused = S.train_methods_data_parallel(key, p0, 0.02, ctx, methods, obj, cfg=fcfg)
    for i, (o, s) in enumerate(methods):
        one = S.train_data_parallel(key, p0, 0.02, ctx, obj, cfg=T.TrainConfig(**{**fcfg.__dict__, "objective": o, "subset": s}))
        close(jax.tree.map(lambda a: a[i], fused.params), one.params)
        close(fused.history[i], one.history)

    # (c) no recompilation for a new key and learning rate
    S.train_data_parallel(jax.random.PRNGKey(7), p0, 0.03, ctx, obj, cfg=cfg)
    assert S.compiled_data_parallel(cfg)._cache_size() == 1
    S.train_methods_data_parallel(jax.random.PRNGKey(7), p0, 0.03, ctx, methods, obj, cfg=fcfg)
    assert S.compiled_methods_data_parallel(fcfg, ("zsfs", "zs"))._cache_size() == 1
    print("OK")
    """
)


def test_data_parallel_on_2_host_devices():
    run_ok(SCRIPT)


def test_batch_must_split_evenly():
    import pytest

    from linattn import train as T

    with pytest.raises(ValueError, match="split evenly"):
        T.local_config(T.TrainConfig(batch=5), 2)


def test_benchmark_devices_2_smoke(tmp_path):
    import json

    out = tmp_path / "bench.json"
    run_python(["-m", "sims.benchmark", "--workload", "tiny", "--steps", "5", "--batch", "64", "--devices", "2",
                "--no-eval", "--json", str(out)])
    rec = json.loads(out.read_text())
    assert rec["data_parallel_devices"] == 2 and len(rec["device"]["devices"]) == 2
    assert set(rec["run_s"]) == {"pretrain", "finetune_8_methods"}
