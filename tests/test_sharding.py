"""The patient axis sharded over several devices gives the single-device result.

Runs in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4 (DESIGN.md)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

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
    print(json.dumps(out))
""")


def run(devices: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.getcwd(), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    res = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_sharded_equals_single_device():
    one, four = run(1), run(4)
    assert one["devices"] == 1 and four["devices"] == 4
    for backend in ("diffrax", "ensemble", "kernel"):
        assert four[backend + "_status"] == [0] * 10
        np.testing.assert_allclose(np.array(four[backend]), np.array(one[backend]),
                                   rtol=1e-12, atol=1e-12)
