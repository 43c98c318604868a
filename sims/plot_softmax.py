"""The softmax-vs-linear figure of sims.softmax, redrawn from DIR/results.json.

    python -m sims.plot_softmax DIR [--out OTHER]     # writes softmax_vs_linear.png / .pdf

Rows: the three test tasks; left column the one-layer linear model (Monte Carlo +- SE, markers, and
the linear theory's gradient-flow prediction, thin lines), right column the softmax transformer
(Monte Carlo +- SE); both with the baselines (grey). Method styles: sims.plot.style.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sims.plot import TASK_TITLES, style  # noqa: E402

BASELINE_STYLES = {"least squares": ":", "zero": "-.", "Bayes (sphere prior)": "-"}  # ridge: "--"


def plot(run_dir, out=None) -> Path:
    run_dir = Path(run_dir)
    res = json.loads((run_dir / "results.json").read_text())
    out = Path(out) if out else run_dir
    out.mkdir(parents=True, exist_ok=True)
    cfg, curves, tasks = res["config"], res["curves"], res["tasks"]
    names = ["pretrained", *res["methods"]]
    labels = {"pretrained": "pretrained", **res["methods"]}
    top = max(max(v[t]["mean"]) for k, v in curves.items() if not k.startswith("baseline/") for t in tasks)
    ylim = (0.07, float(np.clip(1.3 * top, 3.0, 30.0)))  # least squares peaks far above at n = d
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.3 * len(tasks)), sharex=True, sharey=True)
    for t, task in enumerate(tasks):
        for c, model in enumerate(("linear", "softmax")):
            ax = axes[t, c]
            for b, entry in [(k.split("/", 1)[1], v) for k, v in curves.items() if k.startswith("baseline/")]:
                ax.plot(entry["shots"], entry[task]["mean"], color="0.55", lw=1.2, ls=BASELINE_STYLES.get(b, "--"),
                        label=b, zorder=1)
            for name in names:
                e = curves[f"{model}/{name}"]
                st = style(name)
                mean, se = np.asarray(e[task]["mean"]), np.asarray(e[task]["se"])
                shots = np.asarray(e["shots"])
                pick = np.arange(len(shots)) if model == "softmax" else np.arange(0, len(shots), 5)
                ax.errorbar(shots[pick], mean[pick], yerr=se[pick], color=st["color"], marker=st["marker"] or "o",
                            ms=3.5, lw=1.3 if model == "softmax" else 0, elinewidth=1, capsize=1.5,
                            ls=st["ls"], label=labels[name], zorder=4 if name == "pretrained" else 3)
                if "theory_gradient_flow" in e[task]:
                    ax.plot(shots, e[task]["theory_gradient_flow"], color=st["color"], lw=1, ls=st["ls"], zorder=2)
                elif model == "linear" and name == "pretrained":
                    ax.plot(shots, e[task]["theory_sgd_end_points"], color=st["color"], lw=1, zorder=2)
            same = [labels[n] for n in names[1:] if curves[f"{model}/{n}"][task]["mean"] == curves[f"{model}/pretrained"][task]["mean"]]
            if same:  # a curve hidden under the pretrained one (e.g. softmax ZS (KQ): no gradient at n = 0)
                ax.text(0.98, 0.95, f"{', '.join(same)} = pretrained (same curve)", transform=ax.transAxes,
                        ha="right", va="top", fontsize=8)
            ax.set_yscale("log")
            ax.set_ylim(*ylim)
            ax.grid(alpha=0.3, which="both", lw=0.5)
            if t == 0:
                ax.set_title(("linear attention, 1 layer: simulation (markers) and theory (lines)" if model == "linear"
                              else f"softmax transformer: {cfg['layers']} layers, {cfg['heads']} heads, "
                                   f"width {cfg['width']}"), fontsize=10)
            if c == 0:
                ax.set_ylabel(f"test error\n{TASK_TITLES[task]}")
            if t == len(tasks) - 1:
                ax.set_xlabel("shots n in the prompt")
    handles, lab = axes[0, 1].get_legend_handles_labels()
    fig.legend(handles, lab, loc="lower center", ncol=6, fontsize=8.5, frameon=False)
    fig.suptitle(f"Fine-tuning on one task, d = {cfg['d']}, sigma^2 = {cfg['noise']}: seed mean +- SE "
                 f"({cfg['seeds']} seeds); grey: baselines on the same prompts", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    path = out / "softmax_vs_linear.png"
    fig.savefig(path, dpi=130)
    fig.savefig(out / "softmax_vs_linear.pdf")
    plt.close(fig)
    return path


def main(argv=None) -> int:
    from linattn.cli import Parser

    p = Parser(prog="python -m sims.plot_softmax", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a folder written by python -m sims.softmax")
    p.add_argument("--out", default=None, help="where to write the figure (default: RUN_DIR)")
    args = p.parse_args(argv)
    if not (Path(args.run_dir) / "results.json").is_file():
        p.error(f"{args.run_dir!r} has no results.json; allowed: a folder written by python -m sims.softmax")
    print(plot(args.run_dir, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
