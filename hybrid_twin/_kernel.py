"""The "kernel" backend of `simulate`: a whole cohort's solve in one Pallas kernel.

The model's own vector field (mechanistic part and learned terms) is traced into one
`pallas_call`. Patients lie along the last axis; each program takes a block of `B`
patients and runs the whole time loop inside the kernel, with states, parameters and
sensitivities as `(B,)` vectors (one lane per patient) and the network weights loaded once
per program.

Events. Each patient's save times are in order already; its other events (boluses,
infusion starts and stops, input breakpoints) are few and are sorted outside the kernel,
with the infusion rates and inputs of each segment between them (`prepare`: nothing of
size events x patients is built there). The kernel loops over the save slots: in
iteration s every lane integrates to its own s-th save time (an inner loop of Runge–Kutta
steps, each lane with its own step size, finished lanes masked), stopping on the way at
each of its own doses and rate or input changes before that time to apply it, and then
all lanes write output row s together (coalesced stores). The ordering is the other
backends' (an observation at a dose time sees the state before the dose); no step
straddles a discontinuity, and infusion rates and inputs are constant (or, with linear
interpolation, linear) over each step.

Methods: fixed-step "rk4" (`SolverOptions.dt0`, steps shortened to land on events) and the
adaptive pairs "tsit5" and "dopri5" (diffrax's tableaus) with the same step-size control,
tolerances, step limit (per patient, in total) and `Status` codes as the ensemble backend.

Forward sensitivities. With K parameter directions, d state / d direction is integrated
with the state (one `jax.jvp` of the vector field per direction per stage) and is part of
the adaptive error norm, which keeps steady-state sensitivities resolved (DESIGN.md,
numerical pitfalls). They serve two ways: `normal_equations` accumulates each patient's
weighted JᵀJ, Jᵀr and residual sum of squares at its observations inside the kernel (the
Jacobian is never stored), which Levenberg–Marquardt calibration uses; and `solve_kernel`
is a `jax.custom_jvp` in the parameters, so `jax.jacfwd` and `jax.grad` of `simulate` work
(derivatives with respect to network weights, schedules or times are refused).

On CPU the kernel runs in Pallas interpret mode (how CI tests it); on GPU it is lowered
through Triton.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ._ensemble import (
    FACTOR_MAX,
    FACTOR_MIN,
    SAFETY,
    _event_order,
    dose_events,
    save_times,
)
from .hybrid import lanes_mode
from .models.base import MechanisticModel

KERNEL_METHODS = ("rk4", "tsit5", "dopri5")


def _tableau(method: str):
    """(c, a_lower, b_sol, b_error or None) of an explicit Runge–Kutta method."""
    if method == "rk4":
        return (np.array([0.5, 0.5, 1.0]),
                [np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])],
                np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]), None)
    tab = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5}[method].tableau
    return (np.asarray(tab.c), [np.asarray(a) for a in tab.a_lower], np.asarray(tab.b_sol),
            np.asarray(tab.b_error))


def interpret_default() -> bool:
    """Interpret mode unless the default JAX backend is a GPU."""
    return jax.default_backend() != "gpu"


class Prepared(eqx.Module):
    """A batch's save times and its other events, patients on the last axis.

    The kernel walks the two lists itself: save times are in order already, and the
    other events (boluses, infusion starts and stops, input breakpoints; Q of them) are
    few, so only they are sorted here, per patient, and nothing of size
    (events x patients) beyond the save times is built outside the kernel.

    ts (N, M): save times as solved (nondecreasing, within [t0, t_end]); ts_lanes (M, N):
    the same, patients last, or (M,) when all patients share them; t0, t_end (1, N): start and end. q_t (Q, N): the other
    events' times, sorted (observations come first at equal times), +inf for unused
    slots; q_jump, q_state (Q, N): the bolus each adds (0 for the others) and the state it
    enters. Segment k runs from other event k - 1 (t0 for k = 0) to other event k;
    rate (Q + 1, S, N): infusion rates on it (None without infusions); u_a, u_slope
    (Q + 1, C, N): inputs on it, u(t) = u_a + (t - anchor) u_slope, anchor (Q + 1, N) its
    start (None when the model has no inputs or the schedule no input breakpoints: inputs
    are then zero).
    """

    ts: jax.Array
    ts_lanes: jax.Array
    t0: jax.Array
    t_end: jax.Array
    q_t: jax.Array
    q_jump: jax.Array
    q_state: jax.Array
    rate: jax.Array | None
    anchor: jax.Array | None
    u_a: jax.Array | None
    u_slope: jax.Array | None


def prepare(model: MechanisticModel, sched, save_ts, save_mask, t0, has_inf: bool,
            dtype) -> Prepared:
    """Save times and the sorted other events with per-segment infusion rates and inputs.

    The event conventions are the other backends' (`_ensemble._events_one`): an
    observation at a dose time sees the state before the dose; events are clipped to
    [t0, last save time]."""
    n = sched.dose_times.shape[0]
    m = save_ts.shape[-1]
    s = model.n_states
    ts, t_end = save_times(save_ts, save_mask, t0, dtype)
    t_end = jnp.broadcast_to(t_end, (n,))
    ev = dose_events(model, sched, has_inf, dtype)
    d_state, d_scale, is_inf, dur = ev.d_state, ev.d_scale, ev.is_inf, ev.dur
    times, ok, jump, state = ev.times, ev.ok, ev.jump, ev.state
    n_k = sched.input_times.shape[1]
    if times.shape[1] == 0:  # nothing but observations: one unused slot
        times, ok = jnp.zeros((n, 1), dtype), jnp.zeros((n, 1), bool)
        jump, state = jnp.zeros((n, 1), dtype), jnp.zeros((n, 1), jnp.int32)
    q = times.shape[1]
    times = jnp.where(ok, jnp.clip(times, t0, t_end[:, None]), jnp.inf)
    order = jax.vmap(lambda t_, ok_: _event_order(t_, ok_, jnp.zeros((q,), jnp.int32), 0))(
        times, ok)
    q_t = jnp.take_along_axis(times, order, axis=1)
    q_jump = jnp.take_along_axis(jump, order, axis=1)
    q_state = jnp.take_along_axis(state, order, axis=1)
    # segment k: from anchor[k] (t0, then each other event) to seg_end[k]
    anchor = jnp.concatenate([jnp.full((n, 1), t0, dtype), q_t], axis=1)
    anchor = jnp.where(jnp.isfinite(anchor), anchor, t_end[:, None])  # never reached
    seg_end = jnp.concatenate([q_t, jnp.full((n, 1), jnp.inf, dtype)], axis=1)
    rate = None
    if has_inf:
        stop = sched.dose_times + dur
        active = (is_inf[:, None, :] & (sched.dose_times[:, None, :] <= anchor[..., None])
                  & (anchor[..., None] < stop[:, None, :]))
        r = jnp.where(active, (sched.dose_rates * d_scale)[:, None, :], 0).astype(dtype)
        rate = jnp.einsum("nkd,nds->nks", r, jax.nn.one_hot(d_state, s, dtype=dtype))
    u_a = u_slope = None
    n_in = len(model.inputs)
    if n_in and n_k:
        if sched.interpolation == "linear":
            rows = jnp.arange(n)
            last = jnp.maximum(jnp.sum(sched.input_mask, axis=1) - 1, 0)
            it = jnp.where(sched.input_mask, sched.input_times,
                           sched.input_times[rows, last][:, None])
            iv = jnp.where(sched.input_mask[..., None], sched.input_values,
                           sched.input_values[rows, last][:, None, :])

            def interp(tq):
                return jax.vmap(lambda t_, x_, v_: jnp.stack(
                    [jnp.interp(t_, x_, v_[:, c]) for c in range(n_in)], -1))(tq, it, iv)

            finite_end = jnp.isfinite(seg_end) & (seg_end > anchor)
            u_a = interp(anchor)
            u_b = interp(jnp.where(finite_end, seg_end, anchor))
            width = jnp.where(finite_end, seg_end - anchor, 1.0)[..., None]
            u_slope = jnp.where(finite_end[..., None], (u_b - u_a) / width, 0)
        else:
            started = sched.input_mask[:, None, :] & (sched.input_times[:, None, :]
                                                      <= anchor[..., None])
            i = jnp.maximum(jnp.sum(started, axis=2) - 1, 0)
            vals = jnp.take_along_axis(sched.input_values, i[..., None], axis=1)
            u_a = jnp.where(jnp.any(started, axis=2)[..., None], vals, 0)
            u_slope = jnp.zeros_like(u_a)
        u_a, u_slope = u_a.astype(dtype), u_slope.astype(dtype)

    def last(x):
        return None if x is None else jnp.moveaxis(x, 0, -1)

    return Prepared(ts=jnp.broadcast_to(ts, (n, m)), ts_lanes=ts.T,
                    t0=jnp.full((1, n), t0, dtype),
                    t_end=t_end[None, :], q_t=q_t.T, q_jump=q_jump.T, q_state=q_state.T,
                    rate=last(rate), anchor=None if u_a is None else anchor.T,
                    u_a=last(u_a), u_slope=last(u_slope))


class AxisDirections(NamedTuple):
    """Sensitivity directions along single parameters: direction k moves parameter
    `index[k]` by `scale[k]` (N,) per patient (d theta / d z of an elementwise transform,
    or unit vectors). The kernel then differentiates along that one parameter only,
    instead of along a dense (P,) tangent: fewer loads, registers and operations."""

    index: tuple[int, ...]
    scale: jax.Array  # (K, N)


class _ScalarView:
    """A network weight inside the kernel: its scalars, loaded from the flattened ref once,
    indexed like the array (w[j, f], b[j]); `.shape` as the array's."""

    def __init__(self, ref, shape):
        self.shape = tuple(shape)
        size = int(np.prod(shape)) if shape else 1
        self._values = [ref[i] for i in range(size)]

    def __getitem__(self, idx):
        idx = idx if isinstance(idx, tuple) else (idx,)
        flat = int(np.ravel_multi_index(tuple(int(i) for i in idx), self.shape)) if self.shape else 0
        return self._values[flat]


def _pick(values, index, n_choices):
    """Select values[index] lane by lane from a list of (B,) vectors."""
    out = values[0]
    for j in range(1, n_choices):
        out = jnp.where(index == j, values[j], out)
    return out


def run_kernel(model: MechanisticModel, theta: jax.Array, prep: Prepared, opts, *,
               directions: jax.Array | AxisDirections | None = None,
               data: tuple | None = None,
               want_states: bool = True, want_sens: bool = False,
               block: int | None = None, interpret: bool | None = None,
               num_warps: int = 4, save_states: tuple[int, ...] | None = None
               ) -> dict[str, Any]:
    """Run the fused solve.

    Args:
        model: the (hybrid) model; its array leaves are kernel inputs.
        theta: (N, P) natural-unit parameters.
        prep: `prepare(...)` of the same batch.
        opts: `SolverOptions` (method rk4 | tsit5 | dopri5, rtol, atol, dt0, dtmax,
            max_steps).
        directions: (K, N, P) parameter tangents d theta / d direction (e.g. d theta /
            d z of free parameters), or `AxisDirections` (each along one parameter);
            None: no sensitivities.
        data: (y (M, N), weight (M, N), observable index (M, N)) per save slot, weight 0
            where nothing is fitted; with `directions`, JᵀJ, Jᵀr and the cost are accumulated
            for r = (y - f) * weight, J = dr / d direction.
        want_states, want_sens: return the states (N, M, S) / sensitivities (N, M, K, S)
            at the save slots (rows of masked save slots are unspecified).
        save_states: indices of the states written (default all; e.g. (0,) for glucose
            only, which cuts the kernel's output traffic).
        block: patients per program (default 128 on GPU, the whole batch rounded up to a
            power of two, at most 1024, in interpret mode).

    Returns a dict with "status", "steps" (N,) and as requested "states", "sens", "H"
    (N, K, K), "g" (N, K), "cost" (N,).
    """
    interpret = interpret_default() if interpret is None else interpret
    dtype = theta.dtype
    n = theta.shape[0]
    s_dim = model.n_states
    m_dim = prep.ts.shape[1]
    q_dim = prep.q_t.shape[0]
    axis_dirs = isinstance(directions, AxisDirections)
    k_dim = 0 if directions is None else (
        len(directions.index) if axis_dirs else directions.shape[0])
    n_obs_kinds = len(model.observables)
    block = block or getattr(opts, "kernel_block", None)
    num_warps = getattr(opts, "kernel_warps", None) or num_warps
    if block is None:
        block = 128 if not interpret else min(1024, max(8, 1 << (n - 1).bit_length()))
    if block & (block - 1):
        raise ValueError(f"kernel block must be a power of two, got {block}")
    n_pad = -(-n // block) * block
    method = opts.method
    c_nodes, a_lower, b_sol, b_err = _tableau(method)
    adaptive = b_err is not None
    # first same as last (Tsit5, Dopri5): a step's last stage is f at its end, the next
    # step's first stage; recomputed only after a dose or a change of rates or inputs
    fsal = (adaptive and float(c_nodes[-1]) == 1.0 and float(b_sol[-1]) == 0.0
            and np.array_equal(a_lower[-1], b_sol[:-1]))
    if not adaptive and not opts.dt0:
        raise ValueError("SolverOptions: method 'rk4' needs a step size dt0 (model time unit)")
    dtmax = opts.dtmax if isinstance(opts.dtmax, (int, float)) else None
    input_names = model.input_names
    n_in = len(input_names) if prep.u_a is not None else 0  # else inputs are zero
    has_rate = prep.rate is not None
    param_names = model.param_names
    observables = model.observables
    arrays, static = eqx.partition(model, eqx.is_array)
    leaves, treedef = jax.tree.flatten(arrays)

    def pad(x):
        x = jnp.asarray(x)
        if n_pad == n:
            return x
        widths = [(0, 0)] * (x.ndim - 1) + [(0, n_pad - n)]
        return jnp.pad(x, widths, mode="edge")

    ins, specs = [], []

    def add(x, lanes=True):
        x = pad(x) if lanes else jnp.asarray(x)
        shape = x.shape[:-1] + (block,) if lanes else x.shape
        nd = x.ndim
        if lanes:
            specs.append(pl.BlockSpec(shape, lambda i, nd=nd: (0,) * (nd - 1) + (i,)))
        else:
            specs.append(pl.BlockSpec(shape, lambda i, nd=nd: (0,) * nd))
        ins.append(x)

    add(theta.T)
    shared_ts = prep.ts_lanes.ndim == 1  # one (M,) row for every program
    add(prep.ts_lanes, lanes=not shared_ts)
    for x in (prep.t0, prep.t_end, prep.q_t, prep.q_jump, prep.q_state):
        add(x)
    if has_rate:
        add(prep.rate)
    if n_in:
        add(prep.anchor)
        add(prep.u_a)
        add(prep.u_slope)
    if k_dim:
        add(directions.scale if axis_dirs else jnp.moveaxis(directions, 1, -1))  # (K[, P], N)
    if data is not None:
        for x in data:
            add(x)
    for leaf in leaves:
        add(jnp.reshape(jnp.asarray(leaf, dtype), (-1,)), lanes=False)

    outs = []

    def out(shape, dt):
        nd = len(shape)
        outs.append((jax.ShapeDtypeStruct(shape + (n_pad,), dt),
                     pl.BlockSpec(shape + (block,), lambda i: (0,) * nd + (i,))))

    saved = tuple(range(s_dim)) if save_states is None else tuple(save_states)
    if want_states:
        out((m_dim, len(saved)), dtype)
    if want_sens:
        out((m_dim, k_dim * s_dim), dtype)
    # JᵀJ is symmetric: its upper triangle (a <= b) is accumulated, fewer registers
    kk = max(k_dim, 1)
    tri = [(a, b) for a in range(kk) for b in range(a, kk)]
    if data is not None:
        out((len(tri),), dtype)
        out((max(k_dim, 1),), dtype)
        out((1,), dtype)
    out((1,), jnp.int32)
    out((1,), jnp.int32)

    n_y = s_dim * (1 + k_dim)

    def kernel(*refs):
        with lanes_mode():
            traced_kernel(*refs)

    def traced_kernel(*refs):
        it = iter(refs)
        theta_ref, ts_ref, t0_ref, tend_ref = next(it), next(it), next(it), next(it)
        qt_ref, qjump_ref, qstate_ref = next(it), next(it), next(it)
        rate_ref = next(it) if has_rate else None
        anchor_ref, ua_ref, us_ref = (next(it), next(it), next(it)) if n_in else (None,) * 3
        dir_ref = next(it) if k_dim else None
        yobs_ref, w_ref, kobs_ref = (next(it), next(it), next(it)) if data is not None else (
            None, None, None)
        w_refs = [next(it) for _ in leaves]
        states_ref = next(it) if want_states else None
        sens_ref = next(it) if want_sens else None
        h_ref, g_ref, cost_ref = (next(it), next(it), next(it)) if data is not None else (
            None, None, None)
        status_ref, steps_ref = next(it), next(it)

        # network weights: every scalar loaded once per program (no matrix shapes)
        weights = [_ScalarView(r, leaf.shape) for r, leaf in zip(w_refs, leaves)]
        m = eqx.combine(jax.tree.unflatten(treedef, weights), static)
        # every load and store is one (B,) row: Triton needs power-of-two shapes
        p = {name: theta_ref[i] for i, name in enumerate(param_names)}
        if axis_dirs:
            dps = [(param_names[i], dir_ref[k]) for k, i in enumerate(directions.index)]
        else:
            dps = [{name: dir_ref[k, i] for i, name in enumerate(param_names)}
                   for k in range(k_dim)]

        def jvp_dir(fn, y, sk, k):
            """d fn(y, p) along state tangent sk and parameter direction k."""
            if axis_dirs:
                name, scale = dps[k]
                return jax.jvp(lambda yy, pk: fn(yy, {**p, name: pk}), (y, p[name]),
                               (sk, scale))[1]
            return jax.jvp(fn, (y, p), (sk, dps[k]))[1]

        def lanes(c):
            return tuple(jnp.broadcast_to(jnp.asarray(x, dtype), (block,)) for x in c)

        lane = jnp.arange(block, dtype=jnp.int32)
        zero_inputs = {name: jnp.zeros((block,), dtype) for name in input_names}

        y0 = lanes(m.initial_state(p))
        s0 = [lanes(jvp_dir(lambda _, pp: m.initial_state(pp), (), (), k))
              for k in range(k_dim)]

        def field(t, flat, u, rate):
            y = tuple(flat[:s_dim])
            dy = lanes(m.vector_field(t, y, p, u))
            dy = [d + r for d, r in zip(dy, rate)]
            res = list(dy)
            for k in range(k_dim):
                sk = tuple(flat[s_dim * (k + 1): s_dim * (k + 2)])
                ds = jvp_dir(lambda yy, pp: m.vector_field(t, yy, pp, u), y, sk, k)
                res.extend(lanes(ds))
            return res

        def rk_step(t, flat, h, u_at, rate, k1=None):
            ks = [field(t, flat, u_at(t), rate) if k1 is None else k1]
            for j, a in enumerate(a_lower):
                yj = [flat[i] + h * sum(float(a[q]) * ks[q][i] for q in range(len(a))
                                        if a[q] != 0) for i in range(n_y)]
                tj = t + float(c_nodes[j]) * h
                ks.append(field(tj, yj, u_at(tj), rate))
            new = [flat[i] + h * sum(float(b_sol[q]) * ks[q][i] for q in range(len(ks))
                                     if b_sol[q] != 0) for i in range(n_y)]
            err = None
            if adaptive:
                err = [h * sum(float(b_err[q]) * ks[q][i] for q in range(len(ks))
                               if b_err[q] != 0) for i in range(n_y)]
            return new, err, ks[-1]

        t_start = t0_ref[0]
        zero = jnp.zeros_like(t_start)
        flat0 = list(y0) + [x for sk in s0 for x in sk]
        if adaptive:
            # initial step: 1% of |y|/|f| in the scaled norm (whole span at steady state)
            u0 = ({name: ua_ref[0, c] for c, name in enumerate(input_names)} if n_in
                  else zero_inputs)
            r0 = [rate_ref[0, i] for i in range(s_dim)] if has_rate else [zero] * s_dim
            f0 = [a + b for a, b in zip(lanes(m.vector_field(t_start, y0, p, u0)), r0)]
            sc0 = [opts.atol + opts.rtol * jnp.abs(v) for v in y0]
            d0 = jnp.sqrt(sum((v / s) ** 2 for v, s in zip(y0, sc0)) / s_dim)
            d1 = jnp.sqrt(sum((v / s) ** 2 for v, s in zip(f0, sc0)) / s_dim)
            span = jnp.maximum(tend_ref[0] - t_start, jnp.finfo(dtype).tiny)
            h0 = jnp.where(d1 > 1e-5, 0.01 * jnp.maximum(d0, 1e-5) / d1, span)
            h0 = jnp.clip(h0, 1e-8 * span, span)
            if dtmax is not None:
                h0 = jnp.minimum(h0, dtmax)
        else:
            h0 = jnp.full((block,), opts.dt0, dtype)

        land_tol = 8 * float(jnp.finfo(dtype).eps)
        acc0 = ([zero] * len(tri), [zero] * kk, zero) if data is not None else None

        def load_segment(iq):
            """Infusion rates and inputs of segment iq (after other event iq - 1)."""
            rate = [rate_ref[iq, i, lane] for i in range(s_dim)] if has_rate else []
            if not n_in:
                return rate, []
            return rate, ([anchor_ref[iq, lane]] + [ua_ref[iq, c, lane] for c in range(n_in)]
                          + [us_ref[iq, c, lane] for c in range(n_in)])

        def seg_rate(seg):
            return seg[0] if has_rate else [zero] * s_dim

        def seg_u_at(seg):
            if not n_in:
                return lambda tq: zero_inputs
            anchor, ua, us = seg[1][0], seg[1][1:1 + n_in], seg[1][1 + n_in:]
            return lambda tq: {nm: ua[c] + (tq - anchor) * us[c]
                               for c, nm in enumerate(input_names)}

        def next_other(iq):
            return jnp.where(iq < q_dim, qt_ref[jnp.minimum(iq, q_dim - 1), lane], jnp.inf)

        def slot(s, carry):
            # Iteration s: every lane integrates to its own s-th save time, applying on the
            # way the doses (and rate or input changes) it meets strictly before it, then
            # all lanes write row s together. A dose at the save time comes after the
            # sample (it is met in iteration s + 1).
            t, flat, h, status, steps, acc, k1, iq, t_q, seg = carry
            t_o = ts_ref[s]

            def pending_of(t_, st_, tq_):
                return (st_ == 0) & (tq_ <= t_) & (tq_ < t_o)

            def cond(c):
                t_, _, _, st_, _, _, _, tq_, _, _, _ = c
                run = ((t_ < t_o) & (st_ == 0)) | pending_of(t_, st_, tq_)
                return jnp.max(run.astype(jnp.int32)) > 0

            def body(c):
                t_, fl, h_, st_, sp_, k1_, iq_, tq_, seg_, tseg_, spseg_ = c
                pending = pending_of(t_, st_, tq_)

                def apply_dose(args):
                    # one due dose per lane: the jump, the next other event, the new
                    # segment's rates and inputs, and (FSAL) the first stage anew
                    fl, k1_, iq_, tq_, seg_, tseg_, spseg_ = args
                    iq_c = jnp.minimum(iq_, q_dim - 1)
                    amount = jnp.where(pending, qjump_ref[iq_c, lane], 0.0)
                    target = qstate_ref[iq_c, lane]
                    fl = [v + jnp.where(target == i, amount, 0.0) if i < s_dim else v
                          for i, v in enumerate(fl)]
                    iq_ = iq_ + pending.astype(jnp.int32)
                    tq_ = jnp.where(pending, next_other(iq_), tq_)
                    seg_ = jax.tree.map(lambda a, b: jnp.where(pending, a, b),
                                        load_segment(iq_), seg_)
                    tseg_ = jnp.where(pending, t_, tseg_)
                    spseg_ = jnp.where(pending, sp_, spseg_)
                    if fsal:
                        f = field(t_, fl, seg_u_at(seg_)(t_), seg_rate(seg_))
                        k1_ = [jnp.where(pending, a, b) for a, b in zip(f, k1_)]
                    return fl, k1_, iq_, tq_, seg_, tseg_, spseg_

                fl, k1_, iq_, tq_, seg_, tseg_, spseg_ = jax.lax.cond(
                    jnp.max(pending.astype(jnp.int32)) > 0, apply_dose, lambda a: a,
                    (fl, k1_, iq_, tq_, seg_, tseg_, spseg_))
                # step towards the next dose before the sample, else the sample
                t_ev = jnp.where(tq_ < t_o, tq_, t_o)
                active = (t_ < t_o) & (st_ == 0) & ~pending_of(t_, st_, tq_)
                gap = t_ev - t_
                # a step that reaches its target within rounding of t lands on it (one
                # ending a few ulps short would leave a needless tiny step)
                tol = land_tol * jnp.maximum(jnp.abs(t_ev), 1.0)
                if adaptive:
                    clipped = h_ >= gap - tol
                    h_try = jnp.where(active, jnp.where(clipped, gap, h_), 1.0)
                    t_next = t_ + h_try
                else:
                    # fixed steps on the grid tseg + k dt0 from the last sample or dose,
                    # not accumulated one by one (no drift in float32)
                    t_next = tseg_ + (sp_ - spseg_ + 1).astype(dtype) * h_
                    clipped = t_next >= t_ev - tol
                    h_try = jnp.where(active, jnp.where(clipped, gap, t_next - t_), 1.0)
                new, err, k_last = rk_step(t_, fl, h_try, seg_u_at(seg_), seg_rate(seg_),
                                           k1_ if fsal else None)
                finite = jnp.ones((block,), bool)
                for v in new:
                    finite = finite & jnp.isfinite(v)
                if adaptive:
                    en2 = zero
                    for a, b, ev in zip(fl, new, err):
                        sc = opts.atol + opts.rtol * jnp.maximum(jnp.abs(a), jnp.abs(b))
                        en2 = en2 + (ev / sc) ** 2
                    en = jnp.sqrt(en2 / n_y)
                    finite = finite & jnp.isfinite(en)
                    en = jnp.where(finite, en, jnp.inf)
                    accept = active & (en <= 1.0)
                    factor = jnp.clip(SAFETY * jnp.where(en > 0, en, 1e-10) ** (-0.2),
                                      FACTOR_MIN, FACTOR_MAX)
                    factor = jnp.where(finite, factor, FACTOR_MIN)
                    h_next = h_try * factor
                    h_next = jnp.where(accept & clipped, jnp.maximum(h_next, h_), h_next)
                    if dtmax is not None:
                        h_next = jnp.minimum(h_next, dtmax)
                    h_ = jnp.where(active, h_next, h_)
                else:
                    accept = active & finite
                t_ = jnp.where(accept, jnp.where(clipped, t_ev, t_next), t_)
                fl = [jnp.where(accept, b, a) for a, b in zip(fl, new)]
                sp_ = sp_ + active.astype(jnp.int32)
                if adaptive:
                    tiny = active & ~accept & (h_ < 1e-12 * jnp.maximum(jnp.abs(t_), 1.0))
                    st_ = jnp.where(tiny, jnp.where(finite, 3, 2), st_)
                else:
                    st_ = jnp.where(active & ~finite, 2, st_)
                st_ = jnp.where((st_ == 0) & (t_ < t_o) & (sp_ >= opts.max_steps), 1, st_)
                if fsal:
                    k1_ = [jnp.where(accept, a, b) for a, b in zip(k_last, k1_)]
                # a step that landed on a dose time starts the grid anew there
                landed = accept & clipped & (t_ev < t_o)
                tseg_ = jnp.where(landed, t_, tseg_)
                spseg_ = jnp.where(landed, sp_, spseg_)
                return (t_, fl, h_, st_.astype(jnp.int32), sp_, k1_, iq_, tq_, seg_, tseg_,
                        spseg_)

            t, flat, h, status, steps, k1, iq, t_q, seg, _, _ = jax.lax.while_loop(
                cond, body, (t, flat, h, status, steps, k1, iq, t_q, seg, t, steps))
            # all lanes write row s (coalesced)
            if want_states:
                for row, i in enumerate(saved):
                    states_ref[s, row] = flat[i]
            if want_sens:
                for i in range(k_dim * s_dim):
                    sens_ref[s, i] = flat[s_dim + i]
            if data is not None:
                hs, gs, cost = acc
                w = w_ref[s]
                use = w > 0
                ko = kobs_ref[s]
                y = tuple(flat[:s_dim])

                def f_sel(yy, pp):
                    vals = lanes(ob.fn(yy, pp) for ob in observables)
                    return _pick(vals, ko, n_obs_kinds)

                f = f_sel(y, p)
                r = jnp.where(use, (yobs_ref[s] - f) * w, 0.0)
                cost = cost + 0.5 * r * r
                js = []
                for k in range(k_dim):
                    sk = tuple(flat[s_dim * (k + 1): s_dim * (k + 2)])
                    df = jvp_dir(f_sel, y, sk, k)
                    js.append(jnp.where(use, -df * w, 0.0))
                gs = [g + jk * r for g, jk in zip(gs, js)] + gs[len(js):]
                hs = [hv + js[a] * js[b] if b < len(js) else hv
                      for hv, (a, b) in zip(hs, tri)]
                acc = (hs, gs, cost)
            return t, flat, h, status, steps, acc, k1, iq, t_q, seg

        izero = jnp.zeros((block,), jnp.int32)
        seg0 = load_segment(izero)
        k1_0 = field(t_start, flat0, seg_u_at(seg0)(t_start), seg_rate(seg0)) if fsal else []
        init = (t_start, flat0, h0.astype(dtype), izero, izero, acc0, k1_0, izero,
                next_other(izero), seg0)
        _, _, _, status, steps, acc, _, _, _, _ = jax.lax.fori_loop(0, m_dim, slot, init)
        if data is not None:
            hs, gs, cost = acc
            for a, v in enumerate(hs):
                h_ref[a] = v
            for a, v in enumerate(gs):
                g_ref[a] = v
            cost_ref[0] = cost
        status_ref[0] = status
        steps_ref[0] = steps

    compiler_params = None
    if not interpret:
        compiler_params = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
    results = pl.pallas_call(
        kernel,
        grid=(n_pad // block,),
        in_specs=specs,
        out_specs=[o[1] for o in outs],
        out_shape=[o[0] for o in outs],
        interpret=interpret,
        compiler_params=compiler_params,
        name="hybrid_twin_ensemble",
    )(*ins)
    results = [r[..., :n] for r in results]
    res: dict[str, Any] = {}
    it = iter(results)
    # (M, S, N) -> (N, M, S): one transpose (patients-last stores keep the kernel's
    # writes coalesced)
    if want_states:
        res["states"] = jnp.moveaxis(next(it), -1, 0)
    if want_sens:
        res["sens"] = jnp.moveaxis(next(it), -1, 0).reshape(n, m_dim, k_dim, s_dim)
    if data is not None:
        hh, gg, cc = next(it), next(it), next(it)
        full = np.zeros((kk, kk), np.int32)
        for t_i, (a, b) in enumerate(tri):
            full[a, b] = full[b, a] = t_i
        res["H"] = jnp.moveaxis(hh, -1, 0)[:, full[:k_dim, :k_dim]]
        res["g"] = jnp.moveaxis(gg, -1, 0)[:, :k_dim]
        res["cost"] = cc[0]
    res["status"] = next(it)[0]
    res["steps"] = next(it)[0]
    return res


def _is_zero(t) -> bool:
    return all(isinstance(x, jax.custom_derivatives.SymbolicZero)
               for x in jax.tree.leaves(t, is_leaf=lambda x: isinstance(
                   x, jax.custom_derivatives.SymbolicZero)))


def solve_kernel(model: MechanisticModel, theta: jax.Array, sched, save_ts, save_mask, t0,
                 opts, has_inf: bool):
    """`simulate` on the kernel backend: (ts (N, M), ys (N, M, S), status, num_steps).

    Differentiable in `theta` by forward sensitivities computed in the kernel
    (`jax.custom_jvp`): `jax.jvp`, `jax.jacfwd` and `jax.grad` work with respect to the
    parameters; a derivative with respect to anything else raises an error.
    """
    dtype = theta.dtype
    prep = prepare(model, sched, save_ts, save_mask, t0, has_inf, dtype)
    arrays, static = eqx.partition(model, eqx.is_array)

    def run(th, arr, pr, **kw):
        return run_kernel(eqx.combine(arr, static), th, pr, opts, **kw)

    @jax.custom_jvp
    def states(th, arr, pr, mask):
        res = run(th, arr, pr)
        ys = jnp.where(mask[..., None], res["states"], 0.0)
        return ys, res["status"], res["steps"]

    def states_jvp(primals, tangents):
        th, arr, pr, mask = primals
        dth, darr, dpr, _ = tangents
        if not (_is_zero(darr) and _is_zero(dpr)):
            raise NotImplementedError(
                "the kernel backend differentiates with respect to the parameters only; "
                "use SolverOptions(backend='diffrax') for derivatives with respect to "
                "network weights, schedules or times")
        n, p_dim = th.shape
        unit = AxisDirections(tuple(range(p_dim)), jnp.ones((p_dim, n), th.dtype))
        res = run(th, arr, pr, directions=unit, want_sens=True)
        ys = jnp.where(mask[..., None], res["states"], 0.0)
        sens = jnp.where(mask[..., None, None], res["sens"], 0.0)  # (N, M, P, S)
        if isinstance(dth, jax.custom_derivatives.SymbolicZero):
            dys = jnp.zeros_like(ys)
        else:
            dys = jnp.einsum("nmps,np->nms", sens, dth)
        zeros_i = np.zeros(res["status"].shape, jax.dtypes.float0)
        return (ys, res["status"], res["steps"]), (dys, zeros_i, zeros_i)

    states.defjvp(states_jvp, symbolic_zeros=True)
    ys, status, steps = states(theta, arrays, prep, save_mask)
    return prep.ts, ys, status, steps


def normal_equations(model: MechanisticModel, theta: jax.Array,
                     directions: jax.Array | AxisDirections | None,
                     sched, save_ts, save_mask, obs_index, y, weight, t0, opts,
                     has_inf: bool) -> dict[str, jax.Array]:
    """Per patient, in one kernel: the cost 1/2 sum r^2 of r = (y - f) * weight over the
    save slots (weight 0 where nothing is fitted) and, with `directions` (K, N, P)
    = d theta / d z_k (or `AxisDirections`), the Gauss–Newton matrices JᵀJ (N, K, K) and Jᵀr (N, K) of
    J = dr/dz, accumulated at the observations without storing J. Also "status"."""
    dtype = theta.dtype
    prep = prepare(model, sched, save_ts, save_mask, t0, has_inf, dtype)
    weight = jnp.where(save_mask, weight, 0)
    data = (jnp.where(weight > 0, y, 0.0).astype(dtype).T, weight.astype(dtype).T,
            jnp.asarray(obs_index, jnp.int32).T)  # (M, N) each
    return run_kernel(model, theta, prep, opts, directions=directions, data=data,
                      want_states=False)


def lower_for_cuda(fn, *args, device_kind: str = "NVIDIA H100 80GB HBM3"):
    """`jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))`, on any host: Pallas
    kernels in `fn` are lowered to Triton IR for CUDA. Newer JAX takes the GPU's kind from
    the device or, on a host without one, from an abstract device (here `device_kind`)."""
    try:
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    except RuntimeError as e:
        if "AbstractDevice" not in str(e):
            raise
    from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

    gpu = AbstractDevice(device_kind=device_kind, num_cores=None, platform="gpu")
    with use_abstract_mesh(AbstractMesh((1,), ("gpu",), abstract_device=gpu)):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


_SUPPORT_CACHE: dict = {}


def kernel_support(model: MechanisticModel) -> str | None:
    """None if `model` lowers to the GPU kernel (Pallas -> Triton, checked by lowering a
    small float32 batch for CUDA, which works on any host), else the reason it does not:
    typically a vector field that is not elementwise over patients (stacking components,
    matrix products, reductions over states). Cached per model structure."""
    arrays, static = eqx.partition(model, eqx.is_array)
    key = (jax.tree.structure(arrays), tuple(np.shape(x) for x in jax.tree.leaves(arrays)),
           repr(static))
    if key in _SUPPORT_CACHE:
        return _SUPPORT_CACHE[key]
    from .schedule import Schedule
    from .simulate import SolverOptions

    n, f32 = 16, jnp.float32
    theta = jnp.broadcast_to(jnp.asarray(model.typical_params(), f32), (n, model.n_params))
    sched = Schedule.stack([Schedule.empty(model, f32)] * n)
    ts = jnp.broadcast_to(jnp.asarray([0.0, 1.0], f32), (n, 2))
    mask = jnp.ones((n, 2), bool)
    opts = SolverOptions(method="rk4", dt0=0.5, backend="kernel")

    def solve(th, sched, ts, mask):
        prep = prepare(model, sched, ts, mask, f32(0.0), False, f32)
        return run_kernel(model, th, prep, opts, interpret=False, block=n)["states"]

    try:
        lower_for_cuda(solve, theta, sched, ts, mask)
        reason = None
    except Exception as e:  # noqa: BLE001 - any lowering failure means "not supported"
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    _SUPPORT_CACHE[key] = reason
    return reason
