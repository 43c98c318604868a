"""Degradation phase diagram: where full ZS fine-tuning degrades ICL on -theta0 (issue 10).

    python -m sims.phase --out runs/phase          # theory grid + simulated sample points, DIR/phase.png
    python -m sims.phase --out runs/phase --quick  # fewer steps and prompts (a smoke test)

Theory (theory/conditions.py, DERIVATIONS.md section 5): the n-shot margin
Delta(n) = R_zs(n, -theta0) - R_pre(n) of the pretraining optimum (c = theory.optimal.pretrain_c)
against a member kappa = KQ[0,0] w of the ZS-minimizer family. Delta depends on kappa only through
(1 - kappa)^2 + kappa^2 s2, smallest at kappa = 1 / (1 + s2), so each grid cell (d, n) of a panel
(m, s2) is one of
  - "degraded for every member": Delta > 0 even at kappa = 1 / (1 + s2);
  - "degraded at the flow's member": the closed form at the kappa that the gradient flow
    (theory.solver.flow_plan, ZS on all parameters from the balanced optimum g = w = sqrt(c))
    reaches is positive, though another member would not be degraded;
  - "not degraded at the flow's member".
Only the middle and last classes assume the gradient-flow member; the assumption is checked twice:
cells where the exact risk (theory.risk) of the flow's end point disagrees in sign with the closed
form (the flow has not reached the family) are hatched, and at the sample points SGD (Monte Carlo,
the engine) is compared with the closed form at the flow's kappa, the seed mean +- SE of the
simulated margin (paired: the same test prompts for the pretrained and the fine-tuned weights).
One sample point has an anisotropic covariance, where the closed form (Sigma = I) does not apply:
there the exact margin of the flow end point is the theory.

Randomness: one root seed; keys fold_in(root, point)[, purpose, seed]. Results: DIR/phase.json
(config, versions, grid classes, sample points with their margins) and DIR/phase.png; the grid and
each sample point are saved in DIR/pieces as soon as they are done, so a rerun resumes.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from linattn import data as D
from linattn import train as T
from linattn.evaluate import seed_stats, test_errors
from linattn.objectives import ObjectiveConfig
from linattn.params import family_member, gamma_w, init_params
from linattn.records import versions
from theory.conditions import degradation_margin
from theory.optimal import pretrain_c, pretrain_optimum
from theory.risk import risk
from theory.solver import flow_plan

CLASSES = ("degraded for every member", "degraded at the flow's member", "not degraded at the flow's member")


@dataclasses.dataclass(frozen=True)
class PhaseConfig:
    """Grid and simulation settings (defaults: the run in the README)."""

    seed: int = 0
    ds: tuple = (2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 18, 20)  # covariate dimensions of the theory grid
    shots: tuple = tuple(range(1, 41))  # evaluation shot counts n
    panels: tuple = ((20, 0.1), (20, 1.0), (100, 0.1), (100, 1.0))  # (pretraining m, label-noise variance)
    ft_steps: int = 2000  # fine-tuning steps (flow and SGD)
    pre_steps: int = 2000  # pretraining steps (SGD at the sample points)
    batch: int = 1000  # prompts per step
    seeds: int = 3  # SGD seeds per sample point
    eval_samples: int = 5000  # test prompts per seed, model and shot count
    # sample points: (d, m, noise, covariance eigenvalues or None for Sigma = I)
    points: tuple = ((5, 20, 0.1, None), (2, 20, 0.1, None), (12, 100, 0.1, None), (20, 100, 0.1, None),
                     (10, 20, 1.0, None), (5, 20, 0.1, (0.25, 0.5, 1.0, 1.5, 1.75)))
    sample_shots: tuple = (1, 2, 5, 10, 20, 40)

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


QUICK = PhaseConfig(ds=(2, 5, 10, 20), shots=(1, 5, 20, 40), ft_steps=200, pre_steps=200, batch=256, seeds=2,
                    eval_samples=1000, points=((5, 20, 0.1, None), (5, 20, 0.1, (0.5, 0.75, 1.0, 1.25, 1.5))),
                    sample_shots=(1, 5, 20))


def theta0_for(cfg: PhaseConfig, d: int) -> np.ndarray:
    """The fine-tuning task at dimension d: one unit-sphere draw from fold_in(root, d)."""
    key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), d)
    return np.asarray(D.sample_tasks(key, 1, d, "sphere")[0], np.float64)


def ft_train_config(cfg: PhaseConfig, d: int, noise: float) -> T.TrainConfig:
    return T.TrainConfig(steps=cfg.ft_steps, batch=cfg.batch, d=d, noise=noise, history=10)


# ---------------------------------------------------------------- theory grid
def grid_flows(cfg: PhaseConfig) -> dict:
    """{(d, m, noise): the gradient flow's ZS end point from the balanced pretraining optimum}, one
    flow_plan for the whole grid."""
    runs, keys = [], []
    ctxs = {d: T.TaskContext(theta0=theta0_for(cfg, d)) for d in cfg.ds}
    for d in cfg.ds:
        for m, noise in cfg.panels:
            c = pretrain_c(d, m, noise)
            runs.append(T.Run(None, pretrain_optimum(d, m, noise, g=float(np.sqrt(c))), ctxs[d], "zs", "all", 0.01,
                              ObjectiveConfig(m=m), ft_train_config(cfg, d, noise), name=f"flow d={d} m={m} s2={noise}"))
            keys.append((d, m, noise))
    return {k: r.params for k, r in zip(keys, flow_plan(runs))}


def grid_classes(cfg: PhaseConfig, flows: dict) -> dict:
    """Per panel: class index (len(ds), len(shots)) of CLASSES by the closed form, kappa of the flow per
    d, and where the exact risk of the flow's end point gives the other sign of the margin."""
    n = np.asarray(cfg.shots)
    out = {}
    for m, noise in cfg.panels:
        cls, kap, fails, zs_excess = [], [], [], []
        for d in cfg.ds:
            c = pretrain_c(d, m, noise)
            kappa = float(family_member(flows[(d, m, noise)]))
            every = degradation_margin(n, c, d, 1.0 / (1.0 + noise), noise) > 0  # the member-free bound
            at_flow = degradation_margin(n, c, d, kappa, noise)
            cls.append(np.where(every, 0, np.where(at_flow > 0, 1, 2)))
            th = theta0_for(cfg, d)
            with jax.enable_x64(True):
                exact = np.asarray(risk(flows[(d, m, noise)], n, -th, noise)
                                   - risk(pretrain_optimum(d, m, noise), n, -th, noise))
                zs = float(risk(flows[(d, m, noise)], 0, th, noise)) - noise  # 0 on the ZS-minimizer family
            fails.append(np.sign(exact) != np.sign(at_flow))
            kap.append(kappa)
            zs_excess.append(zs)
        out[f"m={m}, s2={noise}"] = {"m": m, "noise": noise, "classes": np.asarray(cls).tolist(), "kappa_flow": kap,
                                    "flow_disagrees": np.asarray(fails).tolist(), "flow_zs_excess": zs_excess}
    return out


# ---------------------------------------------------------------- simulated sample points
class Point(NamedTuple):
    d: int
    m: int
    noise: float
    eig: tuple | None  # covariance eigenvalues (Sigma = diag(eig)), None for the identity


def simulate_point(cfg: PhaseConfig, i: int, p: Point) -> dict:
    """SGD pretraining and ZS (all) fine-tuning of cfg.seeds seeds on the engine, the gradient flow
    from each seed's pretrained weights, and the margins at cfg.sample_shots on -theta0."""
    root = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1000 + i)
    d, m, noise = p.d, p.m, p.noise
    sigma = None if p.eig is None else np.diag(np.asarray(p.eig, np.float64))
    if sigma is not None and len(p.eig) != d:
        raise ValueError(f"sample point {i}: {len(p.eig)} covariance eigenvalues for d = {d}")
    chol = None if sigma is None else np.sqrt(sigma)
    theta0 = theta0_for(cfg, d)
    f32 = lambda a: None if a is None else jnp.asarray(a, jnp.float32)  # noqa: E731
    pre_ctx = T.TaskContext(theta0=jnp.zeros(d, jnp.float32), cov_factor=f32(chol))
    pre_cfg = T.TrainConfig(steps=cfg.pre_steps, batch=cfg.batch, d=d, noise=noise, history=10)
    obj = ObjectiveConfig(m=m)
    k = lambda purpose, s: jax.random.fold_in(jax.random.fold_in(root, purpose), s)  # noqa: E731
    pre = T.train_plan([T.Run(k(1, s), init_params(k(0, s), d), pre_ctx, "pretrain", "all", 0.01, obj, pre_cfg)
                        for s in range(cfg.seeds)])
    data = D.make_finetune_dataset(k(2, 0), jnp.asarray(theta0, jnp.float32), 100_000, noise, cov_factor=f32(chol))
    ft_ctx = T.TaskContext(theta0=f32(theta0), dataset=data, cov_factor=f32(chol))
    tc = ft_train_config(cfg, d, noise)
    sgd = T.train_plan([T.Run(k(3, s), r.params, ft_ctx, "zs", "all", 0.01, obj, tc) for s, r in enumerate(pre)])
    ectx = T.TaskContext(theta0=theta0, cov_factor=chol)
    flow = flow_plan([T.Run(None, r.params, ectx, "zs", "all", 0.01, obj, tc) for r in pre])
    n = np.asarray(cfg.sample_shots)
    sim, se, exact, exact_flow = [], [], [], []
    for s in range(cfg.seeds):
        stacked = {key: jnp.stack([jnp.asarray(pre[s].params[key]), jnp.asarray(sgd[s].params[key])])
                   for key in ("KQ", "V")}
        curves = test_errors(k(4, s), stacked, n, f32(theta0), noise=noise, samples=cfg.eval_samples,
                             chunk=cfg.eval_samples, cov_factor=f32(chol))["minus_theta0"]
        sim.append(curves.mean[1] - curves.mean[0])
        se.append(np.hypot(curves.se[1], curves.se[0]))  # an upper bound: the paired difference is correlated
        with jax.enable_x64(True):
            r_pre = np.asarray(risk(pre[s].params, n, -theta0, noise, sigma))
            exact.append(np.asarray(risk(sgd[s].params, n, -theta0, noise, sigma)) - r_pre)
            exact_flow.append(np.asarray(risk(flow[s].params, n, -theta0, noise, sigma)) - r_pre)
    mean, tot_se, mc, th_mean, _ = seed_stats(np.asarray(sim), np.asarray(se), np.asarray(exact))
    g, w = gamma_w({key: np.stack([r.params[key] for r in pre]) for key in ("KQ", "V")})
    k_flow = family_member({key: np.stack([r.params[key] for r in flow]) for key in ("KQ", "V")})
    k_sgd = family_member({key: np.stack([r.params[key] for r in sgd]) for key in ("KQ", "V")})
    c = pretrain_c(d, m, noise)
    return {"d": d, "m": m, "noise": noise, "eig": None if p.eig is None else list(p.eig), "shots": n.tolist(),
            "sim_margin": mean.tolist(), "sim_margin_se": tot_se.tolist(), "sim_margin_se_mc": mc.tolist(),
            "exact_margin_sgd": th_mean.tolist(), "exact_margin_flow": np.mean(exact_flow, 0).tolist(),
            "closed_form_at_flow": degradation_margin(n, c, d, float(k_flow.mean()), noise).tolist(),
            "closed_form_at_sgd": degradation_margin(n, c, d, float(k_sgd.mean()), noise).tolist(),
            "closed_form_every_member": degradation_margin(n, c, d, 1.0 / (1.0 + noise), noise).tolist(),
            "kappa_flow": k_flow.tolist(), "kappa_sgd": k_sgd.tolist(), "c_pretrained": (g * w).tolist(),
            "c_closed_form": c}


def _piece(out: Path, name: str, cfg: PhaseConfig, make) -> dict:
    """DIR/pieces/NAME.json if a run of the same config saved it, else make() (saved at once with
    its wall time): a killed run resumes where it stopped."""
    path = out / "pieces" / f"{name}.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["config"] != cfg.to_json():
            raise ValueError(f"{out} holds a phase run with another config; choose another --out or delete the folder")
        return saved["value"]
    t0 = time.time()
    value = {**make(), "seconds": time.time() - t0}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": cfg.to_json(), "value": value}))
    print(f"[phase] {name}: {value['seconds']:.0f} s", file=sys.stderr, flush=True)
    return value


def run(cfg: PhaseConfig, out: Path) -> dict:
    """The grid and the sample points, each saved as soon as it is done (resumable); writes
    DIR/phase.json (and returns it)."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    grid = _piece(out, "grid", cfg, lambda: grid_classes(cfg, grid_flows(cfg)))
    points = [_piece(out, f"point{i}", cfg, lambda i=i, p=p: simulate_point(cfg, i, Point(*p)))
              for i, p in enumerate(cfg.points)]
    seconds = {"grid": grid.pop("seconds"), "points": [p["seconds"] for p in points], "total": time.time() - t0}
    res = {"config": cfg.to_json(), "versions": versions(), "classes": list(CLASSES), "grid": grid, "points": points,
           "seconds": seconds}
    (out / "phase.json").write_text(json.dumps(res))
    return res


# ---------------------------------------------------------------- figure
def plot(res: dict, out: Path) -> Path:
    """DIR/phase.png: top row, the closed-form classes over (d, n) per panel with the sample points
    (hatched: the exact risk of the flow's end point disagrees in sign); bottom row, the margin at
    every sample point: simulation (seed mean +- SE) against the closed form and the exact flow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch, Rectangle

    cfg, grid, pts = res["config"], res["grid"], res["points"]
    ds, shots = np.asarray(cfg["ds"]), np.asarray(cfg["shots"])
    cols = max(len(grid), len(pts))
    cols = max(cols, len(grid) + 1)  # a free slot for the top row's legend
    fig, axes = plt.subplots(2, cols, figsize=(3.0 * cols, 7.6), squeeze=False, layout="constrained")
    cmap = ListedColormap(["#b2182b", "#f4a582", "#92c5de"])
    for j, (name, g) in enumerate(grid.items()):
        ax = axes[0, j]
        ax.pcolormesh(_edges(ds), _edges(shots), np.asarray(g["classes"]).T, cmap=cmap, vmin=-0.5, vmax=2.5)
        dx, dy = _edges(ds), _edges(shots)
        for a, b in zip(*np.nonzero(np.asarray(g["flow_disagrees"]))):
            ax.add_patch(Rectangle((dx[a], dy[b]), dx[a + 1] - dx[a], dy[b + 1] - dy[b], fill=False, hatch="xxx", lw=0))
        for p in pts:  # the isotropic sample points of this panel
            if p["m"] == g["m"] and p["noise"] == g["noise"] and p["eig"] is None:
                deg = np.asarray(p["sim_margin"]) - 2 * np.asarray(p["sim_margin_se"]) > 0
                for n, dg in zip(p["shots"], deg):
                    ax.plot(p["d"], n, "o", ms=5, mec="black", mfc="black" if dg else "white")
        ax.set(title=f"m = {g['m']}, $\\sigma^2$ = {g['noise']}", xlabel="d", ylabel="shots n" if j == 0 else None)
        ax.title.set_fontsize(9)
    for j in range(len(grid), cols):
        axes[0, j].axis("off")
    handles = [Patch(color=cmap(i), label=c) for i, c in enumerate(res["classes"])]
    handles += [Patch(facecolor="white", edgecolor="black", hatch="xxx", label="exact flow end point: other sign"),
                plt.Line2D([], [], ls="", marker="o", mfc="black", mec="black", label="SGD: margin > 2 SE (degraded)"),
                plt.Line2D([], [], ls="", marker="o", mfc="white", mec="black", label="SGD: margin not > 2 SE")]
    axes[0, len(grid)].legend(handles=handles, fontsize=7, loc="upper left")
    for j, p in enumerate(pts):
        ax = axes[1, j]
        n = np.asarray(p["shots"])
        ax.errorbar(n, p["sim_margin"], yerr=p["sim_margin_se"], fmt="o", color="black", ms=4, capsize=2,
                    label="SGD, Monte Carlo (seed mean ± SE)")
        ax.plot(n, p["exact_margin_flow"], color="#2166ac", label="exact risk, flow end point")
        ax.plot(n, p["closed_form_at_flow"], color="#b2182b", ls="--", label="closed form at the flow's κ"
                + (" (Σ = I)" if p["eig"] else ""))
        ax.plot(n, p["closed_form_every_member"], color="gray", ls=":", label="closed form, least-degraded member")
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xscale("log")
        cov = "Σ = I" if p["eig"] is None else "Σ = diag(" + ", ".join(f"{e:g}" for e in p["eig"]) + ")"
        ax.set(title=f"d = {p['d']}, m = {p['m']}, $\\sigma^2$ = {p['noise']}\n{cov}", xlabel="shots n",
               ylabel="margin R_zs(n, −θ0) − R_pre(n)" if j == 0 else None)
        ax.title.set_fontsize(8)
    for j in range(len(pts), cols):
        axes[1, j].axis("off")
    fig.legend(*axes[1, 0].get_legend_handles_labels(), fontsize=7.5, loc="outside lower center", ncol=4)
    fig.suptitle("Where full ZS fine-tuning degrades ICL on −θ0 (margin > 0): closed form (theory/conditions.py), "
                 "gradient flow and SGD", fontsize=10)
    path = out / "phase.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _edges(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    mid = (x[1:] + x[:-1]) / 2
    return np.concatenate([[x[0] - (mid[0] - x[0]) if len(x) > 1 else x[0] - 0.5], mid,
                           [x[-1] + (x[-1] - mid[-1]) if len(x) > 1 else x[-1] + 0.5]])


def main(argv=None) -> int:
    from linattn.cli import Parser, non_negative

    p = Parser(prog="python -m sims.phase", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=non_negative(int), default=0, help="root seed: every key is folded from it; default 0")
    p.add_argument("--out", required=True, help="run folder (phase.json, phase.png)")
    p.add_argument("--quick", action="store_true", help="a small grid and short training (smoke test); default: the "
                   f"full grid ({len(PhaseConfig().ds)} d x {len(PhaseConfig().panels)} panels, "
                   f"{len(PhaseConfig().points)} sample points)")
    p.add_argument("--plot-only", action="store_true", help="redraw DIR/phase.png from DIR/phase.json")
    args = p.parse_args(argv)
    out = Path(args.out)
    for q in (out, *out.parents):
        if q.exists() and not q.is_dir():
            p.error(f"--out {args.out!r}: {str(q)!r} is a file, not a folder")
    if args.plot_only:
        if not (out / "phase.json").is_file():
            p.error(f"{args.out!r} has no phase.json (allowed: a folder written by python -m sims.phase)")
        print(plot(json.loads((out / "phase.json").read_text()), out))
        return 0
    res = run(dataclasses.replace(QUICK if args.quick else PhaseConfig(), seed=args.seed), out)
    print(plot(res, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
