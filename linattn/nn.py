"""A Flax (linen) module around linattn.model, for users who compose models.

Its variables are exactly the linattn parameter tree ({"KQ", "V"} or {"K", "Q", "V"}, each
(L, H, D, D)), so `module.apply({"params": tree}, Z)` equals `linattn.model.apply(tree, Z)` and
trained trees move freely between the module, the pure functions and the theory.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from linattn import model
from linattn.params import MERGED_KEYS, SEPARATE_KEYS


class LinearAttention(nn.Module):
    """L layers of H-head linear self-attention on (..., N, d+2) prompts (SPEC section 2)."""

    d: int
    layers: int = 1
    heads: int = 1
    merged: bool = True
    normalization: str = "tokens"
    init_std: float = 0.05  # reference initialization N(0, 0.05^2)
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        model.check_normalization(self.normalization)
        shape = (self.layers, self.heads, self.d + 2, self.d + 2)
        init = nn.initializers.normal(self.init_std)
        names = MERGED_KEYS if self.merged else SEPARATE_KEYS
        self.tree = {n: self.param(n, init, shape, self.dtype) for n in names}

    def __call__(self, Z: jax.Array, n=None) -> jax.Array:
        """Full output (..., N, d+2); the query prediction is out[..., -1, -1]."""
        return model.apply(self.tree, Z, normalization=self.normalization, n=n)

    def predict(self, Z: jax.Array, n=None) -> jax.Array:
        """Query prediction through the fast path (no N x N matrix)."""
        return model.predict(self.tree, Z, normalization=self.normalization, n=n)
