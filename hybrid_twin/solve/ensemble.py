"""The "ensemble" backend: the batch integrator (`_integrator.integrate`) run directly on
arrays, the whole batch as its lanes, under XLA.

Every patient carries its own time, step size and pointer into its own sorted doses; in
iteration s of the walk every patient integrates exactly onto its own s-th save time,
applying the doses it meets on the way, and all write row s of the output together.
Nothing is interpolated and no step straddles a discontinuity. The kernel backend runs the
same integrator inside a Pallas kernel, so the two take the same steps.

Both autodiff modes work through the walk (step-size control is not differentiated), with
respect to parameters, network weights and schedules: forward mode (`jax.jvp`,
`jax.jacfwd`) through `lax.while_loop`, and with `SolverOptions(differentiation="reverse")`
reverse mode (`jax.grad`) through equinox's checkpointed while loop.
"""

from __future__ import annotations

from typing import ClassVar

from ..models.base import MechanisticModel
from ._core import Batch, Solution
from ._integrator import solve_on_arrays
from .backend import Backend


class Ensemble(Backend):
    """Batch-native adaptive Tsit5/Dopri5 (or fixed-step RK4) under XLA; forward mode, or
    reverse mode with `differentiation="reverse"`."""

    name: ClassVar[str] = "ensemble"
    methods: ClassVar[tuple[str, ...]] = ("tsit5", "dopri5", "rk4")
    differentiation: ClassVar[tuple[str, ...]] = ("forward", "reverse")
    default_differentiation: ClassVar[str] = "forward"

    def solve(self, model: MechanisticModel, batch: Batch, options) -> Solution:
        """The batch integrator over the whole batch (`_integrator.solve_on_arrays`)."""
        return solve_on_arrays(model, batch, options)
