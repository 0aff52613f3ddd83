"""The backend contract: a batch in, a `Solution` out, and a declaration of what the
backend supports.

A backend is an `equinox.Module` whose fields are the settings it owns (e.g. the kernel's
block size); its class declares the methods it runs, the differentiation modes it
supports and whether derivatives may be taken with respect to the model's own arrays
(network weights). `solve` takes a validated `Batch` and returns a batched `Solution` with
a `Status` per patient. `normal_equations` — each patient's Gauss–Newton matrices at its
observations, what Levenberg–Marquardt calibration needs — has a generic implementation
here (forward-mode derivatives of `solve`); a backend that can do better (the kernel
accumulates them while it integrates) overrides it.

To add a backend: one module with a subclass of `Backend`, registered by name in
`hybrid_twin/solve/options.py`'s `BACKENDS`.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from ..models.base import MechanisticModel
from ._core import Batch, Solution


class AxisDirections(NamedTuple):
    """Sensitivity directions along single parameters: direction k moves parameter
    `index[k]` by `scale[k]` (N,) per patient (d theta / d z of an elementwise transform,
    or unit vectors). A backend may then differentiate along that one parameter only,
    instead of along a dense (P,) tangent."""

    index: tuple[int, ...]
    scale: jax.Array  # (K, N)

    def dense(self, n_params: int) -> jax.Array:
        """The same directions as (K, N, P) tangents."""
        k, n = self.scale.shape
        eye = jnp.zeros((k, n_params), self.scale.dtype).at[jnp.arange(k),
                                                             jnp.asarray(self.index)].set(1.0)
        return eye[:, None, :] * self.scale[:, :, None]


class FitData(NamedTuple):
    """Observed data per save slot, (N, M) each: values, weights (0 where nothing is
    fitted; r = (y - f) * weight) and the observable each slot measures."""

    y: jax.Array
    weight: jax.Array
    obs_index: jax.Array


class NormalEquations(NamedTuple):
    """Per patient: cost 1/2 sum r² (N,), and with directions JᵀJ (N, K, K) and Jᵀr (N, K)
    of J = dr / d direction (None without); status (N,)."""

    cost: jax.Array
    h: jax.Array | None
    g: jax.Array | None
    status: jax.Array


class Backend(eqx.Module):
    """A solver backend (see the module docstring). Subclasses set the class variables
    and implement `solve`."""

    name: ClassVar[str] = ""
    methods: ClassVar[tuple[str, ...]] = ()
    differentiation: ClassVar[tuple[str, ...]] = ()  # "forward", "reverse"
    default_differentiation: ClassVar[str] = "forward"
    differentiates_model: ClassVar[bool] = True  # d/d network weights, schedules, times

    def check(self, options) -> None:
        """Raise ValueError if this backend cannot honour `options` (a `SolverOptions`)."""
        method = options.method.name
        if method not in self.methods:
            others = ", ".join(self.methods)
            raise ValueError(f"the {self.name} backend runs {others} only, not {method}")
        mode = options.differentiation
        if mode is not None and mode not in self.differentiation:
            raise ValueError(f"the {self.name} backend differentiates in "
                             f"{' and '.join(self.differentiation)} mode only, not {mode}")

    def solve(self, model: MechanisticModel, batch: Batch, options) -> Solution:
        """Solve the batch; a `Solution` with leading axis N."""
        raise NotImplementedError

    def sensitivities(self, model: MechanisticModel, batch: Batch,
                      directions: jax.Array | AxisDirections, options
                      ) -> tuple[Solution, jax.Array]:
        """The solve and d states / d direction at the save slots, (N, M, K, S), along
        `directions` ((K, N, P) or `AxisDirections`), here by one `jax.jvp` of `solve` per
        direction (batched by `vmap`, the primal shared)."""
        if isinstance(directions, AxisDirections):
            directions = directions.dense(model.n_params)
        sol = self.solve(model, batch, options)

        def ys(theta):
            return self.solve(model, eqx.tree_at(lambda b: b.theta, batch, theta), options).ys

        sens = jax.vmap(lambda d: jax.jvp(ys, (batch.theta,), (d,))[1])(directions)
        return sol, jnp.moveaxis(sens, 0, 2)

    def normal_equations(self, model: MechanisticModel, batch: Batch,
                         directions: jax.Array | AxisDirections | None, data: FitData,
                         options) -> NormalEquations:
        """Cost, JᵀJ and Jᵀr per patient along `directions` ((K, N, P) parameter tangents or
        `AxisDirections`; None: the cost only), here by forward-mode derivatives of
        `solve`: one solve for the residuals and one `jax.jvp` per direction, the
        directions batched by `vmap`."""
        weight = jnp.where(batch.batched_save_times()[1], data.weight, 0.0)
        y = jnp.where(weight > 0, data.y, 0.0)

        def residuals(theta):
            sol = self.solve(model, eqx.tree_at(lambda b: b.theta, batch, theta), options)
            f = sol.observed(model, theta, data.obs_index)
            return jnp.where(weight > 0, (y - f) * weight, 0.0), sol.status

        r, status = residuals(batch.theta)
        cost = 0.5 * jnp.sum(r * r, axis=1)
        if directions is None:
            return NormalEquations(cost, None, None, status)
        if isinstance(directions, AxisDirections):
            directions = directions.dense(model.n_params)
        cols = jax.vmap(lambda d: jax.jvp(lambda th: residuals(th)[0], (batch.theta,),
                                          (d,))[1])(directions)  # (K, N, M)
        h = jnp.einsum("knm,lnm->nkl", cols, cols)
        g = jnp.einsum("knm,nm->nk", cols, r)
        return NormalEquations(cost, h, g, status)
