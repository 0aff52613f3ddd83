"""NONMEM-style event tables (CSV) to and from `Cohort`.

Columns (DESIGN.md, event-table contract): ID, TIME, EVID (0 observation, 1 dose), DV,
OBS, AMT, RATE, CMT, MDV, and any other column is a covariate, constant within an ID.
Empty cells and "." are missing values. At equal times, observation records see the
state before a dose (trough samples); `write_event_table` writes observations first.

`read_event_table` checks every row and raises one `EventTableError` that lists each bad
row as `file:line: reason`; nothing is silently dropped.
"""

from __future__ import annotations

import csv
import math
import os
from collections import OrderedDict
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from .._atomic import atomic_open
from ..models.base import MechanisticModel
from ..schedule import Schedule
from ..errors import InputError
from .cohort import Cohort

STANDARD = ("ID", "TIME", "EVID", "DV", "OBS", "AMT", "RATE", "CMT", "MDV")
REQUIRED = ("ID", "TIME")
MISSING = ("", ".")
MAX_REPORTED = 50


class EventTableError(InputError):
    """A malformed event table; `problems` lists every `file:line: reason`."""

    def __init__(self, path: str, problems: list[str]):
        self.problems = problems
        shown = problems[:MAX_REPORTED]
        more = len(problems) - len(shown)
        text = f"{path}: {len(problems)} problem(s) in the event table:\n  " + "\n  ".join(shown)
        if more:
            text += f"\n  ... and {more} more"
        super().__init__(text)


def _number(text: str) -> float | None:
    text = text.strip()
    if text in MISSING:
        return None
    return float(text)


def read_event_table(
    path: str | os.PathLike, model: MechanisticModel, *, dtype=None,
    ignore_columns: tuple[str, ...] = (),
) -> Cohort:
    """Read a CSV event table into a `Cohort` for `model`.

    OBS and CMT names are mapped onto `model.observables` and `model.dose_targets`
    (a CMT may also name the target's state). OBS may be omitted when the model has one
    observable, CMT when it has one dose target. Without an EVID column, rows with an AMT
    are doses and the others observations, and (with no MDV column either) an observation
    with an empty DV is a record without a value. `ignore_columns` are neither standard columns
    nor covariates (e.g. the PRED columns of a run's predictions.csv).
    """
    path = str(path)
    dtype = dtype or jnp.result_type(float)
    try:
        with open(path, newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            rows = [(reader.line_num, row) for row in reader]
    except FileNotFoundError:
        raise FileNotFoundError(f"event table not found: {path}") from None
    if header is None or not [h for h in header if h.strip()]:
        raise EventTableError(path, ["line 1: the file is empty; expected a header row "
                                     f"with at least {', '.join(REQUIRED)}"])
    names = [h.strip() for h in header]
    canon = {n.upper(): i for i, n in enumerate(names) if n.upper() in STANDARD}
    missing = [c for c in REQUIRED if c not in canon]
    if missing:
        raise EventTableError(path, [f"line 1: missing required column(s) {', '.join(missing)} "
                                     f"(header: {', '.join(names)})"])
    cov_cols = [(i, n) for i, n in enumerate(names)
                if n.upper() not in STANDARD and n and n not in ignore_columns]
    n_obs_names = len(model.observables)
    target_by_name = {d.name: j for j, d in enumerate(model.dose_targets)}
    for j, d in enumerate(model.dose_targets):
        target_by_name.setdefault(d.state, j)
    problems: list[str] = []
    patients: OrderedDict[str, dict] = OrderedDict()
    seen_rows: dict[tuple, int] = {}
    if not rows:
        raise EventTableError(path, ["line 2: the file has a header but no rows"])

    def cell(row, col):
        i = canon.get(col)
        return row[i].strip() if i is not None and i < len(row) else ""

    for line, row in rows:
        if not any(c.strip() for c in row):
            problems.append(f"{path}:{line}: empty row")
            continue
        if len(row) != len(names):
            problems.append(f"{path}:{line}: {len(row)} fields, expected {len(names)}")
            continue
        key = tuple(c.strip() for c in row)
        if key in seen_rows:
            problems.append(f"{path}:{line}: duplicate of line {seen_rows[key]}")
            continue
        seen_rows[key] = line
        pid = cell(row, "ID")
        if pid in MISSING:
            problems.append(f"{path}:{line}: ID is empty")
            continue
        bad = []
        values = {}
        for col in ("TIME", "EVID", "DV", "AMT", "RATE", "MDV"):
            text = cell(row, col)
            try:
                v = _number(text)
            except ValueError:
                bad.append(f"{col} {text!r} is not a number")
                continue
            if v is not None and not math.isfinite(v):
                bad.append(f"{col} is {text!r}; expected a finite number")
                continue
            values[col] = v
        if bad:
            problems.append(f"{path}:{line}: " + "; ".join(bad))
            continue
        t, evid = values.get("TIME"), values.get("EVID")
        if "EVID" not in canon:
            evid = 1.0 if values.get("AMT") is not None else 0.0
        if t is None:
            problems.append(f"{path}:{line}: TIME is missing")
            continue
        if t < 0:
            problems.append(f"{path}:{line}: TIME {t:g} is negative")
            continue
        if evid not in (0.0, 1.0):
            problems.append(f"{path}:{line}: EVID {cell(row, 'EVID')!r}; expected 0 "
                            "(observation) or 1 (dose)")
            continue
        p = patients.setdefault(pid, {"obs": [], "doses": [], "cov": None, "cov_line": line,
                                      "last_t": -math.inf, "last_line": line})
        if t < p["last_t"]:
            problems.append(f"{path}:{line}: TIME {t:g} is before the previous row of ID "
                            f"{pid} (line {p['last_line']}, TIME {p['last_t']:g}); times must "
                            "not decrease within an ID")
            continue
        p["last_t"], p["last_line"] = t, line
        cov = []
        for i, name in cov_cols:
            text = row[i].strip()
            try:
                v = _number(text)
            except ValueError:
                problems.append(f"{path}:{line}: covariate {name} {text!r} is not a number "
                                "(encode categories as numbers)")
                v = None
            cov.append(math.nan if v is None else v)
        if p["cov"] is None:
            p["cov"] = cov
        else:
            for (i, name), a, b in zip(cov_cols, p["cov"], cov):
                if not (a == b or (math.isnan(a) and math.isnan(b))):
                    problems.append(f"{path}:{line}: covariate {name} changes within ID {pid} "
                                    f"({a:g} at line {p['cov_line']}, {b:g} here); covariates "
                                    "must be constant per patient")
        if evid == 0.0:
            k = _resolve(cell(row, "OBS"), "OBS", "observable",
                         dict(zip(model.observable_names, range(n_obs_names))), model)
            if isinstance(k, str):
                problems.append(f"{path}:{line}: {k}")
                continue
            dv = values.get("DV")
            mdv = values.get("MDV") or 0.0
            if "MDV" not in canon and "EVID" not in canon and dv is None:
                mdv = 1.0
            if mdv == 0.0 and dv is None:
                problems.append(f"{path}:{line}: observation without DV (set MDV=1 for a "
                                "record with no value)")
                continue
            p["obs"].append((t, math.nan if mdv else dv, k, bool(mdv)))
        else:
            amt = values.get("AMT")
            if amt is None or amt < 0:
                problems.append(f"{path}:{line}: dose row (EVID=1) needs AMT >= 0, got "
                                f"{cell(row, 'AMT')!r}")
                continue
            rate = values.get("RATE") or 0.0
            if rate < 0:
                problems.append(f"{path}:{line}: RATE {rate:g} is negative")
                continue
            j = _resolve(cell(row, "CMT"), "CMT", "dose target", target_by_name, model)
            if isinstance(j, str):
                problems.append(f"{path}:{line}: {j}")
                continue
            p["doses"].append((t, amt, rate, j))
    if problems:
        raise EventTableError(path, problems)
    return _to_cohort(patients, model, [n for _, n in cov_cols], dtype)


def _resolve(name: str, column: str, kind: str, known: dict[str, int],
             model: MechanisticModel) -> int | str:
    """Index of `name` among `known`, or the reason it cannot be resolved."""
    valid = ", ".join(dict.fromkeys(known))
    if name in MISSING:
        if len(set(known.values())) == 1:
            return 0
        return f"{column} is empty; {type(model).__name__} has {kind}s {valid}"
    if name in known:
        return known[name]
    article = "an" if kind[0] in "aeiou" else "a"
    return f"{column} {name!r} is not {article} {kind} of {type(model).__name__} ({valid})"


def _to_cohort(patients, model, cov_names, dtype) -> Cohort:
    n = len(patients)
    m = max([len(p["obs"]) for p in patients.values()] + [1])
    d = max([len(p["doses"]) for p in patients.values()] + [1])
    obs_t = np.zeros((n, m))
    obs_v = np.full((n, m), np.nan)
    obs_k = np.zeros((n, m), np.int32)
    obs_mask = np.zeros((n, m), bool)
    obs_miss = np.zeros((n, m), bool)
    dose = np.zeros((4, n, d))
    dose_mask = np.zeros((n, d), bool)
    cov = np.zeros((n, len(cov_names)))
    for i, p in enumerate(patients.values()):
        for j, (t, v, k, miss) in enumerate(p["obs"]):
            obs_t[i, j], obs_v[i, j], obs_k[i, j], obs_miss[i, j] = t, v, k, miss
        obs_mask[i, :len(p["obs"])] = True
        if p["obs"]:
            obs_t[i, len(p["obs"]):] = p["obs"][-1][0]
        for j, row in enumerate(p["doses"]):
            dose[:, i, j] = row
        dose_mask[i, :len(p["doses"])] = True
        cov[i] = p["cov"]
    n_in = len(model.inputs)
    schedule = Schedule(
        dose_times=jnp.asarray(dose[0], dtype), dose_amounts=jnp.asarray(dose[1], dtype),
        dose_rates=jnp.asarray(dose[2], dtype), dose_targets=jnp.asarray(dose[3], jnp.int32),
        dose_mask=jnp.asarray(dose_mask),
        input_times=jnp.zeros((n, 0), dtype), input_values=jnp.zeros((n, 0, n_in), dtype),
        input_mask=jnp.zeros((n, 0), bool))
    return Cohort(
        obs_times=jnp.asarray(obs_t, dtype), obs_values=jnp.asarray(obs_v, dtype),
        obs_index=jnp.asarray(obs_k), obs_mask=jnp.asarray(obs_mask),
        obs_missing=jnp.asarray(obs_miss), schedule=schedule,
        covariates=jnp.asarray(cov, dtype), ids=tuple(patients),
        observable_names=model.observable_names, covariate_names=tuple(cov_names))


def _fmt(x: float) -> str:
    return repr(float(x))


def write_event_table(cohort: Cohort, path: str | os.PathLike, model: MechanisticModel) -> None:
    """Write `cohort` as a CSV event table (atomically: temp file, then rename).

    Rows are ordered by patient, then time, observations before doses at equal times.
    Values are written with full precision, so reading the file back gives the same
    cohort.
    """
    if np.asarray(cohort.schedule.input_mask).any():
        raise ValueError("write_event_table: the cohort has exogenous input signals, which "
                         "the event-table format does not carry; store it as HDF5")
    path = Path(path)
    header = [*STANDARD, *cohort.covariate_names]
    arrays = {k: np.asarray(v) for k, v in {
        "ot": cohort.obs_times, "ov": cohort.obs_values, "ok": cohort.obs_index,
        "om": cohort.obs_mask, "mi": cohort.obs_missing, "cov": cohort.covariates,
        "dt": cohort.schedule.dose_times, "da": cohort.schedule.dose_amounts,
        "dr": cohort.schedule.dose_rates, "dg": cohort.schedule.dose_targets,
        "dm": cohort.schedule.dose_mask}.items()}
    with atomic_open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for i, pid in enumerate(cohort.ids):
            cov = [_fmt(v) if np.isfinite(v) else "" for v in arrays["cov"][i]]
            recs = []
            for j in np.flatnonzero(arrays["om"][i]):
                miss = bool(arrays["mi"][i, j])
                recs.append((arrays["ot"][i, j], 0, [
                    pid, _fmt(arrays["ot"][i, j]), "0",
                    "" if miss else _fmt(arrays["ov"][i, j]),
                    cohort.observable_names[int(arrays["ok"][i, j])], "", "", "",
                    "1" if miss else "0"]))
            for j in np.flatnonzero(arrays["dm"][i]):
                recs.append((arrays["dt"][i, j], 1, [
                    pid, _fmt(arrays["dt"][i, j]), "1", "", "", _fmt(arrays["da"][i, j]),
                    _fmt(arrays["dr"][i, j]),
                    model.dose_targets[int(arrays["dg"][i, j])].name, "1"]))
            recs.sort(key=lambda r: (r[0], r[1]))
            for _, _, rec in recs:
                w.writerow(rec + cov)

