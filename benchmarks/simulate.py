"""Speed benchmark of `simulate`: a virtual cohort's day of glucose, three ways, one run.

1. hybrid_twin: `simulate(BergmanMinimal(), params, schedule, save_ts)` for all N patients,
   with each backend ("diffrax": vmap of diffeqsolve; "ensemble": one batch-native loop).
2. hand-written: `jax.jit(jax.vmap(...))` of `diffrax.diffeqsolve` on the same equations
   written inline, piecewise between the same (per-patient) dose times, same solver,
   tolerances: what the framework's abstractions are measured against.
3. scipy: a per-patient loop of `scipy.integrate.solve_ivp` (RK45, same rtol/atol)
   timed on a subset and scaled to N.

Usage:
    python -m benchmarks.simulate --n 10000 [--scipy-n 200] [--dtype float64] [--out FILE]

Prints one JSON line (N, device, compile and run seconds, patients/second, speed ratios,
max relative differences) and appends it to --out.
"""

from __future__ import annotations

import argparse
import time

import jax

jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import block, device_info, emit, glucose_day_cohort  # noqa: E402
from hybrid_twin import Diffrax, SolverOptions, StepSizeController, simulate  # noqa: E402

RTOL, ATOL = 1e-6, 1e-8


def bergman_rhs(t, y, a):
    """The BergmanMinimal equations written out by hand (same as the library model)."""
    p1, p2, p3, n, gb, ib, vi, vg, kabs, f, ksc = a
    g, x, i, q, s = y[0], y[1], y[2], y[3], y[4]
    return jnp.stack([
        -p1 * (g - gb) - x * g + f * kabs * q * 1000.0 / vg,
        -p2 * x + p3 * (i - ib),
        -n * (i - ib) + ksc * s * 1000.0 / vi,
        -kabs * q,
        -ksc * s,
    ])


def handwritten(theta, times, amounts, save_ts):
    """One patient: meals (even dose slots) and insulin (odd slots) at 3 sorted times."""
    meal_t = times[0::2]
    y = jnp.stack([theta[4], 0.0 * theta[0], theta[5], 0.0 * theta[0], 0.0 * theta[0]])
    bounds = [jnp.zeros((), theta.dtype), *[meal_t[j] for j in range(3)], save_ts[-1]]
    out = jnp.zeros((save_ts.shape[0], 5), theta.dtype)
    term = diffrax.ODETerm(bergman_rhs)
    ctrl = diffrax.PIDController(rtol=RTOL, atol=ATOL)
    for k in range(4):
        if k:
            y = y.at[3].add(amounts[2 * (k - 1)]).at[4].add(amounts[2 * k - 1])
        ta, tb = bounds[k], bounds[k + 1]
        sol = diffrax.diffeqsolve(
            term, diffrax.Tsit5(), ta, tb, None, y, args=theta,
            saveat=diffrax.SaveAt(ts=jnp.clip(save_ts, ta, tb), t1=True),
            stepsize_controller=ctrl, max_steps=4096, throw=False)
        inside = (save_ts > ta) | (k == 0)
        inside = inside & ((save_ts <= tb) | (k == 3))
        out = jnp.where(inside[:, None], sol.ys[:-1], out)
        y = sol.ys[-1]
    return out


def scipy_patient(theta, times, amounts, save_ts):
    from scipy.integrate import solve_ivp

    p1, p2, p3, n, gb, ib, vi, vg, kabs, f, ksc = theta

    def rhs(t, y):
        g, x, i, q, s = y
        return [-p1 * (g - gb) - x * g + f * kabs * q * 1000.0 / vg,
                -p2 * x + p3 * (i - ib), -n * (i - ib) + ksc * s * 1000.0 / vi,
                -kabs * q, -ksc * s]

    y = np.array([gb, 0.0, ib, 0.0, 0.0])
    meal_t = times[0::2]
    bounds = [0.0, *meal_t, save_ts[-1]]
    out = np.zeros((save_ts.shape[0], 5))
    for k in range(4):
        if k:
            y = y.copy()
            y[3] += amounts[2 * (k - 1)]
            y[4] += amounts[2 * k - 1]
        ta, tb = bounds[k], bounds[k + 1]
        sel = ((save_ts > ta) | (k == 0)) & (save_ts <= tb)
        t_eval = np.unique(np.append(save_ts[sel], tb))
        sol = solve_ivp(rhs, (ta, tb), y, method="RK45", rtol=RTOL, atol=ATOL,
                        t_eval=t_eval)
        out[sel] = sol.y.T[: int(sel.sum())]
        y = sol.y[:, -1]
    return out


def timed(fn, repeats):
    t = time.perf_counter()
    first = block(fn())
    first_s = time.perf_counter() - t
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        block(fn())
        runs.append(time.perf_counter() - t)
    run_s = float(np.median(runs))
    return first, max(first_s - run_s, 0.0), run_s


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10_000, help="number of virtual patients")
    ap.add_argument("--scipy-n", type=int, default=200, help="patients timed with scipy")
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-handwritten", action="store_true")
    ap.add_argument("--save-chunk", type=int, default=Diffrax().save_chunk)
    ap.add_argument("--out", default=None, help="append the JSON line to this file")
    args = ap.parse_args(argv)
    dtype = jnp.float64 if args.dtype == "float64" else jnp.float32

    model, params, schedule, save_ts = glucose_day_cohort(args.n, seed=0, dtype=dtype)
    record = {"benchmark": "simulate", "N": args.n, **device_info(), "dtype": args.dtype,
              "model": "glucose.BergmanMinimal", "horizon_h": 24, "save_every_min": 5,
              "rtol": RTOL, "atol": ATOL, "save_chunk": args.save_chunk}
    results = {}
    for backend in ("diffrax", "ensemble"):
        opts = SolverOptions(controller=StepSizeController(rtol=RTOL, atol=ATOL),
                             backend=(Diffrax(save_chunk=args.save_chunk)
                                      if backend == "diffrax" else backend))
        sol, compile_s, run_s = timed(
            lambda: simulate(model, params, schedule, save_ts, options=opts), args.repeats)
        results[backend] = (np.asarray(sol.ys, np.float64), run_s)
        record[f"hybrid_twin_{backend}"] = {
            "compile_s": round(compile_s, 3), "run_s": round(run_s, 4),
            "patients_per_s": round(args.n / run_s, 1),
            "mean_steps": round(float(np.mean(np.asarray(sol.num_steps))), 1),
            "failed_patients": int(np.sum(np.asarray(sol.status) != 0))}
    ys, ht_run = results["diffrax"]

    if not args.skip_handwritten:
        fn = jax.jit(jax.vmap(handwritten, in_axes=(0, 0, 0, None)))
        hw, hw_compile, hw_run = timed(
            lambda: fn(params, schedule.dose_times, schedule.dose_amounts, save_ts),
            args.repeats)
        hw = np.asarray(hw, np.float64)
        record["handwritten_vmap_diffeqsolve"] = {
            "compile_s": round(hw_compile, 3), "run_s": round(hw_run, 4),
            "patients_per_s": round(args.n / hw_run, 1)}
        for backend, (y_b, run_b) in results.items():
            record[f"{backend}_over_handwritten_time"] = round(run_b / hw_run, 3)
            record[f"{backend}_max_rel_diff_vs_handwritten"] = float(
                np.max(np.abs(y_b[..., 0] - hw[..., 0]) / np.abs(hw[..., 0])))

    m = min(args.scipy_n, args.n)
    p_np = np.asarray(params, np.float64)
    t_np = np.asarray(schedule.dose_times, np.float64)
    a_np = np.asarray(schedule.dose_amounts, np.float64)
    ts_np = np.asarray(save_ts, np.float64)
    t = time.perf_counter()
    ref = np.stack([scipy_patient(p_np[i], t_np[i], a_np[i], ts_np) for i in range(m)])
    scipy_s = time.perf_counter() - t
    scaled = scipy_s / m * args.n
    record["scipy_solve_ivp_loop"] = {"patients_timed": m, "run_s_timed": round(scipy_s, 3),
                                      "run_s_scaled_to_N": round(scaled, 2),
                                      "patients_per_s": round(m / scipy_s, 1)}
    for backend, (y_b, run_b) in results.items():
        rel = np.abs(y_b[:m, :, 0] - ref[..., 0]) / np.abs(ref[..., 0])
        record[f"{backend}_speedup_vs_scipy"] = round(scaled / run_b, 1)
        record[f"{backend}_max_rel_diff_glucose_vs_scipy"] = float(rel.max())
    emit(record, args.out)
    return record


if __name__ == "__main__":
    main()
