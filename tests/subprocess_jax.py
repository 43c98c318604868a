"""Run Python in a fresh process, for tests that need JAX started with other devices.

The pytest process has already initialized JAX, so multi-device CPU tests (forced host devices)
run in a child process with the repo on PYTHONPATH and the CPU platform.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_python(args: list, xla_flags: str = "", timeout: int = 300) -> subprocess.CompletedProcess:
    """`python ARGS` in a child process; asserts it exits 0 and returns it."""
    env = dict(os.environ)
    if xla_flags:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_ok(script: str, xla_flags: str = "", timeout: int = 300) -> None:
    """Run `script` in a child process; assert it exits 0 and prints OK."""
    assert "OK" in run_python(["-c", script], xla_flags, timeout).stdout
