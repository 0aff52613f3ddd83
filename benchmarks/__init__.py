"""Accuracy and speed benchmarks; results land in benchmarks/results/."""

from hybrid_twin import xla_flags

xla_flags.apply()  # before JAX creates its backends (hybrid_twin.xla_flags)
