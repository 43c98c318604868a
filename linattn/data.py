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

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

TASK_KINDS = ("sphere", "gaussian")


def _flat(sampler, key, shape, *args, **kwargs) -> jax.Array:
    """sampler(key, shape, ...) drawn as one flat vector and reshaped.

    With jax_threefry_partitionable (the default) the values are bit-identical to drawing `shape`
    directly, and on CPU the flat draw is 1.5-3x faster for the batched shapes used here.
    """
    shape = tuple(int(s) for s in shape)
    return sampler(key, (math.prod(shape),), *args, **kwargs).reshape(shape)


def _normal(key, shape, dtype=jnp.float32) -> jax.Array:
    return _flat(jax.random.normal, key, shape, dtype)


def check_shots(n):
    """Shot counts as a 1-D int array; ValueError naming a negative or non-integer count.

    Traced counts cannot be checked and are returned as they are.
    """
    try:
        arr = np.atleast_1d(np.asarray(n))
    except jax.errors.TracerArrayConversionError:
        return n
    if arr.ndim != 1:
        raise ValueError(f"shots must be an int or a 1-D sequence of ints; got shape {arr.shape}")
    for v in arr.tolist():
        if isinstance(v, float) and not v.is_integer():
            raise ValueError(f"number of shots must be an integer; got {v}")
        if v < 0:
            raise ValueError(f"number of shots must be >= 0; got {int(v) if float(v).is_integer() else v}")
    return arr.astype(np.int64)


def sample_tasks(key: jax.Array, batch: int, d: int, task="sphere", dtype=jnp.float32) -> jax.Array:
    """Task vectors, shape (batch, d). `task` is "sphere", "gaussian", a fixed (d,) vector, or
    (batch, d) tasks given one per prompt."""
    if isinstance(task, str):
        if task not in TASK_KINDS:
            raise ValueError(f"task distribution {task!r} unknown; allowed: {list(TASK_KINDS)} or a (d,) vector")
        g = _normal(key, (batch, d), dtype)
        if task == "sphere":
            return g / jnp.linalg.norm(g, axis=-1, keepdims=True)
        return g / jnp.sqrt(jnp.asarray(d, dtype))
    theta = jnp.asarray(task, dtype)
    if theta.shape not in ((d,), (batch, d)):
        raise ValueError(f"fixed task has shape {theta.shape}; expected ({d},) for d = {d} (or ({batch}, {d}))")
    return jnp.broadcast_to(theta, (batch, d))


def sample_covariates(key, shape: tuple, d: int, cov_factor=None, dtype=jnp.float32) -> jax.Array:
    """x ~ N(0, Sigma), shape shape + (d,); cov_factor L with L L^T = Sigma (None: identity)."""
    g = _normal(key, tuple(shape) + (d,), dtype)
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
    y = jnp.einsum("bnd,bd->bn", x, theta) + jnp.sqrt(noise) * _normal(k_eps, (batch, n + 1), dtype)
    return Prompts(build_prompt(x, y), y[:, -1])


def sample_nested_prompts(key, n: int, batch: int, d: int, task="sphere", noise: float = 0.1,
                          cov_factor=None, dtype=jnp.float32) -> Prompts:
    """sample_prompts' distribution, nested in n: the first m demonstrations of the n-shot prompts
    are the m-shot prompts of the same key, so one draw serves every shot count (evaluation).

    The demonstrations' normals are one flat draw of shape (n, B, d + 1); a partitionable threefry
    draw's values do not change when its leading axis grows. (Training keeps sample_prompts: this
    layout's transpose makes a vmapped training step about 2x slower on CPU.)
    """
    check_shots(n)
    k_task, k_q, k_demo = jax.random.split(key, 3)
    theta = sample_tasks(k_task, batch, d, task, dtype)
    gq = _normal(k_q, (batch, 1, d + 1), dtype)
    g = jnp.concatenate([jnp.swapaxes(_normal(k_demo, (n, batch, d + 1), dtype), 0, 1), gq], axis=1)
    x = g[..., :d] if cov_factor is None else g[..., :d] @ jnp.asarray(cov_factor, dtype).T
    y = jnp.einsum("bnd,bd->bn", x, theta) + jnp.sqrt(jnp.asarray(noise, dtype)) * g[..., d]
    return Prompts(build_prompt(x, y), y[:, -1])


class PromptStats(NamedTuple):
    zq: jax.Array  # (B, D) query token (1, x_q, 0)
    S: jax.Array  # (B, D, D) sum of z z^T over the n demonstrations and the query
    y: jax.Array  # (B,) the query's true label


def sample_gamma(key, a, dtype=jnp.float32) -> jax.Array:
    """Gamma(a, 1) draws for an array of shapes a > 0, exact (Marsaglia & Tsang 2000).

    One normal and one uniform per lane propose d v, d = a' - 1/3, v = (1 + x / sqrt(9 d))^3,
    accepted when log u < x^2/2 + d - d v + d log v; shapes a < 1 use a' = a + 1 and the boost
    Gamma(a) = Gamma(a + 1) U^(1/a). Rejected lanes (a few percent) are redrawn in a while_loop
    that touches only a small buffer of them, so the cost is about two draws per lane; unlike
    jax.random.gamma there is no per-lane key split. Returns an array of a's shape.
    """
    a = jnp.asarray(a, dtype)
    shape, flat = a.shape, jnp.ravel(a)
    size = flat.size
    boost = flat < 1.0
    dd = jnp.where(boost, flat + 1.0, flat) - 1.0 / 3.0
    cc = 1.0 / jnp.sqrt(9.0 * dd)

    def propose(k, dd_, cc_):
        kx, ku = jax.random.split(k)
        x = jax.random.normal(kx, dd_.shape, dtype)
        u = jax.random.uniform(ku, dd_.shape, dtype)
        v = (1.0 + cc_ * x) ** 3
        pos = v > 0
        logv = jnp.log(jnp.where(pos, v, 1.0))
        ok = pos & (jnp.log(u) < 0.5 * x * x + dd_ - dd_ * v + dd_ * logv)
        return dd_ * v, ok

    k0, k_boost, k_loop = jax.random.split(key, 3)
    val, ok = propose(k0, dd, cc)
    buf = min(size, 64 + size // 16)

    def body(state):
        val, ok, i = state
        idx = jnp.nonzero(~ok, size=buf, fill_value=size)[0]
        safe = jnp.minimum(idx, size - 1)
        v2, ok2 = propose(jax.random.fold_in(k_loop, i), dd[safe], cc[safe])
        dest = jnp.where(ok2 & (idx < size), idx, size)  # out of range: dropped
        return val.at[dest].set(v2, mode="drop"), ok.at[dest].set(True, mode="drop"), i + 1

    val, _, _ = jax.lax.while_loop(lambda s: ~jnp.all(s[1]), body, (val, ok, jnp.asarray(0)))
    u = jax.random.uniform(k_boost, (size,), dtype, minval=jnp.finfo(dtype).tiny)
    val = jnp.where(boost, val * jnp.exp(jnp.log(u) / flat), val)
    return val.reshape(shape)


def sample_chi2(key, dof, dtype=jnp.float32) -> jax.Array:
    """Chi-square draws with dof > 0 degrees of freedom (an array), via sample_gamma."""
    return 2.0 * sample_gamma(key, jnp.asarray(dof, dtype) / 2.0, dtype)


def _bmm(a: jax.Array, b: jax.Array) -> jax.Array:
    """Batched product of small matrices (..., i, k) (..., k, j) as a broadcast sum.

    On CPU, XLA's batched dot for 6 x 6 blocks is about 3x slower than this fused elementwise form.
    """
    return jnp.sum(a[..., :, :, None] * b[..., None, :, :], axis=-2)


def _tril_from(values: jax.Array, p: int) -> jax.Array:
    """(..., p(p-1)/2) -> (..., p, p) strictly lower-triangular matrices."""
    rows, cols = np.tril_indices(p, -1)
    flat = np.full(p * p, values.shape[-1], np.int32)  # index of an appended zero
    flat[rows * p + cols] = np.arange(rows.size)
    padded = jnp.concatenate([values, jnp.zeros(values.shape[:-1] + (1,), values.dtype)], axis=-1)
    return padded[..., flat].reshape(values.shape[:-1] + (p, p))


def _bartlett(key, k, p: int, batch: int, dtype, off=None) -> jax.Array:
    """Lower-triangular B with B B^T ~ Wishart_p(I, k), any k >= 0 (traced allowed).

    Column j exists only for j < k (rank min(k, p)); B_jj^2 ~ chi^2(k - j), below-diagonal N(0, 1).
    `off` optionally supplies the (batch, p(p-1)/2) below-diagonal normals (drawn here if None).
    """
    k_diag, k_off = jax.random.split(key)
    j = jnp.arange(p)
    live = j < k
    dof = jnp.where(live, k - j, 2).astype(dtype)
    chi2 = sample_chi2(k_diag, jnp.broadcast_to(dof, (batch, p)), dtype)
    diag = jnp.where(live[None, :], jnp.sqrt(chi2), 0.0)
    if off is None:
        off = _normal(k_off, (batch, p * (p - 1) // 2), dtype)
    low = jnp.where(live[None, None, :], _tril_from(off, p), 0.0)
    return low + diag[:, :, None] * jnp.eye(p, dtype=dtype)[None]


def sample_prompt_stats(key, n, batch: int, d: int, task="sphere", noise: float = 0.1,
                        cov_factor=None, dtype=jnp.float32) -> PromptStats:
    """Sufficient statistics of B prompts, exact in distribution, cost independent of n.

    Demonstrations u = (x, y) ~ N(0, C) with C = A A^T, A = [[L, 0], [theta^T L, sigma]].
    Their sum s ~ sqrt(n) A g and their scatter sum u u^T = s s^T / n + A W A^T with
    W ~ Wishart(I, n - 1) independent of s (Bartlett: p chi-squares, p(p-1)/2 normals).
    About 3 d + d^2/2 + 8 draws per prompt against (n + 1)(d + 1) for the tokens.
    `n` may be a traced integer.
    """
    check_shots(n)
    k_task, k_g, k_w = jax.random.split(key, 3)
    p = d + 1
    theta = sample_tasks(k_task, batch, d, task, dtype)
    g = _normal(k_g, (batch, d + 1 + p + p * (p - 1) // 2), dtype)
    gq, geps, gs, off = g[:, :d], g[:, d], g[:, d + 1 : d + 1 + p], g[:, d + 1 + p :]
    xq = gq if cov_factor is None else gq @ jnp.asarray(cov_factor, dtype).T
    sig = jnp.sqrt(jnp.asarray(noise, dtype))
    yq = jnp.einsum("bd,bd->b", xq, theta) + sig * geps
    # A g and A Bw through A's blocks (no (B, p, p) copy of A): the x rows are L g_x, the label row
    # theta^T L g_x + sigma g_y; with L = I (cov_factor None) the x rows are g_x itself.
    Lmul = (lambda v: v) if cov_factor is None else (lambda v: jnp.einsum("ij,bj...->bi...", jnp.asarray(cov_factor, dtype), v))
    thL = theta if cov_factor is None else theta @ jnp.asarray(cov_factor, dtype)  # (B, d)
    nf = jnp.asarray(n, dtype)
    sx = Lmul(gs[:, :d])
    s = jnp.sqrt(nf) * jnp.concatenate([sx, (jnp.sum(thL * gs[:, :d], axis=-1) + sig * gs[:, d])[:, None]], axis=1)
    Bw = _bartlett(k_w, jnp.asarray(n) - 1, p, batch, dtype, off=off)
    ABx = Lmul(Bw[:, :d, :])  # (B, d, p)
    ABy = jnp.sum(thL[:, :, None] * Bw[:, :d, :], axis=1) + sig * Bw[:, d, :]  # (B, p)
    AB = jnp.concatenate([ABx, ABy[:, None, :]], axis=1)
    U = s[:, :, None] * s[:, None, :] / jnp.maximum(nf, 1.0) + _bmm(AB, jnp.swapaxes(AB, -1, -2))
    zq = jnp.concatenate([jnp.ones((batch, 1), dtype), xq, jnp.zeros((batch, 1), dtype)], axis=-1)
    head = jnp.concatenate([jnp.broadcast_to(nf, (batch, 1, 1)), s[:, None, :]], axis=2)
    rest = jnp.concatenate([s[:, :, None], U], axis=2)
    S = jnp.concatenate([head, rest], axis=1) + zq[:, :, None] * zq[:, None, :]
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
    return FineTuneData(x, x @ theta0 + jnp.sqrt(noise) * _normal(k_eps, (size,), dtype))


def sample_from_dataset(key, data: FineTuneData, n: int, batch: int) -> Prompts:
    """B prompts of n + 1 examples drawn from the dataset with replacement; the last is the query."""
    check_shots(n)
    idx = _flat(jax.random.randint, key, (batch, n + 1), 0, data.x.shape[0])
    x, y = data.x[idx], data.y[idx]
    return Prompts(build_prompt(x, y), y[:, -1])


def draws_per_prompt(sampler: str, n: int, d: int) -> int:
    """Random numbers one prompt of n demonstrations costs: "tokens" (n + 1)(d + 1) + d; "stats"
    d + 1 + p + p(p - 1)/2 normals and p chi-squares (about two draws each), p = d + 1."""
    if sampler == "tokens":
        return (n + 1) * (d + 1) + d
    p = d + 1
    return d + 1 + p + p * (p - 1) // 2 + 2 * p


# name -> prompt sampler(key, n, batch, d, task, noise, cov_factor, dtype); read by training
# (linattn.minibatch) and evaluation (linattn.evaluate). "tokens" returns Prompts (any model),
# "stats" PromptStats (one-layer models; cost independent of n).
SAMPLERS = {"tokens": sample_prompts, "stats": sample_prompt_stats}
