"""Experiment configs: YAML validated into typed dataclasses before any compute starts.

    cfg = load_config("configs/quickstart.yaml", overrides=["data.virtual.n=50"])

Unknown keys, wrong types and out-of-range values raise `ConfigError` naming the key path
(and, for a mistyped key, the nearest valid one); a file that is not a YAML mapping (empty,
binary, a syntax error, a duplicate key) names the file, line and column. YAML is read
with 1.2-style floats, so `1e-6` is a number. Paths written in a config file (`data.path`,
`data.pseudonym_key_file`, `data.pseudonym_map`) are relative to that file, paths given
with `--set` (or in a dict) to the current directory; the loaded config holds them
absolute. `resolved(cfg)` gives the full config with defaults filled in, which every run
saves as `config.yaml`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .calibrate import ERROR_KINDS, ErrorModel
from .data.events import CATEGORICAL, MAX_ABS_VALUE, TIME_UNITS_S
from .data.load import check_data_options
from .data.pseudonym import load_pseudonym_key
from .data.virtual import NOISE, DoseSpec, NoiseModel
from .errors import InputError
from .hybrid import dose_input_states, feature_names, input_states_of, latent_names
from .models import REGISTRY
from .solve import (
    BACKEND_NAMES,
    BACKENDS,
    EXPERIMENT_DEFAULT,
    METHODS,
    PRECISIONS,
    RK4,
    Auto,
    Diffrax,
    Kernel,
    SolverOptions,
    StepSizeController,
)


class ConfigError(InputError):
    """An invalid experiment config; the message names the key path."""


@dataclasses.dataclass
class LearnedConfig:
    """A learned term from `features`: kind "state_correction" (adds to dy/dt of
    `states`), "term_closure" (closes the flux `term`; `mode` replace | scale | add, see
    `hybrid_twin.hybrid.TermClosure`), "covariate_network" (each patient's typical
    `params` moved by a network of its `covariates`: theta_i = theta_pop exp(h(cov_i)),
    trained with the population) or "neural_ode" (the pure neural ODE baseline: no
    mechanism, dy/dt of its `states` (default every state) from the features, by
    default states and inputs;
    its `input_states` keep the mechanism's dy/dt: a list of states, or "doses" for the
    states that hold doses until they act, so the network sees carbohydrate and insulin
    on board as the mechanism's absorption delivers them).
    Features without a `feature_scales` entry, and an `out_scale` of "auto" (the default),
    are scaled from the training data when training starts (`hybrid_twin.hybrid.autoscale`)."""

    kind: str = "state_correction"
    states: list[str] = dataclasses.field(default_factory=list)
    params: list[str] = dataclasses.field(default_factory=list)
    covariates: list[str] = dataclasses.field(default_factory=list)
    term: str | None = None
    mode: str = "replace"
    features: list[str] = dataclasses.field(default_factory=list)
    feature_scales: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    width: int = 16
    depth: int = 2
    out_scale: float | list[float] | str = "auto"
    day_length: float | None = None
    input_states: list[str] | str = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ModelConfig:
    """The fitted model: its registry `name`, the parameters fitted per patient (`free`;
    default those with a between-patient spread), its `learned` terms, and
    `latent_states`: extra states z1, z2, ... of the learned terms (they start at 0 and
    move only by the corrections that target them; see `hybrid_twin.hybrid.HybridModel`)."""

    name: str = "glucose.BergmanMinimal"
    free: list[str] | None = None
    learned: list[LearnedConfig] = dataclasses.field(default_factory=list)
    latent_states: int = 0


@dataclasses.dataclass
class TrainingConfig:
    """Population training of the learned terms (`hybrid_twin.population.train_population`).

    `objective`: "joint" (network and patients' parameters fitted together to all data)
    or "forecast" (each training patient's parameters fitted to its data up to
    `condition_until`, default `evaluation.condition_until`, with `refit_iter`
    Levenberg-Marquardt iterations at the start of every epoch, then held while the
    network trains on all of it). Adam at `learning_rate`, multiplied by
    `lr_decay` after `lr_patience` epochs (null: patience // 2) without a validation
    improvement above `min_delta` (relative); training stops after `patience` such epochs,
    or after `epochs`."""

    epochs: int = 200
    batch_size: int = 16
    learning_rate: float = 1e-2
    penalty_weight: float = 1e-4
    patience: int = 10
    objective: str = "joint"
    condition_until: float | None = None
    refit_iter: int = 15
    lr_decay: float = 0.5
    lr_patience: int | None = None
    min_delta: float = 1e-3


@dataclasses.dataclass
class VirtualConfig:
    """A virtual cohort: `n` patients of `model` (default: the fitted model), `doses`
    repeated `repeat_count` times every `repeat_every` (e.g. a day's meals over several
    days), observed every `obs_every` from `obs_start` to `horizon` with `noise`."""

    n: int = 100
    model: str | None = None
    seed: int = 0
    doses: list[DoseSpec] = dataclasses.field(default_factory=list)
    repeat_every: float | None = None
    repeat_count: int = 1
    obs_every: float = 1.0
    obs_start: float = 0.0
    horizon: float = 24.0
    observables: list[str] | None = None
    noise: NoiseModel = dataclasses.field(default_factory=NoiseModel)


TIME_UNITS = tuple(TIME_UNITS_S)


@dataclasses.dataclass
class DataConfig:
    """Where the cohort comes from and how it is read.

    `source`: virtual | csv (an event table, DESIGN.md) | hdf5 (a cohort file) at `path`
    (relative to the config file). For event tables: `time_unit` of the TIME column
    (s | min | h | d; null: the model's own unit), converted on import; `units`, the units
    of the columns TIME, DV, AMT and RATE where the header gives none (e.g. `{DV: ng/mL}`;
    a header may write `DV (ng/mL)` instead), converted to the model's; `ignore_columns`,
    neither standard columns nor covariates; `categorical`, what a text covariate column
    does (error | ignore | one_hot); `max_abs_value`, the largest |value| accepted in any
    numeric cell (larger ones are errors naming the row). These are errors with another
    source (a `time_unit` other than the model's too). `pseudonymise` replaces every
    patient ID on import by a keyed hash; the key comes from `pseudonym_key_file` (relative
    to the config file) or else from the environment variable named `pseudonym_key_env`,
    and is never written to the run directory; `pseudonym_map`, if set, is where the
    raw -> pseudonym mapping is written (outside the run directory). Both need
    `pseudonymise: true`."""

    source: str = "virtual"
    path: str | None = None
    virtual: VirtualConfig = dataclasses.field(default_factory=VirtualConfig)
    time_unit: str | None = None
    units: dict[str, str] = dataclasses.field(default_factory=dict)
    ignore_columns: list[str] = dataclasses.field(default_factory=list)
    categorical: str = "error"
    max_abs_value: float = MAX_ABS_VALUE
    pseudonymise: bool = False
    pseudonym_key_env: str = "HYBRID_TWIN_PSEUDONYM_KEY"
    pseudonym_key_file: str | None = None
    pseudonym_map: str | None = None


@dataclasses.dataclass
class SplitConfig:
    train: float = 0.7
    val: float = 0.15
    test: float = 0.15
    seed: int = 0


_D = EXPERIMENT_DEFAULT


@dataclasses.dataclass
class SolverConfig:
    """How every solve of the experiment runs: the `hybrid_twin.SolverOptions` it builds
    (`solver_options`); defaults are `hybrid_twin.solve.EXPERIMENT_DEFAULT`'s. `backend`
    (diffrax | ensemble | kernel | auto), `method` (tsit5 | dopri5 | kvaerno5 | rk4, with
    step `dt0`), the step-size controller (`rtol`, `atol`, `dtmax`: a number, "obs" or
    null), the per-patient step limit, and the settings owned by one backend: `kernel`
    (`block`, `warps`) and `diffrax` (`save_chunk`), used also when `auto` picks that
    backend. `precision`: the float dtype of every solve and fit (auto: float32 on a GPU,
    float64 on a CPU; float32 | float64). (Each stage picks its differentiation mode:
    calibration forward, training reverse.)"""

    backend: str = _D.backend_name
    method: str = _D.method.name
    dt0: float | None = None
    rtol: float = _D.controller.rtol
    atol: float = _D.controller.atol
    dtmax: float | str | None = _D.controller.dtmax
    max_steps: int = _D.max_steps
    precision: str = _D.precision
    kernel: Kernel = dataclasses.field(default_factory=Kernel)
    diffrax: Diffrax = dataclasses.field(default_factory=Diffrax)


@dataclasses.dataclass
class CalibrationConfig:
    """Per-patient calibration: Levenberg-Marquardt iteration limit (`max_iter`; the
    loop stops earlier once every patient has converged) and restarts (`n_starts`)."""

    max_iter: int = 100
    n_starts: int = 1


@dataclasses.dataclass
class PopulationConfig:
    fit: bool = True
    max_rounds: int = 10


@dataclasses.dataclass
class EvaluationConfig:
    condition_until: float | None = None
    metrics: list[str] = dataclasses.field(default_factory=lambda: ["rmse", "mae"])
    horizons: list[float] = dataclasses.field(default_factory=list)
    splits: list[str] = dataclasses.field(default_factory=lambda: ["train", "val", "test"])
    plot_patients: int = 6


@dataclasses.dataclass
class OutputConfig:
    dir: str = "runs/experiment"
    plots: bool = True


@dataclasses.dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    device: str = "auto"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    solver: SolverConfig = dataclasses.field(default_factory=SolverConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    split: SplitConfig = dataclasses.field(default_factory=SplitConfig)
    error_model: ErrorModel = dataclasses.field(default_factory=ErrorModel)
    calibration: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)
    population: PopulationConfig = dataclasses.field(default_factory=PopulationConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = dataclasses.field(default_factory=EvaluationConfig)
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)


METRICS = ("rmse", "mae", "bias", "coverage")
CHOICES = {
    "device": ("auto", "cpu", "gpu"),
    "data.source": ("virtual", "csv", "hdf5"),
    "data.time_unit": TIME_UNITS,
    "data.categorical": CATEGORICAL,
    "data.virtual.noise.kind": NOISE,
    "error_model.kind": ERROR_KINDS,
    "solver.backend": BACKEND_NAMES,
    "solver.method": tuple(METHODS),
    "solver.precision": PRECISIONS,
    "training.objective": ("joint", "forecast"),
}
MOVED = {"calibration.backend": "solver.backend", "calibration.rtol": "solver.rtol",
         "calibration.atol": "solver.atol", "solver.kernel_block": "solver.kernel.block",
         "solver.kernel_warps": "solver.kernel.warps"}
LEARNED_KINDS = ("state_correction", "term_closure", "covariate_network", "neural_ode")
OPTIONAL_CHOICES = frozenset({"data.time_unit"})
"""Keys of `CHOICES` that may also be null."""
POSITIVE = ("data.virtual.n", "data.virtual.obs_every", "data.virtual.horizon",
            "data.virtual.repeat_count",
            "data.max_abs_value", "solver.rtol", "solver.atol", "solver.max_steps",
            "calibration.max_iter", "calibration.n_starts", "population.max_rounds",
            "training.epochs", "training.batch_size", "training.learning_rate",
            "training.patience", "training.refit_iter", "training.lr_decay")
NONNEGATIVE = ("seed", "split.seed", "data.virtual.seed")
PATH_KEYS = ("data.path", "data.pseudonym_key_file", "data.pseudonym_map")
"""Keys holding file paths: relative to the config file that sets them (to the current
directory when set by `--set` or a dict), stored absolute."""
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _check_choice(path: str, value: Any) -> None:
    if value is None and path in OPTIONAL_CHOICES:
        return
    if value not in CHOICES[path]:
        extra = " or null" if path in OPTIONAL_CHOICES else ""
        raise ConfigError(f"{path}: {value!r} is not one of {', '.join(CHOICES[path])}{extra}")


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for a in args[:-1]:
            try:
                return _convert(a, value, path)
            except ConfigError:
                pass
        return _convert(args[-1], value, path)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return _from_dict(tp, value, path)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        _, vt = typing.get_args(tp)
        return {str(k): _convert(vt, v, f"{path}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # "1e-6" from a dict read by another YAML loader
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {tp}")


def _from_dict(cls: type, data: dict, path: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if full in MOVED:
            raise ConfigError(f"config key {full!r} has moved to {MOVED[full]!r}")
        if key not in names:
            hint = difflib.get_close_matches(str(key), names, n=1)
            extra = f"; did you mean {(path + '.' if path else '') + hint[0]!r}?" if hint else ""
            raise ConfigError(f"unknown config key {full!r}{extra} "
                              f"(valid here: {', '.join(names)})")
        kwargs[key] = _convert(hints[key], value, full)
        if full in CHOICES:
            _check_choice(full, kwargs[key])
    if cls is ErrorModel:
        _check_error_model(kwargs, path)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required key is missing
        missing = str(e).split("argument", 1)[-1].strip(": ")
        raise ConfigError(f"{path or 'config'}: missing required key {missing}") from None
    except ValueError as e:  # the library object's own check
        raise ConfigError(f"{path or 'config'}: {e}") from None


def _check_error_model(kwargs: dict, path: str) -> None:
    """The SDs the error model's kind uses must be finite and > 0: the fixed residual SDs
    (`estimate: false`) or the starting values that estimation scales."""
    defaults = ErrorModel()
    kind = kwargs.get("kind", defaults.kind)
    used = {"additive": ("additive",), "proportional": ("proportional",),
            "combined": ("additive", "proportional")}.get(kind, ())
    estimate = kwargs.get("estimate", defaults.estimate)
    for name in used:
        value = kwargs.get(name, getattr(defaults, name))
        if not (value > 0 and math.isfinite(value)):
            role = "starting value of the estimated" if estimate else "fixed"
            raise ConfigError(f"{path}.{name}: must be a finite number > 0 for kind {kind!r} "
                              f"(the {role} residual SD), got {value!r}")


def solver_options(cfg: ExperimentConfig) -> SolverOptions:
    """The `SolverOptions` of the config's `solver` section."""
    s = cfg.solver
    method = RK4(s.dt0) if s.method == "rk4" else METHODS[s.method]()
    if s.dt0 is not None and s.method != "rk4":
        raise ConfigError(f"solver.dt0: only method rk4 takes a fixed step; method "
                          f"{s.method} chooses its own steps (remove solver.dt0)")
    backend = {"kernel": s.kernel, "diffrax": s.diffrax,
               "auto": Auto(kernel=s.kernel, diffrax=s.diffrax)}.get(s.backend) or \
        BACKENDS[s.backend]()
    return SolverOptions(method=method,
                         controller=StepSizeController(s.rtol, s.atol, s.dtmax),
                         max_steps=s.max_steps, backend=backend, precision=s.precision)


def _validate(cfg: ExperimentConfig, check_paths: bool = True) -> None:
    for path in CHOICES:
        _check_choice(path, _get(cfg, path))
    for path in POSITIVE:
        value = _get(cfg, path)
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"{path}: must be {'finite' if value > 0 else '> 0'}, got "
                              f"{value!r}")
    for path in NONNEGATIVE:
        if _get(cfg, path) < 0:
            raise ConfigError(f"{path}: must be >= 0, got {_get(cfg, path)!r}")
    try:
        solver_options(cfg)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"solver: {e}") from None
    fr = (cfg.split.train, cfg.split.val, cfg.split.test)
    if min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-9:
        raise ConfigError(f"split: train + val + test must be fractions summing to 1, got {fr}")
    _check_data(cfg.data, check_paths)
    check_private_paths(cfg, cfg.output.dir)
    if cfg.model.name not in REGISTRY:
        hint = difflib.get_close_matches(cfg.model.name, REGISTRY, n=1)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ConfigError(f"model.name: unknown model {cfg.model.name!r}{extra} "
                          f"(available: {', '.join(REGISTRY)})")
    model = REGISTRY[cfg.model.name]()
    for i, name in enumerate(cfg.model.free or []):
        if name not in model.param_names:
            raise ConfigError(f"model.free[{i}]: {name!r} is not a parameter of "
                              f"{cfg.model.name} ({', '.join(model.param_names)})")
    vmodel = cfg.data.virtual.model
    if cfg.data.source == "virtual" and vmodel is not None:
        if vmodel not in REGISTRY:
            hint = difflib.get_close_matches(vmodel, REGISTRY, n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(f"data.virtual.model: unknown model {vmodel!r}{extra} "
                              f"(available: {', '.join(REGISTRY)})")
        truth = REGISTRY[vmodel]()
        observed = cfg.data.virtual.observables or truth.observable_names
        targets = [d.target for d in cfg.data.virtual.doses]
        for what, names in (("observables", observed), ("dose targets", targets)):
            attr = "observable_names" if what == "observables" else "dose_target_names"
            missing = sorted({x for x in names
                              if x not in getattr(truth, attr) or x not in getattr(model, attr)})
            if missing:
                raise ConfigError(
                    f"data.virtual.model: {vmodel} cannot generate data for {cfg.model.name}: "
                    f"{what} {', '.join(missing)} are not {what} of both "
                    f"({', '.join(getattr(truth, attr))} vs {', '.join(getattr(model, attr))}); "
                    f"list the shared ones in data.virtual.observables")
        if truth.input_names != model.input_names:
            raise ConfigError(
                f"data.virtual.model: {vmodel} cannot generate data for {cfg.model.name}: "
                f"input channels differ ({', '.join(truth.input_names)} vs "
                f"{', '.join(model.input_names)})")
    for i, d in enumerate(cfg.data.virtual.doses):
        if d.target not in model.dose_target_names:
            raise ConfigError(f"data.virtual.doses[{i}].target: {d.target!r} is not a dose "
                              f"target of {cfg.model.name} ({', '.join(model.dose_target_names)})")
    for i, lt in enumerate(cfg.model.learned):
        where = f"model.learned[{i}]"
        if lt.kind not in LEARNED_KINDS:
            raise ConfigError(f"{where}.kind: {lt.kind!r} is not one of "
                              f"{', '.join(LEARNED_KINDS)}")
        if lt.kind == "neural_ode" and len(cfg.model.learned) > 1:
            raise ConfigError(f"{where}.kind: a neural_ode replaces the whole model and "
                              "cannot be combined with other learned terms")
        if lt.mode not in ("replace", "scale", "add"):
            raise ConfigError(f"{where}.mode: {lt.mode!r} is not one of replace, scale, add")
        if lt.input_states and lt.kind != "neural_ode":
            raise ConfigError(f"{where}.input_states: only a neural_ode has input states "
                              f"(kind here: {lt.kind})")
        if isinstance(lt.input_states, str):
            if lt.input_states != "doses":
                raise ConfigError(f"{where}.input_states: expected a list of states or "
                                  f"'doses', got {lt.input_states!r}")
            if set(dose_input_states(model)) >= set(model.state_names):
                raise ConfigError(f"{where}.input_states: 'doses' is every state of "
                                  f"{cfg.model.name} ({', '.join(model.state_names)}); "
                                  "list the absorption states instead")
        else:
            for j, st in enumerate(lt.input_states):
                if st not in model.state_names:
                    raise ConfigError(f"{where}.input_states[{j}]: {st!r} is not a state of "
                                      f"{cfg.model.name} ({', '.join(model.state_names)})")
        if lt.kind == "neural_ode" and lt.input_states and lt.states:
            inputs = input_states_of(model, lt.input_states)
            both = [st for st in lt.states if st in inputs]
            if both:
                raise ConfigError(f"{where}.states: {', '.join(both)} are input states "
                                  "(moved by the mechanism), not driven by the network")
        states = (*model.state_names, *latent_names(cfg.model.latent_states))
        for j, st in enumerate(lt.states):
            if st not in states:
                raise ConfigError(f"{where}.states[{j}]: {st!r} is not a state of "
                                  f"{cfg.model.name} ({', '.join(states)})")
        if lt.kind == "covariate_network":
            if not lt.params or not lt.covariates:
                raise ConfigError(f"{where}: a covariate_network needs params and covariates")
            if sum(x.kind == "covariate_network" for x in cfg.model.learned) > 1:
                raise ConfigError(f"{where}.kind: one covariate_network per model")
            for j, q in enumerate(lt.params):
                if q not in model.param_names:
                    raise ConfigError(f"{where}.params[{j}]: {q!r} is not a parameter of "
                                      f"{cfg.model.name} ({', '.join(model.param_names)})")
            if cfg.data.source == "virtual":
                raise ConfigError(f"{where}: virtual cohorts carry no covariates; use "
                                  "data.source csv or hdf5")
        if lt.kind == "term_closure":
            if not lt.term:
                raise ConfigError(f"{where}.term: required for a term_closure")
            p = model.param_dict(model.typical_params())
            terms = list(model.fluxes(0.0, model.initial_state(p), p,
                                      {n: 0.0 for n in model.input_names}))
            if lt.term not in terms:
                hint = difflib.get_close_matches(lt.term, terms, n=1)
                extra = f"; did you mean {hint[0]!r}?" if hint else ""
                raise ConfigError(f"{where}.term: {lt.term!r} is not a term of "
                                  f"{cfg.model.name}{extra} ({', '.join(terms)})")
        valid = (*feature_names(model), *latent_names(cfg.model.latent_states))
        for j, f in enumerate(lt.features):
            if f not in valid:
                hint = difflib.get_close_matches(f, valid, n=1)
                extra = f"; did you mean {hint[0]!r}?" if hint else ""
                raise ConfigError(f"{where}.features[{j}]: {f!r} is not a feature of "
                                  f"{cfg.model.name}{extra} (valid: {', '.join(valid)})")
        if isinstance(lt.out_scale, str) and lt.out_scale != "auto":
            raise ConfigError(f"{where}.out_scale: expected a number, a list of numbers or "
                              f"'auto', got {lt.out_scale!r}")
        for k, v in lt.feature_scales.items():
            if len(v) != 2 or v[1] == 0:
                raise ConfigError(f"{where}.feature_scales.{k}: expected [shift, scale != 0]")
    if cfg.model.latent_states < 0:
        raise ConfigError(f"model.latent_states: expected an integer >= 0, got "
                          f"{cfg.model.latent_states!r}")
    if cfg.model.latent_states and not any(
            lt.kind in ("state_correction", "neural_ode") for lt in cfg.model.learned):
        raise ConfigError("model.latent_states: latent states move only by a "
                          "state_correction or a neural_ode in model.learned; there is none")
    if cfg.model.learned:
        tr = cfg.training
        if tr.objective == "forecast" and training_condition_until(cfg) is None:
            raise ConfigError("training.objective: forecast needs training.condition_until "
                              "or evaluation.condition_until (where each training "
                              "patient's fitted window ends)")
        if not 0 < tr.lr_decay <= 1:
            raise ConfigError(f"training.lr_decay: expected a number in (0, 1], got "
                              f"{tr.lr_decay!r}")
        if tr.lr_patience is not None and tr.lr_patience < 1:
            raise ConfigError(f"training.lr_patience: expected an integer >= 1 or null, got "
                              f"{tr.lr_patience!r}")
        if not tr.min_delta >= 0:
            raise ConfigError(f"training.min_delta: expected a number >= 0, got "
                              f"{tr.min_delta!r}")
        if not cfg.split.val > 0:
            raise ConfigError("split.val: training learned terms (model.learned) needs "
                              "validation patients, to stop when the forecast stops "
                              f"improving; got split.val={cfg.split.val!r}")
    for i, metric in enumerate(cfg.evaluation.metrics):
        if metric not in METRICS:
            raise ConfigError(f"evaluation.metrics[{i}]: {metric!r} is not one of "
                              f"{', '.join(METRICS)}")
    if cfg.evaluation.horizons and cfg.evaluation.condition_until is None:
        raise ConfigError("evaluation.horizons: needs evaluation.condition_until")
    for i, h in enumerate(cfg.evaluation.horizons):
        if not h > 0:
            raise ConfigError(f"evaluation.horizons[{i}]: must be > 0, got {h!r}")
    for s in cfg.evaluation.splits:
        if s not in ("train", "val", "test"):
            raise ConfigError(f"evaluation.splits: {s!r} is not one of train, val, test")


def training_condition_until(cfg: ExperimentConfig) -> float | None:
    """Where the forecast objective ends each training patient's fitted window:
    `training.condition_until`, else `evaluation.condition_until`; None for the joint
    objective."""
    if cfg.training.objective != "forecast":
        return None
    tc = cfg.training.condition_until
    return tc if tc is not None else cfg.evaluation.condition_until


def _check_data(data: DataConfig, check_paths: bool) -> None:
    """The data section: a path for csv/hdf5 that (with `check_paths`) is a regular file
    of the declared kind; no option that would have no effect; with `pseudonymise`
    (and `check_paths`), a usable key in its file or environment variable."""
    if not data.pseudonym_key_env.strip():
        raise ConfigError("data.pseudonym_key_env: must name an environment variable")
    for i, col in enumerate(data.ignore_columns):
        if not col.strip():
            raise ConfigError(f"data.ignore_columns[{i}]: empty column name")
    if data.source in ("csv", "hdf5") and not data.path:
        raise ConfigError(f"data.path: required when data.source is {data.source!r}")
    try:
        check_data_options(data)
        if not check_paths:
            return
        if data.source in ("csv", "hdf5"):
            _check_data_file(data.source, Path(data.path))
        if data.pseudonymise:
            load_pseudonym_key(data.pseudonym_key_env, data.pseudonym_key_file)
    except ConfigError:
        raise
    except InputError as e:
        raise ConfigError(str(e)) from None
    if data.pseudonym_map is not None and not Path(data.pseudonym_map).parent.is_dir():
        raise ConfigError(f"data.pseudonym_map: directory not found: "
                          f"{Path(data.pseudonym_map).parent}")


def _check_data_file(source: str, path: Path) -> None:
    if not path.exists():
        raise ConfigError(f"data.path: file not found: {path}")
    if path.is_dir():
        raise ConfigError(f"data.path: {path} is a directory; expected "
                          f"{'a CSV event table' if source == 'csv' else 'an HDF5 cohort'} file")
    if not path.is_file():
        raise ConfigError(f"data.path: {path} is not a regular file")
    with open(path, "rb") as fh:
        head = fh.read(len(HDF5_SIGNATURE))
    if source == "csv":
        if head == HDF5_SIGNATURE:
            raise ConfigError(f"data.path: {path} is an HDF5 file, not a CSV event table "
                              "(set data.source: hdf5)")
        if path.suffix.lower() in (".yaml", ".yml"):
            raise ConfigError(f"data.path: {path} is a YAML file, not a CSV event table "
                              "(a config file given as data?)")
    elif head != HDF5_SIGNATURE:
        if not head:
            raise ConfigError(f"data.path: {path} is empty; expected an HDF5 cohort file")
        raise ConfigError(f"data.path: {path} is not an HDF5 file (no HDF5 signature); it "
                          "looks like a CSV/text file: set data.source: csv for an event table")


def check_private_paths(cfg: ExperimentConfig, run_dir: str | os.PathLike) -> None:
    """The pseudonymisation key file and mapping must lie outside the run directory
    `run_dir` (the run directory must hold no way back to the raw IDs)."""
    root = Path(run_dir).expanduser().resolve()
    for key in ("data.pseudonym_key_file", "data.pseudonym_map"):
        value = _get(cfg, key)
        if value is not None and Path(value).resolve().is_relative_to(root):
            raise ConfigError(f"{key}: {value} lies inside the run directory {root}; "
                              "keep it outside")


def check_device(cfg: ExperimentConfig) -> None:
    """`device: gpu` needs JAX to see a GPU; raises `ConfigError` otherwise. (`auto` takes
    whatever JAX has; `cpu` is always available.)"""
    if cfg.device != "gpu":
        return
    import jax

    platforms = sorted({d.platform for d in jax.devices()})
    if "gpu" not in platforms:
        raise ConfigError(f"device: gpu requested but JAX sees only {', '.join(platforms)} "
                          "devices (install jax[cuda12] or set device: auto/cpu)")


def _get(cfg: Any, path: str) -> Any:
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


class ConfigLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` with YAML 1.2 floats (`1e-6`, `1E+3`, `.5`, `5.` are numbers;
    1.1 reads `1e-6` as a string) and duplicate mapping keys as errors."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if first is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {first.line + 1}, "
                        f"column {first.column + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep)


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
                    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _yaml_problem(e: yaml.YAMLError, where: str, *, columns_only: bool = False) -> str:
    """One line from a pyyaml error: `where:line:column: problem (context at ...)`."""
    def at(mark) -> str:
        if columns_only:
            return f"column {mark.column + 1}"
        return f"line {mark.line + 1}, column {mark.column + 1}"

    if isinstance(e, yaml.reader.ReaderError):
        return (f"{where}: character {e.character!r} at position {e.position} is not "
                "allowed in YAML (a binary file?)")
    if not isinstance(e, yaml.MarkedYAMLError):
        return f"{where}: {e}"
    mark = e.problem_mark or e.context_mark
    if mark is None:
        head = where
    elif columns_only:
        head = f"{where}: {at(mark)}"
    else:
        head = f"{where}:{mark.line + 1}:{mark.column + 1}"
    text = f"{head}: {e.problem or e.context}"
    if e.problem and e.context and e.context_mark is not None:
        text += f" ({e.context} at {at(e.context_mark)})"
    return text


def _parse_yaml(text: str, where: str, *, columns_only: bool = False) -> Any:
    try:
        return yaml.load(text, Loader=ConfigLoader)
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_problem(e, where, columns_only=columns_only)) from None


def _read_config_file(path: Path) -> dict:
    """The mapping in a YAML config file; a `ConfigError` naming the file (and line,
    column or byte offset) for anything else."""
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a config file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise ConfigError(f"{path}: a binary file (NUL byte at byte offset {nul}), not a "
                          "YAML config")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte offset "
                          f"{e.start}); a config is a UTF-8 YAML file") from None
    data = _parse_yaml(text, str(path))
    if data is None:
        raise ConfigError(f"{path}: the config file is empty (only comments or blank lines); "
                          "expected a mapping of config keys, e.g. configs/quickstart.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys, got "
                          f"{type(data).__name__}")
    return data


def _apply_override(data: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY.SUB=VALUE")
    key, raw = item.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set {item!r}: empty key; expected KEY.SUB=VALUE")
    value = _parse_yaml(raw, f"--set {item!r}", columns_only=True)
    parts = key.strip().split(".")
    node = data

    def index(node, p):
        """A list item by position (model.learned.0.width) or a mapping's key."""
        if isinstance(node, list):
            if not (p.isdigit() and int(p) < len(node)):
                raise ConfigError(f"--set {key}: {p!r} is not an index of a list of "
                                  f"{len(node)} items")
            return int(p)
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: the value before {p!r} is not a mapping")
        return p

    for p in parts[:-1]:
        i = index(node, p)
        if isinstance(node, dict) and i not in node:
            node[i] = {}
        node = node[i]
    node[index(node, parts[-1])] = value


def _anchor_paths(data: dict, base: Path) -> None:
    """Make the relative paths of `PATH_KEYS` in raw config data absolute against `base`
    (`~` expanded); values of the wrong type are left for validation to report."""
    for key in PATH_KEYS:
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(leaf), str) and node[leaf]:
            path = Path(node[leaf]).expanduser()
            node[leaf] = str(path if path.is_absolute() else (base / path).resolve())


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict | None = None, *, check_paths: bool = True) -> ExperimentConfig:
    """Read a YAML config file (or a dict), apply `KEY.SUB=VALUE` overrides (values read
    as YAML), validate (with `check_paths`, also the data file and the pseudonymisation
    key file on disk). Relative paths resolve against the config file's directory, those
    of overrides and of `data` against the current directory."""
    if data is None:
        data = {}
        if path is not None:
            data = _read_config_file(Path(path))
            _anchor_paths(data, Path(path).absolute().parent)
    data = _deepcopy(data)
    for item in overrides or []:
        _apply_override(data, item)
    _anchor_paths(data, Path.cwd())
    cfg = _from_dict(ExperimentConfig, data)
    _validate(cfg, check_paths)
    return cfg


def _deepcopy(x):
    if isinstance(x, dict):
        return {k: _deepcopy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deepcopy(v) for v in x]
    return x


def resolved(cfg: ExperimentConfig) -> dict:
    """The full config as plain data, defaults filled in."""
    return dataclasses.asdict(cfg)
