"""Trainable parameter subsets and optimizers, built from optax pieces (SPEC section 3).

Freezing is data: every leaf gets the label "train" or "freeze" from its path, and
optax.partition sends frozen leaves to optax.set_to_zero. Gradient clipping lives inside the
"train" branch, so the global norm counts only trainable leaves.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Union

import jax
import optax
from jax.flatten_util import ravel_pytree

from linattn.models import LINEAR_SUBSETS, model_of
from linattn.params import is_merged

# subset name -> leaves it trains, for the linear tree; every model lists its own
# (linattn.models.Model.subsets; the softmax model's: linattn.softmax.SUBSETS)
SUBSETS = LINEAR_SUBSETS
OPTIMIZERS = ("sgd", "adam")
Subset = Union[str, Callable[[str], bool]]


def param_labels(params: Mapping, subset: Subset) -> dict:
    """{"train" | "freeze"} for every leaf.

    Args:
      subset: a name in the model's subsets (case-insensitive; SUBSETS for the linear tree,
        linattn.softmax.SUBSETS for the softmax one) or a function of the leaf name ("V", "KQ",
        "K", "Q", ...) returning True for trainable leaves.
    """
    if callable(subset):
        labels = {k: "train" if subset(k) else "freeze" for k in params}
    else:
        key = str(subset).lower()
        model = model_of(params)
        if key not in model.subsets:
            raise ValueError(f"subset {subset!r} unknown; allowed: {sorted(model.subsets)} (the {model.name} model's) "
                             "or a function of the leaf name")
        wanted = set(model.subsets[key])
        present = wanted & set(params)
        if not present and model.name != "linear":
            raise ValueError(f"subset {subset!r} trains {sorted(wanted)}, none of which this {model.name} tree has")
        if not present:
            form = "merged (KQ, V)" if is_merged(params) else "separate (K, Q, V)"
            raise ValueError(f"subset {subset!r} trains {sorted(wanted)}, none of which a {form} model has")
        labels = {k: "train" if k in wanted else "freeze" for k in params}
    if "train" not in labels.values():
        raise ValueError(f"subset {subset!r} leaves no parameter trainable")
    return labels


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Reference: SGD, momentum 0.9, lr 0.01, clip to global norm 1.0 (SPEC section 3).

    The learning rate is not here: it is passed as an array to make_optimizer so that sweeps over
    it do not recompile.
    """

    name: str = "sgd"  # "sgd" (with momentum) or "adam"
    momentum: float = 0.9  # SGD momentum; 0 for plain SGD
    clip_norm: float | None = 1.0  # global-norm clip over trainable leaves; None for none
    b1: float = 0.9  # Adam
    b2: float = 0.999  # Adam

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.name!r} unknown; allowed: {list(OPTIMIZERS)}")


def make_optimizer(params: Mapping, subset: Subset, lr, cfg: OptimizerConfig = OptimizerConfig()):
    """optax transformation that updates only the subset's leaves.

    `lr` may be a traced scalar array (vmap over learning rates without recompiling).
    """
    chain = []
    if cfg.clip_norm is not None:
        chain.append(optax.clip_by_global_norm(cfg.clip_norm))
    if cfg.name == "sgd":
        chain.append(optax.sgd(lr, momentum=cfg.momentum or None))
    else:
        chain.append(optax.adam(lr, b1=cfg.b1, b2=cfg.b2))
    return optax.partition(
        {"train": optax.chain(*chain), "freeze": optax.set_to_zero()},
        param_labels(params, subset),
    )


def apply_updates(params: Mapping, updates: Mapping, labels: Mapping) -> dict:
    """params + updates on trainable leaves; frozen leaves are returned as they are (bit for bit)."""
    return {k: (params[k] + updates[k]).astype(params[k].dtype) if labels[k] == "train" else params[k] for k in params}


def trainable_norm(grads: Mapping, labels: Mapping) -> jax.Array:
    """Global norm over trainable leaves only (what the clip sees)."""
    return optax.tree.norm({k: g for k, g in grads.items() if labels[k] == "train"})


def trainable_vector(params: Mapping, labels: Mapping):
    """(vec, unflatten): the trainable leaves as one flat vector, and the map from such a vector
    back to a full tree whose frozen leaves are those of `params` (for Newton and L-BFGS solvers)."""
    vec, unravel = ravel_pytree({k: v for k, v in params.items() if labels[k] == "train"})
    return vec, lambda x: {**params, **unravel(x)}
