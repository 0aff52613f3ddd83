"""HovorkaT1D: against scipy's solve_ivp on the same equations written out here, the basal
steady state (under the basal rate titrated to Gb) in each glucose regime, every
parameter's gradient, the source's absorption profiles, and a virtual cohort."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp
from scipy.optimize import brentq

from hybrid_twin import Schedule, SolverOptions, StepSizeController, simulate
from hybrid_twin.data.virtual import DoseSpec, ScheduleSpec, virtual_cohort
from hybrid_twin.models import HovorkaT1D, get_model

from gradcheck import central_fd, check_gradients

MODEL = HovorkaT1D()
NAMES = MODEL.param_names
TIGHT = StepSizeController(rtol=1e-10, atol=1e-12)
MEALS = [(60.0, 50.0), (360.0, 70.0)]            # (min, g carbohydrate)
BOLUSES = [(55.0, 1.5), (355.0, 4.0)]            # (min, U); the second one too large
SNACK = (540.0, 555.0, 1.0)                      # carb_rate 1 g/min from 540 to 555 min


def written_out(theta):
    """The model's equations, written out independently of hybrid_twin: (rhs, steady state,
    parameter dict with the basal rate "u_b" in mU/min). The basal plasma insulin that
    holds glucose at Gb solves the glucose balance (brentq, between no insulin and the
    insulin that stops endogenous production); the insulin sub-system is linear."""
    p = dict(zip(NAMES, np.asarray(theta, float)))
    bw, vg = p["BW"], p["V_G"]

    def rhs(t, y, basal_mu, carb):
        q1, q2, s1, s2, i, x1, x2, x3, d1, d2, c = y
        g = q1 / (vg * bw)
        f01c = p["F01"] * bw * (g / 4.5 if g < 4.5 else 1.0)
        fr = 0.003 * (g - 9.0) * vg * bw if g > 9.0 else 0.0
        ug = p["A_G"] * d2 / p["t_maxG"]
        egp = p["EGP0"] * bw * max(1.0 - x3, 0.0)      # published without the clip
        return [-f01c - x1 * q1 + p["k12"] * q2 - fr + ug + egp,
                x1 * q1 - (p["k12"] + x2) * q2,
                basal_mu - s1 / p["t_maxI"],
                (s1 - s2) / p["t_maxI"],
                s2 / (p["t_maxI"] * p["V_I"] * bw) - p["k_e"] * i,
                -p["k_a1"] * x1 + p["k_a1"] * p["S_IT"] * i,
                -p["k_a2"] * x2 + p["k_a2"] * p["S_ID"] * i,
                -p["k_a3"] * x3 + p["k_a3"] * p["S_IE"] * i,
                -d1 / p["t_maxG"] + carb(t) * 1000.0 / 180.16,
                (d1 - d2) / p["t_maxG"],
                p["k_int"] * (g - c)]

    g0 = p["Gb"] / 18.016

    def balance(i):  # dQ1/dt at G = Gb and the steady state of Q2 and x, given insulin i
        x = [p["S_IT"] * i, p["S_ID"] * i, p["S_IE"] * i]
        q1 = g0 * vg * bw
        q2 = x[0] * q1 / (p["k12"] + x[1])
        return rhs(0.0, [q1, q2, 0, 0, i, *x, 0, 0, g0], 0.0, lambda t: 0.0)[0]

    i0 = brentq(balance, 0.0, 1.0 / p["S_IE"], xtol=1e-14, rtol=1e-15)
    x0 = [p["S_IT"] * i0, p["S_ID"] * i0, p["S_IE"] * i0]
    u_b = i0 * p["k_e"] * p["V_I"] * bw                             # mU/min
    p["u_b"] = u_b
    q10 = g0 * vg * bw
    y0 = np.array([q10, x0[0] * q10 / (p["k12"] + x0[1]), u_b * p["t_maxI"],
                   u_b * p["t_maxI"], i0, *x0, 0.0, 0.0, g0])
    return rhs, y0, p


_REFERENCES: dict = {}


def scipy_reference(theta, ts, meals, boluses, snack=None):
    """`_scipy_reference`, computed once per case (both backends are compared with it)."""
    key = (tuple(np.asarray(theta).tolist()), tuple(np.asarray(ts).tolist()), repr(meals),
           repr(boluses), repr(snack))
    if key not in _REFERENCES:
        _REFERENCES[key] = _scipy_reference(theta, ts, meals, boluses, snack)
    return _REFERENCES[key]


def _scipy_reference(theta, ts, meals, boluses, snack=None):
    """DOP853 piecewise between dose times, boluses as jumps, the basal rate as a
    constant infusion in the rhs, the snack as a piecewise-constant carb rate."""
    rhs, y, p = written_out(theta)
    u_b = p["u_b"]
    carb = (lambda t: snack[2] if snack[0] <= t < snack[1] else 0.0) if snack else (lambda t: 0.0)
    events = sorted({t for t, _ in meals} | {t for t, _ in boluses}
                    | ({snack[0], snack[1]} if snack else set()))
    bounds = [0.0, *events, ts[-1]]
    out = np.zeros((len(ts), 11))
    for k in range(len(bounds) - 1):
        ta, tb = bounds[k], bounds[k + 1]
        if k:
            y = y.copy()
            y[8] += sum(a for t, a in meals if t == ta) * 1000.0 / 180.16
            y[2] += sum(a for t, a in boluses if t == ta) * 1000.0
        sel = ((ts > ta) | (k == 0)) & (ts <= tb)
        mid = 0.5 * (ta + tb)  # carb rate is constant on the piece
        sol = solve_ivp(lambda t, y: rhs(t, y, u_b, lambda _: carb(mid)), (ta, tb), y,
                        method="DOP853", rtol=1e-12, atol=1e-12,
                        t_eval=np.unique(np.append(ts[sel], tb)))
        out[sel] = sol.y.T[: sel.sum()]
        y = sol.y[:, -1]
    q1, c, i = out[:, 0], out[:, 10], out[:, 4]
    vol = p["V_G"] * p["BW"]
    return np.stack([c * 18.016, q1 / vol * 18.016, i], axis=1), out


def test_declaration_registry_and_units():
    model = get_model("glucose.HovorkaT1D")
    assert isinstance(model, HovorkaT1D)
    assert model.observable_names[0] == "glucose" and model.time_unit == "min"
    for q in model.parameters:
        assert q.lower <= q.typical <= q.upper and q.source and q.unit
    theta = model.typical_params()
    np.testing.assert_allclose(model.from_unconstrained(model.to_unconstrained(theta)), theta,
                               rtol=1e-12)
    assert {d.name: d.scale for d in model.dose_targets} == {"meal": 1000.0 / 180.16,
                                                             "insulin": 1000.0}


@pytest.mark.parametrize("backend", ["diffrax", "ensemble"])
def test_matches_scipy_with_meals_boluses_basal_and_a_snack(backend):
    """12 h: two meals with boluses, a 15-min snack as carb_rate, the basal rate; every
    observable within 1e-4 (relative) of an independent DOP853 solve."""
    theta = MODEL.typical_params(Gb=135.0)
    doses = [(t, a, "meal") for t, a in MEALS] + [(t, a, "insulin") for t, a in BOLUSES]
    sched = Schedule.build(MODEL, doses, inputs=[(SNACK[0], [SNACK[2]]), (SNACK[1], [0.0])])
    ts = np.arange(0.0, 721.0, 5.0)
    sol = simulate(MODEL, theta, sched, ts,
                   options=SolverOptions(controller=StepSizeController(rtol=1e-9, atol=1e-10),
                                         backend=backend))
    assert int(sol.status) == 0
    obs = np.asarray(sol.observables(MODEL, theta))
    ref, states = scipy_reference(theta, ts, MEALS, BOLUSES, SNACK)
    err = np.max(np.abs(obs - ref) / np.abs(ref), axis=0)
    assert np.all(err < 1e-4), err
    # the scenario exercises every regime of the vector field: plasma glucose above 9 and
    # below 4.5 mmol/L, and x3 > 1 (endogenous production clipped at 0) after the large bolus
    g = ref[:, 1] / 18.016
    assert g.max() > 9.0 and g.min() < 4.5 and states[:, 7].max() > 1.0


REGIMES = {  # steady-state plasma glucose below 4.5, between 4.5 and 9, above 9 mmol/L
    "low": dict(Gb=70.0),
    "middle": dict(Gb=130.0, EGP0=0.017, S_IE=0.06),
    "high": dict(Gb=200.0, S_IE=0.04, BW=85.0),
}


def regime_thetas():
    return np.stack([MODEL.typical_params(**kw) for kw in REGIMES.values()])


def test_initial_state_is_the_basal_steady_state_in_each_regime():
    """The closed form equals the written-out steady state (brentq), with plasma and CGM
    glucose at Gb; the vector field (the basal rate included) is zero there; it holds in
    float32 with finite gradients."""
    thetas = regime_thetas()
    p = MODEL.param_dict(jnp.asarray(thetas))
    y0 = np.stack([np.asarray(c) for c in MODEL.initial_state(p)], -1)
    g = y0[:, 10]
    assert g[0] < 4.5 < g[1] < 9.0 < g[2], g
    np.testing.assert_allclose(g * 18.016, thetas[:, NAMES.index("Gb")], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(MODEL.basal_rate(p)),
                               [written_out(th)[2]["u_b"] * 60.0 / 1000.0 for th in thetas],
                               rtol=1e-12)
    for k, th in enumerate(thetas):
        _, ref, _ = written_out(th)
        np.testing.assert_allclose(y0[k], ref, rtol=1e-12, atol=1e-300)
    dy = np.stack([np.asarray(d) for d in MODEL.vector_field(
        0.0, tuple(jnp.asarray(y0[:, i]) for i in range(11)), p,
        {"carb_rate": jnp.zeros(3)})], -1)
    scale = np.maximum(np.abs(y0), 1e-300)
    assert np.max(np.abs(dy) / scale) < 1e-14

    @jax.jit
    def insulin(th):  # basal plasma insulin: every parameter of the glucose balance
        return MODEL.initial_state(MODEL.param_dict(th))[4]

    grad64 = np.asarray(jax.vmap(jax.grad(insulin))(jnp.asarray(thetas)))
    assert np.all(np.isfinite(grad64))
    h = 1e-6 * thetas
    fd = np.zeros_like(grad64)
    for j in range(len(NAMES)):   # closed form: central differences are exact to ~1e-9
        up, dn = thetas.copy(), thetas.copy()
        up[:, j] += h[:, j]
        dn[:, j] -= h[:, j]
        fd[:, j] = (np.asarray(insulin(jnp.asarray(up))) - np.asarray(insulin(jnp.asarray(dn)))
                    ) / (2 * h[:, j])
    scaled, fd_scaled = grad64 * thetas, fd * thetas     # d I / d log(theta)
    np.testing.assert_allclose(scaled, fd_scaled, rtol=1e-6,
                               atol=1e-8 * np.abs(fd_scaled).max())
    moved = {NAMES[j] for j in np.flatnonzero(np.abs(scaled).max(axis=0) > 0)}
    assert moved == {"k12", "S_IT", "S_ID", "S_IE", "F01", "EGP0", "V_G", "BW", "Gb"}, moved
    th32 = jnp.asarray(thetas, jnp.float32)
    y32 = jax.jit(lambda th: MODEL.initial_state(MODEL.param_dict(th)))(th32)
    assert all(c.dtype == jnp.float32 for c in y32)
    np.testing.assert_allclose(np.stack([np.asarray(c) for c in y32], -1), y0, rtol=2e-5,
                               atol=1e-30)
    grad32 = np.asarray(jax.vmap(jax.grad(insulin))(th32))
    assert np.all(np.isfinite(grad32))
    np.testing.assert_allclose(grad32, grad64, rtol=1e-3, atol=1e-3 * np.abs(grad64).max())


def test_basal_rate_keeps_each_regime_at_steady_state_for_24h():
    """Without meals or boluses the basal rate holds every state for 24 h."""
    thetas = regime_thetas()
    scheds = Schedule.stack([Schedule.build(MODEL, []) for _ in thetas])
    ts = np.linspace(0.0, 1440.0, 25)
    sol = simulate(MODEL, thetas, scheds, ts, options=SolverOptions(controller=TIGHT))
    assert np.all(np.asarray(sol.status) == 0)
    ys = np.asarray(sol.ys)
    y0 = ys[:, :1, :]
    p = MODEL.param_dict(jnp.asarray(thetas))
    np.testing.assert_allclose(ys[:, 0], np.stack([np.asarray(c) for c in
                                                   MODEL.initial_state(p)], -1), rtol=1e-15)
    np.testing.assert_allclose(ys, np.broadcast_to(y0, ys.shape), rtol=1e-8, atol=1e-300)


def test_gradients_of_every_parameter_from_steady_state():
    """Reverse mode through simulate from the basal steady state (DESIGN.md pitfall), with
    meals, boluses and the basal rate, against central differences, all three
    observables; scaled to d y / d log(theta) as in tests/test_simulate.py. Plasma glucose
    stays between 4.5 and 9 mmol/L (6.8-8.3): where it crosses a kink of min/max, the
    adaptive step pattern changes with theta and central differences become noisy (the
    steady state's gradients in all three regimes are checked above). The step cap is 10
    min, a third of the sample spacing: with dtmax="obs" (30 min) the first step from the
    steady state spans 30 min, five insulin elimination time constants (1/k_e = 7 min),
    and d insulin(30 min) / d basal rate came out 7% wrong (2.5e-4 with a 20-min cap)."""
    theta = MODEL.typical_params(Gb=128.0)
    doses = [(60.0, 15.0, "meal"), (55.0, 0.6, "insulin"),
             (300.0, 15.0, "meal"), (295.0, 0.6, "insulin")]
    sched = Schedule.build(MODEL, doses)
    ts = jnp.arange(0.0, 541.0, 30.0)
    opts = SolverOptions(controller=StepSizeController(rtol=1e-10, atol=1e-12, dtmax=10.0),
                         differentiation="reverse")

    def obs(th):
        return simulate(MODEL, th, sched, ts, options=opts).observables(MODEL, th)

    jac = np.asarray(jax.jacrev(obs)(jnp.asarray(theta)))
    fd = central_fd(obs, theta)
    check_gradients(jac, fd, theta, 1e-4)
    jn = jac * theta
    # every parameter moves glucose (steady-state ones from t = 0, the others after meals)
    assert np.all(np.abs(jn[:, 0, :]).max(axis=0) > 1e-3 * np.abs(jn[:, 0, :]).max())
    obs0 = np.asarray(obs(jnp.asarray(theta)))[:, 1] / 18.016
    assert 4.5 < obs0.min() and obs0.max() < 9.0


def test_absorption_profiles_and_cgm_lag_of_the_source():
    """Hovorka et al. (2004): carbohydrate appearance after a meal of D g is
    U_G(t) = A_G D t exp(-t/t_maxG) / t_maxG^2 (peak at t = t_maxG), and absorption of a
    subcutaneous bolus is U_I(t) = D t exp(-t/t_maxI) / t_maxI^2 (peak at t_maxI). Compared
    here: the model's `meal_appearance` and `insulin_absorption` fluxes along a simulation
    against these formulas (1e-7), their peaks on a 1-min grid, plasma insulin above basal
    against the closed-form convolution of U_I with the k_e elimination; and interstitial
    glucose (Wilinska et al. 2010) peaking 5-15 min after plasma glucose."""
    theta = MODEL.typical_params()
    p = dict(zip(NAMES, theta))
    d_g, d_i = 60.0, 5.0
    sched = Schedule.build(MODEL, [(0.0, d_g, "meal"), (0.0, d_i, "insulin")])
    ts = np.arange(0.0, 301.0, 1.0)
    sol = simulate(MODEL, theta, sched, ts, options=SolverOptions(controller=TIGHT))
    ys = jnp.asarray(sol.ys)
    comps = tuple(ys[:, i] for i in range(11))
    flux = MODEL.fluxes(ts, comps, MODEL.param_dict(jnp.asarray(theta)),
                        {"carb_rate": jnp.zeros_like(ys[:, 0])})
    tg, ti = p["t_maxG"], p["t_maxI"]
    mmol = d_g * 1000.0 / 180.16
    u_g = p["A_G"] * mmol * ts * np.exp(-ts / tg) / tg ** 2
    np.testing.assert_allclose(np.asarray(flux["meal_appearance"]), u_g, rtol=1e-7,
                               atol=1e-9 * u_g.max())
    basal = written_out(theta)[2]["u_b"]
    u_i = 1000.0 * d_i * ts * np.exp(-ts / ti) / ti ** 2
    np.testing.assert_allclose(np.asarray(flux["insulin_absorption"]) - basal, u_i,
                               rtol=1e-7, atol=1e-9 * u_i.max())
    assert ts[np.argmax(np.asarray(flux["meal_appearance"]))] == tg
    assert ts[np.argmax(np.asarray(flux["insulin_absorption"]))] == ti
    # plasma insulin: dI/dt = c t exp(-t/ti) - k_e I, c = 1000 D / (ti^2 V_I BW)
    k, c = p["k_e"], 1000.0 * d_i / (ti ** 2 * p["V_I"] * p["BW"])
    beta = k - 1.0 / ti
    excess = c * (np.exp(-ts / ti) * (ts / beta - 1.0 / beta ** 2) + np.exp(-k * ts) / beta ** 2)
    ins = np.asarray(ys[:, 4])
    np.testing.assert_allclose(ins - ins[0], excess, rtol=1e-6, atol=1e-8 * excess.max())
    assert ti < ts[np.argmax(ins)] < ti + 15.0
    obs = np.asarray(sol.observables(MODEL, theta))
    lag = ts[np.argmax(obs[:, 0])] - ts[np.argmax(obs[:, 1])]
    assert 5.0 <= lag <= 15.0, lag


def test_virtual_cohort_with_basal_meals_and_boluses_over_24h():
    """50 patients from the declared population (each one's basal rate titrated to its
    fasting glucose Gb), three meals with boluses at jittered times; CGM every 15 min."""
    meals = [(420.0, 50.0, 1.7), (720.0, 70.0, 2.3), (1110.0, 60.0, 2.0)]  # ~30 g/U
    doses = []
    for t, carbs, units in meals:
        doses += [DoseSpec(t, carbs, "meal", time_jitter=20.0, amount_cv=0.2),
                  DoseSpec(t - 5.0, units, "insulin", time_jitter=5.0, amount_cv=0.2)]
    spec = ScheduleSpec(doses=tuple(doses), obs_every=15.0, horizon=1440.0,
                        observables=("glucose",))
    vc = virtual_cohort(MODEL, 50, schedule=spec, seed=2,
                        options=SolverOptions(controller=StepSizeController(rtol=1e-6,
                                                                           atol=1e-8)))
    g = vc.true_predictions / 18.016                      # CGM glucose, mmol/L
    assert g.shape == (50, 97) and np.all(np.isfinite(g)) and g.min() > 0.0
    fasting = g[:, 0]                                      # the basal steady state
    np.testing.assert_allclose(fasting * 18.016, vc.true_params[:, NAMES.index("Gb")],
                               rtol=1e-9)
    np.testing.assert_allclose(g[:, :20], np.broadcast_to(fasting[:, None], (50, 20)),
                               rtol=1e-5)                  # nothing happens before breakfast
    assert 4.0 < np.median(fasting) < 10.0
    assert 1.0 < fasting.min() and fasting.max() < 30.0
    assert np.median(g.max(axis=1) - fasting) > 1.0      # meals raise glucose
    assert len(set(np.round(fasting, 6))) == 50           # every patient differs


def test_kernel_backend_matches_diffrax():
    """The fused kernel (Pallas, interpret mode on CPU) on four sampled patients with the
    basal rate, two meals, boluses and a snack, against a tight diffrax solve."""
    from hybrid_twin.population import sample_params

    thetas = np.array(sample_params(MODEL, jax.random.PRNGKey(0), 4))
    doses = [(t, a, "meal") for t, a in MEALS] + [(t, a, "insulin") for t, a in BOLUSES]
    sched = Schedule.build(MODEL, doses, inputs=[(SNACK[0], [SNACK[2]]), (SNACK[1], [0.0])])
    ts = np.arange(0.0, 721.0, 5.0)
    ref = simulate(MODEL, thetas, sched, ts, options=SolverOptions(
        controller=StepSizeController(rtol=1e-11, atol=1e-12), max_steps=100_000))
    got = simulate(MODEL, thetas, sched, ts, options=SolverOptions(controller=TIGHT,
                                                                   backend="kernel"))
    assert np.all(np.asarray(got.status) == 0)
    a, b = np.asarray(got.observables(MODEL, thetas)), np.asarray(ref.observables(MODEL, thetas))
    assert np.max(np.abs(a - b) / np.abs(b)) < 1e-6


def test_dawn_variant_raises_endogenous_production_in_the_early_morning():
    """HovorkaT1DDawn: with a_dawn = 0 it is HovorkaT1D exactly; otherwise endogenous
    production is multiplied by 1 + a_dawn at t_dawn, by 1 + a_dawn exp(-1/2) one width
    away (the bump's shape near its peak), by almost nothing at midnight, and the same
    every day."""
    from hybrid_twin.models import HovorkaT1DDawn

    dawn = HovorkaT1DDawn()
    theta = dawn.typical_params()
    p = dawn.param_dict(jnp.asarray(theta))
    y0 = dawn.initial_state(p)
    u = {"carb_rate": 0.0}
    base = MODEL.fluxes(0.0, y0, MODEL.param_dict(jnp.asarray(theta[:len(NAMES)])), u)
    egp = float(base["endogenous_production"])

    def ratio(t, p_=p):
        return float(dawn.fluxes(t, y0, p_, u)["endogenous_production"]) / egp

    a, t_d, w = theta[-3:]
    assert ratio(t_d) == pytest.approx(1.0 + a, rel=1e-12)
    assert ratio(t_d + 1440.0) == pytest.approx(1.0 + a, rel=1e-12)
    # exp(kappa (cos(2 pi w / 1440) - 1)) ~ exp(-1/2) for w << 1440
    assert ratio(t_d + w) == pytest.approx(1.0 + a * np.exp(-0.5), rel=2e-3)
    assert ratio(0.0) - 1.0 < 1e-4 * a
    off = dawn.param_dict(jnp.asarray(dawn.typical_params(a_dawn=0.0)))
    for t in (0.0, t_d, 900.0):
        fa = dawn.fluxes(t, y0, off, u)
        fb = MODEL.fluxes(t, y0, MODEL.param_dict(jnp.asarray(theta[:len(NAMES)])), u)
        assert all(float(fa[k]) == float(fb[k]) for k in fb)
