"""Samplers: tasks, covariates, prompts, the fine-tuning dataset (SPEC section 1).

Shape notation: B batch, n demonstrations, N = n + 1 tokens, d covariates, D = d + 2.
Every sampler takes a PRNG key first and is pure and jittable.

Tasks: "sphere" (uniform on the unit sphere, the pretraining distribution), "gaussian"
(theta ~ N(0, I/d), so E|theta|^2 = 1), or a fixed vector theta of shape (d,).
Covariates x ~ N(0, Sigma) are drawn as x = L g with L a factor of Sigma (L L^T = Sigma);
labels y = theta . x + eps with eps ~ N(0, noise), `noise` being the variance sigma^2.

Two prompt samplers give the same distribution of the one-layer prediction:
- tokens (`sample_prompts`): the (B, N, D) prompt itself, for any model;
- stats (`sample_prompt_stats`): the query token and S = sum of z z^T over all N tokens, which is
  all a one-layer model reads (linattn.model.predict_from_stats), drawn at a cost independent of
  n: the demonstration sum is Gaussian and the centred scatter matrix is Wishart (Bartlett).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

TASK_KINDS = ("sphere", "gaussian")


def check_shots(n) -> None:
    """Shot counts must be non-negative integers (checked on concrete values)."""
    try:
        values = [int(v) for v in jnp.atleast_1d(jnp.asarray(n)).tolist()]
    except jax.errors.ConcretizationTypeError:
        return
    bad = [v for v in values if v < 0]
    if bad:
        raise ValueError(f"number of shots must be >= 0; got {bad[0]}")


def sample_tasks(key: jax.Array, batch: int, d: int, task="sphere", dtype=jnp.float32) -> jax.Array:
    """Task vectors, shape (batch, d). `task` is "sphere", "gaussian" or a fixed (d,) vector."""
    if isinstance(task, str):
        if task not in TASK_KINDS:
            raise ValueError(f"task distribution {task!r} unknown; allowed: {list(TASK_KINDS)} or a (d,) vector")
        g = jax.random.normal(key, (batch, d), dtype)
        if task == "sphere":
            return g / jnp.linalg.norm(g, axis=-1, keepdims=True)
        return g / jnp.sqrt(jnp.asarray(d, dtype))
    theta = jnp.asarray(task, dtype)
    if theta.shape != (d,):
        raise ValueError(f"fixed task has shape {theta.shape}; expected ({d},) for d = {d}")
    return jnp.broadcast_to(theta, (batch, d))


def sample_covariates(key, shape: tuple, d: int, cov_factor=None, dtype=jnp.float32) -> jax.Array:
    """x ~ N(0, Sigma), shape shape + (d,); cov_factor L with L L^T = Sigma (None: identity)."""
    g = jax.random.normal(key, tuple(shape) + (d,), dtype)
    if cov_factor is None:
        return g
    return g @ jnp.asarray(cov_factor, dtype).T


def build_prompt(x: jax.Array, y: jax.Array) -> jax.Array:
    """Tokens z = (1, x, y) with the last (query) label zeroed: x (..., N, d), y (..., N) -> (..., N, D)."""
    if x.shape[:-1] != y.shape:
        raise ValueError(f"covariates {x.shape} and labels {y.shape} disagree; expected (..., N, d) and (..., N)")
    y = y.at[..., -1].set(0.0)
    ones = jnp.ones(x.shape[:-1] + (1,), x.dtype)
    return jnp.concatenate([ones, x, y[..., None]], axis=-1)


class Prompts(NamedTuple):
    Z: jax.Array  # (B, N, D) prompts, query label zeroed
    y: jax.Array  # (B,) the query's true label


def sample_prompts(key, n: int, batch: int, d: int, task="sphere", noise: float = 0.1,
                   cov_factor=None, dtype=jnp.float32) -> Prompts:
    """B prompts of n demonstrations plus the query, each from its own task draw."""
    check_shots(n)
    k_task, k_x, k_eps = jax.random.split(key, 3)
    theta = sample_tasks(k_task, batch, d, task, dtype)
    x = sample_covariates(k_x, (batch, n + 1), d, cov_factor, dtype)
    y = jnp.einsum("bnd,bd->bn", x, theta) + jnp.sqrt(noise) * jax.random.normal(k_eps, (batch, n + 1), dtype)
    return Prompts(build_prompt(x, y), y[:, -1])


class PromptStats(NamedTuple):
    zq: jax.Array  # (B, D) query token (1, x_q, 0)
    S: jax.Array  # (B, D, D) sum of z z^T over the n demonstrations and the query
    y: jax.Array  # (B,) the query's true label


def _bartlett(key, k, p: int, batch: int, dtype) -> jax.Array:
    """Lower-triangular B with B B^T ~ Wishart_p(I, k), any k >= 0 (traced allowed).

    Column j exists only for j < k (rank min(k, p)); B_jj^2 ~ chi^2(k - j), below-diagonal N(0, 1).
    """
    k_diag, k_off = jax.random.split(key)
    j = jnp.arange(p)
    live = j < k
    dof = jnp.where(live, k - j, 1).astype(dtype)
    chi2 = 2.0 * jax.random.gamma(k_diag, dof / 2.0, (batch, p), dtype)
    diag = jnp.where(live, jnp.sqrt(chi2), 0.0)
    off = jax.random.normal(k_off, (batch, p, p), dtype)
    mask = jnp.tril(jnp.ones((p, p), bool), -1) & live[None, :]
    return jnp.where(mask, off, 0.0) + diag[:, :, None] * jnp.eye(p, dtype=dtype)


def sample_prompt_stats(key, n, batch: int, d: int, task="sphere", noise: float = 0.1,
                        cov_factor=None, dtype=jnp.float32) -> PromptStats:
    """Sufficient statistics of B prompts, exact in distribution, cost independent of n.

    Demonstrations u = (x, y) ~ N(0, C) with C = A A^T, A = [[L, 0], [theta^T L, sigma]].
    Their sum s ~ sqrt(n) A g and their scatter sum u u^T = s s^T / n + A W A^T with
    W ~ Wishart(I, n - 1) independent of s. `n` may be a traced integer.
    """
    check_shots(n)
    k_task, k_q, k_eps, k_s, k_w = jax.random.split(key, 5)
    p = d + 1
    theta = sample_tasks(k_task, batch, d, task, dtype)
    Lf = jnp.eye(d, dtype=dtype) if cov_factor is None else jnp.asarray(cov_factor, dtype)
    xq = jax.random.normal(k_q, (batch, d), dtype) @ Lf.T
    yq = jnp.einsum("bd,bd->b", xq, theta) + jnp.sqrt(noise) * jax.random.normal(k_eps, (batch,), dtype)
    A = jnp.zeros((batch, p, p), dtype)
    A = A.at[:, :d, :d].set(Lf).at[:, d, :d].set(theta @ Lf).at[:, d, d].set(jnp.sqrt(noise))
    nf = jnp.asarray(n, dtype)
    s = jnp.sqrt(nf) * jnp.einsum("bij,bj->bi", A, jax.random.normal(k_s, (batch, p), dtype))
    Bw = _bartlett(k_w, jnp.asarray(n) - 1, p, batch, dtype)
    AB = A @ Bw
    U = jnp.einsum("bi,bj->bij", s, s) / jnp.maximum(nf, 1.0) + AB @ jnp.swapaxes(AB, -1, -2)
    D = d + 2
    S = jnp.zeros((batch, D, D), dtype)
    S = S.at[:, 0, 0].set(nf).at[:, 0, 1:].set(s).at[:, 1:, 0].set(s).at[:, 1:, 1:].set(U)
    zq = jnp.concatenate([jnp.ones((batch, 1), dtype), xq, jnp.zeros((batch, 1), dtype)], axis=-1)
    S = S + jnp.einsum("bi,bj->bij", zq, zq)
    return PromptStats(zq, S, yq)


def prompt_stats(Z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(zq, S) of token prompts: the query token and the sum of outer products of all tokens."""
    return Z[..., -1, :], jnp.einsum("...ni,...nj->...ij", Z, Z)


class FineTuneData(NamedTuple):
    """The finite fine-tuning dataset drawn once from theta0 (SPEC section 1)."""

    x: jax.Array  # (M, d)
    y: jax.Array  # (M,)


def make_finetune_dataset(key, theta0, size: int = 100_000, noise: float = 0.1, cov_factor=None,
                          dtype=jnp.float32) -> FineTuneData:
    """`size` examples (x, theta0 . x + eps) from one fixed task."""
    theta0 = jnp.asarray(theta0, dtype)
    if theta0.ndim != 1:
        raise ValueError(f"theta0 has shape {theta0.shape}; expected (d,)")
    if size < 1:
        raise ValueError(f"fine-tuning dataset size must be >= 1; got {size}")
    k_x, k_eps = jax.random.split(key)
    x = sample_covariates(k_x, (size,), theta0.shape[0], cov_factor, dtype)
    return FineTuneData(x, x @ theta0 + jnp.sqrt(noise) * jax.random.normal(k_eps, (size,), dtype))


def sample_from_dataset(key, data: FineTuneData, n: int, batch: int) -> Prompts:
    """B prompts of n + 1 examples drawn from the dataset with replacement; the last is the query."""
    check_shots(n)
    idx = jax.random.randint(key, (batch, n + 1), 0, data.x.shape[0])
    x, y = data.x[idx], data.y[idx]
    return Prompts(build_prompt(x, y), y[:, -1])
