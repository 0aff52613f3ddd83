"""PK models against their closed-form solutions (superposition of single doses)."""

import numpy as np
import pytest

from hybrid_twin import Schedule, SolverOptions, StepSizeController, simulate
from hybrid_twin.models import OneCompartment, TwoCompartment

BACKENDS = pytest.mark.parametrize("backend", ["diffrax", "ensemble"])


def tight(backend):
    return SolverOptions(controller=StepSizeController(rtol=1e-10, atol=1e-12), backend=backend)


def one_cmt_oral(t, dose_t, amt, ka, cl, v):
    k = cl / v
    dt = t - dose_t
    c = amt * ka / (v * (ka - k)) * (np.exp(-k * dt) - np.exp(-ka * dt))
    return np.where(dt > 0, c, 0.0)


def one_cmt_iv(t, dose_t, amt, cl, v):
    dt = t - dose_t
    return np.where(dt > 0, amt / v * np.exp(-cl / v * dt), 0.0)


def two_cmt_rates(cl, v1, q, v2):
    k10, k12, k21 = cl / v1, q / v1, q / v2
    s = k10 + k12 + k21
    disc = np.sqrt(s * s - 4 * k10 * k21)
    return (s + disc) / 2, (s - disc) / 2, k21


def two_cmt_oral(t, dose_t, amt, ka, cl, v1, q, v2):
    a, b, k21 = two_cmt_rates(cl, v1, q, v2)
    dt = np.maximum(t - dose_t, 0.0)
    c = amt * ka / v1 * (
        (k21 - a) / ((ka - a) * (b - a)) * np.exp(-a * dt)
        + (k21 - b) / ((ka - b) * (a - b)) * np.exp(-b * dt)
        + (k21 - ka) / ((a - ka) * (b - ka)) * np.exp(-ka * dt)
    )
    return np.where(t - dose_t > 0, c, 0.0)


def two_cmt_iv(t, dose_t, amt, cl, v1, q, v2):
    a, b, k21 = two_cmt_rates(cl, v1, q, v2)
    dt = np.maximum(t - dose_t, 0.0)
    c = amt / v1 * ((a - k21) / (a - b) * np.exp(-a * dt) + (k21 - b) / (a - b) * np.exp(-b * dt))
    return np.where(t - dose_t > 0, c, 0.0)


def rel_err(a, b, floor=1e-9):
    return np.max(np.abs(a - b) / np.maximum(np.abs(b), floor))


@BACKENDS
def test_one_compartment_multiple_oral_and_iv_doses(backend):
    model = OneCompartment()
    ka, cl, v = 1.3, 2.9, 30.0
    theta = np.array([ka, cl, v])
    oral = [(0.0, 320.0), (8.0, 250.0), (16.0, 320.0)]
    iv = [(12.0, 100.0)]
    doses = [(t, a, "depot") for t, a in oral] + [(t, a, "central") for t, a in iv]
    ts = np.linspace(0.0, 36.0, 145)
    sol = simulate(model, theta, Schedule.build(model, doses), ts, options=tight(backend))
    conc = np.asarray(sol.observables(model, theta))[:, 0]
    ref = sum(one_cmt_oral(ts, t, a, ka, cl, v) for t, a in oral)
    ref = ref + sum(one_cmt_iv(ts, t, a, cl, v) for t, a in iv)
    assert int(sol.status) == 0
    assert rel_err(conc[1:], ref[1:]) < 1e-5
    assert conc[0] == 0.0


@BACKENDS
def test_two_compartment_multiple_doses(backend):
    model = TwoCompartment()
    ka, cl, v1, q, v2 = 0.9, 1.4, 18.0, 2.5, 35.0
    theta = np.array([ka, cl, v1, q, v2])
    oral = [(0.0, 100.0), (12.0, 100.0), (24.0, 150.0)]
    iv = [(6.0, 50.0), (30.0, 40.0)]
    doses = [(t, a, "depot") for t, a in oral] + [(t, a, "central") for t, a in iv]
    ts = np.linspace(0.0, 72.0, 241)
    sol = simulate(model, theta, Schedule.build(model, doses), ts, options=tight(backend))
    conc = np.asarray(sol.observables(model, theta))[:, 0]
    ref = sum(two_cmt_oral(ts, t, a, ka, cl, v1, q, v2) for t, a in oral)
    ref = ref + sum(two_cmt_iv(ts, t, a, cl, v1, q, v2) for t, a in iv)
    assert rel_err(conc[1:], ref[1:]) < 1e-5


@BACKENDS
@pytest.mark.parametrize("rate", [50.0, 400.0])
def test_one_compartment_infusion(rate, backend):
    model = OneCompartment()
    cl, v = 3.1, 25.0
    theta = np.array([1.0, cl, v])
    amt, start = 500.0, 2.0
    dur = amt / rate
    ts = np.linspace(0.0, 30.0, 121)
    sol = simulate(model, theta, Schedule.build(model, [(start, amt, "central", rate)]), ts,
                   options=tight(backend))
    conc = np.asarray(sol.observables(model, theta))[:, 0]
    k = cl / v
    during = rate / cl * (1 - np.exp(-k * np.clip(ts - start, 0, dur)))
    ref = np.where(ts <= start + dur, during,
                   rate / cl * (1 - np.exp(-k * dur)) * np.exp(-k * (ts - start - dur)))
    ref = np.where(ts <= start, 0.0, ref)
    assert rel_err(conc[ts > start], ref[ts > start]) < 1e-5
    assert np.all(conc[ts <= start] == 0.0)


@BACKENDS
def test_sample_at_dose_time_is_a_trough(backend):
    model = OneCompartment()
    theta = model.typical_params()
    doses = [(0.0, 100.0, "central"), (12.0, 100.0, "central")]
    ts = np.array([0.0, 12.0, 12.0 + 1e-9])
    sol = simulate(model, theta, Schedule.build(model, doses), ts, options=tight(backend))
    c = np.asarray(sol.observables(model, theta))[:, 0]
    assert c[0] == 0.0
    np.testing.assert_allclose(c[1], one_cmt_iv(12.0, 0.0, 100.0, theta[1], theta[2]), rtol=1e-6)
    np.testing.assert_allclose(c[2] - c[1], 100.0 / theta[2], rtol=1e-6)


@BACKENDS
def test_infusion_conserves_mass(backend):
    """With no elimination, the body holds exactly what was dosed so far."""
    model = OneCompartment()
    theta = np.array([1.0, 0.0, 10.0])
    ts = np.linspace(0.0, 10.0, 41)
    sched = Schedule.build(model, [(1.0, 60.0, "central", 20.0), (2.0, 30.0, "depot")])
    sol = simulate(model, theta, sched, ts, options=tight(backend))
    total = np.asarray(sol.ys).sum(axis=1)
    dosed = 20.0 * np.clip(ts - 1.0, 0.0, 3.0) + np.where(ts > 2.0, 30.0, 0.0)
    np.testing.assert_allclose(total, dosed, rtol=1e-9, atol=1e-9)
