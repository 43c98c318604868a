"""Theory against SGD training (issue #3, SPEC sections 4 and 6).

Gradient flow on the exact population objective (theory.solver.gradient_flow, the training
optimizer on the exact risk, float64) against what linattn.train's SGD actually reaches, at
reduced size, and exact risk curves (theory.risk) against Monte Carlo curves
(linattn.evaluate.test_error) of the SGD-trained parameters.

Protocol. Start: the pretrained form Gamma = g I, v = w e_y (linattn.params.icl_params) with
g = 0.64, w = c/g (c = 0.792453, the pretraining optimum; g w close to what SGD pretraining
reaches: g ~ 0.64, w ~ 1.23). Fine-tuning task: a fixed generic unit theta0 (not an axis).
Optimizer: the reference (SGD, momentum 0.9, lr 0.01, clip 1.0 on trainable leaves). Prompts are
drawn fresh from theta0 (no finite dataset), so every minibatch loss is an unbiased estimate of the
very population objective the flow descends. Several seeds are vmapped in one program; the flow
runs the same number of steps (progress = step / (steps - 1) for the ZS+FS schedule).

What is compared (SPEC section 6): the products the prediction depends on -- the prediction is
y_hat = norm(n) z_q^T KQ S v, a function of T[i, a, b] = KQ[i, a] v[b] only, invariant under
KQ -> KQ/s, v -> s v -- as the mean over seeds against the flow, within 4 standard errors over
seeds plus a float32 tolerance; curves within 4 standard errors over seeds and samples.

Finding (full ZS, the flat direction). The ZS minimizers reached from the pretrained form are the
one-parameter family KQ[0,0] = k00, b = theta0 / k00 (theory.optimal.zs_all_member); w is unseen,
so the n-shot curves depend on kappa = k00 w. Every product the ZS loss pins down matches the flow
within its seed standard error, but the member k00 that SGD reaches does not: at batch 1000 SGD
lands about 8.7% below the flow (~41 SEs of 24 seeds), at batch 4000 about 3.7% (~10 SEs of 6), at batch
16000 about 1% (~7 SEs, 1000 steps, measured once outside this file), and
at the reference size (batch 5000, 5000 steps, 4 seeds, measured once outside this file)
1.5515 +- 0.0066 against the flow's 1.5817. The gap shrinks with the batch size, so the flow is
the large-batch limit of SGD, and the finite-batch gap is SGD noise acting along a direction with
no restoring force: (i) in the transient, where the gradient noise is large and the clip is active,
SGD is pushed to smaller k00 (without the clip the gap at batch 1000 is about a third as large);
(ii) once on the family, SGD keeps drifting toward larger k00 (batch 1000: 1.454 after 1000 steps,
1.508 after 3000; batch 250: 1.83 after 8000 steps, still rising), the usual noise-driven drift
toward flatter minimizers. Neither is a bug in linattn.train or theory.solver; the gradient flow
simply does not model minibatch noise. The n-shot curves inherit the gap through kappa: at
n = 1 on theta0 the flow's curve is many MC standard errors off SGD's, while the exact risk of the
family member SGD actually reached matches SGD's Monte Carlo curves within their standard errors.
The tests below assert what holds and mark the literal claim ("the flow predicts SGD's end point
and curves within standard errors") as a strict xfail for the flat direction.

Finding (value-only, the stationary jitter). Value-only ZS and ZS+FS end points match the closed
form and the flow within their seed SEs, but SGD at lr 0.01 (momentum 0.9) and batch 500-1000
ends with a parameter jitter of a few percent, whose excess risk (1/2) tr(H Cov) is 0.02 at n = 0
(about 5-6 SEs of the seed-averaged MC curve). The risk is exactly quadratic in V, so this term is
computed from the seeds' covariance and the exact Hessian; with it the curves agree within 4 SE at
every n on theta0 and -theta0, without it n = 0 does not. (At the reference batch 5000 the excess
would be about five times smaller.)
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linattn import evaluate as E, train as T
from linattn.objectives import ObjectiveConfig
from linattn.optim import OptimizerConfig
from linattn.params import icl_params
from theory.optimal import pretrain_c, w_star, zs_v_closed_form
from theory.risk import risk_from_terms, risk_terms
from theory.solver import gradient_flow

D = 5
NOISE = 0.1
G0 = 0.64
W0 = pretrain_c(D, 20, NOISE) / G0  # 1.23820..., so that G0 * W0 = c
_rng = np.random.default_rng(20260302)
THETA0 = _rng.normal(size=D)
THETA0 /= np.linalg.norm(THETA0)
U = _rng.normal(size=D)  # a fixed unit direction orthogonal to theta0
U -= (U @ THETA0) * THETA0
U /= np.linalg.norm(U)
SHOTS = np.array([0, 1, 2, 5, 10, 20, 40])
LR = 0.01
F32_TOL = 1e-5  # float32 rounding of products of O(1) parameters after ~1000 updates
CFG = ObjectiveConfig()


def _start(dtype=jnp.float32):
    return icl_params(D, G0, W0, dtype=dtype)


# ---------------------------------------------------------------- runs (cached per module)
@functools.lru_cache(maxsize=None)
def _sgd(objective: str, subset: str, steps: int, batch: int, seeds: int, root: int = 0, clip: float | None = 1.0):
    """`seeds` SGD fine-tuning runs from the pretrained-form start, one vmapped program.

    Returns (params with a leading seed axis as float64 numpy, wall seconds)."""
    cfg = T.TrainConfig(steps=steps, batch=batch, d=D, noise=NOISE, history=10,
                        optimizer=OptimizerConfig(clip_norm=clip))
    keys = jax.random.split(jax.random.PRNGKey(root), seeds)
    ctx = T.TaskContext(theta0=jnp.asarray(THETA0, jnp.float32))
    t = time.time()
    res = T.train_plan([T.Run(k, _start(), ctx, objective, subset, LR, CFG, cfg) for k in keys])
    params = {k: np.stack([np.asarray(r.params[k], np.float64) for r in res]) for k in res[0].params}
    return params, time.time() - t


@functools.lru_cache(maxsize=None)
def _flow(objective: str, subset: str, steps: int, clip: float | None = 1.0):
    with jax.enable_x64(True):
        r = gradient_flow(objective, _start(jnp.float64), subset, CFG, THETA0, NOISE, steps=steps, lr=LR,
                          opt_cfg=OptimizerConfig(clip_norm=clip))
        return {k: np.asarray(v, np.float64) for k, v in r.params.items()}, r.objective, r.grad_norm


def _seed(params, i):
    return {k: v[i] for k, v in params.items()}


def _n_seeds(params):
    return params["V"].shape[0]


# ---------------------------------------------------------------- invariants
def _parts(p):
    """(KQ, v) of merged one-layer one-head trees, with or without a leading seed axis."""
    return p["KQ"][..., 0, 0, :, :], p["V"][..., 0, 0, -1, :]


def full_zs_products(p) -> dict:
    """Products of the full-ZS prediction (entries or contractions of T = KQ (x) v).

    kappa = k00 w is the flat direction of the ZS family; the rest are pinned by the ZS loss.
    """
    kq, v = _parts(p)
    k00, v0, b, w = kq[..., 0, 0], v[..., 0], v[..., 1:-1], v[..., -1]
    g = np.trace(kq[..., 1:-1, 1:-1], axis1=-2, axis2=-1) / D
    pvec = kq[..., 0, 1:-1] + kq[..., 1:-1, 0]
    return {
        "k00 b.theta0": k00 * (b @ THETA0),  # the ZS channel: 1 on the family
        "k00 b.u": k00 * (b @ U),  # b off theta0
        "k00 v0": k00 * v0,
        "g b.theta0": g * (b @ THETA0),  # what is left of the ICL channel
        "g w": g * w,
        "(p.theta0)(b.theta0)": (pvec @ THETA0) * (b @ THETA0),
        "kappa = k00 w": k00 * w,  # flat: set by the dynamics
    }


def value_products(p) -> dict:
    """Products of value-only fine-tuning (KQ frozen at G0 I): g v0, g b.theta0, g b.u, g w."""
    kq, v = _parts(p)
    g = np.trace(kq[..., 1:-1, 1:-1], axis1=-2, axis2=-1) / D
    return {"g v0": g * v[..., 0], "g b.theta0": g * (v[..., 1:-1] @ THETA0),
            "g b.u": g * (v[..., 1:-1] @ U), "g w": g * v[..., -1]}


def _compare(sim: dict, ref: dict, names, label: str):
    """Rows (name, seed mean, seed SE, reference, gap in SEs); asserts |gap| <= 4 SE + F32_TOL."""
    rows, bad = [], []
    for name in names:
        x = np.asarray(sim[name])
        mean, se = x.mean(), x.std(ddof=1) / np.sqrt(x.size)
        gap = mean - float(ref[name])
        rows.append((name, mean, se, float(ref[name]), gap / se if se > 0 else np.inf * np.sign(gap)))
        if abs(gap) > 4 * se + F32_TOL:
            bad.append(rows[-1])
    print(f"\n{label}: name, SGD seed mean, seed SE, reference, gap/SE")
    for r in rows:
        print(f"  {r[0]:22s} {r[1]:+.6f} {r[2]:.2e} {r[3]:+.6f} {r[4]:+.2f}")
    assert not bad, bad


# ---------------------------------------------------------------- curves
def _curve_fn(p, theta):
    return risk_from_terms(risk_terms(p, theta, NOISE), SHOTS, NOISE)


_CURVE = jax.jit(_curve_fn)  # traced (and cached) in the x64 context it is called in


def _exact_curve(p, theta):
    """Exact risk (theory.risk) at SHOTS, float64."""
    with jax.enable_x64(True):
        p = {k: jnp.asarray(v, jnp.float64) for k, v in p.items()}
        return np.asarray(_CURVE(p, jnp.asarray(theta, jnp.float64)))


@functools.lru_cache(maxsize=None)
def _sgd_exact(run: tuple, sign: float):
    """Cached (S, len(SHOTS)) exact curves of each SGD end point of _sgd(*run) on sign * theta0."""
    params, _ = _sgd(*run)
    return np.array([_exact_curve(_seed(params, i), sign * THETA0) for i in range(_n_seeds(params))])


def _mc_curves(params, theta, samples=20_000, root=7):
    """Per-seed Monte Carlo curves (S, len(SHOTS)) and their sample SEs; independent keys per seed
    (and per task: callers pass a different root for theta0 and -theta0)."""
    means, ses = [], []
    for i in range(_n_seeds(params)):
        p = {k: jnp.asarray(v, jnp.float32) for k, v in _seed(params, i).items()}
        c = E.test_error(jax.random.fold_in(jax.random.PRNGKey(root), i), p, SHOTS,
                         jnp.asarray(theta, jnp.float32), noise=NOISE, samples=samples)
        means.append(c.mean)
        ses.append(c.se)
    return np.array(means), np.array(ses)


TASKS = (("theta0", 1.0, 11), ("-theta0", -1.0, 12))  # name, sign, MC root


@functools.lru_cache(maxsize=None)
def _sgd_mc(run: tuple, sign: float, root: int):
    """Cached per-seed MC curves of the SGD end points of _sgd(*run) on sign * theta0."""
    params, _ = _sgd(*run)
    return _mc_curves(params, sign * THETA0, root=root)


def _curve_gaps(run: tuple, ref_curve_fn, label):
    """For theta0 and -theta0: seed-averaged MC curve of _sgd(*run) vs ref_curve_fn(theta).

    SE over seeds and samples: Var(seed mean) = [Var_s(R_s) + mean_s se_s^2] / S, with R_s the
    exact risk of seed s's own end point (its parameter spread, known without sampling error) and
    se_s its MC sample SE (from 20,000 prompts). Equivalent in expectation to the spread of the
    per-seed MC means over sqrt(S), but not at the mercy of a chi-square with S - 1 = 7 or 11
    degrees of freedom. Returns the gaps in SEs per task.
    """
    out = {}
    print(f"\n{label}: shots {SHOTS.tolist()}")
    for name, sign, root in TASKS:
        m, se_s = _sgd_mc(run, sign, root)
        exact = _sgd_exact(run, sign)
        S = m.shape[0]
        mean, se = m.mean(0), np.sqrt((exact.var(0, ddof=1) + (se_s**2).mean(0)) / S)
        ref = ref_curve_fn(sign * THETA0)
        out[name] = (mean - ref) / se
        print(f"  {name:8s} MC     {_fmt(mean)}\n  {'':8s} theory {_fmt(ref)}\n"
              f"  {'':8s} SE     {_fmt(se, '.1e')}\n  {'':8s} gap/SE {_fmt(out[name], '+.2f')}")
    return out


def _fmt(x, spec=".4f"):
    return " ".join(format(float(v), spec) for v in x)


def _assert_mc_matches_exact_at_end_points(run: tuple, label: str):
    """Seed-mean MC curve of the SGD end points = seed-mean exact risk of the same end points.

    Per seed MC - exact is pure Monte Carlo error with sample SE se_s, so the seed mean has SE
    sqrt(sum_s se_s^2) / S. Returns the (S, len(SHOTS)) exact curves per task.
    """
    params, _ = _sgd(*run)
    S = _n_seeds(params)
    out = {}
    print(f"\n{label}: MC of SGD end points vs exact risk of the same end points, shots {SHOTS.tolist()}")
    for name, sign, root in TASKS:
        exact = _sgd_exact(run, sign)
        m, se = _sgd_mc(run, sign, root)
        gap = (m - exact).mean(0) / (np.sqrt((se**2).sum(0)) / S)
        print(f"  {name:8s} MC          {_fmt(m.mean(0))}\n  {'':8s} exact(SGD)  {_fmt(exact.mean(0))}"
              f"\n  {'':8s} gap/SE      {_fmt(gap, '+.2f')}")
        assert np.all(np.abs(gap) <= 4), (name, gap)
        out[name] = exact
    return out


def _value_hessians(p, theta):
    """Exact Hessian (len(SHOTS), D+2, D+2) of the n-shot risk in the label row v of V."""
    with jax.enable_x64(True):
        p = {k: jnp.asarray(v, jnp.float64) for k, v in p.items()}

        def curve(v):
            return _curve_fn(dict(p, V=p["V"].at[0, 0, -1].set(v)), jnp.asarray(theta, jnp.float64))

        return np.asarray(jax.jit(jax.hessian(curve))(p["V"][0, 0, -1]))


def _assert_value_only_curves(run: tuple, pred: dict, label: str):
    """Value-only curves: SGD's seed-mean MC = R_pred(n) + (1/2) tr(H_n Cov_seeds(v)) within 4 SE.

    The risk is exactly quadratic in the label row v, so for seeds with mean v_bar and covariance
    C, mean_s R(v_s) = R(v_bar) + (1/2) tr(H C) with no remainder. The prediction says v_bar = v_pred
    (tested on the parameters); the second term is SGD's stationary jitter (an O(lr/B) excess risk
    the noise-free flow does not have), measured from the seeds' covariance, not fitted. SE over
    seeds and samples as in _curve_gaps; the correction's own sampling error is second order.
    Also printed (not asserted): the bare prediction without the jitter term.
    """
    params, _ = _sgd(*run)
    v = params["V"][:, 0, 0, -1, :]
    cov = np.cov(v, rowvar=False, ddof=1)
    corr = {}
    for name, sign, _ in TASKS:
        H = _value_hessians(pred, sign * THETA0)
        corr[name] = 0.5 * np.einsum("nij,ji->n", H, cov)
    print(f"\n{label}: SGD stationary excess risk (1/2) tr(H Cov) "
          + "; ".join(f"{k}: {_fmt(c, '.1e')}" for k, c in corr.items()))
    gaps = _curve_gaps(run, lambda th: _exact_curve(pred, th) + corr["theta0" if th @ THETA0 > 0 else "-theta0"],
                       f"{label}, SGD MC vs prediction + jitter excess")
    for t, g in gaps.items():
        assert np.all(np.abs(g) <= 4), (t, g)
    uncorrected = _curve_gaps(run, lambda th: _exact_curve(pred, th), f"{label}, SGD MC vs bare prediction (info)")
    return uncorrected


# ================================================================ 1. full ZS fine-tuning
ZS_STEPS, ZS_BATCH, ZS_SEEDS = 800, 1000, 24  # 24: a 4-SE bound is then a t test on 23 dof


def test_full_zs_flow_reaches_the_family():
    """Sanity of the reference: the flow ends at the noise floor on the branch k00 b = theta0."""
    fp, obj, gn = _flow("zs", "all", ZS_STEPS)
    assert abs(obj - NOISE) < 1e-9 and gn < 1e-6, (obj, gn)
    pr = full_zs_products(fp)
    assert abs(pr["k00 b.theta0"] - 1.0) < 1e-8
    assert abs(pr["g w"]) < 1e-8 and abs(pr["g b.theta0"]) < 1e-8


def test_full_zs_sgd_matches_flow_on_the_products_the_loss_pins_down():
    """Every product of the end point except the flat one: seed mean within 4 seed SEs of the flow.

    24 seeds, batch 1000, 800 steps. Each seed's end point is an independent draw, so the SE over
    seeds is the run's own noise (stationary jitter plus trajectory noise). F32_TOL covers float32
    rounding, far below every SE here. Parameters the ZS loss never sees (w, the label row and
    column of KQ) get exactly zero gradient and must stay bit for bit (clip and momentum included).
    """
    params, secs = _sgd("zs", "all", ZS_STEPS, ZS_BATCH, ZS_SEEDS)
    fp, _, _ = _flow("zs", "all", ZS_STEPS)
    print(f"\nfull ZS SGD: {ZS_SEEDS} seeds x {ZS_STEPS} steps x batch {ZS_BATCH} in {secs:.1f} s")
    names = [n for n in full_zs_products(fp) if not n.startswith("kappa")]
    _compare(full_zs_products(params), full_zs_products(fp), names, "full ZS, pinned products vs flow")
    start = _start()
    kq0, v0 = np.asarray(start["KQ"][0, 0]), np.asarray(start["V"][0, 0, -1])
    kq, v = _parts(params)
    assert np.all(v[:, -1] == np.float32(v0[-1]))  # w unseen by ZS
    assert np.all(kq[:, -1, :] == kq0[-1]) and np.all(kq[:, :, -1] == kq0[:, -1])


def _kappa_gap(batch, seeds):
    params, secs = _sgd("zs", "all", ZS_STEPS, batch, seeds)
    fp, _, _ = _flow("zs", "all", ZS_STEPS)
    x = full_zs_products(params)["kappa = k00 w"]
    ref = float(full_zs_products(fp)["kappa = k00 w"])
    se = x.std(ddof=1) / np.sqrt(x.size)
    print(f"\nkappa = k00 w, batch {batch}: SGD {x.mean():.5f} (seed sd {x.std(ddof=1):.2e}, SE {se:.2e}), "
          f"flow {ref:.5f}, gap {x.mean() - ref:+.5f} = {(x.mean() - ref) / se:+.1f} SE  [{secs:.1f} s]")
    return x.mean() - ref, se, x.std(ddof=1)


def test_full_zs_flat_direction_gap_shrinks_with_batch():
    """The member of the ZS family SGD reaches approaches the flow's as the batch grows.

    kappa = k00 w (w is unchanged, so this is k00 up to a constant) at batch 1000 (24 seeds) and
    4000 (6 seeds), 800 steps each. The flow is the noise-free limit, so the SGD - flow gap must
    shrink by more than 4 combined SEs from batch 1000 to 4000. Measured (see module docstring):
    -0.171 (-41.3 SE) at batch 1000, -0.072 (-10.4 SE) at 4000. The seed spread (sd 0.020 at
    batch 1000) is eight times smaller than the gap: the gap is a systematic drift, not diffusion.
    """
    gap1, se1, _ = _kappa_gap(ZS_BATCH, ZS_SEEDS)
    gap4, se4, _ = _kappa_gap(4 * ZS_BATCH, 6)
    assert abs(gap1) - abs(gap4) > 4 * np.hypot(se1, se4), (gap1, se1, gap4, se4)


@pytest.mark.xfail(strict=True, reason="finite-batch SGD drifts along the flat ZS family (k00 below the flow's); "
                   "see the module docstring")
def test_full_zs_flat_direction_matches_flow():
    """Issue #3's literal claim for the flat direction: SGD's kappa within 4 seed SEs of the flow."""
    gap, se, _ = _kappa_gap(ZS_BATCH, ZS_SEEDS)
    assert abs(gap) <= 4 * se + F32_TOL


ZS_RUN = ("zs", "all", ZS_STEPS, ZS_BATCH, ZS_SEEDS)


def test_full_zs_curves_match_the_exact_risk_of_the_reached_end_points():
    """SGD's Monte Carlo curves = exact risk of the very parameters SGD reached, within 4 SE.

    Also printed: the seed-mean exact curve relative to the flow's, in seed SEs of the exact curve
    (the flat-direction gap seen in curves; asserted as a strict xfail below).
    """
    exact = _assert_mc_matches_exact_at_end_points(ZS_RUN, "full ZS")
    fp, _, _ = _flow("zs", "all", ZS_STEPS)
    for name, sign, _ in TASKS:
        flow = _exact_curve(fp, sign * THETA0)
        se = exact[name].std(0, ddof=1) / np.sqrt(exact[name].shape[0])
        print(f"  {name:8s} exact(flow) {_fmt(flow)}\n  {'':8s} (exact(SGD) - exact(flow)) / seed SE "
              f"{_fmt((exact[name].mean(0) - flow) / se, '+.1f')}")


@pytest.mark.xfail(strict=True, reason="the flow's k00 is not SGD's (flat direction); at n >= 1 the curves "
                   "depend on kappa = k00 w")
def test_full_zs_curves_match_the_flow():
    """Issue #3's literal claim: the flow end point's exact curves within 4 SE of SGD's MC curves."""
    fp, _, _ = _flow("zs", "all", ZS_STEPS)
    gaps = _curve_gaps(ZS_RUN, lambda th: _exact_curve(fp, th), "full ZS, SGD MC vs flow end point")
    assert all(np.all(np.abs(g) <= 4) for g in gaps.values())


# ================================================================ 2. value-only fine-tuning
V_STEPS, V_BATCH, V_SEEDS = 800, 1000, 12
ZSFS_STEPS, ZSFS_BATCH, ZSFS_SEEDS = 600, 500, 8


def test_value_only_zs_matches_closed_form_and_flow():
    """Value-only ZS: b = theta0/((d+4) g), v0 = 0, w kept (theory.optimal.zs_v_closed_form).

    The loss is quadratic in V, so SGD's mean follows the flow up to the clipped transient, whose
    effect decays (the ZS loss is strictly convex in (v0, b)); w is unseen and exact.
    """
    params, secs = _sgd("zs", "v", V_STEPS, V_BATCH, V_SEEDS)
    print(f"\nV-only ZS SGD: {V_SEEDS} seeds x {V_STEPS} steps x batch {V_BATCH} in {secs:.1f} s")
    with jax.enable_x64(True):
        closed = {k: np.asarray(v, np.float64) for k, v in zs_v_closed_form(D, G0, W0, THETA0).items()}
    fp, _, _ = _flow("zs", "v", V_STEPS)
    sim = value_products(params)
    names = list(sim)
    _compare(sim, value_products(closed), names, "V-only ZS vs closed form")
    _compare(sim, value_products(fp), names, "V-only ZS vs flow")
    assert abs(value_products(fp)["g b.theta0"] - 1 / (D + 4)) < 1e-9
    assert np.all(params["V"][:, 0, 0, -1, -1] == np.float32(W0))
    run = ("zs", "v", V_STEPS, V_BATCH, V_SEEDS)
    _assert_mc_matches_exact_at_end_points(run, "V-only ZS")
    _assert_value_only_curves(run, closed, "V-only ZS (closed form)")


def test_value_only_zsfs_matches_flow():
    """Value-only ZS + lambda_t FS (lambda_t: 1 -> 0 linearly): SGD end point vs the flow.

    8 seeds, batch 500, 600 steps, without gradient clipping in both: the value-only objective is
    quadratic in V, so the mean SGD path is exactly the flow. With the reference clip (norm 1) it
    is not: E[clip(noisy gradient)] != clip(exact gradient) while the early gradients are clipped,
    and over 16 seeds SGD ends at g w = 0.65124 +- 0.00059 against the clipped flow's 0.65381
    (-4.3 SE; tokens sampler 0.65198 +- 0.00072), while without the clip 0.65329 +- 0.00068 against
    0.65381 (-0.8 SE). The flow ends near w*(20) (SPEC: 0.6541 for g w), not on it: the FS weight
    decays to zero before w has converged.
    """
    params, secs = _sgd("zsfs", "v", ZSFS_STEPS, ZSFS_BATCH, ZSFS_SEEDS, 0, None)
    fp, _, _ = _flow("zsfs", "v", ZSFS_STEPS, None)
    sim, ref = value_products(params), value_products(fp)
    print(f"\nV-only ZS+FS SGD: {ZSFS_SEEDS} seeds x {ZSFS_STEPS} steps x batch {ZSFS_BATCH} in {secs:.1f} s; "
          f"flow g w = {float(ref['g w']):.6f}, w*(20) = {w_star(D, 20, NOISE):.6f}")
    _compare(sim, ref, list(sim), "V-only ZS+FS vs flow")
    assert abs(float(ref["g w"]) - w_star(D, 20, NOISE)) < 2e-3
    run = ("zsfs", "v", ZSFS_STEPS, ZSFS_BATCH, ZSFS_SEEDS, 0, None)
    _assert_mc_matches_exact_at_end_points(run, "V-only ZS+FS")
    _assert_value_only_curves(run, fp, "V-only ZS+FS (flow)")
