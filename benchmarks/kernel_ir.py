"""What the kernel backend asks of a GPU, measured on any host (no GPU needed).

Two kinds of figures, both independent of the machine's speed:

- memory traffic outside the kernel: XLA's cost analysis ("bytes accessed") of the event
  preparation (`hybrid_twin.solve._core.prepare`, with save times shared by all patients
  and per patient; the ensemble backend walks the same prepared events, with per-patient
  save times), and of the transpose of the kernel's (M, S, N) output to `simulate`'s
  (N, M, S), beside the bytes of the output itself;
- the Triton IR of the kernels (lowered for CUDA here, as on a GPU): lines, loads, stores,
  floating-point operations and the values carried through the step loop (a proxy for
  register pressure) — for the RK4 and Tsit5 solves and the Gauss–Newton normal equations
  with 7 free parameters (Tsit5 and RK4).

The glucose cohort of `benchmarks.gpu_ensemble` (24 h, three meals with insulin, glucose
every 5 min, float32). One JSON line per figure set.

    python -m benchmarks.kernel_ir --n 100000 --out benchmarks/results/kernel_ir-cpu.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import re

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

from benchmarks.common import device_info, emit  # noqa: E402
from benchmarks.gpu_ensemble import F32, FREE, RK4_DT, cohort, timed  # noqa: E402
from hybrid_twin import RK4, SolverOptions, StepSizeController  # noqa: E402


def bytes_accessed(fn, *args) -> float:
    """XLA's estimate of the bytes `jit(fn)` reads and writes (GB)."""
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return round(float(cost.get("bytes accessed", 0.0)) / 1e9, 4)


def best_time(fn, *args) -> float:
    """Best of three runs of `jit(fn)` after a warm-up (s)."""
    return round(timed(jax.jit(fn), *args)[1], 4)


def triton_ir(fn, *args) -> str:
    """The Triton module of the one pallas_call in `fn`, lowered for CUDA."""
    from jax._src.pallas.triton import lowering, pallas_call_registration

    from hybrid_twin.solve.kernel import lower_for_cuda

    captured = []
    original = lowering.lower_jaxpr_to_triton_module

    def capture(*a, **k):
        res = original(*a, **k)
        captured.append(res.module.operation.get_asm(enable_debug_info=False))
        return res

    pallas_call_registration.lowering.lower_jaxpr_to_triton_module = capture
    try:
        lower_for_cuda(fn, *args)
    finally:
        pallas_call_registration.lowering.lower_jaxpr_to_triton_module = original
    (ir,) = captured
    return ir


def ir_stats(ir: str) -> dict:
    loop = re.search(r"scf\.while.*", ir)
    carried = len(re.findall(r"tensor<\d+x[fi]\d+>", loop.group(0))) // 2 if loop else 0
    return {"ir_lines": ir.count("\n"), "loads": ir.count("tt.load"),
            "stores": ir.count("tt.store"),
            "float_ops": sum(ir.count(f"arith.{op}f ") for op in ("add", "sub", "mul", "div")),
            "step_loop_carried_values": carried}


def main(argv=None):
    from hybrid_twin.solve import AxisDirections, Batch, FitData, Kernel
    from hybrid_twin.solve import kernel as kernel_module
    from hybrid_twin.solve._core import prepare

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    n = args.n
    model, theta, sched, ts, _, _ = cohort(n)
    m = int(ts.shape[0])
    zero = jnp.asarray(0.0, F32)
    shared_mask = jnp.ones((m,), bool)
    ts_b, mask_b = jnp.broadcast_to(ts, (n, m)), jnp.ones((n, m), bool)

    def batch(th, sc, t_=ts, m_=shared_mask):
        return Batch(th, sc, t_, m_, zero, False)

    def no_params(sc):  # prepare reads only the batch size and dtype of theta
        return jnp.zeros((sc.dose_times.shape[0], 0), F32)

    def prep_shared(sc):
        return prepare(model, batch(no_params(sc), sc))

    def prep_per_patient(sc, t_, m_):
        return prepare(model, batch(no_params(sc), sc, t_, m_))

    out_shape = jax.ShapeDtypeStruct((m, model.n_states, n), F32)
    per_patient_gb = bytes_accessed(prep_per_patient, sched, ts_b, mask_b)
    per_patient_s = best_time(prep_per_patient, sched, ts_b, mask_b)
    emit({"benchmark": "kernel_ir", "variant": "outside_the_kernel", "N": n, **device_info(),
          "prepare_shared_ts_gb": bytes_accessed(prep_shared, sched),
          "prepare_per_patient_ts_gb": per_patient_gb,
          # the ensemble backend walks the same prepared events, with per-patient save times
          "ensemble_events_gb": per_patient_gb,
          "output_transpose_gb": bytes_accessed(lambda x: jnp.moveaxis(x, -1, 0), out_shape),
          "output_gb": round(m * model.n_states * n * 4 / 1e9, 4),
          "prepare_shared_ts_cpu_s": best_time(prep_shared, sched),
          "ensemble_events_cpu_s": per_patient_s},
         args.out)

    rk4 = SolverOptions(method=RK4(RK4_DT), backend="kernel")
    tsit5 = SolverOptions(controller=StepSizeController(rtol=1e-5, atol=1e-6),
                          backend="kernel")
    free = [model.index("param", q) for q in FREE]
    nb = 1024  # the IR does not depend on N

    def solve(th, sc, opts):
        return kernel_module.run_kernel(model, th, prepare(model, batch(th, sc)),
                                        method=opts.method, controller=opts.controller,
                                        max_steps=opts.max_steps, interpret=False,
                                        roll_stages=opts.backend.roll_stages)["states"]

    def gauss_newton(th, sc, opts):
        z = model.to_unconstrained(th)
        d = jax.jvp(model.from_unconstrained, (z,), (jnp.ones_like(z),))[1]
        dirs = AxisDirections(tuple(free), d[:, jnp.asarray(free)].T)
        y, w = jnp.full((th.shape[0], m), 110.0, F32), jnp.full((th.shape[0], m), 0.2, F32)
        k = jnp.zeros((th.shape[0], m), jnp.int32)
        b = batch(th, sc, jnp.broadcast_to(ts, (th.shape[0], m)), jnp.ones((th.shape[0], m), bool))
        return opts.backend.normal_equations(model, b, dirs, FitData(y, w, k), opts).h

    def rolled(opts):
        return dataclasses.replace(opts, backend=Kernel(roll_stages=True))

    small = jax.tree.map(lambda x: x[:nb], (theta, sched))
    interpret_default = kernel_module.interpret_default
    kernel_module.interpret_default = lambda: False  # normal_equations: the GPU path
    try:
        for name, fn, opts in (("solve_rk4", solve, rk4), ("solve_tsit5", solve, tsit5),
                               ("gauss_newton_tsit5", gauss_newton, tsit5),
                               ("gauss_newton_rk4", gauss_newton, rk4),
                               ("solve_tsit5_rolled", solve, rolled(tsit5)),
                               ("gauss_newton_tsit5_rolled", gauss_newton, rolled(tsit5)),
                               ("gauss_newton_rk4_rolled", gauss_newton, rolled(rk4))):
            ir = triton_ir(lambda th, sc, fn=fn, opts=opts: fn(th, sc, opts), *small)
            emit({"benchmark": "kernel_ir", "variant": name, **device_info(),
                  **ir_stats(ir)}, args.out)
    finally:
        kernel_module.interpret_default = interpret_default


if __name__ == "__main__":
    main()
