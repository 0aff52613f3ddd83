"""Tests run in float64 on CPU (DESIGN.md: calibrate and test in float64)."""

import os

import jax

# tests that call the CLI's main() in this process do not write to the user's cache
os.environ.setdefault("HYBRID_TWIN_COMPILE_CACHE", "off")

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_platforms", "cpu")
