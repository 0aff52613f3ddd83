"""Finite-difference checks of sensitivities, shared by the test files (importable because
pytest puts tests/, the folder of conftest.py, on sys.path)."""

import jax.numpy as jnp
import numpy as np


def central_fd(f, theta, rel=1e-6):
    """Central finite differences of f at theta (step rel * |theta_i|), one column per
    parameter on the last axis."""
    cols = []
    for i in range(theta.shape[0]):
        h = rel * abs(theta[i])
        up, dn = theta.copy(), theta.copy()
        up[i] += h
        dn[i] -= h
        cols.append((np.asarray(f(jnp.asarray(up))) - np.asarray(f(jnp.asarray(dn)))) / (2 * h))
    return np.stack(cols, axis=-1)


def check_gradients(jac, fd, theta, tol):
    """Compare sensitivities `(T, O, P)` scaled to d y / d log(theta): relative where they
    are large, and against 1e-4 of that observable's largest scaled sensitivity where they
    are (near) zero, so finite-difference noise on exact zeros does not count. Returns
    the largest error."""
    jn, fn = jac * theta, fd * theta
    y_scale = np.max(np.abs(fn), axis=(0, 2), keepdims=True)
    err = np.abs(jn - fn) / np.maximum(np.abs(fn), 1e-4 * y_scale)
    assert np.max(err) < tol, (np.max(err), np.unravel_index(np.argmax(err), err.shape))
    return float(np.max(err))
