"""The fused Pallas kernel backend, in interpret mode on CPU: the same solutions as the
diffrax backend, exact sensitivities, in-kernel normal equations, failure isolation and
calibration through it."""

import dataclasses
import logging

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_twin import RK4, Schedule, SolverOptions, StepSizeController, simulate
from hybrid_twin.simulate import AxisDirections, FitData, normal_equations
from hybrid_twin.solve import Kernel
from hybrid_twin.calibrate import ErrorModel, calibrate
from hybrid_twin.hybrid import HybridModel, state_correction, term_closure
from hybrid_twin.models import BergmanMinimal, TwoCompartment
from hybrid_twin.population import sample_params

REF = SolverOptions(controller=StepSizeController(rtol=1e-11, atol=1e-12), max_steps=100_000)
TSIT5 = SolverOptions(controller=StepSizeController(rtol=1e-10, atol=1e-12), backend="kernel")
RK4_GLUCOSE = SolverOptions(method=RK4(0.25), max_steps=100_000, backend="kernel")
RK4_ROLLED = SolverOptions(method=RK4(1.0), max_steps=100_000, backend=Kernel(roll_stages=True))


def glucose_cohort(n, seed=0):
    """n patients from the population, three meals with insulin at jittered times,
    glucose every 5 min over 24 h, started at the basal steady state."""
    model = BergmanMinimal()
    theta = sample_params(model, jax.random.PRNGKey(seed), n)
    rng = np.random.default_rng(seed)
    meals = np.array([420.0, 720.0, 1140.0])[None] + rng.uniform(-30, 30, (n, 3))
    scheds = [Schedule.build(model, [(float(t), float(c), "meal") for t, c in
                                     zip(meals[i], rng.uniform(40, 90, 3))]
                             + [(float(t) + 2.5, 1.0, "insulin") for t in meals[i]])
              for i in range(n)]
    return model, theta, Schedule.stack(scheds), jnp.arange(0.0, 1441.0, 5.0)


def rel_err(a, b):
    """Largest difference relative to |b|, with values below 1e-4 of their component's
    peak (the last axis: a state that has decayed to nearly zero) measured against 1e-4
    of that peak."""
    a, b = np.asarray(a), np.asarray(b)
    peak = np.max(np.abs(b).reshape(-1, b.shape[-1]), axis=0) if b.ndim > 1 else np.max(np.abs(b))
    return np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-4 * peak + 1e-300))


@pytest.mark.parametrize("opts", [TSIT5, RK4_GLUCOSE,
                                  dataclasses.replace(TSIT5, method="dopri5")],
                         ids=["tsit5", "rk4", "dopri5"])
def test_glucose_with_meals_and_insulin_matches_diffrax(opts):
    model, theta, sched, ts = glucose_cohort(32)
    ref = simulate(model, theta, sched, ts, options=REF)
    got = simulate(model, theta, sched, ts, options=opts)
    assert np.all(np.asarray(got.status) == 0)
    assert rel_err(got.ys[..., 0], ref.ys[..., 0]) < 1e-6
    assert rel_err(got.ys, ref.ys) < 1e-6


@pytest.mark.parametrize("method", ["tsit5", "rk4"])
def test_two_compartment_repeated_boluses_and_infusion_matches_diffrax(method):
    model = TwoCompartment()
    theta = sample_params(model, jax.random.PRNGKey(1), 16)
    # oral doses every 12 h, an IV infusion of 500 mg over 2 h at 30 h, with
    # samples at dose times (troughs), during and after the infusion
    doses = [(12.0 * k, 200.0, "depot") for k in range(4)] + [(30.0, 500.0, "central", 250.0)]
    sched = Schedule.build(model, doses)
    ts = jnp.asarray(sorted({*np.arange(0.0, 48.01, 1.5), 12.0, 24.0, 31.0, 32.0}))
    opts = TSIT5 if method == "tsit5" else SolverOptions(method=RK4(0.01), max_steps=10_000, backend="kernel")
    ref = simulate(model, theta, sched, ts, options=REF)
    got = simulate(model, theta, sched, ts, options=opts)
    assert np.all(np.asarray(got.status) == 0)
    assert rel_err(got.ys, ref.ys) < 1e-6
    trough = np.asarray(got.ys)[:, list(np.asarray(ts)).index(12.0), 0]
    assert np.all(trough < 200.0)  # the sample at a dose time is taken before the dose


def test_per_patient_schedules_and_masked_slots_match_diffrax():
    """Every patient its own doses (times, routes, boluses and infusions) and its own
    number of samples (padded slots at the end), some samples at a dose time: the kernel's
    own merge of save times and doses."""
    from test_simulate import random_schedules

    model = TwoCompartment()
    rng = np.random.default_rng(5)
    n = 24
    sched, ts, mask, _ = random_schedules(model, n, rng)
    for i in range(8):  # a sample at a dose time
        k = int(mask[i].sum())
        ts[i, 2] = float(np.asarray(sched.dose_times)[i, 0])
        ts[i, :k] = np.sort(ts[i, :k])
    theta = sample_params(model, jax.random.PRNGKey(2), n)
    ref = simulate(model, theta, sched, jnp.asarray(ts), jnp.asarray(mask), options=REF)
    got = simulate(model, theta, sched, jnp.asarray(ts), jnp.asarray(mask), options=TSIT5)
    assert np.all(np.asarray(got.status) == 0)
    assert rel_err(got.ys, ref.ys) < 1e-6
    assert np.all(np.asarray(got.ys)[~mask] == 0)


def randomized_hybrid(model, key):
    corr = state_correction(model, ("G", "X"), ("G", "I", "sin_day", "cos_day"), key=key,
                            feature_scales={"G": (100.0, 50.0), "I": (15.0, 20.0)},
                            out_scale=[0.5, 1e-5], width=8)
    hyb = HybridModel(model, (corr,), day_length=1440.0)
    layers = hyb.corrections[0].net.mlp.layers
    keys = jax.random.split(key, len(layers))
    for i, k in enumerate(keys):
        w = 0.5 * jax.random.normal(k, layers[i].weight.shape)
        hyb = eqx.tree_at(lambda m, i=i: m.corrections[0].net.mlp.layers[i].weight, hyb, w)
    return hyb


def randomized_closure(model, key):
    """A time-of-day 'scale' closure of the insulin-action gain with random weights."""
    closure = term_closure(model, "insulin_action_gain", ("sin_day", "cos_day", "G"), key=key,
                           width=5, feature_scales={"G": (100.0, 50.0)}, out_scale=0.3,
                           mode="scale")
    hyb = HybridModel(model, (), (closure,), day_length=1440.0)
    for i, k in enumerate(jax.random.split(key, len(closure.net.mlp.layers))):
        w = jax.random.normal(k, closure.net.mlp.layers[i].weight.shape)
        hyb = eqx.tree_at(lambda m, i=i: m.closures[0].net.mlp.layers[i].weight, hyb, w)
    return hyb


@pytest.mark.parametrize("kind", ["state_correction", "scale_closure"])
@pytest.mark.parametrize("opts", [TSIT5, dataclasses.replace(RK4_GLUCOSE, method=RK4(0.1))],
                         ids=["tsit5", "rk4"])
def test_hybrid_with_mlp_state_correction_matches_diffrax(opts, kind):
    model, theta, sched, ts = glucose_cohort(16, seed=2)
    make = randomized_hybrid if kind == "state_correction" else randomized_closure
    hyb = make(model, jax.random.PRNGKey(3))
    ref = simulate(hyb, theta, sched, ts, options=REF)
    assert rel_err(ref.ys[..., 0], simulate(model, theta, sched, ts, options=REF).ys[..., 0]) > 1e-3
    got = simulate(hyb, theta, sched, ts, options=opts)
    assert rel_err(got.ys, ref.ys) < 1e-6


@pytest.mark.parametrize("interpolation", ["constant", "linear"])
def test_inputs_match_diffrax(interpolation):
    model = BergmanMinimal()
    theta = sample_params(model, jax.random.PRNGKey(4), 8)
    sched = Schedule.build(model, [(420.0, 1.0, "insulin")],
                           inputs=[(400.0, [2.0]), (430.0, [4.0]), (450.0, [0.0])],
                           interpolation=interpolation)
    ts = jnp.arange(0.0, 901.0, 10.0)
    ref = simulate(model, theta, sched, ts, options=REF)
    got = simulate(model, theta, sched, ts, options=TSIT5)
    assert rel_err(got.ys, ref.ys) < 1e-6


@pytest.mark.parametrize("opts", [TSIT5, RK4_ROLLED],
                         ids=["tsit5", "rk4"])
def test_sensitivities_of_every_parameter_match_finite_differences(opts):
    """jax.jacfwd through the kernel's custom_jvp (sensitivities integrated in the kernel,
    inside the error norm; for RK4 the exact derivative of the RK4 map), from the basal
    steady state, against central differences of the same solver. (RK4 runs with its
    stages rolled, a third of the compile time; tests/test_kernel_policies.py holds the
    rolled kernel to the unrolled one.)"""
    model, theta, sched, ts = glucose_cohort(2, seed=5)
    ts = ts[:157:6]  # to 13:00: breakfast, lunch and their insulin

    def glucose(th):
        return simulate(model, th, sched, ts, options=opts).ys[..., 0]

    jac = np.asarray(jax.jacfwd(glucose)(theta))[np.arange(2), :, np.arange(2), :]
    for k, name in enumerate(model.param_names):
        h = 1e-5 * theta[:, k]
        fd = (glucose(theta.at[:, k].add(h)) - glucose(theta.at[:, k].add(-h))) / (2 * h[:, None])
        # compared per unit of log(parameter), in mg/dL; a parameter glucose does not
        # depend on (Ib: the model works with I - Ib from I(0) = Ib) is held to 0.1 mg/dL
        th = np.asarray(theta[:, k])[:, None]
        fd, ad = np.asarray(fd) * th, jac[:, :, k] * th
        scale = max(np.max(np.abs(fd)), 0.1)
        assert np.max(np.abs(ad - fd)) / scale < 1e-5, name
    # reverse mode through the same rule
    grad = jax.grad(lambda th: jnp.sum(glucose(th)))(theta)
    np.testing.assert_allclose(np.asarray(grad), jac.sum(1), rtol=1e-10)


def test_normal_equations_equal_those_from_jacfwd_of_diffrax():
    model, theta, sched, ts = glucose_cohort(8, seed=6)
    free = [model.index("param", q) for q in ("p1", "p3", "Gb", "V_G", "k_abs")]
    n, m = theta.shape[0], ts.shape[0]
    rng = np.random.default_rng(0)
    y = np.asarray(simulate(model, theta, sched, ts, options=REF).ys[..., 0])
    y = y + rng.normal(0, 5.0, y.shape)
    weight = jnp.where(rng.uniform(size=(n, m)) < 0.8, 1 / 5.0, 0.0)  # some unobserved
    z = model.to_unconstrained(theta)
    dirs = jnp.stack([jax.jvp(model.from_unconstrained, (z,),
                              (jnp.zeros_like(z).at[:, k].set(1.0),))[1] for k in free])
    obs_index = jnp.zeros((n, m), jnp.int32)
    ts_b = jnp.broadcast_to(ts, (n, m))
    data = FitData(jnp.asarray(y), weight, obs_index)
    got = normal_equations(model, theta, dirs, sched, ts_b, jnp.ones((n, m), bool), data,
                           options=TSIT5)._asdict()
    # the same along single parameters (what calibration passes for log/logit transforms)
    scale = jnp.stack([dirs[k, :, i] for k, i in enumerate(free)])
    axis = normal_equations(model, theta, AxisDirections(tuple(free), scale), sched, ts_b,
                            jnp.ones((n, m), bool), data, options=TSIT5)._asdict()

    ref_opts = SolverOptions(controller=StepSizeController(rtol=1e-10, atol=1e-12, dtmax="obs"), differentiation="forward")

    def resid(zf):
        full = z.at[:, free].set(zf)
        f = simulate(model, model.from_unconstrained(full), sched, ts, options=ref_opts).ys[..., 0]
        return (y - f) * weight

    r = resid(z[:, free])
    jac = np.asarray(jax.jacfwd(resid)(z[:, free]))[np.arange(n), :, np.arange(n), :]
    h_ref = np.einsum("nmk,nml->nkl", jac, jac)
    g_ref = np.einsum("nmk,nm->nk", jac, np.asarray(r))
    assert rel_err(got["h"], h_ref) < 1e-5
    assert rel_err(got["g"], g_ref) < 1e-5
    assert rel_err(axis["h"], h_ref) < 1e-5
    assert rel_err(axis["g"], g_ref) < 1e-5
    np.testing.assert_allclose(np.asarray(got["cost"]), 0.5 * np.sum(np.asarray(r) ** 2, 1),
                               rtol=1e-6)


def test_failing_patient_is_flagged_and_the_others_are_unchanged():
    model, theta, sched, ts = glucose_cohort(8, seed=7)
    opts = dataclasses.replace(TSIT5, max_steps=2000)  # the others need about 1,100
    good = simulate(model, theta, sched, ts, options=opts)
    assert np.all(np.asarray(good.status) == 0)
    others = [i for i in range(8) if i != 3]
    # patient 3: insulin action so strong that glucose uptake becomes stiff and the
    # explicit solver needs about 4,200 steps: MAX_STEPS
    stiff = theta.at[3, model.index("param", "p3")].set(1e-2).at[
        3, model.index("param", "k_sc")].set(1.0)
    got = simulate(model, stiff, sched, ts, options=opts)
    assert np.asarray(got.status)[3] == 1
    np.testing.assert_array_equal(np.asarray(got.status)[others], 0)
    np.testing.assert_array_equal(np.asarray(got.ys)[others], np.asarray(good.ys)[others])
    # a parameter set that makes the vector field non-finite: flagged, neighbours untouched
    nan_theta = theta.at[5, model.index("param", "V_G")].set(0.0)
    got = simulate(model, nan_theta, sched, ts, options=opts)
    assert np.asarray(got.status)[5] != 0
    others = [i for i in range(8) if i != 5]
    np.testing.assert_array_equal(np.asarray(got.ys)[others], np.asarray(good.ys)[others])


def test_calibration_through_the_kernel_recovers_parameters():
    from benchmarks.calibrate import scenario

    # the calibration benchmark's glucose5 cohort: 5 free parameters, 5 mg/dL noise
    model, vc, free, _ = scenario("glucose5", 64, seed=3)
    opts = SolverOptions(controller=StepSizeController(rtol=1e-8, atol=1e-10), backend="kernel")
    res = calibrate(model, vc.cohort, free=free, options=opts, max_iter=20,
                    error_model=ErrorModel("additive", additive=5.0, estimate=False))
    idx = [model.index("param", q) for q in free]
    rel = np.abs(np.asarray(res.params) / vc.true_params - 1)[:, idx]
    assert np.all(np.median(rel, axis=0) < 0.05), dict(zip(free, np.median(rel, 0)))
    assert np.mean(np.asarray(res.converged)) > 0.9
    # the same fit on the ensemble backend (Jacobian by jvp through its loop)
    ref = calibrate(model, vc.cohort.select(np.arange(8)), free=free, max_iter=20,
                    error_model=ErrorModel("additive", additive=5.0, estimate=False))
    np.testing.assert_allclose(np.asarray(res.z)[:8], np.asarray(ref.z), rtol=1e-4, atol=1e-5)


def test_auto_backend_and_option_checks(caplog):
    with caplog.at_level(logging.INFO, logger="hybrid_twin"):
        assert SolverOptions(backend="auto").resolved().backend_name == "diffrax"
    assert "no GPU" in caplog.text
    assert SolverOptions(method=RK4(1.0), backend="auto").resolved().backend_name == "ensemble"
    with pytest.raises(ValueError, match="needs a step size dt0"):
        RK4()
    with pytest.raises(ValueError, match="needs a step size dt0"):
        SolverOptions(method="rk4", backend="kernel")
    with pytest.raises(ValueError, match="kernel backend runs rk4, tsit5, dopri5 only"):
        SolverOptions(method="kvaerno5", backend="kernel")
    # derivatives with respect to network weights are refused with a clear message
    model, theta, sched, ts = glucose_cohort(2)
    hyb = randomized_hybrid(model, jax.random.PRNGKey(0))

    def loss(m):
        return jnp.sum(simulate(m, theta, sched, ts[:20], options=TSIT5).ys)

    with pytest.raises(NotImplementedError, match="parameters only"):
        eqx.filter_grad(loss)(hyb)


@pytest.mark.parametrize("hybrid", [False, True], ids=["mechanistic", "hybrid"])
def test_kernel_lowers_to_triton_for_cuda(hybrid):
    """The GPU path (Pallas -> Triton IR), lowered here on CPU for the CUDA platform: the
    states-only solve (save times per patient and shared) and the normal-equation solve
    with sensitivities (dense and single-parameter directions), in float32. (Compiling the
    Triton IR to PTX and running it happen only on a GPU.)"""
    from hybrid_twin.solve import Batch, Tsit5
    from hybrid_twin.solve._core import prepare
    from hybrid_twin.solve.kernel import lower_for_cuda, run_kernel

    model, theta, sched, ts = glucose_cohort(256)
    if hybrid:
        model = randomized_hybrid(model, jax.random.PRNGKey(0))
    f32 = jnp.float32
    theta = theta.astype(f32)
    sched = jax.tree.map(lambda x: x.astype(f32) if x.dtype == jnp.float64 else x, sched)
    shared = ts.astype(f32)
    per_patient = jnp.broadcast_to(shared, (256, ts.shape[0]))
    opts = SolverOptions(controller=StepSizeController(rtol=1e-5, atol=1e-6), backend="kernel")

    def solve(theta, sched, ts, k, axis):
        prep = prepare(model, Batch(theta, sched, ts, jnp.ones(ts.shape, bool), f32(0.0), False))
        m = prep.ts.shape[1]
        dirs = None
        if k and axis:
            dirs = AxisDirections(tuple(range(k)), jnp.ones((k, 256), f32))
        elif k:
            dirs = jnp.broadcast_to(jnp.eye(11, dtype=f32)[:k, None, :], (k, 256, 11))
        data = FitData(jnp.zeros((256, m), f32), jnp.ones((256, m), f32),
                       jnp.zeros((256, m), jnp.int32)) if k else None
        return run_kernel(model, theta, prep, method=Tsit5(), controller=opts.controller,
                          interpret=False, block=128,
                          directions=dirs, data=data, want_states=not k)

    for ts_, k, axis in ((per_patient, 0, False), (shared, 0, False), (per_patient, 5, False),
                         (per_patient, 5, True)):
        lowered = lower_for_cuda(lambda th, sc, t_, k=k, axis=axis: solve(th, sc, t_, k, axis),
                                 theta, sched, ts_)
        assert "xla.gpu.triton" in lowered.as_text()


class StackedElimination(TwoCompartment):
    """Elimination written with a stack and a reduction over three terms: correct, but not
    elementwise, so it does not lower to the kernel."""

    def fluxes(self, t, y, p, u):
        flux = super().fluxes(t, y, p, u)
        e = flux["elimination"]
        flux["elimination"] = jnp.sum(jnp.stack([0.5 * e, 0.25 * e, 0.25 * e]), axis=0)
        return flux


def test_auto_backend_falls_back_for_models_the_kernel_cannot_take(monkeypatch, caplog):
    from hybrid_twin.solve import kernel_support
    from hybrid_twin.solve import options as options_mod

    model = BergmanMinimal()
    assert kernel_support(model) is None
    assert kernel_support(randomized_hybrid(model, jax.random.PRNGKey(0))) is None
    reason = kernel_support(StackedElimination())
    assert reason is not None and "stack" in reason.lower()
    monkeypatch.setattr(options_mod, "default_platform", lambda: "gpu")
    auto = SolverOptions(backend="auto")
    assert auto.resolved(model).backend_name == "kernel"
    with caplog.at_level(logging.INFO, logger="hybrid_twin"):
        assert auto.resolved(StackedElimination()).backend_name == "diffrax"
    assert "does not lower to the kernel" in caplog.text
    rk4 = SolverOptions(method=RK4(0.1), backend="auto")
    assert rk4.resolved(StackedElimination()).backend_name == "ensemble"


@pytest.mark.parametrize("dt0", [0.1, 1 / 3])
def test_rk4_float32_takes_exactly_the_grid_steps(dt0):
    """Fixed steps on each segment's own grid: in float32 over 24 h no step is left a few
    ulps short of an event (which would add a needless tiny step per event)."""
    model, theta, sched, ts = glucose_cohort(8)
    f32 = jnp.float32
    sched = jax.tree.map(lambda x: x.astype(f32) if x.dtype == jnp.float64 else x, sched)
    sol = simulate(model, theta.astype(f32), sched, ts.astype(f32),
                   options=SolverOptions(method=RK4(dt0), max_steps=10**6, backend="kernel"))
    # every sample interval (5 min) and every sub-interval cut by a dose: ceil(len / dt0),
    # a last step within 8 ulps of the event landing on it
    for i in range(8):
        cuts = np.unique(np.concatenate([np.asarray(ts), np.asarray(sched.dose_times[i])]))
        cuts = np.asarray(cuts, np.float32).astype(np.float64)
        tol = 8 * np.finfo(np.float32).eps * np.maximum(cuts[1:], 1.0)
        ideal = int(np.sum(np.ceil((np.diff(cuts) - tol) / dt0)))
        assert int(sol.num_steps[i]) == ideal
