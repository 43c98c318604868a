"""Benchmark of the simulator on the reference study's main workload (GitHub issue #5).

    python -m sims.benchmark --workload reference --steps 5000 --json out.json

Workloads (SPEC section 3 settings: d = 5, sigma^2 = 0.1, SGD momentum 0.9, lr 0.01, clip 1.0):
- reference: pretraining ("pretrain", m = 20, unit-sphere tasks, merged=False model), then the 8
  fine-tuning methods {zs, zsfs} x {all, k, q, v} from the pretrained weights (n_ft = 20, prompts
  from a 100,000-example dataset of theta0), then error curves for n = 0..40 on theta0 and -theta0
  for the pretrained model and the 8 fine-tuned ones (exact theory when theory.risk imports,
  else Monte Carlo);
- pretrain: the pretraining run alone;  finetune: the 8 fine-tuning runs alone;
- tiny: the reference workload at 50 steps, batch 256 (a smoke test).
--steps and --batch scale any of them. --devices P (P > 1) splits every step's minibatch over P
host CPU devices (linattn.sharding.train_data_parallel / train_methods_data_parallel: B / P
prompts per device, losses and gradients averaged with pmean; the same distribution as one
device, a different random stream); on a CPU each forced host device runs on its own thread, so
P = 2 uses both cores of a 2-core machine. Times: compile (ahead-of-time lower + compile) and run are
measured separately; wall is their sum plus data and evaluation; CPU time (user + sys of this
process) is reported too, because on a shared machine wall time also counts other people's work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

WORKLOADS = ("reference", "pretrain", "finetune", "tiny")
METHODS = [(o, s) for o in ("zs", "zsfs") for s in ("all", "k", "q", "v")]
REFERENCE_SECONDS = 590.0  # the reference PyTorch code on a 2-core CPU (issue #5)


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


def _aot(jitted, *args):
    """(compiled executable, compile seconds) of a jitted function for these arguments."""
    t = time.perf_counter()
    exe = jitted.lower(*args).compile()
    return exe, time.perf_counter() - t


def _compile_and_run(clock, out: dict, name: str, jitted, *args):
    """Compile ahead of time, then run once; records compile_s[name] and run_s[name]."""
    with clock("compile"):
        exe, out["compile_s"][name] = _aot(jitted, *args)
    with clock("train"):
        t = time.perf_counter()
        res = jax.block_until_ready(exe(*args))
        out["run_s"][name] = time.perf_counter() - t
    return res


def run(args) -> dict:
    from linattn import data as D
    from linattn import sharding as S
    from linattn import train as T
    from linattn.objectives import ObjectiveConfig
    from linattn.params import init_params

    mesh = S.data_mesh() if args.devices > 1 else None
    dtype = jnp.float64 if args.dtype == "float64" else jnp.float32
    steps, batch = args.steps, args.batch
    if args.workload == "tiny":
        steps, batch = min(steps, 50), min(batch, 256)
    d, noise = 5, 0.1
    clock = Clock()
    out: dict = {"workload": args.workload, "steps": steps, "batch": batch, "d": d, "dtype": args.dtype,
                 "sampler": args.sampler, "fused_methods": not args.separate, "data_parallel_devices": args.devices,
                 "compile_s": {}, "run_s": {}}
    prompts = 0

    root = jax.random.PRNGKey(args.seed)
    k_init, k_pre, k_theta, k_data, k_ft, k_eval = jax.random.split(root, 6)
    p0 = init_params(k_init, d, merged=False, dtype=dtype)
    g = jax.random.normal(k_theta, (d,), dtype)
    theta0 = g / jnp.linalg.norm(g)
    ctx = T.TaskContext(theta0, D.make_finetune_dataset(k_data, theta0, 100_000, noise, dtype=dtype))
    obj = ObjectiveConfig(m=20, n_ft=20)
    lr = jnp.asarray(args.lr, dtype)
    base = T.TrainConfig(steps=steps, batch=batch, d=d, noise=noise, sampler=args.sampler)

    params_pre = p0
    if args.workload in ("reference", "pretrain", "tiny"):
        cfg = T.TrainConfig(**{**base.__dict__, "objective": "pretrain", "subset": "all"})
        pargs = (k_pre, p0, lr, ctx, obj)
        fn = T.compiled(cfg)
        if mesh is not None:
            pargs, fn = S.replicate(pargs, mesh), S.compiled_data_parallel(cfg, mesh)
        res = _compile_and_run(clock, out, "pretrain", fn, *pargs)
        T.raise_if_diverged(res, args.lr)
        params_pre = res.params
        out["pretrain_final_loss"] = float(res.final_loss)
        prompts += steps * batch

    finetuned = {}
    if args.workload in ("reference", "finetune", "tiny"):
        per_method = {"zs": 1, "zsfs": 2}  # prompts a step's loss reads
        if args.separate and mesh is not None:
            raise SystemExit("--separate runs on one device only (drop --devices)")
        if args.separate:
            for o, s in METHODS:
                cfg = T.TrainConfig(**{**base.__dict__, "objective": o, "subset": s})
                res = _compile_and_run(clock, out, f"{o}-{s}", T.compiled(cfg), k_ft, params_pre, lr, ctx, obj)
                T.raise_if_diverged(res, args.lr)
                finetuned[f"{o}-{s}"] = res.params
        else:
            names, weights, masks = T.method_arrays(params_pre, METHODS)
            masks = {k: v.astype(dtype) for k, v in masks.items()}
            fn = T.compiled_methods(base, names)
            fargs = (k_ft, params_pre, lr, ctx, obj, weights.astype(dtype), masks)
            if mesh is not None:
                fargs, fn = S.replicate(fargs, mesh), S.compiled_methods_data_parallel(base, names, mesh)
            res = _compile_and_run(clock, out, "finetune_8_methods", fn, *fargs)
            T.raise_if_diverged(res, np.full(len(METHODS), args.lr))
            for i, (o, s) in enumerate(METHODS):
                finetuned[f"{o}-{s}"] = jax.tree.map(lambda a: a[i], res.params)
        prompts += steps * batch * sum(per_method[o] for o, _ in METHODS)

    if args.workload in ("reference", "tiny") and not args.no_eval:
        models = {"pretrained": params_pre, **finetuned}
        shots = np.arange(41)
        with clock("evaluate"):
            curves, method = _evaluate(models, shots, theta0, noise, k_eval, args.eval_samples)
        out["evaluation"] = {"method": method, "shots": shots.tolist(), "curves": curves}

    train_w = sum(w for w, _ in [clock.phases.get("train", (0, 0))])
    out["phases_wall_s"] = {k: v[0] for k, v in clock.phases.items()}
    out["phases_cpu_s"] = {k: v[1] for k, v in clock.phases.items()}
    out["prompt_evaluations"] = prompts
    out["prompts_per_s"] = prompts / train_w if train_w else None
    return out


def _evaluate(models, shots, theta0, noise, key, samples):
    """Curves on theta0 and -theta0: exact theory (theory.risk) if importable, else Monte Carlo."""
    curves = {}
    try:
        from theory.risk import risk as exact_risk
    except ImportError:
        exact_risk = None
    if exact_risk is not None:
        with jax.enable_x64(True):
            for name, p in models.items():
                p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), p)
                curves[name] = {t: np.asarray(exact_risk(p64, shots, task, noise=noise)).tolist()
                                for t, task in (("theta0", np.asarray(theta0, np.float64)),
                                                ("minus_theta0", -np.asarray(theta0, np.float64)))}
        return curves, "exact (theory.risk)"
    from linattn.evaluate import test_error

    for i, (name, p) in enumerate(models.items()):
        curves[name] = {t: test_error(jax.random.fold_in(key, 2 * i + j), p, shots, task, noise=noise,
                                      samples=samples).mean.tolist()
                        for j, (t, task) in enumerate((("theta0", theta0), ("minus_theta0", -theta0)))}
    return curves, f"Monte Carlo ({samples} prompts per point)"


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
    """Milliseconds per call of one training step's pieces at the benchmark's batch size."""
    import optax

    from linattn import data as D
    from linattn import train as T
    from linattn.model import predict
    from linattn.params import init_params

    B, d = args.batch, 5
    key = jax.random.PRNGKey(1)
    p = init_params(key, d, merged=False)
    theta0 = jnp.ones(d) / jnp.sqrt(d)
    data = D.make_finetune_dataset(key, theta0, 100_000)
    st = D.sample_prompt_stats(key, 20, B, d)
    tk = D.sample_prompts(key, 20, B, d)
    loss_tok = lambda p, tk: jnp.mean((predict(p, tk.Z) - tk.y) ** 2)
    loss_st = lambda p, st: jnp.mean((T._predict_one_layer(p, st.zq, st.S, 20, "tokens") - st.y) ** 2)
    pm = jax.tree.map(lambda a: jnp.broadcast_to(a, (8,) + a.shape), p)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.01, momentum=0.9))
    state = opt.init(p)
    return {
        "sample tokens n=20": _best_ms(jax.jit(lambda k: D.sample_prompts(k, 20, B, d)), key),
        "sample stats n=20": _best_ms(jax.jit(lambda k: D.sample_prompt_stats(k, 20, B, d)), key),
        "sample dataset n=20 + statistics": _best_ms(jax.jit(
            lambda k: T._outer_sum(D.sample_from_dataset(k, data, 20, B).Z)), key),
        "fwd+bwd tokens (model.predict)": _best_ms(jax.jit(jax.value_and_grad(loss_tok)), p, tk),
        "fwd+bwd stats (features)": _best_ms(jax.jit(jax.value_and_grad(loss_st)), p, st),
        "fwd+bwd stats, 8 methods vmapped": _best_ms(
            jax.jit(jax.vmap(jax.value_and_grad(loss_st), in_axes=(0, None))), pm, st),
        "optimizer update (clip + SGD momentum)": _best_ms(jax.jit(lambda g, s: opt.update(g, s, p)), p, state),
    }


def device_record() -> dict:
    devs = jax.devices()
    rec = {"backend": jax.default_backend(), "devices": [str(d) for d in devs], "device_kind": devs[0].device_kind,
           "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
           "python": platform.python_version(), "jax": jax.__version__}
    try:
        rec["cpu_model"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return rec


def peak_memory() -> dict:
    rec = {"host_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    stats = jax.devices()[0].memory_stats()
    if stats:
        rec["device_peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
    return rec


def _set_host_devices(n: int) -> None:
    """Ask for n host CPU devices (jax_num_cpu_devices); must run before JAX starts its backend."""
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError as e:  # the backend already started (e.g. called from a test process)
        if jax.device_count() != n:
            raise SystemExit(f"--devices {n}: JAX already started with {jax.device_count()} devices; "
                             f"run in a fresh process") from e
    if jax.device_count() != n:
        raise SystemExit(f"--devices {n}: got {jax.device_count()} devices ({jax.default_backend()})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", choices=WORKLOADS, default="tiny")
    ap.add_argument("--steps", type=int, default=5000)  # optimizer steps per run
    ap.add_argument("--batch", type=int, default=5000)  # prompts per risk evaluation
    ap.add_argument("--lr", type=float, default=0.01)  # reference learning rate
    ap.add_argument("--sampler", choices=("stats", "tokens"), default="stats")  # random-task prompts
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--precision", choices=("highest", "high", "default"), default="highest")  # f32 matmuls
    ap.add_argument("--devices", type=int, default=1, help="data parallelism over this many host CPU devices")
    ap.add_argument("--separate", action="store_true", help="8 fine-tuning programs instead of one fused")
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--eval-samples", type=int, default=20_000)  # Monte Carlo fallback only
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="time one step's pieces (sampling, fwd/bwd, update)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        ap.error("--steps and --batch must be >= 1")
    if args.devices < 1:
        ap.error("--devices must be >= 1")
    if args.devices > 1:
        batch = min(args.batch, 256) if args.workload == "tiny" else args.batch
        if batch % args.devices:
            ap.error(f"--batch {batch} must be a multiple of --devices {args.devices}")
        _set_host_devices(args.devices)
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", args.precision)

    load0 = os.getloadavg()
    w0, c0 = time.perf_counter(), _cpu_seconds()
    out = run(args)
    out["wall_s"] = time.perf_counter() - w0
    out["cpu_s"] = _cpu_seconds() - c0
    out["compile_total_s"] = sum(out["compile_s"].values())
    out["run_total_s"] = sum(out["run_s"].values())
    out["loadavg_start_end"] = [load0[0], os.getloadavg()[0]]
    out["peak_memory"] = peak_memory()
    out["device"] = device_record()
    out["precision"] = args.precision
    out["command"] = "python -m sims.benchmark " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.workload == "reference":
        out["reference_s"] = REFERENCE_SECONDS
        if out["steps"] == 5000 and out["batch"] == 5000:
            out["speedup_vs_reference"] = REFERENCE_SECONDS / out["wall_s"]
        else:  # a scaled run: extrapolate the run time linearly in steps x batch
            scale = 5000 * 5000 / (out["steps"] * out["batch"])
            est = out["wall_s"] + out["run_total_s"] * (scale - 1)
            out["estimated_full_wall_s"] = est
            out["estimated_speedup_vs_reference"] = REFERENCE_SECONDS / est
    if args.profile:
        out["profile_ms"] = profile(args)
    print(f"workload {out['workload']}: steps {out['steps']}, batch {out['batch']}, {out['dtype']}, "
          f"sampler {out['sampler']}, device {out['device']['devices'][0]} x{len(out['device']['devices'])}")
    print(f"  wall {out['wall_s']:.2f} s (cpu {out['cpu_s']:.2f} s; load avg {load0[0]:.1f})"
          f"  compile {out['compile_total_s']:.2f} s  train {out['run_total_s']:.2f} s"
          f"  evaluate {out['phases_wall_s'].get('evaluate', 0.0):.2f} s")
    for name, t in out["run_s"].items():
        print(f"  {name}: {t:.2f} s run, {1e3 * t / out['steps']:.2f} ms/step, compile {out['compile_s'][name]:.2f} s")
    if out["prompts_per_s"]:
        print(f"  {out['prompts_per_s']:.3g} prompt evaluations / s")
    print(f"  peak memory {out['peak_memory']}")
    if "speedup_vs_reference" in out:
        print(f"  reference 590 s -> {out['speedup_vs_reference']:.1f}x")
    if "estimated_full_wall_s" in out:
        print(f"  scaled run; full workload estimated {out['estimated_full_wall_s']:.0f} s "
              f"-> {out['estimated_speedup_vs_reference']:.1f}x the reference's 590 s")
    for name, ms in out.get("profile_ms", {}).items():
        print(f"  profile {name}: {ms:.2f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
