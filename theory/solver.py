"""Generic solver on the exact population objective (SPEC sections 3-5).

`solve(objective_name, params0, subset, cfg, theta0, noise, ...)` works for any objective in the
linattn.objectives registry (including ones users add) and any trainable subset:

- method="flow": population gradient descent that mirrors training step for step -- the optimizer
  from linattn.optim.make_optimizer (reference: SGD, momentum 0.9, lr 0.01, clip 1.0 over trainable
  leaves), the same number of steps, progress = step/(steps-1) for schedules -- on the exact
  objective in float64, via lax.scan. It predicts which minimizer of a degenerate family training
  reaches, with no fitted constant.
- method="minimize": L-BFGS (optax.lbfgs) at a fixed progress on the trainable leaves, then
  pseudo-inverse Newton polishing; returns the end point and its gradient norm.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from linattn.models import model_of
from linattn.objectives import ObjectiveConfig, get_objective
from linattn.optim import OptimizerConfig, param_labels, trainable_norm, trainable_vector
from linattn.train import Run, TaskContext, TrainConfig, TrainResult, train_plan
from theory.risk import population_objective


class SolveResult(NamedTuple):
    """params: end point (float64 tree); grad_norm: trainable gradient norm there (at the last
    step's progress); objective: objective value there; history: objective per step (flow) or
    per iteration (minimize), float64 array."""

    params: dict
    grad_norm: float
    objective: float
    history: jax.Array


def _objective_fn(name, cfg, theta0, noise, sigma, normalization):
    get_objective(name)  # unknown names fail here, before any tracing
    return lambda p, progress: population_objective(name, p, progress, cfg, theta0, noise, sigma, normalization)


def flow_plan(runs: Sequence[Run], **plan_kwargs) -> list[TrainResult]:
    """Population gradient flow of many runs in one program per group: linattn.train.train_plan
    with the exact risk source (float64), vmapped over starting points, auxiliary weights, learning
    rates and per-run objective data. Each run follows its own optimizer, schedule and steps."""
    return train_plan(runs, source="exact", **plan_kwargs)


def gradient_flow(name: str, params0: Mapping, subset="all", cfg: ObjectiveConfig = ObjectiveConfig(), theta0=None,
                  noise: float | None = None, *, train_cfg: TrainConfig | None = None, steps: int | None = None,
                  lr: float = 0.01, opt_cfg: OptimizerConfig | None = None, sigma=None,
                  normalization: str | None = None) -> SolveResult:
    """Population gradient descent with the training optimizer for one start (module docstring).

    train_cfg: the TrainConfig of the training run to predict; its steps, optimizer, noise and
    normalization are used (lr is not part of it: pass the run's lr). Giving one of those settings
    as well and different is an error. Without train_cfg: TrainConfig's defaults (5000 steps, the
    reference SGD, noise 0.1, "tokens").
    """
    d = model_of(params0).d(params0)
    tc = _flow_config(train_cfg, d, steps=steps, optimizer=opt_cfg, noise=noise, normalization=normalization)
    steps, noise, normalization = tc.steps, tc.noise, tc.normalization
    theta = np.zeros(d) if theta0 is None else np.asarray(theta0, np.float64)
    chol = None if sigma is None else np.linalg.cholesky(np.asarray(sigma, np.float64))
    run = Run(None, params0, TaskContext(theta, None, chol), name, subset, lr, cfg, tc)
    res = flow_plan([run])[0]
    f = _objective_fn(name, cfg, theta0, noise, sigma, normalization)
    with jax.enable_x64(True):
        p = {k: jnp.asarray(v, jnp.float64) for k, v in res.params.items()}
        value, grads = jax.value_and_grad(f)(p, (steps - 1) / max(steps - 1, 1))  # the last step's progress
        gn = trainable_norm(grads, param_labels(p, subset))
    return SolveResult(p, float(gn), float(value), jnp.asarray(res.history))


def _flow_config(train_cfg: TrainConfig | None, d: int, **given) -> TrainConfig:
    """The flow's TrainConfig: train_cfg (or the defaults) with the settings given explicitly; a
    setting given both ways with different values is a ValueError naming both."""
    if train_cfg is not None and train_cfg.d != d:
        raise ValueError(f"train_cfg.d = {train_cfg.d} but the parameters have d = {d}")
    base = train_cfg if train_cfg is not None else TrainConfig(d=d)
    given = {k: v for k, v in given.items() if v is not None}
    if train_cfg is not None:
        clash = {k: (v, getattr(train_cfg, k)) for k, v in given.items() if v != getattr(train_cfg, k)}
        if clash:
            raise ValueError("settings given both as arguments and in train_cfg differ: "
                             + ", ".join(f"{k}={a!r} vs train_cfg.{k}={b!r}" for k, (a, b) in clash.items())
                             + "; give them in train_cfg only")
    tc = dataclasses.replace(base, **given, d=d, batch=1)
    return dataclasses.replace(tc, history=tc.steps)


def newton_step(f, x, rtol: float = 1e-10):
    """One pseudo-inverse Newton step x - H^+ g of a scalar function of a flat vector (float64).

    Exact in one step when f is quadratic; moves only in directions f sees.
    """
    return x - jnp.linalg.pinv(jax.hessian(f)(x), rtol=rtol) @ jax.grad(f)(x)


def minimize(name: str, params0: Mapping, subset="all", cfg: ObjectiveConfig = ObjectiveConfig(), theta0=None,
             noise: float = 0.1, *, progress: float = 1.0, iters: int = 500, newton_steps: int = 3,
             sigma=None, normalization: str = "tokens") -> SolveResult:
    """A minimizer of the objective at fixed `progress` over the subset's leaves.

    L-BFGS for `iters` iterations, then `newton_steps` pseudo-inverse Newton steps (which move only
    in directions the objective sees, so degenerate directions stay where L-BFGS left them).
    """
    f = _objective_fn(name, cfg, theta0, noise, sigma, normalization)
    with jax.enable_x64(True):
        params0 = {k: jnp.asarray(v, jnp.float64) for k, v in params0.items()}
        labels = param_labels(params0, subset)
        x0, unflat = trainable_vector(params0, labels)
        fx = lambda x: f(unflat(x), jnp.asarray(progress, jnp.float64))
        opt = optax.lbfgs()
        vg = optax.value_and_grad_from_state(fx)

        @jax.jit
        def run(x):
            def step(carry, _):
                x, state = carry
                value, grad = vg(x, state=state)
                updates, state = opt.update(grad, state, x, value=value, grad=grad, value_fn=fx)
                return (optax.apply_updates(x, updates), state), value

            (x, _), hist = jax.lax.scan(step, (x, opt.init(x)), None, length=iters)
            return x, hist

        x, hist = run(x0)
        grad_f, step = jax.jit(jax.grad(fx)), jax.jit(lambda x: newton_step(fx, x))
        for _ in range(newton_steps):
            cand = step(x)
            if jnp.linalg.norm(grad_f(cand)) < jnp.linalg.norm(grad_f(x)):
                x = cand
        return SolveResult(unflat(x), float(jnp.linalg.norm(grad_f(x))), float(fx(x)), hist)


def solve(objective_name: str, params0: Mapping, subset="all", cfg: ObjectiveConfig = ObjectiveConfig(),
          theta0=None, noise: float | None = None, *, method: str = "flow", sigma=None,
          normalization: str | None = None, **kwargs) -> SolveResult:
    """Solve a registered objective on the exact population risk.

    Args:
      objective_name: a name in linattn.objectives (e.g. "pretrain", "zs", "zsfs").
      params0: starting parameters (one layer; merged or separate).
      subset: trainable subset (linattn.optim: "all", "v", "kq", "k", "q" or a function of the leaf).
      cfg: ObjectiveConfig (m, n_ft, schedule, ...).
      theta0: the fine-tuning task (for objectives that read the "target" task).
      noise: label-noise variance (default 0.1, or train_cfg's for the flow).
      method: "flow" (gradient_flow: train_cfg=the training run's TrainConfig and lr=its learning
        rate, so that steps, optimizer, noise and normalization match the run it predicts) or
        "minimize" (progress, iters, newton_steps).
    """
    if method == "flow":
        return gradient_flow(objective_name, params0, subset, cfg, theta0, noise, sigma=sigma,
                             normalization=normalization, **kwargs)
    if method == "minimize":
        return minimize(objective_name, params0, subset, cfg, theta0, 0.1 if noise is None else noise, sigma=sigma,
                        normalization=normalization or "tokens", **kwargs)
    raise ValueError(f"method {method!r} unknown; allowed: ['flow', 'minimize']")
