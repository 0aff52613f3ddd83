"""Calibration benchmark: batched hybrid_twin MAP fits vs a per-patient scipy loop, one run.

A virtual cohort of N glucose patients (BergmanMinimal, 24 h, glucose every 5 min with
5 mg/dL noise, three meals with insulin, known schedules) or one-compartment PK patients
(13 samples over 24 h, 10% proportional noise) is calibrated. `--model glucose` fits 8
parameters (p1, p2, p3, n, Gb, V_G, k_abs, k_sc); `glucose5` fits p1, p3 (insulin
sensitivity), Gb, V_G and k_abs with the insulin kinetics (p2, n, k_sc) at their population
values in the truth and the fit, as the minimal model is usually fitted:

1. hybrid_twin: `calibrate(...)` for all N at once (wall time including compilation);
2. scipy: `scipy.optimize.least_squares` (trust-region reflective, 2-point Jacobian) on
   the same objective (weighted residuals + population prior) with `solve_ivp` (RK45, same
   tolerances), one patient at a time, timed on a subset and scaled to N.

Prints a JSON line: N, device, both wall times, the speed ratio, and for both the median
relative error of each free parameter against the truth (and hybrid_twin's 95% coverage),
and how well the design identifies each parameter: the median Laplace posterior SD, the
median relative error an efficient estimator reaches at that SD, and the eta-shrinkage.

    python -m benchmarks.calibrate --model glucose --n 1000 --scipy-n 10
"""

from __future__ import annotations

import argparse
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import device_info, emit  # noqa: E402
from hybrid_twin.calibrate import ErrorModel, calibrate, parameter_intervals  # noqa: E402
from hybrid_twin.data.virtual import (  # noqa: E402
    DoseSpec,
    NoiseModel,
    Population,
    ScheduleSpec,
    virtual_cohort,
)
from hybrid_twin.models import BergmanMinimal, OneCompartment  # noqa: E402

RTOL, ATOL = 1e-8, 1e-10
GLUCOSE_FREE = ("p1", "p2", "p3", "n", "Gb", "V_G", "k_abs", "k_sc")
GLUCOSE5_FREE = ("p1", "p3", "Gb", "V_G", "k_abs")
PK_FREE = ("ka", "CL", "V")


def scenario(name: str, n: int, seed: int):
    if name in ("glucose", "glucose5"):
        model = BergmanMinimal()
        meals = []
        for t, c, ins in ((420.0, 60.0, 1.0), (720.0, 80.0, 1.3), (1140.0, 70.0, 1.2)):
            meals += [DoseSpec(t, c, "meal", time_jitter=30.0, amount_cv=0.2),
                      DoseSpec(t, ins, "insulin")]
        spec = ScheduleSpec(doses=tuple(meals), obs_every=5.0, horizon=1440.0,
                            observables=("glucose",))
        free = GLUCOSE_FREE if name == "glucose" else GLUCOSE5_FREE
        noise = NoiseModel("additive", additive_sd=5.0)
        em = ErrorModel("additive", additive=10.0)
    else:
        model = OneCompartment()
        spec = ScheduleSpec(doses=(DoseSpec(0.0, 320.0, "depot"),),
                            obs_times=(0.25, 0.5, 1, 1.5, 2, 3, 4, 6, 8, 10, 12, 18, 24))
        free = PK_FREE
        noise = NoiseModel("proportional", proportional_sd=0.1)
        em = ErrorModel("proportional", proportional=0.3)
    fixed = {q.name: 0.0 for q in model.parameters if q.name not in free}
    vc = virtual_cohort(model, n, population=Population(omega=fixed), schedule=spec,
                        noise=noise, seed=seed)
    return model, vc, free, em


def scipy_fit(model, vc, i, free, em, typical, omega):
    """One patient: least_squares on weighted residuals + prior, solve_ivp inside."""
    from scipy.integrate import solve_ivp
    from scipy.optimize import least_squares

    c = vc.cohort
    idx = [model.index("param", f) for f in free]
    times = np.asarray(c.schedule.dose_times[i])
    amounts = np.asarray(c.schedule.dose_amounts[i])
    targets = np.asarray(c.schedule.dose_targets[i])
    obs_t = np.asarray(c.obs_times[i])
    obs_k = np.asarray(c.obs_index[i])
    y = np.asarray(c.obs_values[i])
    z_pop = np.asarray(model.to_unconstrained(jnp.asarray(typical)))[idx]
    inv_om = 1.0 / np.asarray(omega)[idx]
    state_of = [model.index("state", d.state) for d in model.dose_targets]
    base = np.asarray(model.to_unconstrained(jnp.asarray(typical)))

    def transform(z):
        full = base.copy()
        full[idx] = z
        return np.asarray(model.from_unconstrained(jnp.asarray(full)))

    def simulate_np(theta):
        p = dict(zip(model.param_names, theta))

        def rhs(t, yy):
            return model.vector_field(t, tuple(yy), p, {k: 0.0 for k in model.input_names})

        y0 = np.array([float(v) for v in model.initial_state(p)])
        order = np.argsort(times, kind="stable")
        bounds = [0.0] + [float(times[j]) for j in order] + [float(obs_t[-1])]
        out = np.zeros((obs_t.size, model.n_states))
        state = y0
        for k in range(len(bounds) - 1):
            ta, tb = bounds[k], bounds[k + 1]
            if k:
                j = order[k - 1]
                state = state.copy()
                state[state_of[targets[j]]] += amounts[j]
            sel = ((obs_t > ta) | (k == 0)) & (obs_t <= tb)
            if tb > ta:
                sol = solve_ivp(rhs, (ta, tb), state, method="RK45", rtol=RTOL, atol=ATOL,
                                t_eval=np.unique(np.append(obs_t[sel], tb)))
                out[sel] = sol.y.T[: int(sel.sum())]
                state = sol.y[:, -1]
            else:
                out[sel] = state
        return out

    def residuals(z):
        theta = transform(z)
        states = simulate_np(theta)
        obs = np.asarray(model.observe(jnp.asarray(states), jnp.asarray(theta)[None]))
        f = obs[np.arange(obs_t.size), obs_k]
        sd = np.asarray(em.sd(jnp.asarray(f)))
        return np.concatenate([(y - f) / sd, (z - z_pop) * inv_om])

    fit = least_squares(residuals, z_pop, method="trf", x_scale="jac")
    return transform(fit.x)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["glucose", "glucose5", "pk"], default="glucose")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--scipy-n", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    model, vc, free, em = scenario(args.model, args.n, seed=1)
    idx = [model.index("param", f) for f in free]
    t = time.perf_counter()
    res = calibrate(model, vc.cohort, free=free, error_model=em)
    jax.block_until_ready(res.params)
    ht_s = time.perf_counter() - t
    est = np.asarray(res.params)
    rel = np.abs(est / vc.true_params - 1)[:, idx]
    lo, hi = parameter_intervals(model, res)
    cover = ((np.asarray(lo) <= vc.true_params) & (vc.true_params <= np.asarray(hi)))[:, idx]
    # How much the design identifies each parameter: the Laplace posterior SD of log(theta)
    # per patient (what the data and prior leave uncertain), the median relative error an
    # efficient estimator would reach at that SD (0.674 SD for a normal error), and the
    # eta-shrinkage 1 - SD(eta_hat) / omega (Savic & Karlsson 2009, AAPS J 11:558-569).
    post_sd = np.sqrt(np.diagonal(np.asarray(res.cov_z), axis1=1, axis2=2))
    omega_free = np.asarray(model.omegas())[idx]
    shrink = 1.0 - np.std(np.asarray(res.z), axis=0) / omega_free
    expected = 0.6745 * np.median(post_sd, 0)

    m = min(args.scipy_n, args.n)
    typical, omega = model.typical_params(), model.omegas()
    t = time.perf_counter()
    sp = np.stack([scipy_fit(model, vc, i, free, res.error_model, typical, omega)
                   for i in range(m)])
    sp_s = time.perf_counter() - t
    rel_sp = np.abs(sp / vc.true_params[:m] - 1)[:, idx]
    record = {
        "benchmark": "calibrate", "scenario": args.model, "N": args.n, **device_info(),
        "free": list(free), "rtol": RTOL, "atol": ATOL,
        "hybrid_twin": {
            "wall_s_including_compile": round(ht_s, 2), "iterations": res.n_iter,
            "converged_fraction": float(np.mean(np.asarray(res.converged))),
            "median_rel_err": dict(zip(free, np.round(np.median(rel, 0), 4).tolist())),
            "coverage_95": dict(zip(free, np.round(cover.mean(0), 3).tolist())),
            "median_posterior_sd": dict(zip(free, np.round(np.median(post_sd, 0), 4).tolist())),
            "median_rel_err_at_posterior_sd": dict(zip(free, np.round(expected, 4).tolist())),
            "eta_shrinkage": dict(zip(free, np.round(shrink, 3).tolist())),
            "median_rel_err_first_scipy_n": dict(zip(free, np.round(
                np.median(rel[:m], 0), 4).tolist())),
            "error_sd_estimate": [res.error_model.additive, res.error_model.proportional]},
        "scipy_least_squares_loop": {
            "patients_timed": m, "wall_s_timed": round(sp_s, 2),
            "wall_s_scaled_to_N": round(sp_s / m * args.n, 1),
            "median_rel_err": dict(zip(free, np.round(np.median(rel_sp, 0), 4).tolist())),
            "max_rel_diff_to_hybrid_twin": float(np.max(np.abs(sp / est[:m] - 1)[:, idx]))},
        "speedup_vs_scipy": round(sp_s / m * args.n / ht_s, 1),
    }
    emit(record, args.out)
    return record


if __name__ == "__main__":
    main()
