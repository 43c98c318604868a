"""Closed-form optima of the exact population objectives (SPEC section 4).

Shape notation: d covariates, D = d + 2, merged one-layer one-head trees (1, 1, D, D) in float64.
Write Gamma for the x-by-x block of KQ, k00 = KQ[0, 0], v = (v0, b, w) for the label row of V.
Derivations step by step in theory/DERIVATIONS.md; tests in tests/test_theory_optimal.py.

- `pretrain_c(d, m, noise, normalization)` and `pretrain_optimum(...)`: Gamma = g I, v = w e_y,
  g w = c = (m+1)/(m+1+d+d s2) ("tokens") or m/(m+1+d+d s2) ("shots"); the same for unit-sphere
  and N(0, I/d) tasks (both have E|theta|^2 = 1 and the risk of this family depends on theta only
  through |theta|^2).
- `zs_all_member(pretrained, theta0, k00)`: a member of the zero-shot minimizer branch reached from
  the pretraining optimum: symmetric part of Gamma = 0, KQ[0, x] = KQ[x, 0] = 0, v0 = 0,
  KQ[0, 0] = k00, b = theta0 / k00 (everything else as pretrained). ZS risk = noise floor.
- `zs_v_closed_form(d, g, w, theta0)`: value-only ZS from Gamma = g I: b = theta0/((d+4) g), w kept.
- `w_star(d, n, noise, normalization, beta)`: minimizer over g*w of the n-shot error on theta0 at
  g b = beta theta0; with beta = 1/(d+4) it is SPEC's w*(n) (the lam -> 0+ limit of the value-only
  ZS + lam FS minimizer).
- `newton_subset(objective, params, subset)`: exact minimizer (least change) of an objective that is
  quadratic in the trainable leaf: the risk is quadratic in V, in KQ, in K and in Q separately, so
  one pseudo-inverse Newton step solves value-only, KQ-only, K-only and Q-only problems exactly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from linattn.cli import Parser, non_negative, number_list
from linattn.model import check_normalization
from linattn.objectives import ObjectiveConfig
from linattn.optim import param_labels, trainable_vector
from linattn.params import check_params, icl_params, is_merged, to_merged
from theory.risk import population_objective
from theory.solver import newton_step

METHODS = ("pretrain", "zs_all", "zs_v", "zsfs_v", "zs_kq", "zsfs_kq")


def _unit(theta0, d):
    th = np.asarray(theta0, np.float64)
    if th.shape != (d,):
        raise ValueError(f"theta0 has shape {th.shape}; expected ({d},)")
    return th


# ---------------------------------------------------------------- pretraining
def pretrain_c(d: int, m: int, noise: float = 0.1, normalization: str = "tokens") -> float:
    """Product c = g*w of the pretraining optimum (SPEC section 4).

    For Gamma = g I, v = w e_y the prediction is c * norm(m) * sum_j (x_q . x_j) y_j and
    risk(c) = E|th|^2 (1 - 2 c a + c^2 q) + s2 with a = m norm(m), q = m norm(m)^2 (m+1+d+d s2),
    so c = a / q = 1 / (norm(m) (m+1+d+d s2)).
    """
    check_normalization(normalization)
    if m < 1:
        raise ValueError(f"the pretraining optimum needs m >= 1 demonstrations (at m = 0 every c is optimal); got {m}")
    if noise < 0:
        raise ValueError(f"noise is a variance and must be >= 0; got {noise}")
    inv_norm = (m + 1) if normalization == "tokens" else m
    return inv_norm / (m + 1 + d + d * noise)


def pretrain_optimum(d: int, m: int = 20, noise: float = 0.1, normalization: str = "tokens",
                     task: str = "sphere", g: float = 1.0) -> dict:
    """The pretraining optimum as a merged float64 tree: Gamma = g I, v = (c/g) e_y.

    The scale g is free (KQ -> KQ/s, v -> s v leaves predictions unchanged).
    """
    if task not in ("sphere", "gaussian"):
        raise ValueError(f"pretraining tasks must be 'sphere' or 'gaussian'; got {task!r}")
    c = pretrain_c(d, m, noise, normalization)
    with jax.enable_x64(True):
        return icl_params(d, g, c / g, dtype=jnp.float64)


# ---------------------------------------------------------------- zero-shot, all parameters
def zs_all_member(pretrained: Mapping, theta0, k00: float) -> dict:
    """The member KQ[0,0] = k00, v_x = theta0/k00 of the ZS-minimizer branch reached from `pretrained`.

    Zero-shot prediction (norm(0) = 1): (k00 + p.x + x^T Gamma_s x)(v0 + b.x) with p = KQ[0,x]+KQ[x,0].
    It equals theta0.x for all x iff Gamma_s = 0 and either (p = 0, v0 = 0, k00 b = theta0) -- this
    branch -- or (b = 0, k00 = 0, v0 p = theta0). Parameters the ZS loss does not see (the label row
    and column of KQ, the antisymmetric part of Gamma, w = v_y, other rows of V) are kept.
    """
    if k00 == 0:
        raise ValueError("k00 must be nonzero on this branch (b = theta0 / k00)")
    with jax.enable_x64(True):
        p = {k: jnp.asarray(v, jnp.float64) for k, v in to_merged(pretrained).items()}
        check_params(p)
        if p["V"].shape[:2] != (1, 1):
            raise ValueError("zs_all_member is for one-layer, one-head models")
        D = p["V"].shape[-1]
        d = D - 2
        th = jnp.asarray(_unit(theta0, d))
        kq = p["KQ"][0, 0]
        gam = kq[1 : d + 1, 1 : d + 1]
        kq = kq.at[1 : d + 1, 1 : d + 1].set(0.5 * (gam - gam.T))
        kq = kq.at[0, 1 : d + 1].set(0.0).at[1 : d + 1, 0].set(0.0).at[0, 0].set(k00)
        V = p["V"][0, 0].at[-1, 0].set(0.0).at[-1, 1 : d + 1].set(th / k00)
        return {"KQ": kq[None, None], "V": V[None, None]}


# ---------------------------------------------------------------- value-only
def zs_v_closed_form(d: int, g: float, w: float, theta0) -> dict:
    """Value-only ZS minimizer from Gamma = g I: v0 = 0, b = theta0/((d+4) g), w unchanged.

    ZS risk = E[(g|x|^2 (v0 + b.x) - theta0.x)^2] + s2; with E[|x|^4 x x^T] = (d+2)(d+4) I and
    E[|x|^2 x x^T] = (d+2) I the normal equations give b = theta0 / ((d+4) g), and the minimum is
    s2 + 1 - (d+2)/(d+4) for a unit theta0.
    """
    th = _unit(theta0, d)
    with jax.enable_x64(True):
        p = icl_params(d, g, w, dtype=jnp.float64)
        p["V"] = p["V"].at[0, 0, -1, 1 : d + 1].set(jnp.asarray(th) / ((d + 4) * g))
        return p


def w_star(d: int, n: int, noise: float = 0.1, normalization: str = "tokens", beta: float | None = None) -> float:
    """argmin over omega = g*w of the n-shot risk on a unit theta0 with g*b = beta*theta0, Gamma = g I.

    n-shot risk R(beta, omega) (DERIVATIONS.md section 4) is quadratic; dR/domega = 0 gives
        omega = [1/norm(n) - beta (n + 2d + 3)] / (n + 1 + d + d s2).
    beta defaults to 1/(d+4), the value-only ZS solution: SPEC's w*(n), 0.6541 for d=5, n=20, s2=0.1.
    """
    check_normalization(normalization)
    if n < 1:
        raise ValueError(f"w* needs n >= 1 demonstrations (the zero-shot error does not depend on w); got {n}")
    beta = 1.0 / (d + 4) if beta is None else beta
    inv_norm = (n + 1) if normalization == "tokens" else n
    return (inv_norm - beta * (n + 2 * d + 3)) / (n + 1 + d + d * noise)


def zsfs_v_limit(d: int, g: float, theta0, n_ft: int = 20, noise: float = 0.1, normalization: str = "tokens") -> dict:
    """Value-only ZS + lam*FS minimizer in the limit lam -> 0+: b = theta0/((d+4)g), w = w*(n_ft)/g.

    ZS does not see w, so as lam -> 0 b goes to the ZS solution while w minimizes the FS term
    at that b. At fixed lam > 0 the FS term also shifts b: use newton_subset for the exact point.
    """
    return zs_v_closed_form(d, g, w_star(d, n_ft, noise, normalization) / g, theta0)


# ---------------------------------------------------------------- exact solve of quadratic subproblems
def newton_subset(objective: Callable[[Mapping], jax.Array], params: Mapping, subset, rcond: float = 1e-10,
                  steps: int = 1):
    """Minimizer of `objective` over the trainable leaves nearest to `params` (pseudo-inverse Newton).

    Exact in one step when the objective is quadratic in those leaves (any single leaf of the
    one-layer risk: V, KQ, K or Q); returns (params, gradient norm at the result).
    """
    labels = param_labels(params, subset)
    with jax.enable_x64(True):
        params = {k: jnp.asarray(v, jnp.float64) for k, v in params.items()}
        x, unflat = trainable_vector(params, labels)
        f = lambda vec: objective(unflat(vec))
        for _ in range(steps):
            x = newton_step(f, x, rcond)
        out = unflat(x)
        return out, float(jnp.linalg.norm(jax.grad(f)(x)))


def value_only(name: str, pretrained: Mapping, theta0, cfg: ObjectiveConfig = ObjectiveConfig(), progress=1.0,
               noise: float = 0.1, normalization: str = "tokens", subset="v"):
    """Exact minimizer (least change from `pretrained`) of a registered objective over one leaf.

    progress fixes the schedule weight (e.g. progress=1 gives lam = 0 for the linear schedule).
    """
    obj = lambda p: population_objective(name, p, progress, cfg, theta0, noise, None, normalization)
    return newton_subset(obj, pretrained, subset)


# ---------------------------------------------------------------- CLI
def build(method: str, d: int, shots: int, noise: float, normalization: str, theta0=None, pretrained=None,
          n_ft: int = 20, k00: float | None = None) -> dict:
    """The parameters a CLI method names (see main)."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} unknown; allowed: {list(METHODS)}")
    if method == "pretrain":
        return pretrain_optimum(d, shots, noise, normalization)
    if theta0 is None:
        raise ValueError(f"method {method!r} needs --theta=t1,...,td (the fine-tuning task)")
    theta0 = _unit(theta0, d)
    if pretrained is None:
        pretrained = pretrain_optimum(d, shots, noise, normalization)
    check_params(pretrained, d)
    cfg = ObjectiveConfig(m=shots, n_ft=n_ft)
    if method == "zs_all":
        if k00 is None:
            from theory.solver import solve

            flow = solve("zs", pretrained, "all", cfg, theta0, noise, normalization=normalization)
            return flow.params
        return zs_all_member(pretrained, theta0, k00)
    subset = "v" if method.endswith("_v") else ("kq" if is_merged(pretrained) else "k")
    name = "zs" if method.startswith("zs_") else "zsfs"
    # ZS+FS: the lam -> 0+ limit of the minimizer, approached by a small fixed weight
    progress = 1.0 - 1e-6 if name == "zsfs" else 0.0
    params, _ = value_only(name, pretrained, theta0, cfg, progress, noise, normalization, subset)
    return params


def main(argv=None) -> int:
    """python -m theory.optimal --method pretrain|zs_all|zs_v|zsfs_v|zs_kq|zsfs_kq --d 5 --shots 20 --out P.json"""
    p = Parser(prog="python -m theory.optimal", description="Closed-form / exact optima as linattn-params-v1 "
               "parameter files (stdout, or --out).")
    p.add_argument("--method", required=True, choices=METHODS, help="which optimum")
    p.add_argument("--d", type=int, default=5, help="covariate dimension (taken from --params when given)")
    p.add_argument("--shots", type=non_negative(int), default=20, help="pretraining demonstrations m")
    p.add_argument("--n-ft", type=non_negative(int), default=20, help="demonstrations in the FS term")
    p.add_argument("--noise", type=non_negative(float), default=0.1, help="label-noise variance sigma^2")
    p.add_argument("--normalization", default="tokens", choices=["tokens", "shots"])
    p.add_argument("--theta", default=None, help="fine-tuning task (normalized to unit length), e.g. --theta=1,0,0,0,0")
    p.add_argument("--params", default=None, help="pretrained start (default: the pretraining optimum)")
    p.add_argument("--k00", type=float, default=None,
                   help="zs_all: member KQ[0,0] of the family (default: the gradient-flow prediction)")
    p.add_argument("--out", default=None, help="output JSON file (default: print to stdout)")
    args = p.parse_args(argv)
    from linattn.params import load_params, params_to_json

    with jax.enable_x64(True):
        try:
            if args.d < 1:
                raise ValueError(f"--d must be >= 1; got {args.d}")
            if args.out is not None and not Path(args.out).resolve().parent.is_dir():
                raise ValueError(f"--out {args.out!r}: folder {str(Path(args.out).resolve().parent)!r} does not exist")
            if args.out is not None and Path(args.out).is_dir():
                raise ValueError(f"--out {args.out!r} is a folder; give a file name")
            pre, norm = None, args.normalization
            if args.params is not None:
                pre, norm = load_params(args.params, dtype=jnp.float64)
                if pre["V"].shape[-1] != args.d + 2:
                    args.d = pre["V"].shape[-1] - 2
            theta = None if args.theta is None else number_list(args.theta, "--theta")
            out = build(args.method, args.d, args.shots, args.noise, norm, theta, pre, args.n_ft, args.k00)
        except ValueError as err:
            p.error(str(err))
    out = {k: np.where(np.abs(np.asarray(v)) < 1e-12, 0.0, np.asarray(v)) for k, v in out.items()}  # rounding of exact 0s
    text = json.dumps(params_to_json(out, normalization=norm))
    if args.out:
        Path(args.out).write_text(text)
        print(f"python -m theory.optimal: wrote {args.out} ({_describe(args.method, out)})", file=sys.stderr)
    else:
        print(text)
    return 0


def _describe(method: str, params: Mapping) -> str:
    """One line on what was written: the method, g*w, and the family member for zs_all."""
    from linattn.params import gamma_w

    g, w = gamma_w({k: np.asarray(v) for k, v in params.items()})
    gw = float(g * w) if abs(float(g * w)) > 1e-12 else 0.0  # float64 rounding of an exact 0
    text = f"{method}, d = {np.shape(params['V'])[-1] - 2}, g*w = {gw:.6g}"
    if method == "zs_all":
        kq = np.asarray(to_merged(params)["KQ"])[0, 0, 0, 0]
        text += f"; family member KQ[0,0] = {float(kq):.6g} (choose another with --k00)"
    return text


if __name__ == "__main__":
    sys.exit(main())
