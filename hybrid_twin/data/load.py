"""The configured data as a `Cohort`: event table, HDF5 cohort file or virtual cohort.

    cohort, vc, notes = load_cohort(cfg.data, model, options=solver_options(cfg),
                                    config_dir=config_file.parent, run_dir=run_dir)
    fingerprint = data_fingerprint(cfg.data, config_dir=config_file.parent)

`load_cohort` reads `data` (the `data:` block of an experiment config) with every check of
the readers, the options of the block (`time_unit`, `ignore_columns`, `categorical`,
`max_abs_value`) and pseudonymisation (`pseudonymise`, the key from
`pseudonym_key_file` or the environment variable `pseudonym_key_env`, the map written to
`pseudonym_map` on request). Relative paths are resolved against `config_dir` (a config
from `hybrid_twin.config.load_config` holds them absolute already). Every rejection is an
`InputError` naming the config key or the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..models.base import MechanisticModel
from .cohort import Cohort
from .events import (
    MAX_ABS_VALUE,
    MAX_LISTED,
    DataFileNotFoundError,
    read_event_table,
    time_factor,
)
from .hdf5 import read_cohort_h5
from .pseudonym import load_pseudonym_key, pseudonymise_ids, write_pseudonym_map
from .virtual import ScheduleSpec, VirtualCohort, virtual_cohort

SOURCES = ("csv", "hdf5", "virtual")
CSV_ONLY = {"ignore_columns": [], "categorical": "error", "max_abs_value": MAX_ABS_VALUE}
"""`data` keys that only event tables use, with their defaults."""
PSEUDONYM_ONLY = ("pseudonym_key_file", "pseudonym_map")
"""`data` keys that only pseudonymisation uses."""


def _option(data_cfg, name: str, default: Any) -> Any:
    return getattr(data_cfg, name, default)


def _resolve(path: str | os.PathLike, config_dir: str | os.PathLike | None) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute() and config_dir is not None:
        p = Path(config_dir) / p
    return p


def data_path(data_cfg, config_dir: str | os.PathLike | None = None) -> Path:
    """The data file of a csv or hdf5 source (`data.path`, relative paths resolved against
    `config_dir`); InputError naming `data.path` when it is unset or does not exist."""
    if not data_cfg.path:
        raise InputError(f"data.path is required when data.source is {data_cfg.source!r}")
    p = _resolve(data_cfg.path, config_dir)
    if not p.exists():
        where = f" (relative to {config_dir})" if config_dir is not None and \
            not Path(data_cfg.path).expanduser().is_absolute() else ""
        raise DataFileNotFoundError(f"data.path: {p} does not exist{where}")
    return p


def data_fingerprint(data_cfg, config_dir: str | os.PathLike | None = None) -> str:
    """sha256 (hex) of the data a config reads: the bytes of the csv or hdf5 file, or the
    virtual cohort's specification (its source and `data.virtual` block)."""
    h = hashlib.sha256()
    if data_cfg.source == "virtual":
        v = data_cfg.virtual
        spec = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
        h.update(json.dumps({"source": "virtual", "virtual": spec}, sort_keys=True,
                            default=repr).encode("utf-8"))
        return h.hexdigest()
    path = data_path(data_cfg, config_dir)
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except IsADirectoryError:
        raise InputError(f"data.path: {path} is a folder; expected a data file") from None
    except PermissionError:
        raise InputError(f"data.path: no permission to read {path}") from None
    return h.hexdigest()


def check_data_options(data_cfg) -> None:
    """InputError for a `data` option that would have no effect: an event-table option
    (`CSV_ONLY`) changed for another source, or a pseudonymisation setting
    (`PSEUDONYM_ONLY`) without `pseudonymise`."""
    source = data_cfg.source
    if source != "csv":
        for name, default in CSV_ONLY.items():
            if _option(data_cfg, name, default) != default:
                raise InputError(f"data.{name}: only csv event tables use it, and data.source "
                                 f"is {source!r}; remove data.{name}")
    if not _option(data_cfg, "pseudonymise", False):
        for name in PSEUDONYM_ONLY:
            if _option(data_cfg, name, None) is not None:
                raise InputError(f"data.{name} is set but data.pseudonymise is false; set "
                                 f"data.pseudonymise: true or remove data.{name}")


def _map_path(data_cfg, config_dir, run_dir) -> Path | None:
    """Where to write the pseudonym map (None: not requested), refused inside `run_dir`."""
    raw = _option(data_cfg, "pseudonym_map", None)
    if raw is None:
        return None
    path = _resolve(raw, config_dir).resolve()
    if run_dir is not None:
        run = Path(run_dir).resolve()
        if path == run or run in path.parents:
            raise InputError(f"data.pseudonym_map: {path} lies inside the run directory "
                             f"{run}; the map holds the raw IDs and must be kept outside it")
    return path


def _check_observations(cohort: Cohort, where: str) -> None:
    """InputError when a patient has no observation with a value (nothing to fit)."""
    empty = np.flatnonzero(~np.asarray(cohort.data_mask).any(axis=1))
    if empty.size:
        shown = ", ".join(f"{i} (ID {cohort.ids[i]})" for i in empty[:MAX_LISTED])
        more = f" and {empty.size - MAX_LISTED} more" if empty.size > MAX_LISTED else ""
        raise InputError(f"{where}: {empty.size} patient(s) without any observation with a "
                         f"value, which a fit cannot use: patient(s) {shown}{more}; remove "
                         "them, or simulate them (hybrid-twin simulate)")


def load_cohort(
    data_cfg, model: MechanisticModel, *, options=None, for_simulation: bool = False,
    config_dir: str | os.PathLike | None = None, run_dir: str | os.PathLike | None = None,
    dtype=None, truth: MechanisticModel | None = None,
) -> tuple[Cohort, VirtualCohort | None, dict]:
    """The cohort of a config's `data` block for `model`.

    Args:
        data_cfg: the `data` config (`source` csv | hdf5 | virtual, `path`, `virtual`, and
            the options `time_unit`, `units`, `ignore_columns`, `categorical`, `max_abs_value`,
            `pseudonymise`, `pseudonym_key_env`, `pseudonym_key_file`, `pseudonym_map`).
        model: the model the data are for (a virtual cohort is simulated with it unless
            `truth` is given).
        truth: the model that simulates a virtual cohort (default `model`); the cohort is
            then expressed in `model`'s observables and dose targets, matched by name
            (`Cohort.for_model`).
        options: `SolverOptions` for simulating a virtual cohort.
        for_simulation: patients without observations are allowed (they are errors for
            fitting).
        config_dir: folder that relative paths are resolved against (the config file's).
        run_dir: the run directory, inside which the pseudonym map may not be written.
        dtype: float dtype of the cohort's arrays (default: JAX's default float).

    Returns:
        (cohort, the VirtualCohort with its ground truth for a virtual source else None,
        notes): notes say what the import did besides reading (source, patients, columns
        ignored or one-hot encoded, time conversion, number of pseudonymised IDs, where
        the map was written), with no raw ID, for the run's log.

    Raises `InputError` naming the config key or the file for anything unusable,
    including options that would have no effect (`check_data_options`).
    """
    source = data_cfg.source
    if source not in SOURCES:
        raise InputError(f"data.source {source!r}: expected one of {', '.join(SOURCES)}")
    check_data_options(data_cfg)
    key = None
    if _option(data_cfg, "pseudonymise", False):
        key_file = _option(data_cfg, "pseudonym_key_file", None)
        key = load_pseudonym_key(
            _option(data_cfg, "pseudonym_key_env", "HYBRID_TWIN_PSEUDONYM_KEY"),
            None if key_file is None else _resolve(key_file, config_dir))
    map_path = _map_path(data_cfg, config_dir, run_dir)
    id_map: dict[str, str] | None = {} if map_path is not None else None
    time_unit = _option(data_cfg, "time_unit", None)
    notes: dict[str, Any] = {"source": source}
    if source != "csv":
        if time_unit is not None and time_factor(time_unit, model.time_unit) != 1.0:
            raise InputError(f"data.time_unit {time_unit!r}: only csv event tables are "
                             f"converted; a {source} cohort must be in the model's time unit "
                             f"({model.time_unit})")
        if _option(data_cfg, "units", None):
            raise InputError(f"data.units: only csv event tables are converted; a {source} "
                             "cohort must be in the model's units")
    vc = None
    if source == "csv":
        path = data_path(data_cfg, config_dir)
        cohort = read_event_table(
            path, model, dtype=dtype,
            ignore_columns=tuple(_option(data_cfg, "ignore_columns", [])),
            categorical=_option(data_cfg, "categorical", "error"),
            max_abs_value=_option(data_cfg, "max_abs_value", MAX_ABS_VALUE),
            time_unit=time_unit, units=dict(_option(data_cfg, "units", None) or {}),
            require_observations=not for_simulation, pseudonym_key=key, notes=notes,
            id_map=id_map)
    elif source == "hdf5":
        path = data_path(data_cfg, config_dir)
        cohort = read_cohort_h5(path, dtype=dtype, model=model, pseudonym_key=key,
                                id_map=id_map)
        if not for_simulation:
            _check_observations(cohort, str(path))
    else:
        v = data_cfg.virtual
        spec = ScheduleSpec(doses=tuple(v.doses), obs_every=v.obs_every, obs_start=v.obs_start,
                            horizon=v.horizon, repeat_every=getattr(v, "repeat_every", None),
                            repeat_count=getattr(v, "repeat_count", 1),
                            observables=tuple(v.observables) if v.observables else None)
        vc = virtual_cohort(truth or model, v.n, schedule=spec, noise=v.noise, seed=v.seed,
                            options=options)
        cohort = vc.cohort
        if truth is not None and truth is not model:
            cohort = cohort.for_model(truth, model, where="data.virtual.model")
            vc = dataclasses.replace(vc, cohort=cohort)
        if key is not None:
            mapping = pseudonymise_ids(cohort.ids, key)
            cohort = dataclasses.replace(cohort, ids=tuple(mapping[i] for i in cohort.ids))
            vc = dataclasses.replace(vc, cohort=cohort)
            if id_map is not None:
                id_map.update(mapping)
        if not for_simulation:
            _check_observations(cohort, "data.virtual")
    if key is not None:
        notes["pseudonymised"] = cohort.n_patients
    if map_path is not None:
        write_pseudonym_map(map_path, id_map)
        notes["pseudonym_map"] = str(map_path)
    notes["patients"] = cohort.n_patients
    return cohort, vc, notes
