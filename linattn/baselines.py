"""Reference predictors with the models' call signature `predict(params, Z, *, normalization, n)`.

Shape notation: d covariate dimension, N = n + 1 tokens (query last).

Each is a "model" whose parameter tree names it, so linattn.evaluate curves it like a trained
model (linattn.models dispatches on the tree):
- {"ridge": lam}: ridge regression on the prompt's demonstrations, theta_hat = (X^T X + lam I)^-1 X^T y;
  lam = 0 is least squares (the minimum-norm solution when n < d). With lam = d sigma^2 it is the
  Bayes-optimal (posterior-mean) predictor for Gaussian tasks N(0, I/d), which have the unit
  sphere's second moments.
- {"sphere_noise": sigma^2, "sphere_draws": (K, d)}: the Bayes-optimal predictor for uniform
  unit-sphere tasks, theta_hat = E[theta | prompt], whose posterior (a Fisher-Bingham law,
  density ~ exp((2 b.u - u^T A u) / (2 sigma^2)) on the sphere) has no closed-form mean: it is
  computed by self-normalized importance sampling with K fixed standard normal draws, pushed
  through the ridge posterior N(mu, Sigma) (lambda = d sigma^2) and projected onto the sphere,
  whose density there is exact (a one-dimensional Gaussian moment; sphere_proposal_logpdf).
  The same draws serve every prompt (common random numbers); `bayes_sphere_stats` gives the
  effective sample size and the importance-sampling standard error.
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


def bayes_sphere(key, d: int, noise: float, draws: int = 1024) -> dict:
    """Tree of the unit-sphere Bayes predictor with `draws` fixed normals from `key`."""
    if not np.isfinite(noise) or noise <= 0:
        raise ValueError(f"sphere Bayes predictor needs a noise variance > 0; got {noise}")
    if int(draws) < 2 or int(d) < 1:
        raise ValueError(f"need d >= 1 and draws >= 2; got d = {d}, draws = {draws}")
    return {"sphere_noise": jnp.asarray(noise, jnp.float32),
            "sphere_draws": jax.random.normal(key, (int(draws), int(d)), jnp.float32)}


def zero() -> dict:
    """Tree of the zero predictor."""
    return {"zero": jnp.zeros((), jnp.float32)}


def _stats(Z):
    """(A = X^T X, b = X^T y, x_q, identity broadcast like A) of prompts Z (..., N, d+2)."""
    X, y, xq = Z[..., :-1, 1:-1], Z[..., :-1, -1], Z[..., -1, 1:-1]
    d = X.shape[-1]
    eye = jnp.reshape(jnp.eye(d, dtype=Z.dtype), (1,) * (X.ndim - 2) + (d, d))
    return jnp.einsum("...ni,...nj->...ij", X, X), jnp.einsum("...ni,...n->...i", X, y), xq, eye


def predict_ridge(params: Mapping, Z: jax.Array, *, normalization: str = "tokens", n=None) -> jax.Array:
    """Ridge (or least-squares) prediction theta_hat . x_q for prompts Z (..., N, d+2)."""
    del normalization, n
    A, b, xq, eye = _stats(Z)
    lam = jnp.asarray(params["ridge"], Z.dtype)
    A = A + lam * eye
    # lam = 0: the pseudo-inverse gives the minimum-norm least-squares solution for any n
    solved = jnp.linalg.solve(A + (lam == 0) * eye, b[..., None])[..., 0]
    theta = jnp.where(lam > 0, solved, jnp.einsum("...ij,...j->...i", jnp.linalg.pinv(A, hermitian=True), b))
    return jnp.einsum("...i,...i->...", theta, xq)


def sphere_proposal_logpdf(u, mu, P):
    """log density on the unit sphere (surface measure), up to a constant in u, of g / |g| for
    g ~ N(mu, P^-1): log int_0^inf r^(d-1) exp(-(r u - mu)^T P (r u - mu) / 2) dr, through the
    moments M_k = E[R^k; R > 0] of R ~ N(beta / a, 1 / a) (M_k = m M_(k-1) + (k-1) s^2 M_(k-2)).
    u: (..., K, d); mu: (..., d); P: (..., d, d)."""
    d = u.shape[-1]
    a = jnp.einsum("...ki,...ij,...kj->...k", u, P, u)
    beta = jnp.einsum("...ki,...ij,...j->...k", u, P, mu)
    m, s = beta / a, jax.lax.rsqrt(a)
    z = m / s
    prev, cur = jax.scipy.stats.norm.cdf(z), m * jax.scipy.stats.norm.cdf(z) + s * jax.scipy.stats.norm.pdf(z)
    for k in range(2, d):
        prev, cur = cur, m * cur + (k - 1) * s**2 * prev
    moment = prev if d == 1 else cur
    tiny = jnp.finfo(u.dtype).tiny
    return beta**2 / (2 * a) - 0.5 * jnp.log(a) + jnp.log(jnp.maximum(moment, tiny))


def bayes_sphere_stats(params: Mapping, Z: jax.Array):
    """(theta_hat (..., d), effective sample size (...), importance-sampling SE of theta_hat (..., d))
    of the unit-sphere posterior mean for prompts Z (..., N, d+2)."""
    A, b, _, eye = _stats(Z)
    noise = jnp.asarray(params["sphere_noise"], Z.dtype)
    d = A.shape[-1]
    P = (A + d * noise * eye) / noise  # ridge posterior precision (prior N(0, I/d))
    mu = jnp.linalg.solve(A + d * noise * eye, b[..., None])[..., 0]
    L = jnp.linalg.cholesky(jnp.linalg.inv(P))
    g = mu[..., None, :] + jnp.einsum("...ij,kj->...ki", L, jnp.asarray(params["sphere_draws"], Z.dtype))
    u = g / jnp.linalg.norm(g, axis=-1, keepdims=True)
    log_target = (2 * jnp.einsum("...ki,...i->...k", u, b) - jnp.einsum("...ki,...ij,...kj->...k", u, A, u)) / (2 * noise)
    w = jax.nn.softmax(log_target - sphere_proposal_logpdf(u, mu, P), axis=-1)
    theta = jnp.einsum("...k,...ki->...i", w, u)
    ess = 1.0 / jnp.sum(w**2, axis=-1)
    se = jnp.sqrt(jnp.einsum("...k,...ki->...i", w**2, (u - theta[..., None, :]) ** 2))
    return theta, ess, se


def predict_bayes_sphere(params: Mapping, Z: jax.Array, *, normalization: str = "tokens", n=None) -> jax.Array:
    """The unit-sphere posterior-mean prediction theta_hat . x_q for prompts Z (..., N, d+2)."""
    del normalization, n
    theta, _, _ = bayes_sphere_stats(params, Z)
    return jnp.einsum("...i,...i->...", theta, Z[..., -1, 1:-1])


def predict_zero(params: Mapping, Z: jax.Array, *, normalization: str = "tokens", n=None) -> jax.Array:
    del normalization, n
    return jnp.zeros(Z.shape[:-2], Z.dtype) + jnp.asarray(params["zero"], Z.dtype)
