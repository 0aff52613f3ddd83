"""Nonlinear PK models (Michaelis-Menten elimination, enterohepatic recirculation) against
an independent scipy solve of the same equations, their mass balance, their linear
limits, their gradients and a virtual cohort."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from hybrid_twin import Schedule, SolverOptions, StepSizeController, simulate
from hybrid_twin.data.virtual import DoseSpec, NoiseModel, ScheduleSpec, virtual_cohort
from hybrid_twin.models import EnterohepaticMM, OneCompartmentMM, get_model

from gradcheck import central_fd, check_gradients

BACKENDS = pytest.mark.parametrize("backend", ["diffrax", "ensemble"])

# three oral doses (the first with breakfast at 7 h) and an IV infusion, over two days
ORAL = [(7.0, 450.0), (20.0, 300.0), (32.0, 450.0)]
INFUSION = [(26.0, 200.0, 100.0)]  # start (h), amount (mg), rate (mg/h)
DOSES = [(t, a, "depot") for t, a in ORAL] + [(t, a, "central", r) for t, a, r in INFUSION]
TS = np.round(np.arange(0.0, 48.0 + 1e-9, 0.1), 10)
MEALS = [7.0, 12.0, 19.0, 31.0, 36.0, 43.0]


def tight(backend="diffrax"):
    return SolverOptions(controller=StepSizeController(rtol=1e-10, atol=1e-12), backend=backend)


def reference(theta, ts, oral=ORAL, infusion=INFUSION, meals=(7.0, 12.0, 19.0), sd=0.5):
    """The EnterohepaticMM equations written out, solved by scipy's DOP853 piecewise
    between dose events; a sample at a bolus time is taken before the bolus."""
    ka, vmax, km, v, k_bile, k_gb = theta
    kappa = (24.0 / (2.0 * np.pi * sd)) ** 2

    def rhs(t, y, rate):
        depot, central, gb, _ = y
        c = central / v
        s = sum(np.exp(kappa * (np.cos(2.0 * np.pi * (t - m) / 24.0) - 1.0)) for m in meals)
        absorption, elimination = ka * depot, vmax * c / (km + c)
        bile, emptying = k_bile * central, k_gb * s * gb
        return [emptying - absorption, absorption - elimination - bile + rate,
                bile - emptying, elimination]

    events = sorted({float(ts[0]), float(ts[-1])} | {t for t, _ in oral}
                    | {t for t, _, _ in infusion} | {t + a / r for t, a, r in infusion})
    y = np.zeros(4)
    out = np.full((len(ts), 4), np.nan)
    out[ts == ts[0]] = y
    for a, b in zip(events[:-1], events[1:]):
        y[0] += sum(amt for t, amt in oral if t == a)
        rate = sum(r for t, amt, r in infusion if t <= a < t + amt / r)
        sol = solve_ivp(rhs, (a, b), y, method="DOP853", rtol=1e-12, atol=1e-12,
                        dense_output=True, max_step=0.25, args=(rate,))
        assert sol.success
        inside = (ts > a) & (ts <= b)
        if inside.any():
            out[inside] = sol.sol(ts[inside]).T
        y = sol.y[:, -1].copy()
    assert not np.isnan(out).any()
    return out


def dosed_so_far(ts, oral=ORAL, infusion=INFUSION):
    total = sum(np.where(ts > t, amt, 0.0) for t, amt in oral)
    return total + sum(r * np.clip(ts - t, 0.0, amt / r) for t, amt, r in infusion)


def rel_err(a, b, floor):
    return np.max(np.abs(a - b) / np.maximum(np.abs(b), floor))


def local_maxima(ts, c):
    i = np.flatnonzero((c[1:-1] > c[:-2]) & (c[1:-1] > c[2:])) + 1
    return ts[i]


@pytest.fixture(scope="module")
def solutions():
    """The shared schedule solved on each backend with the typical parameters."""
    model = EnterohepaticMM()
    theta = model.typical_params()
    sched = Schedule.build(model, DOSES)
    sols = {b: simulate(model, theta, sched, TS, options=tight(b)) for b in ("diffrax", "ensemble")}
    return model, theta, sched, sols


def test_registered_and_declared():
    model = get_model("pkpd.EnterohepaticMM")
    assert isinstance(model, EnterohepaticMM)
    assert isinstance(get_model("pkpd.OneCompartmentMM"), OneCompartmentMM)
    assert model.state_names == ("depot", "central", "gallbladder", "eliminated")
    assert model.param_names == ("ka", "Vmax", "Km", "V", "k_bile", "k_gb")
    assert model.observable_names == ("concentration",)
    assert model.dose_target_names == ("depot", "central")
    theta = model.typical_params()
    p = model.param_dict(jnp.asarray(theta))
    y = tuple(jnp.asarray(v) for v in (10.0, 200.0, 30.0, 5.0))
    assert set(model.fluxes(12.0, y, p, {})) == {
        "absorption", "elimination", "biliary_excretion", "gallbladder_emptying"}
    assert all(float(v) == 0.0 for v in model.initial_state(p))
    # the emptying signal is 1 at each meal and negligible between meals
    s = np.asarray(model.emptying_signal(jnp.array([7.0, 12.0, 19.0, 31.0, 3.0, 15.5, 24.0])))
    np.testing.assert_allclose(s[:4], 1.0, rtol=1e-12)
    assert np.all(s[4:] < 1e-6)


@BACKENDS
def test_matches_scipy_reference(solutions, backend):
    model, theta, _, sols = solutions
    sol = sols[backend]
    assert int(sol.status) == 0
    ys = np.asarray(sol.ys)
    ref = reference(theta, TS)
    conc = np.asarray(sol.observables(model, theta))[:, 0]
    assert rel_err(conc, ref[:, 1] / theta[3], 1e-6) < 1e-5
    for k in range(4):
        assert rel_err(ys[:, k], ref[:, k], 1e-4) < 1e-5, model.state_names[k]
    # nonlinearity matters: at the first peak, clearance is about half of Vmax / Km
    c_peak = conc[TS < 12.0].max()
    assert 1.8 < (theta[2] + c_peak) / theta[2] < 2.6


@BACKENDS
def test_mass_balance(solutions, backend):
    _, _, _, sols = solutions
    total = np.asarray(sols[backend].ys).sum(axis=1)
    dosed = dosed_so_far(TS)
    np.testing.assert_allclose(total, dosed, rtol=1e-8, atol=1e-10)


def test_linear_limit_is_one_compartment():
    """Km >> C and no biliary excretion: OneCompartment's closed form, CL = Vmax / Km;
    OneCompartmentMM agrees with EnterohepaticMM without biliary excretion."""
    model = EnterohepaticMM()
    ka, cl, v, km = 1.2, 3.5, 35.0, 1e8
    theta = model.typical_params(ka=ka, Vmax=cl * km, Km=km, V=v, k_bile=0.0)
    sol = simulate(model, theta, Schedule.build(model, DOSES), TS, options=tight())
    conc = np.asarray(sol.observables(model, theta))[:, 0]
    k = cl / v
    ref = 0.0
    for t_d, amt in ORAL:
        dt = TS - t_d
        ref = ref + np.where(dt > 0, amt * ka / (v * (ka - k))
                             * (np.exp(-k * dt) - np.exp(-ka * dt)), 0.0)
    for start, amt, rate in INFUSION:
        dur = amt / rate
        during = rate / cl * (1 - np.exp(-k * np.clip(TS - start, 0, dur)))
        after = rate / cl * (1 - np.exp(-k * dur)) * np.exp(-k * (TS - start - dur))
        ref = ref + np.where(TS <= start, 0.0, np.where(TS <= start + dur, during, after))
    assert rel_err(conc, ref, 1e-6) < 1e-5
    assert np.all(np.asarray(sol.ys)[:, 2] == 0.0)

    mm = OneCompartmentMM()
    theta_mm = mm.typical_params()
    one = simulate(mm, theta_mm, Schedule.build(mm, DOSES), TS, options=tight())
    theta_ehc = model.typical_params(k_bile=0.0)
    ehc = simulate(model, theta_ehc, Schedule.build(model, DOSES), TS, options=tight())
    np.testing.assert_allclose(np.asarray(one.observables(mm, theta_mm)),
                               np.asarray(ehc.observables(model, theta_ehc)),
                               rtol=1e-8, atol=1e-12)
    ref = reference(theta_ehc, TS)
    assert rel_err(np.asarray(one.ys), ref[:, :2], 1e-4) < 1e-5


def test_secondary_peaks_after_meals_and_none_without_emptying(solutions):
    model, theta, sched, sols = solutions
    conc = np.asarray(sols["diffrax"].observables(model, theta))[:, 0]
    peaks = local_maxima(TS, conc)
    # meals at 12, 19, 36 and 43 h come after an absorption phase (31 h is just before a dose)
    for meal in (12.0, 19.0, 36.0, 43.0):
        assert np.any((peaks > meal) & (peaks <= meal + 2.0)), (meal, peaks)

    theta0 = model.typical_params(k_gb=0.0)
    sol0 = simulate(model, theta0, sched, TS, options=tight())
    ys0 = np.asarray(sol0.ys)
    peaks0 = local_maxima(TS, ys0[:, 1])
    assert not any(np.any((peaks0 > m) & (peaks0 <= m + 2.0)) for m in MEALS), peaks0
    # nothing comes back: the depot holds only what is left of the oral doses, and the
    # gallbladder only fills
    ka = theta0[0]
    depot = sum(np.where(TS > t, amt * np.exp(-ka * (TS - t)), 0.0) for t, amt in ORAL)
    assert rel_err(ys0[:, 0], depot, 1e-4) < 1e-6
    assert np.all(np.diff(ys0[:, 2]) >= 0.0)
    # the recirculated drug is what the emptying brings back: more drug in the body
    ys = np.asarray(sols["diffrax"].ys)
    assert ys[-1, 1] > 1.2 * ys0[-1, 1]


def test_gradients_every_parameter():
    model = EnterohepaticMM()
    theta = model.typical_params()
    sched = Schedule.build(model, [(7.0, 450.0, "depot"), (20.0, 150.0, "central", 100.0)])
    ts = jnp.linspace(1.0, 30.0, 30)
    opts = tight()

    def conc(th):
        return simulate(model, th, sched, ts, options=opts).observables(model, th)[:, 0]

    jac = np.asarray(jax.jacrev(conc)(jnp.asarray(theta)))
    check_gradients(jac[:, None, :], central_fd(conc, theta)[:, None, :], theta, 1e-5)
    # every parameter moves the concentration
    assert np.all(np.abs(jac * theta).max(axis=0) > 1e-3)


def test_virtual_cohort():
    model = EnterohepaticMM()
    spec = ScheduleSpec(doses=(DoseSpec(7.0, 450.0, "depot", time_jitter=1.0, amount_cv=0.2),
                               DoseSpec(19.0, 300.0, "depot", time_jitter=1.0, amount_cv=0.2)),
                        obs_every=0.5, obs_start=0.5, horizon=48.0)
    vc = virtual_cohort(model, 50, schedule=spec,
                        noise=NoiseModel("proportional", proportional_sd=0.1), seed=0)
    pred = vc.true_predictions
    assert pred.shape == (50, 96)
    assert np.all(np.isfinite(pred)) and np.all(pred >= 0.0)
    assert np.all(np.isfinite(np.asarray(vc.cohort.obs_values)))
    assert np.std(np.log(vc.true_params), axis=0).min() > 0.1
    # the same patients' states: finite, non-negative, and the dose is all accounted for.
    # An emptied depot may sit a solver tolerance below zero (default atol 1e-8 mg; seen
    # -1.1e-8 mg for a patient with fast absorption), not more.
    c = vc.cohort
    sol = simulate(model, vc.true_params, c.schedule, c.obs_times)
    ys = np.asarray(sol.ys)
    assert np.all(np.asarray(sol.status) == 0)
    assert np.all(np.isfinite(ys)) and np.all(ys >= -1e-6)
    assert np.all(ys[..., 1:] >= 0.0)
    times = np.asarray(c.schedule.dose_times)
    amounts = np.asarray(c.schedule.dose_amounts)
    obs_t = np.asarray(c.obs_times)
    dosed = (amounts[:, None, :] * (obs_t[:, :, None] > times[:, None, :])).sum(-1)
    np.testing.assert_allclose(ys.sum(-1), dosed, rtol=1e-8, atol=1e-10)
