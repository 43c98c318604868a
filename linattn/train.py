"""The training engine: a plan of runs, grouped into compiled programs (SPEC section 3).

Shape notation: R slots (distinct keys) of a group, M method columns, K history buckets,
P devices.

A `Run` names one training run: its key, starting parameters, objective, subset, learning rate,
ObjectiveConfig (auxiliary weight, schedule, per-run data such as reference parameters), task
context and TrainConfig. `train_plan(runs)` groups the runs that can share minibatches (same
TrainConfig and task context) and compiles one program per group:

- runs of a group with the same key form a slot; slots are vmapped (R);
- within a slot, runs with different objectives, subsets or parameter shapes are method columns
  fused in one step (linattn.step): every (shots, task) minibatch is drawn once per slot and read
  by all M columns (common random numbers), and one-layer columns cost one matmul column each;
- learning rates, starting parameters and ObjectiveConfig arrays are traced per cell, so sweeps
  over them do not recompile; a missing (slot, column) cell is padded and dropped.

The risk source is a plan setting: "mc" (minibatch Monte Carlo, linattn.minibatch) trains;
"exact" (theory.risk.exact_source, float64) is the population gradient flow with the same
optimizer, schedule and steps (theory.solver.gradient_flow); "diffusion" (theory.sgd, float64) is
that flow plus noise of the minibatch gradient's own covariance at TrainConfig.batch, estimated
from TrainConfig.probe prompts per term and step (the SGD-aware prediction, theory.sgd.sgd_plan).

Devices are a call-site setting: `devices=None` uses every local device (on a CPU, linattn asks
for one device per core when it is imported), `devices=1` one. Under jax.distributed
(linattn.distributed) `devices=None` is every device of every process: each process builds and runs
only its own shards, and the results are gathered so every process returns the same list. `layout` "runs" shards the slots
over the devices; "batch" splits every step's minibatch over them (B / P prompts each, key
fold_in(step key, device), losses and gradients averaged with pmean: the same distribution as
one device, another random stream); "auto" picks per group (choose_layout).
Steps run in chunks of at most `chunk` so that `on_progress` can report and estimate time left.
Chunks end at every step of TrainConfig.snapshots, where the parameters are copied out (the
iterates along the trajectory: early stopping, in simulation and, with the exact source, in theory).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from linattn import data as D
from linattn import distributed as dist
from linattn import step as St
from linattn.minibatch import monte_carlo, resolve_sampler
from linattn.objectives import ObjectiveConfig, get_objective
from linattn.optim import OptimizerConfig, Subset, param_labels
from linattn.models import dtype_of, model_of

LAYOUTS = ("auto", "runs", "batch")
SOURCES = ("mc", "exact", "diffusion")  # "exact" and "diffusion" run in float64


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Static settings shared by the runs of one program (SPEC section 3 reference values).

    Keys, learning rates, initial parameters, task arrays and ObjectiveConfig arrays are traced,
    so sweeps over them do not recompile.
    """

    steps: int = 5000  # optimizer steps
    batch: int = 5000  # prompts per risk term and step
    d: int = 5  # covariate dimension
    noise: float = 0.1  # label-noise variance sigma^2
    tasks: str = "sphere"  # distribution of "random" tasks: "sphere" | "gaussian"
    normalization: str = "tokens"  # "tokens" = 1/(n+1), "shots" = 1/n
    sampler: str = "auto"  # a name in linattn.data.SAMPLERS, or "auto" (linattn.minibatch.resolve_sampler)
    history: int = 100  # length of the returned loss history (bucket means)
    optimizer: OptimizerConfig = OptimizerConfig()
    snapshots: tuple = ()  # steps s (1..steps) after which the parameters are also returned (early stopping)
    probe: int = 256  # the "diffusion" source's probe prompts per risk term and step (theory.sgd); others ignore it
    copies: int = 1  # set by the engine, not by users: one program draws each minibatch this many times per
    # step (slots x devices splitting it, batch / devices each); see program_prompts

    def __post_init__(self):
        if self.sampler != "auto" and self.sampler not in D.SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r} unknown; allowed: {sorted(D.SAMPLERS)} or 'auto'")
        if self.tasks not in D.TASK_KINDS:
            raise ValueError(f"tasks {self.tasks!r} unknown; allowed: {list(D.TASK_KINDS)}")
        for name in ("steps", "batch", "d", "history", "probe", "copies"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.noise < 0:
            raise ValueError(f"noise variance must be >= 0; got {self.noise}")
        snaps = tuple(self.snapshots)
        object.__setattr__(self, "snapshots", snaps)  # hashable: configs key the engine's groups
        if (any(not isinstance(s, (int, np.integer)) or not 1 <= s <= self.steps for s in snaps)
                or list(snaps) != sorted(set(snaps))):
            raise ValueError(f"snapshots must be increasing distinct integer steps in 1..steps = {self.steps}; "
                             f"got {self.snapshots!r}")

    @property
    def program_prompts(self) -> int:
        """Prompts the compiled program holding this config draws over the whole run (steps x batch
        x copies): what the "auto" sampler rule and the engine's compile options weigh."""
        return self.steps * self.batch * self.copies


class TaskContext(NamedTuple):
    """Arrays the task sources read (traced).

    theta0: (d,) the fine-tuning task ("target"; "minus_target" is -theta0).
    dataset: FineTuneData drawn from theta0, or None to draw "target" prompts fresh from theta0.
    cov_factor: (d, d) factor L of the covariate covariance (L L^T = Sigma), or None for I.
    """

    theta0: jax.Array
    dataset: Optional[D.FineTuneData] = None
    cov_factor: Optional[jax.Array] = None


class TrainResult(NamedTuple):
    params: dict  # final parameters (the last finite ones if training diverged)
    history: np.ndarray  # (K,) mean loss in K equal buckets of steps
    final_loss: np.ndarray  # () loss at the last step
    diverged_at: np.ndarray  # () first step with a non-finite loss or parameter, -1 if none
    snapshots: Optional[dict] = None  # leaves (len(cfg.snapshots), ...): the parameters after those steps


class TrainingDiverged(FloatingPointError):
    """A run produced a non-finite loss; carries the step, learning rate and run."""

    def __init__(self, step: int, lr: float, run: Any = None):
        where = "" if run is None else f"run {run}: "
        super().__init__(f"{where}training diverged (non-finite loss) at step {step} with learning rate {lr:g}")
        self.step, self.lr, self.run = step, lr, run


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """One training run of a plan.

    key: PRNG key (typed or raw uint32); runs of a group with equal keys see the same minibatches.
    params0: starting parameter tree (linattn.params).
    obj: ObjectiveConfig; its arrays (aux_weight, l2, ref_params, curvature) are per-run data.
    """

    key: Any
    params0: Mapping
    ctx: TaskContext
    objective: str = "pretrain"
    subset: Subset = "all"
    lr: Any = 0.01
    obj: ObjectiveConfig = ObjectiveConfig()
    cfg: TrainConfig = TrainConfig()
    name: str = ""


def train(key, params0, lr, ctx: TaskContext, obj_cfg: ObjectiveConfig = ObjectiveConfig(), *,
          objective: str = "pretrain", subset: Subset = "all", cfg: TrainConfig = TrainConfig(),
          **plan_kwargs) -> TrainResult:
    """One run: train_plan([Run(...)])[0]."""
    return train_plan([Run(key, params0, ctx, objective, subset, lr, obj_cfg, cfg)], **plan_kwargs)[0]


# ---------------------------------------------------------------- planning
def _raw_key(key):
    if key is None:  # the exact source reads no key
        return np.zeros(2, np.uint32), None
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(key)), str(jax.random.key_impl(key))
    return np.asarray(key, np.uint32), None


def _column_sig(run: Run):
    o = run.obj
    col = St.Column(run.objective, run.subset, int(o.m), int(o.n_ft), o.schedule)
    shapes = tuple((k, tuple(np.shape(v)), str(jnp.asarray(v).dtype)) for k, v in sorted(run.params0.items()))
    # every per-run data field (weights, reference parameters, curvature): runs of one column stack them
    data = jax.tree.structure(o), tuple(np.shape(a) for a in jax.tree.leaves(o))
    return col, shapes, data


def _check_run(i: int, run: Run, source: str) -> None:
    what = f"run {run.name or i}"
    if run.key is None and source != "exact":
        raise ValueError(f"{what}: source {source!r} draws prompts and needs a PRNG key; got None")
    if not isinstance(run.cfg, TrainConfig):
        raise TypeError(f"{what}: cfg must be a TrainConfig; got {type(run.cfg).__name__}")
    get_objective(run.objective)
    model = model_of(run.params0)
    if source != "mc" and model.name != "linear" and model.effective is None:
        raise ValueError(f"{what}: source {source!r} is the theory of the linear model and its reparametrisations "
                         f"(linattn.models: Model.effective, e.g. LoRA); a {model.name} parameter tree trains with "
                         "source 'mc' only")
    model.check(run.params0, run.cfg.d)
    param_labels(run.params0, run.subset)
    lr = np.asarray(run.lr, np.float64)
    if lr.ndim or not np.isfinite(lr) or lr <= 0:
        raise ValueError(f"{what}: learning rate must be a finite number > 0; got {run.lr!r}")
    resolve_sampler(run.cfg.sampler, model.one_layer(run.params0))
    theta = np.shape(run.ctx.theta0)
    if theta != (run.cfg.d,):
        raise ValueError(f"{what}: theta0 has shape {theta}; expected ({run.cfg.d},) for d = {run.cfg.d}")


class Group(NamedTuple):
    cfg: TrainConfig
    ctx: TaskContext
    sigs: tuple  # M column signatures
    cells: np.ndarray  # (R, M) run index or -1
    keys: np.ndarray  # (R, 2) raw keys
    impl: Optional[str]


def plan_groups(runs: Sequence[Run], source: str) -> list[Group]:
    """Groups of runs sharing a program: same TrainConfig and task context (object identity)."""
    by_group: dict = {}
    for i, run in enumerate(runs):
        by_group.setdefault((run.cfg, id(run.ctx)), []).append(i)
    groups = []
    for (cfg, _), idx in by_group.items():
        slots: dict = {}  # slot id -> {column sig -> [run idx]}
        counts: dict = {}
        impls = set()
        for i in idx:
            raw, impl = _raw_key(runs[i].key)
            impls.add(impl)
            sig = _column_sig(runs[i])
            if source != "exact":
                slot = raw.tobytes()
            else:  # the exact source reads no keys: one slot per occurrence of a column
                slot = counts.get(sig, 0)
                counts[sig] = slot + 1
            slots.setdefault(slot, ({}, raw))[0].setdefault(sig, []).append(i)
        if len(impls) > 1:
            raise ValueError(f"runs of one group mix key kinds {sorted(map(str, impls))}; use one kind of key")
        cols: list = []  # (sig, occurrence)
        for per_sig, _ in slots.values():
            for sig, members in per_sig.items():
                for j in range(len(members)):
                    if (sig, j) not in cols:
                        cols.append((sig, j))
        cells = -np.ones((len(slots), len(cols)), np.int64)
        for r, (per_sig, _) in enumerate(slots.values()):
            for sig, members in per_sig.items():
                for j, i in enumerate(members):
                    cells[r, cols.index((sig, j))] = i
        keys = np.stack([raw for _, raw in slots.values()])
        groups.append(Group(cfg, runs[idx[0]].ctx, tuple(s for s, _ in cols), cells, keys, impls.pop()))
    return groups


def choose_layout(slots: int, batch: int, n_dev: int, source: str, layout: str = "auto") -> str:
    """"single" on one device; otherwise "runs" (slots sharded) or "batch" (minibatch split).

    auto: "runs" when the slots fill the devices evenly (no padding), else "batch" when the batch
    splits evenly (Monte Carlo only), else "runs" with padded slots. BENCHMARKS.md has the
    measurements behind this rule.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} unknown; allowed: {list(LAYOUTS)}")
    if n_dev == 1:
        return "single"
    if layout == "batch":
        if source != "mc" or batch % n_dev:
            raise ValueError(f"layout 'batch' needs the Monte Carlo source and a batch divisible by {n_dev} "
                             f"devices; got source {source!r}, batch {batch}")
        return "batch"
    if layout == "runs":
        return "runs"
    if slots % n_dev == 0 or source != "mc" or batch % n_dev:
        return "runs"
    return "batch"


def resolve_devices(devices=None) -> list:
    """None: every local device, or under jax.distributed every device of every process
    (jax.devices()); an int n: the first n local devices (one process only); or a sequence of devices."""
    local = jax.local_devices()
    if devices is None:
        return jax.devices() if dist.multi() else local
    if isinstance(devices, (int, np.integer)):
        if dist.multi():
            raise ValueError(f"devices={devices} picks local devices of one process; under jax.distributed "
                             f"({jax.process_count()} processes) allowed: None (every device) or a list of devices")
        if not 1 <= devices <= len(local):
            raise ValueError(f"devices={devices} must be between 1 and the {len(local)} local devices")
        return local[: int(devices)]
    return list(devices)


# ---------------------------------------------------------------- programs
_PROGRAMS: dict = {}
AXIS = "devices"


def _source_fn(source: str) -> Callable:
    if source == "mc":
        return monte_carlo
    from theory.risk import exact_source  # theory depends on linattn, not the reverse, at import
    from theory.sgd import diffusion_source

    return {"exact": exact_source, "diffusion": diffusion_source}[source]


def _program_sig(group: Group, source: str, layout: str, devices: tuple, chunk: int, k_hist: int, slots: int) -> tuple:
    return (tuple(s[0] for s in group.sigs), tuple(s[1:] for s in group.sigs), group.cfg, source, layout, devices,
            chunk, k_hist, group.impl, slots)


def _over_slots(fn: Callable, in_axes: tuple, one: bool) -> Callable:
    """fn vmapped over the slot axis, or with one slot per device, fn on that slot's arrays with the
    axis dropped and restored: the same numbers, and on CPU a vmap of one slot ran the statistics
    sampler's pretraining step about 2x slower (10.4 against 5.4 ms at batch 5000, BENCHMARKS.md)."""
    if not one:
        return jax.vmap(fn, in_axes=in_axes)

    def single(*args):
        args = [jax.tree.map(lambda a: a[0], x) if ax == 0 else x for x, ax in zip(args, in_axes)]
        return jax.tree.map(lambda a: a[None], fn(*args))

    return single


def _local_cfg(cfg: TrainConfig, layout: str, n_dev: int, slots: int) -> TrainConfig:
    """The config one device's step runs with: its share of the batch, and the copies of each
    minibatch the whole program draws (slots x devices splitting it)."""
    if layout == "batch":
        return dataclasses.replace(cfg, batch=cfg.batch // n_dev, copies=slots * n_dev)
    return dataclasses.replace(cfg, copies=slots)


def _programs(group: Group, source: str, layout: str, devices: tuple, chunk: int, k_hist: int, slots: int):
    """(init, run) jitted functions of a group with `slots` slots (padding included), cached per static
    configuration."""
    columns = tuple(s[0] for s in group.sigs)
    sig = _program_sig(group, source, layout, devices, chunk, k_hist, slots)
    if sig in _PROGRAMS:
        return _PROGRAMS[sig]
    cfg = group.cfg
    n_dev = len(devices)
    one = slots == (n_dev if layout == "runs" else 1)  # each device holds a single slot
    local_cfg = _local_cfg(cfg, layout, n_dev, slots)
    src = _source_fn(source)
    impl = group.impl

    def slot_init(params0, lrs):
        return St.init_state(columns, params0, lrs, cfg, k_hist)

    def slot_run(state, raw_key, lrs, objs, ctx, steps):
        key = raw_key if impl is None else jax.random.wrap_key_data(raw_key, impl=impl)
        return St.run_steps(state, key, lrs, objs, ctx, steps, columns=columns, cfg=local_cfg, source=src,
                            k_hist=k_hist, data_axis=AXIS if layout == "batch" else None)

    init = jax.jit(jax.vmap(slot_init))  # every slot, outside the devices' shards
    run = _over_slots(slot_run, (0, 0, 0, 0, None, None), one)
    if layout in ("runs", "batch"):
        mesh = Mesh(np.asarray(devices), (AXIS,))
        spec = P(AXIS) if layout == "runs" else P()
        run = jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec, spec, P(), P()), out_specs=spec)
    _PROGRAMS[sig] = (init, jax.jit(run, donate_argnums=0))
    return _PROGRAMS[sig]


def _x64(on: bool):
    return jax.enable_x64(True) if on else contextlib.nullcontext()


def _chunk_size(steps: int, chunk: int) -> int:
    """The largest divisor of steps that is at most chunk (steps itself if only tiny ones exist)."""
    best = max(c for c in range(1, min(steps, chunk) + 1) if steps % c == 0)
    return best if best * 8 >= min(steps, chunk) else steps


def _bucket_counts(steps: int, k: int) -> np.ndarray:
    return np.bincount(np.arange(steps) * k // steps, minlength=k)


def _stack(trees: list, dtype):
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x, dtype) for x in xs]), *trees)


def _prepare(g: Group, runs: Sequence[Run], source: str, devices: list, layout: str, chunk: int) -> dict:
    """Arrays, programs and initial state of one group, laid out on the devices."""
    cfg = g.cfg
    R, M = g.cells.shape
    n_dev = len(devices)
    layout = choose_layout(R, cfg.batch, n_dev, source, layout)
    pad = (-R) % n_dev if layout == "runs" else 0
    cells = np.concatenate([g.cells, np.repeat(g.cells[:1], pad, axis=0)]) if pad else g.cells
    keys = np.concatenate([g.keys, np.repeat(g.keys[:1], pad, axis=0)]) if pad else g.keys
    filler = [next(int(i) for i in cells[:, m] if i >= 0) for m in range(M)]
    pick = lambda r, m: runs[cells[r, m] if cells[r, m] >= 0 else filler[m]]
    dtype = np.float64 if source != "mc" else np.dtype(dtype_of(runs[filler[0]].params0))
    params0 = tuple(_stack([dict(pick(r, m).params0) for r in range(len(cells))], dtype) for m in range(M))
    lrs = tuple(np.asarray([pick(r, m).lr for r in range(len(cells))], dtype) for m in range(M))
    objs = tuple(_stack([pick(r, m).obj for r in range(len(cells))], dtype) for m in range(M))
    ctx = g.ctx
    if source != "mc":  # the theory replaces the fine-tuning dataset by its population
        ctx = TaskContext(np.asarray(ctx.theta0, np.float64), None,
                          None if ctx.cov_factor is None else np.asarray(ctx.cov_factor, np.float64))
    k_hist = min(cfg.history, cfg.steps)
    c = _chunk_size(math.gcd(cfg.steps, *cfg.snapshots), chunk)  # every snapshot step ends a chunk
    init, run = _programs(g, source, layout, tuple(devices), c, k_hist, len(cells))
    state = init(params0, lrs)
    steps = None  # the step numbers of a chunk: placed like ctx when processes share the mesh
    if layout != "single":
        mesh = Mesh(np.asarray(devices), (AXIS,))
        spec = NamedSharding(mesh, P(AXIS) if layout == "runs" else P())
        state, keys, lrs, objs = dist.put((state, keys, lrs, objs), spec)  # each process: its own shards
        ctx = dist.put(ctx, NamedSharding(mesh, P()))
        if not spec.is_fully_addressable:
            steps = NamedSharding(mesh, P())
    sig = (_program_sig(g, source, layout, tuple(devices), c, k_hist, len(cells)), str(dtype))
    return dict(group=g, run=run, chunk=c, k_hist=k_hist, args=[state, keys, lrs, objs, ctx], x64=source != "mc",
                options=compiler_options(_local_cfg(cfg, layout, n_dev, len(cells)).program_prompts,
                                         devices[0].platform),
                sig=sig, steps=steps)


def _steps(prep: dict, start: int):
    """Step numbers start..start+chunk-1 of a chunk, on the program's mesh when it spans processes."""
    if prep["steps"] is None:
        return jnp.arange(start, start + prep["chunk"], dtype=jnp.int32)
    return dist.put(np.arange(start, start + prep["chunk"], dtype=np.int32), prep["steps"])


# On a CPU the engine compiles a program by how long it will run. Programs that draw fewer prompts
# than this over their whole run (TrainConfig.program_prompts; for the theory's sources, the prompts
# of their SGD counterpart) are compile-bound: LLVM optimisation level 1 and XLA's older loop emitters
# (the setting linattn/__init__ gives every program outside the engine) cut --quick's CPU time by
# about a fifth (with the threshold at 1e6 instead, its stage C compiled with the defaults: 57.5 and
# 61.3 s against 54.4 and 56.0 s wall), and the reference benchmark's two programs (5e6 prompts each)
# compile about 2 s faster and run as fast (cold 10.1 and 10.7 s against 12.65 and 12.75 s with the
# threshold at 5e6). Longer programs keep XLA's defaults, fusion emitters included, which ran
# --full's stages A, B and D (7.5e7 prompts and more) 5-12 % faster. The price below the threshold:
# the one-layer token sampler's step runs 2.3x slower with the loop emitters (200 pretraining steps
# at batch 5000, 1e6 prompts: 5.2 against 3.7 s cold; "auto" takes the statistics sampler above
# about 1.3e6 prompts); a two-layer model's 1.07x, and its cold run is still faster with them (3.7
# against 4.1 s). Measured on the 2-core Xeon of BENCHMARKS.md ("2026-12-07", fourth and fifth sessions).
QUICK_COMPILE_PROMPTS = 2e7


def compiler_options(prompts: int, platform: str) -> dict | None:
    """XLA compile options of a program that draws `prompts` prompts on `platform` (QUICK_COMPILE_PROMPTS)."""
    if platform != "cpu":
        return None
    if prompts < QUICK_COMPILE_PROMPTS:
        return {"xla_backend_optimization_level": 1, "xla_cpu_use_fusion_emitters": False}
    return {"xla_cpu_use_fusion_emitters": True}


_EXECUTABLES: dict = {}  # signature -> Future of the compiled executable
_EXECUTABLES_LOCK = threading.Lock()


def _compile(prep: dict):
    """The group's step program compiled ahead of time (threads compile groups concurrently),
    cached per program and slot count, so a second plan of the same shapes does not recompile.
    A thread that asks for a program another thread is compiling waits for it."""
    shapes = jax.tree.structure(prep["args"]), tuple((np.shape(a), str(a.dtype)) for a in jax.tree.leaves(prep["args"]))
    sig = (prep["sig"], shapes)  # the task context (e.g. the dataset size) is not in the program's signature
    with _EXECUTABLES_LOCK:
        fut = _EXECUTABLES.get(sig)
        owner = fut is None
        if owner:
            fut = _EXECUTABLES[sig] = Future()
    if owner:
        try:
            with _x64(prep["x64"]):  # JAX config contexts are per thread
                fut.set_result(prep["run"].lower(*prep["args"], _steps(prep, 0)).compile(prep["options"]))
        except BaseException as e:
            with _EXECUTABLES_LOCK:
                del _EXECUTABLES[sig]
            fut.set_exception(e)
    return fut.result()


def _prepare_all(runs: Sequence[Run], source: str, devices, layout: str, chunk: int) -> list[dict]:
    if source not in SOURCES:
        raise ValueError(f"source {source!r} unknown; allowed: {list(SOURCES)}")
    if len(runs) == 0:
        raise ValueError("the plan has no runs")
    for i, run in enumerate(runs):
        _check_run(i, run, source)
    devices = resolve_devices(devices)
    return [_prepare(g, runs, source, devices, layout, chunk) for g in plan_groups(runs, source)]


def _compile_all(preps: list[dict]) -> list:
    if len(preps) == 1:
        return [_compile(preps[0])]
    with ThreadPoolExecutor(max_workers=min(len(preps), os.cpu_count() or 1)) as pool:
        return list(pool.map(_compile, preps))


def precompile(runs: Sequence[Run], *, source: str = "mc", devices=None, layout: str = "auto",
               chunk: int = 1000) -> Future:
    """Compile the programs of a plan in a background thread and return at once.

    A later train_plan with the same settings and shapes (keys, parameter shapes, objectives,
    subsets, configs; not the parameter values) finds them compiled, so compilation overlaps
    other work: a study compiles its fine-tuning while it pretrains, with placeholder starting
    parameters of the right shapes. Bad runs raise here, at once; compile errors come out of the
    Future (and again in train_plan).
    """
    with _x64(source != "mc"):
        preps = _prepare_all(runs, source, devices, layout, chunk)
    fut: Future = Future()

    def work():
        try:
            fut.set_result(len(_compile_all(preps)))
        except BaseException as e:  # reported through the Future
            fut.set_exception(e)

    threading.Thread(target=work, daemon=True, name="linattn-precompile").start()
    return fut


def _execute(prep: dict, compiled, on_progress: Optional[Callable], where: tuple) -> dict:
    """Run a prepared group chunk by chunk; {run index: TrainResult} with host (numpy) arrays."""
    g, c, k_hist = prep["group"], prep["chunk"], prep["k_hist"]
    cfg = g.cfg
    state, rest = prep["args"][0], prep["args"][1:]
    t0 = time.time()
    snaps = []  # host copies of the parameters after each snapshot step (the state is donated)
    for start in range(0, cfg.steps, c):
        state = compiled(state, *rest, _steps(prep, start))
        if start + c in cfg.snapshots:
            snaps.append(dist.to_host(state.params))
        if on_progress is not None:
            jax.block_until_ready(state.bad)
            on_progress(*where, start + c, cfg.steps, time.time() - t0)
    host = dist.to_host(state)  # under jax.distributed: gathered from every process
    hist = host.hist / _bucket_counts(cfg.steps, k_hist)
    out = {}
    R, M = g.cells.shape
    for r in range(R):
        for m in range(M):
            i = int(g.cells[r, m])
            if i >= 0:
                params = {k: v[r] for k, v in host.params[m].items()}
                snap = {k: np.stack([s[m][k][r] for s in snaps]) for k in params} if snaps else None
                out[i] = TrainResult(params, hist[r, m], host.last[r, m], host.bad[r, m], snap)
    return out


def compile_profile(runs: Sequence[Run], *, source: str = "mc", devices=None, layout: str = "auto",
                    chunk: int = 1000) -> list[dict]:
    """Where a plan's fixed cost goes, one program (group) at a time: its slots R and method columns
    M, its StableHLO size, and the wall and CPU seconds of tracing, lowering to StableHLO and XLA
    compilation. The engine's caches are bypassed; with JAX's persistent compilation cache off
    (sims.benchmark --compile-profile turns it off) every call measures a cold compilation."""
    def cpu():
        t = os.times()
        return t.user + t.system

    out = []
    with _x64(source != "mc"):
        for prep in _prepare_all(runs, source, devices, layout, chunk):
            clock = [(time.perf_counter(), cpu())]
            traced = prep["run"].trace(*prep["args"], _steps(prep, 0))
            clock.append((time.perf_counter(), cpu()))
            lowered = traced.lower()
            clock.append((time.perf_counter(), cpu()))
            lowered.compile(prep["options"])
            clock.append((time.perf_counter(), cpu()))
            R, M = prep["group"].cells.shape
            rec = {"source": source, "slots": int(R), "columns": int(M), "runs": int((prep["group"].cells >= 0).sum()),
                   "stablehlo_lines": lowered.as_text().count("\n")}
            for i, phase in enumerate(("trace", "lower", "compile")):
                rec[f"{phase}_wall_s"] = clock[i + 1][0] - clock[i][0]
                rec[f"{phase}_cpu_s"] = clock[i + 1][1] - clock[i][1]
            out.append(rec)
    return out


def train_plan(runs: Sequence[Run], *, source: str = "mc", devices=None, layout: str = "auto", chunk: int = 1000,
               check: bool = True, on_progress: Optional[Callable] = None) -> list[TrainResult]:
    """Train every run of the plan; results in the order of `runs` (host numpy arrays).

    Under jax.distributed every process calls it with the same runs; each process feeds and runs
    only its own devices' shards, and every process gets all the results.

    The groups' programs are compiled concurrently (one thread per core), then run in turn.

    Args:
      source: "mc" (minibatch training), "exact" (population gradient flow, float64) or "diffusion"
        (the flow plus minibatch noise of the model's own covariance, float64: theory.sgd).
      devices: None (every local device; under jax.distributed every device of every process), an
        int (the first n local devices) or a device list.
      layout: "auto", "runs" or "batch" (module docstring; ignored on one device).
      chunk: steps per compiled call (progress reports come between calls).
      check: raise TrainingDiverged for the first run whose loss or parameters went non-finite.
      on_progress: called as on_progress(group, groups, steps_done, steps, seconds) after each chunk.
    """
    results: dict = {}
    with _x64(source != "mc"):
        preps = _prepare_all(runs, source, devices, layout, chunk)
        compiled = _compile_all(preps)
        for gi, (prep, exe) in enumerate(zip(preps, compiled)):
            results.update(_execute(prep, exe, on_progress, (gi, len(preps))))
    out = [results[i] for i in range(len(runs))]
    if check:
        raise_if_diverged(out, runs)
    return out


def raise_if_diverged(results: Sequence[TrainResult], runs: Sequence[Run]) -> None:
    """Raise TrainingDiverged for the first run whose loss went non-finite (step, lr, run name)."""
    for i, (res, run) in enumerate(zip(results, runs)):
        if int(res.diverged_at) >= 0:
            name = run.name or (i if len(runs) > 1 else None)
            raise TrainingDiverged(int(res.diverged_at), float(run.lr), run=name)
