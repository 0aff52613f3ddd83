"""Shared pieces of the benchmarks: the glucose-day cohort, device info, JSON output."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_twin import Schedule
from hybrid_twin.models import BergmanMinimal
from hybrid_twin.population import sample_params

RESULTS = Path(__file__).resolve().parent / "results"
MEAL_CLOCK_MIN = (7 * 60.0, 12 * 60.0, 19 * 60.0)


def glucose_day_cohort(n: int, seed: int = 0, dtype: Any = jnp.float64):
    """N virtual patients of `BergmanMinimal` over 24 h (minutes), glucose every 5 min.

    Each patient eats three meals (breakfast ~07:00, lunch ~12:00, dinner ~19:00, each
    time jittered uniformly by +-30 min; 40-90 g carbohydrate) and injects a rapid-acting
    insulin bolus with each meal (1 U per 60 g, +-20%). Parameters are drawn from the
    model's log-normal population.

    Returns (model, params (N, P), schedule (batched), save_ts (289,)).
    """
    model = BergmanMinimal()
    rng = np.random.default_rng(seed)
    params = sample_params(model, jax.random.PRNGKey(seed), n, dtype=dtype)
    meal_t = np.asarray(MEAL_CLOCK_MIN)[None, :] + rng.uniform(-30, 30, (n, 3))
    carbs = rng.uniform(40, 90, (n, 3))
    insulin = carbs / 60.0 * rng.uniform(0.8, 1.2, (n, 3))
    times = np.stack([meal_t, meal_t], axis=-1).reshape(n, 6)
    amounts = np.stack([carbs, insulin], axis=-1).reshape(n, 6)
    targets = np.tile(np.array([0, 1], np.int32), (n, 3))
    schedule = Schedule(
        dose_times=jnp.asarray(times, dtype),
        dose_amounts=jnp.asarray(amounts, dtype),
        dose_rates=jnp.zeros((n, 6), dtype),
        dose_targets=jnp.asarray(targets),
        dose_mask=jnp.ones((n, 6), bool),
        input_times=jnp.zeros((n, 0), dtype),
        input_values=jnp.zeros((n, 0, 1), dtype),
        input_mask=jnp.zeros((n, 0), bool),
    )
    save_ts = jnp.arange(0.0, 24 * 60 + 1, 5.0, dtype=dtype)
    return model, params, schedule, save_ts


def device_info() -> dict[str, Any]:
    """Name of the JAX device, the host, and the software versions."""
    dev = jax.devices()[0]
    import diffrax
    import equinox

    return {
        "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}".rstrip(":"),
        "n_devices": jax.device_count(),
        "host_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "diffrax": diffrax.__version__,
        "equinox": equinox.__version__,
    }


def git_commit() -> str:
    """The checkout's short commit; HYBRID_TWIN_COMMIT when set (a copy of the tree
    without its .git, e.g. on a lent GPU machine)."""
    if os.environ.get("HYBRID_TWIN_COMMIT"):
        return os.environ["HYBRID_TWIN_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            cwd=Path(__file__).parent, check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - outside a git checkout
        return "unknown"


def emit(record: dict[str, Any], out: str | os.PathLike | None) -> None:
    """Print a JSON line and, when `out` is given, append it to that file."""
    record = {"date": datetime.date.today().isoformat(), "commit": git_commit(), **record}
    line = json.dumps(record, sort_keys=False)
    print(line, flush=True)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(line + "\n")


def block(x):
    return jax.block_until_ready(x)
