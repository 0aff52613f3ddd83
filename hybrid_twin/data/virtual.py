"""Virtual cohorts: sampled patients, their schedules, simulated truth and measurement noise.

    pop = Population(omega={"CL": 0.3}, correlation={("CL", "V"): 0.6},
                     covariates=(CovariateSpec("WT", "lognormal", 70.0, 0.2),),
                     effects=(CovariateEffect("CL", "WT", "power", 0.75, 70.0),))
    spec = ScheduleSpec(doses=(DoseSpec(0.0, 320.0, "depot"),), obs_every=1.0, horizon=24.0)
    vc = virtual_cohort(OneCompartment(), 1000, population=pop, schedule=spec,
                        noise=NoiseModel("combined", 0.1, 0.1), seed=0)
    vc.cohort          # a Cohort with noisy observations, ready for calibration
    vc.true_params     # (N, n_params) natural units

Everything is reproducible from `seed`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from ..errors import InputError
from ..models.base import MechanisticModel
from ..schedule import Schedule
from ..simulate import SolverOptions, simulate, status_label
from .cohort import Cohort

DISTRIBUTIONS = ("normal", "lognormal", "uniform")
EFFECTS = ("power", "exponential", "linear")
NOISE = ("additive", "proportional", "combined")


@dataclasses.dataclass(frozen=True)
class CovariateSpec:
    """A sampled covariate: normal(a=mean, b=sd), lognormal(a=median, b=sd of log) or
    uniform(a=low, b=high); values are clipped to [lower, upper]."""

    name: str
    distribution: str
    a: float
    b: float
    lower: float = -np.inf
    upper: float = np.inf

    def __post_init__(self):
        if self.distribution not in DISTRIBUTIONS:
            raise InputError(f"covariate {self.name!r}: distribution must be one of "
                             f"{DISTRIBUTIONS}, got {self.distribution!r}")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.distribution == "normal":
            x = rng.normal(self.a, self.b, n)
        elif self.distribution == "lognormal":
            x = self.a * np.exp(self.b * rng.standard_normal(n))
        else:
            x = rng.uniform(self.a, self.b, n)
        return np.clip(x, self.lower, self.upper)


@dataclasses.dataclass(frozen=True)
class CovariateEffect:
    """theta_param scaled by a covariate: "power" (c/ref)^coef, "exponential"
    exp(coef (c - ref)) or "linear" 1 + coef (c - ref)."""

    parameter: str
    covariate: str
    kind: str
    coef: float
    reference: float

    def __post_init__(self):
        if self.kind not in EFFECTS:
            raise InputError(f"covariate effect on {self.parameter!r}: kind must be one of "
                             f"{EFFECTS}, got {self.kind!r}")

    def factor(self, c: np.ndarray) -> np.ndarray:
        if self.kind == "power":
            return (c / self.reference) ** self.coef
        if self.kind == "exponential":
            return np.exp(self.coef * (c - self.reference))
        return 1.0 + self.coef * (c - self.reference)


@dataclasses.dataclass(frozen=True)
class Population:
    """A population distribution around a model's declared typical values.

    Attributes:
        typical: overrides of typical values {name: value} (natural units).
        omega: overrides of between-patient SDs in the unconstrained space.
        correlation: {(name_a, name_b): rho} correlations of the random effects.
        covariates: sampled covariates.
        effects: covariate effects on typical values.
    """

    typical: Mapping[str, float] = dataclasses.field(default_factory=dict)
    omega: Mapping[str, float] = dataclasses.field(default_factory=dict)
    correlation: Mapping[tuple[str, str], float] = dataclasses.field(default_factory=dict)
    covariates: tuple[CovariateSpec, ...] = ()
    effects: tuple[CovariateEffect, ...] = ()

    def omega_vector(self, model: MechanisticModel) -> np.ndarray:
        om = model.omegas().copy()
        for name, v in self.omega.items():
            om[model.index("param", name)] = v
        return om

    def correlation_matrix(self, model: MechanisticModel) -> np.ndarray:
        corr = np.eye(model.n_params)
        for (a, b), rho in self.correlation.items():
            i, j = model.index("param", a), model.index("param", b)
            if i == j or not -1 < rho < 1:
                raise InputError(f"correlation ({a}, {b}) = {rho}: need two different "
                                 "parameters and -1 < rho < 1")
            corr[i, j] = corr[j, i] = rho
        if np.min(np.linalg.eigvalsh(corr)) <= 0:
            raise InputError("the parameter correlation matrix is not positive definite")
        return corr

    def sample(self, model: MechanisticModel, rng: np.random.Generator, n: int
               ) -> tuple[np.ndarray, np.ndarray]:
        """(theta (n, n_params) natural units, covariates (n, n_covariates))."""
        cov = np.stack([c.sample(rng, n) for c in self.covariates], axis=1) \
            if self.covariates else np.zeros((n, 0))
        names = [c.name for c in self.covariates]
        typical = np.tile(model.typical_params(**self.typical), (n, 1))
        for e in self.effects:
            if e.covariate not in names:
                raise InputError(f"covariate effect uses {e.covariate!r}, which is not among "
                                 f"the sampled covariates {names}")
            typical[:, model.index("param", e.parameter)] *= e.factor(cov[:, names.index(e.covariate)])
        omega = self.omega_vector(model)
        chol = np.linalg.cholesky(self.correlation_matrix(model))
        eta = rng.standard_normal((n, model.n_params)) @ chol.T * omega
        phi = np.asarray(model.to_unconstrained(jnp.asarray(typical))) + eta
        theta = np.asarray(model.from_unconstrained(jnp.asarray(phi)))
        lower = np.array([q.lower for q in model.parameters])
        upper = np.array([q.upper for q in model.parameters])
        return np.clip(theta, lower, upper), cov


@dataclasses.dataclass(frozen=True)
class DoseSpec:
    """A dose of every patient: time (jittered uniformly by +-time_jitter), amount
    (log-normal with CV amount_cv), target name, infusion rate (0 = bolus)."""

    time: float = 0.0
    amount: float = 0.0
    target: str = ""
    rate: float = 0.0
    time_jitter: float = 0.0
    amount_cv: float = 0.0


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
    """Doses (optionally repeated every `repeat_every` for `repeat_count` times) and
    observation times: `obs_times` if given, else every `obs_every` from `obs_start` to
    `horizon`; each time is observed for every name in `observables` (default: all)."""

    doses: tuple[DoseSpec, ...] = ()
    repeat_every: float | None = None
    repeat_count: int = 1
    horizon: float = 24.0
    obs_every: float | None = 1.0
    obs_start: float = 0.0
    obs_times: tuple[float, ...] | None = None
    observables: tuple[str, ...] | None = None

    def build(self, model: MechanisticModel, rng: np.random.Generator, n: int):
        """(batched Schedule, obs_times (n, M), obs_index (n, M))."""
        rows = []
        for k in range(self.repeat_count if self.repeat_every else 1):
            for d in self.doses:
                rows.append((d, k * (self.repeat_every or 0.0)))
        d_n = len(rows)
        times = np.zeros((n, d_n))
        amounts = np.zeros((n, d_n))
        for j, (d, shift) in enumerate(rows):
            times[:, j] = d.time + shift + rng.uniform(-d.time_jitter, d.time_jitter, n)
            sd = np.sqrt(np.log1p(d.amount_cv ** 2))
            amounts[:, j] = d.amount * np.exp(sd * rng.standard_normal(n) - 0.5 * sd * sd) \
                if d.amount_cv else d.amount
        times = np.maximum(times, 0.0)
        targets = np.array([model.index("dose_target", d.target) for d, _ in rows], np.int32)
        rates = np.array([d.rate for d, _ in rows])
        n_in = len(model.inputs)
        schedule = Schedule(
            dose_times=jnp.asarray(times), dose_amounts=jnp.asarray(amounts),
            dose_rates=jnp.asarray(np.tile(rates, (n, 1))),
            dose_targets=jnp.asarray(np.tile(targets, (n, 1))),
            dose_mask=jnp.ones((n, d_n), bool),
            input_times=jnp.zeros((n, 0)), input_values=jnp.zeros((n, 0, n_in)),
            input_mask=jnp.zeros((n, 0), bool))
        if self.obs_times is not None:
            grid = np.asarray(self.obs_times, float)
        else:
            grid = np.arange(self.obs_start, self.horizon + 1e-9 * self.horizon, self.obs_every)
        names = self.observables or model.observable_names
        idx = [model.index("observable", o) for o in names]
        obs_t = np.repeat(grid, len(idx))
        obs_k = np.tile(np.array(idx, np.int32), grid.size)
        return schedule, np.tile(obs_t, (n, 1)), np.tile(obs_k, (n, 1))


@dataclasses.dataclass(frozen=True)
class NoiseModel:
    """Measurement error: y = f + sqrt(a^2 + (b f)^2) eps, with a = additive_sd (0 unless
    "additive"/"combined") and b = proportional_sd (0 unless "proportional"/"combined")."""

    kind: str = "additive"
    additive_sd: float = 0.0
    proportional_sd: float = 0.0

    def __post_init__(self):
        if self.kind not in NOISE:
            raise InputError(f"noise kind must be one of {NOISE}, got {self.kind!r}")

    def sd(self, pred: np.ndarray) -> np.ndarray:
        a = self.additive_sd if self.kind in ("additive", "combined") else 0.0
        b = self.proportional_sd if self.kind in ("proportional", "combined") else 0.0
        return np.sqrt(a * a + (b * pred) ** 2)

    def apply(self, pred: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return pred + self.sd(pred) * rng.standard_normal(pred.shape)


@dataclasses.dataclass(frozen=True)
class VirtualCohort:
    """A virtual cohort and its ground truth."""

    cohort: Cohort
    true_params: np.ndarray
    true_predictions: np.ndarray


def virtual_cohort(
    model: MechanisticModel,
    n: int,
    *,
    population: Population | None = None,
    schedule: ScheduleSpec | None = None,
    noise: NoiseModel | None = None,
    seed: int = 0,
    options: SolverOptions | None = None,
) -> VirtualCohort:
    """Sample, schedule, simulate and observe `n` virtual patients (reproducible by seed).

    Raises InputError (a ValueError) naming the patients whose simulation failed, and
    why (nothing is dropped).
    """
    population = population or Population()
    schedule = schedule or ScheduleSpec()
    noise = noise or NoiseModel()
    rng = np.random.default_rng(seed)
    theta, cov = population.sample(model, rng, n)
    sched, obs_t, obs_k = schedule.build(model, rng, n)
    sol = simulate(model, theta, sched, obs_t, options=options)
    status = np.asarray(sol.status)
    if np.any(status != 0):
        bad = np.flatnonzero(status != 0)
        why = sorted({status_label(c) for c in status[bad]})
        raise InputError(f"virtual cohort: the simulation failed for {bad.size} of {n} "
                         f"patient(s), e.g. index {bad[:5].tolist()} ({', '.join(why)}); "
                         "check the solver options (solver.max_steps, tolerances) and the "
                         "population's parameter bounds")
    pred = np.asarray(sol.observed(model, jnp.asarray(theta), obs_k))
    values = noise.apply(pred, rng)
    m = obs_t.shape[1]
    cohort = Cohort(
        obs_times=jnp.asarray(obs_t), obs_values=jnp.asarray(values),
        obs_index=jnp.asarray(obs_k), obs_mask=jnp.ones((n, m), bool),
        obs_missing=jnp.zeros((n, m), bool), schedule=sched,
        covariates=jnp.asarray(cov), ids=tuple(f"v{i}" for i in range(n)),
        observable_names=model.observable_names,
        covariate_names=tuple(c.name for c in population.covariates))
    return VirtualCohort(cohort=cohort, true_params=theta, true_predictions=pred)
