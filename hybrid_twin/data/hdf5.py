"""HDF5 cohort store (h5py): chunked, compressed, checksummed, atomically written.

Layout (schema version `SCHEMA_VERSION`): one dataset per `Cohort` array, patient axis
first, chunked along it, gzip-compressed with Fletcher-32 checksums; patient ids as UTF-8
strings; attributes hold the schema version, observable and covariate names, the
observables' units, the model's time unit and input interpolation, and, when the writer is
given the model, what the cohort was made for: the model's name (`model_name`), its dose
targets (`dose_target_names`) and input channels (`input_names`). Reading by patient
slice (`read_cohort_h5(path, start, stop)`, `iter_cohort_h5`) keeps memory bounded by the
slice, so cohorts larger than memory stream through prediction.

Reading with `model=` checks the file against the model (observables, dose targets, inputs,
time unit; files without the model attributes are checked on what they record), and every
read checks the slice's data: observable and dose-target indices in range, finite observed
values, times and doses. Each rejection is a `CohortFileError` naming the file, and the
patient (index and ID) and slot where there is one.
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
from ..models import REGISTRY
from ..models.base import MechanisticModel
from ..schedule import Schedule
from .cohort import Cohort
from .events import DataFileNotFoundError
from .pseudonym import pseudonymise_ids

SCHEMA_VERSION = 1
FORMAT = "hybrid_twin.cohort"
ARRAYS = ("obs_times", "obs_values", "obs_index", "obs_mask", "obs_missing", "covariates")
SCHEDULE_ARRAYS = ("dose_times", "dose_amounts", "dose_rates", "dose_targets", "dose_mask",
                   "input_times", "input_values", "input_mask")
MAX_LISTED = 20


class CohortFileError(InputError):
    """An HDF5 file that is not a readable hybrid_twin cohort of this schema version."""


class CohortH5Writer:
    """Write a cohort file chunk by chunk, atomically.

        with CohortH5Writer(path, model=model) as w:
            for part in parts:          # Cohorts with the same padded widths
                w.append(part)

    Datasets grow along the patient axis; the file appears at `path` only when the
    `with` block ends without an error (temporary file, then rename), so an interrupted
    write leaves any previous file at `path` untouched. With `model`, the file records the
    model it was made for (name, observables and their units, dose targets, inputs, time
    unit), and each appended cohort must have the model's observables.
    """

    def __init__(self, path: str | os.PathLike, *, model: MechanisticModel | None = None,
                 observable_units: tuple[str, ...] = (), time_unit: str = "",
                 chunk_patients: int = 4096, compression_level: int = 4):
        self.path = Path(path)
        self.model = model
        if model is not None:
            if time_unit and time_unit != model.time_unit:
                raise ValueError(f"{path}: time_unit {time_unit!r} differs from the model's "
                                 f"{model.time_unit!r}")
            time_unit = model.time_unit
            observable_units = observable_units or tuple(o.unit for o in model.observables)
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
        if self.model is not None and cohort.observable_names != self.model.observable_names:
            raise ValueError(f"{self.path}: the cohort's observables "
                             f"{', '.join(cohort.observable_names)} are not those of "
                             f"{model_name(self.model)} "
                             f"({', '.join(self.model.observable_names)})")
        if self._first is None:
            self._first = cohort
            _write_header(f, cohort, self.observable_units, self.time_unit, self.model)
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
    model: MechanisticModel | None = None,
    observable_units: tuple[str, ...] = (),
    time_unit: str = "",
    chunk_patients: int = 4096,
    compression_level: int = 4,
) -> None:
    """Write `cohort` to `path` atomically (temporary file in the same folder, then rename).

    An interrupted write leaves any previous file at `path` untouched. Give the `model`
    the cohort is for, so that reading it into another model is refused (see
    `CohortH5Writer`).
    """
    with CohortH5Writer(path, model=model, observable_units=observable_units,
                        time_unit=time_unit, chunk_patients=chunk_patients,
                        compression_level=compression_level) as w:
        w.append(cohort)


def model_name(model: MechanisticModel) -> str:
    """The registry name of `model` (of the mechanistic model inside a hybrid one), e.g.
    "glucose.BergmanMinimal", or its class name when it is not registered."""
    base = getattr(model, "mechanistic", model)
    for name, cls in REGISTRY.items():
        if type(base) is cls:
            return name
    return type(base).__name__


def _write_header(f, cohort, observable_units, time_unit, model):
    f.attrs["format"] = FORMAT
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["n_patients"] = 0
    f.attrs["observable_names"] = list(cohort.observable_names)
    f.attrs["observable_units"] = list(observable_units)
    f.attrs["covariate_names"] = list(cohort.covariate_names)
    f.attrs["time_unit"] = time_unit
    f.attrs["interpolation"] = cohort.schedule.interpolation
    if model is not None:
        f.attrs["model_name"] = model_name(model)
        f.attrs["dose_target_names"] = list(model.dose_target_names)
        f.attrs["input_names"] = list(model.input_names)


def _names(f, attr: str) -> tuple[str, ...] | None:
    """A list attribute as a tuple of str (None when the file does not have it)."""
    if attr not in f.attrs:
        return None
    return tuple(str(x) for x in np.atleast_1d(f.attrs[attr]))


def _check_model(path: str, f: h5py.File, model: MechanisticModel) -> None:
    """CohortFileError when the file was made for a model that `model` cannot read."""
    obs = tuple(str(x) for x in f.attrs["observable_names"])
    made = f.attrs.get("model_name")
    made_for = (f"{made} (observables {', '.join(obs)})" if made
                else f"a model with observables {', '.join(obs)}")
    into = f"{model_name(model)} (observables {', '.join(model.observable_names)})"
    diffs = []

    def compare(what, theirs, ours):
        if theirs is not None and tuple(theirs) != tuple(ours):
            diffs.append(f"{what} {', '.join(theirs) or '(none)'} in the file, "
                         f"{', '.join(ours) or '(none)'} in the model")

    compare("observables", obs, model.observable_names)
    compare("dose targets", _names(f, "dose_target_names"), model.dose_target_names)
    compare("inputs", _names(f, "input_names"), model.input_names)
    unit = str(f.attrs.get("time_unit", ""))
    if unit and unit != model.time_unit:
        diffs.append(f"time unit {unit} in the file, {model.time_unit} in the model")
    width = f["schedule/input_values"].shape[-1]
    if "input_names" not in f.attrs and width != len(model.inputs):
        diffs.append(f"{width} input channel(s) in the file, {len(model.inputs)} in the model")
    if diffs:
        raise CohortFileError(f"{path}: cohort made for {made_for} cannot be read into "
                              f"{into}: " + "; ".join(diffs))


def _check_data(path: str, start: int, ids: tuple[str, ...], data: dict, sched: dict,
                n_obs: int, n_targets: int | None) -> None:
    """CohortFileError listing patients (index and ID) and slots whose data cannot be
    used: observable or dose-target indices out of range, non-finite observed values,
    observation times or doses, duplicate IDs."""
    problems = []

    def report(mask, what):
        for i, j in zip(*np.nonzero(mask)):
            problems.append(f"patient {start + i} (ID {ids[i]}) slot {j}: {what}")

    om, miss = np.asarray(data["obs_mask"], bool), np.asarray(data["obs_missing"], bool)
    k = np.asarray(data["obs_index"])
    report(om & ((k < 0) | (k >= n_obs)),
           f"observable index outside 0..{n_obs - 1} (the file has {n_obs} observable(s))")
    report(om & ~np.isfinite(data["obs_times"]), "observation time is not finite")
    values = np.asarray(data["obs_values"])
    report(om & ~miss & ~np.isfinite(values), "observed value is not finite (mark a missing "
           "value in obs_missing)")
    dm = np.asarray(sched["dose_mask"], bool)
    if n_targets is not None:
        tg = np.asarray(sched["dose_targets"])
        report(dm & ((tg < 0) | (tg >= n_targets)),
               f"dose target index outside 0..{n_targets - 1} ({n_targets} dose target(s))")
    for name in ("dose_times", "dose_amounts", "dose_rates"):
        report(dm & ~np.isfinite(sched[name]), f"{name[5:-1]} of the dose is not finite")
    seen: dict[str, int] = {}
    for i, pid in enumerate(ids):
        if pid in seen:
            problems.append(f"patient {start + i} (ID {pid}) has the ID of patient "
                            f"{start + seen[pid]}")
        seen.setdefault(pid, i)
    if problems:
        shown = problems[:MAX_LISTED]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise CohortFileError(f"{path}: {len(problems)} problem(s) in the cohort data:\n  "
                              + "\n  ".join(shown) + more)


def _open(path: str | os.PathLike) -> h5py.File:
    path = str(path)
    if not os.path.exists(path):
        raise DataFileNotFoundError(f"cohort file not found: {path}")
    if os.path.isdir(path):
        raise CohortFileError(f"{path}: is a folder; expected an HDF5 cohort file")
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
    path: str | os.PathLike, start: int = 0, stop: int | None = None, *, dtype=None,
    model: MechanisticModel | None = None, pseudonym_key: bytes | None = None,
    id_map: dict[str, str] | None = None,
) -> Cohort:
    """Read patients `start:stop` (all by default) of a cohort file.

    Args:
        model: the model the cohort is read into; the file must have been made for one
            with the same observables, dose targets, inputs and time unit (what an older
            file does not record is not checked).
        pseudonym_key: when given, each ID is replaced by `pseudonymise_id(ID, key)`, and
            messages name pseudonyms, not IDs.
        id_map: when a dict (and `pseudonym_key` is given), it receives {raw ID: pseudonym}.

    Raises CohortFileError for a file that is not a cohort of this schema, one made for an
    incompatible model, or patients whose data cannot be used (see module docstring).
    """
    dtype = dtype or jnp.result_type(float)
    path = str(path)
    with _open(path) as f:
        n = int(f.attrs["n_patients"])
        stop = n if stop is None else min(stop, n)
        if not 0 <= start <= stop:
            raise IndexError(f"{path}: patient slice {start}:{stop} outside 0:{n}")
        if model is not None:
            _check_model(path, f, model)
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
        targets = _names(f, "dose_target_names")
    if pseudonym_key is not None:
        mapping = pseudonymise_ids(ids, pseudonym_key)
        ids = tuple(mapping[r] for r in ids)
        if id_map is not None:
            id_map.update(mapping)
    if targets is None and model is not None:
        targets = model.dose_target_names
    _check_data(path, start, ids, data, sched, len(obs_names),
                None if targets is None else len(targets))

    def cast(x):
        return jnp.asarray(x, dtype) if np.issubdtype(x.dtype, np.floating) else jnp.asarray(x)

    schedule = Schedule(**{k: cast(v) for k, v in sched.items()}, interpolation=interpolation)
    return Cohort(**{k: cast(v) for k, v in data.items()}, schedule=schedule, ids=ids,
                  observable_names=obs_names, covariate_names=cov_names)


def iter_cohort_h5(
    path: str | os.PathLike, batch_patients: int, *, dtype=None,
    model: MechanisticModel | None = None, pseudonym_key: bytes | None = None,
) -> Iterator[Cohort]:
    """Stream a cohort file in slices of `batch_patients` patients (checked as by
    `read_cohort_h5`)."""
    if batch_patients < 1:
        raise ValueError("batch_patients must be >= 1")
    n = cohort_h5_size(path)
    for start in range(0, n, batch_patients):
        yield read_cohort_h5(path, start, start + batch_patients, dtype=dtype, model=model,
                             pseudonym_key=pseudonym_key)
