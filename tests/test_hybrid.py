"""Hybrid models: learned part off equals the mechanism; closures and corrections act."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_twin import Schedule, SolverOptions, StepSizeController, simulate
from hybrid_twin.hybrid import (
    CovariateNetwork,
    HybridModel,
    ScaledMLP,
    neural_ode,
    state_correction,
    term_closure,
)
from hybrid_twin.models import BergmanMinimal, OneCompartment

OPTS = SolverOptions(controller=StepSizeController(rtol=1e-10, atol=1e-12))


def glucose_day(model):
    sched = Schedule.build(model, [(120.0, 60.0, "meal"), (120.0, 1.0, "insulin")])
    return sched, jnp.arange(0.0, 601.0, 10.0)


def randomize(model, key, scale=0.3):
    """Give every learned layer random non-zero weights."""
    leaves, tree = jax.tree.flatten(eqx.filter(model, eqx.is_inexact_array))
    keys = jax.random.split(key, len(leaves))
    new = [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    arrays = jax.tree.unflatten(tree, new)
    static = eqx.filter(model, eqx.is_inexact_array, inverse=True)
    merged = eqx.combine(arrays, static)
    # keep the fixed scalings of the networks
    return eqx.tree_at(lambda m: [c.net.out_scale for c in m.corrections]
                       + [c.net.in_scale for c in m.corrections]
                       + [c.net.in_shift for c in m.corrections], merged,
                       [c.net.out_scale for c in model.corrections]
                       + [c.net.in_scale for c in model.corrections]
                       + [c.net.in_shift for c in model.corrections])


@pytest.mark.parametrize("backend", ["diffrax", "ensemble"])
def test_learned_part_off_is_exactly_the_mechanism(backend):
    mech = BergmanMinimal()
    corr = state_correction(mech, ("G",), ("G", "X", "sin_day", "cos_day"),
                            key=jax.random.PRNGKey(0), feature_scales={"G": (100.0, 50.0)})
    hyb = randomize(HybridModel(mech, (corr,), day_length=1440.0), jax.random.PRNGKey(1))
    theta = mech.typical_params()
    sched, ts = glucose_day(mech)
    opts = dataclasses.replace(OPTS, backend=backend)
    ref = simulate(mech, theta, sched, ts, options=opts).ys
    off = simulate(hyb.switched_off(), theta, sched, ts, options=opts).ys
    np.testing.assert_array_equal(np.asarray(off), np.asarray(ref))
    on = simulate(hyb, theta, sched, ts, options=opts).ys
    assert np.max(np.abs(np.asarray(on) - np.asarray(ref))) > 1e-3
    # a fresh term outputs exactly zero; only the compiled program differs (rounding)
    fresh = simulate(HybridModel(mech, (corr,)), theta, sched, ts, options=opts).ys
    np.testing.assert_allclose(np.asarray(fresh), np.asarray(ref), rtol=1e-10, atol=1e-12)


class ExactElimination(eqx.Module):
    """A 'network' that computes the mechanistic elimination term exactly."""

    def __call__(self, x):
        central, cl, v = x[..., 0], x[..., 1], x[..., 2]
        return (cl / v * central)[..., None]


def test_closure_replaces_the_named_term():
    mech = OneCompartment()
    closure = term_closure(mech, "elimination", ("central", "CL", "V"), key=jax.random.PRNGKey(0))
    exact = eqx.tree_at(lambda c: c.net, closure, ExactElimination())
    theta = mech.typical_params()
    sched = Schedule.build(mech, [(0.0, 300.0, "depot")])
    ts = jnp.linspace(0.0, 24.0, 25)
    ref = simulate(mech, theta, sched, ts, options=OPTS).ys
    same = simulate(HybridModel(mech, (), (exact,)), theta, sched, ts, options=OPTS).ys
    np.testing.assert_allclose(np.asarray(same), np.asarray(ref), rtol=1e-12, atol=1e-12)
    # a fresh (zero) closure removes elimination: the amount is conserved
    none = simulate(HybridModel(mech, (), (closure,)), theta, sched, ts, options=OPTS).ys
    np.testing.assert_allclose(np.asarray(none).sum(-1)[1:], 300.0, rtol=1e-9)
    with pytest.raises(KeyError, match="unknown term 'clearance'.*absorption, elimination"):
        bad = dataclasses.replace(closure, term="clearance")
        simulate(HybridModel(mech, (), (bad,)), theta, sched, ts)


class Constant(eqx.Module):
    """A 'network' with a constant output."""

    value: float

    def __call__(self, x):
        return jnp.full(x.shape[:-1] + (1,), self.value)


def test_scale_and_add_closures_modulate_the_term():
    """scale: F -> F (1 + g); add: F -> F + g. A constant g = 0.25 scaling elimination is
    the mechanistic model with CL * 1.25; fresh networks leave the term unchanged."""
    mech = OneCompartment()
    theta = mech.typical_params()
    sched = Schedule.build(mech, [(0.0, 300.0, "depot")])
    ts = jnp.linspace(0.0, 24.0, 25)
    scale = term_closure(mech, "elimination", ("time",), key=jax.random.PRNGKey(0),
                         mode="scale")
    add = term_closure(mech, "elimination", ("time",), key=jax.random.PRNGKey(0), mode="add")
    ref = simulate(mech, theta, sched, ts, options=OPTS).ys
    for fresh in (scale, add):
        ys = simulate(HybridModel(mech, (), (fresh,)), theta, sched, ts, options=OPTS).ys
        np.testing.assert_allclose(np.asarray(ys), np.asarray(ref), rtol=1e-12, atol=1e-12)
    faster = mech.typical_params(CL=1.25 * float(theta[mech.index("param", "CL")]))
    want = simulate(mech, faster, sched, ts, options=OPTS).ys
    scaled = eqx.tree_at(lambda c: c.net, scale, Constant(0.25))
    got = simulate(HybridModel(mech, (), (scaled,)), theta, sched, ts, options=OPTS).ys
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-9, atol=1e-9)
    # add a constant 2 mg/h of elimination: the central difference d obeys
    # d' = -k d - 2, so d(t) = -(2 / k)(1 - exp(-k t)) with k = CL / V
    added = eqx.tree_at(lambda c: c.net, add, Constant(2.0))
    got = simulate(HybridModel(mech, (), (added,)), theta, sched, ts, options=OPTS).ys
    k = float(theta[mech.index("param", "CL")] / theta[mech.index("param", "V")])
    np.testing.assert_allclose(np.asarray(got)[:, 1] - np.asarray(ref)[:, 1],
                               -(2.0 / k) * (1 - np.exp(-k * np.asarray(ts))), rtol=1e-8,
                               atol=1e-8)
    with pytest.raises(ValueError, match="mode must be one of"):
        term_closure(mech, "elimination", ("time",), key=jax.random.PRNGKey(0), mode="times")


def test_gradient_with_respect_to_network_weights():
    mech = OneCompartment()
    corr = state_correction(mech, ("central",), ("central", "time"), key=jax.random.PRNGKey(2),
                            feature_scales={"central": (0.0, 100.0), "time": (12.0, 12.0)},
                            out_scale=5.0)
    hyb = randomize(HybridModel(mech, (corr,)), jax.random.PRNGKey(3), scale=0.5)
    theta = jnp.asarray(mech.typical_params())
    sched = Schedule.build(mech, [(0.0, 300.0, "depot")])
    ts = jnp.linspace(1.0, 24.0, 12)

    def loss(model):
        return jnp.sum(simulate(model, theta, sched, ts, options=OPTS).ys[:, 1] ** 2) * 1e-4

    grads = eqx.filter_grad(loss)(hyb)
    w = hyb.corrections[0].net.mlp.layers[0].weight
    g = grads.corrections[0].net.mlp.layers[0].weight
    h = 1e-6
    for (i, j) in [(0, 0), (3, 1), (7, 0)]:
        up = eqx.tree_at(lambda m: m.corrections[0].net.mlp.layers[0].weight, hyb,
                         w.at[i, j].add(h))
        dn = eqx.tree_at(lambda m: m.corrections[0].net.mlp.layers[0].weight, hyb,
                         w.at[i, j].add(-h))
        fd = (loss(up) - loss(dn)) / (2 * h)
        np.testing.assert_allclose(float(g[i, j]), float(fd), rtol=1e-5, atol=1e-9)
    assert float(hyb.penalty()) > 0


def test_neural_ode_baseline_has_no_mechanism():
    mech = OneCompartment()
    node = neural_ode(mech, key=jax.random.PRNGKey(0))
    theta = mech.typical_params()
    sched = Schedule.build(mech, [(0.0, 300.0, "depot")])
    ts = jnp.linspace(0.0, 24.0, 7)
    ys = np.asarray(simulate(node, theta, sched, ts, options=OPTS).ys)
    # zero-initialised and no mechanism: the dose just sits in the depot
    np.testing.assert_allclose(ys[1:, 0], 300.0)
    np.testing.assert_allclose(ys[:, 1], 0.0)
    assert node.observable_names == mech.observable_names


def test_neural_ode_input_states_absorb_doses_as_the_mechanism_does():
    """With `input_states` (the dose-holding states), the depot empties exactly as in the
    mechanism (analytic: 300 exp(-ka t)) while the network drives the central compartment:
    zero-initialised it stays at 0, with random weights it follows g(depot, central)
    integrated independently (trapezoid on a fine grid)."""
    from hybrid_twin.hybrid import dose_input_states

    mech = OneCompartment()
    assert dose_input_states(mech) == ("depot", "central")
    node = neural_ode(mech, key=jax.random.PRNGKey(0), input_states=("depot",),
                      feature_scales={"depot": (0.0, 100.0), "central": (0.0, 10.0)},
                      out_scale=5.0, width=4, depth=1)
    assert node.corrections[0].states == ("central",)
    theta = mech.typical_params()
    ka = float(mech.param_dict(theta)["ka"])
    sched = Schedule.build(mech, [(0.0, 300.0, "depot")])
    ts = jnp.linspace(0.0, 24.0, 7)
    ys = np.asarray(simulate(node, theta, sched, ts, options=OPTS).ys)
    # (the output at t = 0 is taken before the dose)
    np.testing.assert_allclose(ys[1:, 0], 300.0 * np.exp(-ka * np.asarray(ts[1:])),
                               rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(ys[:, 1], 0.0)
    rnd = randomize(node, jax.random.PRNGKey(4))
    fine = jnp.linspace(0.0, 24.0, 4801)
    yf = np.asarray(simulate(rnd, theta, sched, fine, options=OPTS).ys)
    np.testing.assert_allclose(yf[1:, 0], 300.0 * np.exp(-ka * np.asarray(fine[1:])),
                               rtol=1e-7, atol=1e-9)
    x = yf[:, :2].copy()
    x[0, 0] = 300.0  # the state just after the dose
    g = np.asarray(rnd.corrections[0].net(jnp.asarray(x)))[:, 0]
    c = np.concatenate([[0.0], np.cumsum(0.5 * (g[1:] + g[:-1]) * np.diff(np.asarray(fine)))])
    assert np.max(np.abs(c)) > 1.0
    np.testing.assert_allclose(yf[::100, 1], c[::100], atol=1e-5 * np.max(np.abs(c)))
    with pytest.raises(KeyError, match="input_states"):
        neural_ode(mech, key=jax.random.PRNGKey(0), input_states=("gut",))


def test_covariate_network_shifts_parameters():
    mech = OneCompartment()
    net = CovariateNetwork(ScaledMLP(1, 1, key=jax.random.PRNGKey(0),
                                     in_shift=[70.0], in_scale=[10.0]), ("CL",), ("WT",))
    wt = jnp.array([[50.0], [70.0], [90.0]])
    theta = net.apply(mech, mech.typical_params(), wt)
    np.testing.assert_allclose(np.asarray(theta), np.tile(mech.typical_params(), (3, 1)))
    net2 = eqx.tree_at(lambda n: n.net.mlp.layers[-1].bias, net, jnp.array([0.1]))
    theta2 = net2.apply(mech, mech.typical_params(), wt)
    np.testing.assert_allclose(np.asarray(theta2[:, 1]), 2.75 * np.exp(0.1), rtol=1e-12)


def test_autoscale_standardises_features_and_sizes_outputs_from_the_data():
    """`autoscale` sets each feature left to it to the mean and SD of that feature along
    the mechanism's trajectories of the cohort, and each automatic output scale to the RMS
    of what the term adds to (dy/dt of the corrected state, the closed flux); scales given
    explicitly are kept. Reference: the same statistics computed here from a plain
    simulation."""
    from hybrid_twin.data.virtual import DoseSpec, ScheduleSpec, virtual_cohort
    from hybrid_twin.hybrid import autoscale

    mech = BergmanMinimal()
    spec = ScheduleSpec(doses=(DoseSpec(120.0, 60.0, "meal", time_jitter=30.0,
                                        amount_cv=0.3), DoseSpec(120.0, 1.0, "insulin")),
                        horizon=600.0, obs_every=10.0, observables=("glucose",))
    vc = virtual_cohort(mech, 6, schedule=spec, seed=0)
    corr = state_correction(mech, ("G", "X"), ("G", "meal_on_board", "sin_day", "p1"),
                            key=jax.random.PRNGKey(0), feature_scales={"sin_day": (0.0, 1.0)})
    clo = term_closure(mech, "insulin_action", ("I",), key=jax.random.PRNGKey(1), out_scale=2.0,
                       mode="add")
    sca = term_closure(mech, "insulin_action_gain", ("cos_day",), key=jax.random.PRNGKey(2),
                       mode="scale")
    hyb = HybridModel(mech, (corr,), (clo, sca), day_length=1440.0)
    theta = np.asarray(vc.true_params)
    scaled = autoscale(hyb, vc.cohort, theta, options=OPTS)

    sol = simulate(mech, theta, vc.cohort.schedule, vc.cohort.obs_times, options=OPTS)
    ys = np.asarray(sol.ys)
    t = np.asarray(vc.cohort.obs_times)
    g, x, i, q = ys[..., 0], ys[..., 1], ys[..., 2], ys[..., 3]
    p1 = np.broadcast_to(theta[:, 0][:, None], g.shape)
    net = scaled.corrections[0].net
    np.testing.assert_allclose(net.in_shift, [g.mean(), q.mean(), 0.0, p1.mean()], rtol=1e-6)
    np.testing.assert_allclose(net.in_scale, [g.std(), q.std(), 1.0, p1.std()], rtol=1e-6)
    dy = mech.vector_field(t, tuple(ys[..., k] for k in range(5)), mech.param_dict(
        theta[:, None, :]), {"carb_rate": np.zeros_like(t)})
    rms = [float(np.sqrt(np.mean(np.asarray(d) ** 2))) for d in dy[:2]]
    np.testing.assert_allclose(net.out_scale, rms, rtol=1e-6)
    assert scaled.closures[0].net.out_scale[0] == 2.0  # given: kept
    np.testing.assert_allclose(scaled.closures[0].net.in_shift, [i.mean()], rtol=1e-6)
    assert scaled.closures[1].net.out_scale[0] == 0.5  # a relative change of the term
    # a zero-initialised term still adds nothing: the hybrid is still the mechanism
    np.testing.assert_array_equal(
        np.asarray(simulate(scaled, theta, vc.cohort.schedule, vc.cohort.obs_times,
                            options=OPTS).ys), ys)
    # every patient at the typical values: a parameter feature is scaled by its declared
    # spread (typical x omega), not by max(|mean|, 1) (which would flatten p1 ~ 0.03)
    typ = np.tile(mech.typical_params(), (6, 1))
    flat = autoscale(hyb, vc.cohort, typ, options=OPTS).corrections[0].net
    q = mech.parameter("p1")
    assert float(flat.in_shift[3]) == pytest.approx(q.typical, rel=1e-12)
    assert float(flat.in_scale[3]) == pytest.approx(q.typical * q.omega, rel=1e-12)


def test_on_board_features_are_the_dose_targets_holding_states():
    """"<target>_on_board" is the sum of the states a dose target names as holding doses
    until they act (default: the state it enters)."""
    from hybrid_twin.hybrid import _features, feature_names
    from hybrid_twin.models.base import DoseTarget

    mech = BergmanMinimal()
    assert {"meal_on_board", "insulin_on_board"} <= set(feature_names(mech))
    y = tuple(np.array([float(k + 1)]) for k in range(5))
    cols = _features(mech, ("meal_on_board", "insulin_on_board"), 0.0, y, {}, {}, 1440.0)
    assert [float(c[0]) for c in cols] == [4.0, 5.0]  # Q_gut, S_sc

    class TwoDepots(BergmanMinimal):
        dose_targets = (DoseTarget("meal", "Q_gut", "g", on_board=("Q_gut", "S_sc")),
                        BergmanMinimal.dose_targets[1])

    cols = _features(TwoDepots(), ("meal_on_board",), 0.0, y, {}, {}, 1440.0)
    assert float(cols[0][0]) == 9.0
    with pytest.raises(KeyError, match="unknown feature 'snack_on_board'"):
        _features(mech, ("snack_on_board",), 0.0, y, {}, {}, 1440.0)


@pytest.mark.parametrize("backend", ["diffrax", "ensemble"])
def test_latent_states_start_at_zero_and_move_only_by_their_corrections(backend):
    """A hybrid with a latent state z1 (a learned reservoir): z1 starts at 0; switched off,
    or with zero-initialised networks, the observables are the mechanism's (to the solver's
    tolerance: the step controller's error norm counts the extra state); with
    random weights z1 moves and feeds back into the central compartment; the latent
    integral matches a hand-written integration of dz/dt = g(central)."""
    from hybrid_twin.hybrid import latent_names

    mech = OneCompartment()
    fill = state_correction(mech, ("z1",), ("central",), key=jax.random.PRNGKey(0),
                            feature_scales={"central": (0.0, 100.0)}, out_scale=0.1, width=4,
                            depth=1)
    back = state_correction(mech, ("central",), ("z1",), key=jax.random.PRNGKey(1),
                            feature_scales={"z1": (0.0, 1.0)}, out_scale=5.0, width=4,
                            depth=1)
    hyb = HybridModel(mech, (fill, back), latent=latent_names(1))
    assert hyb.state_names == ("depot", "central", "z1") and hyb.n_states == 3
    theta = mech.typical_params()
    sched = Schedule.build(mech, [(0.0, 300.0, "depot")])
    ts = jnp.linspace(0.0, 24.0, 49)
    opts = dataclasses.replace(OPTS, backend=backend)
    ref = simulate(mech, theta, sched, ts, options=opts)
    zero = simulate(hyb, theta, sched, ts, options=opts)
    np.testing.assert_allclose(np.asarray(zero.observables(hyb, theta)),
                               np.asarray(ref.observables(mech, theta)), rtol=1e-8, atol=1e-12)
    assert np.all(np.asarray(zero.ys)[:, 2] == 0.0)
    rnd = randomize(hyb, jax.random.PRNGKey(3))
    rnd = eqx.tree_at(lambda m: [c.net.out_scale for c in m.corrections], rnd,
                      [c.net.out_scale for c in hyb.corrections])
    np.testing.assert_allclose(
        np.asarray(simulate(rnd.switched_off(), theta, sched, ts, options=opts)
                   .observables(rnd, theta)), np.asarray(ref.observables(mech, theta)),
        rtol=1e-8, atol=1e-12)
    on = simulate(rnd, theta, sched, ts, options=opts)
    ys = np.asarray(on.ys)
    assert np.max(np.abs(ys[:, 2])) > 1e-3
    assert np.max(np.abs(ys[:, 1] - np.asarray(ref.ys)[:, 1])) > 1e-3
    # z1(t) = integral of g_fill(central(s)) ds, by the trapezoid rule on a fine grid
    fine = jnp.linspace(0.0, 24.0, 4801)
    yf = np.asarray(simulate(rnd, theta, sched, fine, options=opts).ys)
    g = np.asarray(rnd.corrections[0].net(jnp.asarray(yf[:, 1:2])))[:, 0]
    z = np.concatenate([[0.0], np.cumsum(0.5 * (g[1:] + g[:-1]) * np.diff(np.asarray(fine)))])
    np.testing.assert_allclose(yf[::100, 2], z[::100], atol=1e-6 * np.max(np.abs(z)) + 1e-12)
