"""The one solver entry point: `simulate(model, params, schedule, save_ts)`, and
`normal_equations` for calibration.

Every other part of hybrid_twin calls these; they validate the inputs at the boundary
(clear errors before any compute starts), build a `Batch` in one dtype, hand it to the
backend named by `SolverOptions.backend` (`hybrid_twin.solve`: diffrax, ensemble, kernel,
each behind the same contract) and, with several local devices, shard the patient axis
over them.

Conventions of every backend: doses are exact jumps (boluses) or constant rates over their
windows (infusions), no step straddles a discontinuity, the solution is saved exactly at
each patient's own observation times, and an observation at the same time as a dose sees
the state *before* the dose (a trough sample). `params` of shape `(N, n_params)` runs N
patients in one compiled call, each with its own schedule and observation times; a patient
whose solve fails is flagged in `Solution.status` and leaves the others untouched; its
states at the save times it did not reach are NaN (every backend), never a stale value.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from .models.base import MechanisticModel
from .schedule import Schedule, bad_padded_times
from .solve import (
    DEFAULT,
    AxisDirections,
    Batch,
    FitData,
    NormalEquations,
    Solution,
    SolverOptions,
    Status,
)

__all__ = ["AxisDirections", "FitData", "NormalEquations", "Solution", "SolverOptions",
           "Status", "normal_equations", "sensitivities", "simulate", "status_label"]


def status_label(code: int) -> str:
    """A patient's solve `Status` as output files write it: "ok", or
    "solver_failure:<reason>" with the reason max_steps (the step limit was reached),
    nonfinite (the state or the cost became non-finite) or solver_failed (the step size
    collapsed, or another solver failure)."""
    code = int(code)
    return "ok" if code == Status.OK else f"solver_failure:{Status(code).name.lower()}"


@eqx.filter_jit
def _solve_compiled(model, batch: Batch, options: SolverOptions) -> Solution:
    return options.backend.solve(model, batch, options)


def simulate(
    model: MechanisticModel,
    params: Any,
    schedule: Schedule | None,
    save_ts: Any,
    save_mask: Any = None,
    *,
    t0: float = 0.0,
    options: SolverOptions | None = None,
    has_infusions: bool | None = None,
    active: Any = None,
) -> Solution:
    """Solve one patient or a batch of patients and save at their observation times.

    Args:
        model: a `MechanisticModel` (or a hybrid model with the same interface).
        params: natural-unit parameters, `(n_params,)` for one patient or
            `(N, n_params)` for N patients (ordered as `model.parameters`).
        schedule: doses and inputs (`Schedule`), one shared by all patients or batched
            with leading axis N; None means no doses and no inputs.
        save_ts: observation times in the model's time unit, `(M,)` or `(N, M)`,
            non-decreasing over the real entries, padded at the end.
        save_mask: bool, same shape as `save_ts`; False marks padding (default: all True).
        t0: start time; the state at t0 is `model.initial_state`.
        options: `SolverOptions` (method, step-size controller, step limit,
            differentiation mode, backend).
        has_infusions: whether any dose is an infusion (default: read from the schedule;
            a traced schedule is assumed to have some). Callers that trace `simulate`
            inside their own `jit` pass it, so that no infusion windows are built for
            schedules without infusions.
        active: (N,) bool, the patients to solve (default all); the ensemble and kernel
            backends skip the others (`Status.SKIPPED`, results unspecified).

    Returns:
        `Solution` with states at `save_ts`, per-patient `status` and step counts.

    Differentiable (diffrax backend: `jax.grad` by default, `jax.jacfwd` with
    `SolverOptions(differentiation="forward")`; ensemble backend: forward mode by default,
    `jax.grad` with `differentiation="reverse"`; kernel backend: `jax.jvp`, `jax.jacfwd`
    and `jax.grad` with respect to `params` through sensitivities computed in the kernel,
    and with `differentiation="reverse"` `jax.grad` with respect to everything, the
    pullback recomputed on arrays); jit-compiled.
    """
    options = (options or DEFAULT).resolved(model)
    batch, single = _batch(model, params, schedule, save_ts, save_mask, t0, has_infusions,
                           options.dtype(), active)
    options = options.for_dtype(batch.dtype)
    n_dev = jax.local_device_count()
    if n_dev > 1 and not single and not isinstance(batch.theta, jax.core.Tracer):
        return _simulate_sharded(model, batch, options, n_dev)
    sol = _solve_compiled(model, batch, options)
    return jax.tree.map(lambda x: x[0], sol) if single else sol


def normal_equations(
    model: MechanisticModel,
    params: Any,
    directions: Any,
    schedule: Schedule,
    save_ts: Any,
    save_mask: Any,
    data: FitData,
    *,
    t0: float = 0.0,
    options: SolverOptions | None = None,
    has_infusions: bool | None = None,
    active: Any = None,
) -> NormalEquations:
    """Per patient, the weighted least-squares quantities of a Gauss–Newton step: the cost
    1/2 sum r² of r = (y - f) * weight over the save slots (`data`: `FitData`, (N, M)
    each; weight 0 where nothing is fitted), and with `directions` ((K, N, P) parameter
    tangents d theta / d z_k, or `AxisDirections`; None: the cost only) JᵀJ (N, K, K) and
    Jᵀr (N, K) of J = dr / dz. The backend computes them its own way (the kernel inside
    its solve, without storing J; the others by forward-mode derivatives of the solve).
    Arguments otherwise as `simulate`'s (`active` included), batched."""
    options = (options or DEFAULT).resolved(model)
    batch, single = _batch(model, params, schedule, save_ts, save_mask, t0, has_infusions,
                           options.dtype(), active)
    if single:
        raise ValueError("normal_equations: params must be batched, (N, n_params)")
    dtype = batch.dtype
    options = options.for_dtype(dtype)
    data = FitData(jnp.asarray(data.y, dtype), jnp.asarray(data.weight, dtype), data.obs_index)
    if isinstance(directions, AxisDirections):
        directions = directions._replace(scale=jnp.asarray(directions.scale, dtype))
    elif directions is not None:
        directions = jnp.asarray(directions, dtype)
    return _normal_compiled(model, batch, directions, data, options)


def sensitivities(
    model: MechanisticModel,
    params: Any,
    directions: Any,
    schedule: Schedule,
    save_ts: Any,
    save_mask: Any = None,
    *,
    t0: float = 0.0,
    options: SolverOptions | None = None,
    has_infusions: bool | None = None,
) -> tuple[Solution, jax.Array]:
    """The batched solve and its forward sensitivities along `directions` only ((K, N, P)
    parameter tangents or `AxisDirections`): d states / d direction at the save slots,
    (N, M, K, S) (the kernel integrates just these K directions, not one per parameter).
    Arguments otherwise as `simulate`'s, batched; the solve is differentiated in forward
    mode whatever `options.differentiation` says."""
    options = dataclasses.replace((options or DEFAULT).resolved(model),
                                  differentiation="forward")
    batch, single = _batch(model, params, schedule, save_ts, save_mask, t0, has_infusions,
                           options.dtype())
    if single:
        raise ValueError("sensitivities: params must be batched, (N, n_params)")
    options = options.for_dtype(batch.dtype)
    if isinstance(directions, AxisDirections):
        directions = directions._replace(scale=jnp.asarray(directions.scale, batch.dtype))
    else:
        directions = jnp.asarray(directions, batch.dtype)
    return _sens_compiled(model, batch, directions, options)


@eqx.filter_jit
def _sens_compiled(model, batch, directions, options):
    return options.backend.sensitivities(model, batch, directions, options)


@eqx.filter_jit
def _normal_compiled(model, batch, directions, data, options) -> NormalEquations:
    return options.backend.normal_equations(model, batch, directions, data, options)


def _batch(model, params, schedule, save_ts, save_mask, t0,
           has_infusions: bool | None, dtype=None, active=None) -> tuple[Batch, bool]:
    """Validate `simulate`'s inputs; the `Batch` (leading axis N, in `dtype`, default the
    parameters' float dtype) and whether the input was one patient."""
    params = jnp.asarray(params)
    if dtype is not None:
        params = params.astype(dtype)
    elif not jnp.issubdtype(params.dtype, jnp.floating):
        params = params.astype(jnp.result_type(float))
    if params.ndim not in (1, 2) or params.shape[-1] != model.n_params:
        raise ValueError(
            f"params: expected shape (n_params,) or (N, n_params) with n_params="
            f"{model.n_params} ({', '.join(model.param_names)}), got {params.shape}"
        )
    dtype = params.dtype
    schedule = Schedule.empty(model, dtype) if schedule is None else schedule
    save_ts = jnp.asarray(save_ts, dtype)
    save_mask = (np.ones(save_ts.shape, bool) if save_mask is None
                 else jnp.asarray(save_mask, bool))
    if save_ts.ndim not in (1, 2) or save_mask.shape != save_ts.shape:
        raise ValueError(
            f"save_ts must be (M,) or (N, M) with save_mask of the same shape; got "
            f"{save_ts.shape} and {save_mask.shape}"
        )
    n = params.shape[0] if params.ndim == 2 else None
    for what, batched, lead in (
        ("schedule", schedule.is_batched, jnp.shape(schedule.dose_times)[0]),
        ("save_ts", save_ts.ndim == 2, save_ts.shape[0]),
    ):
        if batched and (n is None or lead != n):
            raise ValueError(
                f"{what} is batched with {lead} patients but params has "
                f"{'no batch axis' if n is None else f'{n} patients'}"
            )
    if not isinstance(params, jax.core.Tracer):
        bad = ~np.isfinite(np.asarray(params))
        if bad.any():
            i = np.argwhere(bad)[0]
            raise ValueError(
                f"params: non-finite value at index {tuple(int(v) for v in i)} "
                f"(parameter {model.param_names[int(i[-1])]!r})"
            )
    if not isinstance(schedule.dose_times, jax.core.Tracer):
        schedule.validate(model, t0)
    if not isinstance(save_ts, jax.core.Tracer) and not isinstance(save_mask, jax.core.Tracer):
        ts_np = np.atleast_2d(np.asarray(save_ts, np.float64))
        mask_np = np.atleast_2d(np.asarray(save_mask))
        bad = bad_padded_times(ts_np, mask_np, strict=False, t0=t0)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(
                f"save_ts: patient {i}: observation times must be finite, "
                f"non-decreasing, >= t0={t0}, with padding (mask False) only at the end"
            )
    found = schedule.has_infusions()
    if found and has_infusions is False:
        raise ValueError("has_infusions=False, but the schedule has infusions")
    has_inf = has_infusions if has_infusions is not None else found is not False
    schedule = jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, schedule)
    single = params.ndim == 1
    if active is not None:
        active = jnp.asarray(active, bool)
        if single or active.shape != (params.shape[0],):
            raise ValueError(f"active must be (N,) bool for params (N, n_params), got "
                             f"shape {active.shape} for params {params.shape}")
    if single:
        params = params[None]
        schedule = jax.tree.map(lambda x: x[None], schedule)
        save_ts, save_mask = save_ts[None], save_mask[None]
    batch = Batch(params, schedule, save_ts, jnp.asarray(save_mask), jnp.asarray(t0, dtype),
                  has_inf, active)
    return batch, single


def _simulate_sharded(model, batch: Batch, options, n_dev) -> Solution:
    """Split the patient axis over all local devices (padding N to a multiple of them with
    copies of the first patient); each device solves its own patients independently
    (`jax.shard_map`), and the pad is dropped."""
    n = batch.n
    pad = (-n) % n_dev
    mesh = Mesh(np.array(jax.local_devices()), ("patients",))

    def padded(x):
        x = jnp.asarray(x)
        return jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)]) if pad else x

    batched = batch.schedule.dose_times.ndim == 2, batch.save_ts.ndim == 2
    batch = eqx.tree_at(lambda b: b.theta, batch, padded(batch.theta))
    if batch.active is not None:
        batch = eqx.tree_at(lambda b: b.active, batch, padded(batch.active))
    if batched[0]:
        batch = eqx.tree_at(lambda b: b.schedule, batch, jax.tree.map(padded, batch.schedule))
    if batched[1]:
        batch = eqx.tree_at(lambda b: (b.save_ts, b.save_mask), batch,
                            (padded(batch.save_ts), padded(batch.save_mask)))
    arrays, static = eqx.partition(model, eqx.is_array)
    sol = _sharded_compiled(arrays, static, batch, options, mesh, batched)
    return jax.tree.map(lambda x: x[:n], sol)


@eqx.filter_jit
def _sharded_compiled(arrays, static, batch, options, mesh, batched):
    rows, whole = PartitionSpec("patients"), PartitionSpec()
    batch_spec = Batch(
        theta=rows,
        schedule=jax.tree.map(lambda _: rows if batched[0] else whole, batch.schedule),
        save_ts=rows if batched[1] else whole, save_mask=rows if batched[1] else whole,
        t0=whole, has_infusions=batch.has_infusions,
        active=None if batch.active is None else rows)
    array_spec = jax.tree.map(lambda _: whole, arrays)

    def local(arr, b):
        return options.backend.solve(eqx.combine(arr, static), b, options)

    fn = jax.shard_map(local, mesh=mesh, in_specs=(array_spec, batch_spec),
                       out_specs=rows, check_vma=False)
    return fn(arrays, batch)
