"""sims.phase: the degradation phase diagram (issue 10) on a tiny grid and one sample point."""

import dataclasses

import numpy as np
import pytest

from sims import phase as PH
from theory.conditions import degradation_margin
from theory.optimal import pretrain_c

TINY = dataclasses.replace(PH.QUICK, ds=(3, 12), shots=(1, 2, 20), panels=((20, 0.1), (100, 0.1)), ft_steps=100,
                           pre_steps=150, batch=256, seeds=2, eval_samples=2000, points=((3, 20, 0.1, None),),
                           sample_shots=(1, 20))


@pytest.mark.parametrize("d,m,noise", [(5, 20, 0.1), (12, 100, 0.1), (20, 100, 1.0), (2, 20, 0.0)])
def test_least_degraded_member_is_kappa_one_over_one_plus_noise(d, m, noise):
    """The class 'degraded for every member' uses kappa = 1/(1+s2): no member of the family has a
    smaller margin at any n."""
    n = np.arange(1, 41)
    c = pretrain_c(d, m, noise)
    best = degradation_margin(n, c, d, 1.0 / (1.0 + noise), noise)
    for kappa in np.linspace(-3, 3, 121):
        assert np.all(degradation_margin(n, c, d, kappa, noise) >= best - 1e-12)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("phase")
    return PH.run(TINY, out), out


def test_grid_classes_follow_the_closed_form(tiny):
    res, _ = tiny
    n = np.asarray(TINY.shots)
    for (m, noise), g in zip(TINY.panels, res["grid"].values()):
        cls = np.asarray(g["classes"])
        assert cls.shape == (len(TINY.ds), len(n))
        for i, d in enumerate(TINY.ds):
            c = pretrain_c(d, m, noise)
            every = degradation_margin(n, c, d, 1 / (1 + noise), noise) > 0
            at_flow = degradation_margin(n, c, d, g["kappa_flow"][i], noise) > 0
            np.testing.assert_array_equal(cls[i], np.where(every, 0, np.where(at_flow, 1, 2)))
    # the reference regime degrades at every n; d = 12, m = 100 does not for every member at n = 1
    assert np.all(np.asarray(res["grid"]["m=20, s2=0.1"]["classes"])[0] == 0)
    assert np.asarray(res["grid"]["m=100, s2=0.1"]["classes"])[1, 0] != 0


def test_simulated_margin_matches_the_exact_risk_of_the_same_weights(tiny):
    """Monte Carlo margin (seed mean) vs the exact margin of the very weights, within 4 Monte Carlo SE."""
    res, out = tiny
    p = res["points"][0]
    gap = np.abs(np.asarray(p["sim_margin"]) - np.asarray(p["exact_margin_sgd"]))
    assert np.all(gap <= 4 * np.asarray(p["sim_margin_se_mc"])), (gap, p["sim_margin_se_mc"])
    assert len(p["kappa_flow"]) == TINY.seeds and (out / "phase.json").is_file()
    assert PH.plot(res, out).stat().st_size > 5000
