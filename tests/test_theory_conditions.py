"""Closed-form ICL-degradation condition (theory/conditions.py) against the exact risk."""

import jax
import numpy as np
import pytest

from theory.conditions import degradation_margin, icl_degraded, pretrained_risk, zs_all_risk
from theory.optimal import pretrain_c, pretrain_optimum, zs_all_member
from theory.risk import risk


@pytest.mark.parametrize("d,m,noise,k00,g,normalization", [
    (5, 20, 0.1, 2.3, 1.0, "tokens"),
    (5, 20, 0.0, 0.7, 1.5, "shots"),
    (3, 10, 0.3, -1.2, 0.8, "tokens"),
    (12, 200, 0.1, 1.0, 1.0, "tokens"),
])
def test_closed_forms_match_exact_risk(d, m, noise, k00, g, normalization):
    shots = np.array([0, 1, 2, 5, 20, 40])
    theta0 = np.zeros(d)
    theta0[0], theta0[-1] = 0.6, 0.8
    with jax.enable_x64(True):
        pre = pretrain_optimum(d, m, noise, normalization, g=g)
        zs = zs_all_member(pre, theta0, k00)
        c = pretrain_c(d, m, noise, normalization)
        kappa = k00 * c / g
        for sign in (1.0, -1.0):
            np.testing.assert_allclose(np.asarray(risk(pre, shots, sign * theta0, noise, None, normalization)),
                                       pretrained_risk(shots, c, d, noise, normalization), rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(np.asarray(risk(zs, shots, sign * theta0, noise, None, normalization)),
                                       zs_all_risk(shots, kappa, sign, noise, normalization), rtol=1e-12, atol=1e-12)
        exact_gap = np.asarray(risk(zs, shots, -theta0, noise, None, normalization) - risk(pre, shots, -theta0, noise, None, normalization))
    np.testing.assert_allclose(degradation_margin(shots, c, d, kappa, noise, normalization), exact_gap, atol=1e-11)
    np.testing.assert_array_equal(icl_degraded(shots, c, d, kappa, noise, normalization), exact_gap > 0)


def test_reference_setting_degrades_at_every_n_and_large_d_m_does_not_at_one_shot():
    n = np.arange(0, 41)
    c = pretrain_c(5, 20, 0.1)
    assert np.all(icl_degraded(n, c, 5, kappa=2.3 * c))
    # the fine-tuned model never beats predicting 0 on -theta0
    assert np.all(zs_all_risk(n, 2.3 * c, -1.0, 0.1) > 1.1)
    c12 = pretrain_c(12, 200, 0.1)
    assert not icl_degraded(1, c12, 12, kappa=c12)
    assert icl_degraded(40, c12, 12, kappa=c12)


def test_negative_shots_rejected():
    with pytest.raises(ValueError, match="-2"):
        pretrained_risk([1, -2], 0.5, 5)
