"""Shared test settings (STYLE.md): strict rank promotion, exact float32 matmuls, and 2 host CPU
devices (set before JAX starts), so multi-device code runs in process on any machine."""

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "2")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")
