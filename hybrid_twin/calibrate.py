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

import collections
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from .data.cohort import Cohort
from .errors import RunFailed
from .models.base import MechanisticModel
from .schedule import Schedule
from .simulate import (
    AxisDirections,
    FitData,
    SolverOptions,
    Status,
    normal_equations,
    sensitivities,
    simulate,
    status_label,
)
from .solve import EXPERIMENT_DEFAULT

ERROR_KINDS = ("additive", "proportional", "combined")
Z95 = 1.959963984540054


class FitFailed(RunFailed):
    """A fitting stage that gave no usable estimate: every patient failed (`diverged`
    False), or the estimate diverged (a non-finite or exploding error scale, non-finite
    typical values, typical values at their bounds). The message names the stage and the
    values; `stage` is that name."""

    def __init__(self, message: str, *, stage: str, diverged: bool):
        super().__init__(message)
        self.stage = stage
        self.diverged = diverged


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
        f = jnp.asarray(f)
        return _error_sd(self.kind, jnp.asarray([self.additive, self.proportional], f.dtype),
                         f)

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
        converged: (N,) bool: True only where the optimiser's own test passed (relative
            cost decrease below `tol`, or a vanishing step) for a patient with data whose
            solves succeeded; False at the iteration limit, for a failed patient and for
            one without data.
        status: (N,) int `Status` of the patient's fit: OK, or why its solve failed
            (`Status.NONFINITE` also for a non-finite cost or derivatives); a failed
            patient is left at its last good estimate, with NaN uncertainty.
        n_data: (N,) int, the observations fitted (0: the estimate is the prior mean).
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
    status: jax.Array
    n_data: jax.Array
    n_iter: int = eqx.field(static=True)
    free: tuple[str, ...] = eqx.field(static=True)
    error_model: ErrorModel = eqx.field(static=True)


class _Problem(eqx.Module):
    model: MechanisticModel
    free_idx: tuple[int, ...] = eqx.field(static=True)
    options: SolverOptions = eqx.field(static=True)
    has_infusions: bool | None = eqx.field(static=True, default=None)

    def normal(self, z, theta_fixed, schedule, ts, mask, obs_index, y, w_mask, sd_frozen,
               z_pop, inv_omega, jac: bool, active=None):
        """Cost, Gauss–Newton matrix JᵀJ and gradient Jᵀr (data and prior), the data part
        from the backend's normal equations (`simulate.normal_equations`)."""
        theta = self.theta(z, theta_fixed)
        # d theta_i / d z_k = 0 for i != k with elementwise transforms: each direction
        # moves one parameter
        dirs = self.directions(z, theta_fixed) if jac else None
        weight = jnp.where(w_mask, 1.0 / sd_frozen, 0.0)
        res = normal_equations(self.model, theta, dirs, schedule, ts, mask,
                               FitData(y, weight, obs_index), options=self.options,
                               has_infusions=self.has_infusions, active=active)
        r_prior = (z - z_pop) * inv_omega
        cost = res.cost + 0.5 * jnp.sum(r_prior ** 2, axis=1)
        if not jac:
            return cost, None, None, res.status
        h = res.h + jax.vmap(jnp.diag)(jnp.broadcast_to(inv_omega ** 2, z.shape))
        g = res.g + inv_omega * r_prior
        return cost, h, g, res.status

    def directions(self, z, theta_fixed):
        """d theta / d z as sensitivity directions: `AxisDirections` along the free
        parameters for the base class's elementwise transforms, else (F, N, P)."""
        if _elementwise_transform(self.model):
            d = jax.jvp(lambda zz: self.theta(zz, theta_fixed), (z,), (jnp.ones_like(z),))[1]
            return AxisDirections(self.free_idx, d[:, jnp.asarray(self.free_idx)].T)
        eye = jnp.eye(z.shape[1], dtype=z.dtype)[:, None, :] * jnp.ones_like(z)[None]
        return jax.vmap(lambda t: jax.jvp(lambda zz: self.theta(zz, theta_fixed),
                                          (z,), (t,))[1])(eye)

    def jacobian(self, z, theta_fixed, schedule, ts, mask, obs_index, with_status=False):
        """Predictions (N, M) and their Jacobian with respect to z (N, M, F), from the
        backend's sensitivities along the free parameters only (and with `with_status`
        the solve's per-patient `Status`)."""
        theta = self.theta(z, theta_fixed)
        dirs = self.directions(z, theta_fixed)
        sol, sens = sensitivities(self.model, theta, dirs, schedule, ts, mask,
                                  options=self.options, has_infusions=self.has_infusions)
        dense = dirs.dense(self.model.n_params) if isinstance(dirs, AxisDirections) else dirs

        def observed(ys, th):
            return eqx.tree_at(lambda s: s.ys, sol, ys).observed(self.model, th, obs_index)

        f = observed(sol.ys, theta)
        cols = jax.vmap(lambda sk, dk: jax.jvp(observed, (sol.ys, theta), (sk, dk))[1],
                        in_axes=(2, 0))(sens.astype(sol.ys.dtype), dense.astype(theta.dtype))
        if with_status:
            return f, jnp.moveaxis(cols, 0, -1), sol.status
        return f, jnp.moveaxis(cols, 0, -1)

    def theta(self, z, theta_fixed):
        full = self.model.to_unconstrained(theta_fixed)
        full = full.at[:, jnp.asarray(self.free_idx)].set(z)
        return self.model.from_unconstrained(full)

    def predict(self, z, theta_fixed, schedule, ts, mask, obs_index, active=None):
        theta = self.theta(z, theta_fixed)
        sol = simulate(self.model, theta, schedule, ts, mask, options=self.options,
                       has_infusions=self.has_infusions, active=active)
        return sol.observed(self.model, theta, obs_index), sol.status


def fit_dtype(cohort: Cohort, options: SolverOptions | None = None) -> jnp.dtype:
    """The float dtype a fit of `cohort` runs in (and its results come in): the options'
    `precision` (default `EXPERIMENT_DEFAULT`'s), else that of the cohort's observations
    (the default float if they are not floating point)."""
    policy = (options or EXPERIMENT_DEFAULT).dtype()
    if policy is not None:
        return policy
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


class _LM(NamedTuple):
    """Levenberg–Marquardt state carried through the on-device loop, per patient (N rows)
    but `it`."""

    it: jax.Array  # () iterations done
    z: jax.Array  # (N, F)
    lam: jax.Array  # (N,) damping
    cost: jax.Array  # (N,)
    conv: jax.Array  # (N,) bool
    failed: jax.Array  # (N,) bool: a solve failed, or the cost or derivatives non-finite
    status: jax.Array  # (N,) int32 `Status`: why a failed patient failed


def _error_sd(kind: str, scale: jax.Array, f: jax.Array) -> jax.Array:
    """`ErrorModel.sd` with (additive, proportional) as a traced array, so that a new
    error scale does not recompile the loop."""
    a = scale[0] if kind in ("additive", "combined") else 0.0
    b = scale[1] if kind in ("proportional", "combined") else 0.0
    # the smallest normal number of f's dtype keeps sd > 0 where f = 0 (1e-300 would
    # round to 0 in float32)
    return jnp.sqrt(a * a + (b * f) ** 2 + jnp.finfo(f.dtype).tiny)


def _lm_run(problem, carry: _LM, data, z_pop, em_kind: str, em_scale, inv_omega, stop_at,
            tol) -> _LM:
    """Levenberg–Marquardt iterations for a batch of patients as one `lax.while_loop`,
    from `carry` until iteration `stop_at` or until every patient is done: convergence,
    damping and freezing inside, no host transfer. Each iteration solves the active
    patients only (converged and failed ones are skipped by the ensemble and kernel
    backends)."""
    y = data[5]
    dtype = carry.z.dtype

    def sd_at(z, active):
        if em_kind == "additive":
            return jnp.full(y.shape, em_scale[0], dtype)
        f, _ = problem.predict(z, *data[:5], active=active)
        return _error_sd(em_kind, em_scale, f)

    def body(c: _LM) -> _LM:
        active = ~(c.conv | c.failed)
        sd = sd_at(c.z, active)
        cost, h, g, solved = problem.normal(c.z, *data, sd, z_pop, inv_omega, jac=True,
                                            active=active)
        finite = (jnp.all(jnp.isfinite(h), axis=(1, 2)) & jnp.all(jnp.isfinite(g), axis=1)
                  & jnp.isfinite(cost) & (solved == Status.OK))
        h = jnp.where(finite[:, None, None], h, 0.0)
        g = jnp.where(finite[:, None], g, 0.0)
        diag = jnp.diagonal(h, axis1=1, axis2=2)
        damp = c.lam[:, None] * jnp.maximum(diag, 1e-12)
        step = -jnp.linalg.solve(h + jax.vmap(jnp.diag)(damp), g[..., None])[..., 0]
        step = jnp.where(active[:, None], step, 0.0)
        z_try = c.z + step
        cost_try, _, _, status = problem.normal(z_try, *data, sd, z_pop, inv_omega,
                                                jac=False, active=active)
        ok = jnp.isfinite(cost_try) & (status == 0) & jnp.all(jnp.isfinite(z_try), axis=1)
        accept = ok & (cost_try < cost) & active
        lam = jnp.where(active, jnp.clip(jnp.where(accept, c.lam / 3.0, c.lam * 4.0),
                                         1e-9, 1e9), c.lam)
        rel = jnp.where(accept, (cost - cost_try) / jnp.maximum(cost, 1e-30), 0.0)
        small = (jnp.max(jnp.abs(step), axis=1) < 1e-8) & finite
        failed = c.failed | (active & ~finite)
        why = jnp.where(solved == Status.OK, Status.NONFINITE, solved).astype(jnp.int32)
        conv = (c.conv | (active & (((rel > 0) & (rel < tol)) | small))) & ~failed
        return _LM(it=c.it + 1, z=jnp.where(accept[:, None], z_try, c.z), lam=lam,
                   cost=jnp.where(active, jnp.where(accept, cost_try, cost), c.cost),
                   conv=conv, failed=failed,
                   status=jnp.where(active & ~finite, why, c.status))

    def cond(c: _LM):
        return (c.it < stop_at) & ~jnp.all(c.conv | c.failed)

    return jax.lax.while_loop(cond, body, carry)


@eqx.filter_jit
def _lm_loop(problem, carry, data, z_pop, em_kind, em_scale, inv_omega, stop_at, tol) -> _LM:
    return _lm_run(problem, carry, data, z_pop, em_kind, em_scale, inv_omega, stop_at, tol)


@eqx.filter_jit
def _lm_loop_sharded(arrays, static, rows, em_kind, rep, mesh) -> _LM:
    """`_lm_run` with the patient axis split over `mesh` (`jax.shard_map`): each device
    runs its own loop on its own patients (a patient's fit never depends on the others),
    until all of its patients are done; `it` is per device, (n_devices,)."""
    spec_rows, spec_rep = PartitionSpec("patients"), PartitionSpec()

    def local(arr, rows, rep):
        carry, data, z_pop = rows
        em_scale, inv_omega, stop_at, tol = rep
        out = _lm_run(eqx.combine(arr, static), carry._replace(it=carry.it[0]), data, z_pop,
                      em_kind, em_scale, inv_omega, stop_at, tol)
        return out._replace(it=out.it[None])

    fn = jax.shard_map(local, mesh=mesh,
                       in_specs=(jax.tree.map(lambda _: spec_rep, arrays),
                                 jax.tree.map(lambda _: spec_rows, rows),
                                 jax.tree.map(lambda _: spec_rep, rep)),
                       out_specs=spec_rows, check_vma=False)
    return fn(arrays, rows, rep)


def _padded_rows(n: int, n_dev: int) -> int:
    """The batch size a fit of n patients runs at: n rounded up to a coarse bucket (at
    most 1/8 more, so cohorts of similar size share one compiled loop and kernel) and to a
    multiple of the local devices."""
    step = 1 << max(0, n.bit_length() - 4)
    size = -(-n // step) * step
    return -(-size // n_dev) * n_dev


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
    progress_every: int = 5,
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
        progress: called as progress(iteration, n_converged, seconds) every
            `progress_every` iterations and at the end: the on-device loop then runs in
            chunks of `progress_every` iterations (without it, in one).

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
    # the fit runs in the options' precision, else in the cohort's dtype (a float32 cohort
    # is fitted in float32, not in whatever jax_enable_x64 makes of the Python floats here)
    dtype = fit_dtype(cohort, options)
    # each patient's typical values: the population's, moved by its covariates when the
    # model has a covariate network
    typical_i = jnp.asarray(model.individual_typical(
        typical, cohort.covariates, cohort.covariate_names), dtype)
    theta_fixed = typical_i if fixed_params is None else jnp.asarray(fixed_params, dtype)
    if theta_fixed.shape != (n, model.n_params):
        raise ValueError(f"fixed_params must be ({n}, {model.n_params}), got {theta_fixed.shape}")

    w_mask = cohort.fit_mask(condition_until)
    y = jnp.where(w_mask, cohort.obs_values, 0.0).astype(dtype)
    z_pop, inv_omega = _prior(model, free_idx, typical_i, omega)
    z_pop, inv_omega = z_pop.astype(dtype), inv_omega.astype(dtype)
    # read here, where the schedule is concrete (inside the jitted loop it is not)
    problem = _Problem(model, free_idx, options, cohort.schedule.has_infusions())
    rng = np.random.default_rng(seed)

    # the loop runs at a bucketed batch size (padding patients: copies of the first, no
    # data, done from the start) split over the local devices
    n_dev = jax.local_device_count()
    n_run = _padded_rows(n, n_dev)

    def pad(x):
        x = jnp.asarray(x)
        return x if n_run == n else jnp.concatenate([x, jnp.repeat(x[:1], n_run - n, 0)])

    sched = cohort.schedule
    if sched.dose_times.ndim == 2:
        sched = jax.tree.map(pad, sched)
    data = (pad(theta_fixed), sched, pad(jnp.asarray(cohort.obs_times, dtype)),
            pad(cohort.obs_mask), pad(cohort.obs_index), pad(y),
            pad(w_mask) & (jnp.arange(n_run) < n)[:, None])
    z_pop_run = pad(z_pop)
    mesh = Mesh(np.array(jax.local_devices()), ("patients",)) if n_dev > 1 else None
    chunk = max_iter if progress is None else max(1, int(progress_every))

    def run(z0, em) -> _LM:
        """One fit from z0: the on-device loop in chunks of `chunk` iterations (the host
        reads the iteration count and whether all are done once per chunk)."""
        carry = _LM(it=jnp.zeros((n_dev,) if mesh else (), jnp.int32), z=pad(z0),
                    lam=jnp.full((n_run,), 1e-3, dtype), cost=jnp.zeros((n_run,), dtype),
                    conv=jnp.arange(n_run) >= n, failed=jnp.zeros((n_run,), bool),
                    status=jnp.zeros((n_run,), jnp.int32))
        em_scale = jnp.asarray([em.additive, em.proportional], dtype)
        tol_ = jnp.asarray(tol, dtype)
        t_start = time.perf_counter()
        done_it = 0
        while True:
            stop_at = jnp.asarray(min(done_it + chunk, max_iter), jnp.int32)
            if mesh is None:
                carry = _lm_loop(problem, carry, data, z_pop_run, em.kind, em_scale,
                                 inv_omega, stop_at, tol_)
            else:
                arrays, static = eqx.partition(problem, eqx.is_array)
                carry = _lm_loop_sharded(arrays, static, (carry, data, z_pop_run), em.kind,
                                         (em_scale, inv_omega, stop_at, tol_), mesh)
            it, n_done, n_conv = jax.device_get((jnp.max(carry.it),
                                                 jnp.sum(carry.conv | carry.failed),
                                                 jnp.sum(carry.conv[:n])))
            done_it = int(it)
            if progress is not None:
                progress(done_it, int(n_conv), time.perf_counter() - t_start)
            if done_it >= max_iter or int(n_done) == n_run or done_it < int(stop_at):
                break
        out = carry._replace(it=jnp.max(carry.it))
        return jax.tree.map(lambda x: x[:n] if x.ndim else x, out)

    best = None
    em = error_model
    for s in range(n_starts):
        if s == 0:
            z0 = z_pop
        else:
            om = np.where(np.asarray(inv_omega) > 0,
                          1.0 / np.maximum(np.asarray(inv_omega), 1e-300), 0.5)
            z0 = jnp.asarray(np.asarray(z_pop) + om * rng.standard_normal(
                (n, len(free_idx))), dtype)
        rounds = error_rounds if error_model.estimate else 1
        for rnd in range(rounds):
            out = run(z0, em)
            if error_model.estimate and rnd < rounds - 1:
                em = _rescaled(em, problem, out, theta_fixed, cohort, y, w_mask)
                z0 = out.z
        cand = (out.z, out.cost, out.conv, out.status, int(out.it))
        if best is None:
            best = cand
        else:
            take = ((cand[1] < best[1]) & (cand[3] == Status.OK)) | (best[3] != Status.OK)
            best = (jnp.where(take[:, None], cand[0], best[0]),
                    jnp.where(take, cand[1], best[1]),
                    jnp.where(take, cand[2], best[2]),
                    jnp.where(take, cand[3], best[3]),
                    max(cand[4], best[4]))
    z, cost, conv, status, n_it = best
    n_data = jnp.sum(w_mask, axis=1).astype(jnp.int32)
    ok = status == Status.OK
    # the Laplace approximation at the estimates
    ts = jnp.asarray(cohort.obs_times, dtype)
    if em.kind == "additive":
        sd = jnp.full(y.shape, em.additive, dtype)
    else:
        sd = em.sd(problem.predict(z, theta_fixed, cohort.schedule, ts, cohort.obs_mask,
                                   cohort.obs_index)[0])
    _, h, _, _ = problem.normal(z, theta_fixed, cohort.schedule, ts, cohort.obs_mask,
                                cohort.obs_index, y, w_mask, sd, z_pop, inv_omega, jac=True)
    h = jnp.where(jnp.all(jnp.isfinite(h), axis=(1, 2))[:, None, None], h, 0.0)
    cov = jnp.linalg.inv(h + 1e-12 * jnp.eye(h.shape[-1], dtype=dtype))
    cov = jnp.where(ok[:, None, None], cov, jnp.nan)
    sd_z = jnp.sqrt(jnp.clip(jnp.diagonal(cov, axis1=1, axis2=2), 0.0))
    corr = cov / (sd_z[:, :, None] * sd_z[:, None, :] + jnp.finfo(dtype).tiny)
    theta = problem.theta(z, theta_fixed)
    # delta method: d theta / d z for each free parameter
    dtheta = jax.jvp(lambda zz: problem.theta(zz, theta_fixed), (z,), (sd_z,))[1]
    se = jnp.zeros_like(theta).at[:, jnp.asarray(free_idx)].set(
        jnp.abs(dtheta[:, jnp.asarray(free_idx)]))
    return CalibrationResult(params=theta, z=z, cov_z=cov, se=se, corr=corr, cost=cost,
                             converged=conv & ok & (n_data > 0), status=status,
                             n_data=n_data, n_iter=int(n_it), free=free, error_model=em)


def _rescaled(em: ErrorModel, problem: _Problem, out: _LM, theta_fixed, cohort: Cohort, y,
              w_mask) -> ErrorModel:
    """The error model rescaled to the pooled weighted residuals of the patients whose
    fits succeeded (unchanged when none did); `FitFailed` if the scale is not finite."""
    f, _ = problem.predict(out.z, theta_fixed, cohort.schedule, cohort.obs_times,
                           cohort.obs_mask, cohort.obs_index)
    use = w_mask & (out.status == Status.OK)[:, None] & jnp.isfinite(f)
    n_use = int(np.sum(np.asarray(use)))
    if n_use == 0:
        return em
    r = np.asarray(jnp.where(use, (y - jnp.where(use, f, 0.0)) / em.sd(jnp.where(use, f, 0.0)),
                             0.0))
    k = float(np.sqrt(np.sum(r ** 2) / n_use))
    if not (np.isfinite(k) and k > 0):
        raise FitFailed(f"calibration: the residual error scale diverged (factor {k:g} "
                        f"from {em.kind} sd ({em.additive:g}, {em.proportional:g}) over "
                        f"{n_use} observations)", stage="calibration", diverged=True)
    return em.scaled(k)


def fit_status(result: CalibrationResult) -> list[str]:
    """Each patient's outcome, as run directories write it: "ok" (the optimiser's
    convergence test passed), "not_converged" (stopped at the iteration limit),
    "no_data" (no observation to fit: the estimate is the prior mean) or
    "solver_failure:<reason>" (`status_label`: max_steps, nonfinite, solver_failed)."""
    status = np.asarray(result.status)
    conv = np.asarray(result.converged)
    n_data = np.asarray(result.n_data)
    out = []
    for st, c, nd in zip(status, conv, n_data):
        if st != Status.OK:
            out.append(status_label(int(st)))
        elif nd == 0:
            out.append("no_data")
        else:
            out.append("ok" if c else "not_converged")
    return out


def status_counts(statuses) -> str:
    """Per-patient statuses summarised, e.g. "solver_failure:max_steps: 8, ok: 2"."""
    counts = collections.Counter(statuses)
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(),
                                                    key=lambda kv: (-kv[1], kv[0])))


def out_of_bounds(model: MechanisticModel, params) -> list[list[str]]:
    """For each row of `params` ((N, P) or (P,) natural units), the names of the
    parameters outside their declared [lower, upper] (NaN counts as inside: it is no
    estimate)."""
    theta = np.atleast_2d(np.asarray(params, float))
    lower = np.array([q.lower for q in model.parameters])
    upper = np.array([q.upper for q in model.parameters])
    outside = (theta < lower) | (theta > upper)
    return [[model.param_names[j] for j in np.flatnonzero(row)] for row in outside]


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
    return_status: bool = False,
) -> tuple[jax.Array, ...]:
    """Predictions and (lo, hi) intervals at `save_ts` for calibrated patients, each
    (N, M); with `return_status` also the prediction solve's per-patient `Status` (N,).

    Parameter uncertainty enters by the delta method (forward-mode Jacobian of the
    prediction times the Laplace covariance); with `include_residual` the observation
    error is added, giving intervals for new observations. A patient whose prediction
    solve or fit failed (`result.status`) gets NaN predictions and intervals.
    """
    options = _forward(options, model)
    free_idx = tuple(model.index("param", n) for n in result.free)
    problem = _Problem(model, free_idx, options, schedule.has_infusions())
    f, jac, status = problem.jacobian(result.z, result.params, schedule, save_ts, save_mask,
                                      obs_index, with_status=True)
    var = jnp.einsum("nmf,nfg,nmg->nm", jac, result.cov_z, jac)
    if include_residual:
        var = var + result.error_model.sd(f) ** 2
    sd = jnp.sqrt(jnp.clip(var, 0.0))
    ok = ((status == Status.OK) & (result.status == Status.OK))[:, None]
    f, lo, hi = (jnp.where(ok, x, jnp.nan) for x in (f, f - level * sd, f + level * sd))
    return (f, lo, hi, status) if return_status else (f, lo, hi)
