"""linattn.distributed and sims.launch (issue #11): the engine under jax.distributed, for real:
two CPU processes on 127.0.0.1 with gloo collectives give the results of one process with two
devices, bit for bit, in both layouts ("runs": slots sharded over the processes; "batch": every
step's minibatch split, gradients averaged across the processes)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linattn import distributed as dist
from linattn import params as P
from linattn import train as T

ROOT = Path(__file__).resolve().parents[1]


def plan() -> list:
    """3 slots (keys) x 2 fused methods at d = 3: on 2 devices "runs" pads the slots to 4."""
    cfg = T.TrainConfig(steps=20, batch=64, d=3, history=4)
    ctx = T.TaskContext(theta0=jnp.asarray([0.6, 0.8, 0.0]))
    runs = []
    for s in range(3):
        p0 = P.init_params(jax.random.PRNGKey(10 + s), 3)
        key = jax.random.PRNGKey(s)
        runs.append(T.Run(key, p0, ctx, "pretrain", cfg=cfg, name=f"pretrain[{s}]"))
        runs.append(T.Run(key, p0, ctx, "zs", "v", lr=0.05, cfg=cfg, name=f"zs_v[{s}]"))
    return runs


CHILD = """
import sys
sys.path.insert(0, {tests!r})
from linattn import distributed as dist
assert dist.initialize_from_env()
import jax
import numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
from linattn import train as T
from test_distributed import plan, flat
assert jax.process_count() == 2 and jax.device_count() == 2 and jax.local_device_count() == 1
out = {{}}
for layout in ("runs", "batch"):
    out.update({{f"{{layout}}/{{k}}": v for k, v in flat(T.train_plan(plan(), layout=layout)).items()}})
if dist.is_writer():
    np.savez({path!r}, **out)
print("process", jax.process_index(), "done")
"""


def flat(results) -> dict:
    out = {}
    for i, r in enumerate(results):
        out.update({f"{i}/{k}": np.asarray(v) for k, v in r.params.items()})
        out.update({f"{i}/history": r.history, f"{i}/final_loss": r.final_loss, f"{i}/diverged_at": r.diverged_at})
    return out


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINATTN_")}
    return {**env, "PYTHONPATH": str(ROOT)}


def launch(n: int, command: list[str], timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sims.launch", "--processes", str(n), "--local-devices", "1", "--",
                           *command], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def test_engine_on_two_processes_equals_two_local_devices(tmp_path):
    path = tmp_path / "two.npz"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(ROOT / "tests"), path=str(path)))
    r = launch(2, [sys.executable, str(script)])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "[0] process 0 done" in r.stdout and "[1] process 1 done" in r.stdout
    assert jax.local_device_count() == 2  # tests/conftest.py
    with np.load(path) as z:
        got = {k: z[k] for k in z.files}
    for layout in ("runs", "batch"):
        want = flat(T.train_plan(plan(), layout=layout))
        assert T.choose_layout(3, 64, 2, "mc", layout) == layout
        for k, v in want.items():
            np.testing.assert_array_equal(got[f"{layout}/{k}"], v, err_msg=f"{layout}/{k}")
    # the runs trained (else equality would prove little): losses fell, methods differ
    assert np.all(got["runs/0/history"][-1] < got["runs/0/history"][0])
    assert not np.array_equal(got["runs/0/V"], got["runs/1/V"])


def test_launcher_gives_each_process_its_place():
    code = ("import os; e = os.environ; print(e['LINATTN_PROCESS_ID'], e['LINATTN_NUM_PROCESSES'], "
            "e['LINATTN_COORDINATOR'], e['JAX_NUM_CPU_DEVICES'])")
    r = launch(3, [sys.executable, "-c", code])
    assert r.returncode == 0, r.stderr
    lines = sorted(r.stdout.splitlines())
    assert len(lines) == 3
    ports = set()
    for i, line in enumerate(lines):
        tag, pid, n, addr, devs = line.split()
        assert (tag, pid, n, devs) == (f"[{i}]", str(i), "3", "1")
        assert addr.startswith("127.0.0.1:")
        ports.add(addr)
    assert len(ports) == 1


def test_launcher_stops_the_others_and_returns_the_failure():
    code = ("import os, sys, time; i = int(os.environ['LINATTN_PROCESS_ID']); "
            "time.sleep(0.5 if i == 1 else 120); sys.exit(7 if i == 1 else 0)")
    t0 = time.time()
    r = launch(2, [sys.executable, "-c", code], timeout=60)
    assert r.returncode == 7
    assert time.time() - t0 < 30  # process 0 (asleep for 120 s) was stopped
    assert "process 1 exited with status 7; stopping the others" in r.stderr


def test_settings_from_env():
    assert dist.settings_from_env({}) is None
    env = dist.launch_env(1234, 2, 1, 3)
    assert env["JAX_NUM_CPU_DEVICES"] == "3"
    assert dist.settings_from_env(env) == {"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1}
    assert dist.settings_from_env({"SLURM_STEP_NUM_TASKS": "4"}) == {"cluster": True}
    assert dist.settings_from_env({"SLURM_STEP_NUM_TASKS": "1"}) is None
    assert dist.settings_from_env({"LINATTN_DISTRIBUTED": "1"}) == {"cluster": True}
    with pytest.raises(ValueError, match="without"):
        dist.settings_from_env({"LINATTN_COORDINATOR": "127.0.0.1:1"})
    with pytest.raises(ValueError, match="LINATTN_PROCESS_ID=2 with LINATTN_NUM_PROCESSES=2"):
        dist.settings_from_env({**env, "LINATTN_PROCESS_ID": "2"})
    with pytest.raises(ValueError, match="'x'"):
        dist.settings_from_env({**env, "LINATTN_NUM_PROCESSES": "x"})


def test_one_process_helpers_are_plain():
    """Without jax.distributed: process 0 writes, to_host is numpy, int devices still pick local ones."""
    assert dist.is_writer() and not dist.multi()
    assert isinstance(dist.to_host({"a": jnp.ones(2)})["a"], np.ndarray)
    v = np.asarray([0.1, 1 / 3])
    assert np.array_equal(dist.gather_bits(v)[0], v) and dist.broadcast({"v": v})["v"].dtype == np.float64
    assert T.resolve_devices(None) == jax.local_devices() and T.resolve_devices(1) == jax.local_devices()[:1]
