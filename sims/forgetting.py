"""The forgetting study: pretrain, fine-tune with every method, evaluate against exact theory.

    python -m sims.forgetting --quick            # ~3 min on 2 CPU cores
    python -m sims.forgetting --full             # reference protocol (SPEC section 3), 5 seeds
    python -m sims.forgetting --full --batch 2000 --out runs/mine   # any field can be overridden
    python -m sims.plot DIR                      # redraw the figures from DIR/results.*

Shape notation: S training seeds, T = 3 test tasks (theta0, -theta0, random), N shot counts
(0..max_shots), W auxiliary weights, G weights of the theory frontier, D = d + 2.

Every piece of work (the pretraining of each model, each fine-tuning method, each sweep, the
theory families) is saved to DIR/pieces/NAME.npz as soon as it is done; a rerun on the same folder
loads finished pieces and computes only the missing ones. Seeds are vmapped (linattn.train).
Randomness: one root seed; every key is fold_in(root, purpose)[, seed].
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from linattn import data as D
from linattn import train as T
from linattn.evaluate import test_errors
from linattn.objectives import ObjectiveConfig
from linattn.params import init_params, params_to_json
from sims import flow as F

TASKS = F.TASKS


# ---------------------------------------------------------------- configuration
@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """One sweep. Defaults are the reference protocol (SPEC sections 1-3)."""

    preset: str = "full"  # name used in the default run folder
    seed: int = 0  # root seed: every PRNG key is folded from it
    d: int = 5  # covariate dimension
    noise: float = 0.1  # label-noise variance sigma^2
    m: int = 20  # demonstrations per pretraining prompt
    n_ft: int = 20  # demonstrations in the FS (and replay) term
    steps: int = 5000  # pretraining steps
    ft_steps: int = 5000  # steps of each fine-tuning method
    batch: int = 5000  # prompts per risk evaluation
    lr: float = 0.01  # SGD (momentum 0.9, clip 1.0) learning rate, pretraining and fine-tuning
    seeds: int = 5  # training seeds (vmapped)
    dataset: int = 100_000  # size of the fine-tuning dataset drawn from theta0
    max_shots: int = 40  # test curves at n = 0..max_shots
    eval_samples: int = 20_000  # test prompts per seed, task and shot count
    eval_chunk: int = 5_000  # prompts per compiled evaluation chunk
    sweep_methods: tuple = ("zsfs_v", "zs_replay_all")  # methods re-run at other auxiliary weights
    sweep_weights: tuple = (0.25, 4.0)  # those weights (the main run uses 1.0)
    sweep_seeds: int = 1  # seeds for the weight sweep
    frontier_weights: tuple = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)  # theory frontier
    pretrain_ds: tuple = (2, 10)  # extra covariate dimensions for the pretraining figure
    d_steps: int = 5000  # pretraining steps at those dimensions
    d_seeds: int = 3  # seeds at those dimensions
    methods: tuple = ()  # fine-tuning methods to run (names in METHODS); () for all

    def name(self) -> str:
        return (f"forgetting_{self.preset}_d{self.d}_steps{self.steps}_ft{self.ft_steps}_b{self.batch}"
                f"_nft{self.n_ft}_s{self.seeds}_seed{self.seed}")

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


PRESETS = {
    "full": StudyConfig(),
    "quick": StudyConfig(preset="quick", steps=300, ft_steps=300, batch=500, seeds=2, eval_samples=2_000,
                         eval_chunk=2_000, sweep_weights=(0.25, 4.0), frontier_weights=(0.03, 0.3, 1.0, 3.0, 30.0),
                         pretrain_ds=(2, 10), d_steps=300, d_seeds=2),
}


class Method(NamedTuple):
    name: str
    model: str  # "merged" | "separate"
    objective: str  # registered objective (linattn.objectives)
    subset: str  # trainable subset (linattn.optim.SUBSETS)
    label: str


def _methods() -> tuple[Method, ...]:
    out = []
    for sub, lab in (("all", "all"), ("kq", "KQ"), ("v", "V")):
        out += [Method(f"zs_{sub}", "merged", "zs", sub, f"ZS ({lab})"),
                Method(f"zsfs_{sub}", "merged", "zsfs", sub, f"ZS+FS ({lab})")]
    out.append(Method("zs_replay_all", "merged", "zs_replay", "all", "ZS+replay (all)"))
    for sub, lab in (("all", "all"), ("k", "K"), ("q", "Q"), ("v", "V")):
        out += [Method(f"sep_zs_{sub}", "separate", "zs", sub, f"ZS ({lab})"),
                Method(f"sep_zsfs_{sub}", "separate", "zsfs", sub, f"ZS+FS ({lab})")]
    return tuple(out)


METHODS = _methods()
METHOD_BY_NAME = {m.name: m for m in METHODS}
PRETRAINED = {"merged": "pretrained", "separate": "sep_pretrained"}


# ---------------------------------------------------------------- keys, progress, storage
def root_key(cfg: StudyConfig):
    return jax.random.PRNGKey(cfg.seed)


PURPOSE = {"theta0": 0, "dataset": 1, "init": 2, "pretrain": 3, "finetune": 4, "eval": 5, "init_sep": 6}


def key_for(cfg: StudyConfig, purpose: str, *more: int):
    k = jax.random.fold_in(root_key(cfg), PURPOSE[purpose])
    for i in more:
        k = jax.random.fold_in(k, i)
    return k


def seed_keys(cfg, purpose, n, *more):
    return jnp.stack([key_for(cfg, purpose, *more, s) for s in range(n)])


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Store:
    """DIR/pieces/NAME.npz, written atomically when a piece is finished."""

    def __init__(self, out: Path):
        self.dir = Path(out) / "pieces"
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, name):
        return self.dir / f"{name}.npz"

    def has(self, name):
        return self.path(name).exists()

    def load(self, name) -> dict:
        with np.load(self.path(name)) as z:
            return {k: z[k] for k in z.files}

    def save(self, name, arrays: dict) -> None:
        tmp = self.dir / f".{name}.tmp.npz"
        np.savez(tmp, **{k: np.asarray(v) for k, v in arrays.items()})
        os.replace(tmp, self.path(name))


class StopRequested(Exception):
    """Raised by --stop-after (a simulated crash) once that many new pieces are done."""


def pack(prefix: str, tree: dict) -> dict:
    return {f"{prefix}{k}": np.asarray(v) for k, v in tree.items()}


def unpack(prefix: str, arrays: dict) -> dict:
    return {k[len(prefix):]: jnp.asarray(v) for k, v in arrays.items() if k.startswith(prefix)}


def seed_slice(tree: dict, i) -> dict:
    return {k: v[i] for k, v in tree.items()}


# ---------------------------------------------------------------- the work
def shots_of(cfg):
    return np.arange(cfg.max_shots + 1)


def theta0_of(cfg) -> np.ndarray:
    return np.asarray(D.sample_tasks(key_for(cfg, "theta0"), 1, cfg.d, "sphere")[0], np.float64)


def evaluate_seeds(cfg, params: dict, theta0) -> tuple[np.ndarray, np.ndarray]:
    """Monte Carlo test error of each seed's parameters: mean, se of shape (S, T, N).

    Seed s uses the key fold_in(eval, s) for every method (common random numbers across methods).
    """
    S = params["V"].shape[0]
    means, ses = np.zeros((S, 3, cfg.max_shots + 1)), np.zeros((S, 3, cfg.max_shots + 1))
    for s in range(S):
        curves = test_errors(key_for(cfg, "eval", s), seed_slice(params, s), shots_of(cfg), jnp.asarray(theta0, jnp.float32),
                             noise=cfg.noise, samples=cfg.eval_samples, chunk=cfg.eval_chunk)
        for t, name in enumerate(TASKS):
            means[s, t], ses[s, t] = curves[name].mean, curves[name].se
    return means, ses


def train_cfg(cfg, objective, subset, steps, d=None) -> T.TrainConfig:
    return T.TrainConfig(objective=objective, subset=subset, steps=steps, batch=cfg.batch, d=d or cfg.d,
                         noise=cfg.noise, history=min(100, steps))


def obj_cfg(cfg, aux=1.0) -> ObjectiveConfig:
    return ObjectiveConfig(m=cfg.m, n_ft=cfg.n_ft, aux_weight=aux)


def run_pretrain(cfg, model: str, theta0) -> dict:
    """Pretraining of the merged or separate model for every seed, then evaluation."""
    S = cfg.seeds
    purpose = "init" if model == "merged" else "init_sep"
    p0 = jax.vmap(lambda k: init_params(k, cfg.d, merged=model == "merged"))(seed_keys(cfg, purpose, S))
    ctx = T.TaskContext(theta0=jnp.asarray(theta0, jnp.float32))
    tc = train_cfg(cfg, "pretrain", "all", cfg.steps)
    res = T.train_many(seed_keys(cfg, "pretrain", S, int(model == "separate")), p0, cfg.lr, ctx, obj_cfg(cfg),
                       cfg=tc, params_batched=True)
    params = {k: np.asarray(v) for k, v in res.params.items()}
    mean, se = evaluate_seeds(cfg, params, theta0)
    theory = F.exact_curves(params, theta0, shots_of(cfg), noise=cfg.noise)
    from theory.optimal import pretrain_optimum

    opt = F.exact_curves({k: v[None] for k, v in pretrain_optimum(cfg.d, cfg.m, cfg.noise).items()}, theta0,
                         shots_of(cfg), noise=cfg.noise)[0]
    return {**pack("p_", params), "history": np.asarray(res.history), "sim_mean": mean, "sim_se": se,
            "theory": theory, "theory_optimum": np.broadcast_to(opt, theory.shape)}


def finetune_data(cfg, theta0):
    return D.make_finetune_dataset(key_for(cfg, "dataset"), jnp.asarray(theta0, jnp.float32), cfg.dataset, cfg.noise)


def run_method(cfg, method: Method, pre_params: dict, theta0, data, aux=1.0, seeds=None) -> dict:
    """One fine-tuning method from each seed's pretrained parameters, then evaluation and theory."""
    S = seeds or cfg.seeds
    p0 = {k: jnp.asarray(v[:S]) for k, v in pre_params.items()}
    ctx = T.TaskContext(theta0=jnp.asarray(theta0, jnp.float32), dataset=data)
    tc = train_cfg(cfg, method.objective, method.subset, cfg.ft_steps)
    keys = seed_keys(cfg, "finetune", S, int(method.model == "separate"))
    res = T.train_many(keys, p0, cfg.lr, ctx, obj_cfg(cfg, aux), cfg=tc, params_batched=True)
    params = {k: np.asarray(v) for k, v in res.params.items()}
    mean, se = evaluate_seeds(cfg, params, theta0)
    theory = F.exact_curves(params, theta0, shots_of(cfg), noise=cfg.noise)
    flow = F.flow_many(method.objective, method.subset, p0, theta0, np.full(S, aux), steps=cfg.ft_steps, lr=cfg.lr,
                       m=cfg.m, n_ft=cfg.n_ft, noise=cfg.noise)
    flow_theory = F.exact_curves(flow, theta0, shots_of(cfg), noise=cfg.noise)
    return {**pack("p_", params), **pack("flow_", flow), "history": np.asarray(res.history), "sim_mean": mean,
            "sim_se": se, "theory": theory, "theory_optimum": flow_theory}


def run_sweep(cfg, method: Method, pre_params: dict, theta0, data) -> dict:
    """The method at each extra auxiliary weight (sweep_seeds seeds), plus the theory frontier:
    gradient flow from seed 0's pretrained parameters at every frontier weight."""
    out = {"weights": np.asarray(cfg.sweep_weights, np.float64)}
    parts = [run_method(cfg, method, pre_params, theta0, data, aux=w, seeds=cfg.sweep_seeds) for w in cfg.sweep_weights]
    for key in ("sim_mean", "sim_se", "theory", "theory_optimum"):
        out[key] = np.stack([p[key] for p in parts])  # (W, S', T, N)
    G = len(cfg.frontier_weights)
    p0 = {k: np.repeat(np.asarray(v[:1]), G, axis=0) for k, v in pre_params.items()}
    fl = F.flow_many(method.objective, method.subset, p0, theta0, np.asarray(cfg.frontier_weights), steps=cfg.ft_steps,
                     lr=cfg.lr, m=cfg.m, n_ft=cfg.n_ft, noise=cfg.noise)
    out["frontier_weights"] = np.asarray(cfg.frontier_weights, np.float64)
    out["frontier_theory"] = F.exact_curves(fl, theta0, shots_of(cfg), noise=cfg.noise)  # (G, T, N)
    return out


def run_pretrain_d(cfg, d: int) -> dict:
    """Pretraining of the merged model at another dimension; evaluation on random tasks only."""
    S = cfg.d_seeds
    sub = dataclasses.replace(cfg, d=d)
    p0 = jax.vmap(lambda k: init_params(k, d))(seed_keys(sub, "init", S, 1000 + d))
    ctx = T.TaskContext(theta0=jnp.zeros(d))
    res = T.train_many(seed_keys(sub, "pretrain", S, 1000 + d), p0, cfg.lr, ctx, obj_cfg(cfg),
                       cfg=train_cfg(cfg, "pretrain", "all", cfg.d_steps, d=d), params_batched=True)
    params = {k: np.asarray(v) for k, v in res.params.items()}
    mean, se = np.zeros((S, cfg.max_shots + 1)), np.zeros((S, cfg.max_shots + 1))
    from linattn.evaluate import test_error
    from theory.optimal import pretrain_optimum

    for s in range(S):
        c = test_error(key_for(sub, "eval", 1000 + d, s), seed_slice(params, s), shots_of(cfg), "sphere",
                       noise=cfg.noise, samples=cfg.eval_samples, chunk=cfg.eval_chunk)
        mean[s], se[s] = c.mean, c.se
    opt = F.exact_random({k: v[None] for k, v in pretrain_optimum(d, cfg.m, cfg.noise).items()}, shots_of(cfg),
                         noise=cfg.noise)[0]
    return {**pack("p_", params), "sim_mean": mean, "sim_se": se,
            "theory": F.exact_random(params, shots_of(cfg), noise=cfg.noise), "theory_optimum": opt}


def run_families(cfg, pre_params: dict, zs_flow: dict, zsfs_v_flow: dict, theta0) -> dict:
    """Theory families (SPEC section 4), from seed 0's pretrained parameters.

    - full ZS minimizer family: zs_all_member with KQ[0,0] = 1/w for several w, and the
      gradient-flow end point of full ZS fine-tuning;
    - value-only family: Gamma = g I, b = theta0/((d+4) g), product g*w on a grid; w*(n) for n = 1..40.
    """
    from theory.optimal import w_star, zs_all_member, zs_v_closed_form

    shots = shots_of(cfg)
    pre0 = seed_slice(pre_params, 0)
    fl0 = seed_slice(zs_flow, 0)
    w_flow = 1.0 / float(np.asarray(fl0["KQ"])[0, 0, 0, 0])
    zs_ws = w_flow * np.asarray([0.25, 0.5, 1.0, 2.0, 4.0])
    members = [zs_all_member(pre0, theta0, 1.0 / w) for w in zs_ws]
    zs_curves = F.exact_curves({k: np.stack([np.asarray(p[k]) for p in members]) for k in members[0]}, theta0, shots,
                               noise=cfg.noise)
    omegas = np.asarray([0.0, 0.3, 0.5, w_star(cfg.d, cfg.n_ft, cfg.noise), 0.79245, 1.0])
    vs = [zs_v_closed_form(cfg.d, 1.0, om, theta0) for om in omegas]
    v_curves = F.exact_curves({k: np.stack([np.asarray(p[k]) for p in vs]) for k in vs[0]}, theta0, shots,
                              noise=cfg.noise)
    n_grid = np.arange(1, cfg.max_shots + 1)
    g, w = F.gamma_w(zsfs_v_flow)
    return {"zs_w": zs_ws, "zs_w_flow": np.asarray(w_flow), "zs_curves": zs_curves,
            "v_omega": omegas, "v_curves": v_curves, "wstar_n": n_grid,
            "wstar": np.asarray([w_star(cfg.d, int(n), cfg.noise) for n in n_grid]),
            "zsfs_v_flow_omega": g * w}


# ---------------------------------------------------------------- the sweep driver
def selected_methods(cfg: StudyConfig) -> tuple[Method, ...]:
    """The methods a config runs: cfg.methods (plus what the sweeps and theory families need), or all."""
    if not cfg.methods:
        return METHODS
    unknown = [n for n in cfg.methods if n not in METHOD_BY_NAME]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; allowed: {[m.name for m in METHODS]}")
    wanted = set(cfg.methods) | set(cfg.sweep_methods) | {"zs_all", "zsfs_v"}
    return tuple(m for m in METHODS if m.name in wanted)


def versions() -> dict:
    import optax

    import linattn

    dev = jax.devices()[0]
    return {"jax": jax.__version__, "optax": optax.__version__, "numpy": np.__version__,
            "linattn": linattn.__version__, "python": platform.python_version(),
            "device": f"{dev.platform}: {getattr(dev, 'device_kind', '')}, {os.cpu_count()} cores"}


def check_config(out: Path, cfg: StudyConfig) -> None:
    path = out / "config.json"
    if path.exists():
        old = json.loads(path.read_text()).get("config", {})
        new = cfg.to_json()
        default = StudyConfig(preset=cfg.preset).to_json()
        diff = [k for k in new if (old[k] if k in old else default[k]) != new[k]]
        if diff:
            raise ValueError(f"{out} holds a run with a different config ({', '.join(diff)} differ); "
                             "choose another --out or delete the folder")
    path.write_text(json.dumps({"config": cfg.to_json(), "root_seed": cfg.seed, "versions": versions()}, indent=1))


def run_study(cfg: StudyConfig, out, *, stop_after: int | None = None, figures: bool = True) -> dict:
    """Run (or resume) the whole study into `out`; returns the results dictionary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_config(out, cfg)
    store = Store(out)
    theta0 = theta0_of(cfg)
    todo = (["pretrain_merged", "pretrain_separate"] + [m.name for m in selected_methods(cfg)]
            + [f"sweep_{n}" for n in cfg.sweep_methods] + [f"pretrain_d{d}" for d in cfg.pretrain_ds] + ["families"])
    done_now, t_start = 0, time.time()
    cache: dict = {}
    data = None

    def get(name):
        if name not in cache:
            cache[name] = store.load(name)
        return cache[name]

    for i, name in enumerate(todo):
        if store.has(name):
            log(f"[{i + 1}/{len(todo)}] {name}: already done, loaded")
            continue
        if stop_after is not None and done_now >= stop_after:
            raise StopRequested(f"stopped after {done_now} new pieces (--stop-after)")
        t0 = time.time()
        log(f"[{i + 1}/{len(todo)}] {name}: running ...")
        if name.startswith("pretrain_d"):
            arrays = run_pretrain_d(cfg, int(name[len("pretrain_d"):]))
        elif name.startswith("pretrain_"):
            arrays = run_pretrain(cfg, name[len("pretrain_"):], theta0)
        elif name == "families":
            arrays = run_families(cfg, unpack("p_", get("pretrain_merged")), unpack("flow_", get("zs_all")),
                                  unpack("flow_", get("zsfs_v")), theta0)
        else:
            data = data if data is not None else finetune_data(cfg, theta0)
            method = METHOD_BY_NAME[name[len("sweep_"):] if name.startswith("sweep_") else name]
            pre = unpack("p_", get(f"pretrain_{method.model}"))
            arrays = (run_sweep if name.startswith("sweep_") else run_method)(cfg, method, pre, theta0, data)
        arrays["seconds"] = np.asarray(time.time() - t0)
        store.save(name, arrays)
        cache[name] = arrays
        done_now += 1
        log(f"[{i + 1}/{len(todo)}] {name}: done in {time.time() - t0:.1f} s (total {time.time() - t_start:.0f} s)")
    results = assemble(cfg, out, store, theta0)
    if figures:
        from sims import plot

        plot.plot_all(out)
    return results


# ---------------------------------------------------------------- results
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


def curves_json(cfg, piece: dict, with_opt=True) -> dict:
    mean, se, mc, th, th_se = seed_stats(piece["sim_mean"], piece["sim_se"], piece["theory"])
    opt = piece["theory_optimum"].mean(0) if with_opt else None
    out = {}
    for t, name in enumerate(TASKS):
        out[name] = {"shots": shots_of(cfg).tolist(), "sim_mean": mean[t].tolist(), "sim_se": se[t].tolist(),
                     "theory": th[t].tolist(), "theory_optimum": None if opt is None else opt[t].tolist(),
                     "sim_se_mc": mc[t].tolist(), "theory_se_seeds": th_se[t].tolist()}
    return out


def agreement(curve: dict) -> dict:
    """Largest gaps, in standard errors, over all shot counts of one curve."""
    sim, th = np.asarray(curve["sim_mean"]), np.asarray(curve["theory"])
    out = {"sim_vs_theory_max_se": float(np.max(np.abs(sim - th) / np.asarray(curve["sim_se_mc"])))}
    if curve["theory_optimum"] is not None:
        opt = np.asarray(curve["theory_optimum"])
        z = np.abs(sim - opt) / np.asarray(curve["sim_se"])
        out["sim_vs_optimum_max_se"] = float(np.max(z))
        out["sim_vs_optimum_worst_shot"] = int(np.argmax(z))
        out["sim_vs_optimum_max_rel"] = float(np.max(np.abs(sim - opt) / opt))
    return out


def assemble(cfg, out: Path, store: Store, theta0) -> dict:
    """Write DIR/results.json and DIR/results.npz from the pieces."""
    methods, arrays, timing = {}, {"theta0": theta0, "shots": shots_of(cfg)}, {}
    entries = [(PRETRAINED["merged"], "pretrain_merged", None), (PRETRAINED["separate"], "pretrain_separate", None)]
    entries += [(m.name, m.name, m) for m in selected_methods(cfg)]
    for name, piece_name, m in entries:
        piece = store.load(piece_name)
        params = unpack("p_", piece)
        methods[name] = {
            "params": params_to_json(seed_slice(params, 0)),
            "curves": curves_json(cfg, piece),
            "model": m.model if m else piece_name.split("_")[1],
            "objective": m.objective if m else "pretrain",
            "subset": m.subset if m else "all",
            "label": m.label if m else "pretrained",
            "train_eval_seconds": float(piece["seconds"]),
        }
        methods[name]["agreement"] = {t: agreement(c) for t, c in methods[name]["curves"].items()}
        timing[name] = float(piece["seconds"])
        for k in ("sim_mean", "sim_se", "theory", "theory_optimum", "history"):
            arrays[f"{name}/{k}"] = piece[k]
        for k, v in params.items():
            arrays[f"{name}/params/{k}"] = np.asarray(v)
    sweeps = {}
    for n in cfg.sweep_methods:
        piece = store.load(f"sweep_{n}")
        sweeps[n] = {"weights": piece["weights"].tolist(), "frontier_weights": piece["frontier_weights"].tolist()}
        for k in ("sim_mean", "sim_se", "theory", "theory_optimum", "frontier_theory"):
            arrays[f"sweep/{n}/{k}"] = piece[k]
        timing[f"sweep_{n}"] = float(piece["seconds"])
    pre_d = {}
    for d in (*cfg.pretrain_ds,):
        piece = store.load(f"pretrain_d{d}")
        for k in ("sim_mean", "sim_se", "theory", "theory_optimum"):
            arrays[f"pretrain_d{d}/{k}"] = piece[k]
        pre_d[str(d)] = float(piece["seconds"])
        timing[f"pretrain_d{d}"] = float(piece["seconds"])
    fam = store.load("families")
    for k, v in fam.items():
        arrays[f"families/{k}"] = v
    results = {"config": cfg.to_json(), "versions": versions(), "theta0": theta0.tolist(), "tasks": list(TASKS),
               "methods": methods, "sweeps": sweeps, "pretrain_ds": [cfg.d, *cfg.pretrain_ds],
               "seconds": timing}
    (out / "results.json").write_text(json.dumps(results))
    np.savez(out / "results.npz", **arrays)
    return results


# ---------------------------------------------------------------- CLI
def build_config(args) -> StudyConfig:
    cfg = PRESETS["quick" if args.quick else "full"]
    over = {}
    for f in dataclasses.fields(StudyConfig):
        v = getattr(args, f.name, None)
        if v is None or f.name == "preset":
            continue
        over[f.name] = tuple(v) if isinstance(f.default, tuple) else v
    return dataclasses.replace(cfg, **over)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sims.forgetting", description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="small run, ~3 min on 2 CPU cores (default)")
    g.add_argument("--full", action="store_true", help="reference protocol: 5000 steps, batch 5000, 5 seeds")
    p.add_argument("--out", default=None, help="run folder (default runs/<name from hyperparameters>)")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many new pieces (test resume)")
    p.add_argument("--no-figures", action="store_true", help="skip drawing (python -m sims.plot DIR draws later)")
    for f in dataclasses.fields(StudyConfig):
        if f.name == "preset":
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, tuple):
            typ = float if f.default and isinstance(f.default[0], float) else (int if f.default and isinstance(f.default[0], int) else str)
            p.add_argument(flag, type=typ, nargs="*", default=None, help=f"override (default {f.default})")
        else:
            p.add_argument(flag, type=type(f.default), default=None, help=f"override (default {f.default})")
    args = p.parse_args(argv)
    if not args.full:
        args.quick = True
    cfg = build_config(args)
    out = Path(args.out) if args.out else Path("runs") / cfg.name()
    log(f"run folder {out}; config {json.dumps(cfg.to_json())}")
    t0 = time.time()
    try:
        run_study(cfg, out, stop_after=args.stop_after, figures=not args.no_figures)
    except StopRequested as err:
        log(str(err))
        return 3
    except ValueError as err:
        print(f"python -m sims.forgetting: error: {err}", file=sys.stderr)
        return 2
    log(f"finished in {time.time() - t0:.0f} s; results in {out}/results.json, figures in {out}/")
    return 0


if __name__ == "__main__":
    jax.config.update("jax_default_matmul_precision", "highest")
    sys.exit(main())
