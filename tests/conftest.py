"""Shared test settings (STYLE.md): strict rank promotion, exact float32 matmuls."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")
