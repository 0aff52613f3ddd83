"""BergmanMinimal against scipy's solve_ivp on the same equations, written out here."""

import numpy as np
import pytest
from scipy.integrate import solve_ivp

from hybrid_twin import Schedule, SolverOptions, StepSizeController, simulate
from hybrid_twin.models import BergmanCircadian, BergmanMinimal

MEALS = [(420.0, 60.0), (730.0, 85.0), (1150.0, 70.0)]
INSULIN = [(415.0, 1.2), (725.0, 1.6), (1150.0, 1.1)]


def scipy_reference(theta, ts, carb_rate=None, circadian=None):
    p1, p2, p3, n, gb, ib, vi, vg, kabs, f, ksc = theta[:11]

    def rhs(t, y):
        g, x, i, q, s = y
        u = carb_rate(t) if carb_rate else 0.0
        si = 1.0
        if circadian is not None:  # (amplitude, clock time of the minimum, min)
            si = 1.0 - circadian[0] * np.cos(2 * np.pi * (t - circadian[1]) / 1440.0)
        return [-p1 * (g - gb) - x * g + f * kabs * q * 1000.0 / vg,
                -p2 * x + p3 * si * (i - ib),
                -n * (i - ib) + ksc * s * 1000.0 / vi,
                -kabs * q + u,
                -ksc * s]

    events = sorted({t for t, _ in MEALS} | {t for t, _ in INSULIN})
    bounds = [0.0, *events, ts[-1]]
    y = np.array([gb, 0.0, ib, 0.0, 0.0])
    out = np.zeros((len(ts), 5))
    for k in range(len(bounds) - 1):
        ta, tb = bounds[k], bounds[k + 1]
        if k:
            y = y.copy()
            y[3] += sum(a for t, a in MEALS if t == ta)
            y[4] += sum(a for t, a in INSULIN if t == ta)
        sel = ((ts > ta) | (k == 0)) & (ts <= tb)
        sol = solve_ivp(rhs, (ta, tb), y, method="DOP853", rtol=1e-11, atol=1e-11,
                        t_eval=np.unique(np.append(ts[sel], tb)))
        out[sel] = sol.y.T[: sel.sum()]
        y = sol.y[:, -1]
    return out


@pytest.mark.parametrize("backend", ["diffrax", "ensemble"])
def test_bergman_matches_scipy(backend):
    model = BergmanMinimal()
    theta = model.typical_params(p3=6e-5, Gb=95.0)
    doses = [(t, a, "meal") for t, a in MEALS] + [(t, a, "insulin") for t, a in INSULIN]
    ts = np.arange(0.0, 1441.0, 5.0)
    sol = simulate(model, theta, Schedule.build(model, doses), ts,
                   options=SolverOptions(controller=StepSizeController(rtol=1e-9, atol=1e-10), backend=backend))
    ref = scipy_reference(theta, ts)
    ys = np.asarray(sol.ys)
    glucose = np.asarray(sol.observables(model, theta))[:, 0]
    assert np.max(np.abs(glucose - ref[:, 0]) / ref[:, 0]) < 1e-4
    for i in (2, 3, 4):
        scale = np.max(np.abs(ref[:, i]))
        assert np.max(np.abs(ys[:, i] - ref[:, i])) / scale < 1e-4
    assert ref[:, 0].max() > 1.3 * theta[4]


@pytest.mark.parametrize("backend", ["diffrax", "ensemble"])
def test_bergman_carb_rate_input_matches_scipy(backend):
    """A meal eaten over 15 minutes as a piecewise-constant carb_rate input."""
    model = BergmanMinimal()
    theta = model.typical_params()
    sched = Schedule.build(
        model, [(t, a, "insulin") for t, a in INSULIN] + [(t, a, "meal") for t, a in MEALS[1:]],
        inputs=[(420.0, [4.0]), (435.0, [0.0])])
    ts = np.arange(0.0, 1441.0, 5.0)
    sol = simulate(model, theta, sched, ts, options=SolverOptions(controller=StepSizeController(rtol=1e-9, atol=1e-10), backend=backend))
    old = MEALS[:]
    try:
        MEALS[:] = MEALS[1:]
        ref = scipy_reference(theta, ts, carb_rate=lambda t: 4.0 if 420.0 <= t < 435.0 else 0.0)
    finally:
        MEALS[:] = old
    glucose = np.asarray(sol.ys)[:, 0]
    assert np.max(np.abs(glucose - ref[:, 0]) / ref[:, 0]) < 1e-4


def test_basal_steady_state_holds():
    model = BergmanMinimal()
    theta = model.typical_params()
    ts = np.linspace(0.0, 600.0, 13)
    sol = simulate(model, theta, None, ts)
    ys = np.asarray(sol.ys)
    np.testing.assert_allclose(ys[:, 0], theta[4], rtol=1e-12)
    np.testing.assert_allclose(ys[:, 2], theta[5], rtol=1e-12)


def test_declaration_is_consistent():
    model = BergmanMinimal()
    for q in model.parameters:
        assert q.lower <= q.typical <= q.upper and q.source and q.unit
    theta = model.typical_params()
    z = model.to_unconstrained(theta)
    np.testing.assert_allclose(model.from_unconstrained(z), theta, rtol=1e-12)
    assert "p3" in model.describe() and model.index("state", "Q_gut") == 3


def test_circadian_model_matches_scipy_and_reduces_to_minimal():
    """Diurnal insulin sensitivity: against solve_ivp with the same cycle; with zero
    amplitude it is the minimal model; the basal steady state is unchanged."""
    model = BergmanCircadian()
    theta = model.typical_params(a_si=0.5, t_si=400.0)
    doses = [(t, a, "meal") for t, a in MEALS] + [(t, a, "insulin") for t, a in INSULIN]
    ts = np.arange(0.0, 1441.0, 5.0)
    opts = SolverOptions(controller=StepSizeController(rtol=1e-9, atol=1e-10))
    sched = Schedule.build(model, doses)
    glucose = np.asarray(simulate(model, theta, sched, ts, options=opts).ys)[:, 0]
    ref = scipy_reference(np.asarray(theta), ts, circadian=(0.5, 400.0))
    assert np.max(np.abs(glucose - ref[:, 0]) / ref[:, 0]) < 1e-4
    plain = scipy_reference(np.asarray(theta), ts)
    assert np.max(np.abs(glucose - plain[:, 0])) > 5.0  # the cycle matters after meals
    flat = simulate(model, model.typical_params(a_si=0.0), sched, ts, options=opts).ys
    mini = BergmanMinimal()
    ref0 = simulate(mini, mini.typical_params(), Schedule.build(mini, doses), ts, options=opts).ys
    np.testing.assert_allclose(np.asarray(flat), np.asarray(ref0), rtol=1e-9, atol=1e-12)
    basal = np.asarray(simulate(model, theta, None, ts[::12]).ys)
    np.testing.assert_allclose(basal[:, 0], theta[4], rtol=1e-12)
