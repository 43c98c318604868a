"""Theory of two anti-forgetting methods (issue 10; SPEC sections 3, 5 and 7).

Shape notation: P parameters of a flattened tree (linattn.params.flatten), S seeds, A
interpolation weights, T test tasks, N shot counts.

- EWC (objective "ewc" in linattn.objectives): ZS + (lambda/2) (theta - theta_pre)^T F
  (theta - theta_pre), with F the curvature of the pretraining population risk at each seed's own
  pretrained weights. F here is the exact Hessian (jax.hessian of theory.risk.risk with m shots on
  unit-sphere tasks, float64, in the flattened parameter vector), not a sampled Fisher matrix, made
  positive semi-definite by dropping negative eigenvalues (`psd_part`; at trained weights a little
  off the optimum the Hessian can have small negative ones). `ewc_config` puts F and the reference
  weights into a run's ObjectiveConfig (per-run data, traced and vmapped by the engine), so the same
  Run trains with Monte Carlo (linattn.train.train_plan) and predicts with the exact source
  (theory.solver.flow_plan).
- WiSE-FT: theta(alpha) = (1 - alpha) theta_pre + alpha theta_ft (linattn.params.interpolate);
  `wise_ft_curves` is the exact risk along that segment.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from linattn.evaluate import TEST_TASKS
from linattn.objectives import ObjectiveConfig
from linattn.params import check_params, interpolation_path
from theory.risk import risk, task_curves


@functools.lru_cache(maxsize=None)
def _hessian_program(m: int, noise: float, normalization: str, task, sigma):
    """jit(vmap(Hessian)) of the exact m-shot risk in the flattened tree (cached per setting;
    `task` a name or a tuple of floats, `sigma` None or a tuple of rows)."""
    task_arg = task if isinstance(task, str) else np.asarray(task, np.float64)
    sig = None if sigma is None else np.asarray(sigma, np.float64)

    def one(tree):
        x, unravel = ravel_pytree(tree)
        return jax.hessian(lambda v: risk(unravel(v), m, task_arg, noise, sig, normalization))(x)

    return jax.jit(jax.vmap(one))


def pretraining_hessian(params: Mapping, m: int = 20, noise: float = 0.1, *, sigma=None,
                        normalization: str = "tokens", task="sphere") -> np.ndarray:
    """Exact Hessian of the pretraining risk (theory.risk.risk, m shots, unit-sphere tasks by default)
    at `params`, in linattn.params.flatten coordinates, float64.

    params: one one-layer tree (result (P, P)), or trees stacked on a leading seed axis (leaves
    (S, 1, H, D, D), result (S, P, P)), one compiled program for all seeds.
    """
    many = np.ndim(params["V"]) == 5
    check_params({k: v[0] for k, v in params.items()} if many else params)
    task_key = task if isinstance(task, str) else tuple(np.asarray(task, np.float64).tolist())
    sigma_key = None if sigma is None else tuple(map(tuple, np.asarray(sigma, np.float64).tolist()))
    program = _hessian_program(int(m), float(noise), normalization, task_key, sigma_key)
    with jax.enable_x64(True):
        p = {k: jnp.asarray(np.asarray(v), jnp.float64) for k, v in params.items()}
        H = np.asarray(program(p if many else {k: v[None] for k, v in p.items()}))
    return H if many else H[0]


def psd_part(H) -> np.ndarray:
    """The positive semi-definite part of symmetric matrices (..., P, P): the symmetrized matrix
    with its negative eigenvalues set to 0 (a curvature for EWC must not push away from theta_pre)."""
    H = np.asarray(H, np.float64)
    sym = 0.5 * (H + np.swapaxes(H, -1, -2))
    lam, U = np.linalg.eigh(sym)
    return np.einsum("...ij,...j,...kj->...ik", U, np.maximum(lam, 0.0), U)


def ewc_curvature(params: Mapping, m: int = 20, noise: float = 0.1, *, psd: bool = True, **kwargs) -> np.ndarray:
    """F of EWC at pretrained `params` (one tree or stacked seeds): the exact pretraining Hessian
    (`pretraining_hessian`, same keyword arguments), its PSD part when psd=True."""
    H = pretraining_hessian(params, m, noise, **kwargs)
    return psd_part(H) if psd else H


def ewc_config(obj: ObjectiveConfig, pretrained: Mapping, lam, curvature=None, *, noise: float = 0.1,
               **kwargs) -> ObjectiveConfig:
    """`obj` with the per-run data of objective "ewc": aux_weight = lambda, ref_params = the seed's
    pretrained weights, curvature = F at them (computed with ewc_curvature(pretrained, obj.m, noise,
    **kwargs) unless given; pass the seed's slice of a stacked ewc_curvature to share one program)."""
    lam_arr = np.asarray(lam, np.float64)
    if lam_arr.ndim or not (np.isfinite(lam_arr) and lam_arr >= 0):
        raise ValueError(f"EWC strength lambda must be one finite number >= 0; got {lam!r}")
    F = ewc_curvature(pretrained, obj.m, noise, **kwargs) if curvature is None else np.asarray(curvature)
    P = sum(int(np.size(v)) for v in pretrained.values())
    if F.shape != (P, P):
        raise ValueError(f"curvature has shape {F.shape}; expected ({P}, {P}) for the {P} parameters of the tree")
    return dataclasses.replace(obj, aux_weight=lam, ref_params=dict(pretrained), curvature=F)


def wise_ft_curves(pre: Mapping, ft: Mapping, alphas: Sequence[float], theta0, shots, noise: float = 0.1,
                   normalization: str = "tokens", tasks: Sequence[str] = tuple(TEST_TASKS)) -> np.ndarray:
    """Exact risk (theory.risk.task_curves) of the WiSE-FT weights (1 - alpha) pre + alpha ft at every
    alpha: float64 (A, T, N). For the theory curve pass the gradient-flow end point as `ft`."""
    with jax.enable_x64(True):  # interpolate in float64
        f64 = lambda t: {k: jnp.asarray(np.asarray(v), jnp.float64) for k, v in t.items()}  # noqa: E731
        path = {k: np.asarray(v) for k, v in interpolation_path(f64(pre), f64(ft), alphas).items()}
    return task_curves(path, theta0, shots, noise, normalization, tasks)
