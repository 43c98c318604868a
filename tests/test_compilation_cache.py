"""linattn's persistent compilation cache (linattn/__init__): where it lives, how it is turned off,
and that a second process loads a training program from it instead of compiling it, with the same
results. The pytest run's own cache is JAX_COMPILATION_CACHE_DIR (conftest), so the processes
here run without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import linattn

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json
import jax, jax.numpy as jnp
import linattn
from linattn import params as P, train as T
from linattn.records import compilation_cache_dir
from sims.benchmark import cache_counter

counts = cache_counter()
cfg = T.TrainConfig(steps=5, batch=32, d=3, history=5)
run = T.Run(jax.random.PRNGKey(1), P.init_params(jax.random.PRNGKey(0), 3), T.TaskContext(jnp.ones(3) / 3 ** 0.5),
            "pretrain", cfg=cfg)
(res,) = T.train_plan([run], devices=1)
print(json.dumps({"dir": compilation_cache_dir(), "history": res.history.tolist(), **counts}))
"""


def _child(**env) -> dict:
    environ = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "LINATTN_COMPILATION_CACHE",
                                                              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
    out = subprocess.run([sys.executable, "-c", CHILD], env={**environ, **env}, cwd=ROOT, capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    for name in ("JAX_COMPILATION_CACHE_DIR", "LINATTN_COMPILATION_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert linattn._cache_folder() == str(tmp_path / ".cache" / "linattn" / "jax")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert linattn._cache_folder() == str(tmp_path / "xdg" / "linattn" / "jax")
    monkeypatch.setenv("LINATTN_COMPILATION_CACHE", str(tmp_path / "mine"))
    assert linattn._cache_folder() == str(tmp_path / "mine")
    for off in ("off", "0", "OFF", "none"):
        monkeypatch.setenv("LINATTN_COMPILATION_CACHE", off)
        assert linattn._cache_folder() is None
    monkeypatch.setenv("LINATTN_COMPILATION_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert linattn._cache_folder() is None  # JAX reads its own setting


def test_a_second_process_loads_the_program_and_gets_the_same_results(tmp_path):
    folder = tmp_path / "cache"
    first = _child(LINATTN_COMPILATION_CACHE=str(folder))
    assert first["dir"] == str(folder) and first["hits"] == 0 and first["misses"] > 0
    assert any(folder.iterdir())
    second = _child(LINATTN_COMPILATION_CACHE=str(folder))
    assert second["misses"] == 0 and second["hits"] == first["misses"]
    assert second["history"] == first["history"]
    off = _child(LINATTN_COMPILATION_CACHE="off", XDG_CACHE_HOME=str(tmp_path / "xdg"))
    assert off["dir"] is None and off["hits"] == off["misses"] == 0 and not (tmp_path / "xdg").exists()
    assert off["history"] == first["history"]
