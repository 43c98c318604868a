"""Grid sweeps of small forgetting studies, through the training engine, on every device of every process.

    python -m sims.sweep sims/grids/tiny.toml --out runs/tiny           # one process, its devices
    python -m sims.sweep sims/grids/tiny.toml --out runs/tiny --dry-run # cells, programs, time estimate
    python -m sims.launch --processes 2 -- python -m sims.sweep sims/grids/tiny.toml --out runs/tiny2

A grid file (TOML, read with the standard library's tomllib):

    methods = ["zs_all", "zs_v"]   # fine-tuning methods every cell runs (sims.forgetting names)
    seeds = [0, 1]                 # root seeds: every cell is run once per seed (theta0, data, keys)
    [fixed]                        # study settings shared by every cell (sims.forgetting's flat names;
    steps = 200                    #   the rest from its --quick preset)
    [axes]                         # study settings swept: every combination is a cell
    d = [3, 5]
    noise = [0.0, 0.1]
    [outputs]                      # optional: the rows kept in results.csv (default: all)
    tasks = ["theta0", "minus_theta0"]
    shots = [0, 5, 10]

A cell is one small study: pretraining (sims.forgetting.pretrain_runs; shared by the cells that
differ only in fine-tuning settings), its methods' fine-tuning (finetune_run), Monte Carlo test
curves (evaluate_models) and the exact risk of the trained weights (theory_models), of the
pretrained models (rows "pretrained", "sep_pretrained": the baseline) and of every method. The work is
three stages over all unfinished cells: A, one engine plan of every pretraining; B, one plan of
every fine-tuning (cells sharing theta0, data and TrainConfig are fused into one program); C, the
evaluation, one cell per process at a time. Each stage's results are saved as soon as they exist
(DIR/pieces), so a rerun, with any number of processes, does only what is missing. Process 0
writes every file: DIR/results.csv (one row per run, task and shot count), DIR/config.json and
DIR/grid.png (every cell's error at the largest output shot count: exact risk and Monte Carlo).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import NamedTuple

PROG = "python -m sims.sweep"
TOP = ("methods", "seeds", "fixed", "axes", "outputs")
EXCLUDED = ("methods", "sweep_methods", "sweep_weights", "sweep_seeds", "frontier_weights", "pretrain_ds", "d_steps",
            "d_seeds", "seed")  # study fields a sweep cell does not take from the grid
# Rough costs for --dry-run's estimate (one process) on this project's 2-core CPU: compiling and
# running a training program of sims/grids/tiny.toml (stages A + B: 43 s for 8 programs) and one
# evaluation program (Monte Carlo and exact curves: 7-8.5 s per new (d, noise); 0.1 s per further
# cell); the training rate lies between BENCHMARKS.md's full-run stages A (1.0e6) and B (3.9e6).
COMPILE_S = 5.5  # seconds per training program
PROMPT_STEPS_PER_S = 2.0e6  # prompts x steps x methods per second, per device
EVAL_PROGRAM_S = 7.5  # seconds per distinct evaluation program


class GridError(ValueError):
    """A bad grid file: the message names the bad value and what is allowed."""


class Grid(NamedTuple):
    methods: tuple
    seeds: tuple
    fixed: dict
    axes: dict  # name -> list of values, in file order
    tasks: tuple
    shots: tuple | None  # None: every shot count


def allowed_fields() -> dict:
    """{study setting: its default (from sims.forgetting.FLAT)} a grid may fix or sweep."""
    from sims.forgetting import FLAT

    return {k: v for k, v in FLAT.items() if k not in EXCLUDED}


def _check_value(where: str, name: str, value, default):
    """value converted to the type of `default` (int or float), or GridError."""
    want = "integers" if isinstance(default, int) else "numbers"
    ok = isinstance(value, int) if isinstance(default, int) else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        raise GridError(f"{where} {name}: {value!r} is a {type(value).__name__}; allowed: {want}")
    return value if isinstance(default, int) else float(value)


def _names(where: str, value, allowed) -> tuple:
    if not isinstance(value, list) or not value:
        raise GridError(f"{where}: {value!r}: allowed a non-empty list of {list(allowed)}")
    bad = [v for v in value if v not in allowed]
    if bad:
        raise GridError(f"{where}: {bad[0]!r} unknown; allowed: {list(allowed)}")
    if len(set(value)) != len(value):
        raise GridError(f"{where}: {value!r} repeats a name; allowed: each once")
    return tuple(value)


def _int_list(where: str, value, low: int) -> tuple:
    if not isinstance(value, list) or not value:
        raise GridError(f"{where}: {value!r}: allowed a non-empty list of integers >= {low}")
    bad = [v for v in value if isinstance(v, bool) or not isinstance(v, int) or v < low]
    if bad:
        raise GridError(f"{where}: {bad[0]!r}: allowed integers >= {low}")
    if len(set(value)) != len(value):
        raise GridError(f"{where}: {value!r} repeats a value; allowed: each once")
    return tuple(value)


def parse_grid(data: dict) -> Grid:
    """A Grid from a parsed TOML table; GridError names the first bad key or value."""
    from sims.forgetting import METHOD_BY_NAME, TASKS

    unknown = [k for k in data if k not in TOP]
    if unknown:
        raise GridError(f"grid key {unknown[0]!r} unknown; allowed: {list(TOP)}")
    for k in ("methods", "seeds", "axes"):
        if k not in data:
            raise GridError(f"grid key {k!r} missing; allowed keys: {list(TOP)} ({list(TOP[:2])} and [axes] required)")
    methods = _names("methods", data["methods"], list(METHOD_BY_NAME))
    seeds = _int_list("seeds", data["seeds"], 0)
    fields = allowed_fields()
    tables = {}
    for table in ("fixed", "axes", "outputs"):
        value = data.get(table, {})
        if not isinstance(value, dict):
            raise GridError(f"[{table}]: {value!r} is a {type(value).__name__}; allowed: a table")
        tables[table] = value
    fixed, axes = {}, {}
    for name, value in tables["fixed"].items():
        if name not in fields:
            raise GridError(f"[fixed] {name!r} unknown; allowed: {', '.join(fields)}")
        fixed[name] = _check_value("[fixed]", name, value, fields[name])
    if not tables["axes"]:
        raise GridError("[axes] is empty; allowed: at least one of " + ", ".join(fields))
    for name, values in tables["axes"].items():
        if name not in fields:
            raise GridError(f"[axes] {name!r} unknown; allowed: {', '.join(fields)}")
        if name in fixed:
            raise GridError(f"[axes] {name!r} is also in [fixed]; allowed: one of the two")
        if not isinstance(values, list):
            raise GridError(f"[axes] {name}: {values!r} is a {type(values).__name__}; allowed: a list of values")
        if not values:
            raise GridError(f"[axes] {name} is empty; allowed: a list of at least one value")
        axes[name] = [_check_value("[axes]", name, v, fields[name]) for v in values]
        if len(set(axes[name])) != len(axes[name]):
            raise GridError(f"[axes] {name}: {values!r} repeats a value; allowed: each once")
    out = tables["outputs"]
    bad = [k for k in out if k not in ("tasks", "shots")]
    if bad:
        raise GridError(f"[outputs] {bad[0]!r} unknown; allowed: ['tasks', 'shots']")
    tasks = _names("[outputs] tasks", out["tasks"], TASKS) if "tasks" in out else tuple(TASKS)
    shots = _int_list("[outputs] shots", out["shots"], 0) if "shots" in out else None
    return Grid(methods, seeds, fixed, axes, tasks, shots)


def read_grid(path) -> Grid:
    """Parse and check a grid file (GridError names the file's problem)."""
    import tomllib

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise GridError(f"{str(path)!r}: cannot read ({err.strerror}); allowed: a TOML grid file") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise GridError(f"{str(path)!r}: not valid TOML ({err})") from None
    return parse_grid(data)


# ---------------------------------------------------------------- cells
class Cell(NamedTuple):
    seed: int
    values: dict  # axis name -> value
    cfg: object  # sims.forgetting.StudyConfig

    @property
    def id(self) -> str:
        """A name from the cell's whole config: a saved cell is found again whatever the grid's order."""
        return _hash(self.cfg.to_json())


def _hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def cell_config(grid: Grid, seed: int, values: dict):
    """The StudyConfig of one cell: the quick preset, [fixed], the axis values, one root seed."""
    from sims.forgetting import FLAT, PRESETS, _flat_value, study_config

    base = {k: _flat_value(PRESETS["quick"], k) for k in FLAT}
    fields = {**base, **grid.fixed, **values, "seed": seed, "methods": grid.methods, "sweep_methods": (),
              "pretrain_ds": ()}
    return study_config(preset="sweep", **fields)


def n_cells(grid: Grid) -> int:
    return len(grid.seeds) * math.prod(len(v) for v in grid.axes.values())


def cells_of(grid: Grid) -> list[Cell]:
    """Every cell (seeds outermost, then the axes in file order); GridError names a bad one."""
    from sims.forgetting import check_study

    out = []
    names = list(grid.axes)
    for seed in grid.seeds:
        for combo in itertools.product(*grid.axes.values()):
            values = dict(zip(names, combo))
            try:
                cfg = cell_config(grid, seed, values)
                check_study(cfg)
            except (ValueError, TypeError) as err:
                raise GridError(f"cell {values} (seed {seed}): {err}") from None
            if grid.shots is not None and max(grid.shots) > cfg.max_shots:
                raise GridError(f"[outputs] shots: {max(grid.shots)} > max_shots {cfg.max_shots} of cell {values}; "
                                f"allowed: 0..{cfg.max_shots}")
            out.append(Cell(seed, values, cfg))
    return out


def pretrain_id(cfg, model: str) -> str:
    """Cells with equal pretraining settings (root seed, seeds, lr, TrainConfig, m) share pretraining."""
    return f"pre_{model}_" + _hash({"seed": cfg.seed, "seeds": cfg.seeds, "lr": cfg.lr, "m": cfg.objective.m,
                                    "train": dataclasses.asdict(cfg.train), "model": model})


def models_of(cfg) -> list[str]:
    from sims.forgetting import METHOD_BY_NAME

    return sorted({METHOD_BY_NAME[m].model for m in cfg.methods})


def data_id(cfg) -> tuple:
    """theta0 and the fine-tuning dataset depend on these alone."""
    return cfg.seed, cfg.d, cfg.noise, cfg.dataset


# ---------------------------------------------------------------- shared state across processes
def _like_params(cfg, model: str) -> dict:
    """Zeros shaped like a pretraining piece's stacked parameters ("p_" + leaf: (seeds, ...))."""
    import numpy as np

    from sims.forgetting import pretrained_like

    return {f"p_{k}": np.zeros_like(np.asarray(v)) for k, v in pretrained_like(cfg, model).items()}


def load_shared(store, name: str, like: dict) -> dict:
    """Process 0's saved piece, in every process (no shared file system needed)."""
    from linattn import distributed as dist

    arrays = store.load(name) if dist.is_writer() else like
    return dist.broadcast({k: arrays[k] for k in like})


def done_mask(store, names: list[str]) -> list[bool]:
    """Which pieces exist, as process 0 sees them (every process then plans the same work)."""
    import numpy as np

    from linattn import distributed as dist

    mask = np.asarray([store.has(n) if dist.is_writer() else False for n in names] or [False], np.int32)
    return [bool(x) for x in dist.broadcast(mask)[: len(names)]]


# ---------------------------------------------------------------- the work
def _ctx(cell: Cell, cache: dict):
    """The fine-tuning task context of a cell, one object per (seed, d, noise, dataset) so that
    the engine fuses the runs of cells that share it."""
    import jax.numpy as jnp

    from linattn import train as T
    from sims.forgetting import finetune_data, theta0_of

    key = data_id(cell.cfg)
    if key not in cache:
        theta0 = theta0_of(cell.cfg)
        cache[key] = T.TaskContext(theta0=jnp.asarray(theta0, jnp.float32), dataset=finetune_data(cell.cfg, theta0))
    return cache[key]


def ft_runs(cell: Cell, pre: dict, ctx) -> list:
    """Every (method, training seed) fine-tuning run of a cell, from its pretrained weights."""
    from sims import forgetting as S

    runs = []
    for name in cell.cfg.methods:
        m = S.METHOD_BY_NAME[name]
        runs += [S.finetune_run(cell.cfg, S.Cell(name, m, s, 1.0), pre, ctx) for s in range(cell.cfg.seeds)]
    return runs


def stage_a(cells: list[Cell], store, log) -> dict:
    """{pretraining id: stacked parameters}: loaded or trained in one plan, each saved at once."""
    from linattn import distributed as dist
    from linattn import train as T
    from sims.forgetting import pack, pretrain_runs, stack, unpack

    wanted = {}
    for c in cells:
        for model in models_of(c.cfg):
            wanted.setdefault(pretrain_id(c.cfg, model), (c.cfg, model))
    names = list(wanted)
    done = dict(zip(names, done_mask(store, names)))
    out = {n: unpack("p_", load_shared(store, n, _like_params(*wanted[n]))) for n in names if done[n]}
    todo = [n for n in names if not done[n]]
    if todo:
        runs, owner = [], []
        for n in todo:
            cfg, model = wanted[n]
            new = pretrain_runs(cfg, [f"pretrain_{model}"])
            runs += new
            owner += [n] * len(new)
        t0 = time.time()
        log(f"stage A: pretraining {len(runs)} runs ({len(todo)} settings) in one plan")
        res = T.train_plan(runs)
        log(f"stage A: {time.time() - t0:.1f} s")
        for n in todo:
            out[n] = stack([r.params for r, o in zip(res, owner) if o == n])
            if dist.is_writer():
                store.save(n, pack("p_", out[n]))
    return out


def _pre_of(cell: Cell, pre: dict) -> dict:
    return {model: pre[pretrain_id(cell.cfg, model)] for model in models_of(cell.cfg)}


def stage_b(cells: list[Cell], pre: dict, store, log) -> dict:
    """{cell id: {method: stacked fine-tuned parameters}}: loaded or trained in one plan."""
    from linattn import distributed as dist
    from linattn import train as T
    from sims.forgetting import linear_results, pack, stack, unpack

    names = [f"trained_{c.id}" for c in cells]
    done = dict(zip(names, done_mask(store, names)))
    out = {}
    cache: dict = {}
    todo, runs, owner = [], [], []
    for c, n in zip(cells, names):
        p = _pre_of(c, pre)
        if done[n]:
            like = {}
            for m in c.cfg.methods:
                like.update({f"{m}/{k}": v for k, v in _like_params(c.cfg, _model(m)).items()})
            z = load_shared(store, n, like)
            out[c.id] = {m: unpack("p_", unpack(f"{m}/", z)) for m in c.cfg.methods}
            continue
        new = ft_runs(c, p, _ctx(c, cache))
        todo.append(c)
        runs += new
        owner += [c.id] * len(new)
    if runs:
        t0 = time.time()
        groups = len(T.plan_groups(runs, "mc"))
        log(f"stage B: fine-tuning {len(runs)} runs of {len(todo)} cells in one plan ({groups} programs)")
        res = linear_results(T.train_plan(runs))  # LoRA methods: saved as the linear trees they compute
        log(f"stage B: {time.time() - t0:.1f} s")
        for c in todo:
            mine = [r for r, o in zip(res, owner) if o == c.id]
            S_ = c.cfg.seeds
            out[c.id] = {m: stack([r.params for r in mine[i * S_:(i + 1) * S_]]) for i, m in enumerate(c.cfg.methods)}
            if dist.is_writer():
                arrays = {}
                for m, tree in out[c.id].items():
                    arrays.update(pack(f"{m}/p_", tree))
                store.save(f"trained_{c.id}", arrays)
    return out


def _model(method: str) -> str:
    from sims.forgetting import METHOD_BY_NAME

    return METHOD_BY_NAME[method].model


def evaluated(cfg) -> list[str]:
    """The models of a cell's rows: its pretrained models (sims.forgetting.PRETRAINED names), then
    its methods; the pretrained rows are the baseline that forgetting is measured from."""
    from sims.forgetting import PRETRAINED

    return [PRETRAINED[m] for m in models_of(cfg)] + list(cfg.methods)


def evaluate_cell(cell: Cell, models: dict) -> dict:
    """{name/sim_mean, name/sim_se, name/theory}: arrays (S, T, N) of one cell's models (evaluated)."""
    from sims.forgetting import evaluate_models, in_parallel, theory_models, theta0_of

    theta0 = theta0_of(cell.cfg)
    sims, theory = in_parallel(lambda: evaluate_models(cell.cfg, models, theta0),
                               lambda: theory_models(cell.cfg, models, theta0))
    out = {}
    for m in evaluated(cell.cfg):
        out[f"{m}/sim_mean"], out[f"{m}/sim_se"], out[f"{m}/theory"] = sims[m][0], sims[m][1], theory[m]
    return out


def _layout(cell: Cell) -> list[tuple[str, tuple]]:
    """(name, shape) of a cell's evaluation arrays, in a fixed order."""
    from sims.forgetting import TASKS

    shape = (cell.cfg.seeds, len(TASKS), cell.cfg.max_shots + 1)
    return [(f"{m}/{k}", shape) for m in evaluated(cell.cfg) for k in ("sim_mean", "sim_se", "theory")]


def stage_c(cells: list[Cell], trained: dict, pre: dict, store, log) -> None:
    """Evaluate the cells without a saved piece (their pretrained and fine-tuned models), one per
    process at a time; process 0 saves each."""
    from sims.forgetting import PRETRAINED

    import jax
    import numpy as np

    from linattn import distributed as dist

    names = [f"cell_{c.id}" for c in cells]
    todo = [c for c, done in zip(cells, done_mask(store, names)) if not done]
    P_, me = jax.process_count(), jax.process_index()
    for r in range(0, len(todo), P_):
        batch = todo[r:r + P_]
        t0 = time.time()
        sizes = [sum(math.prod(s) for _, s in _layout(c)) for c in batch]
        vec = np.zeros(max(sizes), np.float64)
        if me < len(batch):
            c = batch[me]
            base = {PRETRAINED[model]: tree for model, tree in _pre_of(c, pre).items()}
            res = evaluate_cell(c, {**base, **trained[c.id]})
            flat = np.concatenate([np.asarray(res[k], np.float64).ravel() for k, _ in _layout(batch[me])])
            vec[:flat.size] = flat
        got = dist.gather_bits(vec)
        for i, c in enumerate(batch):
            arrays, at = {}, 0
            for k, shape in _layout(c):
                arrays[k] = got[i, at:at + math.prod(shape)].reshape(shape)
                at += math.prod(shape)
            if dist.is_writer():
                store.save(f"cell_{c.id}", arrays)
        log(f"stage C: evaluated {r + len(batch)}/{len(todo)} cells ({time.time() - t0:.1f} s for the last "
            f"{len(batch)})")


COLUMNS = ("method", "train_seed", "task", "shots", "sim_mean", "sim_se", "theory")


def write_table(grid: Grid, cells: list[Cell], store, path: Path) -> int:
    """DIR/results.csv: one row per cell, model (the pretrained ones, then the methods), training
    seed, task and shot count; floats as Python's shortest round-trip repr. Returns the number of rows."""
    from sims.forgetting import TASKS

    header = ("seed", *grid.axes, *COLUMNS)
    rows = 0
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for c in cells:
            z = store.load(f"cell_{c.id}")
            shots = range(c.cfg.max_shots + 1) if grid.shots is None else grid.shots
            for m in evaluated(c.cfg):
                for s in range(c.cfg.seeds):
                    for task in grid.tasks:
                        t = TASKS.index(task)
                        for n in shots:
                            w.writerow([c.seed, *(c.values[a] for a in grid.axes), m, s, task, n,
                                        *(repr(float(z[f"{m}/{k}"][s, t, n])) for k in ("sim_mean", "sim_se", "theory"))])
                            rows += 1
    tmp.replace(path)
    return rows


def figure_points(grid: Grid, cells: list[Cell], store) -> dict:
    """{(task, model): (cell indices, sim mean, sim SE, theory)} at each cell's largest output shot
    count, seed means (the SE over seeds of the Monte Carlo errors: sqrt(sum se^2) / S)."""
    from linattn.evaluate import seed_stats
    from sims.forgetting import TASKS

    out: dict = {}
    for i, c in enumerate(cells):
        z = store.load(f"cell_{c.id}")
        n = c.cfg.max_shots if grid.shots is None else max(grid.shots)
        stats = {m: seed_stats(z[f"{m}/sim_mean"], z[f"{m}/sim_se"], z[f"{m}/theory"]) for m in evaluated(c.cfg)}
        for task in grid.tasks:
            t = TASKS.index(task)
            for m, (mean, _, mc, theory, _) in stats.items():  # (T, N) each
                pts = out.setdefault((task, m), ([], [], [], []))
                for lst, v in zip(pts, (i, mean[t, n], mc[t, n], theory[t, n])):
                    lst.append(float(v))
    return out


def draw(grid: Grid, cells: list[Cell], store, path: Path) -> None:
    """DIR/grid.png: one panel per output task; x the cells (their axis values), y the test error at
    the largest output shot count of every model: exact risk of the trained weights (marker) and
    Monte Carlo ± SE (bar), seed means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = figure_points(grid, cells, store)
    models = list(dict.fromkeys(m for _, m in points))
    fig, axes = plt.subplots(len(grid.tasks), 1, figsize=(max(6.0, 0.6 * len(cells) + 2.5), 2.8 * len(grid.tasks)),
                             squeeze=False, sharex=True)
    width = 0.6 / max(len(models), 1)
    for row, task in enumerate(grid.tasks):
        ax = axes[row, 0]
        for k, m in enumerate(models):
            x, sim, se, th = points[(task, m)]
            x = [v + (k - (len(models) - 1) / 2) * width for v in x]
            color = f"C{k}"
            ax.errorbar(x, sim, yerr=se, fmt="none", color=color, capsize=2)
            ax.plot(x, th, "o", color=color, markersize=4, label=m if row == 0 else None)
        shot = "largest shot count" if grid.shots is None else f"n = {max(grid.shots)}"
        ax.set_ylabel(f"error on {task}\n({shot})")
        ax.grid(alpha=0.3)
    labels = [f"s{c.seed} " + " ".join(f"{k}={v:g}" for k, v in c.values.items()) for c in cells]
    axes[-1, 0].set_xticks(range(len(cells)), labels, rotation=60, ha="right", fontsize=8)
    fig.legend(loc="upper center", ncol=len(models), fontsize=8, frameon=False, title_fontsize=8,
               title="marker: exact risk of the trained weights; bar: Monte Carlo ± SE (seed means)")
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_config(grid: Grid, cells: list[Cell], out: Path, path_text: str) -> None:
    from linattn.records import versions

    text = json.dumps({"grid_file": path_text, "grid": grid._asdict(), "cells": [
        {"id": c.id, "seed": c.seed, "values": c.values, "config": c.cfg.to_json()} for c in cells],
        "versions": versions()}, indent=1)
    (out / "config.json").write_text(text)


def run_sweep(grid: Grid, out, *, grid_file: str = "", stop_after: int | None = None, log=None) -> int:
    """Run (or resume) every cell of the grid into `out`; returns the rows of results.csv."""
    from linattn import distributed as dist
    from sims.forgetting import StopRequested, Store

    log = log or _log
    out = Path(out)
    cells = cells_of(grid)
    writer = dist.is_writer()
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        write_config(grid, cells, out, grid_file)
    store = Store(out) if writer else _ReadOnlyStore(out)
    t0 = time.time()
    pre = stage_a(cells, store, log)
    trained = stage_b(cells, pre, store, log)
    if stop_after is not None:
        saved = done_mask(store, [f"cell_{c.id}" for c in cells])
        todo = [c for c, s in zip(cells, saved) if not s]
        if len(todo) > stop_after:
            stage_c(todo[:stop_after], trained, pre, store, log)
            raise StopRequested(f"stopped after {stop_after} new cells (--stop-after)")
    stage_c(cells, trained, pre, store, log)
    rows = 0
    if writer:
        rows = write_table(grid, cells, store, out / "results.csv")
        draw(grid, cells, store, out / "grid.png")
        log(f"{len(cells)} cells, {rows} rows in {out / 'results.csv'}; {time.time() - t0:.1f} s")
    return rows


class _ReadOnlyStore:
    """What processes other than 0 see of the store: nothing (process 0 reads, decides and broadcasts)."""

    def __init__(self, out):
        self.dir = Path(out) / "pieces"

    def has(self, name):
        return False

    def load(self, name):
        raise RuntimeError("only process 0 reads the saved pieces")

    def save(self, name, arrays):
        raise RuntimeError("only process 0 writes")


def _log(msg: str) -> None:
    import jax

    who = f" p{jax.process_index()}" if jax.process_count() > 1 else ""
    print(f"[{time.strftime('%H:%M:%S')}{who}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- dry run
def plan_summary(grid: Grid, cells: list[Cell], devices: int) -> dict:
    """Cells, training programs and a rough time estimate (COMPILE_S, PROMPT_STEPS_PER_S, EVAL_PROGRAM_S)."""
    import jax.numpy as jnp

    from linattn import train as T
    from sims.forgetting import pretrain_runs

    pre, runs_a = {}, []
    for c in cells:
        for model in models_of(c.cfg):
            n = pretrain_id(c.cfg, model)
            if n not in pre:
                pre[n] = c
                runs_a += pretrain_runs(c.cfg, [f"pretrain_{model}"])
    ctxs: dict = {}
    runs_b = []
    for c in cells:
        ctx = ctxs.setdefault(data_id(c.cfg), T.TaskContext(theta0=jnp.zeros(c.cfg.d)))
        like = {m: {k[2:]: v for k, v in _like_params(c.cfg, m).items()} for m in models_of(c.cfg)}
        runs_b += ft_runs(c, like, ctx)
    work, programs = 0.0, set()
    for runs in (runs_a, runs_b):
        for g in T.plan_groups(runs, "mc"):
            slots, cols = g.cells.shape
            work += g.cfg.steps * g.cfg.batch * cols * -(-slots // devices)
            programs.add((g.cfg, g.sigs, slots))
    evals = {(c.cfg.d, c.cfg.noise, c.cfg.max_shots, c.cfg.eval_samples, c.cfg.eval_chunk, c.cfg.seeds,
              len(c.cfg.methods)) for c in cells}  # what an evaluation program's shapes and statics depend on
    seconds = (len(programs) * COMPILE_S + work / PROMPT_STEPS_PER_S + len(evals) * EVAL_PROGRAM_S
               + 0.1 * (len(cells) - len(evals)))
    return {"cells": len(cells), "pretraining_runs": len(runs_a), "finetuning_runs": len(runs_b),
            "programs": len(programs), "prompt_steps": work, "estimate_s": seconds}


def dry_run(grid: Grid, cells: list[Cell]) -> None:
    import jax

    print(f"{len(cells)} cells ({len(grid.seeds)} seeds x " + " x ".join(f"{len(v)} {k}" for k, v in grid.axes.items())
          + f"), methods {', '.join(grid.methods)}")
    for i, c in enumerate(cells):
        print(f"  cell {i}: seed {c.seed}, " + ", ".join(f"{k} = {v}" for k, v in c.values.items()) + f"  [{c.id}]")
    s = plan_summary(grid, cells, jax.device_count())
    print(f"training: {s['pretraining_runs']} pretraining and {s['finetuning_runs']} fine-tuning runs in "
          f"{s['programs']} compiled programs, {s['prompt_steps']:.3g} prompt-steps on {jax.device_count()} devices")
    print(f"estimate: ~{s['estimate_s']:.0f} s in one process (constants measured on a 2-core CPU: "
          f"sims.sweep COMPILE_S, PROMPT_STEPS_PER_S, EVAL_PROGRAM_S)")


# ---------------------------------------------------------------- CLI
def parser():
    from linattn.cli import Parser, positive

    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1])
    p.add_argument("grid", help="the grid file (TOML)")
    p.add_argument("--out", required=True, help="run folder (created; a rerun resumes)")
    p.add_argument("--dry-run", action="store_true", help="print the cells, programs and a time estimate; write nothing")
    p.add_argument("--max-cells", type=positive(int), default=1000, help="refuse grids with more cells")
    p.add_argument("--stop-after", type=positive(int), default=None,
                   help="stop (exit 3) after evaluating this many new cells (tests resuming)")
    return p


def main(argv=None) -> int:
    from linattn import distributed as dist
    from linattn.cli import fail

    args = parser().parse_args(argv)
    try:
        grid = read_grid(args.grid)
        if n_cells(grid) > args.max_cells:
            raise GridError(f"the grid has {n_cells(grid)} cells, over --max-cells {args.max_cells}; allowed: at most "
                            f"{args.max_cells} (raise --max-cells or shrink the grid)")
        out = Path(args.out)
        from sims.forgetting import check_out

        check_out(out)
        cells = cells_of(grid)
    except (ValueError, TypeError) as err:
        fail(PROG, str(err))
    try:
        dist.initialize_from_env()
    except ValueError as err:
        fail(PROG, str(err))
    if args.dry_run:
        if dist.is_writer():
            dry_run(grid, cells)
        return 0
    from sims.forgetting import StopRequested

    try:
        run_sweep(grid, out, grid_file=args.grid, stop_after=args.stop_after)
    except StopRequested as err:
        _log(str(err))
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
