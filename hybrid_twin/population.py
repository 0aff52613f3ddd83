"""Population distributions: sampling, population estimation (iterative two-stage EM) and
population training of hybrid models (shared network weights, typical values and every
patient's parameters), with atomic checkpoints and resume."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ._atomic import atomic_open, atomic_write_text
from .calibrate import ErrorModel, FitFailed, calibrate, fit_dtype, fit_status, status_counts
from .errors import InputError
from .hybrid import HybridModel, autoscale
from .models.base import MechanisticModel
from .simulate import SolverOptions, Status, simulate
from .solve import EXPERIMENT_DEFAULT, Diffrax

logger = logging.getLogger("hybrid_twin")


def training_options(options: SolverOptions | None) -> SolverOptions:
    """The options hybrid training solves with: `options` (default `EXPERIMENT_DEFAULT`)
    in reverse mode, on its own backend when that backend takes reverse-mode derivatives
    with respect to network weights (all of diffrax, ensemble and kernel do), otherwise on
    the diffrax backend with the same method, controller and step limit (logged); on
    diffrax the step is capped at the observation spacing unless a cap is set
    (steady-state sensitivities, DESIGN.md)."""
    options = (options or EXPERIMENT_DEFAULT).resolved()
    backend = options.backend
    if not ("reverse" in backend.differentiation and backend.differentiates_model):
        if options.method.name not in Diffrax.methods:
            raise ValueError(
                f"hybrid training needs reverse-mode derivatives with respect to network "
                f"weights, which the {backend.name} backend does not take, and the diffrax "
                f"backend does not run {options.method.name}: use tsit5 or dopri5")
        logger.info("training: the %s backend takes no reverse-mode derivatives with "
                    "respect to network weights; training solves on diffrax with the "
                    "configured method and tolerances", backend.name)
        backend = Diffrax()
    return dataclasses.replace(options, backend=backend,
                               differentiation="reverse").for_gradients()


def sample_params(
    model: MechanisticModel,
    key: jax.Array,
    n: int,
    *,
    typical: Any = None,
    omega: Any = None,
    dtype: Any = None,
) -> jax.Array:
    """Sample `n` patients' parameters from the model's log-normal population.

    In each parameter's unconstrained space (see `Parameter.transform`),
    phi_i = phi(typical) + omega * z_i with z_i ~ N(0, I); for log-transformed parameters
    this is theta_i = typical * exp(omega * z_i). The result is clipped to the declared
    bounds. Parameters with omega = 0 are fixed at `typical`.

    Args:
        model: the model whose declaration gives typical values, spreads and bounds.
        key: JAX PRNG key.
        n: number of patients.
        typical: override of the typical values, `(n_params,)` natural units.
        omega: override of the log-scale SDs, `(n_params,)`.
        dtype: float dtype of the result.

    Returns:
        `(n, n_params)` natural-unit parameters.
    """
    dtype = dtype or jnp.result_type(float)
    typical = jnp.asarray(model.typical_params() if typical is None else typical, dtype)
    omega = jnp.asarray(model.omegas() if omega is None else omega, dtype)
    z = jax.random.normal(key, (n, model.n_params), dtype)
    theta = model.from_unconstrained(model.to_unconstrained(typical) + omega * z)
    lower = np.array([q.lower for q in model.parameters])
    upper = np.array([q.upper for q in model.parameters])
    return jnp.clip(theta, jnp.asarray(lower, dtype), jnp.asarray(upper, dtype))


def fit_population(
    model: MechanisticModel,
    cohort,
    *,
    free: tuple[str, ...],
    error_model=None,
    typical: np.ndarray | None = None,
    omega: np.ndarray | None = None,
    n_rounds: int = 30,
    tol: float = 1e-4,
    options: SolverOptions | None = None,
):
    """Population typical values and between-patient spreads by iterative two-stage EM.

    Each round calibrates every patient (MAP under the current population prior, with the
    Laplace covariance), then updates, in the unconstrained space of the free parameters,
    the typical value to the mean of the patients' estimates and omega^2 to their variance
    plus the mean posterior variance (the EM update of a Gaussian random-effects model
    under the Laplace approximation). The residual error scale is re-estimated each
    round. Only patients whose fit succeeded and who have data enter the update. Stops
    when typical values move less than `tol` (relative).

    Raises `FitFailed` (stage "population") when no patient can be fitted, and when the
    estimate diverges: a non-finite error scale or one grown more than `ERROR_GROWTH_MAX`
    times its start, non-finite typical values or spreads, or typical values at their
    declared bounds.

    Returns (typical (P,), omega (P,), CalibrationResult of the last round, history: one
    dict per round with the free parameters' typical values and spreads, the relative
    change, the error model, and the patients converged and failed).
    """
    typical = np.asarray(model.typical_params() if typical is None else typical, float).copy()
    omega = np.asarray(model.omegas() if omega is None else omega, float).copy()
    idx = np.array([model.index("param", n) for n in free])
    omega[idx] = np.where(omega[idx] > 0, omega[idx], 0.5)
    em = error_model or ErrorModel()
    em0 = em
    history = []
    result = None
    for rnd in range(n_rounds):
        result = calibrate(model, cohort, free=free, typical=typical, omega=omega,
                           error_model=em, options=options, error_rounds=2)
        em = result.error_model
        usable = (np.asarray(result.status) == Status.OK) & (np.asarray(result.n_data) > 0)
        if not usable.any():
            raise FitFailed(
                f"population: none of the {cohort.n_patients} patients could be fitted in "
                f"round {rnd + 1} ({status_counts(fit_status(result))})",
                stage="population", diverged=False)
        z = np.asarray(result.z)[usable]
        var_post = np.asarray(jnp.diagonal(result.cov_z, axis1=1, axis2=2))[usable]
        z_typ = z.mean(axis=0)
        omega_new = np.sqrt(z.var(axis=0) + var_post.mean(axis=0))
        full = np.array(model.to_unconstrained(jnp.asarray(typical)))
        full[idx] = z_typ
        new_typical = np.asarray(model.from_unconstrained(jnp.asarray(full)))
        _check_population(model, free, new_typical, omega_new, em, em0, rnd + 1)
        change = float(np.max(np.abs(new_typical[idx] / typical[idx] - 1)))
        typical = new_typical
        omega[idx] = omega_new
        history.append({"round": rnd + 1, "typical": typical[idx].tolist(),
                        "omega": omega[idx].tolist(), "change": change,
                        "error_model": [em.additive, em.proportional],
                        "converged": int(np.sum(np.asarray(result.converged))),
                        "failed": int(np.sum(np.asarray(result.status) != Status.OK)),
                        "patients": cohort.n_patients})
        if change < tol:
            break
    return typical, omega, result, history


ERROR_GROWTH_MAX = 1e3
"""A population fit whose estimated residual error scale grows more than this factor over
its starting value has diverged."""


def _check_population(model, free, typical, omega_free, em: ErrorModel, em0: ErrorModel,
                      round_: int) -> None:
    """`FitFailed` if a population estimate diverged (see `fit_population`)."""
    idx = [model.index("param", n) for n in free]
    where = f"population (round {round_})"
    sds = np.array([em.additive, em.proportional], float)
    sds0 = np.array([em0.additive, em0.proportional], float)
    growth = float(np.max(sds / sds0))
    if em0.estimate and not (np.all(np.isfinite(sds)) and growth <= ERROR_GROWTH_MAX):
        raise FitFailed(
            f"{where}: the residual error estimate diverged: {em.kind} sd (additive "
            f"{em.additive:.4g}, proportional {em.proportional:.4g}), {growth:.3g} times its "
            f"start (additive {em0.additive:.4g}, proportional {em0.proportional:.4g}); "
            "check the data's units and the model, or fix the error model "
            "(error_model.estimate: false)", stage="population", diverged=True)
    bad = [n for n, v, o in zip(free, typical[idx], omega_free)
           if not (np.isfinite(v) and np.isfinite(o))]
    if bad:
        raise FitFailed(f"{where}: non-finite typical value or spread of "
                        f"{', '.join(bad)}", stage="population", diverged=True)
    at = []
    for n, i in zip(free, idx):
        q, v = model.parameters[i], float(typical[i])
        for bound, side in ((q.lower, "lower"), (q.upper, "upper")):
            if np.isfinite(bound) and abs(v - bound) <= 1e-6 * max(abs(bound), 1e-300):
                at.append(f"{n} = {v:.6g} at its {side} bound {bound:g} {q.unit}")
    if at:
        raise FitFailed(f"{where}: typical value(s) at their declared bounds: "
                        f"{'; '.join(at)}", stage="population", diverged=True)


class TrainState(eqx.Module):
    """Everything population training carries between epochs (and checkpoints)."""

    model: Any
    z: jax.Array
    typical_z: jax.Array
    omega: jax.Array
    opt_state: Any
    epoch: jax.Array
    best_val: jax.Array
    best_model: Any
    bad_epochs: jax.Array
    error_sd: jax.Array


def train_population(
    model,
    train,
    val=None,
    *,
    free: tuple[str, ...],
    error_model=None,
    typical: np.ndarray | None = None,
    omega: np.ndarray | None = None,
    epochs: int = 50,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    penalty_weight: float = 1e-3,
    patience: int = 10,
    val_every: int = 1,
    val_condition_until: float | None = None,
    condition_until: float | None = None,
    refit_iter: int = 15,
    lr_decay: float = 0.5,
    lr_patience: int | None = None,
    min_delta: float = 1e-3,
    autoscale_terms: bool = True,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    options: SolverOptions | None = None,
    on_epoch_end=None,
):
    """Train a hybrid model's shared network weights jointly with the population typical
    values and the training patients' parameters, mini-batched over patients.

    Start: every training patient is calibrated (MAP) with the model as given. The
    population typical values and between-patient spreads are `typical` (natural units,
    (P,)) and `omega` ((P,), unconstrained space) when given (e.g. from `fit_population`),
    otherwise the mean and spread of those estimates (Laplace EM update); the spreads
    then stay fixed, the typical values are trained. With
    `autoscale_terms`, the scales the learned terms left to the data are then set from
    the training patients (`hybrid_twin.hybrid.autoscale`).

    Objective, two kinds:
    - `condition_until` None (joint): each batch's loss is the weighted squared residuals
      of its patients' observations, the population prior on their free parameters
      (unconstrained space; typical values learned) and `penalty_weight` times the
      learned terms' squared weights; network weights, typical values and the patients'
      parameters all move by its gradient (joint MAP).
    - `condition_until` set (forecast): at the start of every epoch each training
      patient's parameters are fitted (MAP, `refit_iter` Levenberg-Marquardt iterations
      from the previous estimates) to its data up to `condition_until` with the current
      network, and then held: the network (and the typical values, through the prior) is
      trained on all of the patient's data, so what the network must explain is what the
      early window's parameters leave unexplained later, and the patients' parameters
      cannot absorb a missing effect by fitting the whole record.

    Optimiser: Adam (optax); its learning rate is multiplied by `lr_decay` after
    `lr_patience` epochs (default: half of `patience`, at least 1) without a validation
    improvement larger than `min_delta` (relative), and training stops after `patience`
    such epochs or `epochs` in all. Validation: the validation patients are calibrated
    (MAP) with the current model, on their data up to `val_condition_until` if given, and
    the weighted RMSE of the rest of their data (a forecast; all of it if None) is the
    early-stopping criterion; the best model is kept. With `checkpoint_dir`, the state is
    written atomically after every epoch and training resumes from it: an interrupted
    run, started again, reaches the same result as an uninterrupted one (mini-batches
    depend only on seed and epoch). Patients whose solve fails in a batch add nothing to
    its loss (their count is the epoch's "failed_solves" in the history), and a
    validation patient whose solve fails is not scored.

    Raises `InputError` (before any compute) when `val` is given but has no patients,
    when it has no observation after `val_condition_until` to score, and when
    `condition_until` leaves a training window empty (no training patient has data up to
    it, or none after it); `FitFailed` when no training patient can be fitted at the
    start.

    Returns (best model, TrainState, history list of dicts).
    """
    if val is not None and not val.n_patients:
        raise InputError("training: the validation set has no patients; give validation "
                         "patients (split.val > 0) so that training can stop when it "
                         "stops improving")
    if condition_until is not None:
        early = np.asarray(train.fit_mask(condition_until))
        late = np.asarray(train.score_mask(condition_until))
        if not early.any() or not late.any():
            raise InputError(
                f"training: condition_until={condition_until:g} leaves no training data "
                f"{'up to' if not early.any() else 'after'} it (the training "
                f"observations run from {_first_time(train):g} to {_last_time(train):g}); "
                "the forecast objective fits each patient before it and scores after it")
    if val is not None and not bool(
            np.any(np.asarray(val.score_mask(val_condition_until)))):
        raise InputError(
            f"training: the {val.n_patients} validation patients have no observation after "
            f"val_condition_until={val_condition_until} (their last is at "
            f"{_last_time(val):g}): validation could never score the model")
    error_model = error_model or ErrorModel()
    forecast = condition_until is not None
    lr_patience = max(patience // 2, 1) if lr_patience is None else lr_patience
    train_options = training_options(options)
    idx = jnp.asarray([model.index("param", n) for n in free])
    given = typical is not None and omega is not None
    typical = np.asarray(model.typical_params() if typical is None else typical, float)
    omega_given = None if omega is None else np.asarray(omega, float)
    base = model.to_unconstrained(jnp.asarray(typical))
    n = train.n_patients
    optimizer = optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate)
    ckpt_exists = checkpoint_dir is not None and (
        Path(checkpoint_dir) / "train_state.eqx").exists()
    if ckpt_exists:  # a template in the dtype the fits (and so the checkpoint) are in
        dtype = fit_dtype(train, options)
        z0 = jnp.zeros((n, len(free)), dtype)
        z_typ0 = omega0 = jnp.zeros((len(free),), dtype)
    else:
        # start every patient at its MAP estimate under the mechanism as it stands, and
        # the population at the mean and spread of those estimates (Laplace EM update)
        res0 = calibrate(model, train, free=free, error_model=error_model, options=options,
                         condition_until=condition_until,
                         typical=typical if given else None,
                         omega=omega_given if given else None)
        error_model = res0.error_model
        usable = (np.asarray(res0.status) == Status.OK) & (np.asarray(res0.n_data) > 0)
        if not usable.any():
            raise FitFailed(f"training: none of the {n} training patients could be fitted "
                            f"at the start ({status_counts(fit_status(res0))})",
                            stage="training", diverged=False)
        z0 = res0.z
        if given:
            z_typ0 = base[idx].astype(z0.dtype)
            omega0 = jnp.asarray(omega_given, z0.dtype)[idx]
        else:
            z_typ0 = jnp.mean(z0[usable], axis=0)
            omega0 = jnp.sqrt(jnp.var(z0[usable], axis=0) + jnp.mean(
                jnp.diagonal(res0.cov_z, axis1=1, axis2=2)[usable], axis=0))
        if autoscale_terms and isinstance(model, HybridModel):
            model = autoscale(model, train.select(np.flatnonzero(usable)),
                              np.asarray(res0.params)[usable], options=options)
    params0 = (eqx.filter(model, eqx.is_inexact_array), z0, z_typ0)
    state = TrainState(model=model, z=z0, typical_z=z_typ0, omega=omega0,
                       opt_state=optimizer.init(params0), epoch=jnp.array(0),
                       best_val=jnp.array(jnp.inf), best_model=model,
                       bad_epochs=jnp.array(0),
                       error_sd=jnp.array([error_model.additive, error_model.proportional]))
    history: list[dict] = []
    ckpt = hist_path = None
    if checkpoint_dir is not None:
        ckpt = Path(checkpoint_dir) / "train_state.eqx"
        hist_path = Path(checkpoint_dir) / "train_history.json"
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        if ckpt.exists():
            with open(ckpt, "rb") as fh:
                state = eqx.tree_deserialise_leaves(fh, state)
            error_model = dataclasses.replace(error_model,
                                              additive=float(state.error_sd[0]),
                                              proportional=float(state.error_sd[1]))
            if hist_path.exists():
                history = json.loads(hist_path.read_text())[: int(state.epoch)]
    static = eqx.filter(model, eqx.is_inexact_array, inverse=True)
    has_inf = train.schedule.has_infusions()  # concrete here, traced in the step
    held_em = dataclasses.replace(error_model, estimate=False)

    def batch_loss(trainable, omega, rows, batch, row_w, n_rows, fit_z):
        """The loss of a mini-batch: its rows' data and prior terms over `n_rows` (the
        batch size without padding; padding rows have row_w 0 and no data), plus the
        penalty. With `fit_z` False the patients' parameters are held (no gradient)."""
        net_arrays, z_all, z_typ = trainable
        m = eqx.combine(net_arrays, static)
        sched, ts, mask, obs_k, y, w, cov = batch
        z_b = z_all[rows] if fit_z else jax.lax.stop_gradient(z_all[rows])
        full = jnp.tile(base, (z_b.shape[0], 1)).at[:, idx].set(z_b)
        theta = model.from_unconstrained(full)
        sol = simulate(m, theta, sched, ts, mask, options=train_options,
                       has_infusions=has_inf)
        # a failed patient's rows (NaN where its solve did not reach) add nothing, and
        # no NaN reaches the gradient
        ok = sol.status == Status.OK
        w = w & ok[:, None]
        sol = eqx.tree_at(lambda s_: s_.ys, sol, jnp.where(ok[:, None, None], sol.ys, 0.0))
        f = sol.observed(m, theta, obs_k)
        sd = error_model.sd(jax.lax.stop_gradient(f))
        r = jnp.where(w, (jnp.where(w, y, 0.0) - f) / sd, 0.0)
        data = 0.5 * jnp.sum(r * r)
        failed = jnp.sum((sol.status != Status.OK) & (row_w > 0))
        # a covariate network moves each patient's prior mean
        shift = m.covariate_offsets(cov, train.covariate_names)[:, idx]
        prior = 0.5 * jnp.sum(row_w[:, None] * ((z_b - z_typ - shift) / omega) ** 2)
        pen = penalty_weight * m.penalty() if hasattr(m, "penalty") else 0.0
        return (data + prior) / n_rows + pen, (data, failed)

    n_dev = jax.local_device_count()
    # several devices: each mini-batch's patients are split over them (the arrays placed
    # sharded, the compiled step partitioned by XLA); the parameters are replicated
    rows_sharding = (NamedSharding(Mesh(np.array(jax.local_devices()), ("patients",)),
                                   PartitionSpec("patients")) if n_dev > 1 else None)

    @eqx.filter_jit
    def step(trainable, opt_state, omega, rows, batch, row_w, n_rows):
        (_, (data, failed)), grads = eqx.filter_value_and_grad(batch_loss, has_aux=True)(
            trainable, omega, rows, batch, row_w, n_rows, not forecast)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        # patients outside the batch keep their parameters (only their moments decay);
        # under the forecast objective every patient's are held
        in_batch = jnp.zeros((n, 1), bool).at[rows].set(not forecast)
        updates = (updates[0], jnp.where(in_batch, updates[1], 0.0), updates[2])
        return eqx.apply_updates(trainable, updates), opt_state, data, failed

    def batch_of(c, rows):
        return (jax.tree.map(lambda x: x[rows], c.schedule), c.obs_times[rows],
                c.obs_mask[rows], c.obs_index[rows], c.obs_values[rows], c.data_mask[rows],
                c.covariates[rows])

    def population_prior(z_typ, omega):
        """Typical values (natural units, (P,)) and spreads ((P,), unconstrained) of the
        current population, for calibrations."""
        return (np.asarray(model.from_unconstrained(base.at[idx].set(z_typ))),
                np.asarray(jnp.zeros(model.n_params).at[idx].set(omega)))

    n_obs = float(np.sum(np.asarray(train.data_mask)))
    while (int(state.epoch) < epochs and int(state.bad_epochs) < patience):
        epoch = int(state.epoch)
        t0 = time.perf_counter()
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        z_all = state.z
        if forecast:
            typ_nat, omega_full = population_prior(state.typical_z, state.omega)
            refit = calibrate(state.model, train, free=free, error_model=held_em,
                              max_iter=refit_iter, condition_until=condition_until,
                              typical=typ_nat, omega=omega_full, options=options)
            keep = (np.asarray(refit.status) == Status.OK)[:, None]
            z_all = jnp.where(jnp.asarray(keep), refit.z.astype(z_all.dtype), z_all)
        trainable = (eqx.filter(state.model, eqx.is_inexact_array), z_all, state.typical_z)
        opt_state = state.opt_state
        total = 0.0
        failed_solves = 0
        for start in range(0, n, batch_size):
            rows = np.sort(perm[start:start + batch_size])
            if rows.size < batch_size and n >= batch_size:
                rows = np.sort(np.concatenate([rows, perm[: batch_size - rows.size]]))
            n_rows = rows.size
            row_w = np.ones(rows.size)
            pad = (-rows.size) % n_dev
            if pad:  # copies of the first row without data or prior, to split evenly
                rows = np.concatenate([rows, np.repeat(rows[:1], pad)])
                row_w = np.concatenate([row_w, np.zeros(pad)])
            batch = batch_of(train, rows)
            if pad:
                batch = batch[:5] + (batch[5] & jnp.asarray(row_w > 0)[:, None],) + batch[6:]
            split = (jnp.asarray(rows), batch, jnp.asarray(row_w))
            if rows_sharding is not None:
                split = jax.device_put(split, rows_sharding)
            trainable, opt_state, data, failed = step(trainable, opt_state, state.omega,
                                                      *split, n_rows)
            total += float(data)
            failed_solves += int(failed)
        new_model = eqx.combine(trainable[0], static)
        z_all = trainable[1]
        omega = state.omega
        val_rmse = float("nan")
        improved = True
        if val is not None and (epoch + 1) % val_every == 0:
            typ_nat, omega_full = population_prior(trainable[2], omega)
            res = calibrate(new_model, val, free=free, error_model=held_em, max_iter=15,
                            condition_until=val_condition_until, typical=typ_nat,
                            omega=omega_full, options=options)
            val_rmse = _weighted_rmse(new_model, val, res.params, error_model,
                                      after=val_condition_until, options=options)
            improved = val_rmse < float(state.best_val)
            # a plateau: no improvement larger than min_delta (relative)
            progressed = val_rmse < float(state.best_val) * (1.0 - min_delta)
        else:
            progressed = improved
        bad = 0 if progressed else int(state.bad_epochs) + 1
        lr = float(opt_state.hyperparams["learning_rate"])
        if bad and bad % lr_patience == 0:
            opt_state.hyperparams["learning_rate"] = jnp.asarray(
                lr * lr_decay, opt_state.hyperparams["learning_rate"].dtype)
        best_val = jnp.array(val_rmse) if improved and val is not None else state.best_val
        state = TrainState(model=new_model, z=z_all, typical_z=trainable[2], omega=omega,
                           opt_state=opt_state, epoch=jnp.array(epoch + 1), best_val=best_val,
                           best_model=new_model if improved else state.best_model,
                           bad_epochs=jnp.array(bad), error_sd=state.error_sd)
        history.append({"epoch": epoch + 1, "train_rmse_weighted": (2 * total / n_obs) ** 0.5,
                        "val_rmse_weighted": val_rmse, "failed_solves": failed_solves,
                        "learning_rate": lr, "seconds": time.perf_counter() - t0})
        if ckpt is not None:
            with atomic_open(ckpt, "wb") as fh:
                eqx.tree_serialise_leaves(fh, state)
            atomic_write_text(hist_path, json.dumps(history))
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, history[-1])
    return state.best_model, state, history


def _weighted_rmse(model, cohort, theta, error_model, after: float | None = None,
                   options: SolverOptions | None = None) -> float:
    """sqrt(mean(((y - f) / sd)^2)) over a cohort's data (the forecast part after `after`
    if given), without the patients whose solve failed (NaN if none is left)."""
    sol = simulate(model, theta, cohort.schedule, cohort.obs_times, cohort.obs_mask,
                   options=options or EXPERIMENT_DEFAULT)
    f = sol.observed(model, theta, cohort.obs_index)
    w = np.asarray(cohort.score_mask(after)) & (np.asarray(sol.status) == Status.OK)[:, None]
    if not w.any():
        return float("nan")
    r = (np.asarray(cohort.obs_values) - np.asarray(f)) / np.asarray(error_model.sd(f))
    return float(np.sqrt(np.mean(r[w] ** 2)))


def _first_time(cohort) -> float:
    """The earliest observation time with data in `cohort` (inf if none)."""
    t = np.asarray(cohort.obs_times)[np.asarray(cohort.data_mask)]
    return float(t.min()) if t.size else float("inf")


def _last_time(cohort) -> float:
    """The latest observation time with data in `cohort` (-inf if none)."""
    t = np.asarray(cohort.obs_times)[np.asarray(cohort.data_mask)]
    return float(t.max()) if t.size else float("-inf")
