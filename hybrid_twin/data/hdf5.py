"""HDF5 cohort store (h5py): chunked, compressed, checksummed, atomically written.

Layout (schema version `SCHEMA_VERSION`): one dataset per `Cohort` array, patient axis
first, chunked along it, gzip-compressed with Fletcher-32 checksums; patient ids as UTF-8
strings; attributes hold the schema version, observable and covariate names, the
observables' units, the model's time unit and input interpolation. Reading by patient
slice (`read_cohort_h5(path, start, stop)`, `iter_cohort_h5`) keeps memory bounded by the
slice, so cohorts larger than memory stream through prediction.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import h5py
import jax.numpy as jnp
import numpy as np

from ..schedule import Schedule
from .cohort import Cohort

SCHEMA_VERSION = 1
FORMAT = "hybrid_twin.cohort"
ARRAYS = ("obs_times", "obs_values", "obs_index", "obs_mask", "obs_missing", "covariates")
SCHEDULE_ARRAYS = ("dose_times", "dose_amounts", "dose_rates", "dose_targets", "dose_mask",
                   "input_times", "input_values", "input_mask")


class CohortFileError(ValueError):
    """An HDF5 file that is not a readable hybrid_twin cohort of this schema version."""


def write_cohort_h5(
    cohort: Cohort,
    path: str | os.PathLike,
    *,
    observable_units: tuple[str, ...] = (),
    time_unit: str = "",
    chunk_patients: int = 4096,
    compression_level: int = 4,
) -> None:
    """Write `cohort` to `path` atomically (temporary file in the same folder, then rename).

    An interrupted write leaves any previous file at `path` untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            _write_into(f, cohort, observable_units, time_unit, chunk_patients,
                        compression_level)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_into(f, cohort, observable_units, time_unit, chunk_patients, level):
    n = cohort.n_patients
    f.attrs["format"] = FORMAT
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["n_patients"] = n
    f.attrs["observable_names"] = list(cohort.observable_names)
    f.attrs["observable_units"] = list(observable_units)
    f.attrs["covariate_names"] = list(cohort.covariate_names)
    f.attrs["time_unit"] = time_unit
    f.attrs["interpolation"] = cohort.schedule.interpolation

    def put(name, value):
        value = np.asarray(value)
        chunks = (max(1, min(chunk_patients, n)),) + value.shape[1:] if n else None
        f.create_dataset(name, data=value, chunks=chunks if value.size else None,
                         compression="gzip" if value.size else None,
                         compression_opts=level if value.size else None,
                         fletcher32=bool(value.size))

    for name in ARRAYS:
        put(name, getattr(cohort, name))
    for name in SCHEDULE_ARRAYS:
        put(f"schedule/{name}", getattr(cohort.schedule, name))
    f.create_dataset("ids", data=np.array(cohort.ids, dtype=h5py.string_dtype("utf-8")))


def _open(path: str | os.PathLike) -> h5py.File:
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"cohort file not found: {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CohortFileError(
            f"{path}: not a readable HDF5 file (truncated or corrupted?): {e}") from None
    try:
        fmt = f.attrs.get("format")
        version = f.attrs.get("schema_version")
        if fmt != FORMAT:
            raise CohortFileError(f"{path}: not a hybrid_twin cohort file (format attribute "
                                  f"{fmt!r}, expected {FORMAT!r})")
        if version != SCHEMA_VERSION:
            raise CohortFileError(f"{path}: cohort schema version {version}, this hybrid_twin "
                                  f"reads version {SCHEMA_VERSION}")
        n = int(f.attrs["n_patients"])
        for name in (*ARRAYS, *(f"schedule/{s}" for s in SCHEDULE_ARRAYS), "ids"):
            if name not in f:
                raise CohortFileError(f"{path}: dataset {name!r} is missing")
            if f[name].shape[0] != n:
                raise CohortFileError(f"{path}: dataset {name!r} has {f[name].shape[0]} "
                                      f"patients, the file declares {n}")
    except BaseException:
        f.close()
        raise
    return f


def cohort_h5_size(path: str | os.PathLike) -> int:
    """Number of patients in a cohort file (reads only its attributes)."""
    with _open(path) as f:
        return int(f.attrs["n_patients"])


def read_cohort_h5(
    path: str | os.PathLike, start: int = 0, stop: int | None = None, *, dtype=None
) -> Cohort:
    """Read patients `start:stop` (all by default) of a cohort file."""
    dtype = dtype or jnp.result_type(float)
    with _open(path) as f:
        n = int(f.attrs["n_patients"])
        stop = n if stop is None else min(stop, n)
        if not 0 <= start <= stop:
            raise IndexError(f"{path}: patient slice {start}:{stop} outside 0:{n}")
        sl = slice(start, stop)
        try:
            data = {name: f[name][sl] for name in ARRAYS}
            sched = {name: f[f"schedule/{name}"][sl] for name in SCHEDULE_ARRAYS}
            ids = tuple(s.decode() if isinstance(s, bytes) else str(s) for s in f["ids"][sl])
        except OSError as e:
            raise CohortFileError(f"{path}: corrupted data in patients {start}:{stop}: {e}") from None
        interpolation = str(f.attrs["interpolation"])
        obs_names = tuple(str(x) for x in f.attrs["observable_names"])
        cov_names = tuple(str(x) for x in f.attrs["covariate_names"])

    def cast(x):
        return jnp.asarray(x, dtype) if np.issubdtype(x.dtype, np.floating) else jnp.asarray(x)

    schedule = Schedule(**{k: cast(v) for k, v in sched.items()}, interpolation=interpolation)
    return Cohort(**{k: cast(v) for k, v in data.items()}, schedule=schedule, ids=ids,
                  observable_names=obs_names, covariate_names=cov_names)


def iter_cohort_h5(
    path: str | os.PathLike, batch_patients: int, *, dtype=None
) -> Iterator[Cohort]:
    """Stream a cohort file in slices of `batch_patients` patients."""
    if batch_patients < 1:
        raise ValueError("batch_patients must be >= 1")
    n = cohort_h5_size(path)
    for start in range(0, n, batch_patients):
        yield read_cohort_h5(path, start, start + batch_patients, dtype=dtype)
