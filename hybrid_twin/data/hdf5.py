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

from ..errors import InputError
from ..schedule import Schedule
from .cohort import Cohort

SCHEMA_VERSION = 1
FORMAT = "hybrid_twin.cohort"
ARRAYS = ("obs_times", "obs_values", "obs_index", "obs_mask", "obs_missing", "covariates")
SCHEDULE_ARRAYS = ("dose_times", "dose_amounts", "dose_rates", "dose_targets", "dose_mask",
                   "input_times", "input_values", "input_mask")


class CohortFileError(InputError):
    """An HDF5 file that is not a readable hybrid_twin cohort of this schema version."""


class CohortH5Writer:
    """Write a cohort file chunk by chunk, atomically.

        with CohortH5Writer(path, time_unit="h") as w:
            for part in parts:          # Cohorts with the same padded widths
                w.append(part)

    Datasets grow along the patient axis; the file appears at `path` only when the
    `with` block ends without an error (temporary file, then rename), so an interrupted
    write leaves any previous file at `path` untouched.
    """

    def __init__(self, path: str | os.PathLike, *, observable_units: tuple[str, ...] = (),
                 time_unit: str = "", chunk_patients: int = 4096, compression_level: int = 4):
        self.path = Path(path)
        self.observable_units = tuple(observable_units)
        self.time_unit = time_unit
        self.chunk_patients = chunk_patients
        self.level = compression_level
        self._file: h5py.File | None = None
        self._tmp: str | None = None
        self._first: Cohort | None = None
        self.n_patients = 0

    def __enter__(self) -> CohortH5Writer:
        fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.",
                                         suffix=".tmp")
        os.close(fd)
        self._file = h5py.File(self._tmp, "w")
        return self

    def append(self, cohort: Cohort) -> None:
        """Append the patients of `cohort` (same observables, covariates and widths)."""
        f = self._file
        if f is None:
            raise RuntimeError("CohortH5Writer.append outside its `with` block")
        if self._first is None:
            self._first = cohort
            _write_header(f, cohort, self.observable_units, self.time_unit)
        elif (cohort.observable_names, cohort.covariate_names, cohort.obs_times.shape[1:],
              cohort.schedule.dose_times.shape[1:], cohort.schedule.input_times.shape[1:],
              cohort.schedule.interpolation) != (
                self._first.observable_names, self._first.covariate_names,
                self._first.obs_times.shape[1:], self._first.schedule.dose_times.shape[1:],
                self._first.schedule.input_times.shape[1:],
                self._first.schedule.interpolation):
            raise ValueError(f"{self.path}: appended cohort differs from the first one in "
                             "observables, covariates, padded widths or interpolation")
        n0, n = self.n_patients, cohort.n_patients
        items = [(name, getattr(cohort, name)) for name in ARRAYS]
        items += [(f"schedule/{name}", getattr(cohort.schedule, name))
                  for name in SCHEDULE_ARRAYS]
        items.append(("ids", np.array(cohort.ids, dtype=object)))
        for name, value in items:
            value = np.asarray(value)
            if name not in f:
                row = value.shape[1:]
                kw = {"dtype": h5py.string_dtype("utf-8") if name == "ids" else value.dtype}
                if name != "ids" and all(row):
                    kw.update(compression="gzip", compression_opts=self.level, fletcher32=True)
                f.create_dataset(name, shape=(0,) + row,
                                 maxshape=(None,) + tuple(d if d else None for d in row),
                                 chunks=(self.chunk_patients,) + tuple(max(1, d) for d in row),
                                 **kw)
            ds = f[name]
            ds.resize(n0 + n, axis=0)
            ds[n0:n0 + n] = value
        self.n_patients = n0 + n
        f.attrs["n_patients"] = self.n_patients

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._file is not None and self._tmp is not None
        try:
            self._file.close()
            if exc_type is None:
                if self._first is None:
                    raise ValueError(f"{self.path}: no patients were written")
                os.replace(self._tmp, self.path)
        finally:
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)


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
    with CohortH5Writer(path, observable_units=observable_units, time_unit=time_unit,
                        chunk_patients=chunk_patients,
                        compression_level=compression_level) as w:
        w.append(cohort)


def _write_header(f, cohort, observable_units, time_unit):
    f.attrs["format"] = FORMAT
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["n_patients"] = 0
    f.attrs["observable_names"] = list(cohort.observable_names)
    f.attrs["observable_units"] = list(observable_units)
    f.attrs["covariate_names"] = list(cohort.covariate_names)
    f.attrs["time_unit"] = time_unit
    f.attrs["interpolation"] = cohort.schedule.interpolation


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
