"""The spread criterion's statistics (sims.sgd_gap, issue #13): the within-start sd and the SE of
the log sd ratio, checked against repeated experiments."""

import numpy as np
import pytest

from sims.sgd_gap import spread_ratio, within_sd


def test_within_sd_leaves_out_the_spread_between_starts():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 400)) + np.array([[0.0], [50.0], [-20.0]])  # 3 starts far apart, sd 1 within
    assert abs(within_sd(x.reshape(-1), 3) - 1.0) < 4 / np.sqrt(2 * 3 * 399)
    assert x.reshape(-1).std() > 20


@pytest.mark.parametrize("draw", ["normal", "laplace"])
def test_log_ratio_se_matches_repeated_experiments(draw):
    """1000 experiments of 2 starts x 100 runs per side, true sd ratio 2: the mean log ratio is log 2
    and the formula's SE (from the samples' fourth moments) is the log ratio's spread over
    experiments, within 4 SE of each."""
    rng = np.random.default_rng(1)
    sample = getattr(rng, draw)
    reps, groups, n = 1000, 2, 100
    logs, ses = [], []
    for _ in range(reps):
        r = spread_ratio(2 * sample(size=groups * n), sample(size=groups * n), groups)
        logs.append(np.log(r["ratio"]))
        ses.append(r["log_ratio_se"])
    logs, ses = np.array(logs), np.array(ses)
    sd = logs.std(ddof=1)
    assert abs(logs.mean() - np.log(2)) < 4 * sd / np.sqrt(reps)
    assert abs(ses.mean() - sd) < 4 * (sd / np.sqrt(2 * (reps - 1)) + ses.std(ddof=1) / np.sqrt(reps))
