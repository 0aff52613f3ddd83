"""Experiment runners: the `hybrid-twin` command dispatches here."""
