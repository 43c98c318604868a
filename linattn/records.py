"""What a run records beside its results: package versions and the devices it ran on."""

from __future__ import annotations

import os
import platform

import jax
import numpy as np


def cpu_model() -> str:
    """The host CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_summary() -> dict:
    """Backend, devices, their kind, the process layout, the host CPU and its load."""
    devs = jax.devices()
    return {
        "backend": jax.default_backend(),
        "device_count": len(devs),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "device_kind": devs[0].device_kind if devs else None,
        "devices": [str(d) for d in devs[:8]] + ([f"... {len(devs) - 8} more"] if len(devs) > 8 else []),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def versions() -> dict:
    """Package versions and the device summary, recorded with every result."""
    import chex
    import flax
    import optax

    import linattn

    return {"jax": jax.__version__, "optax": optax.__version__, "flax": flax.__version__, "chex": chex.__version__,
            "numpy": np.__version__, "linattn": linattn.__version__, "python": platform.python_version(),
            "jax_threefry_partitionable": bool(jax.config.jax_threefry_partitionable),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "compilation_cache_dir": compilation_cache_dir(), "device": device_summary()}


def compilation_cache_dir() -> str | None:
    """The persistent compilation cache folder this process uses (linattn/__init__), None when off."""
    return jax.config.jax_compilation_cache_dir if jax.config.jax_enable_compilation_cache else None
