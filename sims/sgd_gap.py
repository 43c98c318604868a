"""What minibatch SGD reaches against its predictions: a batch-size scan (issue #13).

    python -m sims.sgd_gap RUN_DIR [--methods zs_all sep_zs_all] [--batches 500 2000 5000]

Fine-tunes each method from the pretrained weights saved in RUN_DIR (a sims.forgetting folder) at
several batch sizes, all else as in that run, with prompts drawn fresh from theta0 (--dataset: the
run's finite dataset), `--reps` SGD runs per pretrained seed. Beside it, the two predictions from
the same weights: the gradient flow (the run's piece) and the SGD-aware prediction (theory.sgd,
`--paths` paths per seed). Compared: the flat coordinate kappa = (Q^T K)[0,0] w
(linattn.params.family_member) and the exact test error of every end point (no Monte Carlo) on the
three test tasks; means, their SE and the spread over runs. The spread criterion compares the sd
within one pretrained start (--starts 0 --reps 32 --paths 32: many runs from one start), predicted
over simulated, with the bootstrap SE of the ratio's logarithm; --replicate R runs the point again
on an independent key stream. Results per (method, batch) in
RUN_DIR/sgd_gap/METHOD_bB[_kPROBE][_sSTARTS][_rR].json (a rerun skips finished ones), the figure
RUN_DIR/sgd_gap/flat_vs_batch.png.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from linattn import train as T
from linattn.cli import Parser, non_negative, positive
from linattn.params import family_member
from linattn.records import versions
from sims import forgetting as S
from theory.risk import task_curves
from theory.sgd import path_stats, sgd_plan


def _stats(x: np.ndarray) -> dict:
    """Mean, its SE and the sd over the leading axis (theory.sgd.path_stats), as JSON lists."""
    s = path_stats(x)
    return {"mean": s.mean.tolist(), "se": s.se.tolist(), "sd": s.sd.tolist()}


def scan_point(cfg, store, method, batch: int, reps: int, paths: int, shots, dataset: bool, probe: int = 256,
               starts=None, replicate: int = 0) -> dict:
    """SGD, its SGD-aware prediction and the gradient flow of one method at one batch size, from the
    pretrained seeds `starts` (None: all of the run's). `replicate` R > 0 draws both sides from the
    independent key stream fold_in(key, 10^7 R): the same point again, with none of the same randomness."""
    pre = S.unpack("p_", store.load(f"pretrain_{method.model}"))
    starts = list(range(cfg.seeds)) if starts is None else [int(s) for s in starts]
    theta0 = S.theta0_of(cfg)
    ctx = T.TaskContext(jnp.asarray(theta0, jnp.float32), S.finetune_data(cfg, theta0) if dataset else None)
    sub = S.dataclasses.replace(cfg, train=S.dataclasses.replace(cfg.train, batch=batch, probe=probe))
    base = [S.finetune_run(sub, S.Cell(method.name, method, s, 1.0), {method.model: pre}, ctx) for s in starts]
    key = S.key_for(cfg, "sgd_gap", batch)
    if replicate:
        key = jax.random.fold_in(key, 10**7 * replicate)
    sgd_runs = [S.dataclasses.replace(r, key=jax.random.fold_in(key, s * reps + j)) for s, r in zip(starts, base)
                for j in range(reps)]
    t0 = time.time()
    sim = S.stack([r.params for r in T.train_plan(sgd_runs)])
    t_sim = time.time() - t0
    pred_runs = [S.dataclasses.replace(r, key=jax.random.fold_in(jax.random.fold_in(key, 10**6), s))
                 for s, r in zip(starts, base)]
    t0 = time.time()
    pred = {k: np.concatenate([p.params[k] for p in sgd_plan(pred_runs, paths=paths)]) for k in sim}
    t_pred = time.time() - t0
    flow_all = S.unpack("flow_", store.load(method.name))
    flow = {k: np.asarray(v)[starts] for k, v in flow_all.items()}
    curves = lambda p: task_curves(p, theta0, shots, cfg.noise, cfg.train.normalization)
    k_sim, k_pred, c_sim, c_pred = family_member(sim), family_member(pred), curves(sim), curves(pred)
    return {"method": method.name, "batch": batch, "reps": reps, "paths": paths, "probe": probe, "starts": starts,
            "replicate": replicate, "dataset": dataset, "shots": list(map(int, shots)), "tasks": list(S.TASKS),
            "sgd": {"kappa": _stats(k_sim), "curves": _stats(c_sim), "seconds": t_sim},
            "sgd_aware": {"kappa": _stats(k_pred), "curves": _stats(c_pred), "seconds": t_pred},
            "flow": {"kappa": _stats(family_member(flow)), "curves": _stats(curves(flow))},
            "spread": {"kappa": spread_ratio(k_pred, k_sim, len(starts)),
                       "curves": spread_ratio(c_pred, c_sim, len(starts))},
            "versions": versions()}


def within_sd(x: np.ndarray, groups: int) -> np.ndarray:
    """The pooled within-group sd (ddof 1 per group) over the leading axis, which holds `groups`
    equal groups in order: the spread from one pretrained start, without the spread between starts."""
    x = np.asarray(x, np.float64)
    x = x.reshape(groups, len(x) // groups, *x.shape[1:])
    return np.sqrt(x.var(axis=1, ddof=1).mean(axis=0))


def spread_ratio(pred: np.ndarray, sim: np.ndarray, groups: int) -> dict:
    """Predicted over simulated within-start sd (the spread criterion of issue #13), with the SE of
    the ratio's logarithm from each side's sample fourth moments: Var(s^2) = (m4 - s^4 (n - 3) / (n - 1)) / n
    per start, Var(log s) = Var(pooled s^2) / (4 s^4)."""

    def log_sd_var(x):
        x = np.asarray(x, np.float64)
        x = x.reshape(groups, len(x) // groups, *x.shape[1:])
        n = x.shape[1]
        c = x - x.mean(axis=1, keepdims=True)
        v = (c**2).sum(axis=1) / (n - 1)
        m4 = (c**4).mean(axis=1)
        var_v = np.maximum(m4 - v**2 * (n - 3) / (n - 1), 0.0) / n
        pooled = v.mean(axis=0)
        return var_v.sum(axis=0) / groups**2 / (4 * pooled**2)

    sd_p, sd_s = within_sd(pred, groups), within_sd(sim, groups)
    return {"pred_sd": sd_p.tolist(), "sim_sd": sd_s.tolist(), "ratio": (sd_p / sd_s).tolist(),
            "log_ratio_se": np.sqrt(log_sd_var(pred) + log_sd_var(sim)).tolist()}


def spread_line(point: dict) -> str:
    """The within-start sd ratios (predicted / simulated, x/÷ exp(SE)) of kappa and the 20-shot errors."""
    sp = point["spread"]
    n = point["shots"].index(20) if 20 in point["shots"] else -1

    def fmt(r, se):
        return f"{r:.2f} (log SE {se:.2f})"

    parts = [f"kappa {fmt(sp['kappa']['ratio'], sp['kappa']['log_ratio_se'])}"]
    for t, task in enumerate(point["tasks"]):
        parts.append(f"{point['shots'][n]}-shot {task} {fmt(sp['curves']['ratio'][t][n], sp['curves']['log_ratio_se'][t][n])}")
    return "sd ratio (SGD-aware / SGD, within a start): " + "; ".join(parts)


def gaps(point: dict) -> dict:
    """(simulated - predicted) / SE, the SE combining both sides' SEs, for the flow and the
    SGD-aware prediction: {"flow": (T, N), "sgd_aware": (T, N)} and the kappa gaps."""
    s = point["sgd"]
    out = {}
    for name in ("flow", "sgd_aware"):
        p = point[name]
        for what in ("kappa", "curves"):
            se = np.hypot(np.asarray(s[what]["se"]), np.asarray(p[what]["se"]))
            out[f"{name}_{what}"] = ((np.asarray(s[what]["mean"]) - np.asarray(p[what]["mean"])) / se).tolist()
    return out


def draw(points: list[dict], path: Path) -> None:
    """kappa and the 20-shot (or largest) error on -theta0 against the batch size, per method:
    SGD seed mean +- SE, the gradient flow, the SGD-aware prediction with its SE band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(p["method"] for p in points))
    fig, axes = plt.subplots(2, len(methods), figsize=(4.2 * len(methods), 6.4), squeeze=False)
    for j, m in enumerate(methods):
        pts = sorted((p for p in points if p["method"] == m), key=lambda p: p["batch"])
        B = np.array([p["batch"] for p in pts])
        n = pts[0]["shots"].index(20) if 20 in pts[0]["shots"] else -1
        t = pts[0]["tasks"].index("minus_theta0")
        rows = [("kappa", lambda q: (q["kappa"]["mean"], q["kappa"]["se"]), "flat coordinate (QᵀK)[0,0]·w"),
                ("err", lambda q: (q["curves"]["mean"][t][n], q["curves"]["se"][t][n]),
                 f"{pts[0]['shots'][n]}-shot error on −θ0 (exact)")]
        for i, (_, get, label) in enumerate(rows):
            ax = axes[i, j]
            sim = np.array([get(p["sgd"]) for p in pts])
            pred = np.array([get(p["sgd_aware"]) for p in pts])
            flow = get(pts[0]["flow"])[0]
            ax.axhline(flow, color="0.4", ls="--", lw=1.2, label="gradient flow")
            ax.plot(B, pred[:, 0], color="tab:blue", marker="s", ms=4, label="SGD-aware prediction")
            ax.fill_between(B, pred[:, 0] - 2 * pred[:, 1], pred[:, 0] + 2 * pred[:, 1], color="tab:blue", alpha=0.2)
            ax.errorbar(B, sim[:, 0], yerr=2 * sim[:, 1], fmt="o", color="tab:red", capsize=3,
                        label="SGD, seed mean ± 2 SE")
            ax.set_xscale("log")
            ax.set_xticks(B, [str(b) for b in B])
            ax.minorticks_off()
            ax.set_ylabel(label)
            if i == 0:
                meth = S.METHOD_BY_NAME.get(m)
                ax.set_title(m if meth is None else f"{meth.label}, {'merged KQ' if meth.model == 'merged' else 'separate K, Q'}",
                             fontsize=10)
            if i == 1:
                ax.set_xlabel("batch size")
    axes[0, 0].legend(fontsize=8, loc="best")
    fig.suptitle("Where minibatch SGD ends: simulation against the gradient flow and the SGD-aware prediction "
                 "(band: ± 2 SE)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None) -> int:
    p = Parser(prog="python -m sims.sgd_gap", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a finished python -m sims.forgetting folder")
    p.add_argument("--methods", nargs="+", default=["zs_all"], help="methods of that run")
    p.add_argument("--batches", type=positive(int), nargs="+", default=[500, 2000, 5000], help="batch sizes")
    p.add_argument("--reps", type=positive(int), default=2, help="SGD runs per pretrained seed")
    p.add_argument("--paths", type=positive(int), default=4, help="SGD-aware prediction paths per pretrained seed")
    p.add_argument("--dataset", action="store_true", help="SGD draws theta0 prompts from the run's finite dataset")
    p.add_argument("--probe", type=positive(int), default=256,
                   help="the SGD-aware prediction's probe prompts per risk term and step (TrainConfig.probe)")
    p.add_argument("--starts", type=non_negative(int), nargs="+", default=None,
                   help="pretrained seeds to start from (default: all of the run's); the spread is within a start")
    p.add_argument("--replicate", type=non_negative(int), default=0,
                   help="0: the point's own keys; R > 0: an independent replicate on key stream R (files *_rR.json)")
    p.add_argument("--shots", type=non_negative(int), nargs="+", default=[0, 1, 2, 5, 10, 20, 40],
                   help="shot counts compared")
    args = p.parse_args(argv)
    run = Path(args.run_dir)
    if not (run / "config.json").is_file():
        p.error(f"{str(run)!r} has no config.json (allowed: a folder written by python -m sims.forgetting)")
    for m in args.methods:
        if m not in S.METHOD_BY_NAME:
            p.error(f"--methods {m!r} unknown; allowed: {list(S.METHOD_BY_NAME)}")
        if not (run / "pieces" / f"{m}.npz").is_file():
            p.error(f"--methods {m!r}: {str(run)!r} has no finished piece for it")
    cfg = S.StudyConfig.from_json(json.loads((run / "config.json").read_text())["config"])
    bad = [s for s in args.starts or () if s >= cfg.seeds]
    if bad:
        p.error(f"--starts {bad}: the run has pretrained seeds 0..{cfg.seeds - 1}")
    if min(args.reps, args.paths) < 2:
        p.error(f"--reps {args.reps}, --paths {args.paths}: the spread within a start needs 2 or more of each")
    store = S.Store(run)
    out = run / "sgd_gap"
    out.mkdir(exist_ok=True)
    points = []
    tag = ("_data" if args.dataset else "") + (f"_k{args.probe}" if args.probe != 256 else "") + (
        "_s" + "-".join(map(str, args.starts)) if args.starts else "") + (
        f"_r{args.replicate}" if args.replicate else "")
    for m in args.methods:
        for b in args.batches:
            f = out / f"{m}_b{b}{tag}.json"
            if f.is_file():
                point = json.loads(f.read_text())
            else:
                point = scan_point(cfg, store, S.METHOD_BY_NAME[m], b, args.reps, args.paths, args.shots, args.dataset,
                                   args.probe, args.starts, args.replicate)
                f.write_text(json.dumps(point, indent=1))
            points.append(point)
            g = gaps(point)
            print(f"{m} batch {b}: kappa SGD {point['sgd']['kappa']['mean']:.4f} ± {point['sgd']['kappa']['se']:.4f} "
                  f"(sd {point['sgd']['kappa']['sd']:.4f}); flow {point['flow']['kappa']['mean']:.4f} "
                  f"({g['flow_kappa']:+.1f} SE); SGD-aware {point['sgd_aware']['kappa']['mean']:.4f} ± "
                  f"{point['sgd_aware']['kappa']['se']:.4f} (sd {point['sgd_aware']['kappa']['sd']:.4f}; "
                  f"{g['sgd_aware_kappa']:+.1f} SE); curves max |gap| flow "
                  f"{np.abs(g['flow_curves']).max():.1f} SE, SGD-aware {np.abs(g['sgd_aware_curves']).max():.1f} SE",
                  flush=True)
            if "spread" in point:
                print("  " + spread_line(point), flush=True)
    draw(points, out / "flat_vs_batch.png")
    print(f"wrote {out / 'flat_vs_batch.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
