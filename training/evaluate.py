"""`hybrid-twin evaluate RUN_DIR`: metrics from a finished run's predictions.csv."""

from __future__ import annotations

import collections
import csv
import io
import json
from pathlib import Path

import numpy as np

from hybrid_twin._atomic import atomic_write_text
from hybrid_twin.config import load_config
from hybrid_twin.data.cohort import after_cut
from hybrid_twin.errors import InputError, RunDirectoryError
from training.run import read_run_record, strict_json, summary_table

COLUMNS = ("ID", "TIME", "OBS", "DV", "PRED", "PRED_LO", "PRED_HI", "SPLIT", "STATUS")


def _check_finished(run_dir: Path) -> None:
    """`RunDirectoryError` unless `run_dir` holds a run whose run.json says it completed
    its predictions."""
    if not run_dir.is_dir():
        raise RunDirectoryError(f"{run_dir}: not a run directory (no such directory)")
    record = read_run_record(run_dir)
    if record is None:
        raise RunDirectoryError(
            f"{run_dir}: no run.json, so the run cannot be known to have finished (a run "
            "still going, killed, or made by an older version); run it (again) with "
            "hybrid-twin run")
    if record["status"] != "complete" or "predict" not in (record.get("completed") or []):
        what = {"running": "has not finished (still running, or killed)",
                "failed": f"failed ({record.get('reason')})"}.get(
            record["status"], f"completed only {', '.join(record.get('completed') or [])}")
        raise RunDirectoryError(f"{run_dir}: the run {what}; finish it with hybrid-twin run "
                                "(it resumes from its checkpoints) before evaluating it")


def _float(text: str, path: Path, line: int, column: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InputError(f"{path}:{line}: column {column}: expected a number, got "
                         f"{text!r}") from None


def evaluate_run(run_dir: str | Path) -> dict:
    """Recompute RMSE/MAE per split and observable (TIME > condition_until, DV present,
    patients whose solve failed left out and counted), rewrite metrics.json keeping its
    other entries, print the summary; return the metrics.

    Raises `RunDirectoryError` for a run that has not completed (run.json missing or not
    "complete"), `InputError` naming the line for a malformed or torn predictions.csv."""
    run_dir = Path(run_dir)
    _check_finished(run_dir)
    path = run_dir / "predictions.csv"
    for name in ("predictions.csv", "config.yaml"):
        if not (run_dir / name).exists():
            raise RunDirectoryError(f"{run_dir / name} not found, though run.json says the "
                                    "run completed; run it again with --force-restart")
    # the run's data need not be reachable from here: only the forecast rule is read
    cond = load_config(run_dir / "config.yaml", check_paths=False).evaluation.condition_until
    errs: dict[str, dict[str, list[float]]] = {}
    patients: dict[str, dict[str, str]] = {}
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if text and not text.endswith("\n"):
        last = text.count("\n") + 1
        raise InputError(f"{path}:{last}: the last line is incomplete (no line end): the "
                         "file was cut short; run the experiment again")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    missing = [c for c in COLUMNS if c not in header]
    if missing and missing != ["STATUS"]:
        raise InputError(f"{path}:1: missing column(s) {', '.join(missing)} (expected "
                         f"{', '.join(COLUMNS)})")
    for row in reader:
        line = reader.line_num
        if None in row or any(v is None for v in row.values()):
            got = len([v for v in row.values() if v is not None]) + len(row.get(None) or [])
            raise InputError(f"{path}:{line}: expected {len(header)} fields, got {got} (a "
                             "torn or malformed line)")
        status = row.get("STATUS", "ok")
        patients.setdefault(row["SPLIT"], {})[row["ID"]] = status
        if row["DV"] in ("", ".") or row["PRED"] == "":
            continue
        t = _float(row["TIME"], path, line, "TIME")
        dv = _float(row["DV"], path, line, "DV")
        pred = _float(row["PRED"], path, line, "PRED")
        if not after_cut(np.float64(t), cond):
            continue
        errs.setdefault(row["SPLIT"], {}).setdefault(row["OBS"], []).append(pred - dv)
    metrics: dict = {}
    for split in patients:
        e = {k: np.asarray(v) for k, v in errs.get(split, {}).items()}
        counts = collections.Counter(patients[split].values())
        metrics[split] = {"rmse": {k: float(np.sqrt(np.mean(v ** 2))) for k, v in e.items()},
                          "mae": {k: float(np.mean(np.abs(v))) for k, v in e.items()},
                          "n": {k: int(v.size) for k, v in e.items()},
                          "n_patients": len(patients[split]),
                          "n_failed": sum(v for k, v in counts.items()
                                          if k.startswith("solver_failure")),
                          "status": dict(counts)}
    old = run_dir / "metrics.json"
    if old.exists():
        try:
            previous = json.loads(old.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{old}: not valid JSON ({e}); delete it to recompute it") \
                from None
        for split in metrics:
            for key, value in previous.get(split, {}).items():
                metrics[split].setdefault(key, value)
        if "run" in previous:
            metrics["run"] = previous["run"]
    atomic_write_text(old, strict_json(metrics))
    observables = sorted({o for m in metrics.values() if "rmse" in m for o in m["rmse"]})
    print(summary_table(metrics, observables))
    return metrics
