"""Figures of the forgetting study, drawn from saved results only (no training).

    python -m sims.plot DIR      # DIR holds results.json and results.npz from sims.forgetting

Every figure is written as DIR/NAME.png and DIR/NAME.pdf. Styles come from one registry (STYLES,
register_style): one hue per trainable subset (all red, KQ/K blue, Q purple, V green), dark solid
for ZS, light dashed for ZS+FS, orange for replay, brown for L2, dark teal for EWC, teal for WiSE-FT, magenta for early stopping,
light blue / light green for LoRA on KQ / V, black for the pretrained models;
markers tell merged from separate models; every method, a user's too, gets its own colour and marker.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from linattn.evaluate import seed_stats  # noqa: E402
from linattn.params import effective_kq, gamma_w  # noqa: E402

TASK_TITLES = {"theta0": r"fine-tuned task $\theta_0$", "minus_theta0": r"unseen task $-\theta_0$",
               "random": "random unseen tasks"}
HUES = {"all": ("#b2182b", "#ef8a62"), "kq": ("#2166ac", "#67a9cf"), "k": ("#2166ac", "#67a9cf"),
        "q": ("#762a83", "#c2a5cf"), "v": ("#1b7837", "#7fbf7b")}
FIGURES = ("fig1_pretrained_by_d", "fig2_zs_family", "fig3_value_family", "fig4_theory_vs_sim", "fig5_methods",
           "fig6_losses", "fig6b_loss_predictions", "fig7_heatmaps_merged", "fig7_heatmaps_separate", "fig8_frontier")


def _builtin_styles() -> dict:
    """The study's methods: hue = trainable subset (dark for ZS, light for ZS+FS), marker = model and
    objective (merged: o ZS, s ZS+FS; separate: ^ ZS, v ZS+FS), black for the pretrained models."""
    out = {"pretrained": {"color": "black", "ls": "-", "marker": "o"},
           "sep_pretrained": {"color": "#555555", "ls": "--", "marker": "^"},
           "zs_replay_all": {"color": "#e08214", "ls": "-.", "marker": "D"},
           "zs_l2_all": {"color": "#8c510a", "ls": ":", "marker": "P"},
           "ewc_all": {"color": "#01665e", "ls": ":", "marker": "X"},
           "wise_zs_all": {"color": "#35978f", "ls": "-", "marker": "h"},  # methods traced over a knob (fig8)
           "early_zs_all": {"color": "#c51b7d", "ls": "-", "marker": ">"},
           # LoRA (light blue on KQ, light green on V; diamond and solid rank 1, pentagon and dotted rank 2
           # (curves without markers stay apart), octagon the rank curve)
           "zs_lora_kq1": {"color": "#4393c3", "ls": "-", "marker": "d"},
           "zs_lora_kq2": {"color": "#4393c3", "ls": ":", "marker": "p"},
           "lora_kq_zs": {"color": "#4393c3", "ls": "-", "marker": "8"},
           "zs_lora_v1": {"color": "#5aae61", "ls": "-", "marker": "d"},
           "zs_lora_v2": {"color": "#5aae61", "ls": ":", "marker": "p"},
           "lora_v_zs": {"color": "#5aae61", "ls": "-", "marker": "8"}}
    for sep, markers in (("", ("o", "s")), ("sep_", ("^", "v"))):
        for subset, (dark, light) in HUES.items():
            out[f"{sep}zs_{subset}"] = {"color": dark, "ls": "-", "marker": markers[0]}
            out[f"{sep}zsfs_{subset}"] = {"color": light, "ls": "--", "marker": markers[1]}
    return out


STYLES: dict[str, dict] = _builtin_styles()  # method name -> {"color", "ls", "marker"}; register_style adds
EXTRA_COLORS = ("#17becf", "#e377c2", "#bcbd22", "#9467bd", "#7f7f7f", "#d62728", "#2ca02c", "#1f77b4")
EXTRA_MARKERS = ("X", "h", "<", ">", "p", "d", "H", "8")  # "*" is the sweep marker of fig8


def register_style(name: str, color: str | None = None, ls: str = "-.", marker: str | None = None) -> dict:
    """Give a method its style in every figure. Colour and marker left out: the first (colour, marker)
    pair of EXTRA_COLORS x EXTRA_MARKERS that no registered method uses."""
    if name in STYLES:
        raise ValueError(f"method {name!r} already has a style; registered: {sorted(STYLES)}")
    used = {(s["color"], s["marker"]) for s in STYLES.values()}
    if color is None or marker is None:
        free = [(c, m) for i in range(len(EXTRA_MARKERS)) for c, m in zip(EXTRA_COLORS, EXTRA_MARKERS[i:] + EXTRA_MARKERS[:i])
                if (color or c, marker or m) not in used]
        if not free:
            raise ValueError(f"no free colour and marker left for {name!r}; pass color= and marker=")
        color, marker = color or free[0][0], marker or free[0][1]
    if (color, marker) in used:
        raise ValueError(f"colour {color} with marker {marker!r} is already used; pick another for {name!r}")
    STYLES[name] = {"color": color, "ls": ls, "marker": marker}
    return STYLES[name]


def style(name: str) -> dict:
    """Colour, line style and marker of a method, the same in every figure (unknown methods are
    registered on first use with a free colour and marker)."""
    return STYLES[name] if name in STYLES else register_style(name)


def label(name: str, res: dict) -> str:
    m = res["methods"][name]
    return m["label"]


def log_subs(lo: float, hi: float) -> tuple:
    """Mantissas of the labelled ticks of a log axis from lo to hi: denser the fewer decades it
    spans, so that at least a few labels fall inside the data (0.25..1.3 gets 0.3, 0.4, 0.5, 0.7, 1)."""
    decades = np.log10(hi / lo) if lo > 0 and hi > lo else 3.0
    if decades <= 0.5:
        return (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)
    if decades <= 1.5:
        return (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0)
    if decades <= 2.5:
        return (1.0, 2.0, 3.0, 5.0)
    return (1.0, 2.0, 5.0)


def _tidy_log_axes(fig) -> None:
    """Log axes labelled in plain numbers (0.3, 0.5, 1, 2, ...) at mantissas chosen by log_subs for
    the axis' range, no minor labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for ax in fig.axes:
        for axis, scale, lim in ((ax.yaxis, ax.get_yscale(), ax.get_ylim), (ax.xaxis, ax.get_xscale(), ax.get_xlim)):
            if scale == "log":
                axis.set_major_locator(LogLocator(base=10.0, subs=log_subs(*sorted(lim())), numticks=30))
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                axis.set_minor_formatter(NullFormatter())


def save(fig, out: Path, name: str) -> None:
    """NAME.png and NAME.pdf cropped to one tight bounding box, computed once for both (each
    bbox_inches="tight" costs a full extra draw: a quarter of the figures' time)."""
    _tidy_log_axes(fig)
    dpi = 130  # the PNG's resolution, at which the box is measured
    fig.set_dpi(dpi)
    box = fig.get_tightbbox(fig.canvas.get_renderer()).padded(plt.rcParams["savefig.pad_inches"])
    fig.savefig(out / f"{name}.png", dpi=dpi, bbox_inches=box)
    fig.savefig(out / f"{name}.pdf", bbox_inches=box)
    plt.close(fig)


def load(out) -> tuple[dict, dict]:
    out = Path(out)
    res = json.loads((out / "results.json").read_text())
    with np.load(out / "results.npz") as z:
        arr = {k: z[k] for k in z.files}
    return res, arr


def _curve(res, name, task):
    c = res["methods"][name]["curves"][task]
    return {k: (np.asarray(v) if v is not None else None) for k, v in c.items()}


SGD_AWARE = "#2c7fb8"  # the SGD-aware prediction (theory.sgd) in every figure


def _band(ax, x, mean, se, lab=None):
    """The SGD-aware prediction: its path mean (dotted) and a band of ± 2 of its SE."""
    ax.plot(x, mean, color=SGD_AWARE, lw=1.2, ls=":", label=lab)
    ax.fill_between(x, mean - 2 * se, mean + 2 * se, color=SGD_AWARE, alpha=0.2, lw=0)


def _errorbar(ax, shots, mean, se, st, lab=None, every=2):
    idx = np.arange(0, len(shots), every)
    ax.errorbar(shots[idx], mean[idx], yerr=se[idx], fmt=st["marker"], ms=3.5, color=st["color"], capsize=1.5,
                lw=0.8, label=lab, mfc="white" if st["ls"] == "--" else st["color"])


# ---------------------------------------------------------------- the figures
def fig_pretrained_by_d(res, arr, out):
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    cmap = plt.get_cmap("viridis")
    ds = res["pretrain_ds"]
    shots = arr["shots"]
    m = res["config"]["objective"]["m"]
    for i, d in enumerate(ds):
        col = cmap(i / max(len(ds) - 1, 1) * 0.85)
        if d == res["config"]["train"]["d"]:
            c = _curve(res, "pretrained", "random")
            th, opt, mean, se = c["theory"], c["theory_optimum"], c["sim_mean"], c["sim_se"]
        else:
            sm, ss, t = arr[f"pretrain_d{d}/sim_mean"], arr[f"pretrain_d{d}/sim_se"], arr[f"pretrain_d{d}/theory"]
            mean, se, _, th, _ = seed_stats(sm, ss, t)
            opt = arr[f"pretrain_d{d}/theory_optimum"]
        gap = th[m] / opt[m] - 1.0  # how far pretraining is from its optimum, at the pretraining shots
        note = "; not converged" if gap > 0.05 else ""
        ax.plot(shots, th, color=col, lw=1.5, label=f"d = {d}: trained, {100 * gap:+.1f}% vs optimum at n = {m}{note}")
        ax.plot(shots, opt, color=col, lw=1, ls=":", label=None)
        _errorbar(ax, shots, mean, se, {"color": col, "marker": "o", "ls": "-"})
    ax.plot([], [], color="gray", ls=":", label="theory (closed-form optimum)")
    ax.errorbar([], [], yerr=[], fmt="o", color="gray", label="simulation (mean ± SE)")
    ax.axvline(m, color="gray", lw=0.6, ls="--")
    ax.annotate(f"n = m = {m}\n(pretraining shots)", (m, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -3),
                textcoords="offset points", fontsize=6.5, color="gray", va="top")
    steps = res["config"]["train"]["steps"]
    ax.set(xlabel="shots n", ylabel="test error (random tasks)", yscale="log",
           title=f"Pretrained model: ICL error vs shots ({steps} pretraining steps)")
    ax.title.set_fontsize(10)
    ax.legend(fontsize=6.5, loc="lower left")
    save(fig, out, "fig1_pretrained_by_d")


def fig_zs_family(res, arr, out):
    shots = arr["shots"]
    ws, curves, wf = arr["families/zs_w"], arr["families/zs_curves"], float(arr["families/zs_w_flow"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=False)
    cmap = plt.get_cmap("copper")
    for j, task in enumerate(("theta0", "minus_theta0")):
        ax = axes[j]
        t = res["tasks"].index(task)
        for i, w in enumerate(ws):
            ax.plot(shots, curves[i, t], color=cmap(i / max(len(ws) - 1, 1)), lw=1.2,
                    label=f"family member w = 1/KQ[0,0] = {w:.2f}")
        c = _curve(res, "zs_all", task)
        ax.plot(shots, c["theory_optimum"] if c.get("theory_flow") is None else c["theory_flow"], color="k", ls="--", lw=1.5,
                label=f"gradient-flow prediction (w = {wf:.2f})")
        _errorbar(ax, shots, c["sim_mean"], c["sim_se"], style("zs_all"), "simulation ZS (all)")
        ax.set(xlabel="shots n", ylabel="test error", title=f"Full ZS fine-tuning minimizers: {TASK_TITLES[task]}",
               yscale="log")
        ax.title.set_fontsize(9)
    axes[1].legend(fontsize=6.5)
    save(fig, out, "fig2_zs_family")


def fig_value_family(res, arr, out):
    shots = arr["shots"]
    om, curves = arr["families/v_omega"], arr["families/v_curves"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    cmap = plt.get_cmap("viridis")
    for j, task in enumerate(("theta0", "minus_theta0")):
        ax = axes[j]
        t = res["tasks"].index(task)
        for i, o in enumerate(om):
            ax.plot(shots, curves[i, t], color=cmap(i / max(len(om) - 1, 1) * 0.9), lw=1.2, label=f"g·w = {o:.3f}")
        ax.set(xlabel="shots n", ylabel="test error", title=f"Value-only ZS family: {TASK_TITLES[task]}", yscale="log")
        ax.title.set_fontsize(9)
    axes[0].legend(fontsize=7)
    ax = axes[2]
    n, ws = arr["families/wstar_n"], arr["families/wstar"]
    nft = res["config"]["objective"]["n_ft"]
    ax.plot(n, ws, color="#1b7837", lw=1.5, label=r"$w^*(n)$ (closed form)")
    ax.axvline(nft, color="gray", ls="--", lw=0.8)
    ax.plot([nft], [np.interp(nft, n, ws)], "o", color="#1b7837", label=f"w*(n_ft = {nft}) = {np.interp(nft, n, ws):.4f}")
    fo = np.atleast_1d(arr["families/zsfs_v_flow_omega"])
    ax.plot([nft], [fo[0]], "k*", ms=9, label=f"gradient flow, ZS+FS (V): {fo[0]:.4f}")
    key = "zsfs_v/params/KQ"
    if key in arr:
        g, w = gamma_w({k: arr[f"zsfs_v/params/{k}"] for k in ("KQ", "V")})
        om_tr = g * w
        ax.plot(np.full_like(om_tr, nft) + 0.6, om_tr, "x", color="#7fbf7b", label="trained seeds (g·w)")
    ax.set(xlabel="n", ylabel="g·w", title=r"$w^*(n)$, minimizer of the n-shot error on $\theta_0$")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    save(fig, out, "fig3_value_family")


def fig_theory_vs_sim(res, arr, out):
    names = [n for n in ("pretrained", "zs_all", "zsfs_all", "zs_v", "zsfs_v") if n in res["methods"]]
    shots = arr["shots"]
    fig, axes = plt.subplots(3, len(names), figsize=(3.25 * len(names), 8.2), sharex=True, squeeze=False)
    for j, name in enumerate(names):
        st = style(name)
        for i, task in enumerate(res["tasks"]):
            ax = axes[i, j]
            c = _curve(res, name, task)
            ax.plot(shots, c["theory"], color=st["color"], lw=1.4, label="exact risk of the trained weights")
            if c.get("theory_flow") is not None:  # the prediction is SGD-aware: its band, and the flow beside it
                ax.plot(shots, c["theory_flow"], color="gray", lw=1.2, ls="--", label="exact risk of the gradient flow's weights")
                _band(ax, shots, c["theory_optimum"], c["theory_optimum_se"])
            elif c["theory_optimum"] is not None:
                ax.plot(shots, c["theory_optimum"], color="gray", lw=1.2, ls="--",
                        label="exact risk of the predicted weights" if name != "pretrained" else "exact risk of the closed-form optimum")
            _errorbar(ax, shots, c["sim_mean"], c["sim_se"], {**st, "ls": "-"}, "simulation (mean ± SE)")
            if i == 0:
                ax.set_title(label(name, res), fontsize=10)
            if j == 0:
                ax.set_ylabel(f"error, {TASK_TITLES[task]}", fontsize=8)
            if i == 2:
                ax.set_xlabel("shots n")
            ax.set_yscale("log")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="k", lw=1.4, label="exact risk of the trained weights (method colour)"),
               Line2D([], [], color="gray", lw=1.2, ls="--", label="exact risk of the predicted weights "
                      "(gradient flow; pretrained: closed-form optimum)"),
               Line2D([], [], color=SGD_AWARE, lw=1.2, ls=":", label="SGD-aware prediction at the run's batch "
                      "(theory.sgd; band ± 2 SE)"),
               Line2D([], [], color="k", marker="o", ls="", ms=3.5, label="simulation (seed mean ± SE)")]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.03))
    fig.subplots_adjust(bottom=0.11)
    fig.suptitle("Theory vs simulation", y=1.0)
    save(fig, out, "fig4_theory_vs_sim")


def _methods_of(res, model):
    return [n for n, m in res["methods"].items() if m["model"] == model]


def fig_methods(res, arr, out):
    shots = arr["shots"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.4), sharex=True)
    for r, model in enumerate(("merged", "separate")):
        for t, task in enumerate(res["tasks"]):
            ax = axes[r, t]
            for name in _methods_of(res, model):
                st = style(name)
                per_seed = arr[f"{name}/sim_mean"][:, t]
                c = _curve(res, name, task)
                ax.plot(shots, c["sim_mean"], color=st["color"], ls=st["ls"], lw=1.3, label=label(name, res))
                if per_seed.shape[0] > 1:
                    ax.fill_between(shots, per_seed.min(0), per_seed.max(0), color=st["color"], alpha=0.15, lw=0)
            ax.set_yscale("log")
            ax.set_title(f"{'merged KQ' if model == 'merged' else 'separate K, Q'}: {TASK_TITLES[task]}", fontsize=9)
            if r == 1:
                ax.set_xlabel("shots n")
            if t == 0:
                ax.set_ylabel("test error (simulation)")
        axes[r, 2].legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle("Every method (lines: seed mean; bands: range over seeds)", y=1.0)
    save(fig, out, "fig5_methods")


def fig_losses(res, arr, out):
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    cfg = res["config"]
    for name in ("pretrained", "sep_pretrained"):
        h = arr[f"{name}/history"]
        x = (np.arange(h.shape[1]) + 0.5) * cfg["train"]["steps"] / h.shape[1]
        ls = "-" if name == "pretrained" else "--"
        axes[0].plot(x, h.mean(0), color="k", ls=ls, label="merged" if name == "pretrained" else "separate")
    axes[0].set(title=f"pretraining loss ({cfg['objective']['m']}-shot, random tasks)", xlabel="step", yscale="log",
                ylabel="training loss (seed mean)")
    axes[0].legend(fontsize=7)
    for k, model in enumerate(("merged", "separate")):
        ax = axes[k + 1]
        for name in _methods_of(res, model):
            if name.endswith("pretrained"):
                continue
            st = style(name)
            h = arr[f"{name}/history"]
            x = (np.arange(h.shape[1]) + 0.5) * cfg["ft_steps"] / h.shape[1]
            ax.plot(x, h.mean(0), color=st["color"], ls=st["ls"], lw=1.2, label=label(name, res))
            if h.shape[0] > 1:
                ax.fill_between(x, h.min(0), h.max(0), color=st["color"], alpha=0.15, lw=0)
        ax.axhline(cfg["train"]["noise"], color="gray", lw=0.6, ls=":")
        ax.set(title=f"fine-tuning objective ({'merged KQ' if model == 'merged' else 'separate K, Q'})", xlabel="step",
               yscale="log", ylabel="objective (seed mean)")
        ax.annotate("noise floor σ²", (1.0, cfg["train"]["noise"]), xycoords=("axes fraction", "data"), xytext=(-3, 2),
                    textcoords="offset points", ha="right", fontsize=6.5, color="gray")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6.5, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.18))
        else:
            ax.text(0.5, 0.5, "no fine-tuning method of this model in the run", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8, color="gray")
    for ax in axes:
        ax.title.set_fontsize(9)
    fig.subplots_adjust(wspace=0.3)
    save(fig, out, "fig6_losses")


def fig_loss_predictions(res, arr, out):
    """Each method's fine-tuning objective along training: simulation (seed mean, range over
    seeds), the gradient flow (exact objective, seed mean) and the SGD-aware prediction (path mean
    of the expected minibatch objective, ± 2 SE)."""
    names = [n for n in res["methods"] if not n.endswith("pretrained") and f"{n}/history_flow" in arr]
    cols = 4
    rows = max(1, -(-len(names) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.6 * rows), squeeze=False)
    cfg = res["config"]
    for ax, name in zip(axes.ravel(), names):
        st = style(name)
        h = arr[f"{name}/history"]
        x = (np.arange(h.shape[1]) + 0.5) * cfg["ft_steps"] / h.shape[1]
        ax.plot(x, h.mean(0), color=st["color"], lw=1.3, label="simulation (seed mean)")
        if h.shape[0] > 1:
            ax.fill_between(x, h.min(0), h.max(0), color=st["color"], alpha=0.15, lw=0)
        ax.plot(x, arr[f"{name}/history_flow"].mean(0), color="gray", ls="--", lw=1.1, label="gradient flow")
        if f"{name}/history_sgd_aware" in arr:
            a = arr[f"{name}/history_sgd_aware"]
            _band(ax, x, a.mean(0), a.std(0, ddof=1) / np.sqrt(a.shape[0]), "SGD-aware prediction (± 2 SE)")
        ax.axhline(cfg["train"]["noise"], color="gray", lw=0.6, ls=":")
        ax.set_yscale("log")
        model = "merged KQ" if res["methods"][name]["model"] == "merged" else "separate K, Q"
        ax.set_title(f"{label(name, res)}, {model}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("step", fontsize=7)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    if names:
        axes[0, 0].legend(fontsize=6.5)
    for ax in axes[:, 0]:
        ax.set_ylabel("objective", fontsize=8)
    fig.suptitle("Fine-tuning objective: simulation against the gradient flow and the SGD-aware prediction "
                 "(dotted line: noise floor σ²)", fontsize=10)
    fig.tight_layout()
    save(fig, out, "fig6b_loss_predictions")


def fig_heatmaps(res, arr, out, model):
    names = _methods_of(res, model)
    pre = "pretrained" if model == "merged" else "sep_pretrained"
    names = [pre] + [n for n in names if n != pre]

    def mats(name):
        leaves = ("KQ", "V") if f"{name}/params/KQ" in arr else ("K", "Q", "V")
        kq = np.asarray(effective_kq({k: arr[f"{name}/params/{k}"][0] for k in leaves}))[0, 0]
        return kq, arr[f"{name}/params/V"][0, 0, 0]

    all_m = [mats(n) for n in names]
    d = all_m[0][0].shape[-1] - 2
    ticks = ["1"] + [f"x{i + 1}" for i in range(d)] + ["y"]  # token order (1, x, y)
    fig, axes = plt.subplots(2, len(names), figsize=(1.7 * len(names) + 1.2, 4.3), squeeze=False)
    for j, (name, (kq, v)) in enumerate(zip(names, all_m)):
        for i, (mat, what) in enumerate(((kq, "KQ"), (v, "V"))):
            ax = axes[i, j]
            vmax = max(float(np.abs(mat).max()), 1e-12)  # each panel on its own symmetric scale
            im = ax.imshow(mat / vmax, cmap="RdBu_r", vmin=-1, vmax=1)
            ax.set_xticks(range(len(ticks)), ticks if i == 1 else [], fontsize=5.5)
            ax.set_yticks(range(len(ticks)), ticks if j == 0 else [], fontsize=5.5)
            ax.tick_params(length=0)
            ax.set_xlabel(f"max |entry| {vmax:.2g}", fontsize=6.5, labelpad=2)
            if j == 0:
                ax.set_ylabel(what + (" (= QᵀK)" if model == "separate" and what == "KQ" else ""), fontsize=8)
            if i == 0:
                ax.set_title(label(name, res), fontsize=7)
    bar = fig.colorbar(im, ax=axes, shrink=0.7)
    bar.set_label("entry / the panel's max |entry|", fontsize=7)
    fig.suptitle(f"Seed-0 weights before/after fine-tuning ({'merged KQ' if model == 'merged' else 'separate K, Q'}; "
                 "rows and columns: token entries 1, x, y; each panel scaled to its own largest entry)", fontsize=9)
    save(fig, out, f"fig7_heatmaps_{model}")


SWEEP_MARKER = "*"  # simulation of a swept method at another auxiliary weight (fig8)


def _label_sparsely(ax, labels, min_dist=0.05) -> None:
    """Annotate (x, y, text, color) points, skipping any closer than min_dist (axes fraction) to one
    already labelled, so clusters get one label instead of an unreadable pile. Call after plotting."""
    ax.autoscale_view()
    to_axes = ax.transData + ax.transAxes.inverted()
    kept = []
    for x, y, text, color in labels:
        p = np.asarray(to_axes.transform((x, y)))
        if all(np.hypot(*(p - q)) >= min_dist for q in kept):
            kept.append(p)
            ax.annotate(text, (x, y), fontsize=6.5, color=color, xytext=(3, 3), textcoords="offset points")


FRONTIER_YMAX = 5.0  # fig8's y range ends here; methods above it are counted in a note
KNOBS = {"zsfs": "w", "zs_replay": "w", "zs_l2": "λ", "ewc": "λ"}  # a swept objective's knob, as labelled
TRACED = {"wise": ("alphas", "α", "WiSE-FT (all)"), "early": ("steps", "t", "early stopping of ZS (all)"),
          "lora_kq": ("ranks", "r", "ZS with LoRA on KQ"), "lora_v": ("ranks", "r", "ZS with LoRA on V")}  # kind: field, knob


def pareto(points) -> set:
    """Indices of the lower-left envelope of (x, y) points: those no other point beats in both
    coordinates (at least as low in both and lower in one)."""
    pts = np.asarray(points, np.float64)
    return {i for i, (x, y) in enumerate(pts)
            if not np.any((pts[:, 0] <= x) & (pts[:, 1] <= y) & ((pts[:, 0] < x) | (pts[:, 1] < y)))}


def knob_series(res, arr) -> list[dict]:
    """Every method traced over its knob: {"name", "label", "knob", "values", "theory" (V, T, N),
    "sim" [(value, mean (T, N), mc SE (T, N))], "aware" [(value, SGD-aware prediction (T, N))]} for the sweeps (auxiliary weight; zs_l2's strength is
    l2 x weight), WiSE-FT (alpha), early stopping (steps) and LoRA (rank; r = 0 the pretrained model),
    from results.json / results.npz."""
    out = []
    l2 = res["config"]["objective"]["l2"]
    for name, sw in res["sweeps"].items():
        obj = res["methods"][name]["objective"]
        scale = l2 if obj == "zs_l2" else 1.0
        sm, ss, sth = (arr[f"sweep/{name}/{k}"] for k in ("sim_mean", "sim_se", "theory"))  # (W, S', T, N)
        sims = [(scale * lam, *seed_stats(sm[w], ss[w], sth[w])[0:3:2]) for w, lam in enumerate(sw["weights"])]
        out.append({"name": name, "label": f"{res['methods'][name]['label']} over {KNOBS.get(obj, 'w')}",
                    "knob": KNOBS.get(obj, "w"), "values": scale * np.asarray(sw["frontier_weights"]),
                    "theory": arr[f"sweep/{name}/frontier_theory"], "sim": sims,
                    "aware": _aware_points(res, sw["curves"], sw["weights"], scale)})
    for kind, (field, knob, lab) in TRACED.items():
        for base, tr in res.get(kind, {}).items():
            sm, ss, sth, opt = (arr[f"{kind}/{base}/{k}"] for k in ("sim_mean", "sim_se", "theory", "theory_optimum"))
            sims = [(v, *seed_stats(sm[a], ss[a], sth[a])[0:3:2]) for a, v in enumerate(tr[field])]
            out.append({"name": f"{kind}_{base}", "label": f"{lab} over {knob}" + (" (steps)" if kind == "early" else ""),
                        "knob": knob, "values": np.asarray(tr[field]),
                        "theory": opt.mean(1), "sim": sims, "aware": _aware_points(res, tr["curves"], tr[field])})
    return out


def _aware_points(res, curves: dict, values, scale: float = 1.0) -> list:
    """[(scale x value, SGD-aware prediction (T, N))] of the knob values whose curves ({f"{value:g}":
    {task: CURVE}} of results.json) are predicted SGD-aware."""
    out = []
    for v in values:
        c = curves[f"{v:g}"]
        if c[res["tasks"][0]].get("prediction") == "sgd-aware":
            out.append((scale * v, np.asarray([c[t]["theory_optimum"] for t in res["tasks"]])))
    return out


def fig_frontier(res, arr, out):
    """Every method on the forgetting frontier: single methods as points (simulation +- SE, theory
    +), methods with a knob as theory lines with simulated points (stars); methods on the lower-left
    envelope (pareto) in theory and in simulation are marked in the legend, the theory envelope drawn."""
    from matplotlib.lines import Line2D

    nft = res["config"]["objective"]["n_ft"]
    ti = res["tasks"].index("theta0")
    series = knob_series(res, arr)
    fig, axes = plt.subplots(1, 2, figsize=(13.5, 5.6))
    handles = {}
    for k, (task, ylab) in enumerate((("minus_theta0", f"{nft}-shot error on unseen task $-\\theta_0$"),
                                       ("random", f"{nft}-shot error on random unseen tasks"))):
        ax, ty = axes[k], res["tasks"].index(task)
        ax.set(xscale="log", yscale="log")
        th_pts, sim_pts, labels = [], [], []  # (x, y), owner
        for name, m in res["methods"].items():
            st = style(name)
            x, y = m["curves"]["theta0"], m["curves"][task]
            handles[name] = ax.errorbar(x["sim_mean"][0], y["sim_mean"][nft], xerr=x["sim_se"][0], yerr=y["sim_se"][nft],
                                        fmt=st["marker"], color=st["color"], ms=5, lw=0.8,
                                        mfc="white" if st["ls"] == "--" else st["color"])
            sim_pts.append(((x["sim_mean"][0], y["sim_mean"][nft]), name))
            if x["theory_optimum"] is not None:
                ax.plot(x["theory_optimum"][0], y["theory_optimum"][nft], "+", color=st["color"], ms=8)
                th_pts.append(((x["theory_optimum"][0], y["theory_optimum"][nft]), name))
        for sr in series:
            st = style(sr["name"])
            th = sr["theory"]
            handles["knob:" + sr["name"]] = ax.plot(th[:, ti, 0], th[:, ty, nft], color=st["color"], ls="-", lw=1.3, marker=".",
                                          ms=4)[0]
            th_pts += [((a, b), "knob:" + sr["name"]) for a, b in zip(th[:, ti, 0], th[:, ty, nft])]
            labels += [(a, b, f"{sr['knob']}={v:.3g}", st["color"]) for a, b, v in zip(th[:, ti, 0], th[:, ty, nft], sr["values"])]
            for v, mean, mc in sr["sim"]:
                ax.errorbar(mean[ti, 0], mean[ty, nft], xerr=mc[ti, 0], yerr=mc[ty, nft], fmt=SWEEP_MARKER,
                            color=st["color"], ms=7, mfc="white", lw=0.8)
                sim_pts.append(((mean[ti, 0], mean[ty, nft]), "knob:" + sr["name"]))
            for v, pred in sr["aware"]:  # the SGD-aware prediction at each simulated knob value
                ax.plot(pred[ti, 0], pred[ty, nft], "+", color=st["color"], ms=9, mew=1.4)
                th_pts.append(((pred[ti, 0], pred[ty, nft]), "knob:" + sr["name"]))
        th_env = sorted(th_pts[i][0] for i in pareto([p for p, _ in th_pts]))
        ax.plot(*np.asarray(th_env).T, color="gray", lw=7, alpha=0.25, zorder=0, solid_capstyle="round")
        envelope = {"theory": {th_pts[i][1] for i in pareto([p for p, _ in th_pts])},
                    "simulation": {sim_pts[i][1] for i in pareto([p for p, _ in sim_pts])}}
        far = [(n, p[1]) for p, n in sim_pts if p[1] > FRONTIER_YMAX]  # catastrophic methods (KQ, K, Q only)
        if far:
            ax.set_ylim(top=FRONTIER_YMAX)
            ax.text(0.98, 0.98, f"off the chart: {len(far)} methods with error {min(y for _, y in far):.0f}..."
                    f"{max(y for _, y in far):.0f} (KQ/K/Q only)", transform=ax.transAxes, ha="right", va="top",
                    fontsize=7, color="gray")
        _label_sparsely(ax, [lab for lab in labels if lab[1] <= FRONTIER_YMAX], min_dist=0.06)
        ax.set(xlabel=r"zero-shot error on the fine-tuned task $\theta_0$", ylabel=ylab,
               title=f"lower-left envelope: theory {len(envelope['theory'])}, simulation {len(envelope['simulation'])} methods",)
        ax.title.set_fontsize(8.5)
        if k == 0:
            env_left = envelope
        else:
            names = list(res["methods"]) + ["knob:" + sr["name"] for sr in series]
            lab = {**{n: ("sep. " if m["model"] == "separate" else "") + m["label"] for n, m in res["methods"].items()},
                   **{"knob:" + sr["name"]: sr["label"] for sr in series}}
            for n in names:
                marks = [f"{short}{side}" for side, env in (("L", env_left), ("R", envelope))
                         for short, kind in (("T", "theory"), ("S", "simulation")) if n in env[kind]]
                if marks:
                    lab[n] += "  [envelope " + " ".join(marks) + "]"
            extra = [Line2D([], [], color="gray", marker="+", ls="", ms=8,
                            label="theory prediction of a method or a simulated knob value (+; SGD-aware)"),
                     Line2D([], [], color="gray", marker=SWEEP_MARKER, mfc="white", ls="", ms=8,
                            label="simulation along a knob (seed mean ± MC SE)"),
                     Line2D([], [], color="gray", ls="-", marker=".", label="theory along a knob (gradient flow)"),
                     Line2D([], [], color="gray", lw=7, alpha=0.25, label="theory's lower-left envelope"),
                     Line2D([], [], ls="", label="[envelope T/S L/R]: on the envelope in theory / simulation,\n"
                                                  "left / right panel")]
            ax.legend(handles=extra + [handles[n] for n in names], labels=[h.get_label() for h in extra] + [lab[n] for n in names],
                      fontsize=6.3, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle("Forgetting frontier of every method: fitting the target zero-shot vs keeping in-context learning "
                 "(filled: ZS, open: ZS+FS; circles/squares: merged KQ, triangles: separate K, Q)", fontsize=9)
    save(fig, out, "fig8_frontier")


AGREEMENT_INTRO = """\
# Theory vs simulation, in standard errors

One row per method and test task, then the auxiliary-weight sweeps ("NAME at λ = W", seed 0..k), the
methods traced over a knob (WiSE-FT over α, early stopping over steps t, LoRA over its rank r; every seed) and
the pretraining at other dimensions ("pretrained, d = D", random tasks only); each number is the
worst case over the shot counts n = 0..{max_shots}.
- **max abs(sim - theory) / SE_mc**: the Monte Carlo test error (seed mean) against the exact risk
  (theory.risk) of the *same trained weights*, in Monte Carlo standard errors. Seed-to-seed variation
  cancels, so this checks the simulator and the theory against each other; |z| up to about 4 is what
  noise gives over many comparisons.
- **prediction**: what predicts the trained weights (issue #13). *sgd-aware*: the SGD-aware prediction at
  the run's batch (theory.sgd: the population gradient flow with the training optimizer from each seed's
  pretrained weights plus minibatch noise of the model's own gradient covariance, several paths per seed;
  the study's stage D, for methods, sweeps and early stopping's iterates; K: its probe prompts per risk
  term and step, --sgd-probe). *gradient flow*: that flow
  without noise (WiSE-FT, LoRA's rank curve). *closed form*: the pretraining optimum.
- **max abs(sim - prediction) / SE** and **within 4 SE**: the same Monte Carlo error against the exact
  risk of the *predicted* weights, in SEs combining the simulation's (Monte Carlo and seed spread; for a
  single seed, whose spread is not measured, the SGD-aware prediction's predicted spread over runs) and,
  for the SGD-aware prediction, its own (its paths); and the fraction of shot counts within 4 of them.
  This checks whether theory predicts what training reaches.
- **at n**: the shot count of that worst gap. **max rel. gap to prediction**: the largest
  |sim - prediction| / prediction over the shots, in percent.
- **gradient flow: max / SE**: where the prediction is SGD-aware, the same simulation against the
  gradient flow alone, in the simulation's SEs: how much of the gap minibatch noise explains.
"""


def agreement_table(res) -> str:
    """agreement.md: a paragraph explaining the columns (AGREEMENT_INTRO), then for each method and
    task the largest gaps over shots 0..max in standard errors (see the paragraph)."""
    lines = [AGREEMENT_INTRO.format(max_shots=res["config"]["max_shots"]),
             "| method | task | prediction | max abs(sim - theory) / SE_mc | max abs(sim - prediction) / SE | within 4 SE "
             "| at n | max rel. gap to prediction | gradient flow: max / SE |",
             "|---|---|---|---|---|---|---|---|---|"]
    rows = [(name, m["agreement"], m.get("sgd_probe")) for name, m in res["methods"].items()]
    rows += [(f"{name} at λ = {lam}", a, sw.get("sgd_probe")) for name, sw in res["sweeps"].items()
             for lam, a in sw.get("agreement", {}).items()]
    rows += [(f"{lab} at {knob} = {v}", a, None) for kind, (_, knob, lab) in TRACED.items()
             for tr in res.get(kind, {}).values() for v, a in tr["agreement"].items()]
    rows += [(f"pretrained, d = {d}", p["agreement"], None) for d, p in res.get("pretrain_d", {}).items()]
    for name, agree, probe in rows:
        for task, a in agree.items():
            nan = float("nan")
            pred = a.get("prediction") or "–"
            pred += f" (K = {probe})" if probe and pred == "sgd-aware" else ""
            lines.append(f"| {name} | {task} | {pred} | {a['sim_vs_theory_max_se']:.2f}"
                         f" | {a.get('sim_vs_optimum_max_se', nan):.2f} | {100 * a.get('sim_vs_optimum_within_4se', nan):.0f}%"
                         f" | {a.get('sim_vs_optimum_worst_shot', '')} | {100 * a.get('sim_vs_optimum_max_rel', nan):.1f}%"
                         + (f" | {a['sim_vs_flow_max_se']:.2f} |" if "sim_vs_flow_max_se" in a else " | – |"))
    return "\n".join(lines) + "\n"


# every figure as (drawing function, extra arguments), slowest first (drawing time of a full run)
# the slowest figures first, so that the workers finish together (--quick's results, one process:
# loss predictions 3.1 s, heatmaps 1.2 and 0.8 s, theory vs sim 1.1 s, the rest 0.2-0.9 s)
JOBS = (("fig_loss_predictions", ()), ("fig_heatmaps", ("merged",)), ("fig_theory_vs_sim", ()),
        ("fig_frontier", ()), ("fig_methods", ()), ("fig_heatmaps", ("separate",)), ("fig_losses", ()),
        ("fig_zs_family", ()), ("fig_value_family", ()), ("fig_pretrained_by_d", ()))


def _draw(out: str, dest: str, job: tuple, styles: dict) -> None:
    """Draw one figure of JOBS (here or in a spawned process; each job loads the results itself)
    with the caller's styles."""
    STYLES.update(styles)
    name, extra = job
    res, arr = load(out)
    globals()[name](res, arr, Path(dest), *extra)


def plot_all(out, dest=None, workers: int | None = None) -> list[str]:
    """Draw every figure and agreement.md from the results in `out` into `dest` (default: `out`);
    returns the PNG paths. Figures are drawn by `workers` processes (default: one per core, at
    most 4), since matplotlib draws one figure per process at a time: this one and workers - 1
    spawned ones, each taking the next figure of JOBS when it is free (a spawned process first
    imports linattn and matplotlib, about 1.3 s)."""
    import os
    import threading
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
    from multiprocessing import get_context

    out = Path(out)
    dest = out if dest is None else Path(dest)
    res, _ = load(out)
    dest.mkdir(parents=True, exist_ok=True)
    for name in res["methods"]:  # every method's style fixed here, the same in every worker
        style(name)
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    jobs, lock = iter(JOBS), threading.Lock()

    def take():
        with lock:
            return next(jobs, None)

    def feed(pool):  # one spawned process's queue: its next figure whenever it is free
        while (job := take()) is not None:
            pool.submit(_draw, str(out), str(dest), job, dict(STYLES)).result()

    # spawn: the caller may hold JAX's threads, which a fork would copy mid-state
    with contextlib.ExitStack() as stack:
        feeders = []
        if workers > 1:
            pool = stack.enter_context(ProcessPoolExecutor(workers - 1, mp_context=get_context("spawn")))
            threads = stack.enter_context(ThreadPoolExecutor(workers - 1))
            feeders = [threads.submit(feed, pool) for _ in range(workers - 1)]
        while (job := take()) is not None:
            _draw(str(out), str(dest), job, STYLES)
        for f in feeders:
            f.result()
    (dest / "agreement.md").write_text(agreement_table(res))
    return [str(dest / f"{n}.png") for n in FIGURES]


def main(argv=None) -> int:
    from linattn.cli import Parser

    p = Parser(prog="python -m sims.plot", description="Redraw every figure and agreement.md of a sims.forgetting "
               "run from its saved results (no training).")
    p.add_argument("run_dir", help="folder holding results.json and results.npz (from python -m sims.forgetting)")
    p.add_argument("--out", default=None, help="write the figures here instead (default: RUN_DIR itself)")
    args = p.parse_args(argv)
    run = Path(args.run_dir)
    missing = [f for f in ("results.json", "results.npz") if not (run / f).is_file()]
    if missing:
        p.error(f"{str(run)!r} has no {' or '.join(missing)} (allowed: a folder written by python -m sims.forgetting)")
    if args.out is not None:
        for q in (Path(args.out), *Path(args.out).parents):
            if q.exists() and not q.is_dir():
                p.error(f"--out {args.out!r}: {str(q)!r} is a file, not a folder")
    for path in plot_all(run, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
