"""Softmax attention against the linear theory: the forgetting study on a small transformer (issue #12).

    python -m sims.softmax                       # the study: d = 5, 2 layers, 4 heads, width 64, 3 seeds
                                                 # (736 s on the shared 2-core CPU at load ~10)
    python -m sims.softmax --quick               # a smoke run of the same code path (293 s there)
    python -m sims.softmax --from CKPT.msgpack --method zs_v --save FT.msgpack   # fine-tune a checkpoint

Shape notation: S seeds, T = 3 test tasks (linattn.evaluate.TEST_TASKS), N shot counts.

The softmax transformer (linattn.softmax) and the merged one-layer linear model go through the
same engine plans (linattn.train.train_plan), on the same prompts (shared keys), with the same
theta0 and fine-tuning dataset as sims.forgetting at the same root seed:
  A. pretraining on random tasks (m shots): softmax with Adam (clip 1), linear with the reference
     SGD (momentum 0.9, lr 0.01, clip 1), S seeds each;
  B. every fine-tuning method (ZS, ZS+FS) x (all, KQ, V) of both models from each seed's
     pretrained weights, SGD lr 0.01 momentum 0.9 clip 1 (the study's optimizer), one plan;
  C. the linear theory: gradient flow of the linear runs (theory.solver.flow_plan) and the exact
     risk of every linear model (theory.risk.task_curves);
  then Monte Carlo test curves of every model on theta0, -theta0 and random tasks, and of the
  baselines (linattn.baselines: least squares, ridge at lambda = d sigma^2, the Bayes-optimal
  predictor for unit-sphere tasks, zero) on the same prompts (a piece of their own).
Each stage's trained runs are kept (sims.forgetting.planned) and the curves saved as a piece, so a
rerun on the same folder resumes. The pretrained and fine-tuned softmax parameters are written as
msgpack checkpoints (DIR/checkpoints/, linattn.softmax.save_params). Randomness: one root seed;
every key is sims.forgetting.key_for(root, purpose, ...).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from linattn import baselines as B
from linattn import softmax as SM
from linattn import train as T
from linattn.evaluate import seed_stats, test_errors
from linattn.objectives import ObjectiveConfig
from linattn.optim import OptimizerConfig
from linattn.params import init_params as init_linear
from linattn.records import versions
from sims.forgetting import (METHOD_BY_NAME, TASKS, Store, evaluate_models, finetune_data, key_for, log, planned, stack,
                             theory_models, theta0_of)

METHODS = ("zs_all", "zsfs_all", "zs_kq", "zsfs_kq", "zs_v", "zsfs_v")  # sims.forgetting names
MODELS = ("linear", "softmax")
SOFTMAX_TAG = 7000  # folded into the study's init keys for the softmax model (linear: sims.forgetting's)


@dataclasses.dataclass(frozen=True)
class SoftmaxStudyConfig:
    """One comparison. Field names shared with sims.forgetting.StudyConfig mean the same."""

    preset: str = "default"
    seed: int = 0  # root seed (theta0 and the fine-tuning dataset are sims.forgetting's at this seed)
    d: int = 5
    noise: float = 0.1
    dataset: int = 100_000  # fine-tuning dataset drawn from theta0
    layers: int = 2
    heads: int = 4
    width: int = 64
    mlp: int = 64
    m: int = 20  # pretraining shots
    n_ft: int = 20  # few-shot term of ZS+FS
    steps: int = 1000  # pretraining steps (both models)
    pre_lr: float = 1e-3  # softmax pretraining: Adam, clip 1
    lr: float = 0.01  # fine-tuning (both) and linear pretraining: SGD, momentum 0.9, clip 1
    ft_steps: int = 300
    batch: int = 250  # prompts per risk term and step
    seeds: int = 3
    max_shots: int = 40
    shots: tuple = (0, 1, 2, 5, 10, 15, 20, 30, 40)  # softmax and baseline curves
    eval_samples: int = 1000  # test prompts per seed, task and shot count
    eval_chunk: int = 1000

    def name(self) -> str:
        return (f"softmax_{self.preset}_d{self.d}_L{self.layers}_H{self.heads}_W{self.width}_steps{self.steps}"
                f"_ft{self.ft_steps}_b{self.batch}_s{self.seeds}_seed{self.seed}")

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


PRESETS = {
    "default": SoftmaxStudyConfig(),
    "quick": SoftmaxStudyConfig(preset="quick", layers=1, heads=2, width=16, mlp=16, steps=150, ft_steps=60, batch=128,
                                seeds=2, shots=(0, 5, 10, 20, 40), eval_samples=500, eval_chunk=500),
}


def check_config(cfg: SoftmaxStudyConfig) -> None:
    """ValueError naming the first bad setting and what is allowed (before any work)."""
    for f in ("d", "layers", "heads", "width", "mlp", "m", "n_ft", "steps", "ft_steps", "batch", "seeds", "dataset",
              "eval_samples", "eval_chunk"):
        if int(getattr(cfg, f)) < 1:
            raise ValueError(f"{f} must be >= 1; got {getattr(cfg, f)}")
    if cfg.width % cfg.heads:
        raise ValueError(f"width {cfg.width} must be a multiple of heads {cfg.heads}")
    if cfg.max_shots < max(cfg.m, cfg.n_ft):
        raise ValueError(f"max_shots must be >= n_ft and m; got {cfg.max_shots}")
    bad = [n for n in cfg.shots if not 0 <= int(n) <= cfg.max_shots]
    if bad or not cfg.shots:
        raise ValueError(f"shots must be a non-empty list within 0..max_shots = {cfg.max_shots}; got {list(cfg.shots)}")


# ---------------------------------------------------------------- runs
def train_config(cfg, steps: int, optimizer: OptimizerConfig = OptimizerConfig()) -> T.TrainConfig:
    return T.TrainConfig(steps=steps, batch=cfg.batch, d=cfg.d, noise=cfg.noise, history=min(100, steps),
                         sampler="tokens", optimizer=optimizer)


def obj(cfg) -> ObjectiveConfig:
    return ObjectiveConfig(m=cfg.m, n_ft=cfg.n_ft)


def init(cfg, model: str, seed: int) -> dict:
    if model == "linear":  # sims.forgetting's merged model, its init key
        return init_linear(key_for(cfg, "init", seed), cfg.d)
    return SM.init_params(key_for(cfg, "init", SOFTMAX_TAG, seed), cfg.d, cfg.layers, cfg.heads, cfg.width, cfg.mlp)


def pretrain_runs(cfg) -> list[T.Run]:
    """Stage A: S seeds of each model; seed s of both models reads the same minibatches."""
    ctx = T.TaskContext(theta0=jnp.zeros(cfg.d))
    adam = train_config(cfg, cfg.steps, OptimizerConfig(name="adam"))
    sgd = train_config(cfg, cfg.steps)
    soft = {"softmax": True, "linear": False}
    return [T.Run(key_for(cfg, "pretrain", s), init(cfg, model, s), ctx, lr=cfg.pre_lr if soft[model] else cfg.lr,
                  obj=obj(cfg), cfg=adam if soft[model] else sgd, name=f"{model}/pretrained[{s}]")
            for model in MODELS for s in range(cfg.seeds)]


def finetune_run(cfg, model: str, method: str, seed: int, params0: dict, ctx, key=True) -> T.Run:
    m = METHOD_BY_NAME[method]
    return T.Run(key_for(cfg, "finetune", seed) if key else None, params0, ctx, m.objective, m.subset, cfg.lr, obj(cfg),
                 train_config(cfg, cfg.ft_steps), name=f"{model}/{method}[{seed}]")


def by_name(runs, results) -> dict:
    """{model/method: stacked (S, ...) parameter tree} from runs named model/method[seed]."""
    out: dict = {}
    for run, res in zip(runs, results):
        out.setdefault(run.name.split("[")[0], []).append(res.params)
    return {k: stack(v) for k, v in out.items()}


# ---------------------------------------------------------------- curves
def softmax_curves(cfg, trees: dict, theta0) -> dict:
    """{name: (mean, se)} arrays (S, T, len(shots)) of stacked softmax trees; seed s of every model
    on the prompts of key eval[s] (those of sims.forgetting.evaluate_models for the linear model)."""
    names = list(trees)
    mean = np.zeros((len(names), cfg.seeds, len(TASKS), len(cfg.shots)))
    se = np.zeros_like(mean)
    for s in range(cfg.seeds):
        stacked = {k: jnp.stack([jnp.asarray(trees[n][k][s]) for n in names]) for k in trees[names[0]]}
        curves = test_errors(key_for(cfg, "eval", s), stacked, cfg.shots, jnp.asarray(theta0, jnp.float32),
                             noise=cfg.noise, samples=cfg.eval_samples, chunk=cfg.eval_chunk)
        for t, task in enumerate(TASKS):
            mean[:, s, t], se[:, s, t] = curves[task].mean, curves[task].se
    return {n: (mean[i], se[i]) for i, n in enumerate(names)}


BAYES_DRAWS = 1024  # importance-sampling draws of the unit-sphere Bayes predictor


def baseline_curves(cfg, theta0) -> dict:
    """{name: (mean, se)} (T, len(shots)) of the baselines on seed 0's test prompts."""
    out = {}
    bayes = B.bayes_sphere(key_for(cfg, "eval", SOFTMAX_TAG), cfg.d, cfg.noise, BAYES_DRAWS)
    for name, tree in (("least squares", B.ridge(0.0)), ("ridge (lambda = d sigma^2)", B.ridge(cfg.d * cfg.noise)),
                       ("Bayes (sphere prior)", bayes), ("zero", B.zero())):
        curves = test_errors(key_for(cfg, "eval", 0), tree, cfg.shots, jnp.asarray(theta0, jnp.float32),
                             noise=cfg.noise, samples=cfg.eval_samples, chunk=cfg.eval_chunk)
        out[name] = (np.stack([curves[t].mean for t in TASKS]), np.stack([curves[t].se for t in TASKS]))
    return out


def findings(cfg, curves: dict) -> dict:
    """The study's three findings per model, as seed-paired differences of test errors with their
    standard error over seeds (each seed's models share pretrained weights and test prompts):
    - full ZS fine-tuning destroys ICL: zs_all minus pretrained on -theta0 at max_shots (> 0);
    - value-only keeps it: zs_v minus pretrained on -theta0 at max_shots (about 0), and its error
      falls with n: zs_v at 0 shots minus at max_shots on -theta0 (> 0);
    - the auxiliary loss trades: zsfs_v minus zs_v at n_ft shots on theta0 (< 0) and on -theta0 (> 0).
    """
    def at(model, method, task, n):
        shots = list(cfg.shots) if model == "softmax" else list(range(cfg.max_shots + 1))
        return curves[f"{model}/{method}"][0][:, TASKS.index(task), shots.index(n)]

    def diff(a, b):
        x = a - b
        return {"mean": float(x.mean()), "se": float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")}

    N, n = cfg.max_shots, cfg.n_ft
    out = {}
    for model in MODELS:
        out[model] = {
            "zs_all_forgets": diff(at(model, "zs_all", "minus_theta0", N), at(model, "pretrained", "minus_theta0", N)),
            "zs_v_keeps": diff(at(model, "zs_v", "minus_theta0", N), at(model, "pretrained", "minus_theta0", N)),
            "zs_v_icl_gain": diff(at(model, "zs_v", "minus_theta0", 0), at(model, "zs_v", "minus_theta0", N)),
            "zsfs_v_target": diff(at(model, "zsfs_v", "theta0", n), at(model, "zs_v", "theta0", n)),
            "zsfs_v_unseen": diff(at(model, "zsfs_v", "minus_theta0", n), at(model, "zs_v", "minus_theta0", n)),
        }
    return out


# ---------------------------------------------------------------- the study
def progress(stage: str):
    """on_progress for train_plan: one log line per chunk (steps done, seconds in the program)."""
    return lambda g, groups, done, steps, secs: log(f"{stage}: program {g + 1}/{groups}, step {done}/{steps}, {secs:.0f} s")


def check_out(out: Path, cfg: SoftmaxStudyConfig) -> None:
    """ValueError if `out` is a file or holds a run of another config."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a folder")
    path = out / "config.json"
    if path.exists() and json.loads(path.read_text()).get("config") != cfg.to_json():
        raise ValueError(f"{out} holds a run with a different config; choose another --out or delete the folder")


def run_study(cfg: SoftmaxStudyConfig, out, *, figures: bool = True) -> dict:
    """Run (or resume) the comparison into `out`; returns results.json's dictionary."""
    out = Path(out)
    check_config(cfg)
    check_out(out, cfg)
    out.mkdir(parents=True, exist_ok=True)
    record = {"config": cfg.to_json(), "root_seed": cfg.seed, "versions": versions()}
    (out / "config.json").write_text(json.dumps(record, indent=1))
    store = Store(out)
    theta0 = theta0_of(cfg)
    # seconds each stage took when it ran (a resumed stage keeps the time of the run that trained it)
    seconds = {k: float(v) for k, v in store.load("seconds").items()} if store.has("seconds") else {}

    def timed(stage: str, t0: float) -> None:
        if stage not in seconds:
            seconds[stage] = time.time() - t0
            store.save("seconds", seconds)
        log(f"{stage}: {seconds[stage]:.0f} s")

    t0 = time.time()
    runs_a = pretrain_runs(cfg)
    log(f"stage A: pretraining {len(runs_a)} runs")
    res_a = planned(store, "A", runs_a, lambda r: T.train_plan(r, chunk=100, on_progress=progress("stage A")))
    timed("pretrain", t0)
    pre = by_name(runs_a, res_a)

    t1 = time.time()
    ctx = T.TaskContext(theta0=jnp.asarray(theta0, jnp.float32), dataset=finetune_data(cfg, theta0))
    ectx = T.TaskContext(theta0=np.asarray(theta0))
    runs_b = [finetune_run(cfg, model, method, s, {k: v[s] for k, v in pre[f"{model}/pretrained"].items()}, ctx)
              for model in MODELS for method in METHODS for s in range(cfg.seeds)]
    log(f"stage B: fine-tuning {len(runs_b)} runs")
    res_b = planned(store, "B", runs_b, lambda r: T.train_plan(r, chunk=100, on_progress=progress("stage B")))
    timed("finetune", t1)
    t2 = time.time()
    runs_c = [dataclasses.replace(r, key=None, ctx=ectx) for r in runs_b if r.name.startswith("linear/")]
    from theory.solver import flow_plan

    res_c = planned(store, "C", runs_c, flow_plan)
    timed("flow", t2)
    trained = {**pre, **by_name(runs_b, res_b)}
    flows = by_name(runs_c, res_c)
    ckpt = out / "checkpoints"
    ckpt.mkdir(exist_ok=True)
    for name, tree in trained.items():
        if name.startswith("softmax/"):
            for s in range(cfg.seeds):
                SM.save_params(ckpt / f"{name.split('/')[1]}_seed{s}.msgpack", {k: v[s] for k, v in tree.items()})

    if not store.has("curves"):
        t3 = time.time()
        strip = lambda prefix: {k.split("/")[1]: v for k, v in trained.items() if k.startswith(prefix)}  # noqa: E731
        sm = softmax_curves(cfg, strip("softmax/"), theta0)
        lin = evaluate_models(cfg, strip("linear/"), theta0)
        flow = {f"flow/{k.split('/')[1]}": v for k, v in flows.items()}
        th = theory_models(cfg, {**strip("linear/"), **flow}, theta0)
        arrays = {}
        for k, (mu, sd) in sm.items():
            arrays.update({f"softmax/{k}/sim_mean": mu, f"softmax/{k}/sim_se": sd})
        for k, (mu, sd) in lin.items():
            arrays.update({f"linear/{k}/sim_mean": mu, f"linear/{k}/sim_se": sd, f"linear/{k}/theory": th[k]})
            if f"flow/{k}" in th:
                arrays[f"linear/{k}/flow"] = th[f"flow/{k}"]
        arrays["seconds"] = np.asarray(time.time() - t3)
        store.save("curves", arrays)
    if not store.has("baselines"):
        t4 = time.time()
        arrays = {}
        for k, (mu, sd) in baseline_curves(cfg, theta0).items():
            arrays.update({f"baseline/{k}/sim_mean": mu, f"baseline/{k}/sim_se": sd})
        arrays["seconds"] = np.asarray(time.time() - t4)
        store.save("baselines", arrays)
    z = store.load("curves")
    seconds["evaluate"] = float(z["seconds"])
    base = store.load("baselines")
    seconds["baselines"] = float(base["seconds"])
    z = {**{k: v for k, v in z.items() if not k.startswith("baseline/")}, **base}
    results = assemble(cfg, z, theta0, trained, seconds)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if figures:
        from sims import plot_softmax

        plot_softmax.plot(out)
    return results


def assemble(cfg, z: dict, theta0, trained: dict, seconds: dict) -> dict:
    """results.json: config, versions, theta0, per model and method the seed mean and SE of each
    curve (sims.forgetting's seed_stats for the linear model), baselines, findings, timings."""
    curves, raw = {}, {}
    for key in {k.rsplit("/", 1)[0] for k in z if k.count("/") == 2}:
        kind, name = key.split("/")
        mu, sd = z[f"{key}/sim_mean"], z[f"{key}/sim_se"]
        shots = list(range(cfg.max_shots + 1)) if kind == "linear" else list(cfg.shots)
        entry = {"shots": shots}
        if kind == "baseline":
            entry.update({t: {"mean": mu[i].tolist(), "se": sd[i].tolist()} for i, t in enumerate(TASKS)})
        else:
            raw[key] = (mu, sd)
            if kind == "linear":
                m, e, _, th, _ = seed_stats(mu, sd, z[f"{key}/theory"])
                flow = z[f"{key}/flow"].mean(0) if f"{key}/flow" in z else None
            else:  # no exact risk: the seed spread of the Monte Carlo means (it includes their noise)
                m, e = mu.mean(0), (mu.std(0, ddof=1) / np.sqrt(len(mu)) if len(mu) > 1 else np.zeros_like(mu[0]))
                th = flow = None
            for i, t in enumerate(TASKS):
                entry[t] = {"mean": m[i].tolist(), "se": e[i].tolist()}
                if th is not None:
                    entry[t]["theory_sgd_end_points"] = th[i].tolist()
                if flow is not None:
                    entry[t]["theory_gradient_flow"] = flow[i].tolist()
        curves[key] = entry
    return {"config": cfg.to_json(), "versions": versions(), "theta0": np.asarray(theta0).tolist(),
            "tasks": list(TASKS), "methods": {m: METHOD_BY_NAME[m].label for m in METHODS}, "curves": curves,
            "findings": findings(cfg, raw), "seconds": seconds,
            "softmax_parameters": int(sum(np.prod(np.shape(v)[1:]) for v in trained["softmax/pretrained"].values()))}


# ---------------------------------------------------------------- fine-tuning a checkpoint
def finetune_checkpoint(cfg, src, method: str, dst, seed: int = 0) -> dict:
    """Fine-tune the softmax parameters in `src` (msgpack) with a study method; write them to `dst`."""
    params = SM.load_params(src)
    SM.check_params(params, cfg.d)
    theta0 = theta0_of(cfg)
    ctx = T.TaskContext(theta0=jnp.asarray(theta0, jnp.float32), dataset=finetune_data(cfg, theta0))
    t0 = time.time()
    res = T.train_plan([finetune_run(cfg, "softmax", method, seed, params, ctx)])[0]
    SM.save_params(dst, res.params)
    return {"saved": str(dst), "method": method, "final_loss": float(res.final_loss), "seconds": time.time() - t0}


# ---------------------------------------------------------------- CLI
def parser():
    from linattn.cli import Parser, non_negative, positive

    doc = __doc__.split("\n\n")
    p = Parser(prog="python -m sims.softmax", description=doc[0] + "\n\n" + doc[1])
    p.add_argument("--quick", action="store_true", help="small smoke run of the same code path")
    p.add_argument("--out", default=None, help="run folder (default: runs/<name from the sizes>)")
    p.add_argument("--no-figures", action="store_true", help="skip drawing (python -m sims.plot_softmax DIR later)")
    p.add_argument("--from", dest="src", default=None, metavar="CKPT",
                   help="fine-tune this softmax checkpoint (msgpack) instead of running the study; needs --save")
    p.add_argument("--method", default="zs_v", choices=METHODS, help="fine-tuning method for --from")
    p.add_argument("--save", default=None, metavar="FILE", help="where --from writes the fine-tuned checkpoint")
    base = PRESETS["default"]
    for f in dataclasses.fields(SoftmaxStudyConfig):
        if f.name == "preset":
            continue
        if f.name == "shots":
            p.add_argument("--shots", type=shot_list, default=None,
                           help=f"shot counts of the softmax and baseline curves, comma-separated; default "
                                f"{','.join(map(str, base.shots))} ({','.join(map(str, PRESETS['quick'].shots))} with --quick)")
            continue
        kind = type(getattr(base, f.name))
        typ = non_negative(kind) if f.name in ("seed", "noise") else positive(kind)
        p.add_argument("--" + f.name.replace("_", "-"), type=typ, default=None,
                       help=f"default {getattr(base, f.name)} ({getattr(PRESETS['quick'], f.name)} with --quick)")
    return p


def shot_list(text: str) -> tuple:
    import argparse

    from linattn.cli import number_list

    try:
        return tuple(number_list(text, "--shots", int))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_config(args) -> SoftmaxStudyConfig:
    base = PRESETS["quick" if args.quick else "default"]
    over = {f.name: getattr(args, f.name) for f in dataclasses.fields(SoftmaxStudyConfig)
            if getattr(args, f.name, None) is not None}
    return dataclasses.replace(base, **over)


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        cfg = build_config(args)
        check_config(cfg)
    except ValueError as err:
        p.error(str(err))
    if args.src is not None:
        if args.save is None:
            p.error("--from needs --save FILE (where the fine-tuned checkpoint goes)")
        if not Path(args.src).is_file():
            p.error(f"--from {args.src!r}: no such file; allowed: a checkpoint written by linattn.softmax.save_params")
        try:
            SM.check_params(SM.load_params(args.src), cfg.d)
        except ValueError as err:
            p.error(str(err))
        print(json.dumps(finetune_checkpoint(cfg, args.src, args.method, args.save)))
        return 0
    out = Path(args.out) if args.out else Path("runs") / cfg.name()
    try:
        check_out(out, cfg)
    except ValueError as err:
        p.error(str(err))
    t0 = time.time()
    log(f"run folder {out}; config {json.dumps(cfg.to_json())}")
    run_study(cfg, out, figures=not args.no_figures)
    log(f"finished in {time.time() - t0:.0f} s; results in {out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
