"""Exact population risk of one-layer linear attention (SPEC section 5).

Shape notation: d covariate dimension, D = d + 2 token width, H heads, n demonstrations,
Nt task nodes, Nx covariate nodes. Token z = (1, x, y); query z_q = (1, x_q, 0).

For one layer, y_hat = norm(n) * [sum_{j<=n} z_j^T W z_j + z_q^T W z_q], with
W(z_q) = (1/H) sum_h KQ_h^T z_q v_h^T = sum_i z_q[i] T_i,  T[i, a, b] = (1/H) sum_h KQ_h[i, a] v_h[b].
Given (theta, x_q) the demonstration tokens are i.i.d. z = e_0 + xi, xi ~ N(0, Cz(theta)),
Cz = blockdiag(0, C), C = [[Sig, Sig th], [th^T Sig, th^T Sig th + s2]]. Hence, with
A = tr(W M2) (M2 = E z z^T = Cz + e_0 e_0^T), B = z_q^T W z_q, t = theta . x_q,
V = 2 tr(Ws Cz Ws Cz) + 4 e_0^T Ws Cz Ws e_0 (Ws the symmetric part of W):

    E[y_hat | x_q, theta] = norm (n A + B),   Var[y_hat | x_q, theta] = norm^2 n V,
    risk(n) = norm^2 (n^2 E[A^2] + 2 n E[AB] + E[B^2]) - 2 norm (n E[At] + E[Bt]) + E[t^2]
              + norm^2 n E[V] + s2.

A, t are linear in z_q and V quadratic, so their x_q-expectations use only
Mq = E[z_q z_q^T] = blockdiag(1, Sig, 0). B is cubic in z_q and theta-free: E[B^2] (degree 6)
and E[z_q B] (degree 4) come from a Gaussian cubature exact to degree 7, done once. The
remaining theta-expectation is of a polynomial of degree <= 4 in theta: one node for a fixed
task, Stroud's degree-5 sphere rule for unit-sphere tasks, a degree-5 sparse grid for Gaussian
tasks. Everything is exact up to float64 rounding; derivation in theory/DERIVATIONS.md.
"""

from __future__ import annotations

import json
import sys
from typing import Mapping, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from linattn.cli import Parser, non_negative, number_list
from linattn.data import check_shots
from linattn.evaluate import TEST_TASKS
from linattn.model import check_normalization, norm_factor
from linattn.models import effective_tree
from linattn.objectives import ObjectiveConfig, check_task_source, evaluate_objective, task_spec
from linattn.params import check_params, effective_kq, load_params, value_row
from theory.cubature import smolyak_gauss, sphere_degree5

TASK_NAMES = ("sphere", "gaussian")
Task = Union[str, np.ndarray, jax.Array, Sequence[float]]


class RiskTerms(NamedTuple):
    """The seven expectations the risk is a polynomial in (see module docstring)."""

    EAA: jax.Array
    EAB: jax.Array
    EBB: jax.Array
    EAt: jax.Array
    EBt: jax.Array
    Ett: jax.Array
    EV: jax.Array


def _one_layer(params: Mapping):
    check_params(params)
    L = params["V"].shape[0]
    if L != 1:
        raise ValueError(f"the exact risk is for one-layer models; these parameters have {L} layers")
    kq = jnp.asarray(effective_kq(params)[0], jnp.float64)  # (H, D, D)
    v = jnp.asarray(value_row(params)[0], jnp.float64)  # (H, D)
    return kq, v


def task_rule(task: Task, d: int):
    """(thetas (Nt, d), weights (Nt,)) integrating exactly the task expectation.

    task: "sphere" (uniform on the unit sphere), "gaussian" (N(0, I_d / d)) or a fixed vector.
    """
    if isinstance(task, str):
        if task == "sphere":
            return sphere_degree5(d)
        if task == "gaussian":
            x, w = smolyak_gauss(d, 5)
            return x / np.sqrt(d), w
        raise ValueError(f"task {task!r} unknown; use one of {list(TASK_NAMES)} or a vector of length {d}")
    theta = jnp.asarray(task, jnp.float64)
    if theta.shape != (d,):
        raise ValueError(f"task vector has shape {theta.shape}; expected ({d},) for d = {d}")
    return theta[None, :], jnp.ones((1,), jnp.float64)


def _sigma(sigma, d: int):
    if sigma is None:
        return jnp.eye(d, dtype=jnp.float64)
    sig = jnp.asarray(sigma, jnp.float64)
    if sig.shape != (d, d):
        raise ValueError(f"covariate covariance has shape {sig.shape}; expected ({d}, {d})")
    return sig


# ---------------------------------------------------------------- the exact computation
def risk_terms(params: Mapping, task: Task = "sphere", noise=0.1, sigma=None) -> RiskTerms:
    """The expectations E[A^2], E[AB], E[B^2], E[At], E[Bt], E[t^2], E[V] (module docstring).

    Args:
      params: one-layer parameter tree (merged or separate, any heads), or a reparametrisation of
        one (linattn.models.effective_tree: LoRA), differentiable through it.
      task: "sphere", "gaussian" or a fixed task vector theta (d,).
      noise: label-noise variance sigma^2 (SPEC section 1: y = theta.x + eps, eps ~ N(0, sigma^2)).
      sigma: covariate covariance Sigma (d, d); None for the identity.
    """
    with jax.enable_x64(True):
        kq, v = _one_layer(effective_tree(params))
        H, D, _ = kq.shape
        d = D - 2
        sig = _sigma(sigma, d)
        s2 = jnp.asarray(noise, jnp.float64)
        T = jnp.einsum("hia,hb->iab", kq, v) / H  # W(z) = sum_i z_i T_i
        S = 0.5 * (T + jnp.swapaxes(T, 1, 2))

        # x_q-expectations of the cubic B, theta-free: exact degree-7 Gaussian cubature.
        gx, wx = smolyak_gauss(d, 7)
        chol = jnp.linalg.cholesky(sig)
        xs = jnp.asarray(gx) @ chol.T  # (Nx, d)
        ones = jnp.ones((xs.shape[0], 1))
        zq = jnp.concatenate([ones, xs, jnp.zeros_like(ones)], axis=1)  # (Nx, D)
        B = jnp.einsum("iab,ki,ka,kb->k", T, zq, zq, zq)
        wx = jnp.asarray(wx)
        EBB = jnp.sum(wx * B * B)
        bvec = jnp.einsum("k,ki,k->i", wx, zq, B)  # E[z_q B]

        Mq = jnp.zeros((D, D)).at[0, 0].set(1.0).at[1 : d + 1, 1 : d + 1].set(sig)

        thetas, wt = task_rule(task, d)
        thetas, wt = jnp.asarray(thetas, jnp.float64), jnp.asarray(wt, jnp.float64)

        def per_task(theta):
            st = sig @ theta
            Cz = jnp.zeros((D, D))
            Cz = Cz.at[1 : d + 1, 1 : d + 1].set(sig)
            Cz = Cz.at[1 : d + 1, D - 1].set(st).at[D - 1, 1 : d + 1].set(st)
            Cz = Cz.at[D - 1, D - 1].set(theta @ st + s2)
            M2 = Cz.at[0, 0].add(1.0)
            a = jnp.einsum("iab,ab->i", T, M2)  # A = a . z_q
            tau = jnp.zeros(D).at[1 : d + 1].set(theta)  # t = tau . z_q
            Y = jnp.einsum("iab,bc->iac", S, Cz)
            G1 = jnp.einsum("iab,jba->ij", Y, Y)
            u = S[:, :, 0]  # S_i e_0
            G2 = u @ Cz @ u.T
            EV = jnp.sum(Mq * (2.0 * G1 + 4.0 * G2))
            return jnp.stack([a @ Mq @ a, a @ bvec, a @ Mq @ tau, tau @ bvec, tau @ Mq @ tau, EV])

        per = jax.vmap(per_task)(thetas)  # (Nt, 6)
        EAA, EAB, EAt, EBt, Ett, EV = wt @ per
        return RiskTerms(EAA, EAB, EBB, EAt, EBt, Ett, EV)


def risk_from_terms(terms: RiskTerms, shots, noise=0.1, normalization: str = "tokens"):
    """Risk at each entry of `shots` (array) from the precomputed expectations."""
    with jax.enable_x64(True):
        n = jnp.asarray(shots, jnp.float64)
        c = norm_factor(n, normalization)
        t = terms
        return (
            c**2 * (n**2 * t.EAA + 2.0 * n * t.EAB + t.EBB)
            - 2.0 * c * (n * t.EAt + t.EBt)
            + t.Ett
            + c**2 * n * t.EV
            + jnp.asarray(noise, jnp.float64)
        )


def risk(params: Mapping, shots, task: Task = "sphere", noise=0.1, sigma=None, normalization: str = "tokens"):
    """Exact expected squared error E[(y_hat - y_q)^2] of the query prediction (SPEC section 5).

    Args:
      params: one-layer parameter tree (linattn.params), merged or separate, any number of heads.
      shots: number(s) of demonstrations n >= 0: an int (scalar result) or a 1-D sequence
        (result of shape (len(shots),)).
      task: "sphere" (theta uniform on the unit sphere, the pretraining tasks), "gaussian"
        (theta ~ N(0, I_d/d)), or a fixed task vector theta of shape (d,).
      noise: label-noise variance sigma^2.
      sigma: covariate covariance Sigma (d, d), default the identity.
      normalization: "tokens" (1/(n+1), default) or "shots" (1/n).

    Returns:
      float64 array; differentiable in params (and in a fixed task vector) with jax.grad.
      Take gradients inside `with jax.enable_x64(True):` (jax.grad traced outside it runs in
      float32); the forward value is float64 either way.
    """
    check_normalization(normalization)
    scalar = np.ndim(shots) == 0
    n = check_shots(shots)
    out = risk_from_terms(risk_terms(params, task, noise, sigma), n, noise, normalization)
    return out[0] if scalar else out


def _task_spec(task: str, theta0, random_task: Task):
    """What a task source (linattn.objectives.TASK_SOURCES) integrates over."""
    check_task_source(task)
    if task != "random" and theta0 is None:
        raise ValueError(f"this objective uses the task source {task!r}; pass theta0")
    return task_spec(task, None if theta0 is None else jnp.asarray(theta0, jnp.float64), random_task)


def make_risk_fn(theta0, noise=0.1, sigma=None, normalization: str = "tokens", random_task: Task = "sphere"):
    """A `risk(params, shots, task)` for the objective registry (linattn.objectives).

    Task sources map to their fixed task (theta0, -theta0, ...) or to `random_task` (the unit sphere).
    """

    def risk_fn(params, shots, task):
        return risk(params, int(shots), _task_spec(task, theta0, random_task), noise, sigma, normalization)

    return risk_fn


def exact_source(key, params, requests, cfg, ctx) -> dict:
    """The engine's exact risk source (linattn.train, source="exact"); same signature as
    linattn.minibatch.monte_carlo: {(method, shots, task source): population risk}.

    The key is not read. The fine-tuning dataset is replaced by its population (theta0 itself);
    each (method, task source) computes its RiskTerms once for all shot counts.
    """
    sigma = None if ctx.cov_factor is None else ctx.cov_factor @ ctx.cov_factor.T
    wanted: dict = {}  # (task, tree shapes) -> methods: their terms are one vmapped computation
    for (shots, task), ms in requests.items():
        for m in ms:
            shapes = tuple(sorted((k, v.shape) for k, v in params[m].items()))
            wanted.setdefault((task, shapes), {})[m] = None
    terms = {}
    for (task, _), ms in wanted.items():
        ms = list(ms)
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *[params[m] for m in ms])
        spec = _task_spec(task, ctx.theta0, cfg.tasks)
        rows = jax.vmap(lambda p: jnp.stack(risk_terms(p, spec, cfg.noise, sigma)))(stacked)
        terms.update({(m, task): RiskTerms(*rows[i]) for i, m in enumerate(ms)})
    return {(m, shots, task): risk_from_terms(terms[(m, task)], shots, cfg.noise, cfg.normalization)
            for (shots, task), ms in requests.items() for m in ms}


_CURVES: dict = {}


def task_curves(params: Mapping, theta0, shots, noise=0.1, normalization: str = "tokens",
                tasks: Sequence[str] = tuple(TEST_TASKS)) -> np.ndarray:
    """Exact risk of R stacked one-layer trees (or reparametrisations: linattn.models.effective_tree)
    on test tasks (linattn.evaluate.TEST_TASKS names): float64 array (R, len(tasks), len(shots)).

    One compiled program per (noise, d, R rounded up to a power of two) computes the risk terms of
    all three test tasks; the requested ones are returned.
    """
    n = check_shots(shots)
    check_normalization(normalization)
    unknown = [t for t in tasks if t not in TEST_TASKS]
    if unknown:
        raise ValueError(f"test tasks {unknown} unknown; allowed: {list(TEST_TASKS)}")
    with jax.enable_x64(True):
        p = {k: np.asarray(v, np.float64) for k, v in params.items()}  # padded on the host: no op per shape
        V = jax.eval_shape(effective_tree, p)["V"]
        R, d = V.shape[0], V.shape[-1] - 2
        size = 1 << max(R - 1, 0).bit_length()
        p = {k: np.concatenate([v, np.repeat(v[:1], size - R, axis=0)]) for k, v in p.items()}
        sig = (float(noise), normalization)
        if sig not in _CURVES:
            def curves(p, theta0, n):
                def one(q):
                    terms = [risk_terms(q, _task_spec(s, theta0, "sphere"), noise) for s in TEST_TASKS.values()]
                    return jnp.stack([risk_from_terms(t, n, noise, normalization) for t in terms])

                return jax.vmap(one)(effective_tree(p))

            _CURVES[sig] = jax.jit(curves)
        th = jnp.zeros(d) if theta0 is None else jnp.asarray(theta0, jnp.float64)
        out = np.asarray(_CURVES[sig](p, th, jnp.asarray(n, jnp.float64)))[:R]
        return out[:, [list(TEST_TASKS).index(t) for t in tasks]]


def population_objective(
    name: str,
    params: Mapping,
    progress=0.0,
    cfg: ObjectiveConfig = ObjectiveConfig(),
    theta0=None,
    noise=0.1,
    sigma=None,
    normalization: str = "tokens",
):
    """A registered objective (linattn.objectives) evaluated with the exact population risk.

    "target" tasks are the fixed theta0, "random" tasks the unit sphere. Differentiable in params.
    """
    risk_fn = make_risk_fn(theta0, noise, sigma, normalization)
    with jax.enable_x64(True):
        return evaluate_objective(name, risk_fn, params, progress, cfg)


# ---------------------------------------------------------------- CLI
CLI_TASKS = {"random": "sphere", "sphere": "sphere", "gaussian": "gaussian"}  # --task name -> risk's task


def main(argv=None) -> int:
    """python -m theory.risk --params P.json --shots 0,1,5 [--task random|sphere|gaussian|fixed --theta=..]"""
    p = Parser(prog="python -m theory.risk", description="Exact population risk of a one-layer model; prints "
               'one JSON line {"shots": [...], "risk": [...]}.')
    p.add_argument("--params", required=True, help="linattn-params-v1 JSON file (python -m theory.optimal writes one)")
    p.add_argument("--shots", default="0,1,2,5,10,20,40", help="comma-separated shot counts n >= 0")
    p.add_argument("--noise", type=non_negative(float), default=0.1, help="label-noise variance sigma^2")
    p.add_argument("--task", default="random", choices=[*CLI_TASKS, "fixed"],
                   help="random (= sphere: unit-sphere tasks, the pretraining distribution, 'random' in the "
                        "objectives), gaussian (theta ~ N(0, I/d)), or fixed (give --theta)")
    p.add_argument("--theta", default=None, help="task vector for --task fixed, e.g. --theta=1,0,0")
    p.add_argument("--normalization", default=None, choices=["tokens", "shots"],
                   help="override the file's normalization (default: the file's)")
    args = p.parse_args(argv)
    with jax.enable_x64(True):
        try:
            shots = check_shots(number_list(args.shots, "--shots", int))
            if args.task == "fixed" and args.theta is None:
                raise ValueError("--task fixed needs --theta=t1,t2,... (the task vector)")
            if args.task != "fixed" and args.theta is not None:
                raise ValueError(f"--theta is only for --task fixed (got --task {args.task})")
            task = np.asarray(number_list(args.theta, "--theta")) if args.task == "fixed" else CLI_TASKS[args.task]
            params, norm = load_params(args.params, dtype=jnp.float64)
            if args.task == "fixed" and task.shape != (params["V"].shape[-1] - 2,):
                raise ValueError(f"--theta has {task.size} entries; the parameters in {args.params!r} need "
                                 f"d = {params['V'].shape[-1] - 2}")
            r = risk(params, shots, task, args.noise, None, args.normalization or norm)
        except ValueError as err:
            p.error(str(err))
    print(json.dumps({"shots": shots.tolist(), "risk": np.asarray(r, np.float64).tolist()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
