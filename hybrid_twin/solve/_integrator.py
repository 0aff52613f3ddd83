"""The batch integrator: explicit Runge–Kutta stages, error estimate, step-size control
and event walking, written once for a batch of lanes (one patient each) and used both on
arrays (the ensemble backend, lanes = the whole batch) and inside the Pallas kernel (lanes =
one program's block of patients).

Every quantity is a `(L,)` vector, one entry per lane, and the model's vector field is
evaluated component by component, so the same trace lowers to Triton. The integrator reads
its inputs through `Sources`, whose entries are either arrays or Pallas refs: both are read
as `x[s]` (row s) and `x[i, lane]` (a per-lane gather), patients on the last axis.

The walk (`integrate`). Iteration s of the outer loop: every lane integrates to its own
s-th save time (an inner loop of steps, each lane with its own step size, finished lanes
masked), stopping on the way at each of its own doses and rate or input changes before
that time to apply it; then all lanes hand row s to `write` together. An observation at a
dose time sees the state before the dose; no step straddles a discontinuity; infusion
rates and inputs are constant (or, with linear interpolation, linear) over each step.

Forward sensitivities. With K parameter directions, d state / d direction is integrated
with the state (one `jax.jvp` of the vector field per direction per stage) and is part of
the adaptive error norm, which keeps steady-state sensitivities resolved (DESIGN.md,
numerical pitfalls); with observed data, each lane's weighted JᵀJ, Jᵀr and residual sum of
squares are accumulated at its observations (the Jacobian is never stored).

Step-size control is not differentiated (`stop_gradient`): under `jax.jvp` of the walk the
sensitivities are those of the Runge–Kutta map at the chosen steps. Reverse mode (on
arrays): with `loop="checkpointed"` the inner loop of steps is equinox's checkpointed while
loop (online treeverse recomputation, as diffrax's `RecursiveCheckpointAdjoint`) and the
slots are a `lax.scan` emitting the states, so `jax.grad` of the walk is the exact
derivative of the same discrete Runge–Kutta map, with respect to parameters, network
weights and schedules alike.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._core import Batch, Method, Solution, Status, StepSizeController, Tableau, prepare

SAFETY, FACTOR_MIN, FACTOR_MAX = 0.9, 0.2, 10.0
ERROR_EXPONENT = -0.2  # -1 / (order + 1) of the 5(4) pairs


class Sources(NamedTuple):
    """What the walk reads, patients on the last axis (L lanes); arrays or Pallas refs.

    theta (P, L); ts (M, L) or (M,) when shared; t0, t_end (1, L); q_t, q_jump, q_state
    (Q, L): the other events (see `Prepared`); rate (Q + 1, S, L) or None; anchor (Q + 1,
    L), u_a, u_slope (Q + 1, C, L) or None; dtmax (1, L) or None; directions (K, L) (one
    parameter each) or (K, P, L) or None; y_obs, weight, obs_kind (M, L) or None (no
    normal equations); active (1, L) int32 or None (all lanes): a lane with 0 is not
    integrated (status `Status.SKIPPED`)."""

    theta: Any
    ts: Any
    t0: Any
    t_end: Any
    q_t: Any
    q_jump: Any
    q_state: Any
    rate: Any = None
    anchor: Any = None
    u_a: Any = None
    u_slope: Any = None
    dtmax: Any = None
    directions: Any = None
    y_obs: Any = None
    weight: Any = None
    obs_kind: Any = None
    active: Any = None


class Step(NamedTuple):
    """Per-lane state of the walk."""

    t: jax.Array
    y: list  # states, then K sensitivity blocks of S
    h: jax.Array
    status: jax.Array
    steps: jax.Array
    k1: list  # FSAL: f at (t, y); [] otherwise
    iq: jax.Array  # next other event
    t_q: jax.Array  # its time
    seg: tuple  # infusion rates and input coefficients of the current segment
    t_seg: jax.Array  # RK4: start of the current step grid
    steps_seg: jax.Array  # RK4: steps taken on it


class Normal(NamedTuple):
    """Per-lane accumulators: JᵀJ's upper triangle, Jᵀr and 1/2 sum r²."""

    h: list
    g: list
    cost: jax.Array


class Walked(NamedTuple):
    status: jax.Array
    steps: jax.Array
    normal: Normal | None
    out: Any


def upper_triangle(k: int) -> list[tuple[int, int]]:
    """Index pairs (a <= b) of a symmetric K x K matrix's upper triangle."""
    kk = max(k, 1)
    return [(a, b) for a in range(kk) for b in range(a, kk)]


def rk_step(field: Callable, tab: Tableau, t, y: Sequence, h, k1=None):
    """One explicit Runge–Kutta step of every lane from (t, y) with step h. `field(t, y)`
    returns dy/dt as a list; `k1`: f(t, y) when known (FSAL). Returns (y_new, error
    estimate or None, last stage)."""
    n_y = len(y)
    ks = [field(t, y) if k1 is None else k1]
    for j, a in enumerate(tab.a_lower):
        yj = [y[i] + h * sum(float(a[q]) * ks[q][i] for q in range(len(a)) if a[q] != 0)
              for i in range(n_y)]
        ks.append(field(t + float(tab.c[j]) * h, yj))
    new = [y[i] + h * sum(float(tab.b_sol[q]) * ks[q][i] for q in range(len(ks))
                          if tab.b_sol[q] != 0) for i in range(n_y)]
    err = None
    if tab.b_error is not None:
        err = [h * sum(float(tab.b_error[q]) * ks[q][i] for q in range(len(ks))
                       if tab.b_error[q] != 0) for i in range(n_y)]
    return new, err, ks[-1]


def rk_step_rolled(field: Callable, tab: Tableau, t, y: Sequence, h, k1=None):
    """`rk_step` with the stages 2..s as one `lax.fori_loop` instead of unrolled: the
    vector field (and its sensitivity directions) is traced once, not once per stage, so
    a kernel with many stages and sensitivities is a fraction of the code to compile. Each
    stage sums over all s earlier-stage slots with the tableau row picked by the stage
    index (zeros beyond the row)."""
    n_y, s = len(y), len(tab.b_sol)
    a_full = np.zeros((s, s))
    for j, a in enumerate(tab.a_lower):
        a_full[j + 1, :len(a)] = a
    c_full = np.concatenate([[0.0], np.asarray(tab.c, float)])

    def pick_row(values, j):
        out = jnp.zeros((), h.dtype)
        for jj in range(1, s):
            if values[jj] != 0:
                out = jnp.where(j == jj, float(values[jj]), out)
        return out

    def stage(j, ks):
        a_j = [pick_row(a_full[:, q], j) for q in range(s - 1)]
        yj = [y[i] + h * functools.reduce(operator.add, [a_j[q] * ks[q][i]
                                                           for q in range(s - 1)])
              for i in range(n_y)]
        kj = field(t + pick_row(c_full, j) * h, yj)
        return [[jnp.where(j == q, kj[i], ks[q][i]) for i in range(n_y)] for q in range(s)]

    first = field(t, y) if k1 is None else k1
    ks0 = [list(first)] + [[jnp.zeros_like(v) for v in y] for _ in range(s - 1)]
    ks = jax.lax.fori_loop(1, s, stage, ks0)
    new = [y[i] + h * sum(float(tab.b_sol[q]) * ks[q][i] for q in range(s)
                          if tab.b_sol[q] != 0) for i in range(n_y)]
    err = None
    if tab.b_error is not None:
        err = [h * sum(float(tab.b_error[q]) * ks[q][i] for q in range(s)
                       if tab.b_error[q] != 0) for i in range(n_y)]
    return new, err, ks[-1]


def error_norm(ctrl: StepSizeController, y: Sequence, y_new: Sequence, err: Sequence):
    """RMS over components of err / (atol + rtol max(|y|, |y_new|)), per lane."""
    terms = [(e / (ctrl.atol + ctrl.rtol * jnp.maximum(jnp.abs(a), jnp.abs(b)))) ** 2
             for a, b, e in zip(y, y_new, err)]
    return jnp.sqrt(functools.reduce(operator.add, terms) / len(y))


def next_step_size(h_try, en, finite, accept, clipped, h, dtmax):
    """The step after one of size h_try with error norm en: the integral controller
    (safety 0.9, factor in [0.2, 10]); a step cut short to land on an event does not
    shrink the next; at most `dtmax` (None: no cap)."""
    factor = jnp.clip(SAFETY * jnp.where(en > 0, en, 1e-10) ** ERROR_EXPONENT,
                      FACTOR_MIN, FACTOR_MAX)
    factor = jnp.where(finite, factor, FACTOR_MIN)
    h_next = h_try * factor
    h_next = jnp.where(accept & clipped, jnp.maximum(h_next, h), h_next)
    return h_next if dtmax is None else jnp.minimum(h_next, dtmax)


def initial_step(ctrl: StepSizeController, y0: Sequence, f0: Sequence, span, dtype, dtmax):
    """1% of |y|/|f| in the scaled norm (the whole span at a steady state), in
    [1e-8 span, span] and at most dtmax."""
    y0 = [jax.lax.stop_gradient(v) for v in y0]
    f0 = [jax.lax.stop_gradient(v) for v in f0]
    sc0 = [ctrl.atol + ctrl.rtol * jnp.abs(v) for v in y0]
    d0 = jnp.sqrt(sum((v / s) ** 2 for v, s in zip(y0, sc0)) / len(y0))
    d1 = jnp.sqrt(sum((v / s) ** 2 for v, s in zip(f0, sc0)) / len(y0))
    span = jnp.maximum(span, jnp.finfo(dtype).tiny)
    h0 = jnp.where(d1 > 1e-5, 0.01 * jnp.maximum(d0, 1e-5) / d1, span)
    h0 = jnp.clip(h0, 1e-8 * span, span)
    return h0 if dtmax is None else jnp.minimum(h0, dtmax)


def pick(values, index, n_choices: int):
    """values[index] lane by lane from a list of (L,) vectors."""
    out = values[0]
    for j in range(1, n_choices):
        out = jnp.where(index == j, values[j], out)
    return out


def integrate(model, src: Sources, *, lanes: int, dtype, method: Method,
              controller: StepSizeController, max_steps: int, n_slots: int,
              axis_index: tuple[int, ...] | None = None, k_dim: int = 0,
              write: Callable[[Any, list, Any], Any] | None = None, out: Any = None,
              loop: str = "lax", emit: bool = False, roll_stages: bool = False) -> Walked:
    """Walk every lane from t0 through its save slots (see the module docstring).

    Args:
        model: the (hybrid) model, evaluated on lists of (L,) vectors.
        src: `Sources`.
        lanes: L; dtype: the float dtype of the walk.
        method, controller, max_steps: the method (tableau), the step-size controller
            (adaptive methods) and the step limit per lane, in total.
        n_slots: M, the number of save slots.
        axis_index: with `src.directions` (K, L), the parameter each direction moves;
            None with dense (K, P, L) directions.
        k_dim: K (0: no sensitivities).
        write: `write(s, y, out) -> out` after slot s with every lane's state list `y`
            (states, then sensitivities; NaN in a lane that failed before the slot's
            time); `out` is carried through the walk.
        loop: the inner loop of steps: "lax" (`lax.while_loop`: forward mode; what Pallas
            lowers) or "checkpointed" (reverse mode, on arrays).
        emit: return the states after every slot as `out`, (M, S, L), from a `lax.scan`
            (instead of `write`; what reverse mode needs: no output carried).
        roll_stages: the Runge–Kutta stages as a loop (`rk_step_rolled`: less code to
            compile) instead of unrolled.

    Returns `Walked`: status and steps (L,), the normal equations (when `src.y_obs` is
    given) and the final `out`.
    """
    tab = method.tableau()
    step_fn = rk_step_rolled if roll_stages else rk_step
    adaptive = tab.b_error is not None
    fsal = adaptive and tab.fsal
    s_dim = model.n_states
    n_y = s_dim * (1 + k_dim)
    input_names = model.input_names
    n_in = len(input_names) if src.u_a is not None else 0  # else inputs are zero
    has_rate = src.rate is not None
    has_data = src.y_obs is not None
    param_names = model.param_names
    observables = model.observables
    n_obs_kinds = len(observables)
    q_dim = src.q_t.shape[0]
    tri = upper_triangle(k_dim)
    kk = max(k_dim, 1)
    dtmax = src.dtmax[0] if src.dtmax is not None else (
        controller.dtmax if isinstance(controller.dtmax, (int, float)) else None)

    p = {name: src.theta[i] for i, name in enumerate(param_names)}
    if axis_index is not None:
        dps = [(param_names[i], src.directions[k]) for k, i in enumerate(axis_index)]
    else:
        dps = [{name: src.directions[k, i] for i, name in enumerate(param_names)}
               for k in range(k_dim)]

    def jvp_dir(fn, y, sk, k):
        """d fn(y, p) along state tangent sk and parameter direction k."""
        if axis_index is not None:
            name, scale = dps[k]
            return jax.jvp(lambda yy, pk: fn(yy, {**p, name: pk}), (y, p[name]),
                           (sk, scale))[1]
        return jax.jvp(fn, (y, p), (sk, dps[k]))[1]

    def vec(c):
        return tuple(jnp.broadcast_to(jnp.asarray(x, dtype), (lanes,)) for x in c)

    lane = jnp.arange(lanes, dtype=jnp.int32)
    zero_inputs = {name: jnp.zeros((lanes,), dtype) for name in input_names}
    y0 = vec(model.initial_state(p))
    s0 = [vec(jvp_dir(lambda _, pp: model.initial_state(pp), (), (), k)) for k in range(k_dim)]

    def field(t, flat, u, rate):
        y = tuple(flat[:s_dim])
        dy = vec(model.vector_field(t, y, p, u))
        res = [d + r for d, r in zip(dy, rate)]
        for k in range(k_dim):
            sk = tuple(flat[s_dim * (k + 1): s_dim * (k + 2)])
            ds = jvp_dir(lambda yy, pp: model.vector_field(t, yy, pp, u), y, sk, k)
            res.extend(vec(ds))
        return res

    t_start = src.t0[0]
    zero = jnp.zeros_like(t_start)
    flat0 = list(y0) + [x for sk in s0 for x in sk]
    if adaptive:
        u0 = ({name: src.u_a[0, c] for c, name in enumerate(input_names)} if n_in
              else zero_inputs)
        r0 = [src.rate[0, i] for i in range(s_dim)] if has_rate else [zero] * s_dim
        f0 = [a + b for a, b in zip(vec(model.vector_field(t_start, y0, p, u0)), r0)]
        h0 = initial_step(controller, y0, f0, src.t_end[0] - t_start, dtype, dtmax)
    else:
        h0 = jnp.full((lanes,), method.dt0, dtype)
    land_tol = 8 * float(jnp.finfo(dtype).eps)
    normal0 = Normal([zero] * len(tri), [zero] * kk, zero) if has_data else None

    def load_segment(iq):
        """Infusion rates and inputs of segment iq (after other event iq - 1)."""
        rate = [src.rate[iq, i, lane] for i in range(s_dim)] if has_rate else []
        if not n_in:
            return rate, []
        return rate, ([src.anchor[iq, lane]] + [src.u_a[iq, c, lane] for c in range(n_in)]
                      + [src.u_slope[iq, c, lane] for c in range(n_in)])

    def seg_rate(seg):
        return seg[0] if has_rate else [zero] * s_dim

    def seg_u_at(seg):
        if not n_in:
            return lambda tq: zero_inputs
        anchor, ua, us = seg[1][0], seg[1][1:1 + n_in], seg[1][1 + n_in:]
        return lambda tq: {nm: ua[c] + (tq - anchor) * us[c]
                           for c, nm in enumerate(input_names)}

    def seg_field(seg):
        u_at, rate = seg_u_at(seg), seg_rate(seg)
        return lambda t, y: field(t, y, u_at(t), rate)

    def next_other(iq):
        return jnp.where(iq < q_dim, src.q_t[jnp.minimum(iq, q_dim - 1), lane], jnp.inf)

    def to_slot(t_o, st: Step) -> Step:
        """Every lane integrates to its own time t_o, applying on the way the doses (and
        rate or input changes) it meets strictly before it."""

        def pending_of(c: Step):
            return (c.status == Status.OK) & (c.t_q <= c.t) & (c.t_q < t_o)

        def cond(c: Step):
            run = ((c.t < t_o) & (c.status == Status.OK)) | pending_of(c)
            return jnp.max(run.astype(jnp.int32)) > 0

        def apply_dose(c: Step, pending) -> Step:
            # one due dose per lane: the jump, the next other event, the new segment's
            # rates and inputs, and (FSAL) the first stage anew
            iq_c = jnp.minimum(c.iq, q_dim - 1)
            amount = jnp.where(pending, src.q_jump[iq_c, lane], 0.0)
            target = src.q_state[iq_c, lane]
            y = [v + jnp.where(target == i, amount, 0.0) if i < s_dim else v
                 for i, v in enumerate(c.y)]
            iq = c.iq + pending.astype(jnp.int32)
            seg = jax.tree.map(lambda a, b: jnp.where(pending, a, b), load_segment(iq), c.seg)
            k1 = c.k1
            if fsal:
                f = seg_field(seg)(c.t, y)
                k1 = [jnp.where(pending, a, b) for a, b in zip(f, c.k1)]
            return c._replace(y=y, k1=k1, iq=iq, t_q=jnp.where(pending, next_other(iq), c.t_q),
                              seg=seg, t_seg=jnp.where(pending, c.t, c.t_seg),
                              steps_seg=jnp.where(pending, c.steps, c.steps_seg))

        def body(c: Step) -> Step:
            pending = pending_of(c)
            c = jax.lax.cond(jnp.max(pending.astype(jnp.int32)) > 0,
                             lambda a: apply_dose(a, pending), lambda a: a, c)
            # step towards the next dose before the sample, else the sample
            t_ev = jnp.where(c.t_q < t_o, c.t_q, t_o)
            active = (c.t < t_o) & (c.status == Status.OK) & ~pending_of(c)
            gap = t_ev - c.t
            # a step that reaches its target within rounding of t lands on it (one
            # ending a few ulps short would leave a needless tiny step)
            tol = land_tol * jnp.maximum(jnp.abs(t_ev), 1.0)
            if adaptive:
                clipped = c.h >= gap - tol
                h_try = jnp.where(active, jnp.where(clipped, gap, c.h), 1.0)
                t_next = c.t + h_try
            else:
                # fixed steps on the grid t_seg + k dt0 from the last sample or dose,
                # not accumulated one by one (no drift in float32)
                t_next = c.t_seg + (c.steps - c.steps_seg + 1).astype(dtype) * c.h
                clipped = t_next >= t_ev - tol
                h_try = jnp.where(active, jnp.where(clipped, gap, t_next - c.t), 1.0)
            new, err, k_last = step_fn(seg_field(c.seg), tab, c.t, c.y, h_try,
                                       c.k1 if fsal else None)
            finite = jnp.ones((lanes,), bool)
            for v in new:
                finite = finite & jnp.isfinite(v)
            h, status = c.h, c.status
            if adaptive:
                en = jax.lax.stop_gradient(error_norm(controller, c.y, new, err))
                finite = finite & jnp.isfinite(en)
                en = jnp.where(finite, en, jnp.inf)
                accept = active & (en <= 1.0)
                h = jnp.where(active, next_step_size(h_try, en, finite, accept, clipped, c.h,
                                                     dtmax), c.h)
            else:
                accept = active & finite
            t = jnp.where(accept, jnp.where(clipped, t_ev, t_next), c.t)
            y = [jnp.where(accept, b, a) for a, b in zip(c.y, new)]
            steps = c.steps + active.astype(jnp.int32)
            if adaptive:
                tiny = active & ~accept & (h < 1e-12 * jnp.maximum(jnp.abs(t), 1.0))
                status = jnp.where(tiny, jnp.where(finite, Status.SOLVER_FAILED,
                                                   Status.NONFINITE), status)
            else:
                status = jnp.where(active & ~finite, Status.NONFINITE, status)
            status = jnp.where((status == Status.OK) & (t < t_o) & (steps >= max_steps),
                               Status.MAX_STEPS, status).astype(jnp.int32)
            k1 = [jnp.where(accept, a, b) for a, b in zip(k_last, c.k1)] if fsal else c.k1
            # a step that landed on a dose time starts the grid anew there
            landed = accept & clipped & (t_ev < t_o)
            return c._replace(t=t, y=y, h=h, status=status, steps=steps, k1=k1,
                              t_seg=jnp.where(landed, t, c.t_seg),
                              steps_seg=jnp.where(landed, steps, c.steps_seg))

        init = st._replace(t_seg=st.t, steps_seg=st.steps)
        if loop == "checkpointed":
            # each iteration takes a step or applies a dose: at most max_steps + Q + 1
            return eqx.internal.while_loop(cond, body, init, kind="checkpointed",
                                           max_steps=max_steps + q_dim + 1)
        return jax.lax.while_loop(cond, body, init)

    def accumulate(s, y_all, acc: Normal) -> Normal:
        w = src.weight[s]
        use = w > 0
        ko = src.obs_kind[s]
        y = tuple(y_all[:s_dim])

        def f_sel(yy, pp):
            return pick(vec(ob.fn(yy, pp) for ob in observables), ko, n_obs_kinds)

        f = f_sel(y, p)
        r = jnp.where(use, (src.y_obs[s] - f) * w, 0.0)
        js = []
        for k in range(k_dim):
            sk = tuple(y_all[s_dim * (k + 1): s_dim * (k + 2)])
            js.append(jnp.where(use, -jvp_dir(f_sel, y, sk, k) * w, 0.0))
        g = [gv + jk * r for gv, jk in zip(acc.g, js)] + acc.g[len(js):]
        h = [hv + js[a] * js[b] if b < len(js) else hv for hv, (a, b) in zip(acc.h, tri)]
        return Normal(h, g, acc.cost + 0.5 * r * r)

    def saved(st: Step, t_o):
        """The states written for slot time t_o: NaN in a lane whose solve failed before
        reaching t_o (never the stale state of an earlier time)."""
        lost = (st.status != Status.OK) & (st.status != Status.SKIPPED) & (st.t < t_o)
        return [jnp.where(lost, jnp.nan, v) for v in st.y]

    def slot(s, carry):
        st, acc, out_ = carry
        st = to_slot(src.ts[s], st)
        if write is not None:
            out_ = write(s, saved(st, src.ts[s]), out_)
        if has_data:
            acc = accumulate(s, st.y, acc)
        return st, acc, out_

    izero = jnp.zeros((lanes,), jnp.int32)
    seg0 = load_segment(izero)
    k1_0 = seg_field(seg0)(t_start, flat0) if fsal else []
    status0 = izero if src.active is None else jnp.where(
        src.active[0] != 0, Status.OK, Status.SKIPPED).astype(jnp.int32)
    st0 = Step(t=t_start, y=flat0, h=h0.astype(dtype), status=status0, steps=izero, k1=k1_0,
               iq=izero, t_q=next_other(izero), seg=seg0, t_seg=t_start, steps_seg=izero)
    if emit:
        def scan_slot(carry, s):
            st, acc, _ = slot(s, (*carry, None))
            return (st, acc), jnp.stack(saved(st, src.ts[s])[:s_dim])

        (st, acc), out = jax.lax.scan(scan_slot, (st0, normal0),
                                      jnp.arange(n_slots, dtype=jnp.int32))
        return Walked(st.status, st.steps, acc, out)
    st, acc, out = jax.lax.fori_loop(0, n_slots, slot, (st0, normal0, out))
    return Walked(st.status, st.steps, acc, out)


def solve_on_arrays(model, batch: Batch, options) -> Solution:
    """The walk run directly on arrays, the whole batch as its lanes (the ensemble
    backend's solve, and the kernel's reverse-mode pullback): forward mode through
    `lax.while_loop`, reverse mode (`options.differentiation == "reverse"`) through the
    checkpointed loop."""
    prep = prepare(model, batch, obs_cap=options.controller.dtmax == "obs")
    n, m = batch.n, prep.ts.shape[1]
    n_in = len(model.input_names) if prep.u_a is not None else 0
    src = Sources(theta=batch.theta.T, ts=prep.ts_lanes, t0=prep.t0, t_end=prep.t_end,
                  q_t=prep.q_t, q_jump=prep.q_jump, q_state=prep.q_state, rate=prep.rate,
                  anchor=prep.anchor if n_in else None, u_a=prep.u_a if n_in else None,
                  u_slope=prep.u_slope if n_in else None, dtmax=prep.dtmax,
                  active=None if batch.active is None
                  else batch.active.astype(jnp.int32)[None])
    reverse = options.differentiation == "reverse"
    walked = integrate(model, src, lanes=n, dtype=batch.dtype, method=options.method,
                       controller=options.controller, max_steps=options.max_steps,
                       n_slots=m, emit=True, loop="checkpointed" if reverse else "lax")
    mask = batch.batched_save_times()[1]
    ys = jnp.where(mask[..., None], jnp.moveaxis(walked.out, -1, 0), 0.0)
    return Solution(ts=prep.ts, ys=ys, mask=mask, status=walked.status,
                    num_steps=walked.steps)
