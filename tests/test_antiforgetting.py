"""EWC and WiSE-FT (issue 10): library pieces, exact theory, and theory against simulation.

EWC is the registered objective "ewc" (linattn.objectives): ZS + (lambda/2) (theta - theta_pre)^T F
(theta - theta_pre), F the exact Hessian of the pretraining population risk at theta_pre
(theory.antiforgetting.ewc_curvature), carried per run in ObjectiveConfig (ref_params, curvature),
so one plan of Runs trains with Monte Carlo (linattn.train.train_plan) and predicts with the exact
source (theory.solver.flow_plan). WiSE-FT is linattn.params.interpolate; its exact risk along the
segment is theory.antiforgetting.wise_ft_curves.

Monte Carlo checks follow SPEC section 6 and tests/test_theory_vs_sim.py: |theory - estimate| <= 4
standard errors, the SE over seeds and samples.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from linattn import evaluate as E, params as P, train as T
from linattn.objectives import ObjectiveConfig, evaluate_objective
from theory.antiforgetting import ewc_config, ewc_curvature, pretraining_hessian, psd_part, wise_ft_curves
from theory.optimal import pretrain_c
from theory.risk import risk, task_curves
from theory.solver import flow_plan

D = 5
NOISE = 0.1
LR = 0.01
G0 = 0.64
W0 = pretrain_c(D, 20, NOISE) / G0  # the pretraining optimum's product c = g w (SPEC section 4)
_rng = np.random.default_rng(20261123)
THETA0 = _rng.normal(size=D)
THETA0 /= np.linalg.norm(THETA0)
SHOTS = np.array([0, 1, 5, 20, 40])
TASK_NAMES = tuple(E.TEST_TASKS)  # theta0, minus_theta0, random


def _start(dtype=jnp.float32):
    """Pretrained weights: the closed-form pretraining optimum's form (Gamma = G0 I, v = W0 e_y)."""
    return P.icl_params(D, G0, W0, dtype=dtype)


def _seed(tree, i):
    return {k: v[i] for k, v in tree.items()}


def _stack(trees):
    return {k: np.stack([np.asarray(t[k], np.float64) for t in trees]) for k in trees[0]}


# ================================================================ EWC: the penalty and its curvature
def test_ewc_penalty_is_zero_at_the_reference_and_its_gradient_is_lambda_F_delta():
    """With the risk terms switched off, the objective is (lambda/2) delta^T F delta: 0 at theta_pre,
    gradient (jax.grad) lambda F delta, in linattn.params.flatten coordinates."""
    with jax.enable_x64(True):
        ref = {k: jnp.asarray(v, jnp.float64) for k, v in _start().items()}
        F = ewc_curvature(ref, 20, NOISE)
        lam = 0.7
        cfg = ewc_config(ObjectiveConfig(), ref, lam, F)
        no_risk = lambda p, shots, task: jnp.zeros((), jnp.float64)  # noqa: E731
        assert float(evaluate_objective("ewc", no_risk, ref, 0.3, cfg)) == 0.0
        other = {k: v + 0.1 * jax.random.normal(jax.random.PRNGKey(i), v.shape, jnp.float64)
                 for i, (k, v) in enumerate(ref.items())}
        grad = jax.grad(lambda p: evaluate_objective("ewc", no_risk, p, 0.3, cfg))(other)
        delta = P.flatten(other) - P.flatten(ref)
        want = lam * F @ delta
        got = ravel_pytree(grad)[0]
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-14 * np.abs(want).max())
        value = evaluate_objective("ewc", no_risk, other, 0.3, cfg)
        np.testing.assert_allclose(float(value), 0.5 * lam * float(delta @ F @ delta), rtol=1e-12)
        # the ZS term is the one of objective "zs"
        zs_risk = lambda p, shots, task: risk(p, shots, THETA0, NOISE)  # noqa: E731
        assert float(evaluate_objective("ewc", zs_risk, ref, 0.0, cfg)) == float(
            evaluate_objective("zs", zs_risk, ref, 0.0, cfg))


def test_ewc_needs_its_per_run_data():
    start = _start()
    with pytest.raises(ValueError, match="needs ObjectiveConfig.ref_params .* and ObjectiveConfig.curvature"):
        evaluate_objective("ewc", lambda p, s, t: 0.0, start, 0.0, ObjectiveConfig(ref_params=start))
    with pytest.raises(ValueError, match=r"curvature has shape \(3, 3\); expected \(98, 98\)"):
        ewc_config(ObjectiveConfig(), start, 1.0, np.eye(3))
    with pytest.raises(ValueError, match="lambda must be one finite number >= 0; got -1"):
        ewc_config(ObjectiveConfig(), start, -1.0, np.eye(98))


def _mixed_differences(f, x, h):
    """Central mixed second differences of f at x with step h: (P, P), entry (i, j) from
    f(x + h(s e_i + t e_j)) over s, t = +-1 (for i = j the second difference with step 2h)."""
    n = x.size
    eye = jnp.eye(n, dtype=x.dtype)
    pts = []
    for s, t in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
        pts.append(x[None, None, :] + h * (s * eye[:, None, :] + t * eye[None, :, :]))
    vals = [jax.jit(jax.vmap(jax.vmap(f)))(p) for p in pts]
    return (vals[0] - vals[1] - vals[2] + vals[3]) / (4 * h * h), max(float(jnp.max(jnp.abs(v))) for v in vals)


@pytest.mark.parametrize("merged", [True, False])
def test_exact_hessian_matches_finite_differences(merged):
    """pretraining_hessian against finite differences of the exact risk itself (no autodiff), d = 2.

    The risk is a polynomial in the parameters, of degree 4 (merged: y_hat is bilinear in KQ and v)
    or 6 (separate: trilinear in Q, K, v), so the central difference D(h) = H + a h^2 + b h^4
    exactly and the Richardson combination (64 D(h) - 20 D(2h) + D(4h)) / 45 is H up to rounding.
    Tolerance: rounding of the risk values, 1e3 float64 epsilons of the largest value, amplified
    by 1/h^2 and the Richardson weights (sum 85/45).
    """
    d, m = 2, 4
    p0 = P.init_params(jax.random.PRNGKey(3), d, merged=merged, std=0.5)
    H = pretraining_hessian(p0, m, NOISE)
    with jax.enable_x64(True):
        x, unravel = ravel_pytree({k: jnp.asarray(v, jnp.float64) for k, v in p0.items()})
        f = lambda v: risk(unravel(v), m, "sphere", NOISE)  # noqa: E731
        h = 0.05
        parts = [_mixed_differences(f, x, s * h) for s in (1, 2, 4)]
        fd = (64 * parts[0][0] - 20 * parts[1][0] + parts[2][0]) / 45
        scale = max(p[1] for p in parts)
    tol = 1e3 * np.finfo(np.float64).eps * scale / h**2 * 85 / 45
    err = np.abs(np.asarray(fd) - H).max()
    print(f"\nHessian ({'merged' if merged else 'separate'}, P = {x.size}): max |H| {np.abs(H).max():.3g}, "
          f"max |H - finite differences| {err:.2e} (tolerance {tol:.1e})")
    assert H.shape == (x.size, x.size)
    assert err <= tol
    np.testing.assert_allclose(H, H.T, atol=tol)


def test_pretraining_hessian_stacks_seeds_and_psd_part():
    """Stacked seeds give each seed's own Hessian; at the pretraining optimum's form the Hessian is
    PSD up to rounding, and psd_part leaves a PSD matrix unchanged (up to rounding)."""
    a, b = _start(), P.init_params(jax.random.PRNGKey(1), D)
    Hs = pretraining_hessian(_stack([a, b]), 20, NOISE)
    np.testing.assert_allclose(Hs[0], pretraining_hessian(a, 20, NOISE), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(Hs[1], pretraining_hessian(b, 20, NOISE), rtol=1e-12, atol=1e-12)
    lam = np.linalg.eigvalsh(Hs[0])
    print(f"\nHessian at the optimum's form: eigenvalues {lam.min():.2e} .. {lam.max():.2e}, "
          f"{int(np.sum(np.abs(lam) < 1e-9 * lam.max()))} of {lam.size} zero")
    assert lam.min() >= -1e-9 * lam.max()
    np.testing.assert_allclose(psd_part(Hs[0]), 0.5 * (Hs[0] + Hs[0].T), atol=1e-9 * lam.max())
    assert np.linalg.eigvalsh(psd_part(Hs[1])).min() >= -1e-9 * np.abs(Hs[1]).max()


# ================================================================ EWC through the engine
def _ctx(dtype=jnp.float32):
    return T.TaskContext(theta0=jnp.asarray(THETA0, dtype))


@pytest.mark.parametrize("merged, subset, frozen", [(True, "v", ("KQ",)), (False, "k", ("Q", "V"))])
def test_ewc_frozen_leaves_unchanged(merged, subset, frozen):
    """EWC on a subset: the frozen leaves stay bit for bit, in SGD training and in the gradient flow."""
    p0 = P.init_params(jax.random.PRNGKey(5), D, merged=merged)
    if merged:
        p0 = _start()
    obj = ewc_config(ObjectiveConfig(), p0, 1.0, noise=NOISE)
    cfg = T.TrainConfig(steps=30, batch=256, d=D, noise=NOISE, history=3)
    run = T.Run(jax.random.PRNGKey(0), p0, _ctx(), "ewc", subset, LR, obj, cfg)
    sgd = T.train_plan([run])[0]
    flow = flow_plan([T.Run(None, p0, _ctx(), "ewc", subset, LR, obj, cfg)])[0]
    for k in frozen:
        np.testing.assert_array_equal(np.asarray(sgd.params[k]), np.asarray(p0[k]))
        np.testing.assert_array_equal(np.asarray(flow.params[k]), np.asarray(p0[k], np.float64))
    moved = [k for k in p0 if k not in frozen]
    assert all(float(jnp.max(jnp.abs(sgd.params[k] - p0[k]))) > 0 for k in moved)


EWC_STEPS, EWC_BATCH, EWC_SEEDS = 400, 1000, 8
EWC_LAMS = (0.3, 3.0)
EWC_SUBSETS = ("v", "all")


@functools.lru_cache(maxsize=None)
def _ewc_plan():
    """SGD (EWC_SUBSETS x EWC_LAMS x EWC_SEEDS seeds, one plan) and the gradient flow of the same Runs
    (one exact plan). Seed s starts from its own perturbed pretrained weights theta_s with its own
    curvature F_s (the PSD part of the exact pretraining Hessian at theta_s): per-run data.
    Returns (runs, groups, {(subset, lam): (sgd params, flow params) stacked over seeds}, F, starts)."""
    base = _start()
    starts = [{k: v + 0.02 * jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(100 + s), i), v.shape)
               for i, (k, v) in enumerate(base.items())} for s in range(EWC_SEEDS)]
    F = ewc_curvature(_stack(starts), 20, NOISE)  # (S, P, P): one program for all seeds
    cfg = T.TrainConfig(steps=EWC_STEPS, batch=EWC_BATCH, d=D, noise=NOISE, history=4)
    ctx = _ctx()
    cells = [(sub, lam, s) for sub in EWC_SUBSETS for lam in EWC_LAMS for s in range(EWC_SEEDS)]
    runs = [T.Run(jax.random.PRNGKey(s), starts[s], ctx, "ewc", sub, LR, ewc_config(ObjectiveConfig(), starts[s], lam, F[s]),
                  cfg, name=f"{sub}, lambda {lam}, seed {s}") for sub, lam, s in cells]
    groups = T.plan_groups(runs, "mc")
    sgd = T.train_plan(runs)
    flows = flow_plan([T.Run(None, r.params0, r.ctx, r.objective, r.subset, r.lr, r.obj, r.cfg, r.name) for r in runs])
    out = {}
    for sub in EWC_SUBSETS:
        for lam in EWC_LAMS:
            idx = [i for i, c in enumerate(cells) if c[:2] == (sub, lam)]
            out[(sub, lam)] = _stack([sgd[i].params for i in idx]), _stack([flows[i].params for i in idx])
    return runs, groups, out, F, starts


def _mc(params, root, samples=20_000):
    """Monte Carlo curves of stacked trees on the test tasks: {task: (mean (S, N), se (S, N))}, each
    tree on its own prompts (key fold_in(root, s)), so the seeds' Monte Carlo errors are independent."""
    out = {t: ([], []) for t in TASK_NAMES}
    for s in range(params["V"].shape[0]):
        c = E.test_errors(jax.random.fold_in(jax.random.PRNGKey(root), s),
                          {k: jnp.asarray(v[s], jnp.float32) for k, v in params.items()},
                          SHOTS, jnp.asarray(THETA0, jnp.float32), noise=NOISE, samples=samples)
        for t in TASK_NAMES:
            out[t][0].append(np.asarray(c[t].mean))
            out[t][1].append(np.asarray(c[t].se))
    return {t: (np.stack(m), np.stack(e)) for t, (m, e) in out.items()}


def _paired_curve_z(sim: dict, pred: dict, root: int, label: str) -> dict:
    """Seed-mean MC curve of the stacked trees `sim` against the seed mean of the exact curves of the
    paired trees `pred` (seed s of each from the same start): {task: z (N,)}.

    SE^2 = [Var_s(exact(sim_s) - exact(pred_s)) + mean_s se_s^2] / S: the spread of sim around its
    own seed's prediction, known without sampling error, plus the Monte Carlo sample error."""
    mc = _mc(sim, root)
    ex_sim = task_curves(sim, THETA0, SHOTS, NOISE)  # (S, T, N)
    ex_pred = task_curves(pred, THETA0, SHOTS, NOISE)
    print(f"\n{label}, shots {SHOTS.tolist()}")
    out = {}
    for t, name in enumerate(TASK_NAMES):
        m, se = mc[name]
        S = m.shape[0]
        sd = np.sqrt(((ex_sim[:, t] - ex_pred[:, t]).var(0, ddof=1) + (se**2).mean(0)) / S)
        out[name] = (m.mean(0) - ex_pred[:, t].mean(0)) / sd
        print(f"  {name:13s} MC     {' '.join(f'{v:.4f}' for v in m.mean(0))}\n  {'':13s} theory "
              f"{' '.join(f'{v:.4f}' for v in ex_pred[:, t].mean(0))}\n  {'':13s} z      "
              f"{' '.join(f'{v:+.2f}' for v in out[name])}")
    return out


def test_ewc_sweep_is_one_program_and_lambda_is_per_run():
    """Seeds, lambdas and subsets share one compiled program (per-run data are traced; the subsets
    are fused columns), and each run reads its own lambda: the larger lambda ends closer to its own
    theta_pre in the F-norm, in SGD and in the flow."""
    _, groups, out, F, starts = _ewc_plan()
    assert len(groups) == 1 and groups[0].cells.shape == (EWC_SEEDS, len(EWC_SUBSETS) * len(EWC_LAMS))
    for sub in EWC_SUBSETS:
        for j in (0, 1):  # SGD, flow
            dist = [np.mean([float(P.curvature_dist(_seed(out[(sub, lam)][j], s), starts[s], F[s]))
                             for s in range(EWC_SEEDS)]) for lam in EWC_LAMS]
            print(f"\nEWC ({sub}, {'SGD' if j == 0 else 'flow'}): seed mean (1/2) delta^T F delta at lambda "
                  f"{EWC_LAMS}: {np.round(dist, 5)}")
            assert dist[1] < dist[0]


@pytest.mark.parametrize("lam", EWC_LAMS)
def test_ewc_value_only_flow_predicts_sgd(lam):
    """EWC on V: the objective is quadratic in V, and the gradient flow of the same Runs predicts
    SGD's Monte Carlo curves within 4 SE at every task and shot (_paired_curve_z). Measured: largest
    |z| 3.7 (lambda = 0.3) and 2.7 (lambda = 3), both at n = 0 on theta0, where SGD's stationary
    jitter adds its O(lr/B) excess risk (tests/test_theory_vs_sim.py)."""
    _, _, out, _, _ = _ewc_plan()
    sgd, flow = out[("v", lam)]
    z = _paired_curve_z(sgd, flow, 40 + EWC_LAMS.index(lam), f"EWC (V), lambda = {lam}: SGD MC vs flow")
    for name, zz in z.items():
        assert np.all(np.abs(zz) <= 4), (name, zz)


def _gw_gap(lam):
    """(g, w, g w) of EWC (all): seed mean of SGD - flow (paired) and its z over seeds."""
    _, _, out, _, _ = _ewc_plan()
    sgd, flow = out[("all", lam)]
    (gs, ws), (gf, wf) = P.gamma_w(sgd), P.gamma_w(flow)
    rows = {}
    for name, a, b in (("g", gs, gf), ("w", ws, wf), ("g w", gs * ws, gf * wf)):
        d = a - b
        rows[name] = (d.mean(), d.mean() / (d.std(ddof=1) / np.sqrt(d.size)))
    print(f"\nEWC (all), lambda = {lam}: SGD - flow (z): "
          + ", ".join(f"{k} {v[0]:+.4f} ({v[1]:+.1f})" for k, v in rows.items()))
    return rows


def test_ewc_all_matches_the_flow_on_the_icl_product():
    """EWC (all), lambda = 3: g w, the product the ICL channel depends on (invariant under KQ -> KQ/s,
    v -> s v), seed mean of SGD - flow within 4 seed SEs (measured -0.6 SE, while g and w alone are
    -10.1 and +9.8 SE off: the drift along the scaling orbit). Not at lambda = 0.3 (measured -7.1 SE):
    a weak pull leaves the ZS family's flat directions nearly free, as for ZS (all)."""
    assert abs(_gw_gap(EWC_LAMS[-1])["g w"][1]) <= 4


@pytest.mark.parametrize("lam", [
    pytest.param(EWC_LAMS[0], marks=pytest.mark.xfail(strict=True, reason="a weak pull leaves the ZS family's flat "
                                                      "directions nearly free: SGD's g w is 7 seed SEs off the flow's")),
    EWC_LAMS[1],
])
def test_ewc_all_flow_predicts_sgd_curves(lam):
    """EWC (all): the gradient flow of the same Runs predicts SGD's Monte Carlo curves within 4 SE at
    every task and shot (_paired_curve_z). Holds at lambda = 3, narrowly: largest |z| 3.63 (theta0,
    n = 0). SGD drifts along the scaling orbit KQ -> KQ/s, v -> s v that F does not restrain (g -10.1
    and w +9.8 seed SEs, g w -0.6), and the exact risks of the paired end points alone (no Monte Carlo)
    put SGD 3.8 % above the flow on theta0 at n = 0 (+3.9 seed SEs): a real finite-batch drift that
    20,000 test prompts per seed only just do not resolve. Not at lambda = 0.3 (strict xfail)."""
    _, _, out, _, _ = _ewc_plan()
    sgd, flow = out[("all", lam)]
    z = _paired_curve_z(sgd, flow, 50 + EWC_LAMS.index(lam), f"EWC (all), lambda = {lam}: SGD MC vs flow")
    assert all(np.all(np.abs(zz) <= 4) for zz in z.values())


# ================================================================ WiSE-FT
@pytest.mark.parametrize("merged", [True, False])
def test_wise_ft_end_points_are_the_weights_themselves(merged):
    pre = P.init_params(jax.random.PRNGKey(0), D, merged=merged)
    ft = P.init_params(jax.random.PRNGKey(1), D, merged=merged)
    for a, want in ((0.0, pre), (1.0, ft)):
        got = P.interpolate(pre, ft, a)
        assert sorted(got) == sorted(want)
        for k in want:
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))
    path = P.interpolation_path(pre, ft, [0.0, 0.5, 1.0])
    for k in pre:
        np.testing.assert_array_equal(np.asarray(path[k][0]), np.asarray(pre[k]))
        np.testing.assert_array_equal(np.asarray(path[k][2]), np.asarray(ft[k]))
        np.testing.assert_allclose(np.asarray(path[k][1]), 0.5 * np.asarray(pre[k] + ft[k]), rtol=1e-6, atol=1e-7)


def test_wise_ft_separate_interpolates_k_and_q_not_their_product():
    """For separate trees K and Q are interpolated separately: Q^T K at alpha is quadratic in alpha."""
    pre = P.init_params(jax.random.PRNGKey(0), D, merged=False)
    ft = P.init_params(jax.random.PRNGKey(1), D, merged=False)
    mid = P.interpolate(pre, ft, 0.5)
    q, k = 0.5 * (pre["Q"] + ft["Q"]), 0.5 * (pre["K"] + ft["K"])
    np.testing.assert_allclose(np.asarray(P.effective_kq(mid)), np.asarray(jnp.einsum("lhji,lhjk->lhik", q, k)),
                               rtol=1e-5, atol=1e-7)
    linear = 0.5 * (P.effective_kq(pre) + P.effective_kq(ft))
    assert float(jnp.max(jnp.abs(P.effective_kq(mid) - linear))) > 1e-4


def test_wise_ft_rejects_bad_input():
    pre = P.init_params(jax.random.PRNGKey(0), D)
    with pytest.raises(ValueError, match=r"alpha must be one number in \[0, 1\]; got 1.5"):
        P.interpolate(pre, pre, 1.5)
    with pytest.raises(ValueError, match=r"alphas must be a non-empty 1-D sequence of numbers in \[0, 1\]"):
        P.interpolation_path(pre, pre, [0.2, -0.1])
    with pytest.raises(ValueError, match="cannot interpolate a tree with leaves"):
        P.interpolate(pre, P.init_params(jax.random.PRNGKey(0), D, merged=False), 0.5)
    with pytest.raises(ValueError, match="leaf 'KQ' has shape"):
        P.interpolate(pre, P.init_params(jax.random.PRNGKey(0), D + 1), 0.5)


WISE_STEPS, WISE_BATCH, WISE_SEEDS = 300, 1000, 8
WISE_ALPHAS = (0.25, 0.6)
EARLY_STEPS = (15, 60)  # iterates kept along the way (early stopping)


def _wise_ft(subset: str):
    """ZS fine-tuning of `subset` from the pretrained form: SGD end points (seeds) and the gradient flow."""
    return _zs_runs(subset)[:3]


@functools.lru_cache(maxsize=None)
def _zs_runs(subset: str):
    """_wise_ft's end points, then SGD's and the flow's iterates at EARLY_STEPS (TrainConfig.snapshots,
    leaves (S, K, ...) and (K, ...))."""
    start = _start()
    cfg = T.TrainConfig(steps=WISE_STEPS, batch=WISE_BATCH, d=D, noise=NOISE, history=3, snapshots=EARLY_STEPS)
    runs = [T.Run(jax.random.PRNGKey(200 + s), start, _ctx(), "zs", subset, LR, ObjectiveConfig(), cfg)
            for s in range(WISE_SEEDS)]
    res = T.train_plan(runs)
    flow = flow_plan([T.Run(None, start, _ctx(), "zs", subset, LR, ObjectiveConfig(), cfg)])[0]
    return start, _stack([r.params for r in res]), flow.params, _stack([r.snapshots for r in res]), flow.snapshots


def _segment(start, sgd, a):
    """The WiSE-FT trees at alpha of every seed's end point, stacked (float64)."""
    pre = {k: np.asarray(v, np.float64) for k, v in start.items()}
    return _stack([P.interpolate(pre, _seed(sgd, s), a) for s in range(WISE_SEEDS)])


def test_wise_ft_exact_risk_matches_monte_carlo_along_the_segment():
    """Full ZS fine-tuning: Monte Carlo of the WiSE-FT weights of SGD's end points against
    wise_ft_curves of the same weights at two alphas: seed mean within 4 SE = sqrt(sum_s se_s^2) / S
    (independent prompts per seed) at every task and shot."""
    start, sgd, _ = _wise_ft("all")
    for j, a in enumerate(WISE_ALPHAS):
        trees = _segment(start, sgd, a)
        exact = np.stack([wise_ft_curves(start, _seed(sgd, s), [a], THETA0, SHOTS, NOISE)[0]
                          for s in range(WISE_SEEDS)])  # (S, T, N)
        np.testing.assert_allclose(exact, task_curves(trees, THETA0, SHOTS, NOISE), rtol=1e-12)
        mc = _mc(trees, root=60 + j)
        print(f"\nWiSE-FT alpha = {a}: MC of the interpolated SGD end points vs their exact risk")
        for t, name in enumerate(TASK_NAMES):
            m, se = mc[name]
            z = (m - exact[:, t]).mean(0) / (np.sqrt((se**2).sum(0)) / WISE_SEEDS)
            print(f"  {name:13s} exact {' '.join(f'{v:.4f}' for v in exact[:, t].mean(0))}  z "
                  f"{' '.join(f'{v:+.2f}' for v in z)}")
            assert np.all(np.abs(z) <= 4), (a, name, z)


@pytest.mark.parametrize("subset", [
    "v",
    pytest.param("all", marks=pytest.mark.xfail(strict=True, reason="finite-batch SGD drifts along the flat ZS "
                                                 "family (SPEC section 7); the flow's end point is another member")),
])
def test_wise_ft_flow_theory_against_sgd_along_the_segment(subset):
    """The theory curve (exact risk along the segment from theta_pre to the gradient-flow end point)
    against Monte Carlo of the segments to SGD's end points, at two alphas, within 4 SE
    (_paired_curve_z: every seed starts from the same theta_pre, so the flow is the same for all).
    Holds for value-only ZS; for full ZS the end point SGD reaches is another member of the flat
    minimizer family than the flow's (tests/test_theory_vs_sim.py), and the segment inherits it."""
    start, sgd, flow = _wise_ft(subset)
    theory = wise_ft_curves(start, flow, WISE_ALPHAS, THETA0, SHOTS, NOISE)  # (A, T, N)
    ok = True
    for j, a in enumerate(WISE_ALPHAS):
        trees = _segment(start, sgd, a)
        pred = _stack([P.interpolate({k: np.asarray(v, np.float64) for k, v in start.items()},
                                     {k: np.asarray(v, np.float64) for k, v in flow.items()}, a)] * WISE_SEEDS)
        np.testing.assert_allclose(task_curves(pred, THETA0, SHOTS, NOISE)[0], theory[j], rtol=1e-12)
        z = _paired_curve_z(trees, pred, 70 + j, f"WiSE-FT ({subset}) alpha = {a}: SGD segment MC vs flow segment")
        ok &= all(np.all(np.abs(zz) <= 4) for zz in z.values())
    assert ok


# ================================================================ the study
# ================================================================ early stopping
@pytest.mark.parametrize("k", [
    0,
    pytest.param(1, marks=pytest.mark.xfail(strict=True, reason="finite-batch SGD at batch 1000: by step 60 its zero-shot "
                                            "error on theta0 sits 0.018 (5.1 SE) above the flow's (0.319 vs 0.301), the "
                                            "SGD-vs-flow gap of SPEC section 7 / issue #13; at the reference batch 5000 the "
                                            "study's early stopping agrees within 4 SE up to t = 100 (README)")),
])
def test_early_stopping_flow_trajectory_predicts_sgd_iterates(k):
    """Early stopping of full ZS fine-tuning: the SGD iterates after EARLY_STEPS[k] steps (the engine's
    snapshots) against the gradient flow's own iterates at that step (the prediction), every task and
    shot within 4 SE (_paired_curve_z). Step 15 agrees (largest |z| 3.9); by step 60 the finite-batch
    gap shows on theta0 (xfail)."""
    _, _, _, snaps, flow_snaps = _zs_runs("all")
    trees = {n: v[:, k] for n, v in snaps.items()}
    pred = _stack([{n: v[k] for n, v in flow_snaps.items()}] * WISE_SEEDS)
    z = _paired_curve_z(trees, pred, 90 + k, f"early stopping at step {EARLY_STEPS[k]}: SGD iterates vs flow iterates")
    for name, zz in z.items():
        assert np.all(np.abs(zz) <= 4), (EARLY_STEPS[k], name, zz)
