"""GPU ensemble benchmark: the fused kernel backend against its peers, one run, one device.

Glucose model (`BergmanMinimal`: glucose, remote insulin action, plasma insulin, gut,
subcutaneous insulin), 24 h, three meals with an insulin bolus each (07:00, 12:00, 19:00;
amounts per patient), glucose saved every 5 min, per-patient log-normal parameters,
float32. For each N it times, after a warm-up call (compile time reported apart):

- `diffrax`: `simulate(..., backend="diffrax")` (vmap of diffeqsolve, Tsit5 + PID);
- `kernel_rk4` and `kernel_tsit5`: `simulate(..., backend="kernel")`, the fused Pallas
  kernel (RK4 with a 1-min step; adaptive Tsit5 with rtol 1e-5, atol 1e-6);
- `kernel_prepare_only`: the event preparation outside the kernel, alone;
- `kernel_rk4_glucose_only`: the RK4 kernel alone on a prepared batch, writing glucose only
  (the like-for-like of the CUDA kernel, whose inputs are also ready beforehand);
- `cuda_rk4`: a hand-written CUDA kernel of the same equations (CuPy `RawKernel`, one
  thread per patient, state in registers, RK4 with the same 1-min step) — the hardware
  reference;
- `torchdiffeq_rk4` and `torchdiffeq_dopri5`: torchdiffeq on the (N, 5) tensor, piecewise
  between the shared dose times;
- `gauss_newton_kernel` vs `gauss_newton_jacfwd`: one Gauss–Newton iteration (7 free
  parameters, each patient's JᵀJ and Jᵀr over its 289 observations): the kernel's
  in-kernel normal equations (Tsit5; `gauss_newton_kernel_rk4`: RK4, 1-min steps) vs
  `vmap(jacfwd)` of the diffrax backend (forward mode).
- `calibrate_kernel`: a full batched calibration (30 Levenberg–Marquardt iterations) on the
  kernel backend, with the median relative error of each free parameter.

Accuracy: max relative difference of glucose against a float64 CPU diffrax solve (rtol
1e-10) on the first `--ref-n` patients. Output: one JSON line per measurement.
CuPy or torchdiffeq missing, or a peer failing, is recorded in its line and skipped.

    python -m benchmarks.gpu_ensemble --out benchmarks/results/gpu_ensemble-h100.jsonl
    python -m benchmarks.gpu_ensemble --n 64 --gn-n 64 --calib-n 64   # CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import traceback

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import device_info, emit  # noqa: E402
from hybrid_twin import RK4, Kernel, Schedule, SolverOptions, StepSizeController, simulate  # noqa: E402
from hybrid_twin.models import BergmanMinimal  # noqa: E402
from hybrid_twin.population import sample_params  # noqa: E402

F32 = jnp.float32
MEAL_T = (420.0, 720.0, 1140.0)
DT_SAVE, HORIZON, RK4_DT = 5.0, 1440.0, 1.0
FREE = ("p1", "p2", "p3", "n", "Gb", "V_G", "k_abs")

CUDA_SRC = r"""
extern "C" __global__ void bergman_rk4(
    const float* __restrict__ theta,    // (11, n) p1 p2 p3 n Gb Ib V_I V_G k_abs f k_sc
    const float* __restrict__ carbs,    // (3, n) g
    const float* __restrict__ insulin,  // (3, n) U
    const int* __restrict__ dose_slot,  // (3,) save index of each dose time
    float* __restrict__ out,            // (m, n) glucose
    int n, int m, float dt_save, int substeps)
{
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float p1 = theta[0 * n + i], p2 = theta[1 * n + i], p3 = theta[2 * n + i];
  const float kn = theta[3 * n + i], Gb = theta[4 * n + i], Ib = theta[5 * n + i];
  const float VI = theta[6 * n + i], VG = theta[7 * n + i], kabs = theta[8 * n + i];
  const float f = theta[9 * n + i], ksc = theta[10 * n + i];
  float G = Gb, X = 0.f, I = Ib, Q = 0.f, S = 0.f;
  const float h = dt_save / substeps;
  int next = 0;
  for (int j = 0; j < m; ++j) {
    if (j > 0) {
      for (int k = 0; k < substeps; ++k) {
        float kG[4], kX[4], kI[4], kQ[4], kS[4];
        float g = G, x = X, ii = I, q = Q, s = S;
        for (int st = 0; st < 4; ++st) {
          kG[st] = -p1 * (g - Gb) - x * g + f * kabs * q * 1000.f / VG;
          kX[st] = -p2 * x + p3 * (ii - Ib);
          kI[st] = -kn * (ii - Ib) + ksc * s * 1000.f / VI;
          kQ[st] = -kabs * q;
          kS[st] = -ksc * s;
          float c = (st < 2) ? 0.5f * h : h;
          if (st < 3) {
            g = G + c * kG[st]; x = X + c * kX[st]; ii = I + c * kI[st];
            q = Q + c * kQ[st]; s = S + c * kS[st];
          }
        }
        const float w = h / 6.f;
        G += w * (kG[0] + 2.f * kG[1] + 2.f * kG[2] + kG[3]);
        X += w * (kX[0] + 2.f * kX[1] + 2.f * kX[2] + kX[3]);
        I += w * (kI[0] + 2.f * kI[1] + 2.f * kI[2] + kI[3]);
        Q += w * (kQ[0] + 2.f * kQ[1] + 2.f * kQ[2] + kQ[3]);
        S += w * (kS[0] + 2.f * kS[1] + 2.f * kS[2] + kS[3]);
      }
    }
    out[j * n + i] = G;                        // the sample before a dose at the same time
    while (next < 3 && dose_slot[next] == j) {
      Q += carbs[next * n + i];
      S += insulin[next * n + i];
      ++next;
    }
  }
}
"""


def cohort(n: int, seed: int = 0, dtype=F32):
    """n patients: parameters, meal carbohydrate and insulin per patient, shared times."""
    model = BergmanMinimal()
    theta = sample_params(model, jax.random.PRNGKey(seed), n, dtype=jnp.float64)
    rng = np.random.default_rng(seed)
    carbs = rng.uniform(40, 90, (n, 3))
    insulin = carbs / 60.0 * rng.uniform(0.8, 1.2, (n, 3))
    times = np.repeat(np.array(MEAL_T)[None], n, 0)
    sched = Schedule(
        dose_times=jnp.asarray(np.concatenate([times, times], 1), dtype),
        dose_amounts=jnp.asarray(np.concatenate([carbs, insulin], 1), dtype),
        dose_rates=jnp.zeros((n, 6), dtype),
        dose_targets=jnp.asarray(np.repeat([[0, 0, 0, 1, 1, 1]], n, 0), jnp.int32),
        dose_mask=jnp.ones((n, 6), bool),
        input_times=jnp.zeros((n, 0), dtype), input_values=jnp.zeros((n, 0, 1), dtype),
        input_mask=jnp.zeros((n, 0), bool))
    ts = jnp.arange(0.0, HORIZON + 1, DT_SAVE, dtype=dtype)
    return model, jnp.asarray(theta, dtype), sched, ts, carbs, insulin


def timed(fn, *args, repeats: int = 3):
    """(compile_s, run_s, result): the first call minus the best later call, best of
    `repeats`, each synchronised (JAX results are waited for; CuPy and torch callables
    synchronise themselves)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return max(first - best, 0.0), best, out


def rel_diff(glucose, ref):
    g = np.asarray(glucose, np.float64)[: ref.shape[0]]
    return float(np.max(np.abs(g - ref) / np.abs(ref)))


def reference(n_ref: int, n: int):
    """Float64 glucose of the first n_ref patients by the diffrax backend on the CPU."""
    cpu = jax.devices("cpu")[0]
    model, theta, sched, ts, _, _ = cohort(n, dtype=jnp.float64)
    sel = jax.tree.map(lambda x: np.asarray(x)[:n_ref], sched)
    with jax.default_device(cpu):
        sol = simulate(model, jnp.asarray(np.asarray(theta)[:n_ref], jnp.float64),
                       jax.tree.map(jnp.asarray, sel), jnp.asarray(ts, jnp.float64),
                       options=SolverOptions(controller=StepSizeController(rtol=1e-10, atol=1e-10), max_steps=100_000))
    return np.asarray(sol.ys[..., 0])


def record(name, n, compile_s, run_s, ref=None, glucose=None, **extra):
    rec = {"benchmark": "gpu_ensemble", "variant": name, "N": n, **device_info(),
           "compile_s": round(compile_s, 4), "run_s": round(run_s, 6),
           "patients_per_s": round(n / run_s, 1) if run_s > 0 else None}
    if ref is not None and glucose is not None:
        rec["max_rel_diff_vs_f64_cpu"] = rel_diff(glucose, ref)
    rec.update(extra)
    return rec


def bench_simulate(n: int, ref, out, args):
    model, theta, sched, ts, carbs, insulin = cohort(n)
    variants = {
        "diffrax": SolverOptions(controller=StepSizeController(rtol=1e-5, atol=1e-6), backend="diffrax"),
        "kernel_rk4": SolverOptions(method=RK4(RK4_DT), backend="kernel"),
        "kernel_tsit5": SolverOptions(controller=StepSizeController(rtol=1e-5, atol=1e-6), backend="kernel"),
    }
    results = {}
    for name, opts in variants.items():
        if name == "diffrax" and n > args.diffrax_max_n:
            emit({"benchmark": "gpu_ensemble", "variant": name, "N": n,
                  "skipped": f"N above --diffrax-max-n {args.diffrax_max_n}"}, out)
            continue
        fn = jax.jit(lambda th, sc, o=opts: simulate(model, th, sc, ts, options=o).ys[..., 0])
        attempt(name, n, out, results, lambda fn=fn: timed(fn, theta, sched), ref)
    # other patients-per-program block sizes (the default is 128 on GPU)
    if n == max(args.n):
        for block in args.blocks:
            o = dataclasses.replace(variants["kernel_rk4"], backend=Kernel(block=block))
            fn = jax.jit(lambda th, sc, o=o: simulate(model, th, sc, ts, options=o).ys[..., 0])
            attempt(f"kernel_rk4_block{block}", n, out, results,
                    lambda fn=fn: timed(fn, theta, sched), ref)
    # Where the time goes: `prepare` (the event lists, outside the kernel) alone, and the
    # kernel alone on a prepared batch writing glucose only (what a glucose forecast needs;
    # the like-for-like of the CUDA kernel below, whose inputs are also ready beforehand).
    from hybrid_twin.solve import Batch
    from hybrid_twin.solve._core import prepare
    from hybrid_twin.solve.kernel import run_kernel

    opts = variants["kernel_rk4"]
    mask = jnp.ones(ts.shape, bool)  # save times shared by all patients, as simulate
    prep_fn = jax.jit(lambda th, sc, t_, m_: prepare(
        model, Batch(th, sc, t_, m_, jnp.asarray(0.0, F32), False)))
    attempt("kernel_prepare_only", n, out, results,
            lambda: timed(prep_fn, theta, sched, ts, mask)[:2] + (None,), None)
    prep = prep_fn(theta, sched, ts, mask)
    glucose_only = jax.jit(
        lambda th, pr: run_kernel(model, th, pr, method=opts.method, max_steps=opts.max_steps,
                                  save_states=(0,))["states"][..., 0])
    attempt("kernel_rk4_glucose_only", n, out, results,
            lambda: timed(glucose_only, theta, prep), ref)
    # hand-written CUDA
    try:
        import cupy as cp

        kern = cp.RawKernel(CUDA_SRC, "bergman_rk4")
        th = cp.asarray(np.asarray(theta, np.float32).T.copy())
        cb = cp.asarray(np.asarray(carbs, np.float32).T.copy())
        ins = cp.asarray(np.asarray(insulin, np.float32).T.copy())
        slots = cp.asarray(np.array([int(t / DT_SAVE) for t in MEAL_T], np.int32))
        m = int(ts.shape[0])
        res = cp.empty((m, n), cp.float32)
        threads = 128
        blocks = (n + threads - 1) // threads

        def run_cuda():
            kern((blocks,), (threads,), (th, cb, ins, slots, res, np.int32(n), np.int32(m),
                                         np.float32(DT_SAVE), np.int32(int(DT_SAVE / RK4_DT))))
            cp.cuda.runtime.deviceSynchronize()
            return res

        c, best, _ = timed(run_cuda)
        g = cp.asnumpy(res).T
        results["cuda_rk4"] = best
        emit(record("cuda_rk4", n, c, best, ref, g), out)
    except Exception as e:  # noqa: BLE001 - absent CuPy or no CUDA device: recorded, skipped
        emit({"benchmark": "gpu_ensemble", "variant": "cuda_rk4", "N": n,
              "skipped": f"{type(e).__name__}: {e}"[:300]}, out)
    # torchdiffeq
    for method in ("rk4", "dopri5"):
        name = f"torchdiffeq_{method}"
        if n > args.torch_max_n:
            emit({"benchmark": "gpu_ensemble", "variant": name, "N": n,
                  "skipped": f"N above --torch-max-n {args.torch_max_n}"}, out)
            continue
        try:
            c, r, g = bench_torch(np.asarray(theta), carbs, insulin, np.asarray(ts), method)
            results[name] = r
            emit(record(name, n, c, r, ref, g), out)
        except Exception as e:  # noqa: BLE001 - absent torch/torchdiffeq: recorded, skipped
            emit({"benchmark": "gpu_ensemble", "variant": name, "N": n,
                  "skipped": f"{type(e).__name__}: {e}"[:300],
                  "trace": traceback.format_exc()[-600:]}, out)
    summary = {"benchmark": "gpu_ensemble", "variant": "summary", "N": n, **device_info()}
    for a, b in (("diffrax", "kernel_rk4"), ("diffrax", "kernel_tsit5"),
                 ("kernel_rk4", "cuda_rk4"), ("kernel_rk4_glucose_only", "cuda_rk4"),
                 ("kernel_prepare_only", "kernel_rk4"),
                 ("torchdiffeq_dopri5", "kernel_tsit5")):
        if a in results and b in results:
            summary[f"{a}_over_{b}"] = round(results[a] / results[b], 3)
    emit(summary, out)


def attempt(name, n, out, results, run, ref):
    """Run one timed variant; a failure (e.g. a kernel that does not compile on this GPU)
    is recorded in its line and the benchmark goes on."""
    try:
        c, r, g = run()
    except Exception as e:  # noqa: BLE001 - recorded, not fatal to the other variants
        emit({"benchmark": "gpu_ensemble", "variant": name, "N": n, **device_info(),
              "failed": f"{type(e).__name__}: {e}"[:500],
              "trace": traceback.format_exc()[-800:]}, out)
        return
    results[name] = r
    emit(record(name, n, c, r, ref, g), out)


def bench_torch(theta, carbs, insulin, ts, method):
    import torch
    from torchdiffeq import odeint

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    th = torch.tensor(theta, dtype=torch.float32, device=dev)
    p1, p2, p3, kn, gb, ib, vi, vg, kabs, f, ksc = th.T

    def rhs(t, y):
        g, x, i, q, s = y.unbind(-1)
        return torch.stack([-p1 * (g - gb) - x * g + f * kabs * q * 1000.0 / vg,
                            -p2 * x + p3 * (i - ib),
                            -kn * (i - ib) + ksc * s * 1000.0 / vi,
                            -kabs * q, -ksc * s], -1)

    cb = torch.tensor(carbs, dtype=torch.float32, device=dev)
    ins = torch.tensor(insulin, dtype=torch.float32, device=dev)
    t_all = torch.tensor(ts, dtype=torch.float32, device=dev)
    bounds = [0.0, *MEAL_T, float(ts[-1])]
    opts = {"step_size": RK4_DT} if method == "rk4" else None
    tol = {"rtol": 1e-5, "atol": 1e-6} if method == "dopri5" else {}

    def solve():
        y = torch.stack([gb, torch.zeros_like(gb), ib, torch.zeros_like(gb),
                         torch.zeros_like(gb)], -1)
        outs = []
        for k in range(len(bounds) - 1):
            a, b = bounds[k], bounds[k + 1]
            if k:
                y = y.clone()
                y[:, 3] += cb[:, k - 1]
                y[:, 4] += ins[:, k - 1]
            # samples in (a, b]; one at a dose time is taken before the dose
            tt = torch.cat([torch.tensor([a], device=dev),
                            t_all[(t_all > a) & (t_all <= b)]])
            sol = odeint(rhs, y, tt, method=method, options=opts, **tol)
            outs.append(sol[:, :, 0] if k == 0 else sol[1:, :, 0])
            y = sol[-1]
        if dev == "cuda":
            torch.cuda.synchronize()
        return torch.cat(outs, 0)

    c, best, g = timed(solve, repeats=2)
    return c, best, g.T.cpu().numpy()


def bench_gauss_newton(n: int, out, args):
    """One Gauss–Newton iteration's normal equations: kernel vs vmap(jacfwd) of diffrax."""
    from hybrid_twin.simulate import AxisDirections, FitData, normal_equations

    model, theta, sched, ts, _, _ = cohort(n)
    free = [model.index("param", q) for q in FREE]
    m = int(ts.shape[0])
    rng = np.random.default_rng(1)
    y = jnp.asarray(110.0 + rng.normal(0, 5, (n, m)), F32)
    weight = jnp.full((n, m), 0.2, F32)
    ts_b = jnp.broadcast_to(ts, (n, m))
    mask = jnp.ones((n, m), bool)
    k_obs = jnp.zeros((n, m), jnp.int32)
    opts = SolverOptions(controller=StepSizeController(rtol=1e-5, atol=1e-6), backend="kernel")

    data = (sched, ts_b, mask, k_obs, y, weight)  # arguments, not closed-over constants

    def kernel_gn(th, data, opts=opts):
        sched, ts_b, mask, k_obs, y, weight = data
        # d theta / d z along each free parameter (log/logit transforms: one parameter
        # each), as calibration passes them
        z = model.to_unconstrained(th)
        d = jax.jvp(model.from_unconstrained, (z,), (jnp.ones_like(z),))[1]
        dirs = AxisDirections(tuple(free), d[:, jnp.asarray(free)].T)
        res = normal_equations(model, th, dirs, sched, ts_b, mask, FitData(y, weight, k_obs),
                               options=opts)
        return res.h, res.g

    c, r, (h_k, g_k) = timed(jax.jit(kernel_gn), theta, data)
    emit(record("gauss_newton_kernel", n, c, r, n_free=len(FREE), n_obs=m), out)
    # the same with fixed RK4 steps (4 stages, fewer live registers than Tsit5's 7)
    rk4 = SolverOptions(method=RK4(RK4_DT), backend="kernel")
    results: dict = {}
    attempt("gauss_newton_kernel_rk4", n, out, results,
            lambda: timed(jax.jit(lambda th, d: kernel_gn(th, d, rk4)), theta, data)[:2]
            + (None,), None)
    if n > args.jacfwd_max_n:
        emit({"benchmark": "gpu_ensemble", "variant": "gauss_newton_jacfwd", "N": n,
              "skipped": f"N above --jacfwd-max-n {args.jacfwd_max_n}"}, out)
        return
    ref_opts = SolverOptions(controller=StepSizeController(rtol=1e-5, atol=1e-6, dtmax="obs"), differentiation="forward")

    def jac_gn(th, data):
        sched, _, _, _, y, weight = data
        z = model.to_unconstrained(th)

        def resid(zf):
            full = z.at[:, free].set(zf)
            f = simulate(model, model.from_unconstrained(full), sched, ts,
                         options=ref_opts).ys[..., 0]
            return (y - f) * weight

        zf = z[:, free]
        eye = jnp.eye(len(free), dtype=zf.dtype)[:, None, :] * jnp.ones_like(zf)[None]
        r = resid(zf)
        cols = jax.vmap(lambda t: jax.jvp(resid, (zf,), (t,))[1])(eye)
        jac = jnp.moveaxis(cols, 0, -1)
        return jnp.einsum("nmk,nml->nkl", jac, jac), jnp.einsum("nmk,nm->nk", jac, r)

    c2, r2, (h_j, g_j) = timed(jax.jit(jac_gn), theta, data, repeats=2)
    diff_h = float(jnp.max(jnp.abs(h_k - h_j)) / jnp.max(jnp.abs(h_j)))
    diff_g = float(jnp.max(jnp.abs(g_k - g_j)) / jnp.max(jnp.abs(g_j)))
    emit(record("gauss_newton_jacfwd", n, c2, r2, n_free=len(FREE), n_obs=m,
                kernel_speedup=round(r2 / r, 2), max_rel_diff_jtj_vs_kernel=diff_h,
                max_rel_diff_jtr_vs_kernel=diff_g), out)


def bench_calibrate(n: int, out):
    """A whole calibration on the kernel backend: 30 LM iterations, float32 on device."""
    from hybrid_twin.calibrate import ErrorModel, calibrate
    from hybrid_twin.data.virtual import (
        DoseSpec,
        NoiseModel,
        Population,
        ScheduleSpec,
        virtual_cohort,
    )

    model = BergmanMinimal()
    free = ("p1", "p3", "Gb", "V_G", "k_abs")
    meals = []
    for t, c_, ins in ((420.0, 60.0, 1.0), (720.0, 80.0, 1.3), (1140.0, 70.0, 1.2)):
        meals += [DoseSpec(t, c_, "meal", amount_cv=0.2), DoseSpec(t, ins, "insulin")]
    spec = ScheduleSpec(doses=tuple(meals), obs_every=5.0, horizon=1440.0,
                        observables=("glucose",))
    fixed = {q.name: 0.0 for q in model.parameters if q.name not in free}
    vc = virtual_cohort(model, n, population=Population(omega=fixed), schedule=spec,
                        noise=NoiseModel("additive", additive_sd=5.0), seed=2)
    cohort32 = jax.tree.map(lambda x: jnp.asarray(x, F32) if np.asarray(x).dtype == np.float64
                            else x, vc.cohort)
    opts = SolverOptions(controller=StepSizeController(rtol=1e-5, atol=1e-6), backend="kernel")
    em = ErrorModel("additive", additive=5.0, estimate=False)
    kw = {"free": free, "options": opts, "error_model": em, "max_iter": 30, "tol": 0.0}
    t0 = time.perf_counter()
    calibrate(model, cohort32, **{**kw, "max_iter": 1})  # compiles the iteration
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = calibrate(model, cohort32, **kw)
    jax.block_until_ready(res.params)
    wall = time.perf_counter() - t0
    idx = [model.index("param", q) for q in free]
    rel = np.abs(np.asarray(res.params, np.float64) / vc.true_params - 1)[:, idx]
    emit({"benchmark": "gpu_ensemble", "variant": "calibrate_kernel", "N": n,
          **device_info(), "iterations": res.n_iter, "wall_s": round(wall, 3),
          "warmup_s_one_iteration_incl_compile": round(compile_s, 3),
          "median_rel_err": dict(zip(free, np.round(np.median(rel, 0), 4).tolist())),
          "converged_fraction": float(np.mean(np.asarray(res.converged)))}, out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--gn-n", type=int, default=100_000)
    ap.add_argument("--calib-n", type=int, default=100_000)
    ap.add_argument("--ref-n", type=int, default=64)
    ap.add_argument("--diffrax-max-n", type=int, default=1_000_000)
    ap.add_argument("--torch-max-n", type=int, default=1_000_000)
    ap.add_argument("--jacfwd-max-n", type=int, default=100_000)
    ap.add_argument("--skip", nargs="*", default=[], choices=["simulate", "gn", "calibrate"])
    ap.add_argument("--blocks", type=int, nargs="*", default=[64, 256],
                    help="extra kernel block sizes timed for kernel_rk4 at the largest N")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    for n in args.n:
        if "simulate" not in args.skip:
            ref = reference(min(args.ref_n, n), n)
            bench_simulate(n, ref, args.out, args)
    if "gn" not in args.skip:
        attempt_stage("gauss_newton", args.gn_n, args.out,
                      lambda: bench_gauss_newton(args.gn_n, args.out, args))
    if "calibrate" not in args.skip:
        attempt_stage("calibrate_kernel", args.calib_n, args.out,
                      lambda: bench_calibrate(args.calib_n, args.out))


def attempt_stage(name, n, out, run):
    """A whole stage; its failure is recorded and the script goes on."""
    try:
        run()
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        emit({"benchmark": "gpu_ensemble", "variant": name, "N": n, **device_info(),
              "failed": f"{type(e).__name__}: {e}"[:500],
              "trace": traceback.format_exc()[-800:]}, out)


if __name__ == "__main__":
    main()
