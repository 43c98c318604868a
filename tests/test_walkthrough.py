"""The README's "Adding an objective" walkthrough, run exactly as written (issue #9), and the
regression tests of issue #9 items 1-4.

The walkthrough's code blocks are read from README.md, so the README cannot drift from what works:
its module block becomes the module `my_objectives` (a new objective and a study method), its
Python blocks train and predict, and its shell command runs the study (through sims.forgetting.main,
with sizes shrunk by flags appended to the README's own command).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import sys
import textwrap
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linattn import objectives as O
from linattn import train as T
from sims import forgetting as S
from sims import plot as PL

README = Path(__file__).resolve().parents[1] / "README.md"
TINY_FLAGS = ["--steps", "30", "--ft-steps", "30", "--batch", "64", "--seeds", "2", "--dataset", "2000",
              "--eval-samples", "200", "--eval-chunk", "200", "--sweep-weights", "4", "--frontier-weights", "0.1", "10",
              "--pretrain-ds", "2", "--d-steps", "30", "--d-seeds", "1"]


def walkthrough_blocks() -> list[tuple[str, str]]:
    """(language, code) of each fenced block of the README's walkthrough section, in order."""
    text = README.read_text()
    section = text[text.index("## Adding an objective"):text.index("### An objective with per-seed data")]
    return [(lang, textwrap.dedent(code)) for lang, code in re.findall(r"```(\w+)\n(.*?)\n\s*```", section, re.S)]


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    """Run the walkthrough; yields (namespace of the Python blocks, study folder). Afterwards the
    objective, method, style and module it registered are removed again."""
    blocks = walkthrough_blocks()
    python = [code for lang, code in blocks if lang == "python"]
    shell = [code for lang, code in blocks if lang == "bash"]
    assert len(python) == 3 and len(shell) == 1, blocks
    module = types.ModuleType("my_objectives")
    sys.modules["my_objectives"] = module
    try:
        exec(compile(python[0], "README:my_objectives.py", "exec"), module.__dict__)
        ns: dict = {}
        exec(compile(python[1], "README:train", "exec"), ns)
        exec(compile(python[2], "README:predict", "exec"), ns)
        argv = shlex.split(shell[0].strip())
        assert argv[:3] == ["python", "-m", "sims.forgetting"], argv
        out = tmp_path_factory.mktemp("walkthrough") / "run"
        assert S.main(argv[3:] + TINY_FLAGS + ["--out", str(out)]) == 0
        yield ns, out
    finally:
        sys.modules.pop("my_objectives", None)
        for objective, method in (("zs_minus", "zs_minus_all"), ("zs_sp", "zs_sp_all")):
            O.OBJECTIVES.pop(objective, None)
            S.METHODS[:] = [m for m in S.METHODS if m.name != method]
            S.METHOD_BY_NAME.pop(method, None)
            PL.STYLES.pop(method, None)


def test_walkthrough_objective_trains_and_is_predicted_with_the_training_settings(walkthrough, capsys):
    ns, _ = walkthrough
    assert "zs_minus" in O.OBJECTIVES and S.METHOD_BY_NAME["zs_minus_all"].objective == "zs_minus"
    cfg = ns["cfg"]
    assert len(ns["pred"].history) == cfg.steps  # the flow ran the training run's steps
    for curves in (ns["predicted"], ns["reached"]):
        assert curves.shape == (3, 41) and np.all(np.isfinite(curves))
    # the FS term on -theta0 keeps the trained model's ICL on -theta0: more shots, lower error
    assert ns["predicted"][1, 20] < ns["predicted"][1, 0] and ns["reached"][1, 20] < ns["reached"][1, 0]
    # L2-SP with its per-run reference: trained and predicted, both pulled toward the pretrained weights
    pre, sp = ns["pre"].params, ns["sp"].params
    dist = lambda p: sum(float(np.sum((np.asarray(p[k]) - np.asarray(pre[k])) ** 2)) for k in pre)  # noqa: E731
    assert len(ns["sp_pred"].history) == cfg.steps and 0 < dist(ns["sp_pred"].params) and 0 < dist(sp)


def test_walkthrough_study_draws_every_figure_with_the_new_method(walkthrough):
    _, out = walkthrough
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == {"pretrained", "sep_pretrained", "zs_all", "zsfs_v", "zs_minus_all", "zs_sp_all"}
    assert res["methods"]["zs_sp_all"]["curves"]["theta0"]["theory_optimum"] is not None
    m = res["methods"]["zs_minus_all"]
    assert m["objective"] == "zs_minus" and m["label"] == "ZS+FS on -θ0 (all)"
    assert m["curves"]["theta0"]["theory_optimum"] is not None
    assert list(res["sweeps"]) == ["zs_minus_all", "zs_sp_all"]
    for name in PL.FIGURES:
        assert (out / f"{name}.png").stat().st_size > 5000, name
    assert (out / "agreement.md").read_text().startswith("# Theory vs simulation")
    assert "| zs_minus_all | minus_theta0 |" in (out / "agreement.md").read_text()


def test_results_json_and_agreement_hold_the_sweeps_and_the_d_scan(walkthrough):
    """Issue #9 item 8: the sweeps and the d = 2 / d = 10 pretraining were only in results.npz."""
    _, out = walkthrough
    res = json.loads((out / "results.json").read_text())
    sweep = res["sweeps"]["zs_minus_all"]
    assert list(sweep["curves"]) == ["4"] and set(sweep["curves"]["4"]) == {"theta0", "minus_theta0", "random"}
    c = sweep["curves"]["4"]["minus_theta0"]
    assert len(c["sim_mean"]) == len(c["theory_optimum"]) == 41 and np.all(np.asarray(c["sim_se"]) > 0)
    assert np.asarray(sweep["frontier_theory"]["theta0"]).shape == (2, 41)  # two frontier weights
    d2 = res["pretrain_d"]["2"]["curves"]["random"]
    assert len(d2["sim_mean"]) == 41 and d2["theory_optimum"] is not None
    with np.load(out / "results.npz") as z:
        np.testing.assert_allclose(d2["sim_mean"], z["pretrain_d2/sim_mean"].mean(0))
    table = (out / "agreement.md").read_text()
    assert "| zs_minus_all at λ = 4 | theta0 |" in table and "| pretrained, d = 2 | random |" in table


def test_item1_methods_subset_without_separate_methods_draws_heatmaps(walkthrough, tmp_path):
    """Issue #9 item 1: with --methods naming only merged-model methods, the separate model has only
    its pretrained column, and fig7_heatmaps_separate crashed (IndexError). sims.plot redraws it."""
    _, out = walkthrough
    res = json.loads((out / "results.json").read_text())
    assert [n for n, m in res["methods"].items() if m["model"] == "separate"] == ["sep_pretrained"]
    assert PL.main([str(out), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "fig7_heatmaps_separate.png").stat().st_size > 5000
    assert not list(out.glob("*.tmp*"))


def test_item2_default_folder_names_the_methods():
    """Issue #9 item 2: `--quick --methods X` after `--quick` was refused as 'a different config'
    because both used one default folder."""
    quick = S.PRESETS["quick"]
    only = dataclasses.replace(quick, methods=("zs_replay_all",))
    assert only.name() != quick.name() and only.name().endswith("_only-zs_replay_all")
    assert dataclasses.replace(quick, methods=("zs_v", "zs_all")).name().endswith("_only-zs_v+zs_all")


def test_item3_solver_takes_steps_optimizer_and_noise_from_the_training_config():
    """Issue #9 item 3: the flow predicted a 5000-step run after a 300-step training."""
    from linattn.optim import OptimizerConfig
    from theory.optimal import pretrain_optimum
    from theory.solver import solve

    theta0 = np.eye(5)[0]
    pre = pretrain_optimum(5)
    tc = T.TrainConfig(steps=40, noise=0.2, optimizer=OptimizerConfig(name="adam"))
    via_cfg = solve("zs", pre, "v", O.ObjectiveConfig(), theta0, train_cfg=tc, lr=0.01)
    explicit = solve("zs", pre, "v", O.ObjectiveConfig(), theta0, 0.2, steps=40, lr=0.01, opt_cfg=tc.optimizer)
    assert len(via_cfg.history) == 40
    for k in pre:
        np.testing.assert_array_equal(np.asarray(via_cfg.params[k]), np.asarray(explicit.params[k]))
    sgd = solve("zs", pre, "v", O.ObjectiveConfig(), theta0, train_cfg=dataclasses.replace(tc, optimizer=OptimizerConfig()))
    assert not np.array_equal(np.asarray(sgd.params["V"]), np.asarray(via_cfg.params["V"]))
    with pytest.raises(ValueError, match=r"steps=5000 vs train_cfg.steps=40"):
        solve("zs", pre, "v", O.ObjectiveConfig(), theta0, train_cfg=tc, steps=5000)
    with pytest.raises(ValueError, match=r"train_cfg.d = 3 but the parameters have d = 5"):
        solve("zs", pre, "v", O.ObjectiveConfig(), theta0, train_cfg=dataclasses.replace(tc, d=3))


def test_item4_task_sources_are_a_registry_with_minus_target_and_user_sources():
    """Issue #9 item 4: objectives could read only 'target' and 'random'. 'minus_target' and a
    user-registered source are integrated as the fixed tasks they name, in training and theory."""
    from theory.optimal import pretrain_optimum
    from theory.risk import population_objective, risk

    assert {"target", "minus_target", "random"} <= set(O.TASK_SOURCES)
    theta0 = np.asarray([0.6, 0.8, 0.0, 0.0, 0.0])
    pre = pretrain_optimum(5)
    name, obj = "test_half_target", "test_fs_half"
    O.register_task_source(name, lambda th: 0.5 * th)
    O.register_objective(obj)(lambda risk_, p, progress, cfg: risk_(p, cfg.n_ft, name))
    try:
        with pytest.raises(ValueError, match="already registered"):
            O.register_task_source(name, lambda th: th)
        for source, task in (("minus_target", -theta0), (name, 0.5 * theta0)):
            fn = lambda risk_, p, progress, cfg, s=source: risk_(p, 3, s)
            got = fn(lambda p, n, s: risk(p, n, O.task_spec(s, theta0, "sphere"), 0.1), pre, 0.0, O.ObjectiveConfig())
            np.testing.assert_allclose(np.asarray(got), np.asarray(risk(pre, 3, task, 0.1)), rtol=1e-12)
        exact = population_objective(obj, pre, 0.0, O.ObjectiveConfig(n_ft=3), theta0, 0.1)
        np.testing.assert_allclose(float(exact), float(np.asarray(risk(pre, 3, 0.5 * theta0, 0.1))), rtol=1e-12)
        ctx = T.TaskContext(theta0=jnp.asarray(theta0, jnp.float32))
        res = T.train(jax.random.PRNGKey(0), {k: jnp.asarray(v, jnp.float32) for k, v in pre.items()}, 0.01, ctx, O.ObjectiveConfig(n_ft=3), objective=obj,
                      subset="v", cfg=T.TrainConfig(steps=5, batch=64, history=5))
        assert np.all(np.isfinite(res.history))
        with pytest.raises(ValueError, match=r"task source 'nowhere' unknown; registered: .*minus_target"):
            O.task_spec("nowhere", theta0, "sphere")
    finally:
        O.TASK_SOURCES.pop(name, None)
        O.OBJECTIVES.pop(obj, None)


def test_every_method_has_its_own_colour_and_marker():
    """Issue #9 item 5: style was keyed on the subset, so ZS+mix (all) looked like ZS (all)."""
    names = ["pretrained", "sep_pretrained"] + [m.name for m in S.METHODS]
    pairs = [(PL.style(n)["color"], PL.style(n)["marker"]) for n in names]
    assert len(set(pairs)) == len(pairs)
    added = [f"test_user_method_{i}" for i in range(3)]
    try:
        new = [PL.style(n) for n in added]
        assert PL.style(added[0]) is new[0]  # the same in every figure
        assert len({(s["color"], s["marker"]) for s in new} | set(pairs)) == len(pairs) + 3
        with pytest.raises(ValueError, match="already used"):
            PL.register_style("test_user_method_x", color=new[0]["color"], marker=new[0]["marker"])
    finally:
        for n in added:
            PL.STYLES.pop(n, None)


def test_log_axes_label_values_inside_short_ranges():
    """Issue #9 item 7: log axes labelled only 0.5, 1 and 2 although curves went to 0.25."""
    in_range = lambda lo, hi: [m * 10.0**e for e in range(-3, 4) for m in PL.log_subs(lo, hi) if lo <= m * 10.0**e <= hi]
    assert len(in_range(0.25, 1.3)) >= 5 and 0.3 in [round(v, 6) for v in in_range(0.25, 1.3)]
    assert len(in_range(1.2, 2.6)) >= 3
    assert PL.log_subs(0.1, 200.0) == (1.0, 2.0, 5.0)  # long ranges stay sparse


def test_unconverged_pretraining_is_reported(walkthrough):
    """Issue #9 item 7: the quick run's pretraining was visibly unconverged and nothing said so. The
    walkthrough's 30-step pretraining is far from the optimum; the full run's (figures/) is not."""
    _, out = walkthrough
    cfg = S.PRESETS["quick"]
    gaps = S.pretraining_gaps(dataclasses.replace(cfg, pretrain_ds=(2,)), S.Store(out))
    assert set(gaps) == {"pretrain_merged", "pretrain_separate", "pretrain_d2"}
    assert all(g > 0.05 for g in gaps.values()), gaps
    res = json.loads((Path(__file__).resolve().parents[1] / "figures" / "full_results.json").read_text())
    c = res["methods"]["pretrained"]["curves"]["random"]
    assert abs(c["theory"][20] / c["theory_optimum"][20] - 1) < 0.05  # the committed full run converged
