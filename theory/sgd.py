"""What minibatch SGD reaches: the diffusion source and path predictions (issue #13; DERIVATIONS section 8).

Shape notation: P paths per run, T test tasks, N shot counts.

Training at batch B follows g_t = grad R(theta_t) + xi_t with E[xi_t] = 0 and Cov(xi_t) = C(theta_t)
/ B, C the per-prompt gradient covariance of each risk term at the current parameters (the terms of
one step draw independent prompts). The prediction keeps the drift exact (the population risk,
theory.risk.exact_source) and draws noise of exactly that covariance from the model itself: each
term's value is

    R(theta) + sum_k z_k (e_k(theta) - R(theta)) / sqrt(B K),

e_1..e_K the squared errors of K = TrainConfig.probe fresh prompts and z_k independent standard normals, so its
gradient noise sum_k z_k (grad e_k - grad R) / sqrt(B K) has mean zero and covariance C / B at
every step, for any objective, subset and model, and is Gaussian given the probe. Everything else is
training's own: the engine runs it with the same optax optimizer (momentum, clipping), schedule and
steps, P independent paths per run (vmapped like seeds). Without noise it is the gradient flow
(theory.solver.flow_plan); as B grows it tends to it. The fine-tuning dataset is replaced by its
population, as in the exact source (infinite-data model).

The probe's covariance estimate fluctuates (a Gaussian scale mixture); per-prompt gradients are
polynomials of degree 6 in Gaussians, heavy-tailed, so a small probe adds fourth-moment effects
that SGD at batch B does not have. The end point depends on K until K is a few hundred at batch
5000 and about a thousand at batch 500 (DERIVATIONS section 8 has the measurements); the default is
256, part of the compiled program's key like every TrainConfig field.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from linattn.minibatch import prompt_errors
from linattn.objectives import TASK_SOURCES
from linattn.train import Run, TrainResult, train_plan
from theory.risk import exact_source, task_curves
from theory.solver import flow_plan


def diffusion_source(key, params, requests, cfg, ctx) -> dict:
    """The engine's diffusion source (linattn.train, source="diffusion"; module docstring): each
    term is its exact risk R plus sum_k z_k (e_k - R) / sqrt(B K) over a probe of K = cfg.probe
    prompts with squared errors e_k and independent standard-normal multipliers z_k, B = cfg.batch."""
    exact = exact_source(key, params, requests, cfg, ctx)
    K = cfg.probe
    errors = prompt_errors(jax.random.fold_in(key, 0), params, requests, dataclasses.replace(cfg, batch=K), ctx)
    scale = 1.0 / math.sqrt(cfg.batch * K)
    out = {}
    for (shots, task), ms in requests.items():  # one product for the methods reading a term
        r = jnp.stack([exact[(m, shots, task)] for m in ms])  # (M_t,)
        e = jnp.stack([errors[(m, shots, task)] for m in ms], axis=1).astype(r.dtype)  # (K, M_t)
        z = jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, 1), _term_index(shots, task)), (K,), r.dtype)
        noisy = r + scale * (z @ (e - r[None, :]))
        out.update({(m, shots, task): noisy[j] for j, m in enumerate(ms)})
    return out


def _term_index(shots: int, task: str) -> int:
    """One multiplier stream per (shots, task source), shared by the methods reading that term."""
    return int(shots) * len(TASK_SOURCES) + list(TASK_SOURCES).index(task)


class Paths(NamedTuple):
    """P paths of one run: params leaves (P, ...); history (P, K) loss per bucket; final_loss (P,)."""

    params: dict
    history: np.ndarray
    final_loss: np.ndarray


def path_runs(runs: Sequence[Run], paths: int) -> list[Run]:
    """Each run repeated `paths` times with keys fold_in(run key, path), path-major within a run."""
    if int(paths) < 1:
        raise ValueError(f"paths must be >= 1; got {paths}")
    out = []
    for i, run in enumerate(runs):
        if run.key is None:
            raise ValueError(f"run {run.name or i}: the SGD prediction needs a PRNG key for its noise; got None")
        out += [dataclasses.replace(run, key=jax.random.fold_in(run.key, p)) for p in range(int(paths))]
    return out


def sgd_plan(runs: Sequence[Run], paths: int = 32, *, gradient_flow: bool = False, **plan_kwargs) -> list[Paths]:
    """The SGD-aware prediction of every run: `paths` paths of the diffusion on the engine (one
    program per group, paths vmapped like seeds), in the order of `runs`. gradient_flow=True
    switches the noise off: one path, theory.solver.flow_plan's result."""
    if gradient_flow:
        return [_gather([r]) for r in flow_plan(runs, **plan_kwargs)]
    res = train_plan(path_runs(runs, paths), source="diffusion", **plan_kwargs)
    return [_gather(res[i * paths:(i + 1) * paths]) for i in range(len(runs))]


def _gather(results: list[TrainResult]) -> Paths:
    params = {k: np.stack([r.params[k] for r in results]) for k in results[0].params}
    return Paths(params, np.stack([r.history for r in results]), np.stack([r.final_loss for r in results]))


class CurveStats(NamedTuple):
    """Exact test errors of end points: mean and sd over them, and the mean's own standard error
    (sd / sqrt(count)); arrays (T, N)."""

    mean: np.ndarray
    sd: np.ndarray
    se: np.ndarray


def path_stats(x) -> CurveStats:
    """Mean, sd (ddof 1; 0 for one sample) and the mean's SE over the leading axis (paths, or
    seeds x paths flattened)."""
    x = np.asarray(x, np.float64)
    sd = x.std(axis=0, ddof=1) if len(x) > 1 else np.zeros(x.shape[1:])
    return CurveStats(x.mean(axis=0), sd, sd / math.sqrt(len(x)))


def end_point_curves(stacked: dict, theta0, shots, noise: float, normalization: str = "tokens",
                     tasks=None) -> CurveStats:
    """path_stats of the exact test error of stacked end points on the test tasks: arrays (T, N)."""
    kw = {} if tasks is None else {"tasks": tasks}
    return path_stats(task_curves(stacked, theta0, shots, noise, normalization, **kw))
