"""Sweeps with the run axis sharded over every device (one host or many), and data parallelism.

Two layouts: `train_sharded` splits a sweep's runs over the devices; `train_data_parallel` and
`train_methods_data_parallel` split one run's per-step minibatch over them (section at the end).

Shape notation: R runs, P devices, R_pad = R rounded up to a multiple of P.

`train_sharded` is linattn.train.train_many with the run axis (keys, learning rates and, when
params_batched, initial parameters) laid out over a 1-D `jax.sharding.Mesh` named "runs" with
`NamedSharding(mesh, P("runs"))`. The run axis is padded to a multiple of the device count by
repeating the last run; padded runs are computed and dropped. Everything else (the task context,
the objective config, shared initial parameters) is replicated. Each run's result is the same as
in the unsharded sweep with the same keys (up to float rounding), since runs never interact.

Multi-host (e.g. several GPU hosts):

    jax.distributed.initialize()          # on every process, before any other JAX call
    mesh = runs_mesh()                    # all devices of all processes
    res = train_sharded(keys, params0, lrs, ctx, cfg=cfg, mesh=mesh)
    if jax.process_index() == 0:
        write(res)                        # numpy arrays of all R runs

Every process must call it with the same global arguments (same keys, same lrs): each builds its
own shards from them, and the result is gathered to every process (process 0 writes).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from linattn import train as T
from linattn.objectives import ObjectiveConfig

AXIS = "runs"


def runs_mesh(devices=None) -> Mesh:
    """A 1-D mesh named "runs" over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (AXIS,))


def pad_runs(tree, runs: int, multiple: int):
    """Pad the leading axis of every leaf from `runs` to a multiple of `multiple` (repeat the last)."""
    total = -(-runs // multiple) * multiple
    if total == runs:
        return tree, total

    def pad(a):
        a = np.asarray(a) if not isinstance(a, jax.Array) else a
        reps = jnp.repeat(a[-1:], total - runs, axis=0)
        return jnp.concatenate([a, reps], axis=0)

    return jax.tree.map(pad, tree), total


def put(tree, sharding: NamedSharding):
    """Global arrays laid out by `sharding` from full host copies of every leaf.

    Works on one process and on many (each process must hold the same full copy): every process
    fills only the shards of its own devices (jax.make_array_from_callback).
    """
    def one(a):
        a = np.asarray(jax.device_get(a))
        return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

    return jax.tree.map(one, tree)


def train_sharded(keys, params0, lrs, ctx: T.TaskContext, obj_cfg: ObjectiveConfig = ObjectiveConfig(), *,
                  cfg: T.TrainConfig = T.TrainConfig(), params_batched: bool = False,
                  mesh: Optional[Mesh] = None, check: bool = True) -> T.TrainResult:
    """train_many with the run axis sharded over `mesh` (default runs_mesh()); same arguments.

    Args:
      keys: (R,) PRNG keys, typed or raw uint32 (R, 2), one per run.
      params0: shared initial parameters, or (R, ...) leaves when params_batched.
      lrs: scalar or (R,) learning rates.
      mesh: a 1-D Mesh with axis "runs"; its device count sets the padding.
    Returns:
      TrainResult with leading axis R as host (numpy) arrays, gathered from all processes.
    """
    mesh = runs_mesh() if mesh is None else mesh
    n_dev = mesh.devices.size
    keys = jnp.asarray(keys)
    typed = jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key)
    impl = jax.random.key_impl(keys) if typed else None
    raw = jax.random.key_data(keys) if typed else keys  # (R, ...) uint32, shardable as numbers
    runs = raw.shape[0]
    lrs = np.broadcast_to(np.asarray(lrs, np.float32), (runs,))
    batched = (raw, lrs, params0) if params_batched else (raw, lrs)
    batched, _ = pad_runs(batched, runs, n_dev)
    shard, repl = NamedSharding(mesh, P(AXIS)), NamedSharding(mesh, P())
    raw_g, lrs_g = put(batched[0], shard), put(batched[1], shard)
    params_g = put(batched[2], shard) if params_batched else put(params0, repl)
    res = _sharded_program(cfg, params_batched, mesh, impl)(raw_g, params_g, lrs_g, put(ctx, repl), put(obj_cfg, repl))
    res = jax.tree.map(lambda a: a[:runs], _to_host(res))
    if check:
        T.raise_if_diverged(res, lrs)
    return T.TrainResult(*res)


_PROGRAMS: dict = {}


def _sharded_program(cfg: T.TrainConfig, params_batched: bool, mesh: Mesh, impl=None):
    """jit(vmap(train_fn(cfg))) with run-sharded inputs and outputs, cached per (cfg, mesh)."""
    sig = (cfg, params_batched, mesh, str(impl))
    if sig not in _PROGRAMS:
        shard = NamedSharding(mesh, P(AXIS))
        repl = NamedSharding(mesh, P())
        run = T.train_fn(cfg)
        if impl is not None:  # rebuild typed keys from their raw data inside the program
            inner = run
            run = lambda raw, *a: inner(jax.random.wrap_key_data(raw, impl=impl), *a)
        fn = jax.vmap(run, in_axes=(0, 0 if params_batched else None, 0, None, None))
        _PROGRAMS[sig] = jax.jit(
            fn,
            in_shardings=(shard, shard if params_batched else repl, shard, repl, repl),
            out_shardings=shard,
        )
    return _PROGRAMS[sig]


def _to_host(res):
    """Numpy copies of a run-sharded result on every process (process_allgather across hosts)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return jax.tree.map(lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)), res)
    return jax.tree.map(np.asarray, res)


def device_summary() -> dict:
    """Devices, their kind and the process layout (for benchmark records)."""
    devs = jax.devices()
    return {
        "backend": jax.default_backend(),
        "device_count": len(devs),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "device_kind": devs[0].device_kind if devs else None,
        "devices": [str(d) for d in devs[: min(8, len(devs))]] + ([f"... {len(devs) - 8} more"] if len(devs) > 8 else []),
    }


# ---------------------------------------------------------------------------------------------
# Data parallelism: one run, each step's minibatch split over the devices.
#
# Shape notation: B prompts per step, P devices, B / P prompts per device.
#
# Every argument is replicated. Inside shard_map, device i draws its B / P prompts with the key
# fold_in(fold_in(key, step), i) (linattn.train.step_risk), computes its loss and gradients, and
# the losses and gradients are averaged with lax.pmean; every device then applies the identical
# optimizer update, so the parameters stay replicated. The minibatch has the same distribution
# as the single-device one (B i.i.d. prompts), but the random stream differs: a data-parallel
# run does not reproduce the single-device run's numbers, only its distribution, and its numbers
# depend on P.

DATA_AXIS = "data"


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh named "data" over `devices` (default: every device)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def _replicated(mesh: Mesh, n_args: int, fn):
    """jit(shard_map(fn)) with every input and output replicated over the mesh's data axis."""
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(),) * n_args, out_specs=P()))


def compiled_data_parallel(cfg: T.TrainConfig, mesh: Optional[Mesh] = None):
    """jit(shard_map(data_parallel_train_fn(cfg))) over `mesh`, cached per (cfg, mesh).

    Called as fn(key, params0, lr, ctx, obj_cfg) -> TrainResult (replicated), like
    linattn.train.compiled(cfg).
    """
    mesh = data_mesh() if mesh is None else mesh
    sig = ("data", cfg, mesh)
    if sig not in _PROGRAMS:
        _PROGRAMS[sig] = _replicated(mesh, 5, T.data_parallel_train_fn(cfg, DATA_AXIS, mesh.devices.size))
    return _PROGRAMS[sig]


def compiled_methods_data_parallel(cfg: T.TrainConfig, objectives: tuple, mesh: Optional[Mesh] = None):
    """Data-parallel linattn.train.compiled_methods: fn(key, params0, lr, ctx, obj_cfg, weights, masks)."""
    mesh = data_mesh() if mesh is None else mesh
    sig = ("data-methods", dataclasses.replace(cfg, objective="pretrain", subset="all"), tuple(objectives), mesh)
    if sig not in _PROGRAMS:
        run = T.data_parallel_methods_fn(cfg, tuple(objectives), DATA_AXIS, mesh.devices.size)
        fn = jax.vmap(run, in_axes=(None, None, None, None, None, 0, 0))
        _PROGRAMS[sig] = _replicated(mesh, 7, fn)
    return _PROGRAMS[sig]


def replicate(tree, mesh: Optional[Mesh] = None):
    """Every leaf copied to every device of `mesh` (the layout the data-parallel programs take)."""
    mesh = data_mesh() if mesh is None else mesh
    return jax.device_put(tree, NamedSharding(mesh, P()))


def train_data_parallel(key, params0, lr, ctx: T.TaskContext, obj_cfg: ObjectiveConfig = ObjectiveConfig(), *,
                        cfg: T.TrainConfig = T.TrainConfig(), mesh: Optional[Mesh] = None,
                        check: bool = True) -> T.TrainResult:
    """linattn.train.train with each step's cfg.batch prompts split over the devices of `mesh`.

    cfg.batch must be a multiple of the device count. Same distribution of minibatches as
    train(), different random numbers (see the comment above DATA_AXIS).
    """
    mesh = data_mesh() if mesh is None else mesh
    dtype = params0["V"].dtype
    args = replicate((key, params0, jnp.asarray(lr, dtype), ctx, obj_cfg), mesh)
    res = compiled_data_parallel(cfg, mesh)(*args)
    if check:
        T.raise_if_diverged(res, lr)
    return res


def train_methods_data_parallel(key, params0, lr, ctx: T.TaskContext, methods,
                                obj_cfg: ObjectiveConfig = ObjectiveConfig(), *,
                                cfg: T.TrainConfig = T.TrainConfig(), mesh: Optional[Mesh] = None,
                                check: bool = True) -> T.TrainResult:
    """linattn.train.train_methods (M methods in one program) with the minibatch split over `mesh`."""
    mesh = data_mesh() if mesh is None else mesh
    names, weights, masks = T.method_arrays(params0, methods)
    dtype = params0["V"].dtype
    args = (key, params0, jnp.asarray(lr, dtype), ctx, obj_cfg, weights.astype(dtype),
            {k: v.astype(dtype) for k, v in masks.items()})
    res = compiled_methods_data_parallel(cfg, names, mesh)(*replicate(args, mesh))
    if check:
        T.raise_if_diverged(res, np.broadcast_to(np.asarray(lr, np.float64), (len(methods),)))
    return res


def data_parallel_value_and_grad(cfg: T.TrainConfig, mesh: Optional[Mesh] = None):
    """jitted fn(key, params, step, ctx, obj_cfg) -> (loss, grads) of one data-parallel step.

    The same step_risk / data_parallel_value_and_grad pieces the data-parallel trainer runs
    (cfg.objective on all leaves), exposed so tests can compare one step against the mean of
    single-device losses and gradients drawn with the per-device keys.
    """
    mesh = data_mesh() if mesh is None else mesh
    sig = ("data-vg", cfg, mesh)
    if sig not in _PROGRAMS:
        objective = T.get_objective(cfg.objective).fn
        n_dev = mesh.devices.size

        def fn(key, params, step, ctx, obj_cfg):
            def loss_fn(p, step):
                risk = T.step_risk(key, step, cfg, ctx, DATA_AXIS, n_dev)
                return objective(risk, p, step / max(cfg.steps - 1, 1), obj_cfg)

            return T.data_parallel_value_and_grad(DATA_AXIS)(loss_fn)(params, step)

        _PROGRAMS[sig] = _replicated(mesh, 5, fn)
    return _PROGRAMS[sig]
