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
    included) of z z^T. zq (..., D), S (..., D, D), n broadcastable to zq.shape[:-1].
    """
    check_params(params)
    return predict_many_from_stats([params], zq, S, n, normalization=normalization)[..., 0]


def _stacked_one_layer(params: Sequence[Mapping], what: str):
    """(KQ (M, H, D, D), value rows (M, H, D)) of M one-layer trees; ValueError for deeper ones."""
    for p in params:
        if p["V"].shape[0] != 1:
            raise ValueError(f"{what} is for one-layer models; these parameters have {p['V'].shape[0]} layers")
    return jnp.stack([effective_kq(p)[0] for p in params]), jnp.stack([value_row(p)[0] for p in params])


def predict_many_from_stats(params: Sequence[Mapping], zq: jax.Array, S: jax.Array, n, *,
                            normalization: str = "tokens"):
    """predict_from_stats of M one-layer models (same heads and d) on the same prompts: (..., M).

    Few models (M <= FEATURES_FROM): zq against every KQ_h and S against every v_h, about 2 D^2
    multiply-adds per prompt and model. More models: the prompt's features zq_i S_jk, built once,
    times one coefficient column per model (one matrix product; _features, _coefficients), which
    XLA runs faster on CPU for many models (measured at d = 5: 3.5 ms against 9.6 ms for the
    loss and gradient of 17 models at 5000 prompts; 0.9 ms against 1.7 ms for one model).
    """
    kq, v = _stacked_one_layer(params, "predict_from_stats")
    if len(params) > FEATURES_FROM and zq.ndim == 2:
        C = jnp.stack([_coefficients(p) for p in params], axis=1)  # (F, M)
        y = _features(zq, S) @ C
        return jnp.broadcast_to(jnp.expand_dims(norm_factor(n, normalization), -1), y.shape) * y
    u = jnp.einsum("...i,mhij->...mhj", zq, kq)
    Sv = jnp.einsum("...jk,mhk->...mhj", S, v)
    y = jnp.mean(jnp.sum(u * Sv, axis=-1), axis=-1)
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
    # Residual: the query's own label entry (zero in one layer) carries through.
    return zq[..., -1] + predict_from_stats(top, zq, S, n, normalization=normalization)


def outer_sum(Z: jax.Array) -> jax.Array:
    """S = sum_n z_n z_n^T of prompts (..., N, D), as a fused broadcast sum (faster on CPU than a
    batched dot of 7 x 21 blocks); the same numbers as linattn.data.prompt_stats up to rounding."""
    return jnp.sum(Z[..., :, :, None] * Z[..., :, None, :], axis=-3)


FEATURES_FROM = 3  # predict_many_from_stats switches to the feature form above this many models


def _features(zq: jax.Array, S: jax.Array) -> jax.Array:
    """(B, (D-1) * D(D+1)/2) features zq_i S_jk (i < D-1, j <= k): the query's label entry
    zq_{D-1} is zero (SPEC section 2), so its features are dropped."""
    iu = np.triu_indices(S.shape[-1])
    return (zq[:, :-1, None] * S[:, None, iu[0], iu[1]]).reshape(zq.shape[0], -1)


def _coefficients(params: Mapping) -> jax.Array:
    """c with _features(zq, S) @ c = (1/H) sum_h zq^T KQ_h S v_h for symmetric S (one layer)."""
    kq, v = effective_kq(params)[0], value_row(params)[0]
    t3 = jnp.mean(kq[:, :, :, None] * v[:, None, None, :], axis=0)  # (D, D, D): i, j, k
    t3 = t3 + jnp.swapaxes(t3, 1, 2)
    iu = np.triu_indices(t3.shape[-1])
    half = np.where(iu[0] == iu[1], 0.5, 1.0).astype(t3.dtype)
    return (t3[:-1, iu[0], iu[1]] * half[None, :]).reshape(-1)
