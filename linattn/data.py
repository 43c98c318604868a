"""Samplers: tasks, covariates, prompts, the fine-tuning dataset (SPEC section 1).

Shape notation: B batch, n demonstrations, N = n + 1 tokens, d covariates, D = d + 2.
Every sampler takes a PRNG key first and is pure and jittable.

Tasks: "sphere" (uniform on the unit sphere, the pretraining distribution), "gaussian"
(theta ~ N(0, I/d), so E|theta|^2 = 1), or a fixed vector theta of shape (d,).
Covariates x ~ N(0, Sigma) are drawn as x = L g with L a factor of Sigma (L L^T = Sigma);
labels y = theta . x + eps with eps ~ N(0, noise), `noise` being the variance sigma^2.

Two prompt samplers give the same distribution of the one-layer prediction:
- tokens (`sample_prompts`): the (B, N, D) prompt itself, for any model;
- stats (`sample_packed_stats`): the query token and S = sum of z z^T over all N tokens, which is
  all a one-layer model reads (linattn.model.predict_many_from_packed), drawn at a cost independent
  of n: the demonstration sum is Gaussian and the centred scatter matrix is Wishart (Bartlett).
  S comes packed (its upper triangle); sample_prompt_stats gives it as a (B, D, D) matrix.
The fine-tuning dataset's prompts have both forms too: sample_from_dataset (tokens) and
sample_dataset_stats (the same prompts' statistics, from per-example moments).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from linattn.model import packed_outer, unpack

TASK_KINDS = ("sphere", "gaussian")


def _flat(sampler, key, shape, *args, **kwargs) -> jax.Array:
    """sampler(key, shape, ...) drawn as one flat vector and reshaped.

    The values are bit-identical to drawing `shape` directly; with the partitionable Threefry
    (JAX's default, which importing linattn turns off) the flat draw is 1.5-3x faster on CPU for the
    batched shapes used here.
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

    Demonstration j's normals are drawn from fold_in(key, j) (one vmapped draw), so they do not
    depend on n. (Training keeps sample_prompts: this layout's transpose makes a vmapped training
    step about 2x slower on CPU.)
    """
    check_shots(n)
    k_task, k_q, k_demo = jax.random.split(key, 3)
    theta = sample_tasks(k_task, batch, d, task, dtype)
    gq = _normal(k_q, (batch, 1, d + 1), dtype)
    demos = jax.vmap(lambda j: _normal(jax.random.fold_in(k_demo, j), (batch, d + 1), dtype))(jnp.arange(n))
    g = jnp.concatenate([jnp.swapaxes(demos, 0, 1), gq], axis=1)
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
    Gamma(a) = Gamma(a + 1) U^(1/a). Rejected lanes (a few percent) are gathered once into a small
    buffer and redrawn there until each is accepted (a lane's value is its first accepted proposal,
    every proposal from a fresh key), so the cost is about two draws per lane; unlike
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
        idx = jnp.nonzero(~ok, size=buf, fill_value=size)[0]  # up to buf rejected lanes (one pass: rarely more)
        live = idx < size
        safe = jnp.minimum(idx, size - 1)
        d_, c_ = dd[safe], cc[safe]

        def redraw(st):  # on the buffer only, until each of its lanes has an accepted proposal
            v, o, j = st
            v2, o2 = propose(jax.random.fold_in(k_loop, j), d_, c_)
            return jnp.where(o, v, v2), o | o2, j + 1

        # start values made from the buffer's own (under shard_map, device-varying) arrays
        v, o, i = jax.lax.while_loop(lambda st: ~jnp.all(st[1] | ~live), redraw, (d_ * 0, live & False, i))
        dest = jnp.where(live, idx, size)  # out of range: dropped
        return val.at[dest].set(v, mode="drop"), ok.at[dest].set(True, mode="drop"), i

    val, _, _ = jax.lax.while_loop(lambda s: ~jnp.all(s[1]), body, (val, ok, jnp.asarray(0)))
    u = jax.random.uniform(k_boost, (size,), dtype, minval=jnp.finfo(dtype).tiny)
    val = jnp.where(boost, val * jnp.exp(jnp.log(u) / flat), val)
    return val.reshape(shape)


def sample_chi2(key, dof, dtype=jnp.float32) -> jax.Array:
    """Chi-square draws with dof > 0 degrees of freedom (an array), via sample_gamma."""
    return 2.0 * sample_gamma(key, jnp.asarray(dof, dtype) / 2.0, dtype)


class PackedStats(NamedTuple):
    """PromptStats with S packed (linattn.model.pack: the entries S_jk, j <= k, row by row): what
    training reads, without (B, D, D) arrays, whose small trailing axes are slow on CPU."""

    zq: jax.Array  # (B, D) query token (1, x_q, 0)
    Sp: jax.Array  # (B, D(D+1)/2) packed sum of z z^T over the n demonstrations and the query
    y: jax.Array  # (B,) the query's true label


def _with_query(demos: jax.Array, xq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(zq, packed S) from the demonstrations' packed sum of z z^T (B, D(D+1)/2) and the query's
    covariates xq (B, d): S adds zq zq^T, zq = (1, x_q, 0)."""
    batch = xq.shape[0]
    zq = jnp.concatenate([jnp.ones((batch, 1), xq.dtype), xq, jnp.zeros((batch, 1), xq.dtype)], axis=1)
    return zq, demos + packed_outer(zq)


def sample_packed_stats(key, n, batch: int, d: int, task="sphere", noise: float = 0.1,
                        cov_factor=None, dtype=jnp.float32) -> PackedStats:
    """Sufficient statistics of B prompts, exact in distribution, cost independent of n; S packed.

    Demonstrations u = (x, y) ~ N(0, C) with C = A A^T, A = [[L, 0], [theta^T L, sigma]].
    Their sum s ~ sqrt(n) A g and their scatter sum u u^T = s s^T / n + A W A^T with
    W = Bw Bw^T ~ Wishart(I, n - 1) independent of s; Bw is Bartlett's lower-triangular factor
    (B_jj^2 ~ chi^2(n - 1 - j), below the diagonal N(0, 1); column j exists only for j < n - 1), so
    A W A^T = sum_c (A Bw_c)(A Bw_c)^T over Bw's columns. About 3 d + d^2/2 + 8 draws per prompt
    against (n + 1)(d + 1) for the tokens. `n` may be a traced integer.
    """
    check_shots(n)
    k_task, k_g, k_w = jax.random.split(key, 3)
    p = d + 1
    theta = sample_tasks(k_task, batch, d, task, dtype)
    g = _normal(k_g, (batch, d + 1 + p + p * (p - 1) // 2), dtype)
    gq, geps, gs, off = g[:, :d], g[:, d], g[:, d + 1 : d + 1 + p], g[:, d + 1 + p :]
    L = None if cov_factor is None else jnp.asarray(cov_factor, dtype)
    Lmul = (lambda v: v) if L is None else (lambda v: v @ L.T)  # rows of covariates: x = L g_x
    thL = theta if L is None else theta @ L  # (B, d)
    sig = jnp.sqrt(jnp.asarray(noise, dtype))
    xq = Lmul(gq)
    yq = jnp.sum(xq * theta, axis=-1) + sig * geps
    A = lambda v: jnp.concatenate([Lmul(v[:, :d]), (jnp.sum(thL * v[:, :d], axis=-1) + sig * v[:, d])[:, None]], axis=1)
    nf = jnp.asarray(n, dtype)
    s = jnp.sqrt(nf) * A(gs)
    live = jnp.arange(p) < jnp.asarray(n) - 1
    dof = jnp.where(live, jnp.asarray(n) - 1 - jnp.arange(p), 2).astype(dtype)
    diag = jnp.sqrt(sample_chi2(k_w, jnp.broadcast_to(dof, (batch, p)), dtype))
    Up = packed_outer(s) / jnp.maximum(nf, 1.0)
    first = 0  # `off` holds Bw's below-diagonal entries column by column
    for c in range(p):
        below = off[:, first : first + p - 1 - c]
        first += p - 1 - c
        col = jnp.concatenate([jnp.zeros((batch, c), dtype), diag[:, c : c + 1], below], axis=1)
        ab = jnp.where(live[c], A(col), 0.0)
        Up = Up + packed_outer(ab)
    head = jnp.broadcast_to(nf, (batch, 1))  # [[n, s^T], [s, U]] packed row by row
    zq, Sp = _with_query(jnp.concatenate([head, s, Up], axis=1), xq)
    return PackedStats(zq, Sp, yq)


def sample_prompt_stats(key, n, batch: int, d: int, task="sphere", noise: float = 0.1,
                        cov_factor=None, dtype=jnp.float32) -> PromptStats:
    """sample_packed_stats with S unpacked to (B, D, D)."""
    zq, Sp, y = sample_packed_stats(key, n, batch, d, task, noise, cov_factor, dtype)
    return PromptStats(zq, unpack(Sp, d + 2), y)


def prompt_stats(Z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(zq, S) of token prompts: the query token and the sum of outer products of all tokens."""
    return Z[..., -1, :], jnp.einsum("...ni,...nj->...ij", Z, Z)


class FineTuneData(NamedTuple):
    """The finite fine-tuning dataset drawn once from theta0 (SPEC section 1)."""

    x: jax.Array  # (M, d)
    y: jax.Array  # (M,)
    moments: jax.Array  # (M, D(D+1)/2) dataset_moments(x, y): what prompts' statistics sum


def make_finetune_dataset(key, theta0, size: int = 100_000, noise: float = 0.1, cov_factor=None,
                          dtype=jnp.float32) -> FineTuneData:
    """`size` examples (x, theta0 . x + eps) from one fixed task."""
    theta0 = jnp.asarray(theta0, dtype)
    if theta0.ndim != 1:
        raise ValueError(f"theta0 has shape {theta0.shape}; expected (d,)")
    if size < 1:
        raise ValueError(f"fine-tuning dataset size must be >= 1; got {size}")
    factor = None if cov_factor is None else jnp.asarray(cov_factor, dtype)
    return _dataset(key, theta0, noise, factor, size=int(size))


@functools.partial(jax.jit, static_argnames="size")
def _dataset(key, theta0, noise, cov_factor, *, size: int) -> FineTuneData:
    """make_finetune_dataset's draw as one compiled program (eagerly, about 16 small ones)."""
    k_x, k_eps = jax.random.split(key)
    x = sample_covariates(k_x, (size,), theta0.shape[0], cov_factor, theta0.dtype)
    y = x @ theta0 + jnp.sqrt(noise) * _normal(k_eps, (size,), theta0.dtype)
    return FineTuneData(x, y, dataset_moments(x, y))


def sample_from_dataset(key, data: FineTuneData, n: int, batch: int) -> Prompts:
    """B prompts of n + 1 examples drawn from the dataset with replacement; the last is the query."""
    check_shots(n)
    idx = _flat(jax.random.randint, key, (batch, n + 1), 0, data.x.shape[0])
    x, y = data.x[idx], data.y[idx]
    return Prompts(build_prompt(x, y), y[:, -1])


def dataset_moments(x: jax.Array, y: jax.Array) -> jax.Array:
    """(M, D(D+1)/2) per example: pack(z z^T) (linattn.model.pack) of its token z = (1, x, y);
    the packed S of an n-shot prompt from the dataset sums n of these rows and the query's."""
    return packed_outer(jnp.concatenate([jnp.ones_like(y)[:, None], x, y[:, None]], axis=1))


def sample_dataset_stats(key, data: FineTuneData, n: int, batch: int) -> PackedStats:
    """The statistics of sample_from_dataset(key, data, n, batch), the same examples, S packed:
    the demonstrations' rows of data.moments summed one demonstration at a time; the n-shot sum
    costs n gathers of D(D+1)/2 numbers per prompt."""
    n = int(check_shots(n)[0])
    idx = _flat(jax.random.randint, key, (batch, n + 1), 0, data.x.shape[0])
    demos = jnp.zeros((batch, data.moments.shape[1]), data.moments.dtype)
    for i in range(n):
        demos = demos + data.moments[idx[:, i]]
    zq, Sp = _with_query(demos, data.x[idx[:, n]])
    return PackedStats(zq, Sp, data.y[idx[:, n]])


def draws_per_prompt(sampler: str, n: int, d: int) -> int:
    """Random numbers one prompt of n demonstrations costs: "tokens" (n + 1)(d + 1) + d; "stats"
    d + 1 + p + p(p - 1)/2 normals and p chi-squares (about two draws each), p = d + 1."""
    if sampler == "tokens":
        return (n + 1) * (d + 1) + d
    p = d + 1
    return d + 1 + p + p * (p - 1) // 2 + 2 * p


# name -> prompt sampler(key, n, batch, d, task, noise, cov_factor, dtype); read by training
# (linattn.minibatch) and evaluation (linattn.evaluate). "tokens" returns Prompts (any model),
# "stats" PackedStats (one-layer models; cost independent of n; sample_prompt_stats unpacks them).
SAMPLERS = {"tokens": sample_prompts, "stats": sample_packed_stats}
