"""When does full zero-shot fine-tuning degrade in-context learning? (SPEC section 4; DERIVATIONS.md s.5)

Models compared, Sigma = I, unit tasks, label-noise variance s2, a = norm(n):
- pretrained: Gamma = g I, v = w e_y, c = g w (any c, e.g. the optimum theory.optimal.pretrain_c);
- fully ZS-fine-tuned, the branch the gradient flow reaches (theory.optimal.zs_all_member):
  KQ = k00 e_0 e_0^T (+ parts the prompt does not see), v = (0, theta0/k00, w); kappa = k00 w.

Closed forms of the n-shot risk on a unit task theta:
    R_pre(n)        = 1 + s2 - 2 c a n + c^2 a^2 n (n + 1 + d + d s2)
    R_zs(n, theta)  = |a theta0 - theta|^2 + s2 + a^2 n (|theta0 + kappa theta|^2 + kappa^2 s2)
On theta = -theta0: R_zs = (1 + a)^2 + s2 + a^2 n ((1 - kappa)^2 + kappa^2 s2) > 1 + s2 for every n:
the fine-tuned model never beats predicting 0 on -theta0. ICL is degraded at n (R_zs(n, -theta0) >
R_pre(n)) iff the margin
    Delta(n) = (1 + a)^2 - 1 + a^2 n ((1 - kappa)^2 + kappa^2 s2) + 2 c a n - c^2 a^2 n (n + 1 + d + d s2)
is positive. For "tokens" (a = 1/(n+1)), (n+1)^2 Delta = 3 + n [2 + (1-kappa)^2 + kappa^2 s2
+ c (2 - c)(n + 1) - c^2 d (1 + s2)]. For c < 2 the bracket grows with n, so if it is positive
at n = 1, i.e. 2 + (1-kappa)^2 + kappa^2 s2 + 2c(2-c) > c^2 d (1+s2), ICL is degraded at every n
(at n = 0, Delta = 3 always). This holds for the pretraining optimum at d = 5, m = 20, s2 = 0.1;
it fails at small n for large d and m (e.g. d = 12, m = 200, n = 1), where the pretrained model is
itself worse than predicting 0 at few shots.
"""

from __future__ import annotations

import numpy as np

from linattn.model import check_normalization


def _a(n, normalization):
    check_normalization(normalization)
    n = np.asarray(n, np.float64)
    if np.any(n < 0):
        raise ValueError(f"shots must be >= 0; got {n[n < 0].ravel()[0]:g}")
    return 1.0 / (n + 1.0) if normalization == "tokens" else 1.0 / np.maximum(n, 1.0)


def pretrained_risk(n, c: float, d: int, noise: float = 0.1, normalization: str = "tokens"):
    """n-shot risk of Gamma = g I, v = w e_y (c = g w) on any unit task."""
    n = np.asarray(n, np.float64)
    a = _a(n, normalization)
    return 1.0 + noise - 2.0 * c * a * n + c**2 * a**2 * n * (n + 1.0 + d + d * noise)


def zs_all_risk(n, kappa: float, sign: float = -1.0, noise: float = 0.1, normalization: str = "tokens"):
    """n-shot risk of the fully ZS-fine-tuned member (kappa = k00 * w) on theta = sign * theta0."""
    n = np.asarray(n, np.float64)
    a = _a(n, normalization)
    return (a - sign) ** 2 + noise + a**2 * n * ((1.0 + kappa * sign) ** 2 + kappa**2 * noise)


def degradation_margin(n, c: float, d: int, kappa: float, noise: float = 0.1, normalization: str = "tokens"):
    """Delta(n) = R_zs(n, -theta0) - R_pre(n); ICL is degraded at n where it is positive."""
    return zs_all_risk(n, kappa, -1.0, noise, normalization) - pretrained_risk(n, c, d, noise, normalization)


def icl_degraded(n, c: float, d: int, kappa: float, noise: float = 0.1, normalization: str = "tokens"):
    """True where the fully ZS-fine-tuned model's n-shot error on -theta0 exceeds the pretrained one's."""
    return degradation_margin(n, c, d, kappa, noise, normalization) > 0
