"""Theory helpers for the sweeps: vmapped population gradient flow and exact risk curves.

Shape notation: R runs (seeds or auxiliary weights), S shot counts, T = 3 test tasks
(theta0, -theta0, unit-sphere random tasks), D = d + 2.

Adapter note: theory.solver.gradient_flow solves one starting point per call and compiles a new
program each call. The sweeps need the prediction from every seed's own pretrained parameters
(the end point of full ZS fine-tuning depends on the pretrained scale g) and for grids of
auxiliary weights, so `flow_many` runs the same algorithm -- the training optimizer
(linattn.optim.make_optimizer) on theory.risk.population_objective in float64, progress =
step/(steps-1) -- vmapped over R starting points and weights in one compiled program.
tests/test_sims_forgetting.py checks it against theory.solver.gradient_flow.
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from linattn.objectives import ObjectiveConfig
from linattn.optim import OptimizerConfig, apply_updates, make_optimizer, param_labels
from theory.risk import RiskTerms, population_objective, risk_from_terms, risk_terms

TASKS = ("theta0", "minus_theta0", "random")


def to64(tree: Mapping) -> dict:
    return {k: jnp.asarray(np.asarray(v), jnp.float64) for k, v in tree.items()}


@functools.lru_cache(maxsize=None)
def _flow_program(objective: str, subset: str, steps: int, lr: float, m: int, n_ft: int, schedule: str,
                  noise: float, normalization: str, opt_cfg: OptimizerConfig):
    denom = max(steps - 1, 1)

    def run(p0, theta0, aux_weight):
        cfg = ObjectiveConfig(m=m, n_ft=n_ft, schedule=schedule, aux_weight=aux_weight)
        labels = param_labels(p0, subset)
        opt = make_optimizer(p0, subset, jnp.asarray(lr, jnp.float64), opt_cfg)
        f = lambda p, progress: population_objective(objective, p, progress, cfg, theta0, noise, None, normalization)

        def step(carry, i):
            p, state = carry
            grads = jax.grad(f)(p, i / denom)
            updates, state = opt.update(grads, state, p)
            return (apply_updates(p, updates, labels), state), None

        (p, _), _ = jax.lax.scan(step, (p0, opt.init(p0)), jnp.arange(steps, dtype=jnp.float64))
        return p

    return jax.jit(jax.vmap(run, in_axes=(0, None, 0)))


def flow_many(objective: str, subset: str, params0: Mapping, theta0, aux_weights, *, steps: int, lr: float,
              m: int = 20, n_ft: int = 20, schedule: str = "linear", noise: float = 0.1,
              normalization: str = "tokens", opt_cfg: OptimizerConfig = OptimizerConfig()) -> dict:
    """End points of population gradient flow (the training optimizer on the exact objective).

    Args:
      params0: starting trees with a leading run axis R.
      aux_weights: (R,) initial auxiliary weights (ObjectiveConfig.aux_weight), one per run.
    Returns the (R, ...) float64 end points as numpy arrays.
    """
    with jax.enable_x64(True):
        p0 = to64(params0)
        w = jnp.asarray(np.broadcast_to(np.asarray(aux_weights, np.float64), p0["V"].shape[:1]))
        prog = _flow_program(objective, subset, int(steps), float(lr), int(m), int(n_ft), schedule, float(noise),
                             normalization, opt_cfg)
        out = prog(p0, jnp.asarray(theta0, jnp.float64), w)
        return {k: np.asarray(v) for k, v in out.items()}


@functools.lru_cache(maxsize=None)
def _terms_program(noise: float):
    def terms(p, theta0):
        rows = [risk_terms(p, t, noise) for t in (theta0, -theta0, "sphere")]
        return jnp.stack([jnp.stack(r) for r in rows])  # (3, 7)

    return jax.jit(jax.vmap(terms, in_axes=(0, None)))


def exact_curves(params: Mapping, theta0, shots, *, noise: float = 0.1, normalization: str = "tokens") -> np.ndarray:
    """Exact risk (theory.risk) of R parameter trees on the three test tasks: (R, 3, S) float64."""
    with jax.enable_x64(True):
        p = to64(params)
        T = _terms_program(float(noise))(p, jnp.asarray(theta0, jnp.float64))  # (R, 3, 7)
        n = np.asarray(shots)
        f = jax.vmap(jax.vmap(lambda t: risk_from_terms(RiskTerms(*t), n, noise, normalization)))
        return np.asarray(f(T))


def exact_random(params: Mapping, shots, *, noise: float = 0.1, normalization: str = "tokens") -> np.ndarray:
    """Exact risk on unit-sphere random tasks for R trees of any d: (R, S) float64."""
    with jax.enable_x64(True):
        p = to64(params)
        T = jax.jit(jax.vmap(lambda q: jnp.stack(risk_terms(q, "sphere", noise))))(p)
        n = np.asarray(shots)
        return np.asarray(jax.vmap(lambda t: risk_from_terms(RiskTerms(*t), n, noise, normalization))(T))


def gamma_w(params: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """(g, w): mean diagonal of the x-block of the effective KQ and the label weight v_y, per run."""
    if "KQ" in params:
        kq = np.asarray(params["KQ"])
    else:
        kq = np.einsum("...ji,...jk->...ik", np.asarray(params["Q"]), np.asarray(params["K"]))
    kq = kq[..., 0, 0, :, :]
    d = kq.shape[-1] - 2
    g = np.trace(kq[..., 1 : d + 1, 1 : d + 1], axis1=-2, axis2=-1) / d
    return g, np.asarray(params["V"])[..., 0, 0, -1, -1]
