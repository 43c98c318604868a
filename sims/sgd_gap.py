"""Why trained weights and the gradient-flow prediction differ: a batch-size scan.

    python -m sims.sgd_gap RUN_DIR [--method zs_all] [--batches 500 2000 8000] [--no-dataset]

Fine-tunes one method from the pretrained weights saved in RUN_DIR (a sims.forgetting folder)
at several batch sizes, all else as in that run, and prints the exact risk (no Monte Carlo) of the
trained weights against that of the population-gradient-flow prediction. If the gap comes from
minibatch noise (SGD drifting along the degenerate family of minimizers), it shrinks as the batch
grows. --no-dataset draws fine-tuning prompts fresh from theta0 instead of the finite dataset.
Writes RUN_DIR/sgd_gap_METHOD.json.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from linattn import train as T
from linattn.cli import Parser, non_negative, positive
from sims import forgetting as S
from theory.risk import task_curves


def main(argv=None) -> int:
    p = Parser(prog="python -m sims.sgd_gap", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a finished python -m sims.forgetting folder")
    p.add_argument("--method", default="zs_all", help="a method of that run")
    p.add_argument("--batches", type=positive(int), nargs="+", default=[500, 2000, 8000], help="batch sizes to re-train at")
    p.add_argument("--no-dataset", action="store_true", help="draw fine-tuning prompts fresh from theta0")
    p.add_argument("--shots", type=non_negative(int), nargs="+", default=[0, 20, 40], help="shot counts compared")
    args = p.parse_args(argv)
    run = Path(args.run_dir)
    if not (run / "config.json").is_file():
        p.error(f"{str(run)!r} has no config.json (allowed: a folder written by python -m sims.forgetting)")
    if args.method not in S.METHOD_BY_NAME:
        p.error(f"--method {args.method!r} unknown; allowed: {list(S.METHOD_BY_NAME)}")
    if not (run / "pieces" / f"{args.method}.npz").is_file():
        p.error(f"--method {args.method!r}: {str(run)!r} has no finished piece for it")
    saved = json.loads((run / "config.json").read_text())["config"]
    cfg = S.StudyConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()
                           if k not in ("train", "objective")},
                        train=T.TrainConfig(**{k: v for k, v in saved["train"].items() if k != "optimizer"},
                                            optimizer=T.OptimizerConfig(**saved["train"]["optimizer"])),
                        objective=S.ObjectiveConfig(**saved["objective"]))
    method = S.METHOD_BY_NAME[args.method]
    store = S.Store(run)
    pre = S.unpack("p_", store.load(f"pretrain_{method.model}"))
    theta0 = S.theta0_of(cfg)
    data = None if args.no_dataset else S.finetune_data(cfg, theta0)
    shots = np.asarray(args.shots)
    piece = store.load(method.name)
    flow = S.unpack("flow_", piece)
    pred = task_curves(flow, theta0, shots, cfg.noise)  # (S, 3, len(shots))
    out = {"method": method.name, "shots": shots.tolist(), "tasks": list(S.TASKS), "dataset": not args.no_dataset,
           "prediction": pred.mean(0).tolist(), "batches": {}}
    print(f"{method.name}: exact risk, seed mean over {cfg.seeds} seeds; tasks {S.TASKS}, shots {shots.tolist()}")
    print(f"  gradient-flow prediction: {np.round(pred.mean(0), 4).tolist()}")
    for b in args.batches:
        t0 = time.time()
        ctx = T.TaskContext(theta0=jnp.asarray(theta0, jnp.float32), dataset=data)
        sub = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch=b))
        runs = [S.finetune_run(sub, S.Cell(method.name, method, s, 1.0), {method.model: pre}, ctx)
                for s in range(cfg.seeds)]
        res = T.train_plan(runs)
        th = task_curves(S.stack([r.params for r in res]), theta0, shots, cfg.noise)
        gap = th.mean(0) - pred.mean(0)
        se = th.std(0, ddof=1) / np.sqrt(th.shape[0])
        out["batches"][str(b)] = {"trained": th.mean(0).tolist(), "seed_se": se.tolist(), "gap": gap.tolist()}
        print(f"  batch {b:6d}: trained {np.round(th.mean(0), 4).tolist()}  gap {np.round(gap, 4).tolist()}"
              f"  (seed SE {np.round(se, 4).tolist()}; {time.time() - t0:.0f} s)")
    suffix = "_fresh" if args.no_dataset else ""
    (run / f"sgd_gap_{method.name}{suffix}.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
