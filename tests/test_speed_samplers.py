"""The fast exact samplers match the token-level ones in distribution (SPEC section 6).

Every comparison is a two-sample (or exact-value) check within 4 standard errors plus float
tolerance: moments of the prompt statistics S = sum z z^T (means and second moments of each
entry), of the query label, and of the one-layer prediction's squared error. Also: the gamma /
chi-square sampler against exact moments, the fused multi-method trainer against single runs, and
that second calls of the compiled programs do not recompile.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linattn import data as D
from linattn import evaluate
from linattn.model import pack, packed_outer_sum, predict, predict_from_stats, predict_many_from_stats, unpack
from linattn.params import init_params

D_COV = 4
SAMPLES = 60_000


def _close(a_mean, a_se, b_mean, b_se, what):
    se = np.sqrt(a_se**2 + b_se**2)
    tol = 4 * se + 1e-5 * (1 + np.abs(b_mean))
    bad = np.abs(a_mean - b_mean) > tol
    assert not bad.any(), (what, np.argwhere(bad)[:5], a_mean[bad][:5], b_mean[bad][:5], tol[bad][:5])


def _moments(x):
    """Mean and its standard error along axis 0 (float64)."""
    x = np.asarray(x, np.float64)
    return x.mean(0), x.std(0, ddof=1) / np.sqrt(x.shape[0])


SHAPES = np.array([0.3, 0.5, 1.0, 1.5, 4.0, 9.5])


def test_gamma_sampler_matches_exact_moments():
    """Mean a and variance a of Gamma(a, 1), including the boosted shapes a < 1."""
    a = jnp.broadcast_to(jnp.asarray(SHAPES, jnp.float32), (200_000, SHAPES.size))
    x = np.asarray(jax.jit(D.sample_gamma)(jax.random.PRNGKey(0), a), np.float64)
    assert np.all(x > 0) and np.all(np.isfinite(x))
    _close(*_moments(x), SHAPES, np.zeros_like(SHAPES), "gamma mean")
    # E (x - a)^2 = a, its se from the 4th central moment 3a^2 + 6a
    dev2 = (x - SHAPES) ** 2
    se = np.sqrt((3 * SHAPES**2 + 6 * SHAPES - SHAPES**2) / x.shape[0])
    _close(dev2.mean(0), se, SHAPES, np.zeros_like(SHAPES), "gamma variance")


def test_chi2_integer_dof_mean_and_variance():
    dof = jnp.broadcast_to(jnp.arange(1.0, 7.0), (100_000, 6))
    x = np.asarray(jax.jit(D.sample_chi2)(jax.random.PRNGKey(1), dof), np.float64)
    k = np.arange(1.0, 7.0)
    m, se = _moments(x)
    _close(m, se, k, np.zeros(6), "chi2 mean")
    _close(*_moments((x - k) ** 2), 2 * k, np.zeros(6), "chi2 variance")


_stats = jax.jit(D.sample_prompt_stats, static_argnums=(1, 2, 3))
_tokens = jax.jit(D.sample_prompts, static_argnums=(1, 2, 3))


CASES = [
    (0, "sphere", None),
    (1, "sphere", None),
    (3, "theta", None),
    (20, "sphere", None),
    (20, "theta", "cov"),
]


def _task(kind):
    return np.linspace(-1.0, 1.0, D_COV) / np.linalg.norm(np.linspace(-1.0, 1.0, D_COV)) if kind == "theta" else kind


def _cov(kind):
    if kind is None:
        return None
    a = np.linspace(-0.5, 0.5, D_COV * D_COV).reshape(D_COV, D_COV)
    return np.linalg.cholesky(np.eye(D_COV) * 0.7 + a @ a.T).astype(np.float32)


@pytest.mark.parametrize("n,task,cov", CASES)
def test_prompt_stats_match_token_prompts(n, task, cov):
    """Means and second moments of every S entry, and of the query label, within 4 SE."""
    task, cov = _task(task), _cov(cov)
    task = task if isinstance(task, str) else jnp.asarray(task, jnp.float32)
    st = jax.jit(lambda k: D.sample_prompt_stats(k, n, SAMPLES, D_COV, task, 0.1, cov))(jax.random.PRNGKey(10 + n))
    tk = jax.jit(lambda k: D.sample_prompts(k, n, SAMPLES, D_COV, task, 0.1, cov))(jax.random.PRNGKey(20 + n))
    zq_t, S_t = D.prompt_stats(tk.Z)
    iu = np.triu_indices(D_COV + 2)
    a = np.asarray(st.S)[:, iu[0], iu[1]]
    b = np.asarray(S_t)[:, iu[0], iu[1]]
    _close(*_moments(a), *_moments(b), "E S_ij")
    _close(*_moments(a**2), *_moments(b**2), "E S_ij^2")
    _close(*_moments(a[:, 1:] * a[:, -1:]), *_moments(b[:, 1:] * b[:, -1:]), "E S_ij S_label")
    _close(*_moments(np.asarray(st.zq)), *_moments(np.asarray(zq_t)), "E zq")
    _close(*_moments(np.asarray(st.y)[:, None] * np.asarray(st.zq)),
           *_moments(np.asarray(tk.y)[:, None] * np.asarray(zq_t)), "E y zq")
    _close(*_moments(np.asarray(st.y) ** 2), *_moments(np.asarray(tk.y) ** 2), "E y^2")


@pytest.mark.parametrize("n", [0, 2, 20])
def test_prediction_error_distribution_matches(n):
    """Mean, second moment and deciles' exceedance rates of the squared error (random params)."""
    p = init_params(jax.random.PRNGKey(3), D_COV, merged=False, std=0.3)
    st = _stats(jax.random.PRNGKey(30 + n), n, SAMPLES, D_COV)
    tk = _tokens(jax.random.PRNGKey(40 + n), n, SAMPLES, D_COV)
    e_st = np.asarray(jax.jit(lambda p, s: (predict_from_stats(p, s.zq, s.S, n) - s.y) ** 2)(p, st), np.float64)
    e_tk = np.asarray(jax.jit(lambda p, t: (predict(p, t.Z) - t.y) ** 2)(p, tk), np.float64)
    _close(*_moments(e_st[:, None]), *_moments(e_tk[:, None]), "E err")
    _close(*_moments(e_st[:, None] ** 2), *_moments(e_tk[:, None] ** 2), "E err^2")
    # the distribution: P(err > q) at the token sample's deciles (binomial standard errors)
    q = np.quantile(e_tk, np.linspace(0.1, 0.9, 9))
    _close(*_moments(e_st[:, None] > q[None]), *_moments(e_tk[:, None] > q[None]), "P(err > q)")


def test_sampler_dtype_float64():
    with jax.enable_x64(True):
        st = jax.jit(lambda k: D.sample_prompt_stats(k, 5, 16, D_COV, dtype=jnp.float64))(jax.random.PRNGKey(0))
        assert st.S.dtype == jnp.float64 and st.zq.dtype == jnp.float64 and st.y.dtype == jnp.float64


def test_second_evaluation_calls_do_not_recompile():
    p0 = init_params(jax.random.PRNGKey(1), 3, merged=False)
    for seed, scale in [(0, 0.01), (1, 0.02)]:
        evaluate.test_error(jax.random.PRNGKey(seed), p0, [0, 3, 7], jnp.ones(3) * scale, samples=64, chunk=32)
    sampler = evaluate.choose_sampler("auto", True, [0, 3, 7], 3, 64)
    assert evaluate._curve_program(3, 32, 2, 7, 0.1, "tokens", sampler, "sphere")._cache_size() == 1


@pytest.mark.parametrize("merged,heads,normalization", [(False, 1, "tokens"), (True, 2, "shots"), (False, 3, "tokens")])
def test_many_model_prediction_equals_the_token_model(merged, heads, normalization):
    """predict_many_from_stats (predict_many_from_packed, the form training and evaluation use) equals linattn.model.predict
    on the very prompts, model by model."""
    ps = [init_params(jax.random.PRNGKey(5 + i), D_COV, merged=merged, heads=heads, std=0.4) for i in range(5)]
    for n in (0, 1, 7):
        Z, _ = D.sample_prompts(jax.random.PRNGKey(n), n, 50, D_COV)
        got = predict_many_from_stats(ps, Z[:, -1], jnp.einsum("bni,bnj->bij", Z, Z), n, normalization=normalization)
        for m, p in enumerate(ps):
            want = predict(p, Z, normalization=normalization)
            np.testing.assert_allclose(got[:, m], want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("n", [0, 1, 20])
def test_dataset_stats_are_the_statistics_of_the_dataset_prompts(n):
    """sample_dataset_stats (what training reads) gives the packed statistics of the very prompts
    sample_from_dataset draws with the same key: the same query and label, S up to rounding."""
    theta0 = jnp.asarray(_task("theta"), jnp.float32)
    ds = D.make_finetune_dataset(jax.random.PRNGKey(7), theta0, 1000, 0.1)
    key = jax.random.PRNGKey(8 + n)
    st = D.sample_dataset_stats(key, ds, n, 300)
    tk = D.sample_from_dataset(key, ds, n, 300)
    zq, S = D.prompt_stats(tk.Z)
    np.testing.assert_array_equal(st.zq, zq)
    np.testing.assert_array_equal(st.y, tk.y)
    np.testing.assert_allclose(st.Sp, pack(S), rtol=1e-5, atol=1e-5)


def test_packed_and_matrix_statistics_are_one_form():
    """pack and unpack are inverse; packed_outer_sum is pack of the token prompts' S; the (B, D, D)
    statistics sampler is the packed one unpacked, draw for draw."""
    Z, _ = D.sample_prompts(jax.random.PRNGKey(0), 6, 40, D_COV)
    zq, S = D.prompt_stats(Z)
    np.testing.assert_allclose(packed_outer_sum(Z), pack(S), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(unpack(pack(S), D_COV + 2), (S + jnp.swapaxes(S, -1, -2)) / 2)
    key = jax.random.PRNGKey(1)
    full, packed = D.sample_prompt_stats(key, 9, 30, D_COV), D.sample_packed_stats(key, 9, 30, D_COV)
    np.testing.assert_array_equal(full.zq, packed.zq)
    np.testing.assert_array_equal(full.y, packed.y)
    np.testing.assert_array_equal(pack(full.S), packed.Sp)
    np.testing.assert_array_equal(full.S, jnp.swapaxes(full.S, -1, -2))
