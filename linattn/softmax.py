"""A small softmax-attention transformer in Flax, reading the linear model's prompts (issue #12).

Shape notation: L layers, H heads, W width, E = W / H head width, F MLP width, N tokens,
d covariate dimension, D = d + 2 token width.

Input: the prompts of SPEC section 1 unchanged, demonstration tokens z = (1, x, y) and the query
(1, x_q, 0) last. We use this layout rather than Garg et al.'s (2022) separate x and y tokens
so that the engine's samplers, its minibatches (common random numbers across models) and the
test prompts of linattn.evaluate serve the softmax model and the linear model alike, and the
prediction is read from the query row as in the linear model.

Architecture (pre-LayerNorm): h = Z embed; per layer h += MHA(LN(h)) with a causal mask (a token
sees itself and the tokens before it), then h += MLP(LN(h)) (GELU); the prediction is
readout . LN(h_query) + readout_bias. The last layer is computed for the query row only (the
only row the prediction reads). Called with the true shot count n, demonstrations at positions
>= n are masked out, so a prompt zero-padded past n (linattn.evaluate) is read exactly.

The parameters are a flat dict of per-layer stacked arrays, like the linear tree, so that
linattn.optim freezes them by leaf name (subsets in SUBSETS) and the engine updates them leaf by
leaf; `SoftmaxTransformer.init` returns exactly this tree under "params".
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

FORMAT = "linattn-softmax-v1"

# leaf -> shape as a function of (L, H, W, E, F, D)
SHAPES = {
    "embed": lambda L, H, W, E, F, D: (D, W),
    "Q": lambda L, H, W, E, F, D: (L, H, W, E),
    "K": lambda L, H, W, E, F, D: (L, H, W, E),
    "V": lambda L, H, W, E, F, D: (L, H, W, E),
    "O": lambda L, H, W, E, F, D: (L, H, E, W),
    "ln1_scale": lambda L, H, W, E, F, D: (L, W),
    "ln1_bias": lambda L, H, W, E, F, D: (L, W),
    "ln2_scale": lambda L, H, W, E, F, D: (L, W),
    "ln2_bias": lambda L, H, W, E, F, D: (L, W),
    "mlp_in": lambda L, H, W, E, F, D: (L, W, F),
    "mlp_in_bias": lambda L, H, W, E, F, D: (L, F),
    "mlp_out": lambda L, H, W, E, F, D: (L, F, W),
    "mlp_out_bias": lambda L, H, W, E, F, D: (L, W),
    "ln_out_scale": lambda L, H, W, E, F, D: (W,),
    "ln_out_bias": lambda L, H, W, E, F, D: (W,),
    "readout": lambda L, H, W, E, F, D: (W,),
    "readout_bias": lambda L, H, W, E, F, D: (),
}

# trainable subsets by leaf name (linattn.optim): "v" is the value-output (OV) circuit, the
# counterpart of the linear model's value matrix, which maps tokens to the output in one matrix
SUBSETS: dict[str, tuple[str, ...]] = {
    "all": tuple(SHAPES),
    "v": ("V", "O"),
    "kq": ("Q", "K"),
    "readout": ("readout", "readout_bias"),
}


def _lead(v, like):
    """v with leading unit axes up to like's rank (explicit broadcasting)."""
    return jnp.reshape(v, (1,) * (like.ndim - v.ndim) + v.shape)


def _layer_norm(h, scale, bias, eps: float = 1e-6):
    mu = jnp.mean(h, axis=-1, keepdims=True)
    var = jnp.mean((h - mu) ** 2, axis=-1, keepdims=True)
    return (h - mu) * jax.lax.rsqrt(var + eps) * _lead(scale, h) + _lead(bias, h)


def _attend(q, k, v, mask):
    """Softmax attention of queries q (..., H, Nq, E) over keys/values (..., H, N, E); mask (Nq, N)."""
    s = jnp.einsum("...hqe,...hke->...hqk", q, k) / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))
    s = jnp.where(mask, s, jnp.finfo(s.dtype).min)
    return jnp.einsum("...hqk,...hke->...hqe", jax.nn.softmax(s, axis=-1), v)


class SoftmaxTransformer(nn.Module):
    """L layers of H-head causal softmax attention and an MLP on (..., N, d+2) prompts."""

    d: int
    layers: int = 2
    heads: int = 4
    width: int = 64
    mlp: int = 128
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, Z: jax.Array, n=None) -> jax.Array:
        """Query predictions (...,) of prompts Z (..., N, d+2); n: true shot count (masks the rest)."""
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be a multiple of heads {self.heads}")
        L, H, W, F, D = self.layers, self.heads, self.width, self.mlp, self.d + 2
        E = W // H
        shapes = {k: f(L, H, W, E, F, D) for k, f in SHAPES.items()}
        fan_in = {"embed": D, "Q": W, "K": W, "V": W, "O": W, "mlp_in": W, "mlp_out": F, "readout": W}
        depth = 1.0 / np.sqrt(2 * L)  # residual branches start small
        p = {}
        for k, shape in shapes.items():
            if k.endswith("_scale"):
                init = nn.initializers.ones
            elif k in fan_in:
                std = fan_in[k] ** -0.5 * (depth if k in ("O", "mlp_out") else 1.0)
                init = nn.initializers.normal(std)
            else:
                init = nn.initializers.zeros
            p[k] = self.param(k, init, shape, self.dtype)
        if Z.shape[-1] != D:
            raise ValueError(f"prompt token width {Z.shape[-1]} but the model has d = {self.d} (width {D})")
        N = Z.shape[-2]
        pos = jnp.arange(N)
        mask = pos[:, None] >= pos[None, :]
        if n is not None:
            mask = mask & ((pos < n) | (pos == N - 1))[None, :]
        h = Z.astype(self.dtype) @ p["embed"]
        for layer in range(L):
            last = layer == L - 1
            a = _layer_norm(h, p["ln1_scale"][layer], p["ln1_bias"][layer])
            k = jnp.einsum("...nw,hwe->...hne", a, p["K"][layer])
            v = jnp.einsum("...nw,hwe->...hne", a, p["V"][layer])
            rows = a[..., -1:, :] if last else a
            q = jnp.einsum("...nw,hwe->...hne", rows, p["Q"][layer])
            o = _attend(q, k, v, mask[-1:] if last else mask)
            h = (h[..., -1:, :] if last else h) + jnp.einsum("...hne,hew->...nw", o, p["O"][layer])
            a = _layer_norm(h, p["ln2_scale"][layer], p["ln2_bias"][layer])
            f = a @ p["mlp_in"][layer]
            f = jax.nn.gelu(f + _lead(p["mlp_in_bias"][layer], f))
            h = h + f @ p["mlp_out"][layer] + _lead(p["mlp_out_bias"][layer], h)
        out = _layer_norm(h[..., -1, :], p["ln_out_scale"], p["ln_out_bias"])
        return out @ p["readout"] + p["readout_bias"]


def dims(params: Mapping) -> dict:
    """The module's fields (d, layers, heads, width, mlp) read from a parameter tree's shapes."""
    L, H, W, _ = np.shape(params["Q"])
    return dict(d=int(np.shape(params["embed"])[0]) - 2, layers=int(L), heads=int(H), width=int(W),
                mlp=int(np.shape(params["mlp_in"])[-1]))


def check_params(params: Mapping, d: Optional[int] = None) -> None:
    """Raise ValueError naming the first missing, extra or misshapen leaf."""
    keys = set(params)
    if keys != set(SHAPES):
        raise ValueError(f"softmax parameter tree: missing leaves {sorted(set(SHAPES) - keys)}, "
                         f"unknown leaves {sorted(keys - set(SHAPES))}; expected {list(SHAPES)}")
    for k in ("embed", "Q", "mlp_in"):
        want = 2 if k == "embed" else 4 if k == "Q" else 3
        if np.ndim(params[k]) != want:
            raise ValueError(f"softmax parameter {k!r} has shape {np.shape(params[k])}; expected {want} axes")
    f = dims(params)
    L, H, W, F, D = f["layers"], f["heads"], f["width"], f["mlp"], f["d"] + 2
    for k, shape in SHAPES.items():
        want = shape(L, H, W, W // H, F, D)
        if tuple(np.shape(params[k])) != want:
            raise ValueError(f"softmax parameter {k!r} has shape {tuple(np.shape(params[k]))}; expected {want} "
                             f"for layers={L}, heads={H}, width={W}, mlp={F}, d={D - 2}")
    if d is not None and f["d"] != d:
        raise ValueError(f"softmax parameters have d = {f['d']} (token width {D}) but the data has d = {d}")


def init_params(key, d: int, layers: int = 2, heads: int = 4, width: int = 64, mlp: int = 128,
                dtype=jnp.float32) -> dict:
    """A fresh parameter tree (plain dict of arrays)."""
    for name, v in (("d", d), ("layers", layers), ("heads", heads), ("width", width), ("mlp", mlp)):
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1; got {v}")
    if width % heads:
        raise ValueError(f"width {width} must be a multiple of heads {heads}")
    module = SoftmaxTransformer(d, layers, heads, width, mlp, dtype)
    return dict(module.init(key, jnp.zeros((1, d + 2), dtype))["params"])


def predict(params: Mapping, Z: jax.Array, *, normalization: str = "tokens", n=None) -> jax.Array:
    """Query predictions (...,) for prompts Z (..., N, d+2): the call signature of linattn.model.predict.

    `normalization` is accepted for that signature and has no effect (softmax weights sum to one).
    """
    del normalization
    module = SoftmaxTransformer(**dims(params), dtype=jnp.asarray(params["embed"]).dtype)
    return module.apply({"params": dict(params)}, Z, n=n)


def save_params(path, params: Mapping) -> None:
    """Write a parameter tree as msgpack (flax.serialization): {"format", "params"}."""
    check_params(params)
    blob = serialization.msgpack_serialize({"format": FORMAT, "params": {k: np.asarray(v) for k, v in params.items()}})
    Path(path).write_bytes(blob)


def load_params(path) -> dict:
    """Read a file written by save_params; checks the format tag and the tree."""
    try:
        state = serialization.msgpack_restore(Path(path).read_bytes())
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: not a {FORMAT} msgpack file ({e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: format {got!r}; expected {FORMAT!r}")
    check_params(state["params"])
    return {k: jnp.asarray(state["params"][k]) for k in SHAPES}  # msgpack sorts keys: the tree's own order
