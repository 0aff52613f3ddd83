"""Dosing and input schedules: what happens to a patient, as padded arrays with masks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .models.base import MechanisticModel

INTERPOLATIONS = ("constant", "linear")


def bad_padded_times(
    times: np.ndarray, mask: np.ndarray, *, strict: bool, t0: float = -np.inf
) -> np.ndarray:
    """Per row of padded `(N, K)` times: True where the real entries are non-finite,
    below `t0`, not (strictly, if `strict`) increasing, or padding precedes a real entry."""
    both = mask[:, 1:] & mask[:, :-1]
    step = np.diff(times, axis=1)
    bad = (mask & (~np.isfinite(times) | (times < t0))).any(axis=1)
    bad |= (both & ((step <= 0) if strict else (step < 0))).any(axis=1)
    bad |= (mask[:, 1:] & ~mask[:, :-1]).any(axis=1)
    return bad


class Schedule(eqx.Module):
    """One patient's doses and exogenous inputs, or a batch of them (leading axis N).

    Doses (`D` slots, padded, `dose_mask` marks the real ones), times in the model's time
    unit:
        dose_times: (D,) time of each dose.
        dose_amounts: (D,) amount, in the dose target's unit (e.g. mg, g, U).
        dose_rates: (D,) zero-order infusion rate (amount per time unit); 0 = bolus.
            An infusion runs from `dose_times` for `dose_amounts / dose_rates`.
        dose_targets: (D,) int index into `model.dose_targets`.
        dose_mask: (D,) bool.
    Inputs (`K` breakpoints, padded):
        input_times: (K,) breakpoint times, increasing over the real ones.
        input_values: (K, n_inputs) value of each input channel from that breakpoint on
            ("constant") or at that breakpoint ("linear" interpolation between them).
        input_mask: (K,) bool.
    Before its first breakpoint an input is 0 ("constant") or the first value ("linear").
    """

    dose_times: jax.Array
    dose_amounts: jax.Array
    dose_rates: jax.Array
    dose_targets: jax.Array
    dose_mask: jax.Array
    input_times: jax.Array
    input_values: jax.Array
    input_mask: jax.Array
    interpolation: str = eqx.field(static=True, default="constant")

    def __check_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"Schedule.interpolation must be one of {INTERPOLATIONS}, "
                f"got {self.interpolation!r}"
            )

    @property
    def is_batched(self) -> bool:
        return jnp.ndim(self.dose_times) == 2

    def has_infusions(self) -> bool | None:
        """Whether any real dose is an infusion; None when that cannot be read (the
        schedule is traced)."""
        if isinstance(self.dose_rates, jax.core.Tracer) or isinstance(
                self.dose_mask, jax.core.Tracer):
            return None
        return bool(np.any(np.asarray(self.dose_mask) & (np.asarray(self.dose_rates) > 0)))

    @property
    def n_dose_slots(self) -> int:
        return int(jnp.shape(self.dose_times)[-1])

    @classmethod
    def build(
        cls,
        model: MechanisticModel,
        doses: Sequence[tuple[float, float, str] | tuple[float, float, str, float]] = (),
        inputs: Sequence[tuple[float, Sequence[float]]] = (),
        *,
        interpolation: str = "constant",
        n_dose_slots: int | None = None,
        n_input_slots: int | None = None,
        dtype: Any = None,
    ) -> Schedule:
        """Build one patient's schedule from plain Python values.

        Args:
            model: the model whose dose targets and input channels are used.
            doses: `(time, amount, target_name)` or `(time, amount, target_name, rate)`;
                rate 0 or omitted means a bolus.
            inputs: `(time, values)` breakpoints, one value per input channel.
            interpolation: "constant" (piecewise constant) or "linear".
            n_dose_slots, n_input_slots: pad to this many slots (for batching).
            dtype: float dtype of the arrays (default: JAX's default float).
        """
        dtype = dtype or jnp.result_type(float)
        n_in = len(model.inputs)
        d = len(doses) if n_dose_slots is None else n_dose_slots
        k = len(inputs) if n_input_slots is None else n_input_slots
        if len(doses) > d or len(inputs) > k:
            raise ValueError(
                f"schedule has {len(doses)} doses and {len(inputs)} input breakpoints; "
                f"only {d} and {k} slots were requested"
            )
        times = np.zeros(d)
        amounts = np.zeros(d)
        rates = np.zeros(d)
        targets = np.zeros(d, dtype=np.int32)
        mask = np.zeros(d, dtype=bool)
        for i, dose in enumerate(doses):
            if len(dose) not in (3, 4):
                raise ValueError(
                    f"dose {i}: expected (time, amount, target[, rate]), got {dose!r}"
                )
            t, amt, target = dose[:3]
            rate = dose[3] if len(dose) == 4 else 0.0
            for what, val in (("time", t), ("amount", amt), ("rate", rate)):
                if not np.isfinite(val) or val < 0:
                    raise ValueError(
                        f"dose {i}: {what} must be a finite number >= 0, got {val!r}"
                    )
            times[i], amounts[i], rates[i] = t, amt, rate
            targets[i] = model.index("dose_target", target)
            mask[i] = True
        in_times = np.zeros(k)
        in_values = np.zeros((k, n_in))
        in_mask = np.zeros(k, dtype=bool)
        for i, (t, values) in enumerate(inputs):
            values = np.atleast_1d(np.asarray(values, dtype=np.float64))
            if values.shape != (n_in,):
                raise ValueError(
                    f"input breakpoint {i}: expected {n_in} values "
                    f"({', '.join(model.input_names)}), got {values.shape[0]}"
                )
            if not np.isfinite(t) or not np.all(np.isfinite(values)):
                raise ValueError(f"input breakpoint {i}: non-finite time or value")
            if i and t <= in_times[i - 1]:
                raise ValueError(
                    f"input breakpoint {i}: time {t} is not after the previous one "
                    f"({in_times[i - 1]})"
                )
            in_times[i], in_values[i], in_mask[i] = t, values, True
        return cls(
            dose_times=jnp.asarray(times, dtype),
            dose_amounts=jnp.asarray(amounts, dtype),
            dose_rates=jnp.asarray(rates, dtype),
            dose_targets=jnp.asarray(targets),
            dose_mask=jnp.asarray(mask),
            input_times=jnp.asarray(in_times, dtype),
            input_values=jnp.asarray(in_values, dtype),
            input_mask=jnp.asarray(in_mask),
            interpolation=interpolation,
        )

    @classmethod
    def empty(cls, model: MechanisticModel, dtype: Any = None) -> Schedule:
        """A schedule with no doses and no inputs."""
        return cls.build(model, (), (), dtype=dtype)

    @staticmethod
    def stack(schedules: Sequence[Schedule]) -> Schedule:
        """Stack single-patient schedules into a batch, padding to common slot counts."""
        if not schedules:
            raise ValueError("Schedule.stack needs at least one schedule")
        interp = {s.interpolation for s in schedules}
        if len(interp) != 1:
            raise ValueError(f"cannot stack schedules with different interpolation {interp}")
        d = max(s.dose_times.shape[-1] for s in schedules)
        k = max(s.input_times.shape[-1] for s in schedules)

        def pad(x: jax.Array, n: int) -> jax.Array:
            widths = [(0, n - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
            return jnp.pad(x, widths)

        fields = {}
        for name, n in (
            ("dose_times", d), ("dose_amounts", d), ("dose_rates", d),
            ("dose_targets", d), ("dose_mask", d), ("input_times", k),
            ("input_values", k), ("input_mask", k),
        ):
            fields[name] = jnp.stack([pad(getattr(s, name), n) for s in schedules])
        return Schedule(**fields, interpolation=interp.pop())

    def validate(self, model: MechanisticModel, t0: float = 0.0) -> None:
        """Raise ValueError naming the patient, slot and field of any invalid entry."""
        times = np.atleast_2d(np.asarray(self.dose_times, dtype=np.float64))
        amounts = np.atleast_2d(np.asarray(self.dose_amounts, dtype=np.float64))
        rates = np.atleast_2d(np.asarray(self.dose_rates, dtype=np.float64))
        targets = np.atleast_2d(np.asarray(self.dose_targets))
        mask = np.atleast_2d(np.asarray(self.dose_mask, dtype=bool))
        n_targets = len(model.dose_targets)
        checks = (
            ("dose_times", ~np.isfinite(times) | (times < t0), f"a finite time >= t0={t0}"),
            ("dose_amounts", ~np.isfinite(amounts) | (amounts < 0), "a finite amount >= 0"),
            ("dose_rates", ~np.isfinite(rates) | (rates < 0), "a finite rate >= 0"),
            ("dose_targets", (targets < 0) | (targets >= n_targets),
             f"an index into {model.dose_target_names}"),
        )
        for name, bad, expected in checks:
            bad = bad & mask
            if bad.any():
                i, j = np.argwhere(bad)[0]
                value = np.atleast_2d(np.asarray(getattr(self, name)))[i, j]
                raise ValueError(
                    f"schedule: patient {i}, dose slot {j}: {name} = {value!r}; "
                    f"expected {expected}"
                )
        in_times = np.atleast_2d(np.asarray(self.input_times, dtype=np.float64))
        in_mask = np.atleast_2d(np.asarray(self.input_mask, dtype=bool))
        in_values = np.asarray(self.input_values, dtype=np.float64)
        if in_values.shape[-1:] != (len(model.inputs),) and in_values.size:
            raise ValueError(
                f"schedule: input_values has {in_values.shape[-1]} channels; "
                f"{type(model).__name__} has {len(model.inputs)} ({model.input_names})"
            )
        bad = bad_padded_times(in_times, in_mask, strict=True)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(
                f"schedule: patient {i}: input_times must be finite and increasing over "
                f"the real breakpoints, padded only at the end; got "
                f"{in_times[i][in_mask[i]].tolist()}"
            )
