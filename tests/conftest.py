"""Tests run in float64 on CPU (DESIGN.md: calibrate and test in float64)."""

import os

import jax

# tests that call the CLI's main() in this process do not write to the user's cache
os.environ.setdefault("HYBRID_TWIN_COMPILE_CACHE", "off")
# The suite's cohorts are tiny, so its time is XLA compile time: the CPU backend's LLVM
# optimisation passes are switched off (a third less compile time; IEEE semantics are
# kept, so results agree to rounding with optimised code). Set before JAX starts, and so
# inherited by the suite's subprocesses; HYBRID_TWIN_TEST_OPTIMISED_XLA=1 keeps them.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if os.environ.get("HYBRID_TWIN_TEST_OPTIMISED_XLA") != "1":
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_platforms", "cpu")
