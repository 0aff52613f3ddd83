"""The "ensemble" backend: the batch integrator (`_integrator.integrate`) run directly on
arrays, the whole batch as its lanes, under XLA.

Every patient carries its own time, step size and pointer into its own sorted doses; in
iteration s of the walk every patient integrates exactly onto its own s-th save time,
applying the doses it meets on the way, and all write row s of the output together.
Nothing is interpolated and no step straddles a discontinuity. The kernel backend runs the
same integrator inside a Pallas kernel, so the two take the same steps.

Forward-mode autodiff (`jax.jvp`, `jax.jacfwd`) works through the walk (step-size control
is not differentiated); reverse mode does not (`lax.while_loop`), so `jax.grad` needs the
diffrax or kernel backend.
"""

from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp

from ..models.base import MechanisticModel
from ._core import Batch, Solution, prepare
from ._integrator import Sources, integrate
from .backend import Backend


class Ensemble(Backend):
    """Batch-native adaptive Tsit5/Dopri5 (or fixed-step RK4) under XLA; forward mode."""

    name: ClassVar[str] = "ensemble"
    methods: ClassVar[tuple[str, ...]] = ("tsit5", "dopri5", "rk4")
    differentiation: ClassVar[tuple[str, ...]] = ("forward",)
    default_differentiation: ClassVar[str] = "forward"

    def solve(self, model: MechanisticModel, batch: Batch, options) -> Solution:
        """The batch integrator over the whole batch, its output written slot by slot."""
        prep = prepare(model, batch, obs_cap=options.controller.dtmax == "obs")
        n, m, s = batch.n, prep.ts.shape[1], model.n_states
        n_in = len(model.input_names) if prep.u_a is not None else 0
        src = Sources(theta=batch.theta.T, ts=prep.ts_lanes, t0=prep.t0, t_end=prep.t_end,
                      q_t=prep.q_t, q_jump=prep.q_jump, q_state=prep.q_state, rate=prep.rate,
                      anchor=prep.anchor if n_in else None, u_a=prep.u_a if n_in else None,
                      u_slope=prep.u_slope if n_in else None, dtmax=prep.dtmax)

        def write(slot, y, out):
            return out.at[slot].set(jnp.stack(y[:s]))

        walked = integrate(model, src, lanes=n, dtype=batch.dtype, method=options.method,
                           controller=options.controller, max_steps=options.max_steps,
                           n_slots=m, write=write, out=jnp.zeros((m, s, n), batch.dtype))
        mask = batch.batched_save_times()[1]
        ys = jnp.where(mask[..., None], jnp.moveaxis(walked.out, -1, 0), 0.0)
        return Solution(ts=prep.ts, ys=ys, mask=mask, status=walked.status,
                        num_steps=walked.steps)
