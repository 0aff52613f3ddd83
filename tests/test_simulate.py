"""The solver entry point: batching, gradients, failure isolation, input checks."""

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_twin import RK4, Diffrax, Schedule, SolverOptions, Status, StepSizeController, simulate
from hybrid_twin.models import BergmanMinimal, OneCompartment, TwoCompartment
from hybrid_twin.models.base import DoseTarget, MechanisticModel, Observable, Parameter, State
from hybrid_twin.population import sample_params

from gradcheck import central_fd, check_gradients


def random_schedules(model, n, rng):
    scheds, times, masks = [], [], []
    m_max = 30
    for i in range(n):
        n_doses = rng.integers(1, 5)
        doses = []
        for _ in range(n_doses):
            t = float(rng.uniform(0, 40))
            if rng.random() < 0.3:
                doses.append((t, float(rng.uniform(50, 300)), "central", float(rng.uniform(20, 200))))
            else:
                doses.append((t, float(rng.uniform(50, 300)), rng.choice(["depot", "central"])))
        scheds.append(Schedule.build(model, doses, n_dose_slots=5))
        m = rng.integers(5, m_max + 1)
        ts = np.sort(rng.uniform(0, 48, m))
        times.append(np.pad(ts, (0, m_max - m), constant_values=0.0))
        masks.append(np.arange(m_max) < m)
    return Schedule.stack(scheds), np.stack(times), np.stack(masks), scheds


def test_batch_equals_single_solves():
    model = TwoCompartment()
    rng = np.random.default_rng(0)
    n = 64
    params = np.asarray(sample_params(model, jax.random.PRNGKey(1), n))
    sched, ts, mask, singles = random_schedules(model, n, rng)
    opts = SolverOptions(controller=StepSizeController(rtol=1e-8, atol=1e-10))
    batch = simulate(model, params, sched, ts, mask, options=opts)
    assert batch.ys.shape == (n, ts.shape[1], 3)
    assert np.all(np.asarray(batch.status) == 0)
    for i in range(0, n, 16):  # each single solve compiles for its own number of samples
        m = mask[i].sum()
        one = simulate(model, params[i], singles[i], ts[i, :m], options=opts)
        np.testing.assert_allclose(np.asarray(batch.ys[i, :m]), np.asarray(one.ys),
                                   rtol=1e-10, atol=1e-12)


def test_shared_schedule_broadcasts():
    model = OneCompartment()
    params = np.asarray(sample_params(model, jax.random.PRNGKey(0), 5))
    sched = Schedule.build(model, [(0.0, 100.0, "depot")])
    ts = np.linspace(0, 24, 9)
    sol = simulate(model, params, sched, ts)
    assert sol.ys.shape == (5, 9, 2)
    np.testing.assert_allclose(sol.ys[2], simulate(model, params[2], sched, ts).ys,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("adjoint", ["reverse", "forward"])
def test_gradients_glucose_from_steady_state(adjoint):
    """Every parameter's sensitivity of glucose and insulin at each sample, from the
    basal steady state (DESIGN.md numerical pitfall), against central differences."""
    model = BergmanMinimal()
    theta = model.typical_params(p3=6e-5)
    sched = Schedule.build(model, [(300.0, 60.0, "meal"), (300.0, 1.5, "insulin"),
                                   (600.0, 40.0, "meal")])
    ts = jnp.arange(0.0, 901.0, 30.0)
    opts = SolverOptions(controller=StepSizeController(rtol=1e-10, atol=1e-12, dtmax="obs"), differentiation=adjoint)

    def obs(th):
        return simulate(model, th, sched, ts, options=opts).observables(model, th)

    jac_fn = jax.jacrev(obs) if adjoint == "reverse" else jax.jacfwd(obs)
    jac = np.asarray(jac_fn(jnp.asarray(theta)))
    fd = central_fd(obs, theta)
    check_gradients(jac, fd, theta, 1e-4)
    assert np.all(np.abs(jac[10:, 0, :]).max(axis=0)[[0, 1, 2, 3, 4, 7, 8, 9, 10]] > 0)


def test_gradients_pk_every_parameter():
    model = TwoCompartment()
    theta = model.typical_params(ka=0.8)
    sched = Schedule.build(model, [(0.0, 100.0, "depot"), (12.0, 80.0, "central", 40.0)])
    ts = jnp.linspace(0.5, 36.0, 20)
    opts = SolverOptions(controller=StepSizeController(rtol=1e-10, atol=1e-12))

    def conc(th):
        return simulate(model, th, sched, ts, options=opts).observables(model, th)[:, 0]

    jac = np.asarray(jax.jacrev(conc)(jnp.asarray(theta)))
    check_gradients(jac[:, None, :], central_fd(conc, theta)[:, None, :], theta, 1e-5)


class BlowUp(MechanisticModel):
    """dy/dt = k y^2, y(0) = 1: finite-time blow-up at t = 1/k."""

    time_unit: ClassVar[str] = "h"
    states: ClassVar = (State("y", "1"),)
    parameters: ClassVar = (Parameter("k", "1/h", 0.01, "test", 0.0, 1e3),)
    observables: ClassVar = (Observable("y", "1", lambda y, p: y[0]),)
    dose_targets: ClassVar = (DoseTarget("y", "y", "1"),)

    def initial_state(self, p):
        return (1.0 + 0.0 * p["k"],)

    def fluxes(self, t, y, p, u):
        return {"growth": p["k"] * y[0] ** 2}

    def derivatives(self, y, p, u, flux):
        return (flux["growth"],)


@pytest.mark.parametrize("backend", ["diffrax", "ensemble"])
def test_failing_patient_is_flagged_and_isolated(backend):
    model = BlowUp()
    k = np.array([[0.01], [0.02], [1.0], [0.03]])
    ts = np.linspace(0.0, 10.0, 11)
    sol = simulate(model, k, None, ts, options=SolverOptions(max_steps=512, backend=backend))
    status = np.asarray(sol.status)
    assert status[2] != Status.OK
    assert np.all(status[[0, 1, 3]] == Status.OK)
    for i in (0, 1, 3):
        exact = 1.0 / (1.0 - k[i, 0] * ts)
        np.testing.assert_allclose(np.asarray(sol.ys[i, :, 0]), exact, rtol=1e-5)
    # the blow-up happens at t = 1; samples before it are still right
    np.testing.assert_allclose(np.asarray(sol.ys[2, 0, 0]), 1.0)


def test_stiff_solver_agrees():
    model = BergmanMinimal()
    theta = model.typical_params()
    sched = Schedule.build(model, [(60.0, 50.0, "meal"), (60.0, 1.0, "insulin")])
    ts = np.arange(0.0, 600.0, 10.0)
    a = simulate(model, theta, sched, ts, options=SolverOptions(controller=StepSizeController(rtol=1e-9, atol=1e-10)))
    b = simulate(model, theta, sched, ts,
                 options=SolverOptions(method="kvaerno5", controller=StepSizeController(rtol=1e-9, atol=1e-10)))
    assert int(b.status) == 0
    np.testing.assert_allclose(np.asarray(b.ys[:, 0]), np.asarray(a.ys[:, 0]), rtol=1e-6)


@pytest.mark.parametrize("backend", ["diffrax", "ensemble"])
def test_linear_input_interpolation(backend):
    model = BergmanMinimal()
    theta = model.typical_params(p3=0.0, k_abs=0.05)
    # carb_rate ramps 0 -> 2 g/min over 60 min, then back to 0 over the next 60
    sched = Schedule.build(model, inputs=[(100.0, [0.0]), (160.0, [2.0]), (220.0, [0.0])],
                           interpolation="linear")
    ts = np.array([100.0, 160.0, 220.0, 400.0, 2000.0])
    sol = simulate(model, theta, sched, ts,
                   options=SolverOptions(controller=StepSizeController(rtol=1e-10, atol=1e-12), backend=backend))
    q = np.asarray(sol.ys[:, 3])
    k = 0.05
    # dQ/dt = -k Q + r t' on the ramp up: Q(60) = r/k (60 - (1 - e^{-60k})/k) with r = 2/60
    r = 2.0 / 60.0
    np.testing.assert_allclose(q[1], r / k * (60 - (1 - np.exp(-60 * k)) / k), rtol=1e-8)
    assert q[0] == 0.0
    assert q[4] < 1e-10


def test_invalid_inputs_raise_clear_errors():
    model = OneCompartment()
    theta = model.typical_params()
    ts = np.linspace(0, 10, 5)
    with pytest.raises(ValueError, match="n_params=3"):
        simulate(model, theta[:2], None, ts)
    with pytest.raises(ValueError, match="non-finite.*'CL'"):
        simulate(model, np.array([1.0, np.nan, 3.0]), None, ts)
    with pytest.raises(ValueError, match="non-decreasing"):
        simulate(model, theta, None, ts[::-1])
    with pytest.raises(KeyError, match="no dose target 'gut'.*depot, central"):
        Schedule.build(model, [(0.0, 1.0, "gut")])
    with pytest.raises(ValueError, match="dose 0: amount"):
        Schedule.build(model, [(0.0, -1.0, "depot")])
    bad = Schedule.build(model, [(0.0, 1.0, "depot")])
    with pytest.raises(ValueError, match="dose slot 0: dose_times.*t0=1.0"):
        simulate(model, theta, bad, ts + 1.0, t0=1.0)
    with pytest.raises(ValueError, match="batched with 3 patients"):
        simulate(model, np.stack([theta] * 2), None, np.stack([ts] * 3))


def test_simulate_is_jittable_and_vmappable_inside_user_code():
    model = OneCompartment()
    sched = Schedule.build(model, [(0.0, 100.0, "depot")])
    ts = jnp.linspace(0.0, 12.0, 7)

    @jax.jit
    def total(theta):
        return simulate(model, theta, sched, ts).ys.sum()

    thetas = jnp.asarray(sample_params(model, jax.random.PRNGKey(3), 4))
    np.testing.assert_allclose(jax.vmap(total)(thetas),
                               [total(t) for t in thetas], rtol=1e-12)


def test_save_chunks_do_not_change_the_solution():
    """Splitting the solve every few observations (ties included) changes nothing."""
    model = OneCompartment()
    theta = model.typical_params()
    sched = Schedule.build(model, [(0.0, 100.0, "depot"), (2.0, 50.0, "central"),
                                   (2.0, 50.0, "depot")])
    ts = np.array([0.0, 0.5, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 4.0, 6.0, 6.0, 9.0, 12.0])
    mask = np.ones(ts.shape, bool)
    mask[-2:] = False
    ref = simulate(model, theta, sched, ts, mask,
                   options=SolverOptions(controller=StepSizeController(rtol=1e-10, atol=1e-12), backend=Diffrax(save_chunk=100)))
    for chunk in (1, 2, 3):
        sol = simulate(model, theta, sched, ts, mask,
                       options=SolverOptions(controller=StepSizeController(rtol=1e-10, atol=1e-12), backend=Diffrax(save_chunk=chunk)))
        np.testing.assert_allclose(np.asarray(sol.ys)[mask], np.asarray(ref.ys)[mask],
                                   rtol=1e-8, atol=1e-10)
    c = np.asarray(ref.observables(model, theta))[:, 0]
    assert c[5] == c[6] == c[7]  # three samples at the dose time: all troughs


def test_ensemble_backend_equals_diffrax_on_a_random_batch():
    """Different schedules (boluses, infusions), observation times and parameters."""
    model = TwoCompartment()
    rng = np.random.default_rng(5)
    params = np.asarray(sample_params(model, jax.random.PRNGKey(7), 48))
    sched, ts, mask, singles = random_schedules(model, 48, rng)
    a = simulate(model, params, sched, ts, mask, options=SolverOptions(controller=StepSizeController(rtol=1e-10, atol=1e-12)))
    b = simulate(model, params, sched, ts, mask,
                 options=SolverOptions(controller=StepSizeController(rtol=1e-10, atol=1e-12), backend="ensemble"))
    assert np.all(np.asarray(b.status) == 0)
    ya, yb = np.asarray(a.ys)[mask], np.asarray(b.ys)[mask]
    np.testing.assert_allclose(yb, ya, rtol=1e-6, atol=1e-8)
    one = simulate(model, params[3], singles[3], ts[3, :mask[3].sum()],
                   options=SolverOptions(controller=StepSizeController(rtol=1e-10, atol=1e-12), backend="ensemble"))
    np.testing.assert_allclose(np.asarray(one.ys), np.asarray(b.ys[3, :mask[3].sum()]),
                               rtol=1e-6, atol=1e-8)


def test_ensemble_forward_mode_gradients_from_steady_state():
    model = BergmanMinimal()
    theta = model.typical_params(p3=6e-5)
    sched = Schedule.build(model, [(300.0, 60.0, "meal"), (300.0, 1.5, "insulin"),
                                   (600.0, 40.0, "meal")])
    ts = jnp.arange(0.0, 901.0, 30.0)
    opts = SolverOptions(controller=StepSizeController(rtol=1e-10, atol=1e-12), backend="ensemble")

    def obs(th):
        return simulate(model, th, sched, ts, options=opts).observables(model, th)

    jac = np.asarray(jax.jacfwd(obs)(jnp.asarray(theta)))
    check_gradients(jac, central_fd(obs, theta), theta, 1e-4)


def test_backends_refuse_what_they_cannot_honour():
    with pytest.raises(ValueError, match="ensemble backend runs tsit5, dopri5, rk4 only, "
                                         "not kvaerno5"):
        SolverOptions(method="kvaerno5", backend="ensemble")
    from typing import ClassVar

    from hybrid_twin.solve import Ensemble

    class ForwardOnly(Ensemble):  # a backend that declares forward mode only
        name: ClassVar[str] = "forward_only"
        differentiation: ClassVar[tuple[str, ...]] = ("forward",)

    with pytest.raises(ValueError, match="forward_only backend differentiates in forward "
                                         "mode only, not reverse"):
        SolverOptions(backend=ForwardOnly(), differentiation="reverse")
    with pytest.raises(ValueError, match="differentiation must be one of"):
        SolverOptions(differentiation="adjoint")
    with pytest.raises(ValueError, match="diffrax backend runs tsit5, dopri5, kvaerno5 only"):
        SolverOptions(method=RK4(1.0))


def test_event_order_without_sort_equals_lexsort():
    """The counted order of the dose events equals the sort's, with ties among doses and
    masked doses."""
    from hybrid_twin.solve._core import event_order

    rng = np.random.default_rng(3)
    q = 9
    for _ in range(200):
        times = rng.choice([0.0, 1.0, 1.5, 2.0, 4.0, 9.0], q)
        ok = rng.random(q) < 0.8
        times = jnp.asarray(np.where(ok, times, np.inf))
        got = event_order(times, jnp.asarray(ok))
        want = jnp.lexsort((times, ~jnp.asarray(ok)))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_has_infusions_is_read_from_a_concrete_schedule_and_checked():
    """Inside a caller's jit the schedule is traced and infusion windows are built unless
    the caller says there are none; a wrong "none" is refused where it can be checked."""
    model = OneCompartment()
    theta = np.asarray(sample_params(model, jax.random.PRNGKey(0), 3))
    bolus = Schedule.build(model, [(0.0, 100.0, "depot")])
    infusion = Schedule.build(model, [(0.0, 100.0, "central", 50.0)])
    ts = np.linspace(0.0, 12.0, 7)
    assert bolus.has_infusions() is False and infusion.has_infusions() is True
    with pytest.raises(ValueError, match="has_infusions=False, but the schedule has"):
        simulate(model, theta, infusion, ts, has_infusions=False)
    fast = jax.jit(lambda th, sc: simulate(model, th, sc, ts, has_infusions=False).ys)
    np.testing.assert_array_equal(np.asarray(fast(theta, bolus)),
                                  np.asarray(simulate(model, theta, bolus, ts).ys))
