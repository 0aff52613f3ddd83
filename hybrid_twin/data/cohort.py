"""`Cohort`: many patients' observations, doses and covariates as padded arrays + masks."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..errors import InputError
from ..models.base import MechanisticModel
from ..schedule import Schedule


def before_cut(times, condition_until: float | None):
    """The forecast rule, for any array of observation times: True where an observation
    conditions a forecast made at `condition_until` (TIME <= condition_until; every
    observation when it is None). Its complement is where the forecast is scored
    (`after_cut`)."""
    if condition_until is None:
        xp = jnp if isinstance(times, jax.Array) else np
        return xp.ones(xp.shape(times), bool)
    return times <= condition_until


def _name_map(names: Sequence[str], onto: Sequence[str]) -> np.ndarray:
    """For each of `names`, its index in `onto` (-1 where it has none)."""
    return np.array([list(onto).index(n) if n in onto else -1 for n in names], np.int64)


def after_cut(times, condition_until: float | None):
    """Where a forecast made at `condition_until` is scored: TIME > condition_until (every
    observation when it is None: the fit itself is scored)."""
    if condition_until is None:
        return before_cut(times, None)
    return ~before_cut(times, condition_until)


class Cohort(eqx.Module):
    """Observations, schedules and covariates of N patients, ready for `simulate`.

    Attributes (N patients, M observation slots, C covariates; times in the model's unit):
        obs_times: (N, M) observation times, non-decreasing over the real slots.
        obs_values: (N, M) observed values (NaN where missing or padding).
        obs_index: (N, M) int index into `observable_names`.
        obs_mask: (N, M) True for real observation records (padding is False and only
            at the end of a row).
        obs_missing: (N, M) True for records whose value is missing (MDV = 1): they are
            prediction times but carry no data.
        schedule: batched `Schedule` (doses and inputs).
        covariates: (N, C) covariate values, constant per patient.
        ids: patient identifiers (strings), length N.
        observable_names, covariate_names: names for the index columns.
    """

    obs_times: jax.Array
    obs_values: jax.Array
    obs_index: jax.Array
    obs_mask: jax.Array
    obs_missing: jax.Array
    schedule: Schedule
    covariates: jax.Array
    ids: tuple[str, ...] = eqx.field(static=True)
    observable_names: tuple[str, ...] = eqx.field(static=True)
    covariate_names: tuple[str, ...] = eqx.field(static=True, default=())

    @property
    def n_patients(self) -> int:
        return len(self.ids)

    @property
    def data_mask(self) -> jax.Array:
        """(N, M) True where a real observation has a value to fit."""
        return self.obs_mask & ~self.obs_missing

    def fit_mask(self, condition_until: float | None = None) -> jax.Array:
        """(N, M) the data a forecast made at `condition_until` is conditioned on (all
        data when None); see `before_cut`."""
        return self.data_mask & before_cut(self.obs_times, condition_until)

    def score_mask(self, condition_until: float | None = None) -> jax.Array:
        """(N, M) the data a forecast made at `condition_until` is scored on (all data
        when None); see `after_cut`."""
        return self.data_mask & after_cut(self.obs_times, condition_until)

    def for_model(self, source: MechanisticModel, target: MechanisticModel,
                  where: str = "cohort") -> Cohort:
        """This cohort, built for `source`'s observables, dose targets and inputs,
        expressed in `target`'s, matched by name (e.g. data simulated by one model and
        fitted by another). `InputError` naming `where` when an observable with data or a
        dose target in use has no namesake in `target`, or the input channels differ."""
        if source.input_names != target.input_names:
            raise InputError(f"{where}: {type(source).__name__} and {type(target).__name__} "
                             f"have different input channels ({', '.join(source.input_names)}"
                             f" vs {', '.join(target.input_names)})")
        obs_map = _name_map(self.observable_names, target.observable_names)
        used = np.unique(np.asarray(self.obs_index)[np.asarray(self.data_mask)])
        missing = [self.observable_names[k] for k in used if obs_map[k] < 0]
        if missing:
            raise InputError(f"{where}: observable(s) {', '.join(missing)} of "
                             f"{type(source).__name__} are not observables of "
                             f"{type(target).__name__} ({', '.join(target.observable_names)})")
        dose_map = _name_map(source.dose_target_names, target.dose_target_names)
        sched = self.schedule
        targets = np.asarray(sched.dose_targets)
        in_use = np.unique(targets[np.asarray(sched.dose_mask)])
        missing = [source.dose_target_names[k] for k in in_use if dose_map[k] < 0]
        if missing:
            raise InputError(f"{where}: dose target(s) {', '.join(missing)} of "
                             f"{type(source).__name__} are not dose targets of "
                             f"{type(target).__name__} ({', '.join(target.dose_target_names)})")
        new_targets = np.where(np.asarray(sched.dose_mask), dose_map[targets], 0)
        sched = dataclasses.replace(sched, dose_targets=jnp.asarray(
            new_targets.astype(np.asarray(sched.dose_targets).dtype)))
        obs_k = np.where(np.asarray(self.obs_mask), obs_map[np.asarray(self.obs_index)], 0)
        keep = np.asarray(self.obs_mask) & (obs_map[np.asarray(self.obs_index)] >= 0)
        return dataclasses.replace(
            self, schedule=sched, observable_names=target.observable_names,
            obs_index=jnp.asarray(obs_k.astype(np.asarray(self.obs_index).dtype)),
            obs_mask=jnp.asarray(keep))

    def select(self, indices: Sequence[int] | np.ndarray) -> Cohort:
        """The sub-cohort of the given patient indices (in that order)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < -self.n_patients or idx.max() >= self.n_patients):
            raise IndexError(
                f"patient index out of range for a cohort of {self.n_patients} patients")
        arrays = jax.tree.map(lambda x: x[idx], (
            self.obs_times, self.obs_values, self.obs_index, self.obs_mask,
            self.obs_missing, self.schedule, self.covariates))
        return Cohort(*arrays, ids=tuple(self.ids[i] for i in idx),
                      observable_names=self.observable_names,
                      covariate_names=self.covariate_names)

    def split(self, fractions: dict[str, float], seed: int = 0) -> dict[str, Cohort]:
        """Split by patient into named parts, e.g. {"train": .7, "val": .15, "test": .15}.

        Fractions must be >= 0 and sum to 1. Each patient's part depends only on its ID
        and `seed`, not on the order of the patients: patients are ranked by
        sha256(f"{seed}:{id}") and the ranking is cut at the cumulative fractions (part
        sizes rounded), so reordering the rows of a data file moves no patient to another
        part. Within a part, patients keep the cohort's order.
        """
        total = sum(fractions.values())
        if not np.isclose(total, 1.0) or any(f < 0 for f in fractions.values()):
            raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
        rank = sorted(range(self.n_patients), key=lambda i: hashlib.sha256(
            f"{seed}:{self.ids[i]}".encode("utf-8")).digest())
        bounds = np.round(np.cumsum([0.0, *fractions.values()]) * self.n_patients).astype(int)
        return {name: self.select(np.sort(np.asarray(rank[bounds[i]:bounds[i + 1]], np.int64)))
                for i, name in enumerate(fractions)}

    @staticmethod
    def concatenate(cohorts: Sequence[Cohort]) -> Cohort:
        """Join cohorts of the same observables and covariates, padding slot counts."""
        if not cohorts:
            raise ValueError("Cohort.concatenate needs at least one cohort")
        first = cohorts[0]
        for c in cohorts[1:]:
            if (c.observable_names, c.covariate_names) != (
                    first.observable_names, first.covariate_names):
                raise ValueError("cannot concatenate cohorts with different observables "
                                 "or covariates")
        ids = sum((c.ids for c in cohorts), ())
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"patient id {dup!r} appears in more than one cohort")
        m = max(c.obs_times.shape[1] for c in cohorts)
        d = max(c.schedule.dose_times.shape[1] for c in cohorts)
        k = max(c.schedule.input_times.shape[1] for c in cohorts)

        def pad(x, n, fill=0):
            widths = [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
            return jnp.pad(x, widths, constant_values=fill)

        def cat(get, n, fill=0):
            return jnp.concatenate([pad(get(c), n, fill) for c in cohorts])

        s = [c.schedule for c in cohorts]
        schedule = Schedule(
            dose_times=jnp.concatenate([pad(x.dose_times, d) for x in s]),
            dose_amounts=jnp.concatenate([pad(x.dose_amounts, d) for x in s]),
            dose_rates=jnp.concatenate([pad(x.dose_rates, d) for x in s]),
            dose_targets=jnp.concatenate([pad(x.dose_targets, d) for x in s]),
            dose_mask=jnp.concatenate([pad(x.dose_mask, d) for x in s]),
            input_times=jnp.concatenate([pad(x.input_times, k) for x in s]),
            input_values=jnp.concatenate([pad(x.input_values, k) for x in s]),
            input_mask=jnp.concatenate([pad(x.input_mask, k) for x in s]),
            interpolation=first.schedule.interpolation,
        )
        return Cohort(
            obs_times=cat(lambda c: c.obs_times, m),
            obs_values=cat(lambda c: c.obs_values, m, np.nan),
            obs_index=cat(lambda c: c.obs_index, m),
            obs_mask=cat(lambda c: c.obs_mask, m, False),
            obs_missing=cat(lambda c: c.obs_missing, m, False),
            schedule=schedule,
            covariates=jnp.concatenate([c.covariates for c in cohorts]),
            ids=ids, observable_names=first.observable_names,
            covariate_names=first.covariate_names,
        )
