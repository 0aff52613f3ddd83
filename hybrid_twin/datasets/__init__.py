"""Public data sets that ship with hybrid_twin (sources in datasets/README.md)."""

from __future__ import annotations

from pathlib import Path

from ..data.cohort import Cohort
from ..data.events import read_event_table
from ..models.base import MechanisticModel
from ..models.pkpd import OneCompartment

HERE = Path(__file__).resolve().parent


def theophylline_path() -> Path:
    """Path of the theophylline event table (12 subjects, 132 concentrations, mg/L)."""
    return HERE / "theophylline.csv"


def load_theophylline(model: MechanisticModel | None = None) -> Cohort:
    """The theophylline study (Boeckmann, Sheiner & Beal 1994) as a `Cohort`.

    Time in hours, doses in mg into `depot`, concentrations in mg/L, covariate WT (kg).
    `model` defaults to `pkpd.OneCompartment()`.
    """
    if model is None:
        model = OneCompartment()
    return read_event_table(theophylline_path(), model)
