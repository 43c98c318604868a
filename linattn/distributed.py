"""Several processes, one program: JAX's multi-controller runtime (jax.distributed).

Every process runs the same script; `jax.devices()` then lists the devices of all processes and
each process drives its own (`jax.local_devices()`). linattn.train places a plan on that global
mesh and gathers the results to every process; only process 0 writes files (`is_writer`).

How a process learns its place:
- `python -m sims.launch --processes N -- CMD...` (one machine) sets LINATTN_COORDINATOR,
  LINATTN_NUM_PROCESSES and LINATTN_PROCESS_ID; `initialize_from_env` passes them to
  jax.distributed.initialize, with gloo collectives on CPU.
- Under SLURM (srun), Open MPI or on Cloud TPU, jax.distributed.initialize() reads the cluster's
  own environment: `initialize_from_env` calls it when LINATTN_DISTRIBUTED=1 or when srun started
  more than one task (SLURM_STEP_NUM_TASKS > 1).
- Otherwise nothing happens: one process, its local devices.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

ENV = ("LINATTN_COORDINATOR", "LINATTN_NUM_PROCESSES", "LINATTN_PROCESS_ID")


def launch_env(port: int, processes: int, index: int, local_devices: int) -> dict:
    """Environment variables the launcher gives process `index` of `processes` (one machine)."""
    return {"LINATTN_COORDINATOR": f"127.0.0.1:{port}", "LINATTN_NUM_PROCESSES": str(processes),
            "LINATTN_PROCESS_ID": str(index), "JAX_NUM_CPU_DEVICES": str(local_devices)}


def settings_from_env(env=None) -> dict | None:
    """The launcher's settings as keyword arguments of jax.distributed.initialize; "cluster" for
    cluster auto-detection; None for a single process. ValueError names a malformed variable."""
    env = os.environ if env is None else env
    given = [k for k in ENV if k in env]
    if given:
        if len(given) < len(ENV):
            raise ValueError(f"{given} set without {[k for k in ENV if k not in env]}; set all of {list(ENV)}")
        try:
            n, i = int(env["LINATTN_NUM_PROCESSES"]), int(env["LINATTN_PROCESS_ID"])
        except ValueError:
            raise ValueError(f"LINATTN_NUM_PROCESSES={env['LINATTN_NUM_PROCESSES']!r}, "
                             f"LINATTN_PROCESS_ID={env['LINATTN_PROCESS_ID']!r}: allowed integers") from None
        if not (n >= 1 and 0 <= i < n):
            raise ValueError(f"LINATTN_PROCESS_ID={i} with LINATTN_NUM_PROCESSES={n}: allowed 0 <= id < processes")
        return {"coordinator_address": env["LINATTN_COORDINATOR"], "num_processes": n, "process_id": i}
    if env.get("LINATTN_DISTRIBUTED") == "1" or int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1:
        return {"cluster": True}
    return None


def initialize_from_env(env=None) -> bool:
    """jax.distributed.initialize from the launcher's variables or the cluster's; call it before
    any JAX computation. Returns whether this is a multi-process run (False: nothing done)."""
    settings = settings_from_env(env)
    if settings is None or jax.distributed.is_initialized():
        return jax.process_count() > 1 if settings is not None else False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # used only by CPU devices
    if settings.get("cluster"):
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(**settings)
    return jax.process_count() > 1


def is_writer() -> bool:
    """True in the process that writes files (process 0; the only process without jax.distributed)."""
    return jax.process_index() == 0


def multi() -> bool:
    return jax.process_count() > 1


def put(tree: Any, sharding) -> Any:
    """Host arrays (the same values in every process) laid out with `sharding`.

    One process: jax.device_put. Several: every process builds only the shards of its own devices
    (jax.make_array_from_callback), so nothing crosses processes.
    """
    if sharding.is_fully_addressable:  # from host copies: a device array would be resharded by a compiled op
        return jax.device_put(jax.tree.map(np.asarray, tree), sharding)

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(one, tree)


def to_host(tree: Any) -> Any:
    """numpy copies of (possibly sharded) arrays, the whole arrays in every process."""
    if not multi():
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def broadcast(tree: Any) -> Any:
    """Process 0's values of a tree of host arrays, in every process (the same shapes everywhere).

    float64 travels as raw bits, so nothing is rounded to float32 when x64 is off."""
    if not multi():
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    def bits(x):
        x = np.ascontiguousarray(x)
        return x.reshape(-1).view(np.uint32) if x.dtype.itemsize == 8 else x

    got = multihost_utils.broadcast_one_to_all(jax.tree.map(bits, tree))
    return jax.tree.map(lambda g, x: np.asarray(g).view(np.asarray(x).dtype).reshape(np.shape(x)), got, tree)


def gather_bits(vec: np.ndarray) -> np.ndarray:
    """(P, L): each process's 1-D float64 vector of equal length, bit for bit (as raw uint32)."""
    vec = np.ascontiguousarray(vec, np.float64)
    if not multi():
        return vec[None]
    from jax.experimental import multihost_utils

    got = np.asarray(multihost_utils.process_allgather(vec.view(np.uint32)))
    return got.reshape(jax.process_count(), -1).view(np.float64)
