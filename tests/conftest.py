"""Tests run in float64 on CPU (DESIGN.md: calibrate and test in float64)."""

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_platforms", "cpu")
