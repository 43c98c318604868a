"""Monte Carlo test error at many shot counts, with standard errors (SPEC sections 3 and 6).

Shape notation: S shot counts, C chunks of b prompts, N_max = max shots + 1 tokens, M models.

Several models (parameter trees stacked on a leading axis M) are evaluated on the same prompts,
and every shot count of a chunk reads the same prompts: they are drawn nested in n
(linattn.data.sample_nested_prompts), so one prompt of N_max - 1 demonstrations gives the n-shot prompt
of every n as its first n demonstrations. One-layer models read all prefixes at once
(linattn.model.predict_prefixes); deeper models and the other registered models (linattn.models:
the softmax transformer, the baselines) see the prompt with demonstrations past n zeroed, which a
linear attention layer ignores when told the true n and the softmax model masks. Each point is still an average of
independent prompts with its own standard error; points at different n share prompts (common
random numbers), which makes differences between shot counts less noisy.

The statistics sampler ("stats", one layer) draws each shot count's prompts separately at a cost
independent of n; "auto" takes it when few shot counts are asked for at a large n.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from linattn import data as D
from linattn.minibatch import resolve_sampler
from linattn.model import predict_many_from_packed, predict_prefixes
from linattn.models import dtype_of, effective_tree, is_stacked, model_of
from linattn.objectives import task_spec

# the three test tasks of the study (SPEC section 6): name -> task source
TEST_TASKS = {"theta0": "target", "minus_theta0": "minus_target", "random": "random"}


class Curve(NamedTuple):
    """Test error by shot count; the one result type of simulation, theory and baselines."""

    shots: np.ndarray  # (S,) int
    mean: np.ndarray  # (S,) mean squared error of the query prediction
    se: np.ndarray  # (S,) its standard error (zeros for exact theory)


def _errors(pred, y):
    """Means and sums of squared deviations over the prompt axis 0 of squared errors."""
    err = (pred - y) ** 2
    mean = jnp.mean(err, axis=0)
    return mean, jnp.sum((err - mean[None]) ** 2, axis=0)


def _chunk_errors(params, key, shots, nmax: int, b: int, d: int, task, noise, cov_factor, normalization, sampler):
    """Means and sums of squared deviations (S, M) of b squared errors at each of the S shot counts
    (a traced int array) for M stacked models, on one chunk's prompts."""
    dtype = dtype_of(params)
    model = model_of(params)
    M = params[model.ref_leaf].shape[0]
    models = [jax.tree.map(lambda a, i=i: a[i], params) for i in range(M)]
    if sampler == "stats":
        def at(n):
            zq, Sp, y = D.SAMPLERS["stats"](jax.random.fold_in(key, n), n, b, d, task, noise, cov_factor, dtype)
            pred = predict_many_from_packed(models, zq, Sp, n, normalization=normalization).astype(dtype)
            return _errors(pred, y[:, None])
        return jax.lax.map(at, shots)
    Z, y = D.sample_nested_prompts(key, nmax, b, d, task, noise, cov_factor, dtype)
    if model.one_layer(models[0]):
        pred = predict_prefixes(models, Z, normalization=normalization).astype(dtype)  # (b, N_max, M)
        return _errors(pred[:, shots], y[:, None, None])

    def at(n):
        Zn = jnp.where((jnp.arange(nmax + 1) < n) | (jnp.arange(nmax + 1) == nmax), 1.0, 0.0)[None, :, None] * Z
        pred = jax.vmap(lambda p: model.predict(p, Zn, normalization=normalization, n=n), out_axes=1)(params)
        return _errors(pred, y[:, None])
    return jax.lax.map(at, shots)


def choose_sampler(sampler: str, one_layer: bool, shots, d: int, prompts: int = None) -> str:
    """Evaluation's sampler: "auto" -> the nested token prompts, or for one-layer models statistics
    drawn per shot count where they save enough draws over `prompts` prompts per shot count
    (minibatch.resolve_sampler): one nested prompt costs draws_per_prompt("tokens", N_max - 1, d),
    the statistics S times draws_per_prompt("stats", n, d)."""
    nested = D.draws_per_prompt("tokens", int(np.max(shots)), d)
    saved = nested - len(shots) * D.draws_per_prompt("stats", 0, d)
    return resolve_sampler(sampler, one_layer, saved, prompts)


def test_error(key, params: Mapping, shots: Sequence[int], task="sphere", *, noise: float = 0.1,
               samples: int = 20_000, chunk: int = 5_000, cov_factor=None,
               normalization: str = "tokens", sampler: str = "auto") -> Curve:
    """Monte Carlo test error E[(y_hat - y_q)^2] at each shot count, with standard errors.

    Args:
      key: PRNG key; chunk c uses fold_in(key, c) for every shot count (the statistics sampler
        folds in n too), so with a given sampler a point does not depend on the list of shots.
      params: one parameter tree, or M trees stacked on a leading axis (then mean and se are (M, S)).
      task: "sphere", "gaussian" (fresh task per prompt) or a fixed (d,) vector such as theta0.
      samples: prompts per shot count (rounded up to whole chunks).
      sampler: "tokens" (nested prompts shared by the shot counts), "stats" (one layer only) or
        "auto" (choose_sampler).
    """
    return _curves([key], params, shots, [task], noise=noise, samples=samples, chunk=chunk, cov_factor=cov_factor,
                   normalization=normalization, sampler=sampler)[0]


def test_errors(key, params: Mapping, shots: Sequence[int], theta0, **kwargs) -> dict[str, Curve]:
    """Curves on the TEST_TASKS: theta0, -theta0 (unseen in fine-tuning) and fresh unit-sphere tasks,
    in one compiled program. Task i of TEST_TASKS uses the key fold_in(key, i)."""
    theta0 = jnp.asarray(theta0)
    tasks = [task_spec(source, theta0, "sphere") for source in TEST_TASKS.values()]
    keys = [jax.random.fold_in(key, i) for i in range(len(tasks))]
    curves = _curves(keys, params, shots, tasks, **{**test_error.__kwdefaults__, **kwargs})
    return dict(zip(TEST_TASKS, curves))


def _curves(keys, params, shots, tasks, *, noise, samples, chunk, cov_factor, normalization, sampler) -> list[Curve]:
    """Curves of every task in `tasks` (strings or fixed vectors), each with its key, one program.
    Reparametrised trees (LoRA) are evaluated as their linear tree (linattn.models.effective_tree)."""
    params = effective_tree(params)
    many = is_stacked(params)
    if not many:
        params = jax.tree.map(lambda a: jnp.asarray(a)[None], dict(params))
    model = model_of(params)
    first = {k: v[0] for k, v in params.items()}
    model.check(first, None)
    shots = D.check_shots(shots)
    if shots.size == 0:
        raise ValueError("need at least one shot count")
    d = model.d(first)
    if d is None:  # a baseline: any d, read from the fixed task or the study's theta0
        d = next((int(np.shape(t)[-1]) for t in tasks if not isinstance(t, str)), None)
        if d is None:
            raise ValueError(f"the {model.name} baseline has no d of its own; give a fixed task (e.g. theta0)")
    sampler = choose_sampler(sampler, model.one_layer(first), shots, d, samples)
    b = min(chunk, samples)
    n_chunks = -(-samples // b)
    nmax = int(shots.max())
    kinds = {t for t in tasks if isinstance(t, str)}
    if len(kinds) > 1:
        raise ValueError(f"one random task distribution per call; got {sorted(kinds)}")
    kind = kinds.pop() if kinds else "sphere"
    dtype = dtype_of(params)
    thetas = jnp.stack([jnp.zeros(d, dtype) if isinstance(t, str) else jnp.asarray(t, dtype) for t in tasks])
    if thetas.shape[1:] != (d,):
        raise ValueError(f"fixed task has shape {thetas.shape[1:]}; expected ({d},) for d = {d}")
    random = jnp.asarray([isinstance(t, str) for t in tasks])
    means, ss = _curve_program(d, b, n_chunks, nmax, noise, normalization, sampler, kind)(
        params, jnp.stack(keys), jnp.asarray(shots), thetas, random, cov_factor)
    means = np.swapaxes(np.asarray(means, np.float64), 1, 2)  # (T, S, C, M)
    ss = np.swapaxes(np.asarray(ss, np.float64), 1, 2)
    # combine equal chunks: total variance = within-chunk + between-chunk parts
    total = n_chunks * b
    mean = means.mean(axis=2)
    var = (ss.sum(axis=2) + b * ((means - mean[:, :, None]) ** 2).sum(axis=2)) / (total - 1)
    mean, se = np.swapaxes(mean, 1, 2), np.swapaxes(np.sqrt(var / total), 1, 2)  # (T, M, S)
    return [Curve(shots, m, e) if many else Curve(shots, m[0], e[0]) for m, e in zip(mean, se)]


_PROGRAMS: dict = {}


def _curve_program(d, b, n_chunks, nmax, noise, normalization, sampler, kind: str):
    """One jitted program per static shape: lax.map over tasks and chunks (shot counts inside).

    Task t draws its prompts' tasks from `kind` where random[t], else uses thetas[t]; both paths
    share one body, so the program is compiled once whatever the tasks.
    """
    sig = (d, b, n_chunks, nmax, noise, normalization, sampler, kind)
    if sig in _PROGRAMS:
        return _PROGRAMS[sig]

    def program(params, keys, shots, thetas, random, cov_factor):
        def per_task(args):
            key, theta, rand = args

            def per_chunk(c):
                k_task, k = jax.random.split(jax.random.fold_in(key, c))
                task = jnp.where(rand, D.sample_tasks(k_task, b, d, kind, theta.dtype), theta[None, :])
                return _chunk_errors(params, k, shots, nmax, b, d, task, noise, cov_factor, normalization, sampler)

            return jax.lax.map(per_chunk, jnp.arange(n_chunks))  # (C, S, M)

        return jax.lax.map(per_task, (keys, thetas, random))

    _PROGRAMS[sig] = jax.jit(program)
    return _PROGRAMS[sig]


def seed_stats(sim_mean, sim_se, theory):
    """Seed average and its standard errors (arrays (S, ..., N)).

    sim_se combines the Monte Carlo error, sqrt(sum_s se_s^2)/S, with the seed-to-seed spread of
    the trained models, estimated without Monte Carlo noise from the spread of their exact risks:
    sim_se^2 = var_s(theory_s)/S + sum_s se_s^2 / S^2.
    """
    S = sim_mean.shape[0]
    mc = np.sqrt(np.sum(sim_se**2, axis=0)) / S
    seed = np.std(theory, axis=0, ddof=1) / np.sqrt(S) if S > 1 else np.zeros_like(mc)
    return sim_mean.mean(0), np.sqrt(mc**2 + seed**2), mc, theory.mean(0), seed
