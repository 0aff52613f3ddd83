"""The solver package's shared vocabulary: outcomes (`Status`, `Solution`), methods and the
step-size controller, the batch every backend takes (`Batch`), and the event preparation
(save times, doses, infusion windows and inputs per segment) that every backend reads.

Nothing here imports a backend; every backend imports this.
"""

from __future__ import annotations

import enum
from typing import ClassVar, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..models.base import MechanisticModel
from ..schedule import Schedule


class Status(enum.IntEnum):
    """Per-patient outcome of a solve."""

    OK = 0
    MAX_STEPS = 1
    NONFINITE = 2
    SOLVER_FAILED = 3
    SKIPPED = 4  # not solved: marked inactive by the caller (`Batch.active`)


class Solution(eqx.Module):
    """Result of a solve; leading axis N when batched.

    Attributes:
        ts: (..., M) save times (model time unit); padded slots hold the last real time.
        ys: (..., M, n_states) states at `ts` (0 at padded slots).
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


# ---------------------------------------------------------------------------------------
# Methods and step-size control (what to integrate with; the backends decide how)


class Method(eqx.Module):
    """A Runge–Kutta method. `name` is its config name."""

    name: ClassVar[str] = ""

    def tableau(self) -> Tableau:
        """The explicit Runge–Kutta tableau (what the batch integrator runs)."""
        raise NotImplementedError(f"{type(self).__name__} has no explicit tableau")


class Tableau(NamedTuple):
    """An explicit Runge–Kutta tableau: nodes c (stages 2..s), rows of a, the solution
    weights and (adaptive methods) the error weights; `fsal`: the last stage is f at the
    step's end (first same as last)."""

    c: np.ndarray
    a_lower: tuple[np.ndarray, ...]
    b_sol: np.ndarray
    b_error: np.ndarray | None
    fsal: bool


def _diffrax_tableau(solver) -> Tableau:
    tab = solver.tableau
    c, a = np.asarray(tab.c), tuple(np.asarray(x) for x in tab.a_lower)
    b = np.asarray(tab.b_sol)
    fsal = float(c[-1]) == 1.0 and float(b[-1]) == 0.0 and np.array_equal(a[-1], b[:-1])
    return Tableau(c, a, b, np.asarray(tab.b_error), fsal)


class Tsit5(Method):
    """Tsitouras' 5(4) pair (diffrax's tableau): non-stiff, adaptive; the default."""

    name: ClassVar[str] = "tsit5"

    def tableau(self) -> Tableau:
        return _diffrax_tableau(diffrax.Tsit5)


class Dopri5(Method):
    """Dormand–Prince 5(4) (diffrax's tableau): non-stiff, adaptive."""

    name: ClassVar[str] = "dopri5"

    def tableau(self) -> Tableau:
        return _diffrax_tableau(diffrax.Dopri5)


class Kvaerno5(Method):
    """Kværnø's implicit 5(4) ESDIRK method: stiff problems (diffrax backend)."""

    name: ClassVar[str] = "kvaerno5"


class RK4(Method):
    """The classic fixed-step Runge–Kutta method with step `dt0` (model time unit): steps
    on the grid t_e + k dt0 from each sample or dose time t_e, the last one shortened to
    land on the next."""

    name: ClassVar[str] = "rk4"
    dt0: float = eqx.field(static=True, default=0.0)

    def __check_init__(self) -> None:
        if not (self.dt0 and self.dt0 > 0):
            raise ValueError("method 'rk4' needs a step size dt0 > 0 (model time unit)")

    def tableau(self) -> Tableau:
        return Tableau(np.array([0.5, 0.5, 1.0]),
                       (np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
                       np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]), None, False)


METHODS: dict[str, type[Method]] = {m.name: m for m in (Tsit5, Dopri5, Kvaerno5, RK4)}


def as_method(method: Method | str) -> Method:
    """A `Method` from itself or its name ("tsit5", "dopri5", "kvaerno5"; "rk4" needs
    `RK4(dt0)`)."""
    if isinstance(method, Method):
        return method
    if method == "rk4":
        raise ValueError("method 'rk4' needs a step size dt0 > 0: pass RK4(dt0=...)")
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
    return METHODS[method]()


class StepSizeController(eqx.Module):
    """Adaptive step-size control (`diffrax.PIDController` with its integral defaults):
    a step is accepted when its error estimate, scaled by atol + rtol |y| and measured in
    the RMS norm over states (and over sensitivities where a backend integrates them), is
    at most 1.

    Attributes:
        rtol, atol: relative and absolute tolerances.
        dtmax: largest step (model time unit), or "obs" to cap it at each patient's median
            observation spacing. The cap keeps parameter sensitivities resolved when a
            model starts at its steady state and gradients are taken (DESIGN.md, numerical
            pitfalls). None: no cap.
    """

    rtol: float = eqx.field(static=True, default=1e-6)
    atol: float = eqx.field(static=True, default=1e-8)
    dtmax: float | str | None = eqx.field(static=True, default=None)

    def __check_init__(self) -> None:
        if not (self.rtol > 0 and self.atol > 0):
            raise ValueError(f"rtol and atol must be > 0, got {self.rtol} and {self.atol}")
        if isinstance(self.dtmax, str) and self.dtmax != "obs":
            raise ValueError(f"dtmax must be a number, 'obs' or None, got {self.dtmax!r}")
        if isinstance(self.dtmax, (int, float)) and not self.dtmax > 0:
            raise ValueError(f"dtmax must be > 0, got {self.dtmax}")


# ---------------------------------------------------------------------------------------
# The batch every backend takes


class Batch(eqx.Module):
    """N patients to solve: what `simulate` hands a backend, validated and in one dtype.

    Attributes:
        theta: (N, P) natural-unit parameters.
        schedule: `Schedule` batched over N, or one shared by all (unbatched).
        save_ts, save_mask: (N, M) save times and their mask, or (M,) shared by all.
        t0: () start time.
        has_infusions: whether any dose is an infusion (static: without, no infusion
            windows are built).
        active: (N,) bool or None (all): the patients to solve. A backend may skip the
            others (status `Status.SKIPPED`, their results unspecified) or solve them
            anyway; the ensemble and kernel backends skip them (a kernel program whose
            patients are all inactive ends at once).
    """

    theta: jax.Array
    schedule: Schedule
    save_ts: jax.Array
    save_mask: jax.Array
    t0: jax.Array
    has_infusions: bool = eqx.field(static=True, default=True)
    active: jax.Array | None = None

    @property
    def n(self) -> int:
        """Number of patients N."""
        return self.theta.shape[0]

    @property
    def dtype(self) -> jnp.dtype:
        """The float dtype every array of the solve is built in (that of `theta`)."""
        return self.theta.dtype

    def batched_schedule(self) -> Schedule:
        """The schedule with leading axis N (a shared one broadcast)."""
        if self.schedule.dose_times.ndim == 2:
            return self.schedule
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (self.n,) + x.shape), self.schedule)

    def batched_save_times(self) -> tuple[jax.Array, jax.Array]:
        """(save_ts, save_mask) with leading axis N."""
        if self.save_ts.ndim == 2:
            return self.save_ts, self.save_mask
        shape = (self.n,) + self.save_ts.shape
        return jnp.broadcast_to(self.save_ts, shape), jnp.broadcast_to(self.save_mask, shape)


# ---------------------------------------------------------------------------------------
# Event preparation, shared by the backends


def save_times(save_ts, save_mask, t0, dtype):
    """Save times as solved, over the last axis: padded slots take the running maximum
    (the sequence stays sorted), none before t0; and the last of them, t_end."""
    ts = jax.lax.cummax(jnp.where(save_mask, save_ts, t0).astype(dtype), axis=save_ts.ndim - 1)
    ts = jnp.maximum(ts, t0)
    return ts, jnp.maximum(ts[..., -1], t0)


def obs_dtmax(save_ts, save_mask, dtype):
    """Each patient's median spacing of its real save times, over the last axis (inf
    with fewer than two distinct ones): `StepSizeController(dtmax="obs")`."""
    real = jnp.sort(jnp.where(save_mask, save_ts, jnp.inf), axis=-1)
    gaps = jnp.diff(real, axis=-1)
    gaps = jnp.where(jnp.isfinite(gaps) & (gaps > 0), gaps, jnp.inf)
    n_gaps = jnp.sum(jnp.isfinite(gaps), axis=-1)
    median = jnp.take_along_axis(jnp.sort(gaps, axis=-1),
                                 (jnp.maximum(n_gaps - 1, 0) // 2)[..., None], axis=-1)[..., 0]
    return jnp.where(n_gaps > 0, median, jnp.inf).astype(dtype)


def dose_routing(model: MechanisticModel) -> tuple[np.ndarray, np.ndarray]:
    """Per dose target: the state it enters and the scale of its amount."""
    states = np.array([model.index("state", d.state) for d in model.dose_targets], np.int32)
    scales = np.array([d.scale for d in model.dose_targets], np.float64)
    if states.size == 0:
        states, scales = np.zeros(1, np.int32), np.zeros(1)
    return states, scales


class DoseEvents(NamedTuple):
    """A schedule's doses and its events besides observations, over the last axis (any
    leading batch axes). Per dose (D): target state and scale, whether it is an infusion,
    and its duration. Per event (Q = D doses, then D infusion stops when `has_inf`, then
    the input breakpoints): time (unclipped), whether it is real, the jump it adds (a
    bolus; 0 for the others) and the state it enters."""

    d_state: jax.Array
    d_scale: jax.Array
    is_inf: jax.Array
    dur: jax.Array
    times: jax.Array
    ok: jax.Array
    jump: jax.Array
    state: jax.Array


def dose_events(model: MechanisticModel, sched: Schedule, has_inf: bool, dtype) -> DoseEvents:
    """The `DoseEvents` of a schedule (one patient's or a batch's)."""
    tgt_state, tgt_scale = dose_routing(model)
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
    jump = jnp.concatenate([jnp.where(is_bolus, sched.dose_amounts * d_scale, 0).astype(dtype),
                            jnp.zeros(lead + (n_rest,), dtype)], axis=-1)
    state = jnp.concatenate([d_state.astype(jnp.int32),
                             jnp.zeros(lead + (n_rest,), jnp.int32)], axis=-1)
    return DoseEvents(d_state, d_scale, is_inf, dur, times, ok, jump, state)


SORT_FREE_MAX = 64  # up to this many events: positions by comparison, not a sort


def event_order(times, ok):
    """The permutation `jnp.lexsort((times, ~ok))` of one patient's events besides
    observations: real events first, by time, ties in input order.

    There are few (doses and a few input breakpoints), so each event's position is counted
    directly, O(q²) elementwise comparisons and one scatter, instead of a sort (on a large
    cohort the sort costs more than it should). Many events fall back to the sort.
    """
    q = times.shape[0]
    if q > SORT_FREE_MAX:
        return jnp.lexsort((times, ~ok))
    i32 = jnp.int32
    n_valid = jnp.sum(ok, dtype=i32)
    invalid_before = jnp.cumsum(~ok, dtype=i32) - ~ok
    idx = jnp.arange(q)
    valid_before = jnp.sum(ok[None, :] & ((times[None, :] < times[:, None])
                                          | ((times[None, :] == times[:, None])
                                             & (idx[None, :] < idx[:, None]))), axis=1, dtype=i32)
    pos = jnp.where(ok, valid_before, n_valid + invalid_before)
    return jnp.zeros_like(pos).at[pos].set(jnp.arange(q, dtype=i32), unique_indices=True)


class Prepared(eqx.Module):
    """A batch's save times and its other events, patients on the last axis: what the
    batch integrator walks (and the diffrax backend's segments are cut from).

    Save times are in order already; the other events (boluses, infusion starts and
    stops, input breakpoints; Q of them) are few, so only they are sorted, per patient,
    and nothing of size (events x patients) beyond the save times is built.

    ts (N, M): save times as solved (nondecreasing, within [t0, t_end]); ts_lanes (M, N):
    the same, patients last, or (M,) when all patients share them; t0, t_end (1, N): start
    and end. q_t (Q, N): the other events' times, sorted (observations come first at
    equal times), +inf for unused slots; q_jump, q_state (Q, N): the bolus each adds (0
    for the others) and the state it enters. Segment k runs from other event k - 1 (t0
    for k = 0) to other event k; rate (Q + 1, S, N): infusion rates on it (None without
    infusions); u_a, u_slope (Q + 1, C, N): inputs on it, u(t) = u_a + (t - anchor)
    u_slope, anchor (Q + 1, N) its start (None when the model has no inputs or the
    schedule no input breakpoints: inputs are then zero). dtmax (1, N): the step cap of
    `StepSizeController(dtmax="obs")` (None otherwise).
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
    dtmax: jax.Array | None = None


def prepare(model: MechanisticModel, batch: Batch, *, obs_cap: bool = False) -> Prepared:
    """Save times and the sorted other events with per-segment infusion rates and inputs.

    Conventions of every backend: an observation at a dose time sees the state before the
    dose; events are clipped to [t0, last save time]. With `obs_cap`, also each
    patient's median observation spacing (`Prepared.dtmax`)."""
    dtype, t0, has_inf = batch.dtype, batch.t0, batch.has_infusions
    sched = batch.batched_schedule()
    save_ts, save_mask = batch.save_ts, batch.save_mask
    n = batch.n
    m = save_ts.shape[-1]
    s = model.n_states
    ts, t_end = save_times(save_ts, save_mask, t0, dtype)
    t_end = jnp.broadcast_to(t_end, (n,))
    ev = dose_events(model, sched, has_inf, dtype)
    times, ok, jump, state = ev.times, ev.ok, ev.jump, ev.state
    n_k = sched.input_times.shape[1]
    if times.shape[1] == 0:  # nothing but observations: one unused slot
        times, ok = jnp.zeros((n, 1), dtype), jnp.zeros((n, 1), bool)
        jump, state = jnp.zeros((n, 1), dtype), jnp.zeros((n, 1), jnp.int32)
    q = times.shape[1]
    times = jnp.where(ok, jnp.clip(times, t0, t_end[:, None]), jnp.inf)
    order = jax.vmap(event_order)(times, ok)
    q_t = jnp.take_along_axis(times, order, axis=1)
    q_jump = jnp.take_along_axis(jump, order, axis=1)
    q_state = jnp.take_along_axis(state, order, axis=1)
    # segment k: from anchor[k] (t0, then each other event) to seg_end[k]
    anchor = jnp.concatenate([jnp.full((n, 1), t0, dtype), q_t], axis=1)
    anchor = jnp.where(jnp.isfinite(anchor), anchor, t_end[:, None])  # never reached
    seg_end = jnp.concatenate([q_t, jnp.full((n, 1), jnp.inf, dtype)], axis=1)
    rate = None
    if has_inf:
        # an infusion runs on [start, start + duration)
        stop = sched.dose_times + ev.dur
        active = (ev.is_inf[:, None, :] & (sched.dose_times[:, None, :] <= anchor[..., None])
                  & (anchor[..., None] < stop[:, None, :]))
        r = jnp.where(active, (sched.dose_rates * ev.d_scale)[:, None, :], 0).astype(dtype)
        rate = jnp.einsum("nkd,nds->nks", r, jax.nn.one_hot(ev.d_state, s, dtype=dtype))
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

    dtmax = None
    if obs_cap:
        dtmax = jnp.broadcast_to(obs_dtmax(save_ts, save_mask, dtype), (n,))[None, :]
    return Prepared(ts=jnp.broadcast_to(ts, (n, m)), ts_lanes=ts.T,
                    t0=jnp.full((1, n), t0, dtype),
                    t_end=t_end[None, :], q_t=q_t.T, q_jump=q_jump.T, q_state=q_state.T,
                    rate=last(rate), anchor=None if u_a is None else anchor.T,
                    u_a=last(u_a), u_slope=last(u_slope), dtmax=dtmax)
