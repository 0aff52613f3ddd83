"""Per-patient calibration: batched maximum a posteriori fits with Laplace uncertainty.

For each patient i the free parameters, in their unconstrained space z (see
`Parameter.transform`), minimise

    1/2 sum_j ((y_ij - f_ij(z)) / sd(f_ij))^2  +  1/2 sum_k ((z_k - z_pop,k) / omega_k)^2

(the observation error model's weights and the population prior as a penalty) by
Levenberg–Marquardt, for all patients at once: each iteration is one batched `simulate`
and one forward-mode Jacobian (one `jax.jvp` per free parameter, batched over patients),
then a damped Gauss–Newton step solved per patient. A patient whose trial step fails or
increases its cost is simply not moved (its damping grows), and a converged patient is not
moved again, so one patient's result does not depend on the others in its batch. The Gauss–Newton Hessian at the optimum gives the Laplace approximation: per-patient
covariance, standard errors and correlations of the parameters, and prediction intervals
by the delta method.

The residual error model is additive, proportional or combined; its scale can be estimated
from the pooled residuals of the cohort (`ErrorModel(estimate=True)`), alternating with the
per-patient fits.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .data.cohort import Cohort
from .models.base import MechanisticModel
from .schedule import Schedule
from .simulate import AxisDirections, FitData, SolverOptions, normal_equations, simulate
from .solve import EXPERIMENT_DEFAULT

ERROR_KINDS = ("additive", "proportional", "combined")
Z95 = 1.959963984540054


@dataclasses.dataclass(frozen=True)
class ErrorModel:
    """Observation error: sd(f) = sqrt(additive^2 + (proportional * f)^2), in the
    observable's unit (additive) and as a fraction (proportional). With `estimate`, the
    scale of both is estimated from the cohort's pooled residuals."""

    kind: str = "additive"
    additive: float = 1.0
    proportional: float = 0.1
    estimate: bool = True

    def __post_init__(self):
        if self.kind not in ERROR_KINDS:
            raise ValueError(f"ErrorModel.kind must be one of {ERROR_KINDS}, got {self.kind!r}")
        if self.kind in ("additive", "combined") and not self.additive > 0:
            raise ValueError("ErrorModel.additive must be > 0")
        if self.kind in ("proportional", "combined") and not self.proportional > 0:
            raise ValueError("ErrorModel.proportional must be > 0")

    def sd(self, f):
        a = self.additive if self.kind in ("additive", "combined") else 0.0
        b = self.proportional if self.kind in ("proportional", "combined") else 0.0
        return jnp.sqrt(a * a + (b * f) ** 2 + 1e-300)

    def scaled(self, k: float) -> ErrorModel:
        return dataclasses.replace(self, additive=self.additive * k,
                                   proportional=self.proportional * k)


class CalibrationResult(eqx.Module):
    """Per-patient MAP estimates and their Laplace uncertainty.

    Attributes (N patients, P model parameters, F free ones):
        params: (N, P) natural-unit estimates (fixed parameters at their given values).
        z: (N, F) free parameters in the unconstrained space.
        cov_z: (N, F, F) Laplace covariance of z.
        se: (N, P) standard errors in natural units (delta method; 0 for fixed ones).
        corr: (N, F, F) correlation matrices.
        cost: (N,) final objective (1/2 sum of squared weighted residuals and prior).
        converged: (N,) bool; False also for a patient whose model or sensitivities
            became non-finite (it is left at its last finite estimate).
        n_iter: iterations run.
        free: names of the free parameters.
        error_model: the (possibly re-estimated) error model.
    """

    params: jax.Array
    z: jax.Array
    cov_z: jax.Array
    se: jax.Array
    corr: jax.Array
    cost: jax.Array
    converged: jax.Array
    n_iter: int = eqx.field(static=True)
    free: tuple[str, ...] = eqx.field(static=True)
    error_model: ErrorModel = eqx.field(static=True)


class _Problem(eqx.Module):
    model: MechanisticModel
    free_idx: tuple[int, ...] = eqx.field(static=True)
    options: SolverOptions = eqx.field(static=True)
    has_infusions: bool | None = eqx.field(static=True, default=None)

    def normal(self, z, theta_fixed, schedule, ts, mask, obs_index, y, w_mask, sd_frozen,
               z_pop, inv_omega, jac: bool):
        """Cost, Gauss–Newton matrix JᵀJ and gradient Jᵀr (data and prior), the data part
        from the backend's normal equations (`simulate.normal_equations`)."""
        theta = self.theta(z, theta_fixed)
        dirs = None
        if jac and _elementwise_transform(self.model):
            # d theta_i / d z_k = 0 for i != k: each direction moves one parameter
            d = jax.jvp(lambda zz: self.theta(zz, theta_fixed), (z,), (jnp.ones_like(z),))[1]
            dirs = AxisDirections(self.free_idx, d[:, jnp.asarray(self.free_idx)].T)
        elif jac:
            eye = jnp.eye(z.shape[1], dtype=z.dtype)[:, None, :] * jnp.ones_like(z)[None]
            dirs = jax.vmap(lambda t: jax.jvp(lambda zz: self.theta(zz, theta_fixed),
                                              (z,), (t,))[1])(eye)
        weight = jnp.where(w_mask, 1.0 / sd_frozen, 0.0)
        res = normal_equations(self.model, theta, dirs, schedule, ts, mask,
                               FitData(y, weight, obs_index), options=self.options,
                               has_infusions=self.has_infusions)
        r_prior = (z - z_pop) * inv_omega
        cost = res.cost + 0.5 * jnp.sum(r_prior ** 2, axis=1)
        if not jac:
            return cost, None, None, res.status
        h = res.h + jax.vmap(jnp.diag)(jnp.broadcast_to(inv_omega ** 2, z.shape))
        g = res.g + inv_omega * r_prior
        return cost, h, g, res.status

    def theta(self, z, theta_fixed):
        full = self.model.to_unconstrained(theta_fixed)
        full = full.at[:, jnp.asarray(self.free_idx)].set(z)
        return self.model.from_unconstrained(full)

    def predict(self, z, theta_fixed, schedule, ts, mask, obs_index):
        theta = self.theta(z, theta_fixed)
        sol = simulate(self.model, theta, schedule, ts, mask, options=self.options,
                       has_infusions=self.has_infusions)
        return sol.observed(self.model, theta, obs_index), sol.status


def _fit_dtype(cohort: Cohort):
    """The float dtype of a cohort's observations (the default float if they are not
    floating point)."""
    dtype = jnp.asarray(cohort.obs_values).dtype
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.result_type(float)


def _forward(options: SolverOptions | None, model: MechanisticModel) -> SolverOptions:
    """`options` (default `EXPERIMENT_DEFAULT`) resolved, in forward mode: the Jacobians
    here have few columns."""
    options = (options or EXPERIMENT_DEFAULT).resolved(model)
    return dataclasses.replace(options, differentiation="forward")


def _elementwise_transform(model: MechanisticModel) -> bool:
    """Whether the model maps fitting space to parameters column by column (the base
    class's per-parameter log/logit transforms, not overridden)."""
    return type(model).from_unconstrained is MechanisticModel.from_unconstrained


def _jacobian(fn: Callable, z: jax.Array):
    """Batched forward-mode Jacobian of fn: (N, F) -> (N, R); returns (r, J (N, R, F)).

    One `jax.jvp` vmapped over the F unit tangents: the primal solve is shared and the F
    sensitivity directions are carried through the same solver loop.
    """
    f_dim = z.shape[1]
    tangents = jnp.eye(f_dim, dtype=z.dtype)[:, None, :] * jnp.ones_like(z)[None]
    r = fn(z)
    cols = jax.vmap(lambda t: jax.jvp(fn, (z,), (t,))[1])(tangents)
    return r, jnp.moveaxis(cols, 0, -1)


@eqx.filter_jit
def _lm_iteration(problem, z, lam, data, sd_frozen, z_pop, inv_omega, frozen):
    cost, h, g, _ = problem.normal(z, *data, sd_frozen, z_pop, inv_omega, jac=True)
    finite = (jnp.all(jnp.isfinite(h), axis=(1, 2)) & jnp.all(jnp.isfinite(g), axis=1)
              & jnp.isfinite(cost))
    h = jnp.where(finite[:, None, None], h, 0.0)
    g = jnp.where(finite[:, None], g, 0.0)
    diag = jnp.diagonal(h, axis1=1, axis2=2)
    damp = lam[:, None] * jnp.maximum(diag, 1e-12)
    step = -jnp.linalg.solve(h + jax.vmap(jnp.diag)(damp), g[..., None])[..., 0]
    z_try = z + step
    cost_try, _, _, status = problem.normal(z_try, *data, sd_frozen, z_pop, inv_omega,
                                            jac=False)
    ok = jnp.isfinite(cost_try) & (status == 0) & jnp.all(jnp.isfinite(z_try), axis=1)
    accept = ok & (cost_try < cost) & ~frozen
    z_new = jnp.where(accept[:, None], z_try, z)
    lam_new = jnp.clip(jnp.where(accept, lam / 3.0, lam * 4.0), 1e-9, 1e9)
    rel = jnp.where(accept, (cost - cost_try) / jnp.maximum(cost, 1e-30), 0.0)
    small_step = (jnp.max(jnp.abs(step), axis=1) < 1e-8) & finite
    return z_new, lam_new, jnp.where(accept, cost_try, cost), rel, small_step, h, finite


def _prior(model, free_idx, typical, omega):
    """Prior means (N, F) in the fitting space from each patient's typical values (N, P),
    and 1 / omega (F,)."""
    z_pop = model.to_unconstrained(jnp.asarray(typical))[:, jnp.asarray(free_idx)]
    om = np.asarray(omega)[list(free_idx)]
    inv = np.where(om > 0, 1.0 / np.where(om > 0, om, 1.0), 0.0)
    return z_pop, jnp.asarray(inv)


def calibrate(
    model: MechanisticModel,
    cohort: Cohort,
    *,
    free: Sequence[str] | None = None,
    typical: np.ndarray | None = None,
    omega: np.ndarray | None = None,
    fixed_params: np.ndarray | None = None,
    error_model: ErrorModel | None = None,
    condition_until: float | None = None,
    max_iter: int = 30,
    tol: float = 1e-6,
    n_starts: int = 1,
    seed: int = 0,
    error_rounds: int = 2,
    options: SolverOptions | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> CalibrationResult:
    """Fit each patient's free parameters (MAP with the population prior), batched.

    Args:
        model: the model (mechanistic or hybrid).
        cohort: observations and schedules; only `cohort.data_mask` entries with
            TIME <= `condition_until` (all if None) are fitted.
        free: names of the parameters to fit (default: those with omega > 0).
        typical, omega: population typical values (natural units, (P,)) and
            between-patient SDs (unconstrained space, (P,)); default: the declaration.
        fixed_params: (N, P) values of the non-free parameters (default: `typical`).
        error_model: `ErrorModel` (default additive 1.0, estimated).
        max_iter, tol: Levenberg–Marquardt iteration limit and relative cost tolerance.
        n_starts: starts per patient (the typical values, then prior draws); the best
            final cost wins.
        error_rounds: rounds of (fit, re-estimate the error scale) when estimating it.
        options: `SolverOptions` (default: ensemble backend, rtol 1e-8, atol 1e-10).
        progress: called as progress(iteration, n_converged, seconds) each iteration.

    Returns:
        `CalibrationResult`.
    """
    options = _forward(options, model).for_gradients()
    error_model = error_model or ErrorModel()
    typical = np.asarray(model.typical_params() if typical is None else typical, float)
    omega = np.asarray(model.omegas() if omega is None else omega, float)
    free = tuple(free) if free is not None else tuple(
        q.name for q, o in zip(model.parameters, omega) if o > 0)
    if not free:
        raise ValueError("calibrate: no free parameters (give `free` or a population "
                         "with omega > 0)")
    free_idx = tuple(model.index("param", name) for name in free)
    n = cohort.n_patients
    # the fit runs in the cohort's dtype (a float32 cohort is fitted in float32, not in
    # whatever jax_enable_x64 makes of the Python floats here)
    dtype = _fit_dtype(cohort)
    # each patient's typical values: the population's, moved by its covariates when the
    # model has a covariate network
    typical_i = jnp.asarray(model.individual_typical(
        typical, cohort.covariates, cohort.covariate_names), dtype)
    theta_fixed = typical_i if fixed_params is None else jnp.asarray(fixed_params, dtype)
    if theta_fixed.shape != (n, model.n_params):
        raise ValueError(f"fixed_params must be ({n}, {model.n_params}), got {theta_fixed.shape}")

    w_mask = cohort.fit_mask(condition_until)
    y = jnp.where(w_mask, cohort.obs_values, 0.0)
    data = (theta_fixed, cohort.schedule, cohort.obs_times, cohort.obs_mask,
            cohort.obs_index, y.astype(dtype), w_mask)
    z_pop, inv_omega = _prior(model, free_idx, typical_i, omega)
    inv_omega = inv_omega.astype(dtype)
    # read here, where the schedule is concrete (inside the jitted iteration it is not)
    problem = _Problem(model, free_idx, options, cohort.schedule.has_infusions())
    rng = np.random.default_rng(seed)

    def run(z0, em):
        z, lam = z0, jnp.full((n,), 1e-3, dtype)
        sd_frozen = None
        conv = jnp.zeros((n,), bool)
        failed = jnp.zeros((n,), bool)
        t0 = time.perf_counter()
        for it in range(max_iter):
            if em.kind == "additive":
                sd_frozen = jnp.full(y.shape, em.additive, dtype)
            else:
                f, _ = problem.predict(z, *data[:5])
                sd_frozen = em.sd(f)
            z, lam, cost, rel, small, h, finite = _lm_iteration(
                problem, z, lam, data, sd_frozen, z_pop, inv_omega, conv | failed)
            failed = failed | ~finite
            conv = (conv | ((rel > 0) & (rel < tol)) | small) & ~failed
            if progress:
                progress(it + 1, int(jnp.sum(conv)), time.perf_counter() - t0)
            if bool(jnp.all(conv | failed)):
                break
        return z, cost, conv, h, it + 1, sd_frozen

    best = None
    em = error_model
    for s in range(n_starts):
        if s == 0:
            z0 = z_pop
        else:
            om = np.where(np.asarray(inv_omega) > 0, 1.0 / np.maximum(np.asarray(inv_omega), 1e-300), 0.5)
            z0 = jnp.asarray(np.asarray(z_pop) + om * rng.standard_normal((n, len(free_idx))),
                             dtype)
        rounds = error_rounds if error_model.estimate else 1
        for rnd in range(rounds):
            z, cost, conv, h, n_it, sd_frozen = run(z0, em)
            if error_model.estimate and rnd < rounds - 1:
                f, _ = problem.predict(z, *data[:5])
                r = np.asarray(jnp.where(w_mask, (y - f) / em.sd(f), 0.0))
                k = float(np.sqrt(np.sum(r ** 2) / max(int(np.sum(np.asarray(w_mask))), 1)))
                em = em.scaled(k)
                z0 = z
        if best is None:
            best = (z, cost, conv, h, n_it)
        else:
            take = (cost < best[1]) | ~jnp.isfinite(best[1])
            best = (jnp.where(take[:, None], z, best[0]), jnp.where(take, cost, best[1]),
                    jnp.where(take, conv, best[2]), jnp.where(take[:, None, None], h, best[3]),
                    max(n_it, best[4]))
    z, cost, conv, h, n_it = best
    cov = jnp.linalg.inv(h + 1e-12 * jnp.eye(h.shape[-1], dtype=dtype))
    sd_z = jnp.sqrt(jnp.clip(jnp.diagonal(cov, axis1=1, axis2=2), 0.0))
    corr = cov / (sd_z[:, :, None] * sd_z[:, None, :] + jnp.finfo(dtype).tiny)
    theta = problem.theta(z, data[0])
    # delta method: d theta / d z for each free parameter
    dtheta = jax.jvp(lambda zz: problem.theta(zz, data[0]), (z,), (sd_z,))[1]
    se = jnp.zeros_like(theta).at[:, jnp.asarray(free_idx)].set(
        jnp.abs(dtheta[:, jnp.asarray(free_idx)]))
    return CalibrationResult(params=theta, z=z, cov_z=cov, se=se, corr=corr, cost=cost,
                             converged=conv, n_iter=int(n_it), free=free, error_model=em)


def parameter_intervals(model: MechanisticModel, result: CalibrationResult,
                        level: float = Z95) -> tuple[jax.Array, jax.Array]:
    """Laplace intervals of every free parameter in natural units: the transform of
    z +- level * sd(z) (asymmetric for log parameters). Fixed parameters get [v, v]."""
    idx = jnp.asarray([model.index("param", n) for n in result.free])
    sd_z = jnp.sqrt(jnp.clip(jnp.diagonal(result.cov_z, axis1=1, axis2=2), 0.0))
    full = model.to_unconstrained(result.params)
    lo = model.from_unconstrained(full.at[:, idx].add(-level * sd_z))
    hi = model.from_unconstrained(full.at[:, idx].add(level * sd_z))
    return jnp.minimum(lo, hi), jnp.maximum(lo, hi)


def predict_with_intervals(
    model: MechanisticModel,
    result: CalibrationResult,
    schedule: Schedule,
    save_ts: jax.Array,
    save_mask: jax.Array,
    obs_index: jax.Array,
    *,
    include_residual: bool = True,
    level: float = Z95,
    options: SolverOptions | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Predictions and (lo, hi) intervals at `save_ts` for calibrated patients.

    Parameter uncertainty enters by the delta method (forward-mode Jacobian of the
    prediction times the Laplace covariance); with `include_residual` the observation
    error is added, giving intervals for new observations.
    """
    options = _forward(options, model)
    free_idx = tuple(model.index("param", n) for n in result.free)
    problem = _Problem(model, free_idx, options, schedule.has_infusions())
    theta_fixed = result.params

    def pred(zz):
        return problem.predict(zz, theta_fixed, schedule, save_ts, save_mask, obs_index)[0]

    f, jac = _jacobian(pred, result.z)
    var = jnp.einsum("nmf,nfg,nmg->nm", jac, result.cov_z, jac)
    if include_residual:
        var = var + result.error_model.sd(f) ** 2
    sd = jnp.sqrt(jnp.clip(var, 0.0))
    return f, f - level * sd, f + level * sd
