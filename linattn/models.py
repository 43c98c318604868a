"""The model registry: which predictor a parameter tree is, and what the engine needs from it.

The engine (linattn.train, linattn.step, linattn.minibatch), evaluation (linattn.evaluate) and
freezing (linattn.optim) ask `model_of(params)` instead of assuming the linear tree: the tree's
leaf names say which model it is. Registered: "linear" (linattn.model, SPEC section 2; the default
that reports malformed trees), "lora" (linattn.lora: low-rank updates of the merged linear model, a
reparametrisation with `effective` = its map to the linear tree), "softmax" (linattn.softmax), and
the baselines "ridge" and "zero" (linattn.baselines). `register_model` adds one.

A model with `effective` (a map to the linear tree {"KQ", "V"}, any leading axes) is the linear
model in other coordinates: the risk sources (linattn.minibatch, theory.risk, theory.sgd) and
evaluation read it through `effective_tree`, so it trains with every source, "exact" and
"diffusion" included, and JAX differentiates through the map.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from linattn import baselines, lora, model as linear, softmax
from linattn.params import check_params as check_linear


class Model(NamedTuple):
    name: str
    owns: Callable[[Mapping], bool]  # is this tree one of mine?
    check: Callable[[Mapping, Optional[int]], None]  # raise ValueError on a bad tree (optional d)
    d: Callable[[Mapping], int]  # covariate dimension of a (single) tree
    one_layer: Callable[[Mapping], bool]  # True: the engine may read prompts through statistics
    predict: Callable  # predict(params, Z, *, normalization, n) -> (...,) query predictions
    subsets: Mapping[str, tuple]  # trainable subset name -> leaf names (linattn.optim)
    ref_leaf: str  # a leaf whose number of axes tells a single tree from a stack of trees
    ref_ndim: int  # its number of axes in a single tree
    effective: Optional[Callable[[Mapping], Mapping]] = None  # the linear tree it computes (reparametrisations)


LINEAR_SUBSETS: dict[str, tuple[str, ...]] = {
    "all": ("K", "Q", "KQ", "V"),
    "v": ("V",),
    "kq": ("KQ",),
    "k": ("K",),
    "q": ("Q",),
}


def _baseline_check(*names):
    def check(params, d=None):
        if set(params) != set(names):
            raise ValueError(f"baseline tree has leaves {sorted(params)}; expected {sorted(names)}")
    return check


MODELS: dict[str, Model] = {}


def register_model(m: Model) -> Model:
    if m.name in MODELS:
        raise ValueError(f"model {m.name!r} is already registered")
    MODELS[m.name] = m
    return m


register_model(Model("softmax", lambda p: "embed" in p, softmax.check_params, lambda p: softmax.dims(p)["d"],
                     lambda p: False, softmax.predict, softmax.SUBSETS, "embed", 2))
register_model(Model("lora", lora.is_lora, lora.check_lora, lambda p: int(np.shape(p["KQ0"])[-1]) - 2,
                     lambda p: np.shape(p["KQ0"])[-4] == 1, lora.predict, lora.SUBSETS, "KQ0", 4, lora.effective))
register_model(Model("ridge", lambda p: "ridge" in p, _baseline_check("ridge"), lambda p: None, lambda p: False,
                     baselines.predict_ridge, {}, "ridge", 0))
register_model(Model("bayes_sphere", lambda p: "sphere_draws" in p, _baseline_check("sphere_noise", "sphere_draws"),
                     lambda p: None, lambda p: False, baselines.predict_bayes_sphere, {}, "sphere_noise", 0))
register_model(Model("zero", lambda p: "zero" in p, _baseline_check("zero"), lambda p: None, lambda p: False,
                     baselines.predict_zero, {}, "zero", 0))
LINEAR = Model("linear", lambda p: True, check_linear, lambda p: int(np.shape(p["V"])[-1]) - 2,
               lambda p: np.shape(p["V"])[-4] == 1, linear.predict, LINEAR_SUBSETS, "V", 4)


def model_of(params: Mapping) -> Model:
    """The registered model whose tree this is; the linear model otherwise (its check reports bad trees)."""
    for m in MODELS.values():
        if m.owns(params):
            return m
    return LINEAR


def effective_tree(params: Mapping) -> Mapping:
    """The linear tree a reparametrised tree computes (its model's `effective`, any leading axes);
    every other tree as it is."""
    m = model_of(params)
    return params if m.effective is None else m.effective(params)


def is_stacked(params: Mapping) -> bool:
    """True for trees stacked on a leading model axis (one more axis than a single tree)."""
    m = model_of(params)
    return np.ndim(params[m.ref_leaf]) == m.ref_ndim + 1


def dtype_of(params: Mapping):
    """The floating dtype a tree computes in (its reference leaf's)."""
    x = params[model_of(params).ref_leaf]
    return jax.dtypes.canonicalize_dtype(x.dtype if hasattr(x, "dtype") else np.result_type(x))
