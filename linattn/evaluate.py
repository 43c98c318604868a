"""Monte Carlo test error at many shot counts, with standard errors (SPEC sections 3 and 6).

Shape notation: S shot counts, C chunks of b prompts, N_max = max shots + 1 tokens.

Prompts of every shot count share one shape: demonstrations past n are all-zero tokens, which a
linear attention layer ignores when told the true n (linattn.model), so the whole curve is one
compiled program mapped over shot counts and chunks. One-layer models can use the sufficient-
statistic sampler instead, whose cost does not grow with n.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from linattn import data as D
from linattn.model import predict, predict_from_stats
from linattn.params import check_params


class Curve(NamedTuple):
    """Test error by shot count; the one result type of simulation, theory and baselines."""

    shots: np.ndarray  # (S,) int
    mean: np.ndarray  # (S,) mean squared error of the query prediction
    se: np.ndarray  # (S,) its standard error (zeros for exact theory)


def _chunk_errors(params, key, n, nmax: int, b: int, d: int, task, noise, cov_factor, normalization, sampler):
    """Mean and sum of squared deviations of b squared errors at n shots (n may be traced)."""
    dtype = params["V"].dtype
    if sampler == "stats":
        zq, S, y = D.sample_prompt_stats(key, n, b, d, task, noise, cov_factor, dtype)
        pred = predict_from_stats(params, zq, S, n, normalization=normalization)
    else:
        Z, y = D.sample_prompts(key, nmax, b, d, task, noise, cov_factor, dtype)
        keep = (jnp.arange(nmax + 1) >= nmax - n)  # the last n demonstrations and the query
        Z = jnp.where(keep[None, :, None], Z, 0.0)
        pred = predict(params, Z, normalization=normalization, n=n)
    err = (pred - y) ** 2
    mean = jnp.mean(err)
    return mean, jnp.sum((err - mean) ** 2)


def test_error(key, params: Mapping, shots: Sequence[int], task="sphere", *, noise: float = 0.1,
               samples: int = 20_000, chunk: int = 5_000, cov_factor=None,
               normalization: str = "tokens", sampler: str = "auto") -> Curve:
    """Monte Carlo test error E[(y_hat - y_q)^2] at each shot count, with standard errors.

    Args:
      key: PRNG key; shot count n uses fold_in(key, n), so a point does not depend on the list.
      task: "sphere", "gaussian" (fresh task per prompt) or a fixed (d,) vector such as theta0.
      samples: prompts per shot count (rounded up to whole chunks).
      sampler: "tokens", "stats" (one layer only) or "auto" (stats for one layer).
    """
    check_params(params)
    shots = np.asarray(shots, dtype=np.int64).reshape(-1)
    if shots.size == 0:
        raise ValueError("need at least one shot count")
    D.check_shots(shots)
    L, _, width, _ = params["V"].shape
    d = width - 2
    if sampler == "auto":
        sampler = "stats" if L == 1 else "tokens"
    if sampler not in ("tokens", "stats"):
        raise ValueError(f"sampler {sampler!r} unknown; allowed: ['tokens', 'stats', 'auto']")
    b = min(chunk, samples)
    n_chunks = -(-samples // b)
    nmax = int(shots.max())
    means, ss = _curve_program(d, b, n_chunks, nmax, noise, normalization, sampler)(
        params, key, jnp.asarray(shots), task if not isinstance(task, str) else None,
        cov_factor, task if isinstance(task, str) else None)
    means, ss = np.asarray(means, np.float64), np.asarray(ss, np.float64)
    # combine equal chunks: total variance = within-chunk + between-chunk parts
    total = n_chunks * b
    mean = means.mean(axis=1)
    var = (ss.sum(axis=1) + b * ((means - mean[:, None]) ** 2).sum(axis=1)) / (total - 1)
    return Curve(shots, mean, np.sqrt(var / total))


_PROGRAMS: dict = {}


def _curve_program(d, b, n_chunks, nmax, noise, normalization, sampler):
    """One jitted program per static shape: lax.map over shot counts, then over chunks."""
    sig = (d, b, n_chunks, nmax, noise, normalization, sampler)
    if sig in _PROGRAMS:
        return _PROGRAMS[sig]

    def program(params, key, shots, theta, cov_factor, kind):
        task = kind if theta is None else theta

        def per_shot(n):
            k_n = jax.random.fold_in(key, n)
            return jax.lax.map(
                lambda c: _chunk_errors(params, jax.random.fold_in(k_n, c), n, nmax, b, d, task,
                                        noise, cov_factor, normalization, sampler),
                jnp.arange(n_chunks))

        return jax.lax.map(per_shot, shots)

    _PROGRAMS[sig] = jax.jit(program, static_argnames=("kind",))
    return _PROGRAMS[sig]


def test_errors(key, params: Mapping, shots: Sequence[int], theta0, **kwargs) -> dict[str, Curve]:
    """Curves on theta0, -theta0 (a task unseen in fine-tuning) and fresh unit-sphere tasks."""
    theta0 = jnp.asarray(theta0)
    tasks = {"theta0": theta0, "minus_theta0": -theta0, "random": "sphere"}
    return {name: test_error(jax.random.fold_in(key, i), params, shots, task, **kwargs)
            for i, (name, task) in enumerate(tasks.items())}
