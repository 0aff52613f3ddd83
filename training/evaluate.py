"""`hybrid-twin evaluate RUN_DIR`: metrics from a run's predictions.csv."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from hybrid_twin._atomic import atomic_write_text
from hybrid_twin.config import load_config
from hybrid_twin.data.cohort import after_cut
from training.run import summary_table


def evaluate_run(run_dir: str | Path) -> dict:
    """Recompute RMSE/MAE per split and observable (TIME > condition_until, DV present),
    rewrite metrics.json keeping its "run" entry, print the summary; return the metrics."""
    run_dir = Path(run_dir)
    for name in ("predictions.csv", "config.yaml"):
        if not (run_dir / name).exists():
            raise FileNotFoundError(f"{run_dir / name} not found: is {run_dir} a run directory?")
    # the run's data need not be reachable from here: only the forecast rule is read
    cond = load_config(run_dir / "config.yaml", check_paths=False).evaluation.condition_until
    errs: dict[str, dict[str, list[float]]] = {}
    with open(run_dir / "predictions.csv", newline="") as fh:
        for line, row in enumerate(csv.DictReader(fh), start=2):
            if row["DV"] in ("", "."):
                continue
            try:
                t, dv, pred = float(row["TIME"]), float(row["DV"]), float(row["PRED"])
            except (KeyError, ValueError) as e:
                raise ValueError(f"{run_dir / 'predictions.csv'}:{line}: {e}") from None
            if not after_cut(np.float64(t), cond):
                continue
            errs.setdefault(row["SPLIT"], {}).setdefault(row["OBS"], []).append(pred - dv)
    metrics: dict = {}
    for split, by_obs in errs.items():
        e = {k: np.asarray(v) for k, v in by_obs.items()}
        metrics[split] = {"rmse": {k: float(np.sqrt(np.mean(v ** 2))) for k, v in e.items()},
                          "mae": {k: float(np.mean(np.abs(v))) for k, v in e.items()},
                          "n": {k: int(v.size) for k, v in e.items()}}
    old = run_dir / "metrics.json"
    if old.exists():
        previous = json.loads(old.read_text())
        for split in metrics:
            for key, value in previous.get(split, {}).items():
                metrics[split].setdefault(key, value)
        if "run" in previous:
            metrics["run"] = previous["run"]
    atomic_write_text(old, json.dumps(metrics, indent=2) + "\n")
    observables = sorted({o for m in metrics.values() if "rmse" in m for o in m["rmse"]})
    print(summary_table(metrics, observables))
    return metrics
