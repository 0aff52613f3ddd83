"""NONMEM-style event tables (CSV) to and from `Cohort`.

Columns (DESIGN.md, event-table contract): ID, TIME, EVID (0 observation, 1 dose), DV,
OBS, AMT, RATE, CMT, MDV, and any other column is a covariate, constant within an ID.
Empty cells and "." are missing values. TIME, DV, AMT and RATE may carry their unit in the
header, `TIME [h]` or `DV (ug/mL)`: values are converted to the model's units, and a unit
that cannot be converted to the model's is an error. At equal times, observation records see the
state before a dose (trough samples); `write_event_table` writes observations first.

`read_event_table` checks every row and raises one `EventTableError` that lists each bad
row as `file:line: reason`; nothing is silently dropped.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from .._atomic import atomic_open
from ..models.base import MechanisticModel
from ..schedule import Schedule
from ..errors import InputError
from .cohort import Cohort
from .pseudonym import pseudonymise_id

STANDARD = ("ID", "TIME", "EVID", "DV", "OBS", "AMT", "RATE", "CMT", "MDV")
REQUIRED = ("ID", "TIME")
MISSING = ("", ".")
MAX_REPORTED = 50
MAX_LISTED = 10
TIME_UNITS_S = {"s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
"""Seconds per time unit: the units a table (`data.time_unit`) or a model may declare."""
UNIT_COLUMNS = ("TIME", "DV", "AMT", "RATE")
"""The standard columns whose header may carry a unit."""
_UNIT_HEADER = re.compile(r"^(?P<name>[^\[\]()]+?)\s*[\[(]\s*(?P<unit>[^\[\]()]*?)\s*[\])]$")
_MICRO = ("u", "\u00b5", "\u03bc", "mc")
_SCALES: dict[str, tuple[str, float]] = {
    "kg": ("mass", 1e3), "g": ("mass", 1.0), "mg": ("mass", 1e-3), "ng": ("mass", 1e-9),
    "mol": ("amount of substance", 1.0), "mmol": ("amount of substance", 1e-3),
    "nmol": ("amount of substance", 1e-9), "pmol": ("amount of substance", 1e-12),
    "U": ("insulin units", 1.0), "IU": ("insulin units", 1.0), "mU": ("insulin units", 1e-3),
    "mIU": ("insulin units", 1e-3),
    "L": ("volume", 1.0), "dL": ("volume", 0.1), "mL": ("volume", 1e-3),
}
for _p in _MICRO:
    _SCALES[f"{_p}g"] = ("mass", 1e-6)
    _SCALES[f"{_p}mol"] = ("amount of substance", 1e-6)
    _SCALES[f"{_p}L"] = ("volume", 1e-6)
    _SCALES[f"{_p}U"] = ("insulin units", 1e-6)
_SCALES.update({u: ("time", s) for u, s in TIME_UNITS_S.items()})
CATEGORICAL = ("error", "ignore", "one_hot")
MAX_ABS_VALUE = 1e12
"""Default largest |value| accepted in a numeric cell (`data.max_abs_value`)."""
BOM = b"\xef\xbb\xbf"
logger = logging.getLogger(__name__)


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


class DataFileNotFoundError(InputError, FileNotFoundError):
    """A data file (event table, cohort file) that does not exist."""


def _parse_unit(unit: str) -> tuple[tuple[str, ...], float] | None:
    """(dimensions, scale to the base units) of `A` or `A/B`, or None if unknown."""
    parts = unit.replace(" ", "").split("/")
    if len(parts) > 2 or not all(parts):
        return None
    known = [_SCALES.get(q) for q in parts]
    if None in known:
        return None
    if len(known) == 1:
        return (known[0][0],), known[0][1]
    return (known[0][0], known[1][0]), known[0][1] / known[1][1]


def unit_factor(data_unit: str, model_unit: str) -> float | None:
    """The factor that converts a value in `data_unit` to `model_unit`, or None when the
    two are not the same kind of quantity or a unit is unknown.

    Units are a simple unit or a ratio `A/B` of them: mass (kg, g, mg, ug, ng), amount of
    substance (mol ... pmol), insulin units (U, IU, mU, mIU, uU), volume (L, dL, mL, uL) and
    time (s, min, h, d); `u`, `mc` and the micro sign all mean micro. Molar and mass
    units do not convert into each other (that needs the molar mass).
    """
    if data_unit.replace(" ", "") == model_unit.replace(" ", ""):
        return 1.0
    a, b = _parse_unit(data_unit), _parse_unit(model_unit)
    if a is None or b is None or a[0] != b[0]:
        return None
    return a[1] / b[1]


def _header_units(names: list[str], declared: Mapping[str, str] | None
                  ) -> tuple[list[str], dict[str, str], list[str]]:
    """Header names with their units split off, the units of the standard columns
    (header, else `declared`), and the problems found."""
    out, units, problems = [], {}, []
    for i, n in enumerate(names):
        m = _UNIT_HEADER.match(n)
        if m and m.group("name").strip().upper() in STANDARD:
            base, unit = m.group("name").strip(), m.group("unit")
            if base.upper() not in UNIT_COLUMNS:
                problems.append(f"line 1: column {n!r} (column {i + 1}) carries a unit; only "
                                f"{', '.join(UNIT_COLUMNS)} can")
            elif not unit:
                problems.append(f"line 1: column {n!r} (column {i + 1}) has empty unit "
                                "brackets")
            else:
                units[base.upper()] = unit
            n = base
        out.append(n)
    for col, unit in (declared or {}).items():
        col = col.upper()
        if col not in UNIT_COLUMNS:
            problems.append(f"data.units: {col!r} is not a column with a unit; expected "
                            f"one of {', '.join(UNIT_COLUMNS)}")
        elif col in units and unit_factor(units[col], unit) != 1.0:
            problems.append(f"line 1: the header gives {col} in {units[col]!r} but data.units "
                            f"says {unit!r}")
        else:
            units.setdefault(col, unit)
    return out, units, problems


def time_factor(data_unit: str | None, model_unit: str) -> float:
    """The factor that converts times in `data_unit` to `model_unit` (1 when `data_unit`
    is None: the data are in the model's unit). InputError naming `data.time_unit` for a
    unit other than s, min, h or d."""
    if data_unit is None:
        return 1.0
    for unit, owner in ((data_unit, "data.time_unit"), (model_unit, "the model's time unit")):
        if unit not in TIME_UNITS_S:
            raise InputError(f"{owner} {unit!r} is not a known time unit; expected one of "
                             f"{', '.join(TIME_UNITS_S)}")
    return TIME_UNITS_S[data_unit] / TIME_UNITS_S[model_unit]


def read_data_file(path: str, what: str = "event table") -> bytes:
    """The bytes of a data file, with an InputError naming it when it is missing, a
    folder or unreadable."""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise DataFileNotFoundError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder; expected a file ({what})") from None
    except PermissionError:
        raise InputError(f"{path}: no permission to read the {what}") from None


def _decode(path: str, data: bytes) -> str:
    """UTF-8 text (a leading byte-order mark dropped), or an EventTableError naming the
    line and byte offset of the first byte that is not UTF-8."""
    skip = len(BOM) if data.startswith(BOM) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        off = e.start + skip
        line = data.count(b"\n", 0, off) + 1
        col = off - (data.rfind(b"\n", 0, off) + 1) + 1
        raise EventTableError(path, [
            f"{path}:{line}: byte 0x{data[off]:02x} at byte offset {off} (byte {col} of the "
            "line) is not UTF-8; save the table as UTF-8 (it may be Latin-1 or Windows-1252 "
            "text)"]) from None


def _number(text: str) -> float | None:
    text = text.strip()
    if text in MISSING:
        return None
    return float(text)


def _is_text(text: str) -> bool:
    """True for a cell that is neither missing nor a number."""
    try:
        _number(text)
    except ValueError:
        return True
    return False


def _show(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "empty"
    return f"{v:g}" if isinstance(v, float) else repr(v)


def read_event_table(
    path: str | os.PathLike, model: MechanisticModel, *, dtype=None,
    ignore_columns: Sequence[str] = (), categorical: str = "error",
    max_abs_value: float = MAX_ABS_VALUE, time_unit: str | None = None,
    require_observations: bool = True, pseudonym_key: bytes | None = None,
    notes: dict | None = None, id_map: dict[str, str] | None = None,
    units: Mapping[str, str] | None = None,
) -> Cohort:
    """Read a CSV event table into a `Cohort` for `model`.

    The file is UTF-8 (a byte-order mark is accepted) and comma-separated, with one header
    row whose column names are unique regardless of case. OBS and CMT names are mapped onto
    `model.observables` and `model.dose_targets` (a CMT may also name the target's state).
    OBS may be omitted when the model has one observable, CMT when it has one dose target.
    Without an EVID column, rows with an AMT are doses and the others observations, and
    (with no MDV column either) an observation with an empty DV is a record without a value.
    Every bad row is reported, by line, in one `EventTableError`.

    Args:
        ignore_columns: columns that are read as neither standard columns nor covariates
            (e.g. the PRED columns of a run's predictions.csv); each must exist.
        categorical: what to do with covariate columns holding text: "error" (one problem
            per column), "ignore" (drop them) or "one_hot" (a 0/1 covariate `COL=value` per
            distinct value, sorted; empty cells stay missing).
        max_abs_value: TIME, DV, AMT, RATE and covariates beyond this magnitude are errors.
        time_unit: the unit of TIME in the file (s, min, h, d); TIME and RATE (amount per
            time unit) are converted to `model.time_unit`. None: the header's unit of
            TIME (`TIME [h]`), else the model's unit.
        units: units of the columns TIME, DV, AMT and RATE where the header gives none
            (e.g. {"DV": "ug/mL"}); a header unit must agree. DV is converted to each
            observable's unit, AMT to each dose target's, RATE to the target's unit per
            model time unit (without a unit of its own, RATE is in AMT's unit per TIME's
            unit); a unit that does not convert (`unit_factor`) is an error naming the
            first row that needs it.
        require_observations: a patient without any observation that has a value is an
            error (False for pure simulation).
        pseudonym_key: when given, each ID is replaced by `pseudonymise_id(ID, key)` and no
            message names a raw ID (nor quotes the text of a text covariate, which might
            hold identifying data).
        notes: when a dict, it receives what the import did besides reading: the columns
            ignored or one-hot encoded, the time conversion, the number of pseudonymised
            IDs (no raw IDs; fit for a log).
        id_map: when a dict (and `pseudonym_key` is given), it receives {raw ID: pseudonym}.
    """
    path = str(path)
    dtype = dtype or jnp.result_type(float)
    if categorical not in CATEGORICAL:
        raise InputError(f"data.categorical {categorical!r}: expected one of "
                         f"{', '.join(CATEGORICAL)}")
    text = _decode(path, read_data_file(path))
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    rows = [(reader.line_num, row) for row in reader]
    if header is None or not [h for h in header if h.strip()]:
        raise EventTableError(path, ["line 1: the file is empty; expected a header row "
                                     f"with at least {', '.join(REQUIRED)}"])
    names, col_units, problems = _header_units([h.strip() for h in header], units)
    if problems:
        raise EventTableError(path, problems)
    if "TIME" in col_units:
        if col_units["TIME"] not in TIME_UNITS_S:
            raise EventTableError(path, [
                f"line 1: TIME unit {col_units['TIME']!r} is not a time unit; expected one of "
                f"{', '.join(TIME_UNITS_S)}"])
        if time_unit is not None and time_unit != col_units["TIME"]:
            raise EventTableError(path, [
                f"line 1: the header gives TIME in {col_units['TIME']!r} but data.time_unit "
                f"says {time_unit!r}"])
        time_unit = col_units["TIME"]
    factor = time_factor(time_unit, model.time_unit)
    if len(names) == 1:
        for sep, word in ((";", ";"), ("\t", "tab")):
            if sep in header[0]:
                raise EventTableError(path, [
                    f"line 1: the file seems to be {word}-delimited; event tables are "
                    f"comma-separated (header: {header[0][:80]!r})"])
    ignored = {c.strip() for c in ignore_columns}
    for c in sorted(ignored):
        if c not in names:
            problems.append(f"line 1: ignored column {c!r} is not in the header "
                            f"({', '.join(names)})")
    kept = [(i, n) for i, n in enumerate(names) if n and n not in ignored]
    by_name: dict[str, list[tuple[int, str]]] = {}
    for i, n in kept:
        by_name.setdefault(n.upper(), []).append((i, n))
    for same in by_name.values():
        if len(same) > 1:
            cols = " and ".join(f"{n} (column {i + 1})" for i, n in same)
            problems.append(f"line 1: duplicate columns {cols}; column names must be unique "
                            "(case does not matter): remove or rename all but one")
    if problems:
        raise EventTableError(path, problems)
    canon = {n.upper(): i for i, n in kept if n.upper() in STANDARD}
    missing = [c for c in REQUIRED if c not in canon]
    if missing:
        also = f"; ignored: {', '.join(sorted(ignored))}" if ignored else ""
        raise EventTableError(path, [f"line 1: missing required column(s) {', '.join(missing)} "
                                     f"(header: {', '.join(names)}{also})"])
    if not rows:
        raise EventTableError(path, ["line 2: the file has a header but no rows"])
    cov_cols = [(i, n) for i, n in kept if n.upper() not in STANDARD]
    unnamed = [i for i, n in enumerate(names) if not n]
    texts: dict[int, dict] = {}
    for line, row in rows:
        if len(row) != len(names):
            continue
        for i in unnamed:
            if row[i].strip() not in MISSING:
                problems.append(f"{path}:{line}: column {i + 1} has no name in the header but "
                                f"holds {row[i].strip()!r}")
        for i, name in cov_cols:
            cell_text = row[i].strip()
            if _is_text(cell_text):
                info = texts.setdefault(i, {"line": line, "values": {}, "rows": 0})
                info["values"].setdefault(cell_text, line)
                info["rows"] += 1
    one_hot: dict[int, list[str]] = {}
    dropped: list[str] = []
    for i, name in cov_cols:
        if i not in texts:
            continue
        info = texts[i]
        if categorical == "error":
            examples = ("" if pseudonym_key is not None else
                        ", ".join(repr(v) for v in list(info["values"])[:4]) + "; ")
            problems.append(
                f"{path}:{info['line']}: covariate {name} holds text ({examples}"
                f"{len(info['values'])} distinct value(s) in {info['rows']} row(s)); covariates "
                f"must be numbers: leave it out with `data.ignore_columns: [{name}]`, or set "
                "`data.categorical: one_hot` (0/1 covariates) or `ignore` (drop text columns)")
        elif categorical == "ignore":
            dropped.append(name)
        else:
            one_hot[i] = sorted(info["values"])
    if categorical == "ignore":
        cov_cols = [(i, n) for i, n in cov_cols if i not in texts]
    n_obs_names = len(model.observables)
    target_by_name = {d.name: j for j, d in enumerate(model.dose_targets)}
    for j, d in enumerate(model.dose_targets):
        target_by_name.setdefault(d.state, j)
    patients: OrderedDict[str, dict] = OrderedDict()
    seen_rows: dict[tuple, int] = {}
    pseudonyms: dict[str, str] = {}
    owners: dict[str, tuple[str, int]] = {}

    def cell(row, col):
        i = canon.get(col)
        return row[i].strip() if i is not None and i < len(row) else ""

    def label(pid: str) -> str:
        return pseudonyms.get(pid, pid) if pseudonym_key is not None else pid

    unit_factors: dict[tuple[str, int], float | None] = {}

    def converted(col: str, value: float, index: int, line: int) -> float | None:
        """`value` of column `col` in the model's unit for observable/target `index`;
        None (and one problem per column and index) when the units do not convert."""
        unit = col_units.get(col if col != "RATE" or "RATE" in col_units else "AMT")
        if unit is None:
            return value
        if col == "DV":
            obs = model.observables[index]
            want, what = obs.unit, f"observable {obs.name}"
        else:
            target = model.dose_targets[index]
            want, what = target.unit, f"dose target {target.name}"
            if col == "RATE":
                if "RATE" in col_units:
                    want = f"{target.unit}/{model.time_unit}"
                else:  # RATE in AMT's unit per TIME's unit: the time part follows TIME
                    col = "AMT"
        key = (col, index)
        if key not in unit_factors:
            f = unit_factor(unit, want)
            unit_factors[key] = f
            if f is None:
                problems.append(f"{path}:{line}: {col} is in {unit!r} but {what} of "
                                f"{type(model).__name__} is in {want!r}, which {unit!r} does "
                                "not convert to")
        f = unit_factors[key]
        if f is None:
            return None
        if col == "RATE" and "RATE" in col_units:
            return value * f * factor  # _to_cohort divides rates by the time factor
        return value * f

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
        if pseudonym_key is not None and pid not in pseudonyms:
            pseudo = pseudonymise_id(pid, pseudonym_key)
            if pseudo in owners:
                problems.append(f"{path}:{line}: this row's ID has the same pseudonym as the "
                                f"different ID of line {owners[pseudo][1]}; use another "
                                "pseudonymisation key")
                continue
            pseudonyms[pid] = pseudo
            owners[pseudo] = (pid, line)
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
            if v is not None and abs(v) > max_abs_value:
                bad.append(f"{col} {text} is beyond the plausible magnitude "
                           f"{max_abs_value:g} (data.max_abs_value)")
                continue
            values[col] = v
        cov = []
        for i, name in cov_cols:
            text = row[i].strip()
            if i in texts:
                cov.append(None if text in MISSING else text)
                continue
            v = _number(text)
            if v is not None and not math.isfinite(v):
                bad.append(f"covariate {name} is {text!r}; expected a finite number "
                           "(leave the cell empty for a missing value)")
            elif v is not None and abs(v) > max_abs_value:
                bad.append(f"covariate {name} {text} is beyond the plausible magnitude "
                           f"{max_abs_value:g} (data.max_abs_value)")
            cov.append(math.nan if v is None else v)
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
        if values.get("MDV") not in (None, 0.0, 1.0):
            problems.append(f"{path}:{line}: MDV {cell(row, 'MDV')!r}; expected 0 (DV "
                            "present) or 1 (DV missing)")
            continue
        p = patients.setdefault(pid, {"obs": [], "doses": [], "cov": None, "cov_line": line,
                                      "first_line": line, "last_t": -math.inf,
                                      "last_line": line})
        if t < p["last_t"]:
            problems.append(f"{path}:{line}: TIME {t:g} is before the previous row of ID "
                            f"{label(pid)} (line {p['last_line']}, TIME {p['last_t']:g}); "
                            "times must not decrease within an ID")
            continue
        p["last_t"], p["last_line"] = t, line
        if p["cov"] is None:
            p["cov"] = cov
        else:
            for (i, name), a, b in zip(cov_cols, p["cov"], cov):
                if i in texts and categorical == "error":
                    continue
                if not (a == b or (isinstance(a, float) and isinstance(b, float)
                                   and math.isnan(a) and math.isnan(b))):
                    problems.append(f"{path}:{line}: covariate {name} changes within ID "
                                    f"{label(pid)} ({_show(a)} at line {p['cov_line']}, "
                                    f"{_show(b)} here); covariates must be constant per "
                                    "patient")
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
            if dv is not None and not mdv:
                dv = converted("DV", dv, k, line)
                if dv is None:
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
            amt, rate = converted("AMT", amt, j, line), converted("RATE", rate, j, line)
            if amt is None or rate is None:
                continue
            p["doses"].append((t, amt, rate, j))
    if not problems and require_observations:
        empty = [pid for pid, p in patients.items()
                 if not any(not miss for *_, miss in p["obs"])]
        if empty:
            shown = empty[:MAX_LISTED]
            who = (f"the patients whose rows start at line(s) "
                   f"{', '.join(str(patients[pid]['first_line']) for pid in shown)}"
                   if pseudonym_key is not None else f"ID(s) {', '.join(shown)}")
            more = f" and {len(empty) - len(shown)} more" if len(empty) > len(shown) else ""
            problems.append(
                f"{path}: {len(empty)} patient(s) without any observation with a value "
                f"(an EVID=0 row with a DV and MDV=0), which a fit cannot use: {who}{more}; "
                "remove them, or simulate them (hybrid-twin simulate)")
    if problems:
        raise EventTableError(path, problems)
    cov_names, cov_rows = _expand_covariates(cov_cols, one_hot, patients)
    ids = tuple(label(pid) for pid in patients)
    cohort = _to_cohort(patients, ids, model, cov_names, cov_rows, dtype, factor)
    if pseudonym_key is not None and id_map is not None:
        id_map.update((pid, pseudonyms[pid]) for pid in patients)
    done = {}
    if ignored:
        done["ignored_columns"] = sorted(ignored)
    if dropped:
        done["categorical_ignored"] = dropped
    if one_hot:
        done["one_hot"] = {dict(cov_cols)[i]: v for i, v in one_hot.items()}
    if factor != 1.0:
        done["time_unit"] = {"data": time_unit, "model": model.time_unit, "factor": factor}
    if col_units:
        done["units"] = dict(col_units)
    if pseudonym_key is not None:
        done["pseudonymised"] = len(patients)
    if done:
        logger.info("%s: %s", path, done)
    if notes is not None:
        notes.update(done)
    return cohort


def _expand_covariates(cov_cols, one_hot, patients) -> tuple[list[str], list[list[float]]]:
    """Covariate names and per-patient rows, each one-hot column expanded into 0/1
    columns `COL=value` (NaN where the patient's cell is empty)."""
    names: list[str] = []
    for i, name in cov_cols:
        names += [f"{name}={v}" for v in one_hot[i]] if i in one_hot else [name]
    rows = []
    for p in patients.values():
        row: list[float] = []
        for (i, _), v in zip(cov_cols, p["cov"]):
            if i in one_hot:
                row += [math.nan if v is None else float(v == c) for c in one_hot[i]]
            else:
                row.append(v)
        rows.append(row)
    return names, rows


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


def _to_cohort(patients, ids, model, cov_names, cov_rows, dtype, factor=1.0) -> Cohort:
    """Padded arrays of the parsed patients; times multiplied and rates divided by
    `factor` (data time unit -> model time unit)."""
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
    cov = np.asarray(cov_rows, float).reshape(n, len(cov_names))
    for i, p in enumerate(patients.values()):
        for j, (t, v, k, miss) in enumerate(p["obs"]):
            obs_t[i, j], obs_v[i, j], obs_k[i, j], obs_miss[i, j] = t, v, k, miss
        obs_mask[i, :len(p["obs"])] = True
        if p["obs"]:
            obs_t[i, len(p["obs"]):] = p["obs"][-1][0]
        for j, row in enumerate(p["doses"]):
            dose[:, i, j] = row
        dose_mask[i, :len(p["doses"])] = True
    if factor != 1.0:
        obs_t *= factor
        dose[0] *= factor
        dose[2] /= factor
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
        covariates=jnp.asarray(cov, dtype), ids=ids,
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

