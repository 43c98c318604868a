"""The one step function of the engine: M fused methods, one risk source (SPEC section 3).

Shape notation: M method columns fused in one program, K history buckets.

A column is one (objective, subset, parameter shape) with its own optax optimizer (the one
freezing mechanism: linattn.optim.make_optimizer). Each step asks every objective which risk terms
it reads (it is called once with a recording `risk`), hands all requests to the source at once
(linattn.minibatch.monte_carlo draws each (shots, task) minibatch once for every column;
theory.risk.exact_source computes the population risk), then differentiates the sum of the column
losses: column m's loss depends on its own parameters only, so the gradient of the sum is every
column's own gradient.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from linattn import data as D
from linattn.models import dtype_of
from linattn.objectives import check_task_source, get_objective
from linattn.optim import apply_updates, make_optimizer, param_labels


class Column(NamedTuple):
    """The static part of one fused method: objective name, subset, ObjectiveConfig statics."""

    objective: str
    subset: object
    m: int
    n_ft: int
    schedule: str


class State(NamedTuple):
    """Training state of the M columns of one slot."""

    params: tuple  # M parameter trees
    opt: tuple  # M optax states
    hist: jax.Array  # (M, K) sums of losses per history bucket
    bad: jax.Array  # (M,) first non-finite step, -1 if none
    last: jax.Array  # (M,) loss at the latest step


def column_losses(source: Callable, key, params: Sequence, progress, objs: Sequence, columns: Sequence[Column],
                  cfg, ctx) -> list:
    """The M objective values at one step, every risk term drawn from `source` in one call."""
    fns = [get_objective(c.objective).fn for c in columns]
    requests: dict = {}

    for m, f in enumerate(fns):
        def record(p, shots, task, m=m):
            if p is not params[m]:
                raise ValueError(f"objective {columns[m].objective!r} called risk() with parameters other than "
                                 "the ones it is training; risk terms must be of the trained parameters")
            check_task_source(task)
            D.check_shots(shots)
            requests.setdefault((int(shots), task), {})[m] = None
            return jnp.zeros((), dtype_of(params[m]))

        f(record, params[m], progress, objs[m])
    values = source(key, params, {k: tuple(v) for k, v in requests.items()}, cfg, ctx)
    return [f(lambda p, shots, task, m=m: values[(m, int(shots), task)], params[m], progress, objs[m])
            for m, f in enumerate(fns)]


def optimizers(columns: Sequence[Column], params: Sequence, lrs: Sequence, opt_cfg) -> list:
    return [make_optimizer(p, c.subset, lr, opt_cfg) for c, p, lr in zip(columns, params, lrs)]


def init_state(columns, params0: Sequence, lrs: Sequence, cfg, k_hist: int) -> State:
    opts = optimizers(columns, params0, lrs, cfg.optimizer)
    dtype = dtype_of(params0[0])
    M = len(columns)
    return State(tuple(params0), tuple(o.init(p) for o, p in zip(opts, params0)), jnp.zeros((M, k_hist), dtype),
                 -jnp.ones(M, jnp.int32), jnp.zeros(M, dtype))


def run_steps(state: State, key, lrs, objs, ctx, steps, *, columns, cfg, source, k_hist: int,
              data_axis: Optional[str] = None) -> State:
    """lax.scan of the step over the global step numbers `steps` (a chunk of 0..cfg.steps-1).

    With data_axis (inside shard_map over P devices, everything replicated) each device draws
    cfg.batch / P prompts with fold_in(step key, device index) and the losses and gradients are
    averaged with pmean, so every device applies the same update.
    """
    opts = optimizers(columns, state.params, lrs, cfg.optimizer)
    labels = [param_labels(p, c.subset) for c, p in zip(columns, state.params)]
    denom = max(cfg.steps - 1, 1)

    def loss_fn(params, step_key, progress):
        losses = jnp.stack(column_losses(source, step_key, params, progress, objs, columns, cfg, ctx))
        return jnp.sum(losses), losses

    def value_and_grad(params, step_key, progress):
        if data_axis is None:
            return jax.value_and_grad(loss_fn, has_aux=True)(params, step_key, progress)
        step_key = jax.random.fold_in(step_key, jax.lax.axis_index(data_axis))
        local = jax.tree.map(lambda a: jax.lax.pcast(a, data_axis, to="varying"), params)
        out = jax.value_and_grad(loss_fn, has_aux=True)(local, step_key, progress)
        flat, unravel = ravel_pytree(out)  # one all-reduce: one per leaf cost about 30 us each on CPU
        return unravel(jax.lax.pmean(flat, data_axis))

    def body(st: State, step):
        (_, losses), grads = value_and_grad(st.params, jax.random.fold_in(key, step), step / denom)
        new_p, new_s, oks = [], [], []
        for m in range(len(columns)):
            updates, s = opts[m].update(grads[m], st.opt[m], st.params[m])
            p = apply_updates(st.params[m], updates, labels[m])
            finite = jnp.isfinite(losses[m]) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in p.values()]))
            ok = (st.bad[m] < 0) & finite
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
            new_p.append(keep(p, st.params[m]))
            new_s.append(keep(s, st.opt[m]))
            oks.append(ok)
        oks = jnp.stack(oks)
        bad = jnp.where((st.bad < 0) & ~oks, step, st.bad).astype(jnp.int32)
        hist = st.hist.at[:, step * k_hist // cfg.steps].add(jnp.where(oks, losses, 0.0))
        return State(tuple(new_p), tuple(new_s), hist, bad, losses), None

    state, _ = jax.lax.scan(body, state, steps)
    return state
