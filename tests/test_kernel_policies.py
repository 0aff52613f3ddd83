"""The kernel under the GPU policies, in interpret mode on CPU: float32 precision in
calibration, float32 tolerances, block sizes from N, prediction Jacobians along the free
parameters only, and rolled Runge–Kutta stages."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_twin import SolverOptions, StepSizeController, simulate
from hybrid_twin.calibrate import ErrorModel, calibrate
from test_kernel import glucose_cohort, rel_err

def test_the_gpu_precision_policy_calibrates_in_float32_and_agrees_with_float64(monkeypatch):
    """Under the GPU precision policy ("auto" on a GPU: float32) a float64 cohort is
    calibrated with float32 kernels (every kernel traced in the loop sees float32
    parameters, data and tangents, whatever x64 makes of Python floats), and its estimates
    agree with the float64 fit to a small fraction of their standard errors."""
    from benchmarks.calibrate import scenario
    from hybrid_twin.solve import kernel as kernel_mod
    from hybrid_twin.solve import options as options_mod

    model, vc, free, _ = scenario("glucose5", 8, seed=3)
    opts = SolverOptions(controller=StepSizeController(rtol=1e-6, atol=1e-6), backend="kernel")
    kw = dict(free=free, max_iter=12,
              error_model=ErrorModel("additive", additive=5.0, estimate=False))
    traced = []
    real_run = kernel_mod.run_kernel

    def spy(model, theta, prep, **kw_):
        d = kw_.get("directions")
        traced.append({theta.dtype, prep.ts.dtype, prep.q_jump.dtype}
                      | ({getattr(d, "scale", d).dtype} if d is not None else set())
                      | ({kw_["data"].y.dtype, kw_["data"].weight.dtype}
                         if kw_.get("data") is not None else set()))
        return real_run(model, theta, prep, **kw_)

    monkeypatch.setattr(kernel_mod, "run_kernel", spy)
    monkeypatch.setattr(options_mod, "default_platform", lambda: "gpu")
    gpu_policy = dataclasses.replace(opts, precision="auto")
    assert gpu_policy.dtype() == jnp.float32
    jax.clear_caches()
    r32 = calibrate(model, vc.cohort, options=gpu_policy, **kw)
    monkeypatch.undo()
    assert len(traced) >= 2 and all(t == {jnp.dtype(jnp.float32)} for t in traced), traced
    for x in (r32.z, r32.params, r32.cost, r32.cov_z):
        assert x.dtype == jnp.float32
    assert dataclasses.replace(opts, precision="auto").dtype() == jnp.float64  # CPU, x64
    r64 = calibrate(model, vc.cohort, options=opts, **kw)
    se = np.sqrt(np.diagonal(np.asarray(r64.cov_z), axis1=1, axis2=2))
    assert np.max(np.abs(np.asarray(r32.z, np.float64) - np.asarray(r64.z)) / se) < 0.05


def test_float32_tolerances_are_raised_to_what_float32_can_meet():
    opts = SolverOptions(controller=StepSizeController(rtol=1e-8, atol=1e-10))
    f32 = opts.for_dtype(jnp.float32)
    assert (f32.controller.rtol, f32.controller.atol) == (1e-6, pytest.approx(1e-8))
    assert opts.for_dtype(jnp.float64) is opts
    with pytest.raises(ValueError, match="precision must be one of"):
        SolverOptions(precision="half")


def test_block_size_follows_the_batch():
    """Small cohorts spread over many SMs in one-warp programs; large ones use 128."""
    from hybrid_twin.solve.kernel import default_block

    assert default_block(60, n_sm=132) == 32
    assert default_block(132 * 64, n_sm=132) == 64
    assert default_block(100_000, n_sm=132) == 128


def test_prediction_jacobian_differentiates_along_the_free_parameters_only(monkeypatch):
    """`predict_with_intervals`' Jacobian comes from sensitivities along the F free
    parameters (the kernel integrates F directions, not one per parameter) and equals
    `jax.jacfwd` of the prediction. (The other backends' generic path is that of
    `predict_with_intervals` in tests/test_calibrate.py.)"""
    from hybrid_twin.calibrate import _Problem
    from hybrid_twin.solve import kernel as kernel_mod

    model, theta, sched, ts = glucose_cohort(3, seed=4)
    ts = ts[:120]
    free = ("p1", "p3", "Gb")
    idx = tuple(model.index("param", f) for f in free)
    opts = SolverOptions(controller=StepSizeController(rtol=1e-10, atol=1e-12),
                         backend="kernel", differentiation="forward")
    problem = _Problem(model, idx, opts, False)
    z = model.to_unconstrained(theta)[:, jnp.asarray(idx)]
    ks = []
    real = kernel_mod.run_kernel

    def spy(*a, **kw):
        d = kw.get("directions")
        ks.append(None if d is None else len(d.index))
        return real(*a, **kw)

    monkeypatch.setattr(kernel_mod, "run_kernel", spy)
    obs = jnp.zeros((3, ts.shape[0]), jnp.int32)
    mask = jnp.ones((3, ts.shape[0]), bool)
    f, jac = problem.jacobian(z, theta, sched, jnp.broadcast_to(ts, (3, ts.shape[0])), mask,
                              obs)
    assert ks == [3]
    monkeypatch.undo()

    def pred(zz):
        return problem.predict(zz, theta, sched, jnp.broadcast_to(ts, (3, ts.shape[0])),
                               mask, obs)[0]

    ref = jax.vmap(lambda t: jax.jvp(pred, (z,), (t,))[1])(
        jnp.eye(3)[:, None, :] * jnp.ones_like(z)[None])
    # (the sensitivities are in the error norm, so the steps differ a little)
    np.testing.assert_allclose(np.asarray(f), np.asarray(pred(z)), rtol=1e-8)
    np.testing.assert_allclose(np.asarray(jac), np.asarray(jnp.moveaxis(ref, 0, -1)),
                               rtol=1e-9, atol=1e-9 * float(jnp.max(jnp.abs(ref))))


def test_rolled_stages_take_the_same_steps():
    """`Kernel(roll_stages=True)` (the stages as a loop: less code to compile) takes the
    same steps and gives the unrolled kernel's states and sensitivities to rounding."""
    from hybrid_twin.solve import Kernel

    model, theta, sched, ts = glucose_cohort(4, seed=2)
    def run(roll):
        opts = SolverOptions(backend=Kernel(roll_stages=roll), max_steps=20_000,
                             controller=StepSizeController(rtol=1e-8, atol=1e-10))
        sol = simulate(model, theta, sched, ts[:100], options=opts)
        jac = jax.jacfwd(lambda th: simulate(model, th, sched, ts[:100],
                                             options=opts).ys[:, -1, 0].sum())(theta)
        return sol, jac

    (a, ja), (b, jb) = run(False), run(True)
    np.testing.assert_array_equal(np.asarray(a.num_steps), np.asarray(b.num_steps))
    assert rel_err(b.ys, a.ys) < 1e-12 and rel_err(jb, ja) < 1e-10
