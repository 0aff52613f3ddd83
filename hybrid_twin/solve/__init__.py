"""The solver layer behind `hybrid_twin.simulate`.

- `_core`: the shared vocabulary (`Status`, `Solution`, methods, `StepSizeController`,
  `Batch`, and the event preparation every backend reads);
- `_integrator`: the batch integrator (Runge–Kutta stages, error estimate, step-size
  control, event walking), used on arrays by the ensemble backend and inside the Pallas
  kernel;
- `backend`: the backend contract (`Backend`: a batch in, a `Solution` out, declared
  methods and differentiation modes; normal equations for calibration);
- `diffrax_backend`, `ensemble`, `kernel`: the backends;
- `options`: `SolverOptions` and the registry of backends by name.
"""

from ._core import (
    METHODS,
    RK4,
    Batch,
    Dopri5,
    Kvaerno5,
    Method,
    Solution,
    Status,
    StepSizeController,
    Tsit5,
)
from .backend import AxisDirections, Backend, FitData, NormalEquations
from .diffrax_backend import Diffrax
from .ensemble import Ensemble
from .kernel import Kernel, kernel_support
from .options import (
    BACKEND_NAMES,
    Auto,
    BACKENDS,
    DEFAULT,
    EXPERIMENT_DEFAULT,
    FLOAT32_MIN_RTOL,
    PRECISIONS,
    SolverOptions,
)

__all__ = [
    "BACKENDS", "BACKEND_NAMES", "DEFAULT", "EXPERIMENT_DEFAULT", "FLOAT32_MIN_RTOL", "METHODS",
    "PRECISIONS", "RK4",
    "Auto", "AxisDirections", "Backend", "Batch", "Diffrax", "Dopri5", "Ensemble", "FitData",
    "Kernel", "Kvaerno5", "Method", "NormalEquations", "Solution", "SolverOptions",
    "Status", "StepSizeController", "Tsit5", "kernel_support",
]
