"""Hybrid models: a mechanistic model plus small learned terms (equinox networks).

Three kinds of learned term (DESIGN.md):

1. `StateCorrection` — dy/dt = f(t, y, p, u) + g_phi(features) on all or selected states;
2. `TermClosure` — a named flux of the mechanistic model is replaced by g_phi(features);
3. `CovariateNetwork` — individual parameters theta_i = theta_pop * exp(h_phi(cov_i) + eta_i).

`HybridModel` combines a mechanistic model with corrections and closures and presents the
same interface as the mechanistic model (declaration, `initial_state`, `vector_field`), so
`simulate`, calibration and I/O take it unchanged. With `learned=False` its vector field is
the mechanistic model's, exactly; and a freshly built term starts at zero output (its last
layer is zero-initialised), so training starts from the mechanism. `neural_ode` builds the
pure neural ODE baseline over the same states, doses and observables.

Features are named: a state name, an input channel, a parameter name, "<dose
target>_on_board" (what a dose to that target leaves still to act: the sum of the states
`DoseTarget.on_board` names, e.g. carbohydrate and insulin on board), "time" (the model's
time unit) or "sin_day"/"cos_day" (time of day; `day_length` in the model's unit). Every
network has fixed input shifts/scales and an output scale, so it sees O(1) inputs and
produces outputs in the state's unit per time unit. Scales not given are set from the
data by `autoscale` when training starts (`ScaledMLP.auto_in`, `auto_out`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .models.base import MechanisticModel, State
from .simulate import simulate

TIME_FEATURES = ("time", "sin_day", "cos_day")
ON_BOARD = "_on_board"


def feature_names(model: MechanisticModel) -> tuple[str, ...]:
    """Every feature a learned term of `model` can see (see the module docstring)."""
    return (*model.state_names, *model.input_names, *model.param_names,
            *(d.name + ON_BOARD for d in model.dose_targets), *TIME_FEATURES)


def _on_board(model: MechanisticModel, target: str, y):
    """The amount of doses to `target` still to act: the sum of its `on_board` states."""
    d = model.dose_targets[model.index("dose_target", target)]
    total = 0.0
    for s_ in d.on_board or (d.state,):
        total = total + y[model.index("state", s_)]
    return total


def _column(g, k: int):
    """Output k of a network: g[..., k] of an array, or g[k] of a list of outputs."""
    return g[k] if isinstance(g, (list, tuple)) else g[..., k]


class ScaledMLP(eqx.Module):
    """`eqx.nn.MLP` with fixed input standardisation and output scale.

    out = out_scale * mlp((x - in_shift) / in_scale); the last layer starts at zero.
    Works on one feature vector `(F,)`, a batch `(..., F)`, or a list of F feature arrays.
    Where the weights are not arrays but scalar views (inside the kernel backend, which
    loads each weight once as a scalar), the network is evaluated neuron by neuron on the
    list: only elementwise arithmetic on per-patient vectors, which Triton lowers.
    """

    mlp: eqx.nn.MLP
    in_shift: jax.Array
    in_scale: jax.Array
    out_scale: jax.Array
    auto_in: tuple[bool, ...] = eqx.field(static=True)
    auto_out: bool = eqx.field(static=True)

    def __init__(self, in_size: int, out_size: int, *, width: int = 32, depth: int = 2,
                 key: jax.Array, in_shift: Any = None, in_scale: Any = None,
                 out_scale: Any = 1.0, activation=jax.nn.softplus,
                 auto_in: Sequence[bool] | None = None, auto_out: bool = False):
        mlp = eqx.nn.MLP(in_size, out_size, width, depth, activation=activation, key=key)
        last = mlp.layers[-1]
        last = eqx.tree_at(lambda l: (l.weight, l.bias), last,
                           (jnp.zeros_like(last.weight), jnp.zeros_like(last.bias)))
        self.mlp = eqx.tree_at(lambda m: m.layers[-1], mlp, last)
        self.in_shift = jnp.zeros(in_size) if in_shift is None else jnp.asarray(in_shift, float)
        self.in_scale = jnp.ones(in_size) if in_scale is None else jnp.asarray(in_scale, float)
        self.out_scale = jnp.broadcast_to(jnp.asarray(out_scale, float), (out_size,))
        self.auto_in = tuple(bool(a) for a in (auto_in or (False,) * in_size))
        self.auto_out = bool(auto_out)

    def __call__(self, x: jax.Array | Sequence[jax.Array]) -> jax.Array | list:
        if isinstance(x, (list, tuple)):
            if not isinstance(self.mlp.layers[0].weight, (jax.Array, np.ndarray)):
                return self._lanes(x)
            shape = jnp.broadcast_shapes(*[jnp.shape(c) for c in x])
            x = jnp.stack([jnp.broadcast_to(c, shape) for c in x], axis=-1)
        shift = jax.lax.stop_gradient(self.in_shift)
        scale = jax.lax.stop_gradient(self.in_scale)
        out_scale = jax.lax.stop_gradient(self.out_scale)
        z = (x - shift.astype(x.dtype)) / scale.astype(x.dtype)
        if z.ndim == 1:
            return out_scale.astype(x.dtype) * self.mlp(z)
        flat = z.reshape(-1, z.shape[-1])
        out = jax.vmap(self.mlp)(flat).reshape(z.shape[:-1] + (-1,))
        return out_scale.astype(x.dtype) * out

    def _lanes(self, xs):
        """The network on a list of F feature vectors, neuron by neuron; returns a list of
        outputs. Weights are indexed as w[j, f] (arrays, or scalar-loading views of
        kernel refs); activations must be elementwise (softplus, tanh, ...)."""
        z = [(x - self.in_shift[f]) / self.in_scale[f] for f, x in enumerate(xs)]
        layers = self.mlp.layers
        for li, layer in enumerate(layers):
            out_dim, in_dim = layer.weight.shape
            new = []
            for j in range(out_dim):
                acc = layer.bias[j] if layer.use_bias else 0.0
                for f in range(in_dim):
                    acc = acc + layer.weight[j, f] * z[f]
                new.append(acc)
            act = self.mlp.activation if li < len(layers) - 1 else self.mlp.final_activation
            z = [act(v) for v in new]
        return [self.out_scale[k] * v for k, v in enumerate(z)]


def _features(model: MechanisticModel, names: Sequence[str], t, y, p, u, day_length):
    cols = []
    for name in names:
        if name in model.state_names:
            cols.append(y[model.state_names.index(name)])
        elif name in model.input_names:
            cols.append(u[name])
        elif name in model.param_names:
            cols.append(p[name])
        elif name.endswith(ON_BOARD) and name[:-len(ON_BOARD)] in model.dose_target_names:
            cols.append(_on_board(model, name[:-len(ON_BOARD)], y))
        elif name == "time":
            cols.append(t)
        elif name == "sin_day":
            cols.append(jnp.sin(2 * math.pi * t / day_length))
        elif name == "cos_day":
            cols.append(jnp.cos(2 * math.pi * t / day_length))
        else:
            raise KeyError(f"unknown feature {name!r}; use one of "
                           f"{', '.join(feature_names(model))}")
    shape = jnp.broadcast_shapes(*[jnp.shape(c) for c in cols])
    return [jnp.broadcast_to(c, shape) for c in cols]


def _evaluate(net, cols: list):
    """A learned term's network on its feature columns: a `ScaledMLP` takes the list (and
    evaluates neuron by neuron inside the kernel backend); any other network gets the
    features stacked on the last axis."""
    if isinstance(net, ScaledMLP):
        return net(cols)
    return net(jnp.stack(cols, axis=-1))


class LearnedTerm(eqx.Module):
    """What `HybridModel` composes: a network `net` (usually a `ScaledMLP`) of named
    inputs, and the size penalty of its weights. The kinds differ only in where the
    output goes: `StateCorrection` (into dy/dt), `TermClosure` (into a named flux of the
    mechanism) and `CovariateNetwork` (into the patients' typical parameters)."""

    net: eqx.AbstractVar[Any]

    def penalty(self) -> jax.Array:
        """Sum of squared weights of the network's layers."""
        layers = getattr(getattr(self.net, "mlp", None), "layers", ())
        return sum((jnp.sum(layer.weight ** 2) for layer in layers), jnp.zeros(()))


class StateCorrection(LearnedTerm):
    """Adds g_phi(features) to dy/dt of `states` (names)."""

    net: ScaledMLP
    states: tuple[str, ...] = eqx.field(static=True)
    features: tuple[str, ...] = eqx.field(static=True)


CLOSURE_MODES = ("replace", "scale", "add")


class TermClosure(LearnedTerm):
    """Closure of the mechanistic flux `term` (value F) by g = g_phi(features).

    mode "replace": F -> g; "scale": F -> F * (1 + g) (a learned relative modulation of
    the term, e.g. a time-of-day change of insulin sensitivity); "add": F -> F + g.
    A zero-initialised network leaves the term as it is in "scale" and "add" modes.
    """

    net: ScaledMLP
    term: str = eqx.field(static=True)
    features: tuple[str, ...] = eqx.field(static=True)
    mode: str = eqx.field(static=True, default="replace")

    def __check_init__(self):
        if self.mode not in CLOSURE_MODES:
            raise ValueError(f"TermClosure mode must be one of {CLOSURE_MODES}, "
                             f"got {self.mode!r}")

    def apply(self, flux: Any, g: Any) -> Any:
        """The closed term from the mechanistic value `flux` and the network output `g`."""
        if self.mode == "scale":
            return flux * (1.0 + g)
        if self.mode == "add":
            return flux + g
        return g


class CovariateNetwork(LearnedTerm):
    """Offsets of `params` in the fitting space from covariates: theta_i = theta_pop *
    exp(h_phi(covariates_i)) for log-transformed parameters (DESIGN.md, kind 3)."""

    net: ScaledMLP
    params: tuple[str, ...] = eqx.field(static=True)
    covariates: tuple[str, ...] = eqx.field(static=True)

    def __call__(self, covariates: jax.Array) -> jax.Array:
        """(N, C) covariates -> (N, len(params)) offsets in the unconstrained space."""
        return self.net(covariates)

    def columns(self, covariate_names: Sequence[str]) -> list[int]:
        """Where this network's covariates are among a cohort's `covariate_names`."""
        missing = [c for c in self.covariates if c not in covariate_names]
        if missing:
            raise KeyError(f"the covariate network needs covariate(s) {missing}; the cohort "
                           f"has {list(covariate_names) or 'none'}")
        return [list(covariate_names).index(c) for c in self.covariates]

    def offsets(self, model: MechanisticModel, covariates: jax.Array) -> jax.Array:
        """(N, C) covariates -> (N, P) offsets of all of `model`'s parameters in the
        unconstrained space (0 for those this network does not move)."""
        h = self(covariates)
        idx = jnp.asarray([model.index("param", q) for q in self.params])
        return jnp.zeros((h.shape[0], model.n_params), h.dtype).at[:, idx].add(h)

    def apply(self, model: MechanisticModel, typical: jax.Array, covariates: jax.Array,
              eta: jax.Array | None = None) -> jax.Array:
        """Individual parameters (N, P) from typical values, covariates and random effects
        `eta` (N, P, unconstrained space; default 0)."""
        z = model.to_unconstrained(jnp.asarray(typical)) + self.offsets(model, covariates)
        if eta is not None:
            z = z + eta
        return model.from_unconstrained(z)


class HybridModel(MechanisticModel):
    """A mechanistic model with learned corrections and closures; same interface.

    `latent` names extra dimensionless states of the learned terms (augmented dynamics,
    e.g. a hidden reservoir the mechanism lacks): they start at 0, move only by the
    corrections that target them, and are features like any state. They come after the
    mechanism's states; observables and doses do not see them.

    `input_states`, with the mechanism off (`use_mechanism=False`, a neural ODE), are the
    states whose dy/dt stays the mechanism's: the absorption chains that turn doses into
    the inputs the network sees (carbohydrate and insulin on board), not physiology.
    """

    mechanistic: MechanisticModel
    corrections: tuple[StateCorrection, ...] = ()
    closures: tuple[TermClosure, ...] = ()
    covariate_net: CovariateNetwork | None = None
    learned: bool = eqx.field(static=True, default=True)
    use_mechanism: bool = eqx.field(static=True, default=True)
    day_length: float = eqx.field(static=True, default=24.0)
    latent: tuple[str, ...] = eqx.field(static=True, default=())
    input_states: tuple[str, ...] = eqx.field(static=True, default=())

    def __check_init__(self):
        clash = set(self.latent) & set(self.mechanistic.state_names)
        if clash:
            raise KeyError(f"latent state names {sorted(clash)} are states of "
                           f"{type(self.mechanistic).__name__}")
        names = set(self.state_names)
        bad = set(self.input_states) - set(self.mechanistic.state_names)
        if bad:
            raise KeyError(f"input_states {sorted(bad)} are not states of "
                           f"{type(self.mechanistic).__name__}; states: "
                           f"{', '.join(self.mechanistic.state_names)}")
        for c in self.corrections:
            bad = set(c.states) - names
            if bad:
                raise KeyError(f"StateCorrection targets unknown states {sorted(bad)}; "
                               f"states: {', '.join(self.state_names)}")

    # the declaration is the mechanistic model's, plus the latent states
    @property
    def states(self):
        return self.mechanistic.states + tuple(
            State(n, "1", "latent state of the learned terms") for n in self.latent)

    @property
    def parameters(self):
        return self.mechanistic.parameters

    @property
    def observables(self):
        return self.mechanistic.observables

    @property
    def dose_targets(self):
        return self.mechanistic.dose_targets

    @property
    def inputs(self):
        return self.mechanistic.inputs

    @property
    def time_unit(self):
        return self.mechanistic.time_unit

    @property
    def reference(self):
        return self.mechanistic.reference

    def initial_state(self, p):
        y0 = tuple(self.mechanistic.initial_state(p))
        return y0 + tuple(0.0 * y0[0] for _ in self.latent)

    def fluxes(self, t, y, p, u):
        flux = dict(self.mechanistic.fluxes(t, y[:self.mechanistic.n_states], p, u))
        if self.learned:
            for c in self.closures:
                if c.term not in flux:
                    raise KeyError(f"TermClosure replaces unknown term {c.term!r}; terms of "
                                   f"{type(self.mechanistic).__name__}: {', '.join(flux)}")
                x = _features(self, c.features, t, y, p, u, self.day_length)
                flux[c.term] = c.apply(flux[c.term], _column(_evaluate(c.net, x), 0))
        return flux

    def derivatives(self, y, p, u, flux):
        n = self.mechanistic.n_states
        dy = tuple(self.mechanistic.derivatives(y[:n], p, u, flux))
        return dy + tuple(0.0 * yi for yi in y[n:])

    def vector_field(self, t, y, p, u):
        if self.use_mechanism:
            dy = list(self.derivatives(y, p, u, self.fluxes(t, y, p, u)))
        else:
            dy = [0.0 * yi for yi in y]
            if self.input_states:
                mech = self.derivatives(y, p, u, self.fluxes(t, y, p, u))
                for s in self.input_states:
                    i = self.mechanistic.index("state", s)
                    dy[i] = mech[i]
        if self.learned:
            names = self.state_names
            for c in self.corrections:
                x = _features(self, c.features, t, y, p, u, self.day_length)
                g = _evaluate(c.net, x)
                for k, s in enumerate(c.states):
                    i = names.index(s)
                    dy[i] = dy[i] + _column(g, k)
        return tuple(dy)

    def switched_off(self) -> HybridModel:
        """The same model with its learned part off: exactly the mechanistic model."""
        return dataclasses.replace(self, learned=False)

    @property
    def terms(self) -> tuple[LearnedTerm, ...]:
        """Every learned term."""
        cov = (self.covariate_net,) if self.covariate_net is not None else ()
        return (*self.corrections, *self.closures, *cov)

    def penalty(self) -> jax.Array:
        """Sum of squared weights of the learned terms' layers (the size penalty)."""
        return sum((t.penalty() for t in self.terms), jnp.zeros(()))

    def individual_typical(self, typical: Any, covariates: jax.Array,
                           covariate_names: Sequence[str]) -> jax.Array:
        """Each patient's typical parameters `(N, P)`: `typical` moved by the covariate
        network (when there is one and the learned part is on)."""
        net = self.covariate_net
        if net is None or not self.learned:
            return self.mechanistic.individual_typical(typical, covariates, covariate_names)
        x = jnp.asarray(covariates)[:, jnp.asarray(net.columns(covariate_names), int)]
        return net.apply(self.mechanistic, typical, x)

    def covariate_offsets(self, covariates: jax.Array,
                          covariate_names: Sequence[str]) -> jax.Array:
        """The covariate network's offsets `(N, P)` in the fitting space (0 for the
        parameters it does not move, and everywhere when switched off)."""
        net = self.covariate_net
        if net is None or not self.learned:
            return self.mechanistic.covariate_offsets(covariates, covariate_names)
        x = jnp.asarray(covariates)[:, jnp.asarray(net.columns(covariate_names), int)]
        return net.offsets(self.mechanistic, x)


def _scales(model: MechanisticModel, names: Sequence[str],
            scales: Mapping[str, tuple[float, float]] | None):
    """Input (shift, scale) of each feature from `scales`, and which are left to
    `autoscale` (placeholders: parameters by their typical value, others 0 and 1)."""
    shift, scale, auto = [], [], []
    for n in names:
        if scales and n in scales:
            a, b = scales[n]
        elif n in model.param_names:
            a, b = model.parameter(n).typical, model.parameter(n).typical
        else:
            a, b = 0.0, 1.0
        shift.append(a)
        scale.append(b if b else 1.0)
        auto.append(not (scales and n in scales))
    return np.array(shift), np.array(scale), tuple(auto)


def _out(out_scale: Any) -> tuple[Any, bool]:
    """(placeholder, auto?) of an `out_scale` argument: a number or list, or "auto"."""
    if isinstance(out_scale, str):
        if out_scale != "auto":
            raise ValueError(f"out_scale must be a number, a list or 'auto', got {out_scale!r}")
        return 1.0, True
    return out_scale, False


def state_correction(model: MechanisticModel, states: Sequence[str], features: Sequence[str],
                     *, key: jax.Array, width: int = 32, depth: int = 2,
                     feature_scales: Mapping[str, tuple[float, float]] | None = None,
                     out_scale: float | Sequence[float] | str = "auto") -> StateCorrection:
    """A zero-initialised correction of dy/dt for `states` from `features`.

    `feature_scales` maps a feature to (shift, scale) for standardisation; the others are
    set from the training data by `autoscale`. `out_scale` is the typical size of the
    correction in state units per time unit, or "auto" (set by `autoscale`).
    """
    shift, scale, auto = _scales(model, features, feature_scales)
    out, auto_out = _out(out_scale)
    net = ScaledMLP(len(features), len(states), width=width, depth=depth, key=key,
                    in_shift=shift, in_scale=scale, out_scale=out, auto_in=auto,
                    auto_out=auto_out)
    return StateCorrection(net, tuple(states), tuple(features))


def term_closure(model: MechanisticModel, term: str, features: Sequence[str], *,
                 key: jax.Array, width: int = 32, depth: int = 2,
                 feature_scales: Mapping[str, tuple[float, float]] | None = None,
                 out_scale: float | str = "auto", mode: str = "replace") -> TermClosure:
    """A zero-initialised network closing the flux `term` of `model` (see `TermClosure`
    for `mode`; `out_scale` is the typical size of g: the term's unit for "replace" and
    "add", dimensionless for "scale"; "auto": set by `autoscale`). Feature scales as in
    `state_correction`."""
    shift, scale, auto = _scales(model, features, feature_scales)
    out, auto_out = _out(out_scale)
    net = ScaledMLP(len(features), 1, width=width, depth=depth, key=key, in_shift=shift,
                    in_scale=scale, out_scale=out, auto_in=auto, auto_out=auto_out)
    return TermClosure(net, term, tuple(features), mode)


def covariate_network(model: MechanisticModel, params: Sequence[str],
                      covariates: Sequence[str], *, key: jax.Array, width: int = 16,
                      depth: int = 2,
                      feature_scales: Mapping[str, tuple[float, float]] | None = None,
                      out_scale: float | str = "auto") -> CovariateNetwork:
    """A zero-initialised network from `covariates` (names; standardised by
    `feature_scales`, the others by `autoscale`) to offsets of `params` in the fitting
    space (`out_scale`: their typical size, e.g. 0.5 on the log scale; "auto": the
    largest of the params' between-patient spreads, set by `autoscale`)."""
    bad = [q for q in params if q not in model.param_names]
    if bad:
        raise KeyError(f"covariate network: {bad} are not parameters of "
                       f"{type(model).__name__} ({', '.join(model.param_names)})")
    shift, scale, auto = _scales(model, covariates, feature_scales)
    out, auto_out = _out(out_scale)
    net = ScaledMLP(len(covariates), len(params), width=width, depth=depth, key=key,
                    in_shift=shift, in_scale=scale, out_scale=out, auto_in=auto,
                    auto_out=auto_out)
    return CovariateNetwork(net, tuple(params), tuple(covariates))


def neural_ode(model: MechanisticModel, *, key: jax.Array, width: int = 64, depth: int = 2,
               features: Sequence[str] | None = None,
               feature_scales: Mapping[str, tuple[float, float]] | None = None,
               out_scale: float | Sequence[float] | str = "auto", day_length: float = 24.0,
               latent: int = 0, input_states: Sequence[str] = (),
               states: Sequence[str] | None = None) -> HybridModel:
    """The pure neural ODE baseline: dy/dt = g_phi(states, inputs) on `model`'s states
    and `latent` extra ones ("z1", ...; a latent neural ODE), with the same doses, inputs,
    initial state and observables, and no mechanism. `input_states` (e.g. the states of
    `dose_input_states(model)`) keep the mechanism's dy/dt: the network then sees doses as
    the mechanism's absorption delivers them. The network drives `states` (default: every
    state but the input states, and the latent ones); any other state keeps its initial
    value (e.g. an observed-state neural ODE: the observed state, latent states and the
    absorption). Unscaled features and an "auto" `out_scale` are set from the training
    data by `autoscale`."""
    names = latent_names(latent)
    input_states = tuple(input_states)
    features = tuple(features or (*model.state_names, *names, *model.input_names))
    if states is not None:
        driven = tuple(states)
        clash = set(driven) & set(input_states)
        if clash:
            raise ValueError(f"neural_ode: {sorted(clash)} are both driven by the network "
                             "and input states")
    else:
        driven = tuple(s for s in (*model.state_names, *names) if s not in input_states)
    if not driven:
        raise ValueError("neural_ode: every state is an input state; nothing is learned")
    corr = state_correction(model, driven, features, key=key,
                            width=width, depth=depth, feature_scales=feature_scales,
                            out_scale=out_scale)
    return HybridModel(model, (corr,), (), use_mechanism=False, day_length=day_length,
                       latent=names, input_states=input_states)


def input_states_of(model: MechanisticModel, spec: str | Sequence[str]) -> tuple[str, ...]:
    """A neural ODE's input states from a config's `input_states`: "doses" for
    `dose_input_states(model)`, else the listed states."""
    return dose_input_states(model) if spec == "doses" else tuple(spec)


def dose_input_states(model: MechanisticModel) -> tuple[str, ...]:
    """The states that hold doses until they act (each dose target's `on_board` states,
    or its state): a neural ODE's input states."""
    out: list[str] = []
    for d in model.dose_targets:
        for s in (d.on_board or (d.state,)):
            if s not in out:
                out.append(s)
    return tuple(out)


def latent_names(k: int) -> tuple[str, ...]:
    """The names of `k` latent states: z1, ..., zk."""
    return tuple(f"z{i + 1}" for i in range(k))


def _inputs_at(model: MechanisticModel, schedule, ts: np.ndarray) -> dict[str, np.ndarray]:
    """Each input channel's value `(N, M)` at the times `ts` `(N, M)` (piecewise constant
    or linear between a schedule's breakpoints, 0 before the first)."""
    it = np.asarray(schedule.input_times)
    iv = np.asarray(schedule.input_values)
    im = np.asarray(schedule.input_mask)
    out = {}
    for c, name in enumerate(model.input_names):
        vals = np.zeros(ts.shape)
        for i in range(ts.shape[0]):
            x, v = it[i][im[i]], iv[i][im[i], c]
            if not x.size:
                continue
            if schedule.interpolation == "linear":
                vals[i] = np.interp(ts[i], x, v)
            else:
                k = np.searchsorted(x, ts[i], side="right") - 1
                vals[i] = np.where(k >= 0, v[np.maximum(k, 0)], 0.0)
        out[name] = vals
    return out


def _moments(x: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(mean, sd) of `x` where `mask`; an sd that is not positive becomes max(|mean|, 1)
    (a constant feature is only shifted)."""
    v = np.broadcast_to(np.asarray(x, float), mask.shape)[mask]
    v = v[np.isfinite(v)]
    if not v.size:
        return 0.0, 1.0
    mean, sd = float(v.mean()), float(v.std())
    if not sd > 1e-12 * max(abs(mean), 1e-300):
        sd = max(abs(mean), 1.0)
    return mean, sd


def _rms(x: np.ndarray, mask: np.ndarray) -> float:
    v = np.broadcast_to(np.asarray(x, float), mask.shape)[mask]
    v = v[np.isfinite(v)]
    r = float(np.sqrt(np.mean(v * v))) if v.size else 0.0
    return r if r > 0 else 1.0


SCALE_MODE_OUT = 0.5
"""The automatic `out_scale` of a "scale" closure: g is a relative change of the term."""


def autoscale(model: HybridModel, cohort, theta: Any, *, options=None) -> HybridModel:
    """`model` with the scales its terms left to the data (`ScaledMLP.auto_in`,
    `auto_out`) set from a cohort: the mechanistic model is simulated for the cohort's
    patients with parameters `theta` `(N, P)` (natural units) at their observation times,
    and each feature is standardised by its mean and standard deviation over those
    samples (latent states: 0 and 1; a parameter that has one value for every patient:
    its declared spread, |value| x omega). Output scales: the root mean square of the
    mechanism's dy/dt of each corrected state (state units per time unit; for a neural ODE
    too; for a latent state, 10 / the time span of the data), of the closed term
    ("replace", "add"), `SCALE_MODE_OUT` for a "scale" closure, and the largest
    between-patient spread of a covariate network's parameters (0.1 at least).
    Patients whose simulation fails are left out."""
    mech = model.mechanistic
    theta = jnp.asarray(theta)
    sol = simulate(mech, theta, cohort.schedule, cohort.obs_times, cohort.obs_mask,
                   options=options)
    ok = np.asarray(sol.status) == 0
    mask = np.asarray(cohort.obs_mask) & ok[:, None]
    ts = np.asarray(cohort.obs_times, float)
    ys = np.asarray(sol.ys, float)
    y = tuple(np.where(mask, ys[..., i], 0.0) for i in range(mech.n_states))
    y_all = y + tuple(np.zeros(mask.shape) for _ in model.latent)
    span = float(ts[mask].max() - ts[mask].min()) if mask.any() else 0.0
    latent_rate = 10.0 / span if span > 0 else 1.0
    th = np.asarray(theta, float)
    p = {k: th[:, i][:, None] for i, k in enumerate(mech.param_names)}
    u = _inputs_at(mech, cohort.schedule, ts)
    args = (tuple(map(jnp.asarray, y)), {k: jnp.asarray(v) for k, v in p.items()},
            {k: jnp.asarray(v) for k, v in u.items()})
    flux_j = mech.fluxes(jnp.asarray(ts), *args)
    dy = [np.asarray(d) for d in mech.derivatives(*args, flux_j)]
    flux = {k: np.asarray(v) for k, v in flux_j.items()}

    def rescale(net: ScaledMLP, cols, out):
        shift, scale = np.array(net.in_shift, float), np.array(net.in_scale, float)
        for f, auto in enumerate(net.auto_in):
            if auto:
                shift[f], scale[f] = cols(f)
        new = eqx.tree_at(lambda n_: (n_.in_shift, n_.in_scale), net,
                          (jnp.asarray(shift), jnp.asarray(scale)))
        if net.auto_out:
            o = jnp.broadcast_to(jnp.asarray(out(), float), net.out_scale.shape)
            new = eqx.tree_at(lambda n_: n_.out_scale, new, o)
        return new

    def feature_cols(features):
        cols = _features(model, features, ts, y_all, p, u, model.day_length)

        def col(f):
            mean, sd = _moments(np.asarray(cols[f]), mask)
            name = features[f]
            if name in mech.param_names:
                q = mech.parameter(name)
                v = th[ok, mech.param_names.index(name)]
                if q.omega > 0 and mean != 0 and not (v.size and v.std() > 1e-12 * abs(mean)):
                    # the same value for every patient (e.g. a neural ODE's code before
                    # training): the declared between-patient spread
                    sd = abs(mean) * q.omega
            return mean, sd
        return col

    names = mech.state_names

    def state_out(s_):
        return _rms(dy[names.index(s_)], mask) if s_ in names else latent_rate

    corrections = tuple(
        eqx.tree_at(lambda c_: c_.net, c, rescale(
            c.net, feature_cols(c.features), lambda c=c: [state_out(s_) for s_ in c.states]))
        for c in model.corrections)

    def closure_out(c):
        if c.mode == "scale":
            return SCALE_MODE_OUT
        return _rms(flux[c.term], mask)

    closures = tuple(
        eqx.tree_at(lambda c_: c_.net, c, rescale(c.net, feature_cols(c.features),
                                                 lambda c=c: closure_out(c)))
        for c in model.closures)
    cov_net = model.covariate_net
    if cov_net is not None:
        x = np.asarray(cohort.covariates, float)[:, cov_net.columns(cohort.covariate_names)]
        rows = np.ones((x.shape[0],), bool)
        omega = max([mech.parameter(q).omega for q in cov_net.params] + [0.1])
        cov_net = eqx.tree_at(lambda c_: c_.net, cov_net, rescale(
            cov_net.net, lambda f: _moments(x[:, f], rows), lambda: omega))
    return dataclasses.replace(model, corrections=corrections, closures=closures,
                               covariate_net=cov_net)
