"""The one solver entry point: `simulate(model, params, schedule, save_ts)`.

Every other part of hybrid_twin calls `simulate`; this is the only module that calls
`diffrax.diffeqsolve`.

How a patient is solved. The dose times, infusion end times and input breakpoints are
merged into one sorted event list; the solve runs piecewise between consecutive events
(`lax.scan` over segments, one `diffeqsolve` each), so that no step straddles a
discontinuity. A bolus is an exact jump of its target state at the start of the segment
that follows it; an infusion adds a constant rate to its target state over the segments
it covers; piecewise-constant inputs are constant on each segment. The solution is saved
exactly at each patient's own observation times. An observation at the same time as a
dose sees the state *before* the dose (a trough sample).

Batching: `params` of shape `(N, n_params)` runs N patients in one compiled call
(`jax.vmap`), each with its own schedule, observation times and step sizes. A patient
whose solve fails is flagged in `Solution.status` and leaves the others untouched.
"""

from __future__ import annotations

import enum
import logging
from typing import Any

import diffrax
import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import numpy as np

from .models.base import MechanisticModel, as_components
from .schedule import Schedule, bad_padded_times

METHODS = ("tsit5", "dopri5", "kvaerno5", "rk4")
ADJOINTS = ("checkpoint", "forward")
BACKENDS = ("diffrax", "ensemble", "kernel", "auto")
logger = logging.getLogger("hybrid_twin")


class Status(enum.IntEnum):
    """Per-patient outcome of a solve."""

    OK = 0
    MAX_STEPS = 1
    NONFINITE = 2
    SOLVER_FAILED = 3


class SolverOptions(eqx.Module):
    """How to integrate. All fields are static (changing one recompiles).

    Attributes:
        method: "tsit5" (non-stiff, default), "dopri5", "kvaerno5" (stiff, implicit), or
            "rk4" (classic fixed-step Runge–Kutta with step `dt0`; kernel backend only).
        rtol, atol: tolerances of the adaptive step-size controller.
        dtmax: largest step in the model's time unit, or "obs" to cap it at each
            patient's median observation spacing. The cap keeps parameter sensitivities
            resolved when a model starts at its steady state and gradients are taken
            (DESIGN.md, numerical pitfalls); calibration sets it. None: no cap.
        max_steps: step limit per segment between events; a patient that reaches it is
            flagged `Status.MAX_STEPS`.
        adjoint: "checkpoint" (reverse mode, `jax.grad`) or "forward" (forward mode,
            `jax.jacfwd`, cheaper for Gauss–Newton Jacobians with few parameters).
        save_chunk: the solve is also split after every `save_chunk` observations, so
            that each `diffeqsolve` saves at most that many points (saving cost grows
            with the square of the points saved per solve under `vmap`).
        backend: "diffrax" (`vmap` of `diffeqsolve`: every solver, forward and reverse
            mode) or "ensemble" (one batch-native adaptive Tsit5/Dopri5 loop that steps
            exactly onto every event and observation; forward-mode autodiff only;
            `max_steps` is then the per-patient total). See `hybrid_twin/_ensemble.py`.
            "kernel": the whole cohort in one fused Pallas kernel (Triton on GPU, interpret
            mode on CPU) with forward sensitivities inside; `jax.jvp`/`jacfwd`/`grad`
            with respect to the parameters; rk4, tsit5, dopri5; `max_steps` per patient
            in total. See `hybrid_twin/_kernel.py`. "auto": the kernel on a GPU when the
            method allows it, otherwise diffrax (the reason is logged).
        dt0: fixed step of "rk4" (model time unit): steps on the grid t_e + k dt0 from
            each sample or dose time t_e, the last one shortened to land on the next.
        kernel_block, kernel_warps: patients per kernel program (a power of two; default
            128 on GPU) and warps per program (default 4), for tuning on a GPU.
    """

    method: str = eqx.field(static=True, default="tsit5")
    rtol: float = eqx.field(static=True, default=1e-6)
    atol: float = eqx.field(static=True, default=1e-8)
    dtmax: float | str | None = eqx.field(static=True, default=None)
    max_steps: int = eqx.field(static=True, default=4096)
    adjoint: str = eqx.field(static=True, default="checkpoint")
    save_chunk: int = eqx.field(static=True, default=16)
    backend: str = eqx.field(static=True, default="diffrax")
    dt0: float | None = eqx.field(static=True, default=None)
    kernel_block: int | None = eqx.field(static=True, default=None)
    kernel_warps: int | None = eqx.field(static=True, default=None)

    def __check_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"SolverOptions.method must be one of {METHODS}, got {self.method!r}")
        if self.adjoint not in ADJOINTS:
            raise ValueError(
                f"SolverOptions.adjoint must be one of {ADJOINTS}, got {self.adjoint!r}"
            )
        if not (self.rtol > 0 and self.atol > 0):
            raise ValueError("SolverOptions: rtol and atol must be > 0")
        if isinstance(self.dtmax, str) and self.dtmax != "obs":
            raise ValueError(f"SolverOptions.dtmax must be a number, 'obs' or None, got {self.dtmax!r}")
        if self.max_steps < 1:
            raise ValueError("SolverOptions.max_steps must be >= 1")
        if self.save_chunk < 1:
            raise ValueError("SolverOptions.save_chunk must be >= 1")
        if self.backend not in BACKENDS:
            raise ValueError(
                f"SolverOptions.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "ensemble" and self.method in ("kvaerno5", "rk4"):
            raise ValueError("SolverOptions: the ensemble backend runs tsit5 and dopri5 "
                             f"only; use backend='diffrax' for {self.method}"
                             if self.method == "kvaerno5" else
                             "SolverOptions: the ensemble backend runs tsit5 and dopri5 "
                             "only; use backend='kernel' for rk4")
        if self.backend == "kernel" and self.method == "kvaerno5":
            raise ValueError("SolverOptions: the kernel backend runs explicit methods only "
                             "(rk4, tsit5, dopri5); use backend='diffrax' for kvaerno5")
        if self.method == "rk4" and self.backend in ("diffrax", "ensemble"):
            raise ValueError("SolverOptions: method 'rk4' runs on the kernel backend only")
        if self.kernel_block is not None and (self.kernel_block < 1 or
                                              self.kernel_block & (self.kernel_block - 1)):
            raise ValueError("SolverOptions.kernel_block must be a power of two, got "
                             f"{self.kernel_block}")
        if self.method == "rk4" and not (self.dt0 and self.dt0 > 0):
            raise ValueError("SolverOptions: method 'rk4' needs a step size dt0 > 0")

    def resolved(self, model: MechanisticModel | None = None) -> SolverOptions:
        """The options with backend "auto" resolved for the default JAX device (and, on a
        GPU, for `model`: the kernel only if the model lowers to it)."""
        if self.backend != "auto":
            return self
        import dataclasses

        if self.method == "kvaerno5":
            logger.info("backend auto: diffrax (the kernel runs explicit methods only)")
            return dataclasses.replace(self, backend="diffrax")
        if jax.default_backend() != "gpu":
            if self.method == "rk4":
                logger.info("backend auto: kernel in interpret mode (rk4 needs the kernel)")
                return dataclasses.replace(self, backend="kernel")
            logger.info("backend auto: diffrax (no GPU; the kernel would run interpreted)")
            return dataclasses.replace(self, backend="diffrax")
        if model is not None:
            from ._kernel import kernel_support

            reason = kernel_support(model)
            if reason is not None:
                if self.method == "rk4":
                    raise ValueError(f"{type(model).__name__} does not lower to the kernel "
                                     f"backend, which rk4 needs: {reason}")
                logger.warning("backend auto: diffrax, %s does not lower to the kernel: %s",
                               type(model).__name__, reason)
                return dataclasses.replace(self, backend="diffrax")
        return dataclasses.replace(self, backend="kernel")

    def solver(self) -> diffrax.AbstractSolver:
        return {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5,
                "kvaerno5": diffrax.Kvaerno5}[self.method]()

    def adjoint_obj(self) -> diffrax.AbstractAdjoint:
        if self.adjoint == "forward":
            return diffrax.ForwardMode()
        return diffrax.RecursiveCheckpointAdjoint()


class Solution(eqx.Module):
    """Result of `simulate`; leading axis N when batched.

    Attributes:
        ts: (..., M) save times (model time unit); padded slots hold the last real time.
        ys: (..., M, n_states) states at `ts`.
        mask: (..., M) True where a save time is real.
        status: (...,) int `Status` code per patient; results of a patient with a
            non-zero status are not to be trusted (they may be non-finite).
        num_steps: (...,) accepted + rejected solver steps per patient.
    """

    ts: jax.Array
    ys: jax.Array
    mask: jax.Array
    status: jax.Array
    num_steps: jax.Array

    def observables(self, model: MechanisticModel, params: jax.Array) -> jax.Array:
        """Observables at the save times: (..., M, n_observables)."""
        return model.observe(self.ys, jnp.asarray(params)[..., None, :])

    def observed(self, model: MechanisticModel, params: jax.Array,
                 obs_index: jax.Array) -> jax.Array:
        """At each save time, the observable it measures (`obs_index`, (..., M))."""
        obs = self.observables(model, params)
        return jnp.take_along_axis(obs, jnp.asarray(obs_index)[..., None], axis=-1)[..., 0]


class _Field(eqx.Module):
    model: MechanisticModel
    interpolation: str = eqx.field(static=True)

    def __call__(self, t, y, args):
        p, infusion, u_const, in_times, in_values = args
        if self.interpolation == "linear" and in_times.shape[0] > 0:
            u_vals = [jnp.interp(t, in_times, in_values[:, c]) for c in range(in_values.shape[1])]
        else:
            u_vals = [u_const[c] for c in range(u_const.shape[0])]
        u = dict(zip(self.model.input_names, u_vals))
        dy = self.model.vector_field(t, as_components(y, self.model.n_states), p, u)
        return jnp.stack([jnp.broadcast_to(d, ()) for d in dy]).astype(y.dtype) + infusion


def _dose_routing(model: MechanisticModel) -> tuple[np.ndarray, np.ndarray]:
    states = np.array([model.index("state", d.state) for d in model.dose_targets], np.int32)
    scales = np.array([d.scale for d in model.dose_targets], np.float64)
    if states.size == 0:
        states, scales = np.zeros(1, np.int32), np.zeros(1)
    return states, scales


def _solve_one(
    model: MechanisticModel,
    theta: jax.Array,
    sched: Schedule,
    save_ts: jax.Array,
    save_mask: jax.Array,
    t0: jax.Array,
    opts: SolverOptions,
    has_infusions: bool = True,
) -> Solution:
    dtype = theta.dtype
    n_states = model.n_states
    n_inputs = len(model.inputs)
    p = model.param_dict(theta)
    y0 = jnp.stack([jnp.broadcast_to(jnp.asarray(c, dtype), ()) for c in model.initial_state(p)])

    from ._ensemble import dose_events, save_times

    ts, t_end = save_times(save_ts, save_mask, t0, dtype)
    # Dose routing (target index -> state index and scale), infusions and their durations.
    ev = dose_events(model, sched, has_infusions, dtype)
    d_state, d_scale, is_inf, duration = ev.d_state, ev.d_scale, ev.is_inf, ev.dur
    is_bolus = sched.dose_mask & ~is_inf
    inf_start = sched.dose_times
    inf_stop = sched.dose_times + duration
    inf_rate_state = jnp.where(is_inf, sched.dose_rates * d_scale, 0)

    # One event list: doses, infusion stops (when the batch has infusions), input
    # breakpoints, and a "save mark" after every `save_chunk`-th observation, which
    # bounds the number of observations any segment saves. Observations are ordered
    # before events at the same time (a sample at a dose time is a trough).
    n_k = sched.input_times.shape[0]
    n_stop = inf_stop.shape[0] if has_infusions else 0
    m = ts.shape[0]
    chunk = min(opts.save_chunk, m)
    mark_idx = jnp.arange(chunk - 1, m - 1, chunk)
    # (A final no-op event at t_end keeps the list non-empty.)
    ev_t = jnp.concatenate([sched.dose_times, inf_stop[:n_stop], sched.input_times,
                            t_end[None], ts[mark_idx]]).astype(dtype)
    ev_ok = jnp.concatenate([sched.dose_mask, is_inf[:n_stop], sched.input_mask,
                             jnp.zeros((1,), bool), save_mask[mark_idx + 1]])
    ev_t = jnp.where(ev_ok, jnp.clip(ev_t, t0, t_end), t_end)
    n_dose_ev = ev_t.shape[0] - mark_idx.shape[0]
    ev_rank = jnp.concatenate([jnp.full((n_dose_ev,), 2.0 * m), 2.0 * mark_idx + 1.0])
    ev_jump = jnp.concatenate([
        jnp.where(is_bolus, sched.dose_amounts * d_scale, 0),
        jnp.zeros((ev_t.shape[0] - is_bolus.shape[0],), dtype)]).astype(dtype)
    ev_state = jnp.concatenate(
        [d_state, jnp.zeros((ev_t.shape[0] - d_state.shape[0],), jnp.int32)])
    dose_like = jnp.sort(ev_t[:n_dose_ev])
    order = jnp.lexsort((ev_rank, ev_t))
    ev_t, ev_rank = ev_t[order], ev_rank[order]
    ev_jump, ev_state = ev_jump[order], ev_state[order]
    bounds = jnp.concatenate([t0[None], ev_t, t_end[None]])
    n_seg = ev_t.shape[0] + 1
    # Segment of observation j = the number of events ordered before it: the dose-like
    # events strictly earlier, plus the save marks placed after observations i < j.
    n_marks = jnp.sum(save_mask[mark_idx + 1])
    marks_before = jnp.minimum(jnp.arange(m) // chunk, n_marks)
    seg_of_save = (jnp.searchsorted(dose_like, ts, side="left") + marks_before).astype(jnp.int32)
    seg_sorted = jnp.where(save_mask, seg_of_save, n_seg)

    # Inputs: valid breakpoints; padded ones repeat the last valid one.
    if n_inputs and n_k:
        last = jnp.maximum(jnp.sum(sched.input_mask) - 1, 0)
        idx = jnp.where(sched.input_mask, jnp.arange(n_k), last)
        in_times = jnp.where(sched.input_mask, sched.input_times, sched.input_times[last])
        in_times = in_times.astype(dtype)
        in_values = sched.input_values[idx].astype(dtype)
    else:
        in_times = jnp.zeros((0,), dtype)
        in_values = jnp.zeros((0, n_inputs), dtype)

    def input_at(t):
        if in_times.shape[0] == 0:
            return jnp.zeros((n_inputs,), dtype)
        if sched.interpolation == "linear":
            return jnp.stack([jnp.interp(t, in_times, in_values[:, c]) for c in range(n_inputs)])
        started = sched.input_mask & (sched.input_times <= t)
        i = jnp.maximum(jnp.sum(started) - 1, 0)
        return jnp.where(jnp.any(started), in_values[i], 0)

    if opts.dtmax == "obs":
        real = jnp.sort(jnp.where(save_mask, save_ts, jnp.inf))
        gaps = jnp.diff(real)
        gaps = jnp.where(jnp.isfinite(gaps) & (gaps > 0), gaps, jnp.inf)
        n_gaps = jnp.sum(jnp.isfinite(gaps))
        median = jnp.sort(gaps)[jnp.maximum(n_gaps - 1, 0) // 2]
        dtmax = jnp.where(n_gaps > 0, median, jnp.inf).astype(dtype)
    elif opts.dtmax is None:
        dtmax = None
    else:
        dtmax = jnp.asarray(opts.dtmax, dtype)

    term = diffrax.ODETerm(_Field(model, sched.interpolation))
    solver = opts.solver()
    controller = diffrax.PIDController(rtol=opts.rtol, atol=opts.atol, dtmax=dtmax)
    adjoint = opts.adjoint_obj()

    def solve(y, ta, tb, window, dt_hint):
        mid = 0.5 * (ta + tb)
        active = is_inf & (inf_start <= mid) & (mid < inf_stop)
        infusion = jnp.zeros((n_states,), dtype).at[d_state].add(
            jnp.where(active, inf_rate_state, 0))
        args = (p, infusion, input_at(mid), in_times, in_values)
        dt0 = jnp.where(jnp.isfinite(dt_hint), jnp.minimum(dt_hint, tb - ta), tb - ta)
        sol = diffrax.diffeqsolve(
            term, solver, ta, tb, dt0, y, args=args,
            saveat=diffrax.SaveAt(ts=jnp.clip(ts[window], ta, tb), t1=True),
            stepsize_controller=controller, max_steps=opts.max_steps,
            adjoint=adjoint, throw=False,
        )
        ok = sol.result == diffrax.RESULTS.successful
        code = jnp.where(
            ok,
            jnp.where(jnp.all(jnp.isfinite(sol.ys[-1])), Status.OK, Status.NONFINITE),
            jnp.where(sol.result == diffrax.RESULTS.max_steps_reached,
                      Status.MAX_STEPS, Status.SOLVER_FAILED),
        )
        accepted = sol.stats["num_accepted_steps"]
        hint = jnp.where(accepted > 0, (tb - ta) / jnp.maximum(accepted, 1), dt_hint)
        return (sol.ys[:-1], sol.ys[-1], code.astype(jnp.int32),
                sol.stats["num_steps"].astype(jnp.int32), hint.astype(dtype))

    def skip(y, ta, tb, window, dt_hint):
        return (jnp.broadcast_to(y, (chunk, n_states)), y, jnp.int32(Status.OK),
                jnp.zeros((), jnp.int32), dt_hint)

    def segment(carry, k):
        y, status, out, steps, dt_hint = carry
        ta, tb = bounds[k], bounds[k + 1]
        jump = jnp.where(k > 0, ev_jump[jnp.maximum(k - 1, 0)], 0)
        y = y.at[ev_state[jnp.maximum(k - 1, 0)]].add(jump)
        tb = jnp.where(status == Status.OK, tb, ta)
        # Segments of zero length (simultaneous events, failed patients, padding) are
        # skipped outright when they are empty for every patient of the batch.
        start = jnp.searchsorted(seg_sorted, k, side="left")
        window = jnp.minimum(start + jnp.arange(chunk), m - 1)
        ys, y_end, code, n, dt_hint = jax.lax.cond(
            eqxi.unvmap_all(ta == tb), skip, solve, y, ta, tb, window, dt_hint)
        mine = (seg_sorted[window] == k)[:, None]
        out = out.at[window].set(jnp.where(mine, ys, out[window]))
        status = jnp.where(status == Status.OK, code, status).astype(jnp.int32)
        return (y_end, status, out, steps + n.astype(jnp.int32), dt_hint), None

    init = (y0, jnp.int32(Status.OK), jnp.zeros((m, n_states), dtype), jnp.int32(0),
            jnp.asarray(jnp.inf, dtype))
    (_, status, out, steps, _), _ = jax.lax.scan(segment, init, jnp.arange(n_seg))
    return Solution(ts=ts, ys=out, mask=save_mask, status=status, num_steps=steps)


@eqx.filter_jit
def _simulate_compiled(model, params, schedule, save_ts, save_mask, t0, opts, has_inf):
    if opts.backend in ("ensemble", "kernel"):
        from ._ensemble import solve_ensemble
        from ._kernel import solve_kernel

        single = params.ndim == 1
        theta = params[None] if single else params
        n = theta.shape[0]
        if schedule.dose_times.ndim == 1:
            schedule = jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), schedule)
        # the kernel reads save times shared by all patients as one row
        if save_ts.ndim == 1 and not (opts.backend == "kernel" and save_mask.ndim == 1):
            save_ts = jnp.broadcast_to(save_ts, (n,) + save_ts.shape)
        save_mask = jnp.broadcast_to(save_mask, save_ts.shape[:-1] + save_mask.shape[-1:])
        solve = solve_ensemble if opts.backend == "ensemble" else solve_kernel
        ts, ys, status, steps = solve(
            model, theta, schedule, save_ts, save_mask, t0, opts, has_inf)
        sol = Solution(ts=ts, ys=ys, mask=jnp.broadcast_to(save_mask, ts.shape),
                       status=status, num_steps=steps)
        return jax.tree.map(lambda x: x[0], sol) if single else sol
    if params.ndim == 1:
        return _solve_one(model, params, schedule, save_ts, save_mask, t0, opts, has_inf)
    sched_axes = 0 if schedule.dose_times.ndim == 2 else None
    ts_axis = 0 if save_ts.ndim == 2 else None
    fn = jax.vmap(
        lambda th, sc, st, sm: _solve_one(model, th, sc, st, sm, t0, opts, has_inf),
        in_axes=(0, sched_axes, ts_axis, ts_axis),
    )
    return fn(params, schedule, save_ts, save_mask)


def simulate(
    model: MechanisticModel,
    params: Any,
    schedule: Schedule | None,
    save_ts: Any,
    save_mask: Any = None,
    *,
    t0: float = 0.0,
    options: SolverOptions | None = None,
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
        options: `SolverOptions` (method, tolerances, step limit, adjoint).

    Returns:
        `Solution` with states at `save_ts`, per-patient `status` and step counts.

    Differentiable with respect to `params` (diffrax backend: `jax.grad` with the default
    adjoint, `jax.jacfwd` with `SolverOptions(adjoint="forward")`; ensemble backend:
    forward mode; kernel backend: `jax.jvp`, `jax.jacfwd` and `jax.grad` through
    sensitivities computed in the kernel); jit-compiled.
    """
    options = (options or SolverOptions()).resolved(model)
    params = jnp.asarray(params)
    if not jnp.issubdtype(params.dtype, jnp.floating):
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
    if isinstance(schedule.dose_rates, jax.core.Tracer):
        has_inf = True
    else:
        has_inf = bool(np.any(np.asarray(schedule.dose_mask)
                              & (np.asarray(schedule.dose_rates) > 0)))
    schedule = jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, schedule)
    n_dev = jax.local_device_count()
    if n is not None and n_dev > 1 and not isinstance(params, jax.core.Tracer):
        return _simulate_sharded(model, params, schedule, save_ts, save_mask,
                                 jnp.asarray(t0, dtype), options, has_inf, n_dev)
    return _simulate_compiled(model, params, schedule, save_ts, save_mask,
                              jnp.asarray(t0, dtype), options, has_inf)


def _simulate_sharded(model, params, schedule, save_ts, save_mask, t0, options, has_inf,
                      n_dev):
    """Split the patient axis over all local devices (padding N to a multiple of them with
    copies of the first patient); each device solves its own patients independently
    (`jax.shard_map`), and the pad is dropped."""
    from jax.sharding import Mesh

    n = params.shape[0]
    pad = (-n) % n_dev
    mesh = Mesh(np.array(jax.local_devices()), ("patients",))

    def padded(x):
        x = jnp.asarray(x)
        return jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)]) if pad else x

    sched_batched = schedule.dose_times.ndim == 2
    ts_batched = save_ts.ndim == 2
    if sched_batched:
        schedule = jax.tree.map(padded, schedule)
    if ts_batched:
        save_ts, save_mask = padded(save_ts), padded(save_mask)
    arrays, static = eqx.partition(model, eqx.is_array)
    sol = _sharded_compiled(arrays, static, padded(params), schedule, save_ts, save_mask, t0,
                            options, has_inf, mesh, sched_batched, ts_batched)
    return jax.tree.map(lambda x: x[:n], sol)


@eqx.filter_jit
def _sharded_compiled(arrays, static, params, schedule, save_ts, save_mask, t0, options,
                      has_inf, mesh, sched_batched, ts_batched):
    from jax.sharding import PartitionSpec

    rows, whole = PartitionSpec("patients"), PartitionSpec()
    sched_spec = jax.tree.map(lambda _: rows if sched_batched else whole, schedule)
    ts_spec = rows if ts_batched else whole
    array_spec = jax.tree.map(lambda _: whole, arrays)

    def local(arr, theta, sched, ts, mask, t_start):
        model = eqx.combine(arr, static)
        return _simulate_compiled(model, theta, sched, ts, mask, t_start, options, has_inf)

    fn = jax.shard_map(local, mesh=mesh,
                       in_specs=(array_spec, rows, sched_spec, ts_spec, ts_spec, whole),
                       out_specs=rows, check_vma=False)
    return fn(arrays, params, schedule, save_ts, save_mask, t0)
