"""The "diffrax" backend: `jax.vmap` of a per-patient piecewise `diffrax.diffeqsolve`; every
method (Kvaerno5 for stiff models included), forward and reverse mode, derivatives with
respect to anything (network weights, schedules). The reference backend and the CPU
default; the only module that calls `diffeqsolve`.

How a patient is solved. Its doses, infusion stops and input breakpoints (sorted once by
`prepare`, with each segment's infusion rates and inputs) and a "save mark" after every
`save_chunk`-th observation are merged into one event list; the solve runs piecewise
between consecutive events (`lax.scan` over segments, one `diffeqsolve` each), so that no
step straddles a discontinuity. A bolus is an exact jump of its target state at the start
of the segment that follows it. The solution is saved exactly at the patient's own
observation times; an observation at the same time as a dose sees the state before the
dose (a trough sample).
"""

from __future__ import annotations

from typing import ClassVar

import diffrax
import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp

from ..models.base import MechanisticModel, as_components
from ._core import Batch, Solution, Status, prepare
from .backend import Backend


class _Field(eqx.Module):
    model: MechanisticModel

    def __call__(self, t, y, args):
        p, rate, anchor, u_a, u_slope = args
        u = {name: u_a[c] + (t - anchor) * u_slope[c]
             for c, name in enumerate(self.model.input_names)}
        dy = self.model.vector_field(t, as_components(y, self.model.n_states), p, u)
        return jnp.stack([jnp.broadcast_to(d, ()) for d in dy]).astype(y.dtype) + rate


class Diffrax(Backend):
    """`vmap` of piecewise `diffeqsolve` (see the module docstring).

    Attributes:
        save_chunk: the solve is also split after every `save_chunk` observations, so
            that each `diffeqsolve` saves at most that many points (saving cost grows
            with the square of the points saved per solve under `vmap`).
    """

    name: ClassVar[str] = "diffrax"
    methods: ClassVar[tuple[str, ...]] = ("tsit5", "dopri5", "kvaerno5")
    differentiation: ClassVar[tuple[str, ...]] = ("reverse", "forward")
    default_differentiation: ClassVar[str] = "reverse"
    save_chunk: int = eqx.field(static=True, default=16)

    def __check_init__(self) -> None:
        if self.save_chunk < 1:
            raise ValueError(f"Diffrax.save_chunk must be >= 1, got {self.save_chunk}")

    def solve(self, model: MechanisticModel, batch: Batch, options) -> Solution:
        """Each patient by its own piecewise `diffeqsolve`, `vmap`ped over the batch."""
        prep = prepare(model, batch, obs_cap=options.controller.dtmax == "obs")
        save_mask = batch.batched_save_times()[1]
        dtype = batch.dtype
        n_in = len(model.input_names)
        n_seg = prep.q_t.shape[0] + 1
        if prep.u_a is None:
            zeros = jnp.zeros((n_seg, n_in, batch.n), dtype)
            anchor, u_a, u_slope = jnp.zeros((n_seg, batch.n), dtype), zeros, zeros
        else:
            anchor, u_a, u_slope = prep.anchor, prep.u_a, prep.u_slope
        rate = (prep.rate if prep.rate is not None
                else jnp.zeros((n_seg, model.n_states, batch.n), dtype))
        dtmax = prep.dtmax[0] if prep.dtmax is not None else jnp.zeros((batch.n,), dtype)
        per_patient = (prep.q_t, prep.q_jump, prep.q_state, rate, anchor, u_a, u_slope,
                       prep.t0[0], prep.t_end[0], dtmax)
        per_patient = jax.tree.map(lambda x: jnp.moveaxis(x, -1, 0), per_patient)
        return jax.vmap(lambda th, ts, mask, args: self._solve_one(
            model, th, ts, mask, *args, options))(batch.theta, prep.ts, save_mask, per_patient)

    def _solve_one(self, model, theta, ts, save_mask, q_t, q_jump, q_state, rate, anchor,
                   u_a, u_slope, t0, t_end, dtmax_obs, options) -> Solution:
        dtype = theta.dtype
        n_states = model.n_states
        p = model.param_dict(theta)
        y0 = jnp.stack([jnp.broadcast_to(jnp.asarray(c, dtype), ())
                        for c in model.initial_state(p)])
        # One event list: the other events (unused ones at t_end) and a "save mark" after
        # every `save_chunk`-th observation, which bounds the number of observations any
        # segment saves. Observations are ordered before events at the same time.
        m = ts.shape[0]
        q = q_t.shape[0]
        chunk = min(self.save_chunk, m)
        mark_idx = jnp.arange(chunk - 1, m - 1, chunk)
        dose_like = jnp.where(jnp.isfinite(q_t), q_t, t_end)
        ev_t = jnp.concatenate([dose_like, jnp.where(save_mask[mark_idx + 1], ts[mark_idx],
                                                     t_end)]).astype(dtype)
        ev_rank = jnp.concatenate([jnp.full((q,), 2.0 * m), 2.0 * mark_idx + 1.0])
        ev_jump = jnp.concatenate([q_jump, jnp.zeros(mark_idx.shape, dtype)])
        ev_state = jnp.concatenate([q_state, jnp.zeros(mark_idx.shape, jnp.int32)])
        is_q = jnp.concatenate([jnp.ones((q,), jnp.int32), jnp.zeros(mark_idx.shape, jnp.int32)])
        order = jnp.lexsort((ev_rank, ev_t))
        ev_t, ev_jump, ev_state, is_q = ev_t[order], ev_jump[order], ev_state[order], is_q[order]
        # the other events passed before segment k select its rates and inputs
        q_passed = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(is_q)])
        bounds = jnp.concatenate([t0[None], ev_t, t_end[None]])
        n_seg = ev_t.shape[0] + 1
        # Segment of observation j = the number of events ordered before it: the other
        # events strictly earlier, plus the save marks placed after observations i < j.
        n_marks = jnp.sum(save_mask[mark_idx + 1])
        marks_before = jnp.minimum(jnp.arange(m) // chunk, n_marks)
        seg_of_save = (jnp.searchsorted(dose_like, ts, side="left")
                       + marks_before).astype(jnp.int32)
        seg_sorted = jnp.where(save_mask, seg_of_save, n_seg)

        cap = options.controller.dtmax
        dtmax = (dtmax_obs if cap == "obs" else None if cap is None
                 else jnp.asarray(cap, dtype))
        term = diffrax.ODETerm(_Field(model))
        solver = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5,
                  "kvaerno5": diffrax.Kvaerno5}[options.method.name]()
        controller = diffrax.PIDController(rtol=options.controller.rtol,
                                           atol=options.controller.atol, dtmax=dtmax)
        mode = options.differentiation or self.default_differentiation
        adjoint = (diffrax.ForwardMode() if mode == "forward"
                   else diffrax.RecursiveCheckpointAdjoint())
        max_steps = options.max_steps

        def solve(y, ta, tb, window, dt_hint, j):
            args = (p, rate[j], anchor[j], u_a[j], u_slope[j])
            dt0 = jnp.where(jnp.isfinite(dt_hint), jnp.minimum(dt_hint, tb - ta), tb - ta)
            sol = diffrax.diffeqsolve(
                term, solver, ta, tb, dt0, y, args=args,
                saveat=diffrax.SaveAt(ts=jnp.clip(ts[window], ta, tb), t1=True),
                stepsize_controller=controller, max_steps=max_steps,
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

        def skip(y, ta, tb, window, dt_hint, j):
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
                eqxi.unvmap_all(ta == tb), skip, solve, y, ta, tb, window, dt_hint,
                q_passed[k])
            mine = (seg_sorted[window] == k)[:, None]
            # a patient that failed (before or in this segment) saves NaN where the solve
            # did not reach (diffrax fills those with inf), never a stale state
            ys = jnp.where((status == Status.OK) & jnp.isfinite(ys), ys, jnp.nan)
            out = out.at[window].set(jnp.where(mine, ys, out[window]))
            steps = steps + n.astype(jnp.int32)
            status = jnp.where(status == Status.OK, code, status)
            # the step limit is per patient, in total
            status = jnp.where((status == Status.OK) & (steps > max_steps),
                               Status.MAX_STEPS, status).astype(jnp.int32)
            return (y_end, status, out, steps, dt_hint), None

        init = (y0, jnp.int32(Status.OK), jnp.zeros((m, n_states), dtype), jnp.int32(0),
                jnp.asarray(jnp.inf, dtype))
        (_, status, out, steps, _), _ = jax.lax.scan(segment, init, jnp.arange(n_seg))
        out = jnp.where(save_mask[:, None], out, 0.0)
        return Solution(ts=ts, ys=out, mask=save_mask, status=status, num_steps=steps)
