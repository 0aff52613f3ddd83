"""Population distributions of model parameters."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .models.base import MechanisticModel


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
    options=None,
):
    """Population typical values and between-patient spreads by iterative two-stage EM.

    Each round calibrates every patient (MAP under the current population prior, with the
    Laplace covariance), then updates, in the unconstrained space of the free parameters,
    the typical value to the mean of the patients' estimates and omega^2 to their variance
    plus the mean posterior variance (the EM update of a Gaussian random-effects model
    under the Laplace approximation). The residual error scale is re-estimated each
    round. Stops when typical values move less than `tol` (relative).

    Returns (typical (P,), omega (P,), CalibrationResult of the last round, history).
    """
    from .calibrate import ErrorModel, calibrate

    typical = np.asarray(model.typical_params() if typical is None else typical, float).copy()
    omega = np.asarray(model.omegas() if omega is None else omega, float).copy()
    idx = np.array([model.index("param", n) for n in free])
    omega[idx] = np.where(omega[idx] > 0, omega[idx], 0.5)
    em = error_model or ErrorModel()
    history = []
    result = None
    for rnd in range(n_rounds):
        result = calibrate(model, cohort, free=free, typical=typical, omega=omega,
                           error_model=em, options=options, error_rounds=2)
        em = result.error_model
        z = np.asarray(result.z)
        var_post = np.asarray(jnp.diagonal(result.cov_z, axis1=1, axis2=2))
        z_typ = z.mean(axis=0)
        omega_new = np.sqrt(z.var(axis=0) + var_post.mean(axis=0))
        full = np.array(model.to_unconstrained(jnp.asarray(typical)))
        full[idx] = z_typ
        new_typical = np.asarray(model.from_unconstrained(jnp.asarray(full)))
        change = float(np.max(np.abs(new_typical[idx] / typical[idx] - 1)))
        typical = new_typical
        omega[idx] = omega_new
        history.append({"round": rnd + 1, "typical": typical[idx].tolist(),
                        "omega": omega[idx].tolist(), "change": change,
                        "error_model": [em.additive, em.proportional]})
        if change < tol:
            break
    return typical, omega, result, history
