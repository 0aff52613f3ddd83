"""Glucose–insulin models.

`BergmanMinimal` is the Bergman minimal model of glucose kinetics and remote insulin
action, with plasma insulin kinetics around a basal level, a one-compartment gut that
absorbs meal carbohydrate, and a one-compartment subcutaneous depot for insulin doses.
Time unit: minutes.

    dG/dt     = -p1 (G - Gb) - X G + f k_abs Q_gut · 1000 / V_G
    dX/dt     = -p2 X + p3 (I - Ib)
    dI/dt     = -n (I - Ib) + k_sc S_sc · 1000 / V_I
    dQ_gut/dt = -k_abs Q_gut + carb_rate
    dS_sc/dt  = -k_sc S_sc

At t = 0 the model is at its basal steady state (G, X, I, Q_gut, S_sc) = (Gb, 0, Ib, 0, 0).
"""

from __future__ import annotations

import math
from typing import ClassVar

import jax.numpy as jnp

from .base import (
    DoseTarget,
    InputChannel,
    MechanisticModel,
    Observable,
    Parameter,
    State,
    lognormal_cv,
)

_FISHER = "Fisher (1991) IEEE Trans Biomed Eng 38:57-61 (minimal-model values after Furler et al. 1985)"
_DALLA_MAN = "Dalla Man, Rizza & Cobelli (2007) IEEE Trans Biomed Eng 54:1740-1749"
_HOVORKA = "Hovorka et al. (2004) Physiol Meas 25:905-920 (t_max,I = 55 min)"


class BergmanMinimal(MechanisticModel):
    """Bergman minimal model with gut carbohydrate absorption and subcutaneous insulin.

    Doses: `meal` (carbohydrate, g, into the gut) and `insulin` (rapid-acting insulin, U,
    subcutaneous). Input channel `carb_rate` (g/min) feeds the gut for meals given as a
    rate. Observables: plasma `glucose` (mg/dL) and plasma `insulin` (mU/L).
    Between-patient spreads (omega) are illustrative coefficients of variation chosen
    for virtual cohorts, not estimates from one study.
    """

    time_unit: ClassVar[str] = "min"
    reference: ClassVar[str] = (
        "Bergman et al. (1979) Am J Physiol 236:E667-E677; " + _FISHER
    )
    states: ClassVar[tuple[State, ...]] = (
        State("G", "mg/dL", "plasma glucose concentration"),
        State("X", "1/min", "remote insulin action"),
        State("I", "mU/L", "plasma insulin concentration"),
        State("Q_gut", "g", "carbohydrate in the gut"),
        State("S_sc", "U", "insulin in the subcutaneous depot"),
    )
    parameters: ClassVar[tuple[Parameter, ...]] = (
        Parameter("p1", "1/min", 0.028735, _FISHER, 1e-4, 0.5, omega=lognormal_cv(0.3),
                  description="glucose effectiveness S_G"),
        Parameter("p2", "1/min", 0.028344, _FISHER, 1e-4, 0.5, omega=lognormal_cv(0.3),
                  description="decay rate of remote insulin action"),
        Parameter("p3", "1/(min^2 mU/L)", 5.035e-5, _FISHER, 1e-7, 1e-2,
                  omega=lognormal_cv(0.4),
                  description="insulin action gain (S_I = p3/p2)"),
        Parameter("n", "1/min", 5.0 / 54.0, _FISHER, 1e-3, 2.0, omega=lognormal_cv(0.2),
                  description="plasma insulin clearance rate"),
        Parameter("Gb", "mg/dL", 81.0, _FISHER + " (4.5 mmol/L)", 30.0, 400.0,
                  omega=lognormal_cv(0.1), description="basal plasma glucose"),
        Parameter("Ib", "mU/L", 15.0, _FISHER, 0.5, 200.0, omega=lognormal_cv(0.3),
                  description="basal plasma insulin"),
        Parameter("V_I", "L", 12.0, _FISHER, 1.0, 60.0, description="insulin distribution volume"),
        Parameter("V_G", "dL", 1.88 * 70.0, _DALLA_MAN + " (1.88 dL/kg x 70 kg)", 20.0, 500.0,
                  omega=lognormal_cv(0.1), description="glucose distribution volume"),
        Parameter("k_abs", "1/min", 0.057, _DALLA_MAN, 1e-3, 1.0, omega=lognormal_cv(0.2),
                  description="rate constant of gut absorption"),
        Parameter("f", "1", 0.90, _DALLA_MAN, 0.1, 1.0, transform="logit",
                  description="fraction of meal carbohydrate that appears in plasma"),
        Parameter("k_sc", "1/min", 1.0 / 55.0, _HOVORKA, 1e-3, 1.0, omega=lognormal_cv(0.2),
                  description="subcutaneous insulin absorption rate constant"),
    )
    observables: ClassVar[tuple[Observable, ...]] = (
        Observable("glucose", "mg/dL", lambda y, p: y[0], "plasma glucose"),
        Observable("insulin", "mU/L", lambda y, p: y[2], "plasma insulin"),
    )
    dose_targets: ClassVar[tuple[DoseTarget, ...]] = (
        DoseTarget("meal", "Q_gut", "g", description="carbohydrate eaten"),
        DoseTarget("insulin", "S_sc", "U", description="subcutaneous insulin bolus"),
    )
    inputs: ClassVar[tuple[InputChannel, ...]] = (
        InputChannel("carb_rate", "g/min", "carbohydrate ingestion rate"),
    )

    def initial_state(self, p):
        zero = 0.0 * p["Gb"]
        return (p["Gb"], zero, p["Ib"], zero, zero)

    def fluxes(self, t, y, p, u):
        G, X, I, Q, S = y
        return {
            "glucose_effectiveness": p["p1"] * (G - p["Gb"]),
            "insulin_action": X * G,
            "meal_appearance": p["f"] * p["k_abs"] * Q * 1000.0 / p["V_G"],
            "insulin_action_decay": p["p2"] * X,
            "insulin_action_gain": p["p3"] * (I - p["Ib"]),
            "insulin_clearance": p["n"] * (I - p["Ib"]),
            "insulin_appearance": p["k_sc"] * S * 1000.0 / p["V_I"],
            "gut_absorption": p["k_abs"] * Q,
            "sc_absorption": p["k_sc"] * S,
        }

    def derivatives(self, y, p, u, flux):
        return (
            -flux["glucose_effectiveness"] - flux["insulin_action"] + flux["meal_appearance"],
            -flux["insulin_action_decay"] + flux["insulin_action_gain"],
            -flux["insulin_clearance"] + flux["insulin_appearance"],
            -flux["gut_absorption"] + u["carb_rate"],
            -flux["sc_absorption"],
        )


_HINSHAW = ("Hinshaw et al. (2013) Diabetes 62:2223-2229 (insulin sensitivity lowest at "
            "breakfast, highest at dinner in type 1 diabetes); amplitude illustrative")


class BergmanCircadian(BergmanMinimal):
    """`BergmanMinimal` with a time-of-day modulation of insulin sensitivity.

        dX/dt = -p2 X + p3 s(t) (I - Ib),   s(t) = 1 - a_si cos(2 pi (t - t_si) / 1440)

    with t in minutes since midnight: sensitivity is lowest at clock time `t_si` (min) and
    highest twelve hours later. `a_si = 0` is the minimal model. At basal insulin the
    modulation has no effect, so the basal steady state is unchanged. Used as the truth of
    virtual cohorts with an effect the minimal model lacks (hybrid-model benchmarks).
    """

    reference: ClassVar[str] = BergmanMinimal.reference + "; " + _HINSHAW
    parameters: ClassVar[tuple[Parameter, ...]] = BergmanMinimal.parameters + (
        Parameter("a_si", "1", 0.4, _HINSHAW, 0.0, 0.95, transform="identity",
                  description="relative amplitude of the daily insulin-sensitivity cycle"),
        Parameter("t_si", "min", 420.0, _HINSHAW, 0.0, 1440.0, transform="identity",
                  description="clock time of lowest insulin sensitivity (minutes after midnight)"),
    )

    def fluxes(self, t, y, p, u):
        flux = super().fluxes(t, y, p, u)
        s = 1.0 - p["a_si"] * jnp.cos(2.0 * math.pi * (t - p["t_si"]) / 1440.0)
        flux["insulin_action_gain"] = flux["insulin_action_gain"] * s
        return flux
