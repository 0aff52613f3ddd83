"""The "ensemble" backend of `simulate`: one adaptive explicit Runge–Kutta loop over the
whole batch of patients, written batch-native rather than as `vmap(diffeqsolve)`.

Every patient carries its own time, step size and pointer into its own sorted event list
(observation times, doses, infusion stops and input breakpoints merged). Each iteration of
one `lax.while_loop` tries one step for every unfinished patient, clipped so that it lands
exactly on the patient's next event; a patient that lands on an observation writes its
state to that output row, one that lands on a bolus applies the jump. No step straddles a
discontinuity, nothing is interpolated, and every step is at most one observation
interval long (the check that keeps steady-state sensitivities resolved, DESIGN.md).

Under `vmap(diffeqsolve)` the per-step bookkeeping of saving is paid once per saved point
across the whole batch; here it is one scatter per iteration. The tableaus are diffrax's.
Forward-mode autodiff (`jax.jvp`, `jax.jacfwd`) works through the loop; reverse mode does
not (`lax.while_loop`), so `jax.grad` needs the diffrax backend.
"""

from __future__ import annotations

from typing import NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from .models.base import MechanisticModel

SAFETY, FACTOR_MIN, FACTOR_MAX = 0.9, 0.2, 10.0
EV_NONE, EV_OBS, EV_DOSE = 0, 1, 2


def _tableau(method: str) -> diffrax.ButcherTableau:
    return {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5}[method].tableau


SORT_FREE_MAX_OTHER = 64  # up to this many non-observation events: ranks by comparison


def _event_order(times, ok, rank, m: int):
    """The permutation `jnp.lexsort((rank, times, ~ok))` of one patient's events, whose
    first `m` are observations with nondecreasing times (rank 2i) and the rest other
    events (rank 2m): valid events first, by time, observations before other events at
    equal times, ties otherwise in input order.

    With few non-observation events (the usual case: doses and a few input breakpoints)
    each event's position is counted directly, O(m·q + q²) elementwise comparisons and one
    scatter, instead of sorting all m + q events: on a large cohort the sort would cost
    more than the solve. Many breakpoints fall back to the sort.
    """
    q = times.shape[0] - m
    if q > SORT_FREE_MAX_OTHER:
        return jnp.lexsort((rank, times, ~ok))
    t_o, ok_o, t_q, ok_q = times[:m], ok[:m], times[m:], ok[m:]
    i32 = jnp.int32
    n_vo, n_vq = jnp.sum(ok_o, dtype=i32), jnp.sum(ok_q, dtype=i32)
    n_io = m - n_vo
    before_vo = jnp.cumsum(ok_o, dtype=i32) - ok_o  # valid observations before, by index
    before_io = jnp.cumsum(~ok_o, dtype=i32) - ~ok_o
    before_iq = jnp.cumsum(~ok_q, dtype=i32) - ~ok_q
    # an observation follows the valid other events strictly earlier than it
    q_earlier = jnp.sum(ok_q[None, :] & (t_q[None, :] < t_o[:, None]), axis=1, dtype=i32)
    pos_o = jnp.where(ok_o, before_vo + q_earlier, n_vo + n_vq + before_io)
    # an other event follows the valid observations at or before its time and the valid
    # other events earlier than it (or at its time and earlier in the input)
    o_upto = jnp.sum(ok_o[None, :] & (t_o[None, :] <= t_q[:, None]), axis=1, dtype=i32)
    idx = jnp.arange(q)
    q_before = jnp.sum(ok_q[None, :] & ((t_q[None, :] < t_q[:, None])
                                        | ((t_q[None, :] == t_q[:, None])
                                           & (idx[None, :] < idx[:, None]))), axis=1, dtype=i32)
    pos_q = jnp.where(ok_q, o_upto + q_before, n_vo + n_vq + n_io + before_iq)
    pos = jnp.concatenate([pos_o, pos_q])
    return jnp.zeros_like(pos).at[pos].set(jnp.arange(m + q, dtype=i32), unique_indices=True)


def save_times(save_ts, save_mask, t0, dtype):
    """Save times as solved, over the last axis: padded slots take the running maximum
    (the sequence stays sorted), none before t0; and the last of them, t_end."""
    ts = jax.lax.cummax(jnp.where(save_mask, save_ts, t0).astype(dtype), axis=save_ts.ndim - 1)
    ts = jnp.maximum(ts, t0)
    return ts, jnp.maximum(ts[..., -1], t0)


class DoseEvents(NamedTuple):
    """A schedule's doses and its events besides observations, over the last axis (any
    leading batch axes). Per dose (D): target state and scale, whether it is an infusion,
    and its duration. Per event (Q = D doses, then D infusion stops when `has_inf`, then
    the input breakpoints): time (unclipped), whether it is real, kind (EV_DOSE for a
    bolus, else EV_NONE), the jump it adds and the state it enters."""

    d_state: jax.Array
    d_scale: jax.Array
    is_inf: jax.Array
    dur: jax.Array
    times: jax.Array
    ok: jax.Array
    kind: jax.Array
    jump: jax.Array
    state: jax.Array


def dose_events(model: MechanisticModel, sched, has_inf: bool, dtype) -> DoseEvents:
    """The `DoseEvents` of a schedule (one patient's or a batch's)."""
    from .simulate import _dose_routing

    tgt_state, tgt_scale = _dose_routing(model)
    d_state = jnp.asarray(tgt_state)[sched.dose_targets]
    d_scale = jnp.asarray(tgt_scale, dtype)[sched.dose_targets]
    is_inf = sched.dose_mask & (sched.dose_rates > 0)
    is_bolus = sched.dose_mask & ~is_inf
    dur = jnp.where(is_inf, sched.dose_amounts / jnp.where(is_inf, sched.dose_rates, 1), 0)
    lead, n_k = sched.dose_times.shape[:-1], sched.input_times.shape[-1]
    n_rest = (dur.shape[-1] if has_inf else 0) + n_k
    stops_t = [sched.dose_times + dur] if has_inf else []
    stops_ok = [is_inf] if has_inf else []
    times = jnp.concatenate([x.astype(dtype) for x in
                             [sched.dose_times, *stops_t, sched.input_times]], axis=-1)
    ok = jnp.concatenate([sched.dose_mask, *stops_ok, sched.input_mask], axis=-1)
    kind = jnp.concatenate([jnp.where(is_bolus, EV_DOSE, EV_NONE),
                            jnp.full(lead + (n_rest,), EV_NONE)], axis=-1).astype(jnp.int32)
    jump = jnp.concatenate([jnp.where(is_bolus, sched.dose_amounts * d_scale, 0).astype(dtype),
                            jnp.zeros(lead + (n_rest,), dtype)], axis=-1)
    state = jnp.concatenate([d_state.astype(jnp.int32),
                             jnp.zeros(lead + (n_rest,), jnp.int32)], axis=-1)
    return DoseEvents(d_state, d_scale, is_inf, dur, times, ok, kind, jump, state)


def _events_one(save_ts, save_mask, t0, t_end, ev: DoseEvents, dtype):
    """One patient's merged, sorted event list: real events first, by time, observations
    before other events at equal times; also returns the number of real events."""
    m, q = save_ts.shape[0], ev.times.shape[0]
    times = jnp.concatenate([save_ts.astype(dtype), ev.times])
    ok = jnp.concatenate([save_mask, ev.ok])
    kind = jnp.where(ok, jnp.concatenate([jnp.full((m,), EV_OBS, jnp.int32), ev.kind]),
                     EV_NONE)
    times = jnp.where(ok, jnp.clip(times, t0, t_end), t_end)
    rank = jnp.concatenate([2 * jnp.arange(m), jnp.full((q,), 2 * m)])
    obs_idx = jnp.concatenate([jnp.arange(m), jnp.zeros((q,), jnp.int32)])
    jump = jnp.concatenate([jnp.zeros((m,), dtype), ev.jump])
    state = jnp.concatenate([jnp.zeros((m,), jnp.int32), ev.state])
    order = _event_order(times, ok, rank, m)
    return (times[order], kind[order], obs_idx[order].astype(jnp.int32), jump[order],
            state[order], jnp.sum(ok))


def merged_events(model: MechanisticModel, sched, save_ts, save_mask, t0, has_inf: bool,
                  dtype):
    """A batch's save times as solved and each patient's merged event list.

    Returns (ts (N, M), d_state, d_scale (N, D): each dose's target state and scale,
    then `_events_one`'s (times, kind, obs slot, jump, jump state, number real), (N, E)).
    """
    ts, t_end = save_times(save_ts, save_mask, t0, dtype)
    ev = dose_events(model, sched, has_inf, dtype)
    events = jax.vmap(lambda st, sm, te, e: _events_one(st, sm, t0, te, e, dtype))(
        ts, save_mask, t_end, ev)
    return (ts, ev.d_state, ev.d_scale, *events)


def solve_ensemble(
    model: MechanisticModel,
    theta: jax.Array,
    sched,
    save_ts: jax.Array,
    save_mask: jax.Array,
    t0: jax.Array,
    opts,
    has_inf: bool,
):
    """Batch-native solve. `theta` (N, P); `sched`, `save_ts`, `save_mask` batched (N, ...).

    Returns (ts (N, M), ys (N, M, S), status (N,), num_steps (N,)) with the same
    conventions as the diffrax backend.
    """
    from .simulate import Status

    dtype = theta.dtype
    n, s = theta.shape[0], model.n_states
    m = save_ts.shape[1]
    rows = jnp.arange(n)
    p = model.param_dict(theta)
    # States are kept component-major, (S, N): each component is a contiguous vector of
    # patients, and reductions over components are elementwise across patients.
    y0 = jnp.stack([jnp.broadcast_to(jnp.asarray(c, dtype), (n,))
                    for c in model.initial_state(p)], axis=0)
    ts, d_state, d_scale, ev_t, ev_kind, ev_obs, ev_jump, ev_state, n_real = merged_events(
        model, sched, save_ts, save_mask, t0, has_inf, dtype)
    t_end = ts[:, -1]  # >= t0: ts is clipped below at t0
    n_ev = ev_t.shape[1]

    is_inf = sched.dose_mask & (sched.dose_rates > 0)
    inf_stop = sched.dose_times + jnp.where(
        is_inf, sched.dose_amounts / jnp.where(is_inf, sched.dose_rates, 1), 0)
    inf_rate = jnp.where(is_inf, sched.dose_rates * d_scale, 0).astype(dtype)
    onehot = jax.nn.one_hot(d_state, s, dtype=dtype)  # (N, D, S)
    n_inputs, n_k = len(model.inputs), sched.input_times.shape[1]
    linear = sched.interpolation == "linear"

    def inputs_at(tq):
        if n_inputs == 0:
            return {}
        if n_k == 0:
            return {name: jnp.zeros((n,), dtype) for name in model.input_names}
        if linear:
            last = jnp.maximum(jnp.sum(sched.input_mask, axis=1) - 1, 0)
            it = jnp.where(sched.input_mask, sched.input_times, sched.input_times[rows, last][:, None])
            iv = jnp.where(sched.input_mask[..., None], sched.input_values,
                           sched.input_values[rows, last][:, None, :])
            vals = jax.vmap(lambda t_, x_, v_: jnp.stack(
                [jnp.interp(t_, x_, v_[:, c]) for c in range(n_inputs)]))(tq, it, iv)
        else:
            started = sched.input_mask & (sched.input_times <= tq[:, None])
            i = jnp.maximum(jnp.sum(started, axis=1) - 1, 0)
            vals = jnp.where(jnp.any(started, axis=1)[:, None], sched.input_values[rows, i], 0)
        return {name: vals[:, c].astype(dtype) for c, name in enumerate(model.input_names)}

    def infusion_at(tq):
        if not has_inf:
            return 0.0
        active = is_inf & (sched.dose_times <= tq[:, None]) & (tq[:, None] < inf_stop)
        return jnp.einsum("nd,nds->sn", jnp.where(active, inf_rate, 0), onehot)

    def field(tq, y, u, infusion):
        dy = model.vector_field(tq, tuple(y[i] for i in range(s)), p, u)
        return jnp.stack([jnp.broadcast_to(d, (n,)) for d in dy], axis=0).astype(dtype) + infusion

    tab = _tableau(opts.method)
    a_lower = [np.asarray(a) for a in tab.a_lower]
    c_nodes = np.asarray(tab.c)
    b_sol, b_err = np.asarray(tab.b_sol), np.asarray(tab.b_error)
    err_exp = -1.0 / 5.0

    def rk_step(tq, y, h):
        mid = tq + 0.5 * h
        u, infusion = (inputs_at(mid), infusion_at(mid))
        ks = [field(tq, y, inputs_at(tq) if linear else u, infusion)]
        for j, a in enumerate(a_lower):
            yj = y + h * sum(float(a[i]) * ks[i] for i in range(len(a)) if a[i] != 0)
            tj = tq + float(c_nodes[j]) * h
            ks.append(field(tj, yj, inputs_at(tj) if linear else u, infusion))
        y_new = y + h * sum(float(b_sol[i]) * ks[i] for i in range(len(ks)) if b_sol[i] != 0)
        err = h * sum(float(b_err[i]) * ks[i] for i in range(len(ks)) if b_err[i] != 0)
        return y_new, err

    # Initial step: 1% of |y|/|f| in the scaled norm (whole horizon if at steady state).
    y0_ng = jax.lax.stop_gradient(y0)
    sc0 = opts.atol + opts.rtol * jnp.abs(y0_ng)
    f0 = jax.lax.stop_gradient(field(jnp.full((n,), t0, dtype), y0_ng,
                                     inputs_at(jnp.full((n,), t0, dtype)),
                                     infusion_at(jnp.full((n,), t0, dtype))))
    d0 = jnp.sqrt(jnp.mean((y0_ng / sc0) ** 2, axis=0))
    d1 = jnp.sqrt(jnp.mean((f0 / sc0) ** 2, axis=0))
    span = jnp.maximum(t_end - t0, jnp.finfo(dtype).tiny)
    h0 = jnp.where(d1 > 1e-5, 0.01 * jnp.maximum(d0, 1e-5) / d1, span)
    h0 = jnp.clip(h0, 1e-8 * span, span)
    if opts.dtmax is not None and opts.dtmax != "obs":
        h0 = jnp.minimum(h0, opts.dtmax)

    def active_of(ptr, status):
        return (ptr < n_real) & (status == Status.OK)

    def cond(carry):
        t, y, h, ptr, out, status, steps = carry
        return jnp.any(active_of(ptr, status))

    def body(carry):
        t, y, h, ptr, out, status, steps = carry
        active = active_of(ptr, status)
        p_safe = jnp.minimum(ptr, n_ev - 1)
        t_ev = ev_t[rows, p_safe]
        gap = t_ev - t
        stepping = active & (gap > 0)
        clipped = h >= gap
        h_try = jnp.where(stepping, jnp.minimum(h, gap), 0.0)
        y_new, err = rk_step(t, y, jnp.where(stepping, h_try, 1.0))
        scale = opts.atol + opts.rtol * jnp.maximum(jnp.abs(y), jnp.abs(y_new))
        # Step-size control is not differentiated: sensitivities are those of the
        # Runge-Kutta map at the chosen steps.
        en = jax.lax.stop_gradient(jnp.sqrt(jnp.mean((err / scale) ** 2, axis=0)))
        finite = jnp.all(jnp.isfinite(y_new), axis=0) & jnp.isfinite(en)
        en = jnp.where(finite, en, jnp.inf)
        accept = stepping & (en <= 1.0)
        factor = jnp.clip(SAFETY * jnp.where(en > 0, en, 1e-10) ** err_exp,
                          FACTOR_MIN, FACTOR_MAX)
        factor = jnp.where(finite, factor, FACTOR_MIN)
        h_next = h_try * factor
        h_next = jnp.where(accept & clipped, jnp.maximum(h_next, h), h_next)
        if opts.dtmax is not None and opts.dtmax != "obs":
            h_next = jnp.minimum(h_next, opts.dtmax)
        h = jnp.where(stepping, h_next, h)
        t = jnp.where(accept, jnp.where(clipped, t_ev, t + h_try), t)
        y = jnp.where(accept[None], y_new, y)
        steps = steps + stepping.astype(jnp.int32)
        landed = active & (t >= t_ev)
        kind = ev_kind[rows, p_safe]
        write = landed & (kind == EV_OBS)
        j = ev_obs[rows, p_safe]
        y_rows = y.T
        out = out.at[rows, j].set(jnp.where(write[:, None], y_rows, out[rows, j]),
                                  unique_indices=True, indices_are_sorted=True)
        jump = jnp.where(landed & (kind == EV_DOSE), ev_jump[rows, p_safe], 0)
        y = y.at[ev_state[rows, p_safe], rows].add(jump)
        ptr = ptr + landed.astype(jnp.int32)
        tiny = stepping & ~accept & (h < 1e-12 * jnp.maximum(jnp.abs(t), 1.0))
        status = jnp.where(active & (steps >= opts.max_steps), Status.MAX_STEPS, status)
        status = jnp.where(tiny, jnp.where(finite, Status.SOLVER_FAILED, Status.NONFINITE),
                           status).astype(jnp.int32)
        return t, y, h, ptr, out, status, steps

    init = (jnp.full((n,), t0, dtype), y0, h0.astype(dtype), jnp.zeros((n,), jnp.int32),
            jnp.zeros((n, m, s), dtype), jnp.zeros((n,), jnp.int32), jnp.zeros((n,), jnp.int32))
    t, y, h, ptr, out, status, steps = jax.lax.while_loop(cond, body, init)
    return ts, out, status, steps
