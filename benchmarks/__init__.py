"""Accuracy and speed benchmarks; results land in benchmarks/results/."""
