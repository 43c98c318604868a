"""Training objectives in one registry (SPEC section 3).

An objective is one decorated function

    @register_objective("name")
    def my_objective(risk, params, progress, cfg) -> scalar

written in terms of `risk(params, shots, task)`, the expected squared error of the query
prediction with `shots` demonstrations on a task source:
- "target": the fine-tuning task theta0 (in simulation: prompts drawn from the finite fine-tuning
  dataset when there is one);
- "minus_target": -theta0 (fresh prompts);
- "random": fresh tasks from the pretraining distribution.
`progress` runs from 0 at the first training step to 1 at the last (schedules are functions of it)
and `cfg` is an ObjectiveConfig.

The same function serves the simulator, which passes a Monte Carlo minibatch estimate as `risk`,
and the theory, which passes the exact population risk: a new objective gets a theory prediction
(theory.solver) without new math.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp

from linattn.params import curvature_dist, tree_sq_dist

# task source -> the fixed task it draws from, given theta0 (None: fresh random tasks each prompt).
# SPEC section 8. "target" prompts come from the finite fine-tuning dataset when there is one.
TASK_SOURCES: dict[str, Callable] = {
    "target": lambda theta0: theta0,
    "minus_target": lambda theta0: -theta0,
    "random": lambda theta0: None,
}
RiskFn = Callable[[Mapping, int, str], Any]


# ---------------------------------------------------------------- schedules (weights over training)
def _linear(progress, w0):
    return w0 * (1.0 - progress)


def _constant(progress, w0):
    return w0 * jnp.ones_like(progress)


def _cosine(progress, w0):
    return w0 * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))


SCHEDULES: dict[str, Callable] = {"linear": _linear, "constant": _constant, "cosine": _cosine}


def schedule_weight(name: str, progress, w0=1.0):
    """Weight of an auxiliary term at `progress` in [0, 1].

    "linear" falls from w0 at the first step to 0 at the last (the reference's lambda_t),
    "constant" stays w0, "cosine" falls from w0 to 0 along half a cosine.
    """
    if name not in SCHEDULES:
        raise ValueError(f"schedule {name!r} unknown; registered: {sorted(SCHEDULES)}")
    return SCHEDULES[name](jnp.asarray(progress), w0)


# ---------------------------------------------------------------- configuration
@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Hyperparameters the registered objectives read (SPEC section 3 defaults).

    Attributes:
      m: demonstrations per pretraining prompt.
      n_ft: demonstrations in the few-shot (auxiliary) term.
      schedule: name of the auxiliary weight schedule (see SCHEDULES).
      aux_weight: initial weight of the auxiliary term (may be a traced array for sweeps).
      l2: strength of the pull toward `ref_params` (objective "zs_l2").
      ref_params: reference parameters (the pretrained ones) for pulls; a pytree or None.
      curvature: (P, P) matrix over the flattened parameter tree (linattn.params.flatten order) for
        curvature-weighted pulls (objective "ewc": theory.antiforgetting.ewc_config builds it from
        the exact pretraining risk); None for objectives that do not read it.
    """

    m: int = 20
    n_ft: int = 20
    schedule: str = "linear"
    aux_weight: Any = 1.0
    l2: Any = 0.1
    ref_params: Optional[Mapping] = None
    curvature: Any = None

    def __post_init__(self):
        if int(self.m) < 0 or int(self.n_ft) < 0:
            raise ValueError(f"shots must be >= 0; got m={self.m}, n_ft={self.n_ft}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} unknown; registered: {sorted(SCHEDULES)}")

    def aux(self, progress):
        return schedule_weight(self.schedule, progress, self.aux_weight)


# Weights, reference parameters and curvatures are traced per run (vmap over seeds and weights);
# sizes are static.
jax.tree_util.register_dataclass(
    ObjectiveConfig, data_fields=["aux_weight", "l2", "ref_params", "curvature"], meta_fields=["m", "n_ft", "schedule"]
)


class Objective(NamedTuple):
    name: str
    fn: Callable
    doc: str


OBJECTIVES: dict[str, Objective] = {}


def register_objective(name: str) -> Callable:
    """Decorator adding `fn(risk, params, progress, cfg) -> scalar` to the registry."""

    def deco(fn):
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} is already registered")
        OBJECTIVES[name] = Objective(name, fn, (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return deco


def register_task_source(name: str, task_of_theta0: Callable) -> None:
    """Add a task source: task_of_theta0(theta0) -> a fixed (d,) task, or None for random tasks."""
    if name in TASK_SOURCES:
        raise ValueError(f"task source {name!r} is already registered")
    TASK_SOURCES[name] = task_of_theta0


def check_task_source(name: str) -> None:
    if name not in TASK_SOURCES:
        raise ValueError(f"task source {name!r} unknown; registered: {sorted(TASK_SOURCES)}")


def task_spec(source: str, theta0, random_task):
    """What prompts of a task source are drawn from: its fixed task (theta0, -theta0, ...), or
    `random_task` (a distribution name such as "sphere") for sources of fresh random tasks."""
    check_task_source(source)
    fixed = TASK_SOURCES[source](theta0)
    return random_task if fixed is None else fixed


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"objective {name!r} unknown; registered: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def evaluate_objective(name: str, risk: RiskFn, params, progress, cfg: ObjectiveConfig):
    """Value of a registered objective under a given risk function."""
    return get_objective(name).fn(risk, params, progress, cfg)


# ---------------------------------------------------------------- the registered objectives
@register_objective("pretrain")
def pretrain(risk, params, progress, cfg):
    """Pretraining: error with m demonstrations on random tasks (SPEC section 3)."""
    return risk(params, cfg.m, "random")


@register_objective("zs")
def zero_shot(risk, params, progress, cfg):
    """Zero-shot (ZS) loss on theta0: the query alone."""
    return risk(params, 0, "target")


@register_objective("fs")
def few_shot(risk, params, progress, cfg):
    """Few-shot (FS) loss on theta0 with n_ft demonstrations."""
    return risk(params, cfg.n_ft, "target")


@register_objective("zsfs")
def zero_plus_few_shot(risk, params, progress, cfg):
    """ZS + lambda_t FS on theta0, lambda_t from the schedule (reference: linear 1 -> 0)."""
    return risk(params, 0, "target") + cfg.aux(progress) * risk(params, cfg.n_ft, "target")


@register_objective("zs_replay")
def zero_shot_replay(risk, params, progress, cfg):
    """ZS on theta0 + lambda_t * n_ft-shot error on fresh random tasks (replaying ICL)."""
    return risk(params, 0, "target") + cfg.aux(progress) * risk(params, cfg.n_ft, "random")


@register_objective("zs_l2")
def zero_shot_l2(risk, params, progress, cfg):
    """ZS on theta0 + l2 * ||params - ref_params||^2 (a pull toward the pretrained weights)."""
    if cfg.ref_params is None:
        raise ValueError("objective 'zs_l2' needs ObjectiveConfig.ref_params (the pretrained weights)")
    return risk(params, 0, "target") + cfg.l2 * tree_sq_dist(params, cfg.ref_params)


@register_objective("ewc")
def zero_shot_ewc(risk, params, progress, cfg):
    """ZS on theta0 + (lambda/2) (params - ref_params)^T F (params - ref_params), lambda = aux_weight (EWC)."""
    # F = cfg.curvature, the curvature of the pretraining risk at ref_params (issue 10). lambda is held
    # constant over training: the schedule is not applied (an annealed penalty would end as plain ZS).
    if cfg.ref_params is None or cfg.curvature is None:
        raise ValueError("objective 'ewc' needs ObjectiveConfig.ref_params (the pretrained weights) and "
                         "ObjectiveConfig.curvature (theory.antiforgetting.ewc_config builds both)")
    return risk(params, 0, "target") + cfg.aux_weight * curvature_dist(params, cfg.ref_params, cfg.curvature)
