"""hybrid_twin: hybrid mechanistic–ML digital twins of patients, in JAX.

The public API is re-exported here; see README.md for a tour.
"""

from . import models
from .models import MechanisticModel, get_model
from .schedule import Schedule
from .simulate import Solution, SolverOptions, Status, simulate
from .solve import (
    RK4,
    Diffrax,
    Dopri5,
    Ensemble,
    Kernel,
    Kvaerno5,
    StepSizeController,
    Tsit5,
)

__version__ = "0.1.0"

__all__ = [
    "RK4", "Diffrax", "Dopri5", "Ensemble", "Kernel", "Kvaerno5", "MechanisticModel",
    "Schedule", "Solution", "SolverOptions", "Status", "StepSizeController", "Tsit5",
    "get_model", "models", "simulate",
]
