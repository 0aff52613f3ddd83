"""The mechanistic model contract.

A model is *declared*: its states, parameters, observables, dose targets and input
channels are data on the class, and everything else in hybrid_twin (simulation, fitting,
sampling, I/O, the CLI) reads that declaration instead of repeating names.

The dynamics are written as two small pure functions:

- `fluxes(t, y, p, u) -> dict[str, value]`: the named terms of the model (absorption,
  elimination, insulin action, ...). A hybrid model can replace a named term with a
  learned one.
- `derivatives(y, p, u, flux) -> tuple`: how the terms combine into dy/dt.

Both are written **elementwise over patients**: `y` is a tuple of state components,
`p` and `u` map names to components, and each component may be a scalar (one patient)
or an array of patients. Only arithmetic and elementwise `jnp` functions are used, so
that the same code runs under `jax.vmap`, on a block of patients' vectors, and inside a
fused kernel.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Components = tuple[Any, ...]

TRANSFORMS = ("log", "identity", "logit")


@dataclasses.dataclass(frozen=True)
class State:
    """One state of a model: its name, unit and meaning."""

    name: str
    unit: str
    description: str = ""


@dataclasses.dataclass(frozen=True)
class Parameter:
    """One model parameter.

    Attributes:
        name: identifier used in configs, CSV files and `p[name]` in the vector field.
        unit: physical unit of the natural-space value.
        typical: typical (population) value in `unit`.
        source: citation for `typical` (and `omega` where it has one).
        lower, upper: plausible bounds in `unit`; used for validation and, with
            `transform="logit"`, as the open interval of the transform.
        transform: map to the unconstrained fitting space: "log" (positive parameters),
            "logit" (bounded in (lower, upper)) or "identity".
        omega: between-patient standard deviation in the unconstrained space, i.e. of
            log(value) for log-transformed parameters (log-normal spread); 0 means the
            parameter is fixed across the population.
        description: one line saying what the parameter is.
    """

    name: str
    unit: str
    typical: float
    source: str
    lower: float
    upper: float
    transform: str = "log"
    omega: float = 0.0
    description: str = ""

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise ValueError(
                f"parameter {self.name!r}: transform must be one of {TRANSFORMS}, "
                f"got {self.transform!r}"
            )
        if not self.lower < self.upper:
            raise ValueError(f"parameter {self.name!r}: lower bound must be below upper")
        if not self.lower <= self.typical <= self.upper:
            raise ValueError(
                f"parameter {self.name!r}: typical value {self.typical} is outside "
                f"[{self.lower}, {self.upper}]"
            )
        if self.transform == "log" and self.lower < 0:
            raise ValueError(f"parameter {self.name!r}: log transform needs lower >= 0")
        if self.omega < 0:
            raise ValueError(f"parameter {self.name!r}: omega must be >= 0")


@dataclasses.dataclass(frozen=True)
class Observable:
    """A measurable function of the state and parameters, e.g. plasma glucose = Q/V.

    `fn(y, p)` follows the elementwise convention of the vector field.
    """

    name: str
    unit: str
    fn: Callable[[Components, Mapping[str, Any]], Any]
    description: str = ""


@dataclasses.dataclass(frozen=True)
class DoseTarget:
    """Where a dose enters: `state` receives `amount * scale` (bolus) or `rate * scale`.

    `unit` is the unit of a dose amount (infusion rates are `unit` per time unit).
    `on_board`: the states that hold a dose until it acts (default: `state` alone), in
    one unit; their sum is the learned terms' feature "<name>_on_board" (e.g. carbohydrate
    in the gut, insulin in the subcutaneous depot).
    """

    name: str
    state: str
    unit: str
    scale: float = 1.0
    description: str = ""
    on_board: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class InputChannel:
    """An exogenous input signal, e.g. carbohydrate appearance rate, in `unit`."""

    name: str
    unit: str
    description: str = ""


class MechanisticModel(eqx.Module):
    """Base class of every mechanistic model.

    Subclasses declare `states`, `parameters`, `observables`, `dose_targets`, `inputs`
    and `time_unit` as class variables, and implement `initial_state`, `fluxes` and
    `derivatives`. Parameter vectors are ordered as `parameters`; a batch of patients
    is an array of shape `(N, n_params)` in natural units.
    """

    states: ClassVar[tuple[State, ...]] = ()
    parameters: ClassVar[tuple[Parameter, ...]] = ()
    observables: ClassVar[tuple[Observable, ...]] = ()
    dose_targets: ClassVar[tuple[DoseTarget, ...]] = ()
    inputs: ClassVar[tuple[InputChannel, ...]] = ()
    time_unit: ClassVar[str] = "h"
    reference: ClassVar[str] = ""

    # --- the dynamics -------------------------------------------------------------

    def initial_state(self, p: Mapping[str, Any]) -> Components:
        """State at the start of the simulation (e.g. the basal steady state)."""
        raise NotImplementedError

    def fluxes(
        self, t: Any, y: Components, p: Mapping[str, Any], u: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Named terms of the model at time `t`; see the module docstring."""
        raise NotImplementedError

    def derivatives(
        self,
        y: Components,
        p: Mapping[str, Any],
        u: Mapping[str, Any],
        flux: Mapping[str, Any],
    ) -> Components:
        """dy/dt from the named terms, one component per state."""
        raise NotImplementedError

    def vector_field(
        self, t: Any, y: Components, p: Mapping[str, Any], u: Mapping[str, Any]
    ) -> Components:
        """dy/dt = f(t, y, p, u), elementwise over patients."""
        return self.derivatives(y, p, u, self.fluxes(t, y, p, u))

    # --- derived from the declaration ---------------------------------------------

    @property
    def state_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.states)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(q.name for q in self.parameters)

    @property
    def observable_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.observables)

    @property
    def dose_target_names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.dose_targets)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.inputs)

    @property
    def n_states(self) -> int:
        return len(self.states)

    @property
    def n_params(self) -> int:
        return len(self.parameters)

    def parameter(self, name: str) -> Parameter:
        """The spec of parameter `name` (KeyError naming the valid ones otherwise)."""
        for q in self.parameters:
            if q.name == name:
                return q
        raise KeyError(
            f"{type(self).__name__} has no parameter {name!r}; "
            f"valid: {', '.join(self.param_names)}"
        )

    def index(self, kind: str, name: str) -> int:
        """Position of `name` among the model's `kind` ('state', 'param', 'observable',
        'dose_target' or 'input'), with an error that lists the valid names."""
        names = {
            "state": self.state_names,
            "param": self.param_names,
            "observable": self.observable_names,
            "dose_target": self.dose_target_names,
            "input": self.input_names,
        }[kind]
        if name not in names:
            raise KeyError(
                f"{type(self).__name__} has no {kind.replace('_', ' ')} {name!r}; "
                f"valid: {', '.join(names) or '(none)'}"
            )
        return names.index(name)

    def typical_params(self, **overrides: float) -> np.ndarray:
        """Vector of typical parameter values (natural units), with optional overrides."""
        values = {q.name: q.typical for q in self.parameters}
        for name, value in overrides.items():
            self.parameter(name)
            values[name] = float(value)
        return np.array([values[n] for n in self.param_names], dtype=np.float64)

    def param_dict(self, theta: Array) -> dict[str, Array]:
        """Split a parameter array `(..., n_params)` into `{name: (...)}`."""
        return {name: theta[..., i] for i, name in enumerate(self.param_names)}

    def to_unconstrained(self, theta: Array) -> Array:
        """Natural-space parameters `(..., n_params)` to the fitting space."""
        cols = [_forward(q, theta[..., i]) for i, q in enumerate(self.parameters)]
        return jnp.stack(cols, axis=-1)

    def from_unconstrained(self, z: Array) -> Array:
        """Fitting-space parameters `(..., n_params)` back to natural units."""
        cols = [_inverse(q, z[..., i]) for i, q in enumerate(self.parameters)]
        return jnp.stack(cols, axis=-1)

    def covariate_offsets(self, covariates: Array, covariate_names: Sequence[str]) -> Array:
        """Each patient's shift of its typical parameters in the fitting space, `(N,
        n_params)`, from its covariates `(N, C)` named `covariate_names`: none here (a
        hybrid model with a covariate network learns them)."""
        n = jnp.shape(covariates)[0]
        return jnp.zeros((n, self.n_params))

    def individual_typical(self, typical: Array, covariates: Array,
                           covariate_names: Sequence[str]) -> Array:
        """Each patient's typical parameters in natural units, `(N, n_params)`: the
        population's `typical` `(n_params,)` moved by `covariate_offsets` (here: not
        moved)."""
        n = jnp.shape(covariates)[0]
        return jnp.broadcast_to(jnp.asarray(typical), (n, self.n_params))

    def omegas(self) -> np.ndarray:
        """Between-patient log-scale standard deviations, ordered as `parameters`."""
        return np.array([q.omega for q in self.parameters], dtype=np.float64)

    def observe(self, y: Array, theta: Array) -> Array:
        """All observables from states `(..., n_states)` and parameters `(..., n_params)`.

        Leading axes of `y` beyond those of `theta` (e.g. the save-time axis) broadcast.
        Returns `(..., n_observables)`.
        """
        comps = tuple(y[..., i] for i in range(self.n_states))
        extra = y.ndim - 1 - (theta.ndim - 1)
        p = {
            k: jnp.reshape(v, v.shape + (1,) * extra)
            for k, v in self.param_dict(theta).items()
        }
        return jnp.stack([o.fn(comps, p) for o in self.observables], axis=-1)

    def check_params(self, theta: np.ndarray, where: str = "params") -> None:
        """Raise ValueError naming patient and parameter if a value is non-finite or
        outside the declared bounds. `theta` is `(n_params,)` or `(N, n_params)`."""
        theta = np.asarray(theta, dtype=np.float64)
        if theta.shape[-1:] != (self.n_params,):
            raise ValueError(
                f"{where}: expected last axis of length {self.n_params} "
                f"({', '.join(self.param_names)}), got shape {theta.shape}"
            )
        flat = theta.reshape(-1, self.n_params)
        for i, q in enumerate(self.parameters):
            col = flat[:, i]
            bad = ~np.isfinite(col) | (col < q.lower) | (col > q.upper)
            if bad.any():
                j = int(np.argmax(bad))
                raise ValueError(
                    f"{where}: patient {j}, parameter {q.name!r} = {col[j]!r} "
                    f"{q.unit}; expected a finite value in [{q.lower}, {q.upper}]"
                )

    def describe(self) -> str:
        """Human-readable summary of the declaration (states, parameters, sources)."""
        lines = [f"{type(self).__name__} (time unit: {self.time_unit})"]
        if self.reference:
            lines.append(f"  reference: {self.reference}")
        lines.append("  states:")
        lines += [f"    {s.name} [{s.unit}] {s.description}" for s in self.states]
        lines.append("  parameters:")
        for q in self.parameters:
            lines.append(
                f"    {q.name} = {q.typical:g} {q.unit} (bounds {q.lower:g}..{q.upper:g}, "
                f"{q.transform}, omega {q.omega:g}) {q.description} [{q.source}]"
            )
        lines.append("  observables: " + ", ".join(
            f"{o.name} [{o.unit}]" for o in self.observables))
        lines.append("  dose targets: " + ", ".join(
            f"{d.name} -> {d.state} [{d.unit}]" for d in self.dose_targets))
        if self.inputs:
            lines.append("  inputs: " + ", ".join(
                f"{c.name} [{c.unit}]" for c in self.inputs))
        return "\n".join(lines)


def _forward(q: Parameter, x: Array) -> Array:
    if q.transform == "log":
        return jnp.log(x)
    if q.transform == "logit":
        s = (x - q.lower) / (q.upper - q.lower)
        return jnp.log(s) - jnp.log1p(-s)
    return x


def _inverse(q: Parameter, z: Array) -> Array:
    if q.transform == "log":
        return jnp.exp(z)
    if q.transform == "logit":
        return q.lower + (q.upper - q.lower) * jax.nn.sigmoid(z)
    return z


def lognormal_cv(cv: float) -> float:
    """Log-scale SD of a log-normal distribution with coefficient of variation `cv`."""
    return math.sqrt(math.log1p(cv * cv))


def as_components(y: Array, n: int) -> Components:
    """Split the last axis of `y` into a tuple of `n` components."""
    return tuple(y[..., i] for i in range(n))


def stack_components(parts: Sequence[Any], like: Array) -> Array:
    """Stack components along a new last axis, broadcasting scalars to `like`'s batch."""
    shape = like.shape[:-1]
    return jnp.stack([jnp.broadcast_to(jnp.asarray(c, like.dtype), shape) for c in parts], -1)
