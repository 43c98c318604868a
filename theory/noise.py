"""Minibatch gradient noise, exact, and the jitter it leaves around a minimizer (issue #13; SPEC 3, 5).

Shape notation: P trainable coordinates (linattn.optim.trainable_vector order), K cubature nodes.

**Zero-shot gradient moments.** A zero-shot prompt on a fixed task theta is the query token
z_q = (1, x, 0), x ~ N(0, Sigma), with label y = theta.x + sigma e, e ~ N(0, 1). Its squared error
l = (y_hat(x) - y)^2 has y_hat cubic in x (linattn.model.predict_from_stats with S = z_q z_q^T), so
the per-prompt gradient g(x, e) = 2 (y_hat - y) d y_hat / d params is a polynomial of degree 6 in
(x, e), and E[g] and E[g g^T] are integrals of polynomials of degree <= 12 in d + 1 standard
normals: a Smolyak Gauss-Hermite rule of degree 12 (theory.cubature) gives them exactly. A minibatch
of B prompts drawn independently has gradient covariance C / B, C = E[g g^T] - E[g] E[g]^T. This
is the infinite-data model: a finite fine-tuning dataset adds its own (fixed) empirical bias.

**Stationary jitter.** Near a minimizer theta* where the risk is R* + delta^T H delta / 2 and the
minibatch gradient is H delta + xi, Cov(xi) = C / B, SGD with heavy-ball momentum as in optax.sgd
(m' = g + beta m, theta' = theta - lr m') is the linear system (delta, m)' = T (delta, m) + (-lr xi, xi).
Started at the minimizer, its covariance after K steps is sum_{k<K} T^k Q T^kT (sgd_jitter, by
doubling), and the stationary one solves the discrete Lyapunov equation S = T S T^T + Q. The
expected excess risk of the iterates is tr(H Sigma_delta) / 2 (jitter_excess), exact for a
quadratic risk (value-only methods) up to the noise's own dependence on delta, which is of relative
order lr / B. Gradient clipping is not modelled (it does not bind when the minibatch gradient's norm
stays below the clip). Directions in which H vanishes but the noise does not have no stationary law:
the iterates random-walk along the flat minimizer family, as for all-parameter fine-tuning.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from linattn.model import predict_from_stats
from linattn.optim import param_labels, trainable_vector
from theory.cubature import smolyak_gauss


class GradientMoments(NamedTuple):
    mean: np.ndarray  # (P,) E[g], the population gradient
    cov: np.ndarray  # (P, P) per-prompt gradient covariance C
    labels: dict  # the subset's leaf labels (trainable_vector order)


def zero_shot_gradient(params: Mapping, subset, theta, noise: float, normalization: str = "tokens"):
    """(g, vec, labels): g(vec, x (d,), e) the per-prompt zero-shot gradient over the subset's
    trainable coordinates at the flat vector `vec`, for one covariate draw x and a standard-normal
    noise draw e. Float64: call g inside jax.enable_x64(True)."""
    with jax.enable_x64(True):
        p64 = {k: jnp.asarray(v, jnp.float64) for k, v in params.items()}
        labels = param_labels(p64, subset)
        vec, unflatten = trainable_vector(p64, labels)
        theta = jnp.asarray(theta, jnp.float64)
        sd = jnp.sqrt(jnp.asarray(noise, jnp.float64))

        def loss(v, x, e):
            zq = jnp.concatenate([jnp.ones(1), x, jnp.zeros(1)])
            y_hat = predict_from_stats(unflatten(v), zq, jnp.outer(zq, zq), 0, normalization=normalization)
            return (y_hat - theta @ x - sd * e) ** 2

        return jax.grad(loss), vec, labels


def zero_shot_gradient_moments(params: Mapping, subset, theta, noise: float = 0.1, sigma=None,
                               normalization: str = "tokens") -> GradientMoments:
    """Exact mean and covariance of the per-prompt zero-shot gradient on task theta (module docstring)."""
    d = np.shape(theta)[0]
    with jax.enable_x64(True):
        g, vec, labels = zero_shot_gradient(params, subset, theta, noise, normalization)
        nodes, w = smolyak_gauss(d + 1, 12)
        chol = np.eye(d) if sigma is None else np.linalg.cholesky(np.asarray(sigma, np.float64))
        xs = jnp.asarray(nodes[:, :d] @ chol.T)
        es = jnp.asarray(nodes[:, d])
        G = jax.vmap(g, in_axes=(None, 0, 0))(vec, xs, es)  # (K, P)
        w = jnp.asarray(w)
        mean = w @ G
        second = jnp.einsum("k,ki,kj->ij", w, G, G)
        cov = second - jnp.outer(mean, mean)
        return GradientMoments(np.asarray(mean), np.asarray(0.5 * (cov + cov.T)), labels)


def _sgd_system(H, C, lr: float, momentum: float, batch: int):
    """(T, Q) of the linearized heavy-ball SGD on (delta, m): x' = T x + noise, Cov(noise) = Q."""
    P = H.shape[0]
    b, Cb = float(momentum), C / batch
    T = np.block([[np.eye(P) - lr * H, -lr * b * np.eye(P)], [H, b * np.eye(P)]])
    Q = np.block([[lr**2 * Cb, -lr * Cb], [-lr * Cb, Cb]])
    return T, Q


def sgd_jitter(H, C, lr: float, momentum: float, batch: int, steps: int | None = None, tol: float = 1e-10) -> np.ndarray:
    """Covariance (P, P) of delta = theta - theta* for SGD with heavy-ball momentum started at the
    minimizer (delta = 0, m = 0) of a quadratic risk with Hessian H, per-prompt gradient covariance
    C and minibatch size `batch` (module docstring).

    steps: the covariance after that many steps, sum_{k < steps} T^k Q T^kT (any H; along flat
    directions it grows with the steps); None: the stationary covariance (the limit), solved in the
    range of H; ValueError if the noise has a part outside it (no stationary law). ValueError too
    if the iteration is unstable at this lr.
    """
    H, C = np.asarray(H, np.float64), np.asarray(C, np.float64)
    H = 0.5 * (H + H.T)
    lam, U = np.linalg.eigh(H)
    scale = max(float(np.max(np.abs(lam))), 1e-300)
    if np.any(lam < -tol * scale):
        raise ValueError(f"H is not positive semi-definite (smallest eigenvalue {lam.min():.3g}): not a minimizer")
    if lr * lam.max() >= 2.0 * (1.0 + momentum):
        raise ValueError(f"SGD with lr {lr} and momentum {momentum} is unstable on this curvature "
                         f"(largest eigenvalue {lam.max():.4g}; needs lr * eigenvalue < 2 (1 + momentum))")
    P = H.shape[0]
    if steps is not None:
        T, Q = _sgd_system(H, C, lr, momentum, batch)
        A, S, m = np.eye(2 * P), np.zeros((2 * P, 2 * P)), 0  # A = T^m, S = sum_{k<m} T^k Q T^kT
        for bit in bin(int(steps))[2:]:
            S, A, m = S + A @ S @ A.T, A @ A, 2 * m
            if bit == "1":
                S, A, m = Q + T @ S @ T.T, T @ A, m + 1
        return 0.5 * (S[:P, :P] + S[:P, :P].T)
    keep = lam > tol * scale
    Ck = U.T @ C @ U
    flat = ~keep
    if np.any(flat) and np.max(np.abs(Ck[np.ix_(flat, flat)])) > tol * max(float(np.max(np.abs(Ck))), 1e-300):
        raise ValueError("the gradient noise has a component along flat directions of H (zero curvature): the "
                         "iterates random-walk there and have no stationary jitter (pass steps=)")
    r = int(keep.sum())
    T, Q = _sgd_system(np.diag(lam[keep]), Ck[np.ix_(keep, keep)], lr, momentum, batch)
    S = np.linalg.solve(np.eye(4 * r * r) - np.kron(T, T), Q.reshape(-1)).reshape(2 * r, 2 * r)
    Uk = U[:, keep]
    return Uk @ (0.5 * (S[:r, :r] + S[:r, :r].T)) @ Uk.T


def jitter_excess(H_task, cov_delta) -> float:
    """E[R(theta* + delta)] - R(theta*) = tr(H_task Sigma_delta) / 2 for a quadratic risk R with
    Hessian H_task, delta of mean zero and covariance cov_delta."""
    return 0.5 * float(np.trace(np.asarray(H_task) @ np.asarray(cov_delta)))
