"""`hybrid-twin simulate CONFIG`: simulate a config's model over its cohort's schedules.

The model (with the learned weights of a finished run, `--model-from RUN_DIR`), the
cohort (its doses, inputs and observation times) and the solver come from the experiment
config; each patient's parameters are drawn from the population (the declaration's typical
values and spreads, or the population the run estimated). Patients are simulated in chunks
of `chunk`, with one progress line per chunk (patients done, rate, ETA), and the output is
written atomically: `predictions.csv` (ID, TIME, OBS, PRED, STATUS), `params.csv` and
`summary.json` (strict JSON). A patient whose solve fails keeps its rows, with empty PRED
and STATUS naming the failure (`hybrid_twin.simulate.status_label`: "ok" or
"solver_failure:<reason>"), and is counted in the summary; when every patient fails, the
outputs are written and `RunFailed` is raised.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path

import numpy as np

from hybrid_twin._atomic import atomic_write_text
from hybrid_twin.config import ExperimentConfig, solver_options
from hybrid_twin.errors import InputError, RunDirectoryError, RunFailed


def simulate_experiment(cfg: ExperimentConfig, out: str | os.PathLike, *, chunk: int = 10_000,
                        model_from: str | os.PathLike | None = None, seed: int | None = None,
                        progress=print) -> Path:
    """Simulate the config's cohort; returns the output directory."""
    from training.run import (
        _cell,
        _setup_device,
        build_cohort,
        build_model,
        load_trained_model,
        strict_json,
    )

    _setup_device(cfg)
    import jax

    from hybrid_twin.calibrate import status_counts
    from hybrid_twin.models import get_model
    from hybrid_twin.population import sample_params
    from hybrid_twin.simulate import simulate, status_label

    if chunk < 1:
        raise InputError(f"--chunk: must be >= 1, got {chunk}")
    if Path(out).exists() and not Path(out).is_dir():
        raise RunDirectoryError(f"--out {out}: exists and is not a directory")
    mechanistic = get_model(cfg.model.name)
    typical, omega = mechanistic.typical_params(), mechanistic.omegas()
    if model_from is not None:
        model = load_trained_model(model_from)
        pop = Path(model_from) / "checkpoints" / "population.json"
        if pop.exists():
            try:
                record = json.loads(pop.read_text())
                typical, omega = np.array(record["typical"]), np.array(record["omega"])
            except (ValueError, KeyError, TypeError) as e:
                raise RunDirectoryError(f"{pop}: unreadable population estimate "
                                        f"({type(e).__name__}: {e})") from None
    else:
        model = build_model(cfg, mechanistic)
    truth = (get_model(cfg.data.virtual.model)
             if cfg.data.source == "virtual" and cfg.data.virtual.model else mechanistic)
    cohort, _ = build_cohort(cfg, mechanistic, for_simulation=True, run_dir=out, truth=truth)
    n = cohort.n_patients
    seed = cfg.seed if seed is None else seed
    theta = np.asarray(sample_params(model, jax.random.PRNGKey(seed), n, typical=typical,
                                     omega=omega))
    options = solver_options(cfg)
    preds, status = [], []
    t0 = time.perf_counter()
    for start in range(0, n, chunk):
        rows = np.arange(start, min(n, start + chunk))
        c = cohort.select(rows)
        sol = simulate(model, theta[rows], c.schedule, c.obs_times, c.obs_mask,
                       options=options)
        preds.append(np.asarray(sol.observed(model, theta[rows], c.obs_index)))
        status.append(np.asarray(sol.status))
        done = rows[-1] + 1
        secs = time.perf_counter() - t0
        progress(f"  simulated {done}/{n} patients, {done / secs:.0f} patients/s, "
                 f"ETA {secs / done * (n - done):.0f} s", flush=True)
    pred = np.concatenate(preds) if preds else np.zeros((0, 0))
    status_all = np.concatenate(status) if status else np.zeros((0,), int)
    wall = time.perf_counter() - t0

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["ID", "TIME", "OBS", "PRED", "STATUS"])
    t_obs, k, mask = (np.asarray(cohort.obs_times), np.asarray(cohort.obs_index),
                      np.asarray(cohort.obs_mask))
    names = model.observable_names
    labels = [status_label(s) for s in status_all]
    for i, pid in enumerate(cohort.ids):
        ok = labels[i] == "ok"
        for j in np.flatnonzero(mask[i]):
            w.writerow([pid, repr(float(t_obs[i, j])), names[k[i, j]],
                        _cell(pred[i, j]) if ok else "", labels[i]])
    atomic_write_text(out / "predictions.csv", buf.getvalue())
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["ID", *model.param_names])
    for i, pid in enumerate(cohort.ids):
        w.writerow([pid, *[repr(float(v)) for v in theta[i]]])
    atomic_write_text(out / "params.csv", buf.getvalue())
    sel = mask & (status_all == 0)[:, None]
    summary = {
        "name": cfg.name, "model": cfg.model.name, "learned": bool(cfg.model.learned),
        "model_from": str(model_from) if model_from else None, "n_patients": n,
        "seed": seed, "backend": options.backend_name, "device": str(jax.devices()[0]),
        "wall_s": round(wall, 3), "failed_patients": int(np.sum(status_all != 0)),
        "status": {lab: labels.count(lab) for lab in sorted(set(labels))},
        "observables": {
            name: {"mean": float(np.mean(pred[sel & (k == j)])),
                   "p5": float(np.percentile(pred[sel & (k == j)], 5)),
                   "p95": float(np.percentile(pred[sel & (k == j)], 95))}
            for j, name in enumerate(names) if np.any(sel & (k == j))},
    }
    atomic_write_text(out / "summary.json", strict_json(summary))
    if n and all(lab != "ok" for lab in labels):
        raise RunFailed(f"simulate: every one of the {n} patients failed "
                        f"({status_counts(labels)}); {out.resolve()} holds their STATUS")
    return out.resolve()
