"""The forgetting study: pretrain, fine-tune with every method, evaluate against exact theory.

    python -m sims.forgetting --quick            # the README's main job (about 49 s on 2 CPU cores, cold)
    python -m sims.forgetting --full             # reference protocol (SPEC section 3), 5 seeds
    python -m sims.forgetting --full --batch 2000 --out runs/mine   # any field can be overridden
    python -m sims.plot DIR                      # redraw the figures from DIR/results.*

Shape notation: S training seeds, T = 3 test tasks (linattn.evaluate.TEST_TASKS), N shot counts
(0..max_shots), W auxiliary weights, G weights of the theory frontier, D = d + 2.

The study is one plan per stage on the training engine (linattn.train.train_plan):
  A. pretraining: merged and separate models at d (S seeds, sharing each seed's minibatches) and
     the merged model at every d in pretrain_ds;
  B. every fine-tuning method, the auxiliary-weight sweeps and zs_l2 (pulled toward each seed's own
     pretrained weights), fused on each seed's minibatches; LoRA methods (Method.start) train
     adapters around each seed's pretrained weights and are saved as the linear trees they compute;
  C. the theory: population gradient flow (theory.solver.flow_plan) of every method and seed, and
     the frontier over auxiliary weights, in one exact plan.
Each piece (DIR/pieces/NAME.npz) is saved as soon as it is evaluated, and the trained parameters of
a stage are saved as soon as the stage's plan returns; a rerun on the same folder loads finished
pieces and trains only what is missing. Randomness: one root seed; every key is
fold_in(root, purpose)[, seed].
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from linattn import data as D
from linattn import train as T
from linattn.evaluate import TEST_TASKS, seed_stats, test_errors
from linattn.objectives import ObjectiveConfig
from linattn.params import gamma_w, init_params, interpolate, params_to_json, to_merged
from linattn.records import versions
from theory.risk import task_curves
from theory.sgd import path_runs, path_stats
from theory.solver import flow_plan

TASKS = tuple(TEST_TASKS)


# ---------------------------------------------------------------- configuration
@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """One study. Defaults are the reference protocol (SPEC sections 1-3).

    `train` is the pretraining TrainConfig (steps, batch, d, noise); fine-tuning uses it with
    ft_steps steps. `objective` holds m, n_ft, the schedule and the zs_l2 strength.
    """

    preset: str = "full"  # name used in the default run folder
    seed: int = 0  # root seed: every PRNG key is folded from it
    train: T.TrainConfig = T.TrainConfig(steps=5000, batch=5000, d=5, noise=0.1)
    objective: ObjectiveConfig = ObjectiveConfig(m=20, n_ft=20, l2=0.1)
    ft_steps: int = 5000  # steps of each fine-tuning method
    lr: float = 0.01  # SGD (momentum 0.9, clip 1.0) learning rate, pretraining and fine-tuning
    seeds: int = 5  # training seeds
    dataset: int = 100_000  # size of the fine-tuning dataset drawn from theta0
    max_shots: int = 40  # test curves at n = 0..max_shots
    eval_samples: int = 20_000  # test prompts per seed, task and shot count
    eval_chunk: int = 5_000  # prompts per compiled evaluation chunk
    sweep_methods: tuple = ("zsfs_v", "zs_replay_all", "zs_l2_all", "ewc_all")  # re-run at other auxiliary weights
    sweep_weights: tuple = (0.25, 4.0)  # those weights (the main run uses 1.0)
    sweep_seeds: int = 1  # seeds for the weight sweep
    frontier_weights: tuple = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)  # theory frontier
    pretrain_ds: tuple = (2, 10)  # extra covariate dimensions for the pretraining figure
    d_steps: int = 5000  # pretraining steps at those dimensions
    d_seeds: int = 3  # seeds at those dimensions
    methods: tuple = ()  # fine-tuning methods to run (names in METHODS); () for all
    early_stops: tuple = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)  # fractions of ft_steps where iterates are kept
    sgd_paths: int = 2  # SGD-aware prediction (theory.sgd): noise paths per run (method or sweep cell); 0: none
    sgd_probe: int = 256  # its probe prompts per risk term and step (TrainConfig.probe; DERIVATIONS section 8)

    @property
    def d(self) -> int:
        return self.train.d

    @property
    def noise(self) -> float:
        return self.train.noise

    def name(self) -> str:
        """Default run folder name: preset, main sizes, and the methods when a subset is chosen."""
        t = self.train
        only = f"_only-{'+'.join(self.methods)}" if self.methods else ""
        return (f"forgetting_{self.preset}_d{t.d}_steps{t.steps}_ft{self.ft_steps}_b{t.batch}"
                f"_nft{self.objective.n_ft}_s{self.seeds}_seed{self.seed}{only}")

    def to_json(self) -> dict:
        def plain(v):
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return list(v) if isinstance(v, tuple) else v

        return plain(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, obj: dict) -> "StudyConfig":
        """The inverse of to_json (DIR/config.json's "config"). Training fields TrainConfig no longer
        has (e.g. "shards", which runs before 2026-12-07 wrote) are skipped: the engine set them, not
        the user."""
        tup = lambda v: tuple(v) if isinstance(v, list) else v
        known = {f.name for f in dataclasses.fields(T.TrainConfig)}
        train = {k: v for k, v in obj["train"].items() if k in known}
        train = dict(train, optimizer=T.OptimizerConfig(**obj["train"]["optimizer"]))
        train = T.TrainConfig(**{k: tup(v) for k, v in train.items()})
        objective = ObjectiveConfig(**{k: tup(v) for k, v in obj["objective"].items()})
        return cls(**{k: tup(v) for k, v in obj.items() if k not in ("train", "objective")}, train=train,
                   objective=objective)


# CLI flag -> (nested config, field) for the fields of the library configs a study overrides
NESTED = {"steps": ("train", "steps"), "batch": ("train", "batch"), "d": ("train", "d"), "noise": ("train", "noise"),
          "m": ("objective", "m"), "n_ft": ("objective", "n_ft"), "l2": ("objective", "l2")}


def study_config(**fields) -> StudyConfig:
    """StudyConfig from flat overrides: top-level fields and the NESTED names (steps, batch, d, ...)."""
    base = StudyConfig(preset=fields.pop("preset", "full"))
    nested = {"train": {}, "objective": {}}
    for k in [k for k in fields if k in NESTED]:
        group, f = NESTED[k]
        nested[group][f] = fields.pop(k)
    unknown = [k for k in fields if k not in {f.name for f in dataclasses.fields(StudyConfig)}]
    if unknown:
        raise ValueError(f"unknown study settings {unknown}")
    return dataclasses.replace(base, train=dataclasses.replace(base.train, **nested["train"]),
                               objective=dataclasses.replace(base.objective, **nested["objective"]), **fields)


PRESETS = {
    "full": StudyConfig(),
    "quick": study_config(preset="quick", steps=300, ft_steps=300, batch=500, seeds=2, eval_samples=2_000,
                          eval_chunk=2_000, frontier_weights=(0.03, 0.3, 1.0, 3.0, 30.0), d_steps=300, d_seeds=2),
}


class Method(NamedTuple):
    name: str
    model: str  # "merged" | "separate"
    objective: str  # registered objective (linattn.objectives)
    subset: str  # trainable subset (linattn.optim.SUBSETS)
    label: str
    # per-run data: per_run(cfg, obj, pretrained, seed) -> the run's ObjectiveConfig, given the study
    # config, the run's ObjectiveConfig (aux_weight set) and the model's stacked pretrained weights
    per_run: Optional[Callable] = None
    # a reparametrisation to train: start(cfg, pretrained, seed) -> the run's starting tree, given the
    # seed's own pretrained weights (e.g. lora_start: a LoRA tree around them); None: those weights
    start: Optional[Callable] = None


def pull_to_pretrained(cfg, obj: ObjectiveConfig, pretrained: dict, seed: int) -> ObjectiveConfig:
    """Per-run data of a pull toward the pretrained weights (L2-SP): ref_params = the seed's own."""
    return dataclasses.replace(obj, ref_params={k: v[seed] for k, v in pretrained.items()})


def l2_sp_data(cfg, obj: ObjectiveConfig, pretrained: dict, seed: int) -> ObjectiveConfig:
    """zs_l2's per-run data: the seed's pretrained weights, strength l2 x the auxiliary weight (so the
    sweeps and the frontier trace it)."""
    return dataclasses.replace(pull_to_pretrained(cfg, obj, pretrained, seed), l2=cfg.objective.l2 * obj.aux_weight)


def ewc_data(cfg, obj: ObjectiveConfig, pretrained: dict, seed: int) -> ObjectiveConfig:
    """ewc's per-run data: the seed's pretrained weights and the curvature there (ewc_curvatures);
    lambda is the auxiliary weight."""
    return dataclasses.replace(pull_to_pretrained(cfg, obj, pretrained, seed),
                               curvature=ewc_curvatures(cfg, pretrained)[seed])


LORA_RANKS = (1, 2)  # the LoRA methods' ranks (fig8 traces them with r = 0, the pretrained model)
LORA_LABELS = {"kq": "KQ", "v": "V"}


def lora_start(target: str, rank: int) -> Callable:
    """Method.start of ZS with LoRA of `rank` on `target` ("kq" or "v"): linattn.lora.init_lora around
    the seed's pretrained weights, its random factor from key fold_in(fold_in(root, "lora"), seed)."""
    from linattn.lora import check_target, init_lora

    check_target(target)

    def start(cfg, pretrained: dict, seed: int) -> dict:
        return init_lora(key_for(cfg, "lora", seed), pretrained, rank, target)

    return start


def lora_name(target: str, rank: int) -> str:
    return f"zs_lora_{target}{rank}"


def _methods() -> tuple[Method, ...]:
    out = []
    for sub, lab in (("all", "all"), ("kq", "KQ"), ("v", "V")):
        out += [Method(f"zs_{sub}", "merged", "zs", sub, f"ZS ({lab})"),
                Method(f"zsfs_{sub}", "merged", "zsfs", sub, f"ZS+FS ({lab})")]
    out.append(Method("zs_replay_all", "merged", "zs_replay", "all", "ZS+replay (all)"))
    out.append(Method("zs_l2_all", "merged", "zs_l2", "all", "ZS+L2 to pretrained (all)", l2_sp_data))
    out.append(Method("ewc_all", "merged", "ewc", "all", "EWC (all)", ewc_data))
    for t, lab in LORA_LABELS.items():
        out += [Method(lora_name(t, r), "merged", "zs", f"lora_{t}", f"ZS, LoRA rank {r} ({lab})", start=lora_start(t, r))
                for r in LORA_RANKS]
    for sub, lab in (("all", "all"), ("k", "K"), ("q", "Q"), ("v", "V")):
        out += [Method(f"sep_zs_{sub}", "separate", "zs", sub, f"ZS ({lab})"),
                Method(f"sep_zsfs_{sub}", "separate", "zsfs", sub, f"ZS+FS ({lab})")]
    return tuple(out)


METHODS: list[Method] = list(_methods())  # the study's methods, in order; register_method adds to it
METHOD_BY_NAME = {m.name: m for m in METHODS}
PRETRAINED = {"merged": "pretrained", "separate": "sep_pretrained"}
MODEL_SUBSETS = {"merged": ("all", "kq", "v"), "separate": ("all", "k", "q", "v")}  # subsets with leaves to train


def register_method(method: Method) -> Method:
    """Add a fine-tuning method to the study: `--methods`, every figure and results.json then know it.

    The objective must be registered (linattn.objectives) and the subset valid for the model;
    per_run (optional) gives each run its own data (e.g. pull_to_pretrained for L2-SP); start
    (optional) trains a reparametrisation of the pretrained weights (lora_start), whose subset names
    are its model's (linattn.models; checked against the start tree when the plan is built).
    """
    from linattn.objectives import get_objective

    if method.name in METHOD_BY_NAME or method.name in PRETRAINED.values():
        raise ValueError(f"method {method.name!r} is already registered")
    if method.model not in PRETRAINED:
        raise ValueError(f"method {method.name!r}: model {method.model!r} unknown; allowed: {list(PRETRAINED)}")
    get_objective(method.objective)
    allowed = MODEL_SUBSETS[method.model]
    if method.start is None and method.subset not in allowed:
        raise ValueError(f"method {method.name!r}: subset {method.subset!r} unknown for the {method.model} model; "
                         f"allowed: {allowed}")
    if method.start is not None and not callable(method.start):
        raise ValueError(f"method {method.name!r}: start must be a function (cfg, pretrained, seed) -> parameter tree "
                         f"or None; got {method.start!r}")
    if method.per_run is not None and not callable(method.per_run):
        raise ValueError(f"method {method.name!r}: per_run must be a function (cfg, obj, pretrained, seed) -> "
                         f"ObjectiveConfig or None; got {method.per_run!r}")
    METHODS.append(method)
    METHOD_BY_NAME[method.name] = method
    return method


# ---------------------------------------------------------------- keys, progress, storage
def root_key(cfg: StudyConfig):
    return jax.random.PRNGKey(cfg.seed)


PURPOSE = {"theta0": 0, "dataset": 1, "init": 2, "pretrain": 3, "finetune": 4, "eval": 5, "init_sep": 6,
           "sgd_gap": 7, "sgd_aware": 8, "lora": 9}


def key_for(cfg: StudyConfig, purpose: str, *more: int):
    k = jax.random.fold_in(root_key(cfg), PURPOSE[purpose])
    for i in more:
        k = jax.random.fold_in(k, i)
    return k


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
    """Raised by --stop-after (a simulated crash) once that many new pieces (a sweep: cells) are done."""


def pack(prefix: str, tree: dict) -> dict:
    return {f"{prefix}{k}": np.asarray(v) for k, v in tree.items()}


def unpack(prefix: str, arrays: dict) -> dict:
    return {k[len(prefix):]: np.asarray(v) for k, v in arrays.items() if k.startswith(prefix)}


def plan_name(tag: str, runs: list) -> str:
    """The store name of a plan's saved results (by the names of its runs)."""
    import hashlib

    return f".plan_{tag}_{hashlib.sha1('|'.join(r.name for r in runs).encode()).hexdigest()[:12]}"


def planned(store: Store, tag: str, runs: list, train) -> list:
    """train(runs), or the results a killed earlier attempt saved for the very same runs.

    The results of a whole plan are kept in DIR/pieces/.plan_TAG.npz until the pieces built from
    them are saved, so a kill during evaluation does not lose the training.
    """
    name = plan_name(tag, runs)
    if store.has(name):
        z = store.load(name)
        log(f"{tag}: loaded the trained runs of an interrupted attempt")
        return [T.TrainResult(unpack(f"{i}/p/", z), z[f"{i}/history"], z[f"{i}/final_loss"], z[f"{i}/diverged_at"],
                              unpack(f"{i}/s/", z) or None) for i in range(len(runs))]
    res = train(runs)
    arrays = {}
    for i, r in enumerate(res):
        arrays.update({f"{i}/p/{k}": v for k, v in r.params.items()})
        arrays.update({f"{i}/s/{k}": v for k, v in (r.snapshots or {}).items()})
        arrays.update({f"{i}/history": r.history, f"{i}/final_loss": r.final_loss, f"{i}/diverged_at": r.diverged_at})
    store.save(name, arrays)
    return res


def linear_results(results: list) -> list:
    """The results with every reparametrised tree (LoRA) replaced by the linear tree it computes
    (linattn.models.effective_tree), parameters and snapshots, in the run's own precision: what
    evaluation, the exact curves and the saved pieces read. Linear trees are returned as they are."""
    from linattn.models import effective_tree, model_of

    def lin(tree):
        if tree is None or model_of(tree).effective is None:
            return tree
        with jax.enable_x64(True):  # float64 flow results stay float64
            return {k: np.asarray(v) for k, v in effective_tree({k: jnp.asarray(v) for k, v in tree.items()}).items()}

    return [r._replace(params=lin(r.params), snapshots=lin(r.snapshots)) for r in results]


def stack(trees: list) -> dict:
    return {k: np.stack([np.asarray(t[k]) for t in trees]) for k in trees[0]}


class Progress:
    """Logs each stage's progress with the time left in the stage and overall (training steps)."""

    def __init__(self, total_units: float):
        self.total, self.done, self.t0 = max(total_units, 1.0), 0.0, time.time()
        self.last = 0.0

    def stage(self, name: str, units: dict):
        """A callback for train_plan: units maps group index -> (steps, slots) (see _units)."""
        start = self.done

        def report(group, groups, steps_done, steps, seconds):
            self.done = start + sum(n * k for g, (n, k) in units.items() if g < group) + units[group][1] * steps_done
            now = time.time()
            if now - self.last < 5 and steps_done < steps:
                return
            self.last = now
            frac = steps_done / steps
            piece_left = seconds * (1 - frac) / frac if frac > 0 else float("nan")
            # the rest of this program at its own pace, the work after it at the average pace so far
            rate = self.done / max(now - self.t0, 1e-9)
            after = self.total - self.done - units[group][1] * (steps - steps_done)
            left = piece_left + (after / rate if rate > 0 else float("nan"))
            log(f"{name}: program {group + 1}/{groups}, step {steps_done}/{steps}; {seconds:.0f} s in it, "
                f"~{piece_left:.0f} s left in it; {now - self.t0:.0f} s elapsed, ~{left:.0f} s of training left overall")

        return report


# ---------------------------------------------------------------- the work
def shots_of(cfg):
    return np.arange(cfg.max_shots + 1)


def theta0_of(cfg) -> np.ndarray:
    return np.asarray(D.sample_tasks(key_for(cfg, "theta0"), 1, cfg.d, "sphere")[0], np.float64)


def finetune_data(cfg, theta0):
    return D.make_finetune_dataset(key_for(cfg, "dataset"), jnp.asarray(theta0, jnp.float32), cfg.dataset, cfg.noise)


def evaluate_models(cfg, models: dict, theta0) -> dict:
    """Monte Carlo curves of many models: {name: (mean, se)} of shape (S_name, T, N).

    models maps a name to a stacked tree with a leading seed axis (merged or separate; any d).
    Every model of seed s is evaluated on the same prompts (key fold_in(eval, s)), all in one
    program per seed and d: the trees are put in merged form (the prediction reads only QᵀK and
    V) and stacked, padded to one width so each d compiles once.
    """
    by_d: dict = {}
    for name, tree in models.items():
        merged = {k: np.asarray(v) for k, v in jax.vmap(to_merged)({k: jnp.asarray(v) for k, v in tree.items()}).items()}
        by_d.setdefault(int(merged["V"].shape[-1]) - 2, []).append((name, merged))
    out = {}
    for d, items in by_d.items():
        seeds = max(t["V"].shape[0] for _, t in items)
        rows = [[(name, t) for name, t in items if t["V"].shape[0] > s] for s in range(seeds)]
        width = max(len(r) for r in rows)
        res = {name: (np.zeros((t["V"].shape[0], 3, cfg.max_shots + 1)), np.zeros((t["V"].shape[0], 3, cfg.max_shots + 1)))
               for name, t in items}
        for s, row in enumerate(rows):
            trees = [t for _, t in row] + [row[0][1]] * (width - len(row))
            stacked = {k: np.stack([t[k][s if i < len(row) else 0] for i, t in enumerate(trees)]).astype(np.float32)
                       for k in ("KQ", "V")}
            key = key_for(cfg, "eval", s) if d == cfg.d else key_for(cfg, "eval", 1000 + d, s)
            th = jnp.asarray(theta0 if d == cfg.d else np.zeros(d), jnp.float32)
            curves = test_errors(key, stacked, shots_of(cfg), th, noise=cfg.noise, samples=cfg.eval_samples,
                                 chunk=cfg.eval_chunk)
            for t, task in enumerate(TASKS):
                for i, (name, _) in enumerate(row):
                    res[name][0][s, t], res[name][1][s, t] = curves[task].mean[i], curves[task].se[i]
        out.update(res)
    return out


def theory_models(cfg, models: dict, theta0) -> dict:
    """Exact curves (theory.risk.task_curves) of many d-dimensional models: {name: (S_name, T, N)},
    one compiled program for all (merged form, concatenated)."""
    names = list(models)
    with jax.enable_x64(True):
        merged = [jax.vmap(to_merged)({k: jnp.asarray(v, jnp.float64) for k, v in models[n].items()}) for n in names]
    sizes = np.cumsum([0] + [m["V"].shape[0] for m in merged])
    allp = {k: np.concatenate([np.asarray(m[k]) for m in merged]) for k in ("KQ", "V")}
    curves = task_curves(allp, theta0, shots_of(cfg), cfg.noise)
    return {n: curves[sizes[i]:sizes[i + 1]] for i, n in enumerate(names)}


def obj_cfg(cfg, aux=1.0, ref_params=None) -> ObjectiveConfig:
    return dataclasses.replace(cfg.objective, aux_weight=aux, ref_params=ref_params)


def early_steps(cfg) -> tuple:
    """The fine-tuning steps whose iterates every run returns (early stopping): cfg.early_stops x
    ft_steps, rounded, at least 1, before the last step."""
    return tuple(sorted({max(1, round(f * cfg.ft_steps)) for f in cfg.early_stops} - {cfg.ft_steps}))


def ft_config(cfg) -> T.TrainConfig:
    return dataclasses.replace(cfg.train, steps=cfg.ft_steps, history=min(100, cfg.ft_steps), snapshots=early_steps(cfg))


# ---- stage A: pretraining
def pretrained_like(cfg, model: str) -> dict:
    """A stacked (seeds, ...) tree with the shapes and dtype of a pretraining piece's parameters
    (their initial values): what programs that start from pretrained weights compile against."""
    return stack([init_params(key_for(cfg, "init", s), cfg.d, merged=model == "merged") for s in range(cfg.seeds)])


def pretrain_runs(cfg, pieces: list[str]) -> list[T.Run]:
    """Runs of the missing pretraining pieces ("pretrain_merged", "pretrain_separate", "pretrain_dD")."""
    runs = []
    ctx = T.TaskContext(theta0=jnp.zeros(cfg.d))
    tc = dataclasses.replace(cfg.train, history=min(100, cfg.train.steps))
    for piece in pieces:
        if piece.startswith("pretrain_d"):
            d = int(piece[len("pretrain_d"):])
            tcd = dataclasses.replace(tc, d=d, steps=cfg.d_steps, history=min(100, cfg.d_steps))
            ctxd = T.TaskContext(theta0=jnp.zeros(d))
            for s in range(cfg.d_seeds):
                p0 = init_params(key_for(cfg, "init", 1000 + d, s), d)
                runs.append(T.Run(key_for(cfg, "pretrain", 1000 + d, s), p0, ctxd, lr=cfg.lr, obj=obj_cfg(cfg),
                                  cfg=tcd, name=f"{piece}[{s}]"))
        else:
            merged = piece == "pretrain_merged"
            for s in range(cfg.seeds):
                p0 = init_params(key_for(cfg, "init" if merged else "init_sep", s), cfg.d, merged=merged)
                runs.append(T.Run(key_for(cfg, "pretrain", s), p0, ctx, lr=cfg.lr, obj=obj_cfg(cfg), cfg=tc,
                                  name=f"{piece}[{s}]"))
    return runs


def pretrain_pieces(cfg, pieces: list[str], runs: list, results: list, theta0) -> dict:
    """Evaluation and theory of the pretraining pieces: {piece: arrays}."""
    from theory.optimal import pretrain_optimum

    params = {p: stack([r.params for r, run in zip(results, runs) if run.name.startswith(p + "[")]) for p in pieces}
    history = {p: np.stack([r.history for r, run in zip(results, runs) if run.name.startswith(p + "[")]) for p in pieces}

    def exact():
        """Exact curves of each piece's models and its closed-form optimum (one program per d)."""
        out = {}
        for p in pieces:
            d = int(p[len("pretrain_d"):]) if p.startswith("pretrain_d") else cfg.d
            opt = stack([pretrain_optimum(d, cfg.objective.m, cfg.noise)])
            c = theory_models(cfg, {"models": params[p], "optimum": opt}, theta0 if d == cfg.d else np.zeros(d))
            out[p] = c["models"], c["optimum"][0]
        return out

    sims, theory = in_parallel(lambda: evaluate_models(cfg, params, theta0), exact)
    out = {}
    for p in pieces:
        (mean, se), (th, opt) = sims[p], theory[p]
        if p.startswith("pretrain_d"):  # random tasks only
            r = TASKS.index("random")
            mean, se, th, opt = mean[:, r], se[:, r], th[:, r], opt[r]
        else:
            opt = np.broadcast_to(opt, th.shape)
        out[p] = {**pack("p_", params[p]), "history": history[p], "sim_mean": mean, "sim_se": se, "theory": th,
                  "theory_optimum": opt}
    return out


def in_parallel(*fns) -> list:
    """Results of the calls, made in threads: Monte Carlo evaluation and exact curves compile and run
    side by side (each compilation is single-threaded)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(fns)) as pool:
        return [f.result() for f in [pool.submit(fn) for fn in fns]]


# ---- stages B and C: fine-tuning and its theory
class Cell(NamedTuple):
    """One fine-tuning run of the study: piece, method, seed, auxiliary weight."""

    piece: str
    method: Method
    seed: int
    aux: float


def finetune_cells(cfg, pieces: list[str]) -> list[Cell]:
    cells = []
    for piece in pieces:
        if piece.startswith("sweep_"):
            m = METHOD_BY_NAME[piece[len("sweep_"):]]
            cells += [Cell(piece, m, s, float(w)) for w in cfg.sweep_weights for s in range(cfg.sweep_seeds)]
        else:
            cells += [Cell(piece, METHOD_BY_NAME[piece], s, 1.0) for s in range(cfg.seeds)]
    return cells


def finetune_run(cfg, cell: Cell, pre: dict, ctx, aux=None, key=True) -> T.Run:
    """The cell's Run; its method's per_run adds the run's own data (zs_l2 and ewc: the seed's
    pretrained weights as reference, ewc also the curvature there), its start the tree it trains
    (LoRA: adapters around the seed's pretrained weights)."""
    p0 = {k: v[cell.seed] for k, v in pre[cell.method.model].items()}
    if cell.method.start is not None:
        p0 = cell.method.start(cfg, p0, cell.seed)
    aux = cell.aux if aux is None else aux
    obj = obj_cfg(cfg, aux)
    if cell.method.per_run is not None:
        obj = cell.method.per_run(cfg, obj, pre[cell.method.model], cell.seed)
    if cell.method.objective == "ewc":
        obj = dataclasses.replace(obj, curvature=ewc_curvatures(cfg, pre[cell.method.model])[cell.seed])
    return T.Run(key_for(cfg, "finetune", cell.seed) if key else None, p0, ctx, cell.method.objective,
                 cell.method.subset, cfg.lr, obj, ft_config(cfg), name=f"{cell.piece}[seed {cell.seed}, aux {aux:g}]")


_CURVATURES: dict = {}


def ewc_curvatures(cfg, trees: dict) -> np.ndarray:
    """EWC's F for every seed of stacked pretrained trees, (S, P, P): the PSD part of the exact Hessian
    of the pretraining risk at each seed's weights (theory.antiforgetting.ewc_curvature), one
    program for all seeds, computed once per weights."""
    import hashlib

    from theory.antiforgetting import ewc_curvature

    digest = hashlib.sha1(b"".join(np.ascontiguousarray(trees[k]).tobytes() for k in sorted(trees))).hexdigest()
    key = (digest, cfg.objective.m, cfg.noise)
    if key not in _CURVATURES:
        _CURVATURES[key] = ewc_curvature(trees, cfg.objective.m, cfg.noise)
    return _CURVATURES[key]


def sgd_aware_runs(cfg, cells, pre, ctx) -> list[T.Run]:
    """Stage D: the SGD-aware prediction (theory.sgd) of every cell, methods and sweeps, its
    cfg.sgd_paths noise paths per cell. The paths of one seed share keys across cells (fused, and
    common random numbers), key fold_in(fold_in(root, "sgd_aware"), seed), then the path."""
    runs = [finetune_run(cfg, c, pre, ctx, key=False) for c in cells]
    runs = [dataclasses.replace(r, key=key_for(cfg, "sgd_aware", c.seed), cfg=dataclasses.replace(r.cfg, probe=cfg.sgd_probe))
            for r, c in zip(runs, cells)]
    return path_runs(runs, cfg.sgd_paths) if runs and cfg.sgd_paths else []


def sgd_aware_arrays(cfg, cells, aware, theta0) -> dict:
    """{piece: {"sgd_aware": exact curves of the paths' end points, "history_sgd_aware": their
    objective histories, "sgd_probe": the probe size}} from stage D's results (cfg.sgd_paths per cell of `cells`, in order, as
    sgd_aware_runs makes them). Method pieces: (S * P, T, N) and (S * P, K); sweep pieces: (W, S' * P,
    T, N) and (W, S' * P, K), the weights in cfg.sweep_weights order."""
    ends: dict = {}
    for j, c in enumerate(cells):
        ends.setdefault(c.piece, []).extend(aware[j * cfg.sgd_paths:(j + 1) * cfg.sgd_paths] if len(aware) else [])
    ends = {p: rs for p, rs in ends.items() if rs}
    curves = theory_models(cfg, {p: stack([r.params for r in rs]) for p, rs in ends.items()}, theta0) if ends else {}
    out = {}
    for p, rs in ends.items():
        c, h = curves[p], np.stack([r.history for r in rs])
        if p.startswith("sweep_"):  # cells are weight-major (finetune_cells)
            w = len(cfg.sweep_weights)
            c, h = c.reshape((w, -1) + c.shape[1:]), h.reshape((w, -1) + h.shape[1:])
        out[p] = {"sgd_aware": c, "history_sgd_aware": h, "sgd_probe": np.asarray(cfg.sgd_probe)}
        if p == EARLY_BASE and rs[0].snapshots is not None:  # the paths' iterates at early_steps(cfg)
            snaps = stack([r.snapshots for r in rs])  # leaves (S * P, K, ...)
            k = next(iter(snaps.values())).shape[1]
            sc = theory_models(cfg, {f"{i}": {n: v[:, i] for n, v in snaps.items()} for i in range(k)}, theta0)
            out[p]["sgd_aware_snaps"] = np.stack([sc[f"{i}"] for i in range(k)], axis=1)  # (S * P, K, T, N)
        if p == EARLY_BASE:  # the paths' end points, which WiSE-FT interpolates (wise_sgd_aware)
            out[p].update(pack("sgd_aware_p_", stack([r.params for r in rs])))
    return out


def backfill_sgd_aware(cfg, store, pieces: list[str], pre, ectx, theta0, devices=None) -> None:
    """Add the SGD-aware prediction (stage D) and the flow's objective history to method pieces
    saved before the study had them (older run folders), or replace it where the piece's probe is
    not cfg.sgd_probe, without re-training anything."""
    cells = finetune_cells(cfg, pieces)
    t0 = time.time()
    d_runs = sgd_aware_runs(cfg, cells, pre, ectx)
    log(f"stage D for {len(pieces)} earlier pieces ({', '.join(pieces)}): {len(d_runs)} SGD-aware prediction paths")
    progress = Progress(_work(d_runs))
    aware = linear_results(planned(store, f"D{cfg.sgd_probe}_backfill", d_runs, lambda r: T.train_plan(
        r, source="diffusion", devices=devices, on_progress=progress.stage("stage D", _units(r)))))
    methods = [c for c in cells if not c.piece.startswith("sweep_")]
    flows = flow_plan([finetune_run(cfg, c, pre, ectx, key=False) for c in methods], devices=devices) if methods else []
    arrays = sgd_aware_arrays(cfg, cells, aware, theta0)
    for p in pieces:
        hist = [f.history for c, f in zip(methods, flows) if c.piece == p]
        store.save(p, {**store.load(p), **arrays[p], **({"history_flow": np.stack(hist)} if hist else {})})
        log(f"{p}: SGD-aware prediction added ({time.time() - t0:.0f} s)")


def frontier_runs(cfg, pieces, pre, ctx) -> list[T.Run]:
    """Gradient flow from seed 0's pretrained parameters at every frontier weight, per sweep piece."""
    return [finetune_run(cfg, Cell(p, METHOD_BY_NAME[p[len("sweep_"):]], 0, 1.0), pre, ctx, aux=float(w), key=False)
            for p in pieces if p.startswith("sweep_") for w in cfg.frontier_weights]


def finetune_pieces(cfg, pieces: list[str], cells, trained, flows, front, theta0, aware=()) -> dict:
    """Evaluation and theory of the method and sweep pieces: {piece: arrays}.

    trained / flows: results per cell; front: (run, result) of the frontier flows; aware: the
    stage-D results, cfg.sgd_paths per cell in order (sgd_aware_runs). A sweep piece's
    arrays have shape (W, S', T, N).
    """
    idx = {p: [i for i, c in enumerate(cells) if c.piece == p] for p in pieces}
    params = {p: stack([trained[i].params for i in idx[p]]) for p in pieces}
    flow = {p: stack([flows[i].params for i in idx[p]]) for p in pieces}
    models = {**params, **{f"flow/{p}": f for p, f in flow.items()}}
    sims, theory, ends = in_parallel(lambda: evaluate_models(cfg, params, theta0),
                                     lambda: theory_models(cfg, models, theta0),
                                     lambda: sgd_aware_arrays(cfg, cells, aware, theta0))
    out = {}
    for p in pieces:
        (mean, se), th, fl = sims[p], theory[p], theory[f"flow/{p}"]
        if not p.startswith("sweep_"):
            snaps = {}  # the iterates at early_steps(cfg), (S, K, ...): what early stopping would return
            if trained[idx[p][0]].snapshots is not None:
                snaps = {**pack("snap_p_", stack([trained[i].snapshots for i in idx[p]])),
                         **pack("snap_flow_", stack([flows[i].snapshots for i in idx[p]]))}
            out[p] = {**pack("p_", params[p]), **pack("flow_", flow[p]), **snaps,
                      "history": np.stack([trained[i].history for i in idx[p]]),
                      "history_flow": np.stack([flows[i].history for i in idx[p]]),
                      "sim_mean": mean, "sim_se": se, "theory": th, "theory_optimum": fl}
            out[p].update(ends.get(p, {}))
            continue
        shape = (len(cfg.sweep_weights), cfg.sweep_seeds) + th.shape[1:]
        fr = stack([res.params for run, res in front if run.name.startswith(p + "[")])
        out[p] = {"weights": np.asarray(cfg.sweep_weights, np.float64), "sim_mean": mean.reshape(shape),
                  "sim_se": se.reshape(shape), "theory": th.reshape(shape), "theory_optimum": fl.reshape(shape),
                  "frontier_weights": np.asarray(cfg.frontier_weights, np.float64),
                  "frontier_theory": theory_models(cfg, {"f": fr}, theta0)["f"], **ends.get(p, {})}
    return out


def run_families(cfg, pre_params: dict, zs_flow: dict, zsfs_v_flow: dict, theta0) -> dict:
    """Theory families (SPEC section 4), from seed 0's pretrained parameters.

    - full ZS minimizer family: zs_all_member with KQ[0,0] = 1/w for several w, and the
      gradient-flow end point of full ZS fine-tuning;
    - value-only family: Gamma = g I, b = theta0/((d+4) g), product g*w on a grid; w*(n) for n = 1..40.
    """
    from theory.optimal import w_star, zs_all_member, zs_v_closed_form

    shots = shots_of(cfg)
    pre0 = {k: v[0] for k, v in pre_params.items()}
    w_flow = 1.0 / float(np.asarray(zs_flow["KQ"])[0, 0, 0, 0, 0])
    zs_ws = w_flow * np.asarray([0.25, 0.5, 1.0, 2.0, 4.0])
    zs_curves = task_curves(stack([zs_all_member(pre0, theta0, 1.0 / w) for w in zs_ws]), theta0, shots, cfg.noise)
    n_ft = cfg.objective.n_ft
    omegas = np.asarray([0.0, 0.3, 0.5, w_star(cfg.d, n_ft, cfg.noise), 0.79245, 1.0])
    v_curves = task_curves(stack([zs_v_closed_form(cfg.d, 1.0, om, theta0) for om in omegas]), theta0, shots, cfg.noise)
    n_grid = np.arange(1, cfg.max_shots + 1)
    g, w = gamma_w(zsfs_v_flow)
    return {"zs_w": zs_ws, "zs_w_flow": np.asarray(w_flow), "zs_curves": zs_curves,
            "v_omega": omegas, "v_curves": v_curves, "wstar_n": n_grid,
            "wstar": np.asarray([w_star(cfg.d, int(n), cfg.noise) for n in n_grid]),
            "zsfs_v_flow_omega": g * w}


EARLY_BASE = "zs_all"  # the method early stopping and WiSE-FT trace; its stage-D paths keep their iterates and ends
WISE_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)  # WiSE-FT weights along pretrained -> ZS (all)


def knob_curves(cfg, models: list, flows: list, theta0) -> dict:
    """A method traced over a knob: arrays (A, S, T, N) of the Monte Carlo curves of the SGD models
    (sim_mean, sim_se; models[a] a stacked (S, ...) tree), their exact risk (theory) and the exact
    risk of the gradient-flow models flows[a] (theory_optimum, the prediction)."""
    named = {f"{a}": m for a, m in enumerate(models)}
    sims, theory = in_parallel(lambda: evaluate_models(cfg, named, theta0),
                               lambda: theory_models(cfg, {**named, **{f"flow/{a}": f for a, f in enumerate(flows)}},
                                                     theta0))
    return {"sim_mean": np.stack([sims[k][0] for k in named]), "sim_se": np.stack([sims[k][1] for k in named]),
            "theory": np.stack([theory[k] for k in named]),
            "theory_optimum": np.stack([theory[f"flow/{k}"] for k in named])}


def run_wise(cfg, pre_params: dict, zs_piece: dict, theta0) -> dict:
    """WiSE-FT (linattn.params.interpolate) from each seed's pretrained weights to its full ZS
    fine-tuning (zs_all), at WISE_ALPHAS (knob_curves): the interpolated SGD end points, the
    interpolation to the seed's gradient-flow end point, and where the piece has stage D's path end
    points the SGD-aware prediction (wise_sgd_aware)."""
    f64 = lambda t: {k: np.asarray(v, np.float64) for k, v in t.items()}  # noqa: E731
    sgd, flow, pre = f64(unpack("p_", zs_piece)), f64(unpack("flow_", zs_piece)), f64(pre_params)
    return {"alphas": np.asarray(WISE_ALPHAS, np.float64),
            **knob_curves(cfg, [interpolate(pre, sgd, a) for a in WISE_ALPHAS],
                          [interpolate(pre, flow, a) for a in WISE_ALPHAS], theta0),
            **wise_sgd_aware(cfg, pre_params, zs_piece, theta0)}


def wise_sgd_aware(cfg, pre_params: dict, zs_piece: dict, theta0) -> dict:
    """The SGD-aware prediction along WiSE-FT's knob, {"sgd_aware": (A, S * P, T, N), "sgd_probe"}: the
    exact curves of the interpolations from each seed's pretrained weights to each of its stage-D
    path end points; {} if the piece holds no path end points."""
    if "sgd_aware_p_V" not in zs_piece:
        return {}
    ends = {k: np.asarray(v, np.float64) for k, v in unpack("sgd_aware_p_", zs_piece).items()}
    reps = len(ends["V"]) // len(pre_params["V"])  # seed-major paths
    pre = {k: np.repeat(np.asarray(v, np.float64), reps, axis=0) for k, v in pre_params.items()}
    curves = theory_models(cfg, {f"{i}": interpolate(pre, ends, a) for i, a in enumerate(WISE_ALPHAS)}, theta0)
    return {"sgd_aware": np.stack([curves[f"{i}"] for i in range(len(WISE_ALPHAS))]),
            "sgd_probe": np.asarray(stage_d_probe(zs_piece))}


PROBE_BEFORE = 256  # the probe of stage-D pieces saved before it was recorded (TrainConfig.probe's default)


def stage_d_probe(piece: dict) -> int:
    """The probe size of a piece's stage-D arrays."""
    return int(piece.get("sgd_probe", PROBE_BEFORE))


def early_sgd_aware(zs_piece: dict, pre_theory: np.ndarray) -> dict:
    """The SGD-aware prediction along early stopping's knob, {"sgd_aware": (A, S * P, T, N)}: the exact
    curves of stage D's paths at 0 (the pretrained weights' own curves, pre_theory (S, T, N)),
    early_steps(cfg) and ft_steps; {} if the piece holds no path iterates."""
    if "sgd_aware_snaps" not in zs_piece:
        return {}
    snaps, end = zs_piece["sgd_aware_snaps"], zs_piece["sgd_aware"]
    start = np.repeat(pre_theory, len(end) // len(pre_theory), axis=0)  # seed-major, as the paths
    return {"sgd_aware": np.stack([start, *np.moveaxis(snaps, 1, 0), end]),
            "sgd_probe": zs_piece.get("sgd_probe", np.asarray(PROBE_BEFORE))}


def run_early(cfg, pre_params: dict, zs_piece: dict, theta0) -> dict:
    """Early stopping of full ZS fine-tuning (zs_all): the iterates after 0, early_steps(cfg) and
    ft_steps steps (knob_curves), SGD's from the engine's snapshots and the gradient flow's from
    its own trajectory (the same snapshots of theory.solver.flow_plan) as the prediction, and the
    SGD-aware prediction's from stage D's paths (early_sgd_aware) where the piece has them."""
    if "snap_p_KQ" not in zs_piece:
        raise ValueError("the zs_all piece holds no iterates (TrainConfig.snapshots); rerun it")
    sgd, flow = unpack("snap_p_", zs_piece), unpack("snap_flow_", zs_piece)
    take = lambda t, k: {n: v[:, k] for n, v in t.items()}  # noqa: E731
    ks = range(len(early_steps(cfg)))
    curves = knob_curves(cfg, [pre_params, *[take(sgd, k) for k in ks], unpack("p_", zs_piece)],
                         [pre_params, *[take(flow, k) for k in ks], unpack("flow_", zs_piece)], theta0)
    return {"steps": np.asarray([0, *early_steps(cfg), cfg.ft_steps]), **curves,
            **early_sgd_aware(zs_piece, curves["theory"][0])}


# ---------------------------------------------------------------- the study driver
def selected_methods(cfg: StudyConfig) -> tuple[Method, ...]:
    """The methods a config runs: cfg.methods (plus what the sweeps and theory families need), or all."""
    _check_names("methods", cfg.methods)
    _check_names("sweep_methods", cfg.sweep_methods)
    if not cfg.methods:
        return tuple(METHODS)
    wanted = set(cfg.methods) | set(cfg.sweep_methods) | {"zs_all", "zsfs_v"}
    return tuple(m for m in METHODS if m.name in wanted)


def _check_names(field: str, names) -> None:
    unknown = [n for n in names if n not in METHOD_BY_NAME]
    if unknown:
        raise ValueError(f"unknown methods {unknown} in {field}; allowed: {[m.name for m in METHODS]}")


def check_study(cfg: StudyConfig) -> None:
    """ValueError naming the first bad setting of a study and what is allowed (before any work).

    TrainConfig and ObjectiveConfig check their own fields when built."""
    selected_methods(cfg)
    for f in ("ft_steps", "seeds", "dataset", "eval_samples", "eval_chunk", "sweep_seeds", "d_steps", "d_seeds",
              "sgd_probe"):
        if int(getattr(cfg, f)) < 1:
            raise ValueError(f"{f} must be an integer >= 1; got {getattr(cfg, f)}")
    if int(cfg.sgd_paths) < 0:
        raise ValueError(f"sgd_paths must be an integer >= 0; got {cfg.sgd_paths}")
    if not (np.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError(f"lr must be a finite number > 0; got {cfg.lr}")
    if not (np.isfinite(cfg.objective.l2) and cfg.objective.l2 >= 0):
        raise ValueError(f"l2 must be a finite number >= 0; got {cfg.objective.l2}")
    if cfg.max_shots < max(cfg.objective.n_ft, cfg.objective.m):
        raise ValueError(f"max_shots must be >= n_ft and m (the figures read those shots); got {cfg.max_shots} "
                         f"with n_ft {cfg.objective.n_ft}, m {cfg.objective.m}")
    for f in ("sweep_weights", "frontier_weights"):
        bad = [w for w in getattr(cfg, f) if not (np.isfinite(w) and w > 0)]
        if bad:
            raise ValueError(f"{f} must be finite numbers > 0; got {bad}")
    if cfg.sweep_methods and not (cfg.sweep_weights and cfg.frontier_weights):
        raise ValueError("sweep_methods need at least one sweep weight and one frontier weight; "
                         f"got sweep_weights {list(cfg.sweep_weights)}, frontier_weights {list(cfg.frontier_weights)}")
    bad = [f for f in cfg.early_stops if not (np.isfinite(f) and 0 < f < 1)]
    if bad or not cfg.early_stops:
        raise ValueError(f"early_stops must be one or more fractions of ft_steps in (0, 1); got {list(cfg.early_stops)}")
    if cfg.sweep_seeds > cfg.seeds:
        raise ValueError(f"sweep_seeds must be <= seeds (a sweep starts from those seeds' pretrained weights); "
                         f"got {cfg.sweep_seeds} > {cfg.seeds}")
    bad = [d for d in cfg.pretrain_ds if int(d) < 1 or int(d) == cfg.d]
    if bad or len(set(cfg.pretrain_ds)) != len(cfg.pretrain_ds):
        raise ValueError(f"pretrain_ds must be distinct dimensions >= 1 other than d = {cfg.d}; "
                         f"got {list(cfg.pretrain_ds)}")


def check_out(out: Path) -> None:
    """ValueError if `out` cannot be a run folder (a file, or inside a file)."""
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            raise ValueError(f"--out {str(out)!r}: {str(p)!r} is a file, not a folder")


def _refuse_other_config(out: Path, cfg: StudyConfig) -> None:
    path = out / "config.json"
    if path.exists():
        diff = _config_diff(json.loads(path.read_text()).get("config", {}), cfg.to_json())
        if diff:
            raise ValueError(f"{out} holds a run with a different config ({'; '.join(diff)}); "
                             "choose another --out or delete the folder")


RESTAGED = ("sgd_probe",)  # settings a rerun applies by recomputing stage D of the pieces that differ


def _config_diff(old: dict, new: dict, prefix="", default: dict | None = None) -> list[str]:
    """'field: saved -> new' for every (nested) field that differs; top-level study settings the
    saved run predates (absent from its config.json), nested ones it predates left at their
    default, and RESTAGED ones, do not count."""
    default = StudyConfig().to_json() if default is None else default
    out = []
    for k in new:
        if (k not in old or k in RESTAGED) and not prefix:  # pieces missing it, or with another, use the new one
            continue
        if k not in old and new[k] == default.get(k):  # a library setting added since, at its default
            continue
        a, b = old.get(k), new[k]
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, f"{prefix}{k}.", default.get(k) or {})
        elif a != b:
            out.append(f"{prefix}{k}: {a} in the folder, {b} now")
    return out


def write_config(out: Path, cfg: StudyConfig) -> None:
    """Write DIR/config.json (the config, the root seed, package versions); the caller has refused a
    folder holding another config (_refuse_other_config) before creating it."""
    path = out / "config.json"
    path.write_text(json.dumps({"config": cfg.to_json(), "root_seed": cfg.seed, "versions": versions()}, indent=1))


def piece_names(cfg) -> tuple[list, list]:
    pre = ["pretrain_merged", "pretrain_separate"] + [f"pretrain_d{d}" for d in cfg.pretrain_ds]
    ft = [m.name for m in selected_methods(cfg)] + [f"sweep_{n}" for n in cfg.sweep_methods]
    return pre, ft


def run_study(cfg: StudyConfig, out, *, stop_after: int | None = None, figures: bool = True, devices=None) -> dict:
    """Run (or resume) the whole study into `out`; returns the results dictionary."""
    out = Path(out)
    check_study(cfg)
    check_out(out)
    _refuse_other_config(out, cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_config(out, cfg)
    store = Store(out)
    theta0 = theta0_of(cfg)
    pre_names, ft_names = piece_names(cfg)
    new = {"count": 0}
    t_start = time.time()

    def save(name, arrays, t0):
        if stop_after is not None and new["count"] >= stop_after:
            raise StopRequested(f"stopped after {new['count']} new pieces (--stop-after)")
        arrays["seconds"] = np.asarray(time.time() - t0)
        store.save(name, arrays)
        new["count"] += 1
        log(f"{name}: saved ({time.time() - t_start:.0f} s since start)")

    todo_pre = [p for p in pre_names if not store.has(p)]
    todo_ft = [p for p in ft_names if not store.has(p)]
    cells = finetune_cells(cfg, todo_ft)
    pre_runs = pretrain_runs(cfg, todo_pre)
    if pre_runs and not store.has(plan_name("A", pre_runs)):  # compile stage A while the other plans are built
        T.precompile(pre_runs, devices=devices)
    seeds_b = len({c.seed for c in cells})  # stage B's slots: every run of a seed shares its key
    seeds_d = seeds_b * cfg.sgd_paths if cells else 0
    progress = Progress(_work(pre_runs) + (seeds_b + seeds_d) * cfg.ft_steps)
    for p in pre_names:
        if p not in todo_pre:
            log(f"{p}: already done, loaded")

    ctx = T.TaskContext(theta0=jnp.asarray(theta0, jnp.float32), dataset=finetune_data(cfg, theta0)) if todo_ft else None
    ectx = T.TaskContext(theta0=np.asarray(theta0))
    if todo_pre and todo_ft:  # compile stages B and C while A runs, from starting points of the right shapes
        like = {m: pretrained_like(cfg, m) for m in ("merged", "separate")}
        plan_b = [finetune_run(cfg, c, like, ctx) for c in cells]
        plan_c = [finetune_run(cfg, c, like, ectx, key=False) for c in cells] + frontier_runs(cfg, todo_ft, like, ectx)
        if not store.has(plan_name("B", plan_b)):
            T.precompile(plan_b, devices=devices)
        if not store.has(plan_name("C", plan_c)):
            T.precompile(plan_c, source="exact", devices=devices)
        plan_d = sgd_aware_runs(cfg, cells, like, ectx)
        if plan_d and not store.has(plan_name(f"D{cfg.sgd_probe}", plan_d)):
            T.precompile(plan_d, source="diffusion", devices=devices)

    # A. pretraining
    if todo_pre:
        t0 = time.time()
        log(f"stage A: pretraining {len(pre_runs)} runs ({', '.join(todo_pre)})")
        res = planned(store, "A", pre_runs, lambda r: T.train_plan(
            r, devices=devices, on_progress=progress.stage("stage A", _units(r))))
        log(f"stage A: trained in {time.time() - t0:.0f} s; evaluating")
        for p, arrays in pretrain_pieces(cfg, todo_pre, pre_runs, res, theta0).items():
            save(p, arrays, t0)
    pre = {model: unpack("p_", store.load(f"pretrain_{model}")) for model in ("merged", "separate")}

    # B and C. fine-tuning, its gradient-flow theory, evaluation
    for p in ft_names:
        if p not in todo_ft:
            log(f"{p}: already done, loaded")
    if todo_ft:
        t0 = time.time()
        runs = [finetune_run(cfg, c, pre, ctx) for c in cells]
        log(f"stage B: fine-tuning {len(runs)} runs ({len(todo_ft)} pieces) in one plan")
        trained = linear_results(planned(store, "B", runs, lambda r: T.train_plan(
            r, devices=devices, on_progress=progress.stage("stage B", _units(r)))))
        t1 = time.time()
        flow_runs = [finetune_run(cfg, c, pre, ectx, key=False) for c in cells] + frontier_runs(cfg, todo_ft, pre, ectx)
        flows = linear_results(planned(store, "C", flow_runs, lambda r: flow_plan(r, devices=devices)))
        log(f"stage C: {len(flow_runs)} gradient flows in {time.time() - t1:.0f} s")
        front = list(zip(flow_runs[len(cells):], flows[len(cells):]))
        t3 = time.time()
        d_runs = sgd_aware_runs(cfg, cells, pre, ectx)
        aware = linear_results(planned(store, f"D{cfg.sgd_probe}", d_runs, lambda r: T.train_plan(
            r, source="diffusion", devices=devices, on_progress=progress.stage("stage D", _units(r))))) if d_runs else []
        if d_runs:
            log(f"stage D: {len(d_runs)} SGD-aware prediction paths in {time.time() - t3:.0f} s")
        t2 = time.time()
        pieces = finetune_pieces(cfg, todo_ft, cells, trained, flows, front, theta0, aware)
        log(f"evaluation and exact curves of {len(todo_ft)} pieces in {time.time() - t2:.0f} s")
        for p, arrays in pieces.items():
            save(p, arrays, t0)
    def lacks_stage_d(p: str) -> bool:  # saved before stage D, with another probe, or before early stopping's iterates
        z = store.load(p)
        return ("sgd_aware" not in z or stage_d_probe(z) != cfg.sgd_probe
                or (p == EARLY_BASE and (bool(ft_config(cfg).snapshots) and "sgd_aware_snaps" not in z
                                         or "sgd_aware_p_V" not in z)))

    old = [p for p in ft_names if cfg.sgd_paths and p not in todo_ft and lacks_stage_d(p)]
    if old:
        backfill_sgd_aware(cfg, store, old, pre, ectx, theta0, devices)
    if not store.has("families"):
        t0 = time.time()
        save("families", run_families(cfg, pre["merged"], unpack("flow_", store.load("zs_all")),
                                      unpack("flow_", store.load("zsfs_v")), theta0), t0)
    if not store.has("wise_zs_all"):
        t0 = time.time()
        save("wise_zs_all", run_wise(cfg, pre["merged"], store.load("zs_all"), theta0), t0)
    else:  # made before stage D kept the paths' end points, or with another probe: add their prediction
        wise, base = store.load("wise_zs_all"), store.load(EARLY_BASE)
        if "sgd_aware" not in wise or stage_d_probe(wise) != stage_d_probe(base):
            added = wise_sgd_aware(cfg, pre["merged"], base, theta0)
            if added:
                store.save("wise_zs_all", {**wise, **added})
    if not store.has("early_zs_all"):
        t0 = time.time()
        save("early_zs_all", run_early(cfg, pre["merged"], store.load("zs_all"), theta0), t0)
    else:  # made before stage D kept the paths' iterates: add their prediction, nothing re-evaluated
        early = store.load("early_zs_all")
        base = store.load(EARLY_BASE)
        fresh = "sgd_aware" in early and stage_d_probe(early) == stage_d_probe(base)
        added = {} if fresh else early_sgd_aware(base, early["theory"][0])
        if added:
            store.save("early_zs_all", {**early, **added})
    for f in store.dir.glob(".plan_*.npz"):  # every piece built from them is saved
        f.unlink()
    results = assemble(cfg, out, store, theta0)
    for piece, gap in pretraining_gaps(cfg, store).items():
        if gap > 0.05:
            log(f"{piece}: not converged: its exact {cfg.objective.m}-shot risk on random tasks is {100 * gap:.0f}% "
                "above the closed-form optimum's (more --steps / --d-steps, or a larger --lr)")
    if figures:
        from sims import plot

        plot.plot_all(out)
    return results


def pretraining_gaps(cfg, store: Store) -> dict:
    """{pretraining piece: relative gap of the seed-mean exact risk of the trained weights to the
    closed-form optimum's, at the pretraining shots m on random tasks} (0 means converged)."""
    out = {}
    for piece in ["pretrain_merged", "pretrain_separate"] + [f"pretrain_d{d}" for d in cfg.pretrain_ds]:
        z = store.load(piece)
        th, opt = z["theory"], np.broadcast_to(z["theory_optimum"], z["theory"].shape)
        if th.ndim == 3:  # (S, T, N): the random-task row
            th, opt = th[:, TASKS.index("random")], opt[:, TASKS.index("random")]
        m = cfg.objective.m
        out[piece] = float(th[:, m].mean() / opt[:, m].mean() - 1.0)
    return out


def _units(runs) -> dict:
    """{group index: (steps, slots)} of a plan, from linattn.train.plan_groups (its slots: runs
    sharing a key share each step)."""
    return {i: (g.cfg.steps, g.cells.shape[0]) for i, g in enumerate(T.plan_groups(runs, "mc"))}


def _work(runs) -> int:
    """Steps x slots summed over the groups of a plan (the unit of Progress)."""
    return sum(steps * slots for steps, slots in _units(runs).values())


# ---------------------------------------------------------------- results
def curves_json(cfg, piece: dict, with_opt=True, tasks=TASKS, kind: str = "gradient flow") -> dict:
    """{task: {"shots", "sim_mean", "sim_se", "sim_se_mc", "theory", "theory_se_seeds", "theory_optimum",
    "prediction"}} from a piece's arrays (S, T, N) (its "theory_optimum" (S, T, N) or broadcastable).

    theory_optimum is the study's prediction of what training reaches (issue #13): where the piece
    has stage D's paths ("sgd_aware", (S * P, T, N)), the SGD-aware prediction's mean at the run's
    batch, with "theory_optimum_sd" (its predicted spread over runs), "theory_optimum_se" (its own
    path error), the gradient flow's curve "theory_flow" beside it and the seeds' "sim_sd";
    otherwise the piece's deterministic prediction (`kind`: the gradient flow, or the closed form
    for pretraining). "prediction" names which; "seeds" counts the simulated seeds."""
    mean, se, mc, th, th_se = seed_stats(piece["sim_mean"], piece["sim_se"], piece["theory"])
    opt = np.broadcast_to(piece["theory_optimum"], piece["theory"].shape).mean(0) if with_opt else None
    aware = piece.get("sgd_aware") if with_opt else None
    out = {}
    for t, name in enumerate(tasks):
        out[name] = {"shots": shots_of(cfg).tolist(), "sim_mean": mean[t].tolist(), "sim_se": se[t].tolist(),
                     "theory": th[t].tolist(), "theory_optimum": None if opt is None else opt[t].tolist(),
                     "prediction": None if opt is None else kind,
                     "sim_se_mc": mc[t].tolist(), "theory_se_seeds": th_se[t].tolist(),
                     "seeds": int(np.shape(piece["sim_mean"])[0])}
        if aware is not None:
            pred = path_stats(aware[:, t])
            out[name].update({"theory_optimum": pred.mean.tolist(), "theory_optimum_sd": pred.sd.tolist(),
                              "theory_optimum_se": pred.se.tolist(), "prediction": "sgd-aware",
                              "theory_flow": opt[t].tolist(),
                              "sim_sd": path_stats(np.asarray(piece["theory"])[:, t]).sd.tolist()})
    return out


def agreement(curve: dict) -> dict:
    """Largest gaps, in standard errors, over all shot counts of one curve: the simulation against
    the exact risk of its own weights (Monte Carlo SE), against the prediction (SE of both sides:
    Monte Carlo, seeds, and the SGD-aware prediction's paths) and, where the prediction is the
    SGD-aware one, against the gradient flow.

    A single seed's run-to-run spread is not measured (seed_stats gives it zero): against the
    SGD-aware prediction it is the prediction's own predicted spread over runs, which is the
    simulation's under the hypothesis tested. Without it, a sweep cell (1 seed, 2 paths) counted
    only a third of the variance of sim - prediction when trajectory noise dominates."""
    sim, th = np.asarray(curve["sim_mean"]), np.asarray(curve["theory"])
    out = {"sim_vs_theory_max_se": float(np.max(np.abs(sim - th) / np.asarray(curve["sim_se_mc"])))}
    sim_se = np.asarray(curve["sim_se"])
    if curve.get("seeds") == 1 and curve.get("theory_optimum_sd") is not None:
        sim_se = np.hypot(sim_se, curve["theory_optimum_sd"])
    if curve["theory_optimum"] is not None:
        opt = np.asarray(curve["theory_optimum"])
        z = np.abs(sim - opt) / np.hypot(sim_se, curve.get("theory_optimum_se", 0.0))
        out["prediction"] = curve.get("prediction")
        out["sim_vs_optimum_max_se"] = float(np.max(z))
        out["sim_vs_optimum_within_4se"] = float(np.mean(z < 4))
        out["sim_vs_optimum_worst_shot"] = int(np.argmax(z))
        out["sim_vs_optimum_max_rel"] = float(np.max(np.abs(sim - opt) / opt))
    if curve.get("theory_flow") is not None:
        out["sim_vs_flow_max_se"] = float(np.max(np.abs(sim - np.asarray(curve["theory_flow"])) / sim_se))
    return out


def lora_knobs(cfg, store: Store) -> dict:
    """ZS with LoRA traced over its rank, per target ("kq", "v") whose methods the config runs, stacked
    from saved pieces (nothing computed): {target: {"ranks": (A,) = 0 and LORA_RANKS, "sim_mean",
    "sim_se", "theory", "theory_optimum": (A, S, T, N)}}. Rank 0 is the pretrained model; its
    prediction is its own exact curves."""
    names = {m.name for m in selected_methods(cfg)}
    out = {}
    for t in LORA_LABELS:
        ranks = [r for r in LORA_RANKS if lora_name(t, r) in names]
        if not ranks:
            continue
        pre = store.load("pretrain_merged")
        pieces = [{**pre, "theory_optimum": pre["theory"]}] + [store.load(lora_name(t, r)) for r in ranks]
        out[t] = {"ranks": np.asarray([0, *ranks]),
                  **{k: np.stack([p[k] for p in pieces]) for k in ("sim_mean", "sim_se", "theory", "theory_optimum")}}
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
            "params": params_to_json({k: v[0] for k, v in params.items()}),
            "curves": curves_json(cfg, piece, kind="gradient flow" if m else "closed form"),
            "model": m.model if m else piece_name.split("_")[1],
            "objective": m.objective if m else "pretrain",
            "subset": m.subset if m else "all",
            "label": m.label if m else "pretrained",
            "train_eval_seconds": float(piece["seconds"]),
            "sgd_probe": stage_d_probe(piece) if "sgd_aware" in piece else None,
        }
        methods[name]["agreement"] = {t: agreement(c) for t, c in methods[name]["curves"].items()}
        timing[name] = float(piece["seconds"])
        for k in ("sim_mean", "sim_se", "theory", "theory_optimum", "history", "history_flow", "sgd_aware",
                  "history_sgd_aware"):
            if k in piece:
                arrays[f"{name}/{k}"] = piece[k]
        for k, v in params.items():
            arrays[f"{name}/params/{k}"] = np.asarray(v)
    sweeps = {}
    for n in cfg.sweep_methods:
        piece = store.load(f"sweep_{n}")
        sweeps[n] = {"weights": piece["weights"].tolist(), "frontier_weights": piece["frontier_weights"].tolist(),
                     "curves": {}, "agreement": {},
                     "sgd_probe": stage_d_probe(piece) if "sgd_aware" in piece else None,
                     "frontier_theory": {t: piece["frontier_theory"][:, i].tolist() for i, t in enumerate(TASKS)}}
        for w, lam in enumerate(piece["weights"].tolist()):
            curves = curves_json(cfg, {k: piece[k][w] for k in ("sim_mean", "sim_se", "theory", "theory_optimum", "sgd_aware")
                                       if k in piece})
            sweeps[n]["curves"][f"{lam:g}"] = curves
            sweeps[n]["agreement"][f"{lam:g}"] = {t: agreement(c) for t, c in curves.items()}
        for k in ("sim_mean", "sim_se", "theory", "theory_optimum", "frontier_theory"):
            arrays[f"sweep/{n}/{k}"] = piece[k]
        timing[f"sweep_{n}"] = float(piece["seconds"])
    pre_d = {}
    for d in (*cfg.pretrain_ds,):
        piece = store.load(f"pretrain_d{d}")
        for k in ("sim_mean", "sim_se", "theory", "theory_optimum"):
            arrays[f"pretrain_d{d}/{k}"] = piece[k]
        curves = curves_json(cfg, {k: piece[k][..., None, :] for k in ("sim_mean", "sim_se", "theory", "theory_optimum")},
                             tasks=("random",), kind="closed form")
        pre_d[str(d)] = {"curves": curves, "agreement": {t: agreement(c) for t, c in curves.items()},
                         "train_eval_seconds": float(piece["seconds"])}
        timing[f"pretrain_d{d}"] = float(piece["seconds"])
    fam = store.load("families")
    for k, v in fam.items():
        arrays[f"families/{k}"] = v
    knobs = {}  # methods traced over a knob: {kind: {base: {knob: [...], "curves", "agreement"}}}
    traced = [(kind, "zs_all", knob, store.load(piece), piece)
              for kind, piece, knob in (("wise", "wise_zs_all", "alphas"), ("early", "early_zs_all", "steps"))]
    traced += [(f"lora_{t}", "zs", "ranks", z, None) for t, z in lora_knobs(cfg, store).items()]
    for kind, base, knob, z, piece in traced:
        curves = {f"{a:g}": curves_json(cfg, {k: z[k][i] for k in ("sim_mean", "sim_se", "theory", "theory_optimum",
                                                                   "sgd_aware") if k in z})
                  for i, a in enumerate(z[knob])}
        for k in (knob, "sim_mean", "sim_se", "theory", "theory_optimum"):
            arrays[f"{kind}/{base}/{k}"] = z[k]
        knobs[kind] = {base: {knob: z[knob].tolist(), "curves": curves,
                              "agreement": {a: {t: agreement(c) for t, c in cs.items()} for a, cs in curves.items()}}}
        if piece is not None:
            timing[piece] = float(z["seconds"])
    results = {"config": cfg.to_json(), "versions": versions(), "theta0": theta0.tolist(), "tasks": list(TASKS),
               "methods": methods, "sweeps": sweeps, "pretrain_ds": [cfg.d, *cfg.pretrain_ds], "pretrain_d": pre_d,
               "seconds": timing, **knobs}
    (out / "results.json").write_text(json.dumps(results))
    np.savez(out / "results.npz", **arrays)
    return results


# ---------------------------------------------------------------- CLI
FLAT = {**{f.name: f.default for f in dataclasses.fields(StudyConfig) if f.name not in ("preset", "train", "objective")},
        **{k: getattr(getattr(StudyConfig(), g), f) for k, (g, f) in NESTED.items()}}


def build_config(args) -> StudyConfig:
    """The preset (--quick or --full) with every flag given on the command line applied."""
    base = PRESETS["quick" if args.quick else "full"]
    given = {k: getattr(args, k, None) for k in FLAT}
    over = {k: (tuple(v) if isinstance(FLAT[k], tuple) else v) for k, v in given.items() if v is not None}
    nested = {"train": {}, "objective": {}}
    for k in [k for k in over if k in NESTED]:
        g, f = NESTED[k]
        nested[g][f] = over.pop(k)
    return dataclasses.replace(base, train=dataclasses.replace(base.train, **nested["train"]),
                               objective=dataclasses.replace(base.objective, **nested["objective"]), **over)


HELP = {  # what each study field is; --help adds its --quick and --full values
    "seed": "root seed: every PRNG key is folded from it",
    "ft_steps": "optimizer steps of each fine-tuning method",
    "lr": "learning rate of pretraining and fine-tuning (SGD, momentum 0.9, clip 1.0)",
    "seeds": "training seeds",
    "dataset": "size of the fine-tuning dataset drawn from theta0",
    "max_shots": "test curves at n = 0..MAX_SHOTS shots (>= n_ft and m)",
    "eval_samples": "test prompts per seed, task and shot count",
    "eval_chunk": "test prompts per compiled evaluation chunk",
    "sweep_methods": "methods re-trained at the --sweep-weights (names as for --methods)",
    "sweep_weights": "auxiliary weights of the sweep (the main run uses 1)",
    "sweep_seeds": "seeds of the sweep (<= --seeds)",
    "frontier_weights": "auxiliary weights of the theory frontier (gradient flow) in fig8",
    "pretrain_ds": "extra covariate dimensions pretrained for fig1",
    "d_steps": "pretraining steps at those dimensions",
    "d_seeds": "seeds at those dimensions",
    "methods": "fine-tuning methods to run (none given: all); the theory figures add zs_all and zsfs_v",
    "early_stops": "fractions of --ft-steps after which every run's iterates are kept (early stopping of zs_all)",
    "sgd_paths": "SGD-aware prediction (theory.sgd): noise paths per run, methods and sweeps (0: gradient flow only)",
    "sgd_probe": "its probe prompts per risk term and step (more for small batches: DERIVATIONS section 8)",
    "steps": "pretraining steps",
    "batch": "prompts per risk term and step",
    "d": "covariate dimension",
    "noise": "label-noise variance sigma^2",
    "m": "demonstrations per pretraining prompt",
    "n_ft": "demonstrations in the few-shot (auxiliary) term",
    "l2": "strength of the pull toward the pretrained weights (zs_l2)",
}


def _flat_value(cfg: StudyConfig, name: str):
    if name in NESTED:
        g, f = NESTED[name]
        return getattr(getattr(cfg, g), f)
    return getattr(cfg, name)


def _show(v) -> str:
    if isinstance(v, tuple):
        return " ".join(map(str, v)) if v else "none"
    return str(v)


def parser():
    """The CLI: presets, run options and one flag per study field (help shows both presets' values)."""
    from linattn.cli import Parser, non_negative, positive

    p = Parser(prog="python -m sims.forgetting", description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="small run (the default when neither preset is given)")
    g.add_argument("--full", action="store_true", help="the reference protocol (SPEC section 3): 5000 steps, batch 5000, 5 seeds")
    p.add_argument("--out", default=None, help="run folder (default: runs/<name from the preset, sizes and --methods>)")
    p.add_argument("--stop-after", type=positive(int), default=None, help="stop after this many new pieces (tests resuming)")
    p.add_argument("--no-figures", action="store_true", help="skip drawing (python -m sims.plot DIR draws later)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (your objectives, task sources and register_method calls); repeatable")
    p.add_argument("--devices", type=positive(int), default=None,
                   help=f"use the first N local devices (default: all {jax.local_device_count()})")
    quick, full = PRESETS["quick"], PRESETS["full"]
    floats = {"lr", "noise", "l2", "sweep_weights", "frontier_weights", "early_stops"}
    for name, default in FLAT.items():
        flag = "--" + name.replace("_", "-")
        q, f = _flat_value(quick, name), _flat_value(full, name)
        vals = f"default {_show(q)} (--quick), {_show(f)} (--full)" if q != f else f"default {_show(q)}"
        if name == "methods":
            vals = "default: all"
        if name in ("methods", "sweep_methods"):
            vals += f"; allowed: {' '.join(m.name for m in METHODS)}"
        typ = float if name in floats else (str if name in ("methods", "sweep_methods") else int)
        if name in ("seed", "noise", "l2", "sgd_paths"):
            typ = non_negative(typ)
        elif typ is not str and name not in ("sweep_weights", "frontier_weights", "early_stops"):
            typ = positive(typ) if name != "max_shots" else non_negative(int)
        kw = {"nargs": "*", "metavar": name.upper()} if isinstance(default, tuple) else {}
        p.add_argument(flag, type=typ, default=None, help=f"{HELP[name]}; {vals}", **kw)
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if not args.full:
        args.quick = True
    from linattn.distributed import settings_from_env

    try:
        several = settings_from_env() is not None
    except ValueError as err:
        p.error(str(err))
    if several:
        p.error("started as one of several processes (sims.launch or a cluster's environment): sims.forgetting "
                "runs in one process; allowed: several processes for python -m sims.sweep")
    for module in args.imports:
        try:
            importlib.import_module(module)
        except ImportError as err:
            p.error(f"--import {module!r}: {err} (allowed: a module importable from the working directory)")
    if args.devices is not None and args.devices > jax.local_device_count():
        p.error(f"--devices {args.devices}: allowed 1..{jax.local_device_count()} (local devices)")
    try:
        cfg = build_config(args)
        out = Path(args.out) if args.out else Path("runs") / cfg.name()
        check_study(cfg)
        check_out(out)
        _refuse_other_config(out, cfg)
    except (ValueError, TypeError) as err:
        p.error(str(err))
    t0 = time.time()
    log(f"run folder {out}; config {json.dumps(cfg.to_json())}")
    try:
        run_study(cfg, out, stop_after=args.stop_after, figures=not args.no_figures, devices=args.devices)
    except StopRequested as err:
        log(str(err))
        return 3
    log(f"finished in {time.time() - t0:.0f} s; results in {out}/results.json, figures in {out}/")
    return 0


if __name__ == "__main__":
    from linattn.cli import exit_now

    exit_now(main())
