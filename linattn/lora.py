"""Low-rank (LoRA-style) updates of the merged linear model, as a reparametrisation (SPEC sections 2-3; issue 10).

Shape notation: L layers, H heads, D = d + 2 token width, r the rank.

A LoRA tree keeps the pretrained merged weights as frozen base leaves and adds, for each adapted
matrix W in {KQ, V}, two factors of rank r:

    {"KQ0", "V0": (L, H, D, D) the base;  "A_kq", "B_kq" and/or "A_v", "B_v": (L, H, D, r)}
    effective KQ = KQ0 + A_kq B_kq^T,   effective V = V0 + A_v B_v^T   (per layer and head).

`effective(params)` is the one map to the linear tree {"KQ", "V"} (linattn.params); prediction,
Monte Carlo and exact risk, the gradient flow, the SGD-aware prediction and evaluation all read a
LoRA tree through it (linattn.models registers the model with it as `Model.effective`), so JAX
differentiates through the factorisation and optax trains the factors like any subset: the
subsets "lora", "lora_kq", "lora_v" label the factors "train" and the base "freeze"
(linattn.optim, the one freezing mechanism).

Initialisation (`init_lora`), as in Hu et al. 2021 (LoRA, whose W0 + B A has its output-side factor
zero and its input-side factor random): A, the output side (rows of W: the query side of KQ, the
value's output coordinate of V), is zero; B, the input side (columns: the key side of KQ, the token
coordinates the value reads), is N(0, std^2) from an explicit key, std = 1/sqrt(D) by default so
that each column of B has expected squared norm 1 (no alpha/r scale: the learning rate sets it).
The start is therefore exactly the pretrained model, and gradient flow is well defined there: the
gradient of A is G B (G the gradient of the effective matrix), not zero; B's is G^T A = 0 until A
moves. In one layer only the label row v of V matters (SPEC section 2); its update A_v[-1] B_v^T
lies in the span of B_v's columns, so even rank r < D restricts V at first and the random B moves
the label weight w too (V-only fine-tuning leaves w where it was).

The separate (K, Q, V) model is refused: LoRA here adapts the merged KQ.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from linattn import model as linear
from linattn.params import MERGED_KEYS

BASE = ("KQ0", "V0")
TARGETS = {"kq": ("A_kq", "B_kq"), "v": ("A_v", "B_v")}  # adapted matrix -> its factors (A output side, B input)
_BASE_OF = {"kq": "KQ0", "v": "V0"}
SUBSETS = {"lora": TARGETS["kq"] + TARGETS["v"], "lora_kq": TARGETS["kq"], "lora_v": TARGETS["v"]}


def is_lora(params: Mapping) -> bool:
    """True for trees with the LoRA base leaves (the registry's test, linattn.models)."""
    return "KQ0" in params


def check_rank(rank, d: int) -> int:
    """The rank as an int; ValueError unless it is an integer in 1..d+2 (a D x D matrix has rank <= D)."""
    D = int(d) + 2
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 1 <= int(rank) <= D:
        raise ValueError(f"LoRA rank {rank!r} not allowed; allowed: an integer 1..{D} (d + 2 = {D}, the token width)")
    return int(rank)


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise ValueError(f"LoRA target {target!r} unknown; allowed: {sorted(TARGETS)} (the merged KQ or the value V)")
    return target


def targets_of(params: Mapping) -> tuple[str, ...]:
    """The adapted matrices of a LoRA tree, e.g. ("kq",)."""
    return tuple(t for t, (a, _) in TARGETS.items() if a in params)


def check_lora(params: Mapping, d: int | None = None) -> None:
    """ValueError naming what is wrong with a LoRA tree (leaf names, shapes, rank); any leading axes."""
    allowed = set(BASE) | set(SUBSETS["lora"])
    bad = sorted(set(params) - allowed)
    missing = [k for k in BASE if k not in params]
    pairs = [t for t, (a, b) in TARGETS.items() if (a in params) != (b in params)]
    if bad or missing or pairs or not targets_of(params):
        raise ValueError(f"LoRA tree has leaves {sorted(params)}; expected {list(BASE)} plus one or both factor pairs "
                         f"{[list(p) for p in TARGETS.values()]}")
    base = tuple(np.shape(params["KQ0"]))
    if len(base) < 4 or base[-1] != base[-2] or tuple(np.shape(params["V0"])) != base:
        raise ValueError(f"LoRA base leaves have shapes KQ0 {base}, V0 {tuple(np.shape(params['V0']))}; expected equal "
                         "(..., layers, heads, d+2, d+2)")
    D = base[-1]
    if d is not None and D != d + 2:
        raise ValueError(f"LoRA tree has token width {D} (d = {D - 2}) but the data has d = {d}")
    for t in targets_of(params):
        a, b = (tuple(np.shape(params[k])) for k in TARGETS[t])
        if a != b or a[:-1] != base[:-1]:
            raise ValueError(f"LoRA factors of {t!r} have shapes {a} and {b}; expected both {base[:-1] + ('r',)} "
                             f"with the base's leading shape {base[:-1]}")
        check_rank(a[-1], D - 2)


def rank_of(params: Mapping) -> int:
    """The rank r of a LoRA tree's factors (the same for every adapted matrix built by init_lora)."""
    return int(np.shape(params[TARGETS[targets_of(params)[0]][0]])[-1])


def delta(params: Mapping, target: str) -> jax.Array:
    """A B^T of one adapted matrix (..., L, H, D, D): the update, rank <= r by construction."""
    a, b = TARGETS[check_target(target)]
    return jnp.einsum("...ir,...jr->...ij", params[a], params[b])


def effective(params: Mapping) -> dict:
    """The merged linear tree {"KQ", "V"} a LoRA tree computes: base + A B^T per adapted matrix (any
    leading axes). The one definition every consumer of LoRA trees reads (module docstring)."""
    check_lora(params)
    out = {"KQ": params["KQ0"], "V": params["V0"]}
    for t in targets_of(params):
        name = "KQ" if t == "kq" else "V"
        out[name] = out[name] + delta(params, t).astype(out[name].dtype)
    return out


def init_lora(key, base: Mapping, rank, target: str = "kq", *, std: float | None = None) -> dict:
    """A LoRA tree around merged weights `base` whose start is exactly `base` (module docstring).

    Args:
      key: PRNG key of the random input-side factor B.
      base: a merged linear tree {"KQ", "V"} (L, H, D, D); the separate (K, Q, V) form is refused.
      rank: r, an integer in 1..D.
      target: "kq" (adapt KQ) or "v" (adapt V).
      std: entries of B are N(0, std^2); default 1/sqrt(D).
    Returns:
      {"KQ0", "V0", "A_<target>" zeros (L, H, D, r), "B_<target>" random (L, H, D, r)}, base's dtype.
    """
    check_target(target)
    keys = tuple(sorted(base))
    if keys != MERGED_KEYS:
        form = "the separate (K, Q, V) model" if keys == ("K", "Q", "V") else f"a tree with leaves {list(keys)}"
        raise ValueError(f"LoRA adapts the merged (KQ, V) model; got {form} (allowed: a merged tree "
                         "{'KQ', 'V'}; linattn.params.to_merged converts a separate one)")
    shape = tuple(np.shape(base["KQ"]))
    if len(shape) != 4 or shape != tuple(np.shape(base["V"])):
        raise ValueError(f"base leaves have shapes KQ {shape}, V {tuple(np.shape(base['V']))}; expected one "
                         "(layers, heads, d+2, d+2) tree")
    D = shape[-1]
    r = check_rank(rank, D - 2)
    std = 1.0 / np.sqrt(D) if std is None else float(std)
    if not (np.isfinite(std) and std > 0):
        raise ValueError(f"LoRA init std must be a finite number > 0; got {std!r}")
    dtype = jnp.asarray(base["KQ"]).dtype
    a, b = TARGETS[target]
    return {"KQ0": jnp.asarray(base["KQ"]), "V0": jnp.asarray(base["V"]),
            a: jnp.zeros(shape[:-1] + (r,), dtype), b: std * jax.random.normal(key, shape[:-1] + (r,), dtype)}


def predict(params: Mapping, Z, *, normalization: str = "tokens", n=None):
    """The query prediction of a LoRA tree: linattn.model.predict of its effective tree."""
    return linear.predict(effective(params), Z, normalization=normalization, n=n)
