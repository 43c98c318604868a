"""Shared test settings (STYLE.md): strict rank promotion, exact float32 matmuls, and 2 host CPU
devices (set before JAX starts), so multi-device code runs in process on any machine.

JAX's persistent compilation cache lives in a fresh temporary folder for this pytest run (set in the
environment, so the CLI subprocesses of tests/test_sweep.py and tests/test_distributed.py share it):
a program that several tests compile, in process or in a subprocess, compiles once per run. Each
run starts cold; the folder is removed at exit.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "2")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="linattn-test-jax-cache-")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")
