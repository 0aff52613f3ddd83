"""`SolverOptions`: how to solve, split the way diffrax splits it — a method, a step-size
controller, the step limit, the differentiation mode, and the backend with the settings it
owns — and the registry of backends by name."""

from __future__ import annotations

import dataclasses
import logging

import equinox as eqx
import jax
import jax.numpy as jnp

from ..models.base import MechanisticModel
from ._core import Method, StepSizeController, Tsit5, as_method
from .backend import Backend
from .diffrax_backend import Diffrax
from .ensemble import Ensemble
from .kernel import Kernel, kernel_support

BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (Diffrax, Ensemble, Kernel)}
BACKEND_NAMES = (*BACKENDS, "auto")


class Auto(eqx.Module):
    """Backend "auto": the kernel on a GPU when the model lowers to it, else diffrax (the
    ensemble for RK4), chosen by `SolverOptions.resolved`; it holds the settings of the
    backends it may pick."""

    kernel: Kernel = eqx.field(static=True, default=Kernel())
    diffrax: Diffrax = eqx.field(static=True, default=Diffrax())
    ensemble: Ensemble = eqx.field(static=True, default=Ensemble())
    name = "auto"
DIFFERENTIATION = ("forward", "reverse")
PRECISIONS = ("auto", "float32", "float64")
FLOAT32_MIN_RTOL = 1e-6
"""The tightest relative tolerance a float32 solve is run with (`SolverOptions.for_dtype`)."""
logger = logging.getLogger("hybrid_twin")


def default_platform() -> str:
    """The default JAX device's platform ("cpu", "gpu", "tpu"): what "auto" settings
    choose for."""
    return jax.default_backend()


def as_backend(backend: Backend | Auto | str) -> Backend | Auto:
    """A `Backend` (or `Auto`) from itself or its name."""
    if isinstance(backend, (Backend, Auto)):
        return backend
    if backend == "auto":
        return Auto()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    return BACKENDS[backend]()


class SolverOptions(eqx.Module):
    """How to integrate. All fields are static (changing one recompiles).

    Attributes:
        method: `Tsit5()` (default), `Dopri5()`, `Kvaerno5()` (stiff, diffrax backend) or
            `RK4(dt0)` (fixed step; ensemble and kernel backends); or a method's name.
        controller: `StepSizeController(rtol, atol, dtmax)` of the adaptive methods.
        max_steps: step limit per patient, in total; a patient that needs more is
            flagged `Status.MAX_STEPS` (the others are unaffected).
        differentiation: "reverse" (`jax.grad`), "forward" (`jax.jvp`/`jax.jacfwd`,
            cheaper for Gauss–Newton Jacobians with few parameters) or None (the
            backend's default). A mode the backend cannot honour is an error.
        backend: `Diffrax(save_chunk)` (default), `Ensemble()`, `Kernel(block, warps)`,
            `Auto(...)` (the kernel on a GPU when the model lowers to it, otherwise diffrax;
            see `resolved`), or a backend's name.
        precision: the float dtype every solve and fit runs in: "float32", "float64",
            "auto" (float32 on a GPU, where the kernel's lanes are 32-bit and float64 runs
            at a fraction of the speed; float64 on a CPU when `jax_enable_x64` is on), or
            None (the default: the dtype of the inputs). Parameters, schedules,
            observation times and data are cast to it at the `simulate` /
            `normal_equations` / `calibrate` boundary, so the kernels are traced in it
            whatever x64 makes of Python floats.
    """

    method: Method = eqx.field(static=True, default=Tsit5(), converter=as_method)
    controller: StepSizeController = eqx.field(static=True, default=StepSizeController())
    max_steps: int = eqx.field(static=True, default=4096)
    differentiation: str | None = eqx.field(static=True, default=None)
    backend: Backend | Auto = eqx.field(static=True, default=Diffrax(), converter=as_backend)
    precision: str | None = eqx.field(static=True, default=None)

    def __check_init__(self) -> None:
        if self.precision not in (None, *PRECISIONS):
            raise ValueError(f"precision must be one of {PRECISIONS} or None, got "
                             f"{self.precision!r}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.differentiation not in (None, *DIFFERENTIATION):
            raise ValueError(f"differentiation must be one of {DIFFERENTIATION} or None, "
                             f"got {self.differentiation!r}")
        if isinstance(self.backend, Backend):
            self.backend.check(self)

    @property
    def backend_name(self) -> str:
        """The backend's name ("diffrax", "ensemble", "kernel" or "auto")."""
        return self.backend.name

    def resolved(self, model: MechanisticModel | None = None) -> SolverOptions:
        """The options with backend "auto" resolved for the default JAX device (and, on a
        GPU, for `model`: the kernel only if the model lowers to it); the choice is
        logged."""
        auto = self.backend
        if not isinstance(auto, Auto):
            return self
        method = self.method.name
        if method not in Kernel.methods:
            logger.info("backend auto: diffrax (the kernel runs explicit methods only)")
            return dataclasses.replace(self, backend=auto.diffrax)
        if default_platform() != "gpu":
            if method not in Diffrax.methods:
                logger.info("backend auto: ensemble (%s runs on the ensemble and kernel "
                            "backends)", method)
                return dataclasses.replace(self, backend=auto.ensemble)
            logger.info("backend auto: diffrax (no GPU; the kernel would run interpreted)")
            return dataclasses.replace(self, backend=auto.diffrax)
        if model is not None:
            reason = kernel_support(model)
            if reason is not None:
                if method not in Diffrax.methods:
                    logger.warning("backend auto: ensemble, %s does not lower to the "
                                   "kernel: %s", type(model).__name__, reason)
                    return dataclasses.replace(self, backend=auto.ensemble)
                logger.warning("backend auto: diffrax, %s does not lower to the kernel: %s",
                               type(model).__name__, reason)
                return dataclasses.replace(self, backend=auto.diffrax)
        return dataclasses.replace(self, backend=auto.kernel)

    def dtype(self) -> jnp.dtype | None:
        """The float dtype of `precision` on the default JAX device (None: the inputs')."""
        if self.precision is None:
            return None
        if self.precision == "auto":
            if default_platform() == "gpu" or not jax.config.jax_enable_x64:
                return jnp.dtype(jnp.float32)
            return jnp.dtype(jnp.float64)
        if self.precision == "float64" and not jax.config.jax_enable_x64:
            raise ValueError('precision "float64" needs jax_enable_x64 '
                             '(jax.config.update("jax_enable_x64", True))')
        return jnp.dtype(self.precision)

    def for_dtype(self, dtype) -> SolverOptions:
        """The options for a solve in `dtype`: in float32 a relative tolerance below
        `FLOAT32_MIN_RTOL` cannot be met (rounding alone is ~1e-7 per step) and is raised to
        it, as the absolute tolerance to `FLOAT32_MIN_RTOL` times its ratio to rtol."""
        c = self.controller
        if jnp.dtype(dtype) != jnp.float32 or c.rtol >= FLOAT32_MIN_RTOL:
            return self
        k = FLOAT32_MIN_RTOL / c.rtol
        return dataclasses.replace(self, controller=dataclasses.replace(
            c, rtol=FLOAT32_MIN_RTOL, atol=c.atol * k))

    def for_gradients(self) -> SolverOptions:
        """The options a gradient-based fit needs: on the diffrax backend the step is
        capped at the observation spacing unless a cap is set (steady-state
        sensitivities, DESIGN.md)."""
        if isinstance(self.backend, Diffrax) and self.controller.dtmax is None:
            return dataclasses.replace(
                self, controller=dataclasses.replace(self.controller, dtmax="obs"))
        return self


DEFAULT = SolverOptions()
EXPERIMENT_DEFAULT = SolverOptions(controller=StepSizeController(rtol=1e-8, atol=1e-10),
                                   backend=Ensemble(), precision="auto")
"""The options of calibration and of experiment configs unless they say otherwise: the
ensemble backend with tight tolerances (forward-mode Jacobians stay accurate), precision
"auto" (float32 on a GPU, float64 on a CPU with x64)."""
