"""hybrid_twin: hybrid mechanistic–ML digital twins of patients, in JAX.

The public API is re-exported here; see README.md for a tour.
"""

from . import models
from .models import MechanisticModel, get_model
from .schedule import Schedule
from .simulate import Solution, SolverOptions, Status, simulate

__version__ = "0.1.0"

__all__ = [
    "MechanisticModel", "Schedule", "Solution", "SolverOptions", "Status", "get_model",
    "models", "simulate",
]
