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
