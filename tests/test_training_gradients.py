"""Hybrid training's gradients (reverse mode, with respect to network weights and patient
parameters) on every backend: the ensemble and kernel backends equal the diffrax backend
(adaptive Tsit5, tight tolerances) and central finite differences (fixed-step RK4, whose
discrete map is smooth in its inputs), in float64, from the basal steady state."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.common import glucose_day_cohort
from hybrid_twin import RK4, SolverOptions, StepSizeController, simulate
from hybrid_twin.hybrid import HybridModel, state_correction

TS = jnp.arange(0.0, 601.0, 10.0)  # 10 h: fasting, then breakfast with insulin


def problem():
    mech, theta, schedule, _ = glucose_day_cohort(2, seed=1)
    corr = state_correction(mech, ("G",), ("G", "X", "sin_day", "cos_day"),
                            key=jax.random.PRNGKey(0), width=4, depth=1, out_scale=0.5)
    model = HybridModel(mech, corrections=(corr,))
    # away from the zero initialisation, so that every layer has a gradient
    leaves, tree = jax.tree.flatten(eqx.filter(model, eqx.is_inexact_array))
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    noisy = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    model = eqx.combine(jax.tree.unflatten(tree, noisy),
                        eqx.filter(model, eqx.is_inexact_array, inverse=True))
    y = simulate(mech, theta, schedule, TS).ys[..., 0] + 7.0  # data the model misses
    return model, theta, schedule, y


def loss_fn(options, schedule, y):
    def loss(diff, static):
        net, theta = eqx.combine(diff, static)
        f = simulate(net, theta, schedule, TS, options=options).ys[..., 0]
        return 0.5 * jnp.sum(((y - f) / 5.0) ** 2)
    return loss


def grads(options, model, theta, schedule, y):
    diff, static = eqx.partition((model, theta), eqx.is_inexact_array)
    return diff, static, jax.grad(loss_fn(options, schedule, y))(diff, static)


def close(a, b, rtol):
    """Leaf by leaf: |a - b| <= rtol * max|b| (entries of a leaf share its scale); a leaf
    the loss does not depend on (the network's fixed feature scaling) is zero in both."""
    n_nonzero = 0
    for x, r in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, r = np.asarray(x), np.asarray(r)
        n_nonzero += bool(np.max(np.abs(r)) > 0)
        np.testing.assert_allclose(x, r, rtol=0, atol=rtol * np.max(np.abs(r)))
    assert n_nonzero >= 5  # every weight and bias of the network, and the parameters


def test_reverse_gradients_of_ensemble_and_kernel_equal_diffrax():
    model, theta, schedule, y = problem()
    tight = StepSizeController(rtol=1e-10, atol=1e-12)
    ref = grads(SolverOptions(controller=tight, backend="diffrax",
                              differentiation="reverse", max_steps=100_000),
                model, theta, schedule, y)[2]
    ens = grads(SolverOptions(controller=tight, backend="ensemble",
                              differentiation="reverse", max_steps=100_000),
                model, theta, schedule, y)[2]
    ker = grads(SolverOptions(controller=tight, backend="kernel",
                              differentiation="reverse", max_steps=100_000),
                model, theta, schedule, y)[2]
    close(ens, ref, 1e-5)
    # the kernel's pullback is the ensemble's (to rounding of the loss's own reductions),
    # and that is the kernel's own derivative because in float64 the kernel's forward
    # pass takes the same steps as the recomputation and gives the same states to
    # rounding (the kernel evaluates the network neuron by neuron)
    close(ker, ens, 1e-10)
    solved = {b: simulate(model, theta, schedule, TS, options=SolverOptions(
        controller=tight, backend=b, max_steps=100_000)) for b in ("kernel", "ensemble")}
    np.testing.assert_array_equal(np.asarray(solved["kernel"].num_steps),
                                  np.asarray(solved["ensemble"].num_steps))
    np.testing.assert_allclose(np.asarray(solved["kernel"].ys),
                               np.asarray(solved["ensemble"].ys), rtol=1e-12)


@pytest.mark.parametrize("backend", ["ensemble", "kernel"])
def test_reverse_gradients_equal_central_finite_differences(backend):
    model, theta, schedule, y = problem()
    options = SolverOptions(method=RK4(1.0), backend=backend, differentiation="reverse",
                            max_steps=100_000)
    diff, static, g = grads(options, model, theta, schedule, y)
    # the finite differences solve forward only (no reverse machinery)
    forward = dataclasses.replace(options, differentiation=None)
    loss = jax.jit(loss_fn(forward, schedule, y), static_argnums=1)
    leaves, tree = jax.tree.flatten(diff)

    def fd(direction, rel=1e-5):
        def at(eps):
            moved = [x + eps * d for x, d in zip(leaves, direction)]
            return float(loss(jax.tree.unflatten(tree, moved), static))
        return (at(rel) - at(-rel)) / (2 * rel)

    g_leaves = jax.tree.leaves(g)
    # every patient parameter, one at a time (scaled by its value)
    th_i = len(leaves) - 1
    for i in range(theta.shape[0]):
        for p in range(theta.shape[1]):
            d = [jnp.zeros_like(x) for x in leaves]
            d[th_i] = d[th_i].at[i, p].set(theta[i, p])
            exact = float(g_leaves[th_i][i, p] * theta[i, p])
            scale = float(np.max(np.abs(np.asarray(g_leaves[th_i] * theta))))
            assert abs(fd(d) - exact) <= 1e-5 * scale, (i, p, fd(d), exact)
    # the network weights: every leaf along its own random direction (not the fixed
    # feature and output scaling, which training does not move: stop_gradient)
    fixed = {id(x) for c in model.corrections
             for x in (c.net.in_shift, c.net.in_scale, c.net.out_scale)}
    keys = jax.random.split(jax.random.PRNGKey(2), th_i)
    checked = 0
    for j in range(th_i):
        if id(leaves[j]) in fixed:
            assert not np.any(np.asarray(g_leaves[j]))
            continue
        checked += 1
        d = [jnp.zeros_like(x) for x in leaves]
        d[j] = jax.random.normal(keys[j], leaves[j].shape, leaves[j].dtype)
        exact = float(jnp.sum(g_leaves[j] * d[j]))
        ref = fd(d)
        assert abs(ref - exact) <= 1e-5 * max(abs(ref), 1e-3), (j, ref, exact)
    assert checked >= 4
