"""LoRA-style low-rank updates (linattn.lora; issue 10): the reparametrisation, freezing, rank,
the exact theory through it, and the gradient flow against SGD.

A LoRA tree {"KQ0", "V0", "A_t", "B_t"} computes the merged linear model with W_t = W_t0 + A_t B_t^T;
every consumer reads it through linattn.lora.effective (registered as the lora model's `effective`),
so SGD (Monte Carlo source), the gradient flow (exact source) and evaluation need no LoRA code of
their own. Monte Carlo checks follow SPEC section 6: |theory - estimate| <= 4 standard errors.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linattn import evaluate as E, lora, model as M, params as P, train as T
from linattn.models import effective_tree, model_of
from linattn.objectives import ObjectiveConfig
from linattn.optim import param_labels
from theory.optimal import pretrain_c, zs_v_closed_form
from theory.risk import population_objective, task_curves
from theory.solver import flow_plan

D = 5
NOISE = 0.1
G0 = 0.64
W0 = pretrain_c(D, 20, NOISE) / G0  # the pretraining optimum's product c = g w (SPEC section 4)
_rng = np.random.default_rng(20261124)
THETA0 = _rng.normal(size=D)
THETA0 /= np.linalg.norm(THETA0)
SHOTS = np.array([0, 5, 20])


def _base(dtype=jnp.float32):
    return P.icl_params(D, G0, W0, dtype=dtype)


def _perturbed(s, dtype=jnp.float32):
    """Seed s's 'pretrained' weights: the optimum's form plus N(0, 0.02^2) entries (the exact optimum has
    v = w e_y, at which the ZS gradient of KQ vanishes, so KQ adapters would not move)."""
    return {k: v + 0.02 * jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(300 + s), i), v.shape, dtype)
            for i, (k, v) in enumerate(_base(dtype).items())}


def test_start_is_the_pretrained_model_exactly():
    """init_lora: A = 0, so the effective tree, the predictions and the exact risk are the base's, bit for bit."""
    base = _perturbed(0)
    Z = jax.random.normal(jax.random.PRNGKey(1), (64, 11, D + 2))
    Z = Z.at[:, :, 0].set(1.0).at[:, -1, -1].set(0.0)
    for target in lora.TARGETS:
        for r in (1, D + 2):
            tree = lora.init_lora(jax.random.PRNGKey(r), base, r, target)
            assert model_of(tree).name == "lora" and lora.rank_of(tree) == r
            a, b = lora.TARGETS[target]
            assert tree[a].shape == (1, 1, D + 2, r) and not np.any(np.asarray(tree[a]))
            assert np.all(np.asarray(tree[b]) != 0)
            eff = lora.effective(tree)
            for k in ("KQ", "V"):
                np.testing.assert_array_equal(np.asarray(eff[k]), np.asarray(base[k]))
            np.testing.assert_array_equal(np.asarray(lora.predict(tree, Z)), np.asarray(M.predict(base, Z)))
    # B: N(0, std^2) entries from the key, std = 1/sqrt(d+2) by default (each column of expected squared norm 1)
    key = jax.random.PRNGKey(4)
    tree = lora.init_lora(key, base, 2, "v")
    np.testing.assert_array_equal(np.asarray(tree["B_v"]),
                                  np.asarray((1 / np.sqrt(D + 2)) * jax.random.normal(key, (1, 1, D + 2, 2))))


def test_bad_input_names_the_value_and_what_is_allowed():
    base = _base()
    for r in (0, -1, D + 3, 1.5, "2", True):
        with pytest.raises(ValueError, match=rf"LoRA rank {r!r} not allowed; allowed: an integer 1\.\.{D + 2}"):
            lora.init_lora(jax.random.PRNGKey(0), base, r, "kq")
    with pytest.raises(ValueError, match=r"LoRA target 'q' unknown; allowed: \['kq', 'v'\]"):
        lora.init_lora(jax.random.PRNGKey(0), base, 1, "q")
    sep = P.init_params(jax.random.PRNGKey(0), D, merged=False)
    with pytest.raises(ValueError, match=r"LoRA adapts the merged \(KQ, V\) model; got the separate \(K, Q, V\) model"):
        lora.init_lora(jax.random.PRNGKey(0), sep, 1, "kq")
    with pytest.raises(ValueError, match="init std must be a finite number > 0; got -1.0"):
        lora.init_lora(jax.random.PRNGKey(0), base, 1, "kq", std=-1.0)
    tree = lora.init_lora(jax.random.PRNGKey(0), base, 2, "kq")
    with pytest.raises(ValueError, match=r"subset 'all' unknown; allowed: \['lora', 'lora_kq', 'lora_v'\] \(the lora model's\)"):
        param_labels(tree, "all")
    with pytest.raises(ValueError, match=r"subset 'lora_v' trains \['A_v', 'B_v'\], none of which this lora tree has"):
        param_labels(tree, "lora_v")
    with pytest.raises(ValueError, match=r"LoRA tree has leaves \['A_kq', 'KQ0', 'V0'\]; expected"):
        lora.effective({k: v for k, v in tree.items() if k != "B_kq"})
    with pytest.raises(ValueError, match=r"LoRA factors of 'kq' have shapes \(1, 1, 7, 2\) and \(1, 1, 7, 3\)"):
        lora.effective({**tree, "B_kq": jnp.zeros((1, 1, D + 2, 3))})
    with pytest.raises(ValueError, match=r"LoRA tree has token width 7 \(d = 5\) but the data has d = 4"):
        lora.check_lora(tree, 4)
    assert param_labels(tree, "lora") == {"KQ0": "freeze", "V0": "freeze", "A_kq": "train", "B_kq": "train"}


CASES = [("kq", 1), ("kq", 2), ("v", 1), ("v", 2)]
STEPS, BATCH, SEEDS = 100, 1000, 6


@functools.lru_cache(maxsize=None)
def _plan():
    """SGD and the gradient flow of the same Runs: the CASES x SEEDS LoRA trees (seed s: its own
    perturbed pretrained weights and its own key for B), ZS on theta0, one plan each."""
    cfg = T.TrainConfig(steps=STEPS, batch=BATCH, d=D, noise=NOISE, history=3)
    ctx = T.TaskContext(theta0=jnp.asarray(THETA0, jnp.float32))
    runs = [T.Run(jax.random.PRNGKey(s), lora.init_lora(jax.random.fold_in(jax.random.PRNGKey(7), s), _perturbed(s), r, t),
                  ctx, "zs", "lora", 0.01, ObjectiveConfig(), cfg, name=f"{t}{r}[{s}]")
            for t, r in CASES for s in range(SEEDS)]
    sgd = T.train_plan(runs)
    flow = flow_plan([T.Run(None, r.params0, r.ctx, r.objective, r.subset, r.lr, r.obj, r.cfg, r.name) for r in runs])
    return runs, sgd, flow


def _singular_values(a):
    return np.linalg.svd(np.asarray(a, np.float64)[0, 0], compute_uv=False)


@pytest.mark.parametrize("case", CASES, ids=[f"{t}{r}" for t, r in CASES])
def test_training_leaves_the_base_and_has_rank_at_most_r(case):
    """SGD and the flow: KQ0 and V0 bit for bit unchanged, the factors moved, and the effective update
    (effective tree minus base) has rank <= r: singular values past the r-th at rounding level. On V
    the update is the label row alone (rank 1 at any r): one layer reads only that row (SPEC section 2)."""
    target, r = case
    runs, sgd, flow = _plan()
    name = "KQ" if target == "kq" else "V"
    for i, run in enumerate(runs):
        if run.name.startswith(f"{target}{r}["):
            for res, dtype in ((sgd[i], np.float32), (flow[i], np.float64)):
                for k in lora.BASE:
                    np.testing.assert_array_equal(np.asarray(res.params[k]), np.asarray(run.params0[k], dtype))
                a, _ = lora.TARGETS[target]
                assert float(np.max(np.abs(res.params[a]))) > 0
                with jax.enable_x64(True):  # the update in the run's own precision, minus the base
                    eff = effective_tree({k: jnp.asarray(v, dtype) for k, v in res.params.items()})[name]
                upd = np.asarray(eff, np.float64) - np.asarray(res.params[f"{name}0"], np.float64)
                s = _singular_values(upd)
                rounding = 8 * (D + 2) * np.finfo(dtype).eps * np.abs(res.params[f"{name}0"]).max()
                assert s[0] > 100 * rounding and np.all(s[r:] <= rounding), (run.name, s)
                if target == "v":  # one layer: only the label row of V has a gradient, so the update is that row
                    assert not np.any(upd[..., :-1, :]), run.name


def test_zero_gradient_at_the_value_only_optimum(r=2):
    """V adapters (r = 2) can reach the value-only ZS minimizer (theory.optimal.zs_v_closed_form): with
    A_v[-1] = e_1 and B_v[:, 0] = v* - v0 (other columns random), the exact ZS gradient of every
    factor vanishes (float64), while at the LoRA start it does not."""
    with jax.enable_x64(True):
        base = _base(jnp.float64)
        opt = zs_v_closed_form(D, G0, W0, THETA0)
        tree = lora.init_lora(jax.random.PRNGKey(r), base, r, "v")
        grad_zs = jax.jit(jax.grad(lambda p: population_objective("zs", p, 0.0, ObjectiveConfig(), THETA0, NOISE)))
        start_grad = grad_zs(tree)
        tree["A_v"] = tree["A_v"].at[0, 0, -1, 0].set(1.0)
        tree["B_v"] = tree["B_v"].at[0, 0, :, 0].set(opt["V"][0, 0, -1] - base["V"][0, 0, -1])
        np.testing.assert_allclose(np.asarray(lora.effective(tree)["V"][0, 0, -1]), np.asarray(opt["V"][0, 0, -1]),
                                   rtol=0, atol=1e-15)
        grad = grad_zs(tree)
    g0 = float(np.max(np.abs(np.asarray(start_grad["A_v"]))))
    g = max(float(np.max(np.abs(np.asarray(grad[k])))) for k in lora.TARGETS["v"])
    print(f"\nV LoRA rank {r}: max |ZS gradient| {g0:.3g} at the start, {g:.1e} at the value-only optimum")
    assert g0 > 1e-3 and g <= 1e3 * np.finfo(np.float64).eps


@pytest.mark.parametrize("case", CASES, ids=[f"{t}{r}" for t, r in CASES])
def test_flow_predicts_sgd_within_4_se(case):
    """The gradient flow through the factorisation (the exact source) predicts SGD's Monte Carlo test
    curves within 4 SE at every task and shot: seed mean of MC curves of SGD's end points against the
    seed mean of the exact curves of the paired flow end points, SE^2 = [Var_s(exact(sgd_s) -
    exact(flow_s)) + mean_s se_s^2] / S (the spread around each seed's own prediction, known without
    sampling error, plus the Monte Carlo error)."""
    target, r = case
    runs, sgd, flow = _plan()
    idx = [i for i, run in enumerate(runs) if run.name.startswith(f"{target}{r}[")]
    stack = lambda res: {k: np.stack([np.asarray(res[i].params[k]) for i in idx]) for k in res[idx[0]].params}  # noqa: E731
    s_tree, f_tree = stack(sgd), stack(flow)
    root = jax.random.PRNGKey(900 + 10 * r + (target == "v"))  # each seed on its own prompts: independent MC errors
    mc = [E.test_errors(jax.random.fold_in(root, s), {k: v[s] for k, v in s_tree.items()}, SHOTS,
                        jnp.asarray(THETA0, jnp.float32), noise=NOISE, samples=10_000) for s in range(len(idx))]
    ex_s = task_curves(s_tree, THETA0, SHOTS, NOISE)  # (S, T, N), LoRA trees read through their effective tree
    ex_f = task_curves(f_tree, THETA0, SHOTS, NOISE)
    print(f"\nLoRA {target} rank {r}, {SEEDS} seeds, {STEPS} steps, batch {BATCH}; shots {SHOTS.tolist()}")
    for t, name in enumerate(E.TEST_TASKS):
        m, se = (np.stack([np.asarray(getattr(c[name], f)) for c in mc]) for f in ("mean", "se"))
        sd = np.sqrt(((ex_s[:, t] - ex_f[:, t]).var(0, ddof=1) + (se ** 2).mean(0)) / len(idx))
        z = (m.mean(0) - ex_f[:, t].mean(0)) / sd
        print(f"  {name:13s} SGD {np.round(m.mean(0), 4)} flow {np.round(ex_f[:, t].mean(0), 4)} z {np.round(z, 2)}")
        assert np.all(np.abs(z) <= 4), (name, z)
