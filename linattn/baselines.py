"""Reference predictors with the models' call signature `predict(params, Z, *, normalization, n)`.

Shape notation: d covariate dimension, N = n + 1 tokens (query last).

Each is a "model" whose parameter tree names it, so linattn.evaluate curves it like a trained
model (linattn.models dispatches on the tree):
- {"ridge": lam}: ridge regression on the prompt's demonstrations, theta_hat = (X^T X + lam I)^-1 X^T y;
  lam = 0 is least squares (the minimum-norm solution when n < d). With lam = d sigma^2 it is the
  Bayes-optimal (posterior-mean) predictor for Gaussian tasks N(0, I/d), which have the unit
  sphere's second moments; the posterior mean under the uniform sphere prior itself has no closed form.
- {"zero": 0}: always predicts 0 (error 1 + sigma^2 on unit tasks).
Demonstration tokens past the true shot count n must be zero (linattn.evaluate pads so); zero
tokens add nothing to X^T X and X^T y, so passing n is not needed.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np


def ridge(lam: float) -> dict:
    """Tree of the ridge predictor (lam = 0: least squares)."""
    if not np.isfinite(lam) or lam < 0:
        raise ValueError(f"ridge lambda must be a finite number >= 0; got {lam}")
    return {"ridge": jnp.asarray(lam, jnp.float32)}


def zero() -> dict:
    """Tree of the zero predictor."""
    return {"zero": jnp.zeros((), jnp.float32)}


def predict_ridge(params: Mapping, Z: jax.Array, *, normalization: str = "tokens", n=None) -> jax.Array:
    """Ridge (or least-squares) prediction theta_hat . x_q for prompts Z (..., N, d+2)."""
    del normalization, n
    X, y, xq = Z[..., :-1, 1:-1], Z[..., :-1, -1], Z[..., -1, 1:-1]
    d = X.shape[-1]
    lam = jnp.asarray(params["ridge"], Z.dtype)
    eye = jnp.reshape(jnp.eye(d, dtype=Z.dtype), (1,) * (X.ndim - 2) + (d, d))
    A = jnp.einsum("...ni,...nj->...ij", X, X) + lam * eye
    b = jnp.einsum("...ni,...n->...i", X, y)
    # lam = 0: the pseudo-inverse gives the minimum-norm least-squares solution for any n
    solved = jnp.linalg.solve(A + (lam == 0) * eye, b[..., None])[..., 0]
    theta = jnp.where(lam > 0, solved, jnp.einsum("...ij,...j->...i", jnp.linalg.pinv(A, hermitian=True), b))
    return jnp.einsum("...i,...i->...", theta, xq)


def predict_zero(params: Mapping, Z: jax.Array, *, normalization: str = "tokens", n=None) -> jax.Array:
    del normalization, n
    return jnp.zeros(Z.shape[:-2], Z.dtype) + jnp.asarray(params["zero"], Z.dtype)
