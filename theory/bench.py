"""Timing of the exact risk: python -m theory.bench [--d 5] [--shots 41]

Prints the wall time of a risk curve over n = 0..shots-1 on sphere tasks, first call (with
compilation) and the median of later calls, for the eager and the jitted function.
"""

from __future__ import annotations

import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from linattn.cli import Parser, positive
from linattn.params import init_params
from theory.risk import risk, risk_from_terms, risk_terms


def _time(fn, reps=5):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def main(argv=None) -> int:
    p = Parser(prog="python -m theory.bench", description="Time the exact risk of a random one-layer model.")
    p.add_argument("--d", type=positive(int), default=5, help="covariate dimension")
    p.add_argument("--shots", type=positive(int), default=41, help="curve length: shots 0..SHOTS-1")
    p.add_argument("--heads", type=positive(int), default=1, help="attention heads")
    args = p.parse_args(argv)
    with jax.enable_x64(True):
        params = init_params(jax.random.PRNGKey(0), args.d, heads=args.heads, std=0.3, dtype=jnp.float64)
        shots = np.arange(args.shots)
        first, med = _time(lambda: risk(params, shots, "sphere", 0.1))
        print(f"eager risk, d={args.d}, {args.shots} shots: first {first:.3f} s, then {med * 1e3:.2f} ms")
        fast = jax.jit(lambda p: risk_from_terms(risk_terms(p, "sphere", 0.1), shots, 0.1))
        first, med = _time(lambda: fast(params))
        print(f"jitted risk, d={args.d}, {args.shots} shots: first {first:.3f} s, then {med * 1e3:.2f} ms")
        grad = jax.jit(jax.grad(lambda p: jnp.sum(risk_from_terms(risk_terms(p, "sphere", 0.1), shots, 0.1))))
        first, med = _time(lambda: grad(params))
        print(f"jitted gradient of the summed curve: first {first:.3f} s, then {med * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
