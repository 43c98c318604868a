"""python -m theory.predict: the test error that fine-tuning with minibatch SGD reaches (issue #13).

    python -m theory.predict --params P.json --objective zs --subset all --theta=0.6,0.8,0,0,0 \\
        --steps 5000 --lr 0.01 --batch 5000 --task fixed [--gradient-flow]

Prints one JSON line {"shots": [...], "mean": [...], "sd": [...], "se": [...], "paths": P}: the
mean over SGD's randomness of the exact test error of the end point (theory.sgd: P paths of the
gradient flow with the minibatch noise of the model's own gradient covariance at --batch), its
seed-to-seed standard deviation, and the mean's own Monte Carlo standard error (sd / sqrt(P)).
With --gradient-flow: the population gradient flow (sd = se = 0).
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from linattn.cli import Parser, non_negative, number_list, positive
from linattn.data import check_shots
from linattn.objectives import OBJECTIVES, SCHEDULES, ObjectiveConfig
from linattn.optim import OptimizerConfig, param_labels
from linattn.params import load_params
from linattn.train import Run, TaskContext, TrainConfig
from theory.sgd import end_point_curves, sgd_plan

TASKS = {"fixed": "theta0", "minus": "minus_theta0", "sphere": "random"}  # --task -> linattn.evaluate.TEST_TASKS


def parser() -> Parser:
    p = Parser(prog="python -m theory.predict", description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[2])
    p.add_argument("--params", required=True, help="pretrained linattn-params-v1 JSON (merged or separate K/Q)")
    p.add_argument("--objective", default="zs", choices=sorted(OBJECTIVES), help="registered fine-tuning objective")
    p.add_argument("--subset", default="all", help="trainable subset: all, v, kq, k, q")
    p.add_argument("--theta", required=True, help="the fine-tuning task theta0, e.g. --theta=0.6,0.8,0,0,0")
    p.add_argument("--steps", type=positive(int), default=5000, help="optimizer steps")
    p.add_argument("--lr", type=positive(float), default=0.01, help="learning rate")
    p.add_argument("--batch", type=positive(int), default=5000, help="prompts per minibatch (and risk term)")
    p.add_argument("--n-ft", type=non_negative(int), default=20, help="shots of the few-shot (auxiliary) term")
    p.add_argument("--m", type=non_negative(int), default=20, help="shots per pretraining prompt (replay terms)")
    p.add_argument("--aux-weight", type=non_negative(float), default=1.0, help="initial auxiliary weight")
    p.add_argument("--schedule", default="linear", choices=sorted(SCHEDULES), help="auxiliary weight schedule")
    p.add_argument("--l2", type=non_negative(float), default=0.1,
                   help="zs_l2 strength (the pull is toward the --params weights)")
    p.add_argument("--noise", type=non_negative(float), default=0.1, help="label-noise variance sigma^2")
    p.add_argument("--shots", default="0,1,2,5,10,20,40", help="comma-separated test shot counts")
    p.add_argument("--task", default="fixed", choices=list(TASKS),
                   help="test task: fixed (theta0 = --theta), minus (-theta0) or sphere (fresh unit-sphere tasks)")
    p.add_argument("--momentum", type=non_negative(float), default=0.9, help="SGD momentum")
    p.add_argument("--clip", type=non_negative(float), default=1.0, help="global-norm clip over trainable leaves; 0: none")
    p.add_argument("--paths", type=positive(int), default=32, help="noise paths (the mean's SE is sd / sqrt(paths))")
    p.add_argument("--probe", type=positive(int), default=256,
                   help="probe prompts per risk term and step for the noise covariance (about 1000 at batch 500)")
    p.add_argument("--seed", type=non_negative(int), default=0, help="root seed of the noise paths")
    p.add_argument("--gradient-flow", action="store_true", help="the population gradient flow (no noise)")
    p.add_argument("--dataset", type=non_negative(int), default=None,
                   help="not modelled: the prediction is for prompts drawn fresh from theta0 (an infinite "
                        "dataset); giving it is an error")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.dataset is not None:
        p.error(f"--dataset {args.dataset}: a finite fine-tuning dataset is not modelled; leave it out "
                "(the prediction is for fresh prompts)")
    if args.momentum >= 1:
        p.error(f"--momentum {args.momentum}: allowed 0 <= momentum < 1")
    try:
        shots = check_shots(number_list(args.shots, "--shots", int))
        params, norm = load_params(args.params)
        d = params["V"].shape[-1] - 2
        theta = np.asarray(number_list(args.theta, "--theta"), np.float32)
        if theta.shape != (d,):
            raise ValueError(f"--theta has {theta.size} entries; the parameters in {args.params!r} need d = {d}")
        opt = OptimizerConfig("sgd", args.momentum, args.clip or None)
        cfg = TrainConfig(steps=args.steps, batch=args.batch, d=d, noise=args.noise, normalization=norm,
                          optimizer=opt, history=min(100, args.steps), probe=args.probe)
        obj = ObjectiveConfig(m=args.m, n_ft=args.n_ft, schedule=args.schedule, aux_weight=args.aux_weight,
                              l2=args.l2, ref_params=params if args.objective == "zs_l2" else None)
        param_labels(params, args.subset)  # an unknown subset is refused before any work
        run = Run(jax.random.PRNGKey(args.seed), params, TaskContext(jnp.asarray(theta)), args.objective,
                  args.subset, args.lr, obj, cfg)
        paths = 1 if args.gradient_flow else args.paths
        end = sgd_plan([run], paths=paths, gradient_flow=args.gradient_flow)[0].params
        stats = end_point_curves(end, theta, shots, args.noise, norm, tasks=(TASKS[args.task],))
    except ValueError as err:
        p.error(str(err))
    out = {"shots": np.asarray(shots).tolist(), "mean": stats.mean[0].tolist(), "sd": stats.sd[0].tolist(),
           "se": stats.se[0].tolist(), "paths": paths}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
