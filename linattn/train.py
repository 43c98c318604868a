"""Training as one compiled program: lax.scan over steps, vmappable over seeds, methods, rates.

Shape notation: R runs (seeds x learning rates x ...), T steps, K history points.

`train_fn(cfg)` returns a pure function
    run(key, params0, lr, ctx, obj_cfg) -> TrainResult
that is jit-compiled once per static TrainConfig and vmaps over any of its array arguments.
The objective is evaluated with a Monte Carlo risk (SPEC section 3): each call
risk(params, shots, task) draws its own minibatch from a key folded from the step, the shot count
and the task source, so two objectives (or two subsets) given the same key see the same
minibatches: common random numbers come for free, and a method's ZS term in "zs" and "zsfs" is
computed on identical prompts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from linattn import data as D
from linattn.model import norm_factor, predict
from linattn.objectives import TASK_SOURCES, ObjectiveConfig, get_objective
from linattn.optim import OptimizerConfig, apply_updates, make_optimizer, param_labels
from linattn.params import check_params, effective_kq, value_row

SAMPLERS = ("tokens", "stats")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Static settings of one training program (SPEC section 3 reference values).

    The learning rate, keys, initial parameters, task arrays and ObjectiveConfig are traced
    arguments of the compiled program, so sweeps over them do not recompile.
    """

    objective: str = "pretrain"  # a name in linattn.objectives.OBJECTIVES
    subset: Any = "all"  # a name in linattn.optim.SUBSETS or a function of the leaf name
    steps: int = 5000  # optimizer steps
    batch: int = 5000  # prompts per risk evaluation
    d: int = 5  # covariate dimension
    noise: float = 0.1  # label-noise variance sigma^2
    tasks: str = "sphere"  # distribution of "random" tasks: "sphere" | "gaussian"
    normalization: str = "tokens"  # "tokens" = 1/(n+1), "shots" = 1/n
    sampler: str = "tokens"  # "tokens" (any model) | "stats" (one layer, cost independent of n)
    history: int = 100  # length of the returned loss history (bucket means)
    optimizer: OptimizerConfig = OptimizerConfig()

    def __post_init__(self):
        get_objective(self.objective)
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r} unknown; allowed: {list(SAMPLERS)}")
        if self.tasks not in D.TASK_KINDS:
            raise ValueError(f"tasks {self.tasks!r} unknown; allowed: {list(D.TASK_KINDS)}")
        for name in ("steps", "batch", "d", "history"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.noise < 0:
            raise ValueError(f"noise variance must be >= 0; got {self.noise}")


class TaskContext(NamedTuple):
    """Arrays the objective's task sources read (traced, so vmappable).

    theta0: (d,) the fine-tuning task ("target").
    dataset: FineTuneData drawn from theta0, or None to draw "target" prompts fresh from theta0.
    cov_factor: (d, d) factor L of the covariate covariance (L L^T = Sigma), or None for I.
    """

    theta0: jax.Array
    dataset: Optional[D.FineTuneData] = None
    cov_factor: Optional[jax.Array] = None


class TrainResult(NamedTuple):
    params: dict  # final parameters (the last finite ones if training diverged)
    history: jax.Array  # (K,) mean loss in K equal buckets of steps
    final_loss: jax.Array  # () loss at the last step
    diverged_at: jax.Array  # () first step with a non-finite loss or parameter, -1 if none


class TrainingDiverged(FloatingPointError):
    """A run produced a non-finite loss; carries the step and learning rate."""

    def __init__(self, step: int, lr: float, run: int | None = None):
        where = "" if run is None else f"run {run}: "
        super().__init__(f"{where}training diverged (non-finite loss) at step {step} with learning rate {lr:g}")
        self.step, self.lr, self.run = step, lr, run


def _outer_sum(Z: jax.Array) -> jax.Array:
    """sum_n z_n z_n^T of prompts (..., N, D), as a fused broadcast sum (faster on CPU than a
    batched dot of 7 x 21 blocks); the same numbers as linattn.data.prompt_stats up to rounding."""
    return jnp.sum(Z[..., :, :, None] * Z[..., :, None, :], axis=-3)


def _features(zq: jax.Array, S: jax.Array) -> jax.Array:
    """(B, D * D(D+1)/2) features zq_i S_jk (j <= k) of one-layer prompts; see _coefs."""
    iu = np.triu_indices(S.shape[-1])
    Su = S[:, iu[0], iu[1]]
    return (zq[:, :, None] * Su[:, None, :]).reshape(zq.shape[0], -1)


def _coefs(params) -> jax.Array:
    """c with _features(zq, S) @ c = (1/H) sum_h zq^T KQ_h S v_h for symmetric S (one layer).

    The prediction of linattn.model.predict_from_stats without its normalization, written as one
    matrix product: the features do not depend on the parameters, so several methods trained on
    the same minibatch (train_methods) share them and each costs one column of a matmul.
    """
    kq, v = effective_kq(params)[0], value_row(params)[0]
    t3 = jnp.mean(kq[:, :, :, None] * v[:, None, None, :], axis=0)  # (D, D, D): i, j, k
    t3 = t3 + jnp.swapaxes(t3, 1, 2)
    iu = np.triu_indices(t3.shape[-1])
    half = np.where(iu[0] == iu[1], 0.5, 1.0).astype(t3.dtype)
    return (t3[:, iu[0], iu[1]] * half[None, :]).reshape(-1)


def _predict_one_layer(params, zq, S, n, normalization: str):
    """linattn.model.predict_from_stats for one layer, as features @ coefficients."""
    return norm_factor(n, normalization).astype(zq.dtype) * (_features(zq, S) @ _coefs(params))


def mc_risk(key, cfg: TrainConfig, ctx: TaskContext):
    """risk(params, shots, task): minibatch mean squared error of the query prediction.

    Within one risk function (one step) a (params, shots, task) triple is evaluated once: an
    objective that names the same term twice, or several objectives summed, share it.
    One-layer models read prompts through their statistics (zq, S), built once per minibatch.
    """
    cache: dict = {}

    def risk(params, shots: int, task: str):
        if task not in TASK_SOURCES:
            raise ValueError(f"task source {task!r} unknown; allowed: {list(TASK_SOURCES)}")
        D.check_shots(shots)
        memo = (id(params), int(shots), task)
        if memo in cache:
            return cache[memo][1]
        k = jax.random.fold_in(jax.random.fold_in(key, shots), TASK_SOURCES.index(task))
        dtype = params["V"].dtype
        one_layer = params["V"].shape[0] == 1
        if task == "target" and ctx.dataset is not None:
            Z, y = D.sample_from_dataset(k, ctx.dataset, shots, cfg.batch)
            Z = Z.astype(dtype)
            if one_layer:
                pred = _predict_one_layer(params, Z[:, -1], _outer_sum(Z), shots, cfg.normalization)
            else:
                pred = predict(params, Z, normalization=cfg.normalization)
        else:
            dist = ctx.theta0 if task == "target" else cfg.tasks
            args = (k, shots, cfg.batch, cfg.d, dist, cfg.noise, ctx.cov_factor, dtype)
            if cfg.sampler == "stats":
                if not one_layer:
                    raise ValueError(f"sampler 'stats' is for one-layer models; these parameters have "
                                     f"{params['V'].shape[0]} layers (use sampler='tokens')")
                zq, S, y = D.sample_prompt_stats(*args)
                pred = _predict_one_layer(params, zq, S, shots, cfg.normalization)
            else:
                Z, y = D.sample_prompts(*args)
                if one_layer:  # the query label is zero, so predict() reduces to this
                    pred = _predict_one_layer(params, Z[:, -1], _outer_sum(Z), shots, cfg.normalization)
                else:
                    pred = predict(params, Z, normalization=cfg.normalization)
        value = jnp.mean((pred - y) ** 2)
        cache[memo] = (params, value)  # keep params alive so its id is not reused
        return value

    return risk


def _bucket_sizes(steps: int, k: int) -> np.ndarray:
    idx = np.arange(steps) * k // steps
    return np.bincount(idx, minlength=k)


def _scan_train(cfg: TrainConfig, key, params0, opt, loss_fn, step_update, value_and_grad=None) -> TrainResult:
    """lax.scan over cfg.steps optimizer steps with divergence guard and bucketed history.

    loss_fn(params, step) -> scalar; step_update(grads, opt_state, params) -> (new_params, new_state).
    value_and_grad(loss_fn) -> (params, step) -> (loss, grads); default jax.value_and_grad (the
    data-parallel path passes one that averages over devices, see data_parallel_value_and_grad).
    """
    vg = (value_and_grad or jax.value_and_grad)(loss_fn)
    k_hist = min(cfg.history, cfg.steps)
    counts = jnp.asarray(_bucket_sizes(cfg.steps, k_hist))

    def body(carry, step):
        params, opt_state, hist, bad = carry
        loss, grads = vg(params, step)
        new_params, new_state = step_update(grads, opt_state, params)
        finite = jnp.isfinite(loss) & jnp.all(
            jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(new_params)]))
        bad = jnp.where((bad < 0) & ~finite, step, bad)
        ok = bad < 0
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        hist = hist.at[step * k_hist // cfg.steps].add(jnp.where(ok, loss, 0.0))
        return (keep(new_params, params), keep(new_state, opt_state), hist, bad), loss

    init = (params0, opt.init(params0), jnp.zeros(k_hist, params0["V"].dtype), jnp.asarray(-1))
    (params, _, hist, bad), losses = jax.lax.scan(body, init, jnp.arange(cfg.steps))
    return TrainResult(params, hist / counts, losses[-1], bad)


def step_risk(key, step, cfg: TrainConfig, ctx: TaskContext, data_axis: Optional[str] = None, n_dev: int = 1):
    """The Monte Carlo risk of one step: mc_risk(fold_in(key, step), cfg, ctx) on one device.

    With data_axis (inside shard_map or a named vmap over n_dev devices), device i draws
    cfg.batch / n_dev prompts with the key fold_in(fold_in(key, step), i): the same distribution
    as the single-device minibatch, but a different random stream.
    """
    step_key = jax.random.fold_in(key, step)
    if data_axis is None:
        return mc_risk(step_key, cfg, ctx)
    return mc_risk(jax.random.fold_in(step_key, jax.lax.axis_index(data_axis)), local_config(cfg, n_dev), ctx)


def local_config(cfg: TrainConfig, n_dev: int) -> TrainConfig:
    """cfg with the per-device batch cfg.batch / n_dev (which must divide evenly)."""
    if n_dev < 1 or cfg.batch % n_dev:
        raise ValueError(f"batch {cfg.batch} does not split evenly over {n_dev} devices")
    return cfg if n_dev == 1 else dataclasses.replace(cfg, batch=cfg.batch // n_dev)


def data_parallel_value_and_grad(data_axis: Optional[str]):
    """value_and_grad for a loss whose minibatch is split over the named axis `data_axis`.

    Returns vg with vg(loss_fn)(params, step) = (pmean of the per-device losses, pmean of the
    per-device gradients). The parameters are replicated (invariant over the axis); they are
    cast to device-varying before differentiating, so each device's gradient is its own and the
    mean is taken once, explicitly (without the cast, shard_map would psum the gradient of an
    invariant input itself). None: plain jax.value_and_grad.
    """
    if data_axis is None:
        return jax.value_and_grad

    def vg(loss_fn):
        def f(params, step):
            local = jax.tree.map(lambda a: jax.lax.pcast(a, data_axis, to="varying"), params)
            loss, grads = jax.value_and_grad(loss_fn)(local, step)
            return jax.lax.pmean(loss, data_axis), jax.lax.pmean(grads, data_axis)

        return f

    return vg


def train_fn(cfg: TrainConfig):
    """The pure training function for a static config (see module docstring)."""
    return data_parallel_train_fn(cfg, None, 1)


def data_parallel_train_fn(cfg: TrainConfig, data_axis: Optional[str], n_dev: int):
    """train_fn(cfg) with each step's minibatch split over the named axis `data_axis` of n_dev devices.

    Meant to run inside shard_map (linattn.sharding.train_data_parallel) with every argument
    replicated: device i draws cfg.batch / n_dev prompts (step_risk), the losses and gradients
    are averaged over devices (data_parallel_value_and_grad), and every device applies the same
    update, so the parameters stay replicated. data_axis None (n_dev 1) is train_fn(cfg).
    """
    objective = get_objective(cfg.objective).fn
    vg = data_parallel_value_and_grad(data_axis)
    local_config(cfg, n_dev)

    def run(key, params0, lr, ctx: TaskContext, obj_cfg: ObjectiveConfig) -> TrainResult:
        check_params(params0, cfg.d)
        labels = param_labels(params0, cfg.subset)
        opt = make_optimizer(params0, cfg.subset, lr, cfg.optimizer)

        def loss_fn(params, step):
            progress = step / max(cfg.steps - 1, 1)
            risk = step_risk(key, step, cfg, ctx, data_axis, n_dev)
            return objective(risk, params, progress, obj_cfg)

        def step_update(grads, opt_state, params):
            updates, new_state = opt.update(grads, opt_state, params)
            return apply_updates(params, updates, labels), new_state

        return _scan_train(cfg, key, params0, opt, loss_fn, step_update, vg)

    return run


def methods_fn(cfg: TrainConfig, objectives: tuple):
    """Training function for one method given as data: objective weights and a trainable mask.

    run(key, params0, lr, ctx, obj_cfg, weights, mask): the loss is sum_o weights[o] *
    objective_o (objectives a tuple of registered names); mask maps each leaf to 1.0 (train) or
    0.0 (freeze). Gradients of frozen leaves are zeroed before the clip, so the global norm counts
    trainable leaves only (as optax.partition in linattn.optim), and frozen leaves are kept bit
    for bit. Vmapping over (weights, mask) with the key unbatched trains several methods on the
    very same minibatches, which are then drawn once per step for all of them.
    """
    return data_parallel_methods_fn(cfg, objectives, None, 1)


def data_parallel_methods_fn(cfg: TrainConfig, objectives: tuple, data_axis: Optional[str], n_dev: int):
    """methods_fn(cfg, objectives) with the minibatch split over `data_axis` (see data_parallel_train_fn)."""
    fns = [get_objective(o).fn for o in objectives]
    vg = data_parallel_value_and_grad(data_axis)
    local_config(cfg, n_dev)

    def run(key, params0, lr, ctx, obj_cfg, weights, mask) -> TrainResult:
        check_params(params0, cfg.d)
        opt = make_optimizer(params0, lambda name: True, lr, cfg.optimizer)

        def loss_fn(params, step):
            progress = step / max(cfg.steps - 1, 1)
            risk = step_risk(key, step, cfg, ctx, data_axis, n_dev)
            return sum(weights[i] * f(risk, params, progress, obj_cfg) for i, f in enumerate(fns))

        def step_update(grads, opt_state, params):
            grads = {k: g * mask[k].astype(g.dtype) for k, g in grads.items()}
            updates, new_state = opt.update(grads, opt_state, params)
            new = {k: jnp.where(mask[k] > 0, (params[k] + updates[k]).astype(params[k].dtype), params[k])
                   for k in params}
            return new, new_state

        return _scan_train(cfg, key, params0, opt, loss_fn, step_update, vg)

    return run


def method_arrays(params0, methods) -> tuple[tuple, jax.Array, dict]:
    """(objective names, weights (M, O), masks {leaf: (M,)}) for methods [(objective, subset), ...]."""
    if len(methods) == 0:
        raise ValueError("need at least one (objective, subset) method")
    names = tuple(dict.fromkeys(o for o, _ in methods))
    for o in names:
        get_objective(o)
    weights = np.zeros((len(methods), len(names)), np.float32)
    masks = {k: np.zeros(len(methods), np.float32) for k in params0}
    for i, (o, subset) in enumerate(methods):
        weights[i, names.index(o)] = 1.0
        for k, lab in param_labels(params0, subset).items():
            masks[k][i] = 1.0 if lab == "train" else 0.0
    return names, jnp.asarray(weights), {k: jnp.asarray(v) for k, v in masks.items()}


def train_methods(key, params0, lr, ctx: TaskContext, methods, obj_cfg: ObjectiveConfig = ObjectiveConfig(), *,
                  cfg: TrainConfig = TrainConfig(), check: bool = True) -> TrainResult:
    """M methods [(objective, subset), ...] from the same start, in one compiled program.

    Every method sees the same minibatches (the key is shared: common random numbers), so the
    result equals [train(key, params0, lr, ctx, obj_cfg, cfg=replace(cfg, objective=o, subset=s))
    for o, s in methods] up to float rounding, while each minibatch is drawn once for all M
    methods. cfg.objective and cfg.subset are ignored. Fields of the result lead with axis M.
    """
    names, weights, masks = method_arrays(params0, methods)
    dtype = params0["V"].dtype
    fn = compiled_methods(cfg, names)
    res = fn(key, params0, jnp.asarray(lr, dtype), ctx, obj_cfg, weights.astype(dtype),
             {k: v.astype(dtype) for k, v in masks.items()})
    if check:
        raise_if_diverged(res, np.broadcast_to(np.asarray(lr, np.float64), (len(methods),)))
    return res


def compiled_methods(cfg: TrainConfig, objectives: tuple):
    """jit(vmap over methods) of methods_fn(cfg, objectives), cached per static configuration."""
    sig = ("methods", dataclasses.replace(cfg, objective="pretrain", subset="all"), tuple(objectives))
    if sig not in _CACHE:
        fn = jax.vmap(methods_fn(cfg, tuple(objectives)), in_axes=(None, None, None, None, None, 0, 0))
        _CACHE[sig] = jax.jit(fn)
    return _CACHE[sig]


def train(key, params0, lr, ctx: TaskContext, obj_cfg: ObjectiveConfig = ObjectiveConfig(), *,
          cfg: TrainConfig = TrainConfig(), check: bool = True) -> TrainResult:
    """Train one run (jit-compiled); raises TrainingDiverged if check and the loss went non-finite."""
    res = compiled(cfg)(key, params0, jnp.asarray(lr, params0["V"].dtype), ctx, obj_cfg)
    if check:
        raise_if_diverged(res, lr)
    return res


def train_many(keys, params0, lrs, ctx: TaskContext, obj_cfg: ObjectiveConfig = ObjectiveConfig(), *,
               cfg: TrainConfig = TrainConfig(), params_batched: bool = False, check: bool = True) -> TrainResult:
    """R runs in one compiled program, vmapped over keys (R,) and learning rates (R,).

    params0 is shared by all runs unless params_batched (leading axis R).
    """
    keys = jnp.asarray(keys)
    lrs = jnp.broadcast_to(jnp.asarray(lrs, jnp.float32), keys.shape[:1])
    res = compiled(cfg, batched=True, params_batched=params_batched)(keys, params0, lrs, ctx, obj_cfg)
    if check:
        raise_if_diverged(res, lrs)
    return res


_CACHE: dict = {}


def compiled(cfg: TrainConfig, batched: bool = False, params_batched: bool = False):
    """jit (and vmap) of train_fn(cfg), cached per static configuration."""
    key = (cfg, batched, params_batched)
    if key not in _CACHE:
        fn = train_fn(cfg)
        if batched:
            fn = jax.vmap(fn, in_axes=(0, 0 if params_batched else None, 0, None, None))
        _CACHE[key] = jax.jit(fn)
    return _CACHE[key]


def raise_if_diverged(res: TrainResult, lrs) -> None:
    """Raise TrainingDiverged for the first run whose loss went non-finite."""
    bad = np.atleast_1d(np.asarray(res.diverged_at))
    lrs = np.broadcast_to(np.atleast_1d(np.asarray(lrs, dtype=np.float64)), bad.shape)
    hit = np.flatnonzero(bad >= 0)
    if hit.size:
        i = int(hit[0])
        raise TrainingDiverged(int(bad[i]), float(lrs[i]), run=i if bad.size > 1 else None)
