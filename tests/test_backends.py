"""The backend contract, the same test over every backend: a `Solution` with per-patient
`Status`; values against an independent piecewise scipy solve (boluses at observation
times, infusions, constant and linear inputs); a failing patient flagged and isolated;
padded save slots zero."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from hybrid_twin import Schedule, Solution, SolverOptions, Status, StepSizeController, simulate
from hybrid_twin.models import BergmanMinimal, TwoCompartment
from hybrid_twin.population import sample_params
from hybrid_twin.solve import BACKENDS, RK4, Backend, Diffrax, Ensemble, Kernel

ALL = [Diffrax(), Ensemble(), Kernel()]
IDS = [b.name for b in ALL]


def test_every_registered_backend_is_covered():
    assert set(BACKENDS) == set(IDS)
    for b in ALL:
        assert isinstance(b, Backend) and b.methods and b.differentiation


_REFERENCES: dict = {}


def scipy_reference(model, theta, doses, ts, inputs=(), interpolation="constant"):
    """`_scipy_reference`, computed once per case (every backend is compared with it)."""
    key = (type(model).__name__, tuple(np.asarray(theta).tolist()), repr(doses),
           tuple(np.asarray(ts).tolist()), repr(inputs), interpolation)
    if key not in _REFERENCES:
        _REFERENCES[key] = _scipy_reference(model, theta, doses, ts, inputs, interpolation)
    return _REFERENCES[key]


def _scipy_reference(model, theta, doses, ts, inputs=(), interpolation="constant"):
    """One patient by scipy's DOP853, piecewise between events, written independently of
    hybrid_twin's event handling: boluses as jumps after any sample at the same time,
    infusions as constant rates over [start, start + amount / rate), inputs constant or
    linear between breakpoints (0 before the first when constant)."""
    p = model.param_dict(jnp.asarray(theta))
    routes = {d.name: (model.index("state", d.state), d.scale) for d in model.dose_targets}
    names = model.input_names
    in_t = np.array([t for t, _ in inputs], float)
    in_v = np.array([v for _, v in inputs], float).reshape(len(inputs), len(names))

    def u_at(t):
        if not len(inputs):
            return np.zeros(len(names))
        if interpolation == "linear":
            return np.array([np.interp(t, in_t, in_v[:, c]) for c in range(len(names))])
        k = np.searchsorted(in_t, t, side="right") - 1
        return in_v[k] if k >= 0 else np.zeros(len(names))

    f = jax.jit(lambda t, y, u: jnp.stack([jnp.asarray(d, jnp.float64) for d in
                                           model.vector_field(t, tuple(y), p, dict(zip(names, u)))]))

    def rate_at(t):
        r = np.zeros(model.n_states)
        for d in doses:
            if len(d) == 4 and d[0] <= t < d[0] + d[1] / d[3]:
                i, sc = routes[d[2]]
                r[i] += d[3] * sc
        return r

    cuts = sorted({0.0, *[d[0] for d in doses], *[d[0] + d[1] / d[3] for d in doses if len(d) == 4],
                   *in_t.tolist(), float(ts[-1])})
    y = np.array([float(v) for v in model.initial_state(p)])
    out = np.zeros((len(ts), model.n_states))
    for a, b in zip(cuts[:-1], cuts[1:]):
        for j in np.flatnonzero(np.isclose(ts, a)):
            out[j] = y
        for d in doses:
            if len(d) == 3 and d[0] == a:
                i, sc = routes[d[2]]
                y[i] += d[1] * sc
        mid = 0.5 * (a + b)
        inside = [t for t in ts if a < t < b]
        sol = solve_ivp(lambda t, yy: np.asarray(f(t, yy, u_at(t if interpolation == "linear"
                                                               else mid))) + rate_at(mid),
                        (a, b), y, method="DOP853", rtol=1e-11, atol=1e-12,
                        t_eval=[*inside, b])
        for t, col in zip(inside, sol.y.T):
            out[np.flatnonzero(ts == t)] = col
        y = sol.y[:, -1]
    for j in np.flatnonzero(np.isclose(ts, cuts[-1])):
        out[j] = y
    return out


OPTS = dict(controller=StepSizeController(rtol=1e-10, atol=1e-12), max_steps=100_000)


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.max(np.abs(a - b) / (np.abs(b) + 1e-6 * np.max(np.abs(b))))


@pytest.mark.parametrize("backend", ALL, ids=IDS)
def test_doses_infusions_and_samples_at_dose_times(backend):
    model = TwoCompartment()
    theta = np.asarray(sample_params(model, jax.random.PRNGKey(0), 3))
    plans = [
        [(0.0, 200.0, "depot"), (12.0, 200.0, "depot"), (6.0, 300.0, "central", 150.0)],
        [(3.0, 100.0, "central"), (8.0, 500.0, "central", 250.0)],
        [(0.0, 150.0, "depot")],
    ]
    ts = np.array([[0.0, 1.0, 3.0, 6.0, 7.0, 8.5, 12.0, 13.0, 24.0],
                   [0.0, 3.0, 3.0, 8.0, 9.0, 10.0, 20.0, 0.0, 0.0],
                   [0.0, 2.0, 4.0, 8.0, 16.0, 0.0, 0.0, 0.0, 0.0]])
    mask = np.array([[True] * 9, [True] * 7 + [False] * 2, [True] * 5 + [False] * 4])
    sched = Schedule.stack([Schedule.build(model, d, n_dose_slots=3) for d in plans])
    sol = simulate(model, theta, sched, ts, mask,
                   options=SolverOptions(**OPTS, backend=backend))
    assert isinstance(sol, Solution)
    assert sol.ys.shape == (3, 9, 3) and sol.status.shape == (3,)
    assert np.all(np.asarray(sol.status) == Status.OK)
    assert np.all(np.asarray(sol.ys)[~mask] == 0)
    for i in range(3):
        k = int(mask[i].sum())
        ref = scipy_reference(model, theta[i], plans[i], ts[i, :k])
        assert rel(np.asarray(sol.ys)[i, :k], ref) < 1e-7, i
    # a sample at a dose time is taken before the dose (trough)
    assert float(sol.ys[0, 6, 0]) < 200.0 and float(sol.ys[1, 1, 1]) == float(sol.ys[1, 2, 1])


@pytest.mark.parametrize("interpolation", ["constant", "linear"])
@pytest.mark.parametrize("backend", ALL, ids=IDS)
def test_inputs(backend, interpolation):
    model = BergmanMinimal()
    theta = np.asarray(sample_params(model, jax.random.PRNGKey(1), 2))
    inputs = [(100.0, [0.5]), (160.0, [2.0]), (220.0, [0.0])]
    doses = [(130.0, 1.0, "insulin")]
    sched = Schedule.build(model, doses, inputs=inputs, interpolation=interpolation)
    ts = np.array([0.0, 100.0, 130.0, 150.0, 200.0, 300.0, 480.0])
    sol = simulate(model, theta, sched, ts, options=SolverOptions(**OPTS, backend=backend))
    assert np.all(np.asarray(sol.status) == Status.OK)
    for i in range(2):
        ref = scipy_reference(model, theta[i], doses, ts, inputs, interpolation)
        assert rel(sol.ys[i], ref) < 1e-7


@pytest.mark.parametrize("backend", ALL, ids=IDS)
def test_a_failing_patient_is_flagged_and_isolated(backend):
    from test_simulate import BlowUp

    model = BlowUp()
    k = np.array([[0.01], [0.02], [1.0], [0.03]])
    ts = np.linspace(0.0, 10.0, 11)
    sol = simulate(model, k, None, ts,
                   options=SolverOptions(controller=StepSizeController(1e-8, 1e-10),
                                         max_steps=2000, backend=backend))
    status = np.asarray(sol.status)
    assert status[2] in (Status.MAX_STEPS, Status.NONFINITE, Status.SOLVER_FAILED)
    assert np.all(status[[0, 1, 3]] == Status.OK)
    for i in (0, 1, 3):
        np.testing.assert_allclose(np.asarray(sol.ys[i, :, 0]), 1.0 / (1.0 - k[i, 0] * ts),
                                   rtol=1e-7)
    np.testing.assert_allclose(np.asarray(sol.ys[2, 0, 0]), 1.0)
    # the slots it never reached are NaN, not a stale (or zero) state
    assert np.all(np.isnan(np.asarray(sol.ys[2, -1])))


@pytest.mark.parametrize("backend", ALL, ids=IDS)
def test_the_step_limit_is_per_patient_in_total(backend):
    """A patient that needs more than max_steps steps in all is flagged MAX_STEPS on
    every backend, whichever segment it runs out in."""
    model = BergmanMinimal()
    theta = np.asarray(model.typical_params())[None]
    sched = Schedule.build(model, [(60.0, 50.0, "meal"), (300.0, 50.0, "meal")])
    ts = np.arange(0.0, 601.0, 30.0)
    ctrl = StepSizeController(1e-10, 1e-12)
    full = simulate(model, theta, sched, ts,
                    options=SolverOptions(controller=ctrl, backend=backend))
    need = int(full.num_steps[0])
    assert int(full.status[0]) == Status.OK and need > 40
    short = simulate(model, theta, sched, ts, options=SolverOptions(
        controller=ctrl, max_steps=need // 2, backend=backend))
    assert int(short.status[0]) == Status.MAX_STEPS


def test_ensemble_and_kernel_share_one_integrator():
    """The ensemble backend (arrays under XLA) and the kernel backend (a Pallas kernel) run
    the same integrator: the same steps and, in float64, the same numbers."""
    from test_kernel import glucose_cohort

    model, theta, sched, ts = glucose_cohort(16, seed=4)
    for method in ("tsit5", RK4(0.5)):
        opts = dict(method=method, controller=StepSizeController(1e-8, 1e-10),
                    max_steps=10_000)
        a = simulate(model, theta, sched, ts, options=SolverOptions(**opts, backend="ensemble"))
        b = simulate(model, theta, sched, ts, options=SolverOptions(**opts, backend="kernel"))
        np.testing.assert_array_equal(np.asarray(a.num_steps), np.asarray(b.num_steps))
        np.testing.assert_array_equal(np.asarray(a.ys), np.asarray(b.ys))
