"""The Monte Carlo risk source of the engine: one minibatch per (shots, task), shared by methods.

Shape notation: B prompts, M methods reading a term, D = d + 2.

`monte_carlo(key, params, requests, cfg, ctx)` returns the minibatch mean squared error of every
requested term {(method, shots, task source): value}; `prompt_errors` the B squared errors it
averages. Each (shots, task source) pair draws its B
prompts once, from the key fold_in(fold_in(key, shots), source index), so every method of a
program sees the same prompts (common random numbers). One-layer models read the prompts through
their statistics (zq, S), with S packed (linattn.model.predict_many_from_packed: one matrix product
for the M methods), drawn directly by the statistics sampler where that pays (resolve_sampler),
and for the fine-tuning dataset by summing per-example moments (linattn.data.sample_dataset_stats).
Deeper models and other registered models (linattn.models: the softmax transformer) read the
tokens themselves through their model's predict.
The exact counterpart with the same signature is theory.risk.exact_source.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from linattn import data as D
from linattn.model import packed_outer_sum, predict_many_from_packed
from linattn.models import dtype_of, effective_tree, model_of
from linattn.objectives import TASK_SOURCES, task_spec


# The statistics sampler's program compiles about 1.4 s longer than the token sampler's (its
# chi-square rejection loop), and each draw it saves saves about 12 ns of the step (the token
# prompts' outer products included): 1000 pretraining steps at batch 5000, d = 5, took 2.05 s with
# it and 7.55 s without (2-core Xeon of BENCHMARKS.md, sequential Threefry). "auto" takes it when
# the draws it saves are worth more than its compilation.
STATS_WORTH_DRAWS = 1.2e8


def draw_price(d: int) -> float:
    """What one draw the statistics sampler saves is worth in training, relative to d = 5 (the
    calibration of STATS_WORTH_DRAWS): token prompts cost more than their draws as D grows (their
    packed outer products). Measured per prompt, tokens minus statistics, in --quick's pretraining
    programs (300 steps at batch 500, 2 slots): 6 ns per saved draw at d = 2, 6.2 at d = 5, 49 at
    d = 10, about (P / 28)^2 times d = 5's with P = D(D + 1)/2 (28 at d = 5; BENCHMARKS.md, sixth session)."""
    P = (d + 2) * (d + 3) / 2
    return max(1.0, (P / 28.0) ** 2)


def resolve_sampler(name: str, one_layer: bool, saved_per_prompt: int = None, prompts: int = None) -> str:
    """"auto" -> "tokens" for deeper models; for one-layer models "stats", unless `prompts` prompts
    that each draw `saved_per_prompt` fewer numbers with it (in d = 5 draws: training prices them
    with draw_price) save fewer than STATS_WORTH_DRAWS (short runs then skip its longer
    compilation). Checks the name."""
    if name == "auto":
        if not one_layer:
            return "tokens"
        if prompts is None:
            return "stats"
        return "stats" if saved_per_prompt * prompts > STATS_WORTH_DRAWS else "tokens"
    if name not in D.SAMPLERS:
        raise ValueError(f"sampler {name!r} unknown; allowed: {sorted(D.SAMPLERS)} or 'auto'")
    if name == "stats" and not one_layer:
        raise ValueError("sampler 'stats' is for one-layer models; these parameters have more layers "
                         "(use sampler='tokens' or 'auto')")
    return name


def _draw(key, shots: int, task: str, cfg, ctx, dtype, sampler: str, tokens: bool):
    """(zq, packed S, Z or None, y) of cfg.batch prompts of one task source (Z: the tokens, drawn
    only when a deeper model reads them)."""
    if task == "target" and ctx.dataset is not None:
        if not tokens:
            zq, Sp, y = D.sample_dataset_stats(key, ctx.dataset, shots, cfg.batch)
            return zq.astype(dtype), Sp.astype(dtype), None, y.astype(dtype)
        Z, y = D.sample_from_dataset(key, ctx.dataset, shots, cfg.batch)
        Z = Z.astype(dtype)
        return Z[:, -1], packed_outer_sum(Z), Z, y.astype(dtype)
    args = (key, shots, cfg.batch, cfg.d, task_spec(task, ctx.theta0, cfg.tasks), cfg.noise, ctx.cov_factor, dtype)
    if sampler == "stats" and not tokens:
        zq, Sp, y = D.SAMPLERS["stats"](*args)
        return zq, Sp, None, y
    Z, y = D.SAMPLERS["tokens"](*args)
    return Z[:, -1], packed_outer_sum(Z), Z, y


def monte_carlo(key, params: Sequence[Mapping], requests: Mapping, cfg, ctx) -> dict:
    """Minibatch estimates of every requested risk term: the means of prompt_errors.

    Args:
      key: this step's key (linattn.step folds in the step and, split over devices, the device).
      params: the M methods' parameter trees.
      requests: {(shots, task source): (method indices)}.
      cfg: linattn.train.TrainConfig (batch, d, noise, tasks, normalization, sampler).
      ctx: linattn.train.TaskContext.
    Returns:
      {(method, shots, task source): scalar mean squared error}.
    """
    return {t: jnp.mean(e, axis=0) for t, e in prompt_errors(key, params, requests, cfg, ctx).items()}


def prompt_errors(key, params: Sequence[Mapping], requests: Mapping, cfg, ctx) -> dict:
    """The squared error of every prompt of every requested term (arguments as monte_carlo):
    {(method, shots, task source): (B,)}. Reparametrised trees (LoRA) are read through their
    linear tree (linattn.models.effective_tree), differentiably."""
    params = [effective_tree(p) for p in params]
    one_layer = all(model_of(p).one_layer(p) for p in params)
    dtype = dtype_of(params[0])
    out = {}
    for (shots, task), ms in requests.items():
        saved = (D.draws_per_prompt("tokens", shots, cfg.d) - D.draws_per_prompt("stats", shots, cfg.d)) * draw_price(cfg.d)
        sampler = resolve_sampler(cfg.sampler, one_layer, saved, cfg.program_prompts)
        k = jax.random.fold_in(jax.random.fold_in(key, shots), list(TASK_SOURCES).index(task))
        deep = [m for m in ms if not model_of(params[m]).one_layer(params[m])]
        zq, Sp, Z, y = _draw(k, shots, task, cfg, ctx, dtype, sampler, tokens=bool(deep))
        flat = [m for m in ms if m not in deep]
        for heads in sorted({params[m]["V"].shape[1] for m in flat}):
            same = [m for m in flat if params[m]["V"].shape[1] == heads]
            pred = predict_many_from_packed([params[m] for m in same], zq, Sp, shots, normalization=cfg.normalization)
            err = (pred.astype(dtype) - y[:, None]) ** 2
            out.update({(m, shots, task): err[:, j] for j, m in enumerate(same)})
        for m in deep:
            pred = model_of(params[m]).predict(params[m], Z, normalization=cfg.normalization)
            out[(m, shots, task)] = (pred - y) ** 2
    return out
