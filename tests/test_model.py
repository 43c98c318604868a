"""Model: shapes, prompt builder, merged vs separate, fast path vs full apply, hand-built weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linattn import data, model, nn, params as P


def _prompts(key, n=6, batch=4, d=3):
    return data.sample_prompts(key, n, batch, d, "sphere", 0.1)


def test_prompt_layout_and_zeroed_query():
    x = jnp.arange(12.0).reshape(1, 4, 3)
    y = jnp.array([[1.0, 2.0, 3.0, 4.0]])
    Z = data.build_prompt(x, y)
    assert Z.shape == (1, 4, 5)
    np.testing.assert_array_equal(Z[0, :, 0], 1.0)
    np.testing.assert_array_equal(Z[0, :, 1:4], x[0])
    np.testing.assert_array_equal(Z[0, :, -1], [1.0, 2.0, 3.0, 0.0])


def test_sampled_prompt_shapes():
    Z, y = _prompts(jax.random.PRNGKey(0), n=7, batch=5, d=4)
    assert Z.shape == (5, 8, 6) and y.shape == (5,)
    np.testing.assert_array_equal(Z[:, -1, -1], 0.0)


@pytest.mark.parametrize("layers,heads", [(1, 1), (1, 3), (2, 2)])
def test_fast_query_path_equals_full_apply(layers, heads):
    p = P.init_params(jax.random.PRNGKey(1), 3, layers=layers, heads=heads, std=0.3)
    Z, _ = _prompts(jax.random.PRNGKey(2))
    for norm in ("tokens", "shots"):
        full = model.apply(p, Z, normalization=norm)[:, -1, -1]
        np.testing.assert_allclose(model.predict(p, Z, normalization=norm), full, rtol=1e-5, atol=1e-6)


def test_apply_matches_explicit_attention_matrix():
    """The O(N D^2) apply equals the textbook (1/N)(Z Wq^T)(Z Wk^T)^T(Z Wv^T), heads averaged."""
    p = P.init_params(jax.random.PRNGKey(3), 3, heads=2, merged=False, std=0.3)
    Z, _ = _prompts(jax.random.PRNGKey(4))
    N = Z.shape[1]
    ref = Z
    outs = []
    for h in range(2):
        Wq, Wk, Wv = p["Q"][0, h], p["K"][0, h], p["V"][0, h]
        A = (Z @ Wq.T) @ jnp.swapaxes(Z @ Wk.T, 1, 2)
        outs.append(A @ (Z @ Wv.T) / N)
    ref = Z + sum(outs) / 2
    np.testing.assert_allclose(model.apply(p, Z), ref, rtol=1e-5, atol=1e-6)


def test_merged_and_separate_agree_when_kq_is_qt_k():
    sep = P.init_params(jax.random.PRNGKey(5), 3, heads=2, layers=2, merged=False, std=0.3)
    merged = P.to_merged(sep)
    np.testing.assert_allclose(merged["KQ"], jnp.einsum("lhji,lhjk->lhik", sep["Q"], sep["K"]), rtol=1e-6)
    Z, _ = _prompts(jax.random.PRNGKey(6))
    np.testing.assert_allclose(model.predict(sep, Z), model.predict(merged, Z), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalization,scale", [("tokens", lambda n: 1 / (n + 1)), ("shots", lambda n: 1 / n)])
def test_hand_built_icl_weights(normalization, scale):
    """Gamma = c I, v = e_y predicts c * norm * sum_j x_q.x_j y_j (the query's own term is 0)."""
    d, n, c = 3, 6, 0.7
    p = P.icl_params(d, c, 1.0)
    Z, _ = _prompts(jax.random.PRNGKey(7), n=n, d=d)
    x, y, xq = Z[:, :-1, 1:-1], Z[:, :-1, -1], Z[:, -1, 1:-1]
    want = c * scale(n) * jnp.einsum("bd,bnd,bn->b", xq, x, y)
    np.testing.assert_allclose(model.predict(p, Z, normalization=normalization), want, rtol=1e-5, atol=1e-6)


def test_zero_padding_with_true_n_is_exact():
    p = P.init_params(jax.random.PRNGKey(8), 3, layers=2, heads=2, std=0.3)
    Z, _ = _prompts(jax.random.PRNGKey(9), n=4)
    padded = jnp.concatenate([jnp.zeros((4, 3, 5)), Z], axis=1)
    np.testing.assert_allclose(model.predict(p, padded, n=4), model.predict(p, Z), rtol=1e-5, atol=1e-6)


def test_flax_module_uses_the_same_tree():
    mod = nn.LinearAttention(d=3, heads=2, merged=False)
    Z, _ = _prompts(jax.random.PRNGKey(10))
    variables = mod.init(jax.random.PRNGKey(11), Z)
    tree = variables["params"]
    assert set(tree) == {"K", "Q", "V"} and tree["V"].shape == (1, 2, 5, 5)
    np.testing.assert_allclose(mod.apply(variables, Z), model.apply(tree, Z), rtol=1e-6)
    np.testing.assert_allclose(mod.apply(variables, Z, method="predict"), model.predict(tree, Z), rtol=1e-6)


def test_bad_shapes_raise_clear_errors():
    p = P.init_params(jax.random.PRNGKey(0), 3)
    Z, _ = _prompts(jax.random.PRNGKey(1), d=4)
    with pytest.raises(ValueError, match=r"d = 3 .*token width"):
        model.predict(p, Z)
    with pytest.raises(ValueError, match="keys"):
        model.predict({"V": p["V"]}, Z)
    with pytest.raises(ValueError, match="shape"):
        model.predict({"V": p["V"], "KQ": p["KQ"][0]}, Z)
    with pytest.raises(ValueError, match="normalization 'bogus'"):
        model.predict(p, _prompts(jax.random.PRNGKey(1), d=3).Z, normalization="bogus")
    with pytest.raises(ValueError, match="got -1"):
        data.sample_prompts(jax.random.PRNGKey(0), -1, 2, 3)


def test_predict_prefixes_is_the_prediction_of_every_prefix():
    from linattn.data import prompt_stats, sample_prompts
    from linattn.model import predict_many_from_stats, predict_prefixes

    ps = [P.init_params(jax.random.PRNGKey(i), 3, heads=2, std=0.5, merged=bool(i % 2)) for i in range(4)]
    Z, _ = sample_prompts(jax.random.PRNGKey(9), 6, 16, 3)
    got = predict_prefixes(ps, Z, normalization="shots")
    for n in range(7):
        Zn = jnp.concatenate([Z[:, :n], Z[:, -1:]], axis=1)
        zq, S = prompt_stats(Zn)
        want = predict_many_from_stats(ps, zq, S, n, normalization="shots")
        np.testing.assert_allclose(got[:, n], want, rtol=2e-5, atol=2e-6)
