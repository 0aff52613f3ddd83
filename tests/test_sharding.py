"""The patient axis sharded over several devices gives the single-device result.

Runs in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4 (DESIGN.md)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

CODE = textwrap.dedent("""
    import json, jax, numpy as np
    jax.config.update("jax_enable_x64", True)
    from hybrid_twin import SolverOptions, simulate
    from benchmarks.common import glucose_day_cohort
    model, params, schedule, ts = glucose_day_cohort(10)   # 10 is not a multiple of 4
    out = {"devices": jax.local_device_count()}
    for backend in ("diffrax", "ensemble", "kernel"):
        sol = simulate(model, params, schedule, ts, options=SolverOptions(backend=backend))
        out[backend] = np.asarray(sol.ys[..., 0]).tolist()
        out[backend + "_status"] = np.asarray(sol.status).tolist()
        out[backend + "_sharding"] = str(sol.ys.sharding) if hasattr(sol.ys, "sharding") else ""
""")


def run(devices: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.getcwd(), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
               f"--xla_force_host_platform_device_count={devices}")
    res = subprocess.run([sys.executable, "-c", CODE + FIT], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs() -> tuple[dict, dict]:
    """One subprocess per device count runs every check (simulate, calibrate, train)."""
    return run(1), run(4)


def test_sharded_equals_single_device(runs):
    one, four = runs
    assert one["devices"] == 1 and four["devices"] == 4
    for backend in ("diffrax", "ensemble", "kernel"):
        assert four[backend + "_status"] == [0] * 10
        np.testing.assert_allclose(np.array(four[backend]), np.array(one[backend]),
                                   rtol=1e-12, atol=1e-12)


FIT = textwrap.dedent("""
    from hybrid_twin import SolverOptions
    from hybrid_twin.calibrate import ErrorModel, calibrate
    from hybrid_twin.data.virtual import DoseSpec, NoiseModel, ScheduleSpec, virtual_cohort
    from hybrid_twin.hybrid import HybridModel, term_closure
    from hybrid_twin.models import OneCompartment
    from hybrid_twin.population import train_population
    model = OneCompartment()
    spec = ScheduleSpec(doses=(DoseSpec(0.0, 320.0, "depot"),),
                        obs_times=(0.5, 1, 2, 4, 6, 8, 12, 24))
    vc = virtual_cohort(model, 10, schedule=spec, seed=5,
                        noise=NoiseModel("additive", additive_sd=0.3))
    opts = SolverOptions(backend="ensemble")
    # an additive error model, estimated: the sharded LM loop and the pooled re-estimate
    res = calibrate(model, vc.cohort, error_model=ErrorModel("additive", 0.5), options=opts)
    out["params"] = np.asarray(res.params).tolist()
    out["se"] = np.asarray(res.se).tolist()
    out["conv"] = np.asarray(res.converged).tolist()
    out["sd"] = res.error_model.additive
    hybrid = HybridModel(model, closures=(term_closure(
        model, "elimination", ("central",), key=jax.random.PRNGKey(0), width=4, depth=1,
        mode="scale", out_scale=0.3),))
    free = ("CL", "V")
    best, state, hist = train_population(
        hybrid, vc.cohort, free=free, epochs=2, batch_size=3, learning_rate=1e-3,
        error_model=ErrorModel("additive", 0.3, estimate=False), options=opts)
    out["z"] = np.asarray(state.z).tolist()
    out["w"] = [np.asarray(x).tolist() for x in jax.tree.leaves(
        state.model.closures[0].net) if isinstance(x, jax.Array)]
    out["train"] = [h["train_rmse_weighted"] for h in hist]
    print(json.dumps(out))
""")


def test_sharded_calibration_and_training_equal_single_device(runs):
    """Calibration (its whole LM loop per device) and population training (the
    mini-batch split over the devices, gradients summed) on 4 host devices give the
    single-device results; 10 patients and batches of 3 do not divide by 4."""
    one, four = runs
    assert one["devices"] == 1 and four["devices"] == 4
    assert all(four["conv"]) and four["conv"] == one["conv"]
    assert np.all(np.isfinite(np.array(one["z"]))) and np.all(np.isfinite(one["train"]))
    for key in ("params", "se", "sd", "z", "train"):
        np.testing.assert_allclose(np.array(four[key]), np.array(one[key]), rtol=1e-9,
                                   atol=1e-12, err_msg=key)
    for a, b in zip(four["w"], one["w"]):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-9, atol=1e-12)
