"""Linear self-attention on in-context regression prompts (SPEC section 2).

Shape notation: B batch, N = n + 1 tokens (n demonstrations and the query, last),
D = d + 2 token width, L layers, H heads.

One layer, per head h, with KQ_h = Wq_h^T Wk_h:
    out = Z + (1/N) (Z KQ_h Z^T)(Z Wv_h^T),  heads averaged.
Attention has no mask, so (Z KQ Z^T)(Z Wv^T) = Z KQ (Z^T Z) Wv^T: every function here costs
O(N D^2) and never builds the N x N attention matrix. The prediction is the label entry of the
query row of the last layer's output.

Prompts may be padded with all-zero tokens so that prompts of different n share one shape; a zero
token adds nothing to Z^T Z and stays zero through every layer, so passing the true n (which sets
the normalization) makes a padded prompt exact.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from linattn.params import NORMALIZATIONS, check_params, effective_kq, value_row


def check_normalization(normalization: str) -> None:
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"normalization {normalization!r} unknown; allowed: {list(NORMALIZATIONS)} "
            "('tokens' divides by n+1, 'shots' by n)"
        )


def norm_factor(n, normalization: str = "tokens"):
    """1/(n+1) for "tokens" (default) or 1/n for "shots" (1 at n = 0, where 1/n is undefined)."""
    check_normalization(normalization)
    n = jnp.asarray(n)
    if normalization == "tokens":
        return 1.0 / (n + 1.0)
    return 1.0 / jnp.maximum(n, 1.0)


def _check_prompt(params: Mapping, Z: jax.Array) -> None:
    check_params(params)
    D = params["V"].shape[-1]
    if Z.ndim < 2 or Z.shape[-1] != D:
        raise ValueError(
            f"prompt has shape {Z.shape}; expected (..., n+1, {D}) for parameters with "
            f"d = {D - 2} (token width d+2)"
        )


def _n_of(Z: jax.Array, n):
    return Z.shape[-2] - 1 if n is None else n


def _layer(kq: jax.Array, wv: jax.Array, Z: jax.Array, scale) -> jax.Array:
    """One layer: kq, wv (H, D, D); Z (..., N, D); scale broadcastable to Z[..., :1, :1]."""
    S = jnp.einsum("...ni,...nj->...ij", Z, Z)
    # M = (1/H) sum_h KQ_h S Wv_h^T, so that out = Z + scale * Z M.
    M = jnp.einsum("hij,...jk,hlk->...il", kq, S, wv) / kq.shape[0]
    return Z + scale * (Z @ M)


def apply(params: Mapping, Z: jax.Array, *, normalization: str = "tokens", n=None) -> jax.Array:
    """Full output of the L-layer model, shape (..., N, D).

    Args:
      params: the parameter tree (linattn.params).
      Z: prompts (..., N, D), query last with its label zeroed.
      normalization: "tokens" (1/(n+1)) or "shots" (1/n).
      n: number of demonstrations when Z is zero-padded (int or array of shape Z.shape[:-2]);
        defaults to N - 1.
    """
    _check_prompt(params, Z)
    scale = norm_factor(_n_of(Z, n), normalization)
    scale = jnp.broadcast_to(scale, Z.shape[:-2])[..., None, None]
    kq_all, wv_all = effective_kq(params), params["V"]
    for layer in range(kq_all.shape[0]):
        Z = _layer(kq_all[layer], wv_all[layer], Z, scale)
    return Z


def predict_from_stats(params: Mapping, zq: jax.Array, S: jax.Array, n, *, normalization: str = "tokens"):
    """One-layer query prediction from the prompt's sufficient statistics.

    y_hat = norm(n) * (1/H) sum_h zq^T KQ_h S v_h, with S = sum over all N tokens (query
    included) of z z^T. zq (..., D) is the query token (its label entry zero), S (..., D, D),
    n broadcastable to zq.shape[:-1].
    """
    check_params(params)
    return predict_many_from_stats([params], zq, S, n, normalization=normalization)[..., 0]


def _check_one_layer(params: Sequence[Mapping], what: str) -> None:
    for p in params:
        if p["V"].shape[0] != 1:
            raise ValueError(f"{what} is for one-layer models; these parameters have {p['V'].shape[0]} layers")


def _stacked_one_layer(params: Sequence[Mapping], what: str):
    """(KQ (M, H, D, D), value rows (M, H, D)) of M one-layer trees; ValueError for deeper ones."""
    _check_one_layer(params, what)
    return jnp.stack([effective_kq(p)[0] for p in params]), jnp.stack([value_row(p)[0] for p in params])


def predict_many_from_stats(params: Sequence[Mapping], zq: jax.Array, S: jax.Array, n, *,
                            normalization: str = "tokens"):
    """predict_from_stats of M one-layer models (same heads and d) on the same prompts: (..., M);
    predict_many_from_packed of the packed S."""
    return predict_many_from_packed(params, zq, pack(S), n, normalization=normalization)


def predict_many_from_packed(params: Sequence[Mapping], zq: jax.Array, Sp: jax.Array, n, *,
                             normalization: str = "tokens"):
    """predict_from_stats of M one-layer models on packed statistics Sp = pack(S): (..., M).

    The prediction is linear in the products zq_i S_jk (i < D - 1, j <= k), with coefficients
    c_m[i, jk] per model (_coefficients): Sp is contracted with every model's coefficients first
    (one matrix product for all M models), then with zq. On CPU this beats building the products
    and the (..., D, D) forms (BENCHMARKS.md: loss and gradient with the fine-tuning dataset's
    20-shot prompts drawn in the same program, 5000 prompts, d = 5: 1.6 ms for 1 model, 3.4 ms for 29).
    """
    _check_one_layer(params, "predict_from_stats")
    C = jnp.stack([_coefficients(p) for p in params], axis=-1)  # (i jk, M)
    C = C.reshape(zq.shape[-1] - 1, Sp.shape[-1], len(params))
    y = jnp.einsum("...im,...i->...m", jnp.einsum("...t,itm->...im", Sp, C), zq[..., :-1])
    return jnp.broadcast_to(jnp.expand_dims(norm_factor(n, normalization), -1), y.shape) * y


def predict_prefixes(params: Sequence[Mapping], Z: jax.Array, *, normalization: str = "tokens"):
    """One-layer predictions of M models at every prefix of the demonstrations: (B, N, M).

    Z (B, N, D) holds N - 1 demonstrations and the query (last). Entry [:, n] is
    predict_many_from_stats at S_n = zq zq^T + sum_{j<n} z_j z_j^T, the n-shot prompt made of the
    first n demonstrations. The prediction is linear in S, so it is the query's term plus a cumulative
    sum of per-demonstration terms (zq^T KQ_h z_j)(z_j . v_h): O(N M H D) per prompt.
    """
    kq, v = _stacked_one_layer(params, "predict_prefixes")
    zq = Z[:, -1]
    w = jnp.einsum("bi,mhij->bmhj", zq, kq)
    terms = jnp.mean(jnp.einsum("bmhj,bnj->bnmh", w, Z) * jnp.einsum("mhj,bnj->bnmh", v, Z), axis=-1)  # (B, N, M)
    demos = jnp.cumsum(terms[:, :-1], axis=1)
    y = terms[:, -1:] + jnp.concatenate([jnp.zeros_like(terms[:, :1]), demos], axis=1)
    return norm_factor(jnp.arange(Z.shape[1]), normalization)[None, :, None].astype(y.dtype) * y


def predict(params: Mapping, Z: jax.Array, *, normalization: str = "tokens", n=None) -> jax.Array:
    """The query's predicted label, shape Z.shape[:-2].

    Fast path: all layers but the last run in full; the last computes only the query row.
    """
    _check_prompt(params, Z)
    L = params["V"].shape[0]
    n = _n_of(Z, n)
    if L > 1:
        lower = {k: v[:-1] for k, v in params.items()}
        Z = apply(lower, Z, normalization=normalization, n=n)
    top = {k: v[-1:] for k, v in params.items()}
    S = jnp.einsum("...ni,...nj->...ij", Z, Z)
    zq = Z[..., -1, :]
    # The query row's label entry, (1/H) sum_h zq^T KQ_h S v_h, in full: below the top layer the
    # query's label entry is no longer zero (predict_from_stats assumes it is). Residual: it carries through.
    y = jnp.mean(jnp.einsum("...i,hij,...jk,hk->...h", zq, effective_kq(top)[0], S, value_row(top)[0]), axis=-1)
    return zq[..., -1] + norm_factor(n, normalization) * y


def packed_outer_sum(Z: jax.Array) -> jax.Array:
    """pack(sum_n z_n z_n^T) of prompts (..., N, D): (..., D(D+1)/2), reduced over the token axis
    moved to the front. (Summed token by token instead, XLA fuses the sum into transposing
    consumers: the SGD-aware paths' step, 256 float64 prompts x 5 slots x 29 methods, ran 1.45x
    slower; the (..., D, D) broadcast sum is slower on CPU still.)"""
    return jnp.sum(packed_outer(jnp.moveaxis(Z, -2, 0)), axis=0)


def _triu(D: int) -> tuple:
    return np.triu_indices(D)


def packed_outer(v: jax.Array) -> jax.Array:
    """pack(v v^T) of vectors (..., D): (..., D(D+1)/2), the products v_j v_k, j <= k."""
    j, k = _triu(v.shape[-1])
    return v[..., j] * v[..., k]


def pack(S: jax.Array) -> jax.Array:
    """(..., D, D) symmetric -> (..., D(D+1)/2): the entries S_jk, j <= k, row by row."""
    j, k = _triu(S.shape[-1])
    return S[..., j, k]


def unpack(Sp: jax.Array, D: int) -> jax.Array:
    """The inverse of pack: (..., D(D+1)/2) -> (..., D, D) symmetric."""
    j, k = _triu(D)
    idx = np.zeros((D, D), np.int32)
    idx[j, k] = idx[k, j] = np.arange(j.size)
    return Sp[..., idx.reshape(-1)].reshape(Sp.shape[:-1] + (D, D))


def _coefficients(params: Mapping) -> jax.Array:
    """c with sum_{i < D-1, j <= k} c[i, jk] zq_i S_jk = (1/H) sum_h zq^T KQ_h S v_h for symmetric S
    and a query token zq (its label entry zq_{D-1} is zero, so it has no coefficients; one layer)."""
    kq, v = effective_kq(params)[0], value_row(params)[0]
    t3 = jnp.mean(kq[:, :, :, None] * v[:, None, None, :], axis=0)  # (D, D, D): i, j, k
    t3 = t3 + jnp.swapaxes(t3, 1, 2)
    iu = _triu(t3.shape[-1])
    half = np.where(iu[0] == iu[1], 0.5, 1.0).astype(t3.dtype)
    return (t3[:-1, iu[0], iu[1]] * half[None, :]).reshape(-1)
