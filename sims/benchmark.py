"""Benchmark of the simulator on the reference study's workload, through the study's own code path.

    python -m sims.benchmark --workload reference --steps 1000      # what issue #8 times
    python -m sims.benchmark --workload reference --profile         # + where a step's time goes
    python -m sims.benchmark --compile-profile quick                # the study's programs, compiled cold

Workloads (SPEC section 3 settings: d = 5, sigma^2 = 0.1, SGD momentum 0.9, lr 0.01, clip 1.0),
the settings of the paper's regression/comparison.py:
- reference: pretraining ("pretrain", m = 20, unit-sphere tasks, separate K and Q), then the 8
  fine-tuning methods {zs, zsfs} x {all, k, q, v} from the pretrained weights (n_ft = 20, prompts
  from a 100,000-example dataset of theta0), then Monte Carlo error curves for n = 0..20 on theta0
  and -theta0 of the pretrained and the 8 fine-tuned models (--eval-samples prompts per point,
  default 250,000 = the paper's 5 test seeds x 50,000) and their exact risk (theory.risk);
- pretrain: the pretraining run alone;  finetune: the 8 fine-tuning runs alone;
- tiny: the reference workload at 50 steps, batch 256 (a smoke test).
Training goes through linattn.train.train_plan and evaluation through linattn.evaluate, exactly as
in sims.forgetting (in chunks of its eval_chunk prompts, beside the exact curves in a second thread:
sims.forgetting.in_parallel), with the engine's defaults: every local
device (one per core on a CPU) and the layout it picks. --devices and --layout override them. Wall
and CPU seconds are reported per phase (compilation included: a user pays it), with the CPU model,
the load average and how many programs came from linattn's persistent compilation cache (a first
run on a machine compiles them all; LINATTN_COMPILATION_CACHE=/empty/folder measures that again);
every run is appended to --record (default runs/benchmarks.jsonl) with its command and package
versions.

--compile-profile PRESET measures the fixed cost instead: the programs that `python -m
sims.forgetting --PRESET` compiles for its stages (A pretraining, B fine-tuning, C gradient flows,
D SGD-aware paths), each compiled cold (the persistent cache off), one at a time
(linattn.train.compile_profile), with their columns, slots, StableHLO size and the wall and CPU
seconds of tracing, lowering and compilation.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import linattn  # noqa: F401  (before JAX starts: one device per core)

WORKLOADS = ("reference", "pretrain", "finetune", "tiny")
METHODS = [(o, s) for o in ("zs", "zsfs") for s in ("all", "k", "q", "v")]


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class Clock:
    """Wall and CPU seconds of named phases."""

    def __init__(self):
        self.phases: dict = {}

    def __call__(self, name):
        clock = self

        class _Phase:
            def __enter__(self):
                self.w, self.c = time.perf_counter(), _cpu_seconds()

            def __exit__(self, *exc):
                w, c = clock.phases.get(name, (0.0, 0.0))
                clock.phases[name] = (w + time.perf_counter() - self.w, c + _cpu_seconds() - self.c)

        return _Phase()


def run(args) -> dict:
    from linattn import data as D
    from linattn import evaluate as E
    from linattn import train as T
    from linattn.objectives import ObjectiveConfig
    from linattn.params import init_params
    from sims.forgetting import StudyConfig, in_parallel
    from theory.risk import task_curves

    steps, batch = args.steps, args.batch
    if args.workload == "tiny":
        steps, batch = min(steps, 50), min(batch, 256)
    d, noise = 5, 0.1
    clock = Clock()
    plan = dict(devices=args.devices, layout=args.layout)
    out: dict = {"workload": args.workload, "steps": steps, "batch": batch, "d": d,
                 "devices": args.devices, "layout": args.layout}
    root = jax.random.PRNGKey(args.seed)
    k_init, k_pre, k_theta, k_data, k_ft, k_eval = jax.random.split(root, 6)
    p0 = init_params(k_init, d, merged=False)
    obj = ObjectiveConfig(m=20, n_ft=20)
    cfg = T.TrainConfig(steps=steps, batch=batch, d=d, noise=noise)
    pre_run = T.Run(k_pre, p0, T.TaskContext(jnp.zeros(d)), "pretrain", "all", args.lr, obj, cfg)  # reads no task
    if args.workload in ("reference", "pretrain", "tiny"):  # as the study does: compile it while the rest is set up
        T.precompile([pre_run], **plan)
    theta0 = D.sample_tasks(k_theta, 1, d, "sphere")[0]  # the fine-tuning task, as sims.forgetting.theta0_of
    ctx = T.TaskContext(theta0, D.make_finetune_dataset(k_data, theta0, 100_000, noise))

    params_pre = p0
    ft_runs = lambda start: [T.Run(k_ft, start, ctx, o, s, args.lr, obj, cfg, name=f"{o}-{s}") for o, s in METHODS]
    if args.workload in ("reference", "tiny"):  # and fine-tuning while pretraining
        T.precompile(ft_runs(p0), **plan)
    if args.workload in ("reference", "pretrain", "tiny"):
        with clock("pretrain"):
            (res,) = T.train_plan([pre_run], **plan)
        params_pre = res.params
        out["pretrain_final_loss"] = float(res.final_loss)

    finetuned = {}
    if args.workload in ("reference", "finetune", "tiny"):
        runs = ft_runs(params_pre)
        with clock("finetune"):
            res = T.train_plan(runs, **plan)
        finetuned = {r.name: x.params for r, x in zip(runs, res)}
        out["finetune_final_loss"] = {r.name: float(x.final_loss) for r, x in zip(runs, res)}

    if args.workload in ("reference", "tiny") and not args.no_eval:
        models = {"pretrained": params_pre, **finetuned}
        stacked = {k: jnp.stack([jnp.asarray(p[k]) for p in models.values()]) for k in p0}
        shots = np.arange(21)
        samples = min(args.eval_samples, 2000) if args.workload == "tiny" else args.eval_samples
        with clock("evaluate"):  # Monte Carlo and exact curves side by side, as the study evaluates
            curves, exact = in_parallel(
                lambda: {t: E.test_error(jax.random.fold_in(k_eval, i), stacked, shots, task, noise=noise,
                                         samples=samples, chunk=min(samples, StudyConfig.eval_chunk))
                         for i, (t, task) in enumerate((("theta0", theta0), ("minus_theta0", -theta0)))},
                lambda: task_curves(stacked, np.asarray(theta0, np.float64), shots, noise,
                                    tasks=("theta0", "minus_theta0")))
        out["evaluation"] = {"shots": shots.tolist(), "samples": samples, "models": list(models),
                             "mc_mean": {t: c.mean.tolist() for t, c in curves.items()},
                             "mc_se": {t: c.se.tolist() for t, c in curves.items()},
                             "exact": exact.tolist()}
    out["phases_wall_s"] = {k: v[0] for k, v in clock.phases.items()}
    out["phases_cpu_s"] = {k: v[1] for k, v in clock.phases.items()}
    return out


def study_compile_profile(preset: str) -> list[dict]:
    """linattn.train.compile_profile of each stage plan of sims.forgetting at a preset, built from
    starting parameters of the right shapes as the study's own precompilation does."""
    from linattn import train as T
    from sims import forgetting as F

    cfg = F.PRESETS[preset]
    theta0 = F.theta0_of(cfg)
    pre_names, ft_names = F.piece_names(cfg)
    cells = F.finetune_cells(cfg, ft_names)
    like = {m: F.pretrained_like(cfg, m) for m in ("merged", "separate")}
    ctx = T.TaskContext(theta0=jnp.asarray(theta0, jnp.float32), dataset=F.finetune_data(cfg, theta0))
    ectx = T.TaskContext(theta0=np.asarray(theta0))
    stages = {"A": (F.pretrain_runs(cfg, pre_names), "mc"),
              "B": ([F.finetune_run(cfg, c, like, ctx) for c in cells], "mc"),
              "C": ([F.finetune_run(cfg, c, like, ectx, key=False) for c in cells]
                    + F.frontier_runs(cfg, ft_names, like, ectx), "exact"),
              "D": (F.sgd_aware_runs(cfg, cells, like, ectx), "diffusion")}
    out = []
    for stage, (runs, source) in stages.items():
        for i, rec in enumerate(T.compile_profile(runs, source=source) if runs else []):
            out.append({"stage": stage, "program": i, **rec})
            print(f"  stage {stage} program {i} ({source}): {rec['runs']} runs, {rec['slots']} slots x "
                  f"{rec['columns']} columns, {rec['stablehlo_lines']} StableHLO lines; " + ", ".join(
                      f"{ph} {rec[ph + '_wall_s']:.1f} s (cpu {rec[ph + '_cpu_s']:.1f})"
                      for ph in ("trace", "lower", "compile")), flush=True)
    return out


def _best_ms(fn, *a, reps=20) -> float:
    jax.block_until_ready(fn(*a))
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            r = fn(*a)
        jax.block_until_ready(r)
        best = min(best, (time.perf_counter() - t) / reps * 1e3)
    return best


def profile(args) -> dict:
    """Milliseconds per call of one training step's pieces at the benchmark's batch size, and the
    floor that drawing normals sets (random numbers per step / normals per second)."""
    import optax

    from linattn import data as D
    from linattn.minibatch import monte_carlo
    from linattn.params import init_params
    from linattn.train import TaskContext, TrainConfig

    B, d, n = args.batch, 5, 20
    key = jax.random.PRNGKey(1)
    p = init_params(key, d, merged=False)
    theta0 = jnp.ones(d) / jnp.sqrt(d)
    ctx = TaskContext(theta0, D.make_finetune_dataset(key, theta0, 100_000))
    cfg = TrainConfig(batch=B, d=d)
    pm = tuple(jax.tree.map(lambda a: a * (1 + 0.01 * i), p) for i in range(8))
    req = {(0, "target"): tuple(range(8)), (n, "target"): tuple(range(1, 8, 2))}

    def fused_loss(ps, k):
        out = monte_carlo(k, ps, req, cfg, ctx)
        return sum(out.values())

    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.01, momentum=0.9))
    state = opt.init(p)
    M = 630_000  # the size of one token minibatch at n = 20, B = 5000
    normal_ms = _best_ms(jax.jit(lambda k: jax.random.normal(k, (M,))), key)
    p_ = d + 1
    per_prompt = {"tokens": (n + 1) * (d + 1) + d, "stats": d + 1 + p_ + p_ * (p_ - 1) // 2 + d + p_}
    out = {
        "sample tokens n=20": _best_ms(jax.jit(lambda k: D.SAMPLERS["tokens"](k, n, B, d)), key),
        "sample stats n=20": _best_ms(jax.jit(lambda k: D.SAMPLERS["stats"](k, n, B, d)), key),
        "sample dataset n=20 statistics": _best_ms(jax.jit(
            lambda k: D.sample_dataset_stats(k, ctx.dataset, n, B)), key),
        "fine-tuning step loss+grad, 8 fused methods (dataset n=0, n=20)": _best_ms(
            jax.jit(jax.value_and_grad(fused_loss)), pm, key),
        "optimizer update (clip + SGD momentum), one method": _best_ms(jax.jit(lambda g, s: opt.update(g, s, p)), p, state),
        "normals per second (millions)": M / normal_ms / 1e3,
    }
    for name, k in per_prompt.items():
        out[f"floor: {name} sampler n=20, {k} normals per prompt, ms per {B} prompts"] = k * B / M * normal_ms
    return out


def cache_counter() -> dict:
    """{"hits": programs loaded from the persistent compilation cache, "misses": programs compiled
    and written to it}, counted from JAX's monitoring events from now on (linattn/__init__: the cache)."""
    counts = {"hits": 0, "misses": 0}
    events = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "misses"}

    def listen(event, **_):
        if event in events:
            counts[events[event]] += 1

    jax.monitoring.register_event_listener(listen)
    return counts


def peak_memory() -> dict:
    rec = {"host_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    stats = jax.devices()[0].memory_stats()
    if stats:
        rec["device_peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
    return rec


def main(argv=None) -> int:
    from linattn.cli import Parser, non_negative, positive

    ap = Parser(prog="python -m sims.benchmark", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", choices=WORKLOADS, default="tiny")
    ap.add_argument("--steps", type=positive(), default=5000, help="optimizer steps per run")
    ap.add_argument("--batch", type=positive(), default=5000, help="prompts per step")
    ap.add_argument("--lr", type=positive(float), default=0.01, help="learning rate of every run")
    ap.add_argument("--devices", type=positive(), default=None, help="first N local devices (default: all)")
    ap.add_argument("--layout", choices=("auto", "runs", "batch"), default="auto")
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--eval-samples", type=positive(), default=250_000, help="prompts per point (paper: 5 test seeds x 50,000)")
    ap.add_argument("--seed", type=non_negative(), default=0)
    ap.add_argument("--profile", action="store_true", help="time one step's pieces and the sampling floor")
    ap.add_argument("--compile-profile", choices=("quick", "full"), default=None,
                    help="instead of a workload: compile the programs of python -m sims.forgetting --quick or --full")
    ap.add_argument("--json", default=None, help="also write this run's record here")
    ap.add_argument("--record", default="runs/benchmarks.jsonl", help="append the record to this file")
    args = ap.parse_args(argv)
    if args.devices is not None and args.devices > jax.local_device_count():
        ap.error(f"--devices {args.devices}: allowed 1..{jax.local_device_count()}")
    from linattn.records import versions

    if args.compile_profile:  # measure compilations, not loads from linattn's persistent cache
        jax.config.update("jax_enable_compilation_cache", False)
    cache = cache_counter()
    load0 = os.getloadavg()
    w0, c0 = time.perf_counter(), _cpu_seconds()
    if args.compile_profile:
        print(f"compile profile of sims.forgetting --{args.compile_profile}; load avg {load0[0]:.2f}")
        out = {"compile_profile": study_compile_profile(args.compile_profile), "preset": args.compile_profile}
        out["total_compile_cpu_s"] = sum(r[p + "_cpu_s"] for r in out["compile_profile"]
                                         for p in ("trace", "lower", "compile"))
    else:
        out = run(args)
    out["wall_s"] = time.perf_counter() - w0
    out["cpu_s"] = _cpu_seconds() - c0
    out["loadavg_start_end"] = [load0[0], os.getloadavg()[0]]
    out["peak_memory"] = peak_memory()
    out["compilation_cache"] = cache
    out["versions"] = versions()
    out["command"] = "python -m sims.benchmark " + " ".join(argv if argv is not None else sys.argv[1:])
    out["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    if args.profile:
        out["profile_ms"] = profile(args)
    dev = out["versions"]["device"]
    what = (f"compile profile --{out['preset']}" if args.compile_profile
            else f"workload {out['workload']}: steps {out['steps']}, batch {out['batch']}")
    print(f"{what}; {dev['cpu']}, {dev['cores']} cores, {dev['local_device_count']} {dev['backend']} devices; "
          f"load avg {load0[0]:.2f}")
    print(f"  wall {out['wall_s']:.2f} s (cpu {out['cpu_s']:.2f} s)  " +
          "  ".join(f"{k} {v:.2f} s" for k, v in out.get("phases_wall_s", {}).items()))
    if args.compile_profile:
        print(f"  trace + lower + compile, summed over programs: cpu {out['total_compile_cpu_s']:.1f} s")
    print(f"  peak memory {out['peak_memory']}")
    cc = out["compilation_cache"]
    print(f"  persistent compilation cache {out['versions']['compilation_cache_dir']}: {cc['hits']} programs loaded, "
          f"{cc['misses']} compiled")
    for name, ms in out.get("profile_ms", {}).items():
        print(f"  profile {name}: {ms:.3g}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.record:
        Path(args.record).parent.mkdir(parents=True, exist_ok=True)
        with open(args.record, "a") as f:
            f.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    from linattn.cli import exit_now

    exit_now(main())
