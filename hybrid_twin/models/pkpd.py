"""Pharmacokinetic compartment models. Time unit: hours; amounts in mg; volumes in L.

`OneCompartment`: first-order absorption from a depot (oral dose) or IV dosing into the
central compartment, linear elimination:

    dA_depot/dt   = -ka A_depot
    dA_central/dt =  ka A_depot - (CL/V) A_central,      C = A_central / V

`TwoCompartment` adds a peripheral compartment exchanging with the central one at
inter-compartmental clearance Q.

`OneCompartmentMM` replaces the linear elimination by saturable (Michaelis-Menten)
elimination, Vmax C / (Km + C). `EnterohepaticMM` adds enterohepatic recirculation through
a gallbladder that empties into the gut at meal times:

    dA_depot/dt   = -ka A_depot + k_gb s(t) A_gb
    dA_central/dt =  ka A_depot - Vmax C / (Km + C) - k_bile A_central
    dA_gb/dt      =  k_bile A_central - k_gb s(t) A_gb
    dA_elim/dt    =  Vmax C / (Km + C)

with s(t) a smooth daily pulse train at the meal clock times (t in hours since midnight
of day 0). It serves as a structurally different truth for hybrid-model benchmarks fitted
with the linear `OneCompartment`.
"""

from __future__ import annotations

import math
from typing import ClassVar

import jax.numpy as jnp

from .base import DoseTarget, MechanisticModel, Observable, Parameter, State, lognormal_cv

_THEO = ("nlmixr2 FOCEi fit of the theophylline study (theo_sd; Boeckmann, Sheiner & Beal, "
         "NONMEM Users Guide): ka 1.59 /h, CL 2.75 L/h, V 31.8 L")
_MRG = "mrgsolve model library 'pk2' defaults (illustrative, not one drug)"


class OneCompartment(MechanisticModel):
    """One-compartment PK model with first-order absorption (theophylline-like values).

    Dose targets: `depot` (oral, mg) and `central` (IV, mg; bolus or infusion).
    Observable: plasma `concentration` (mg/L). Spreads are illustrative.
    """

    time_unit: ClassVar[str] = "h"
    reference: ClassVar[str] = _THEO
    states: ClassVar[tuple[State, ...]] = (
        State("depot", "mg", "amount at the absorption site"),
        State("central", "mg", "amount in the central compartment"),
    )
    parameters: ClassVar[tuple[Parameter, ...]] = (
        Parameter("ka", "1/h", 1.59, _THEO, 1e-3, 50.0, omega=lognormal_cv(0.5),
                  description="first-order absorption rate constant"),
        Parameter("CL", "L/h", 2.75, _THEO, 1e-3, 1e3, omega=lognormal_cv(0.3),
                  description="clearance"),
        Parameter("V", "L", 31.8, _THEO, 1e-2, 1e4, omega=lognormal_cv(0.15),
                  description="volume of distribution"),
    )
    observables: ClassVar[tuple[Observable, ...]] = (
        Observable("concentration", "mg/L", lambda y, p: y[1] / p["V"], "plasma concentration"),
    )
    dose_targets: ClassVar[tuple[DoseTarget, ...]] = (
        DoseTarget("depot", "depot", "mg", description="oral dose"),
        DoseTarget("central", "central", "mg", description="intravenous dose"),
    )

    def initial_state(self, p):
        zero = 0.0 * p["V"]
        return (zero, zero)

    def fluxes(self, t, y, p, u):
        depot, central = y
        return {
            "absorption": p["ka"] * depot,
            "elimination": p["CL"] / p["V"] * central,
        }

    def derivatives(self, y, p, u, flux):
        return (-flux["absorption"], flux["absorption"] - flux["elimination"])


class TwoCompartment(MechanisticModel):
    """Two-compartment PK model with first-order absorption.

    Dose targets: `depot` (oral, mg) and `central` (IV, mg). Observable: plasma
    `concentration` = A_central / V1 (mg/L). Spreads are illustrative.
    """

    time_unit: ClassVar[str] = "h"
    reference: ClassVar[str] = _MRG
    states: ClassVar[tuple[State, ...]] = (
        State("depot", "mg", "amount at the absorption site"),
        State("central", "mg", "amount in the central compartment"),
        State("peripheral", "mg", "amount in the peripheral compartment"),
    )
    parameters: ClassVar[tuple[Parameter, ...]] = (
        Parameter("ka", "1/h", 1.0, _MRG, 1e-3, 50.0, omega=lognormal_cv(0.4),
                  description="first-order absorption rate constant"),
        Parameter("CL", "L/h", 1.0, _MRG, 1e-3, 1e3, omega=lognormal_cv(0.3),
                  description="clearance from the central compartment"),
        Parameter("V1", "L", 20.0, _MRG, 1e-2, 1e4, omega=lognormal_cv(0.2),
                  description="central volume"),
        Parameter("Q", "L/h", 2.0, _MRG, 1e-3, 1e3, omega=lognormal_cv(0.3),
                  description="inter-compartmental clearance"),
        Parameter("V2", "L", 10.0, _MRG, 1e-2, 1e4, omega=lognormal_cv(0.2),
                  description="peripheral volume"),
    )
    observables: ClassVar[tuple[Observable, ...]] = (
        Observable("concentration", "mg/L", lambda y, p: y[1] / p["V1"], "plasma concentration"),
    )
    dose_targets: ClassVar[tuple[DoseTarget, ...]] = (
        DoseTarget("depot", "depot", "mg", description="oral dose"),
        DoseTarget("central", "central", "mg", description="intravenous dose"),
    )

    def initial_state(self, p):
        zero = 0.0 * p["V1"]
        return (zero, zero, zero)

    def fluxes(self, t, y, p, u):
        depot, central, peripheral = y
        return {
            "absorption": p["ka"] * depot,
            "elimination": p["CL"] / p["V1"] * central,
            "distribution": p["Q"] / p["V1"] * central,
            "redistribution": p["Q"] / p["V2"] * peripheral,
        }

    def derivatives(self, y, p, u, flux):
        exchange = flux["distribution"] - flux["redistribution"]
        return (
            -flux["absorption"],
            flux["absorption"] - flux["elimination"] - exchange,
            exchange,
        )


_MM = ("illustrative values (not one drug), chosen so that at 300-600 mg oral the peak "
       "concentration is about Km, i.e. clearance at the peak is about half the linear "
       "clearance Vmax/Km = 4 L/h")
_EHC = ("gallbladder EHC structure after Roberts et al. (2002) 'Enterohepatic circulation: "
        "physiological, pharmacokinetic and clinical implications', Clin Pharmacokinet "
        "41(10):751, doi:10.2165/00003088-200241100-00005; illustrative values (not one "
        "drug): a quarter to two fifths of the drug leaving the plasma goes to bile, and "
        "most of the gallbladder empties at each meal")


def _mm_fluxes(y, p):
    """Absorption and saturable elimination (mg/h) of a one-compartment model whose
    first two states are the depot and the central amount."""
    conc = y[1] / p["V"]
    return {
        "absorption": p["ka"] * y[0],
        "elimination": p["Vmax"] * conc / (p["Km"] + conc),
    }


class OneCompartmentMM(MechanisticModel):
    """One-compartment PK model, first-order absorption, Michaelis-Menten elimination.

        dA_depot/dt   = -ka A_depot
        dA_central/dt =  ka A_depot - Vmax C / (Km + C),     C = A_central / V

    For C << Km it is `OneCompartment` with CL = Vmax / Km. Dose targets: `depot` (oral,
    mg) and `central` (IV, mg; bolus or infusion). Observable: plasma `concentration`
    (mg/L). Values and spreads are illustrative.
    """

    time_unit: ClassVar[str] = "h"
    reference: ClassVar[str] = _MM
    states: ClassVar[tuple[State, ...]] = OneCompartment.states
    parameters: ClassVar[tuple[Parameter, ...]] = (
        Parameter("ka", "1/h", 1.5, _MM, 1e-3, 50.0, omega=lognormal_cv(0.4),
                  description="first-order absorption rate constant"),
        Parameter("Vmax", "mg/h", 32.0, _MM, 1e-2, 1e5, omega=lognormal_cv(0.3),
                  description="maximal elimination rate"),
        Parameter("Km", "mg/L", 8.0, _MM, 1e-3, 1e8, omega=lognormal_cv(0.3),
                  description="concentration of half-maximal elimination rate"),
        Parameter("V", "L", 40.0, _MM, 1e-2, 1e4, omega=lognormal_cv(0.15),
                  description="volume of distribution"),
    )
    observables: ClassVar[tuple[Observable, ...]] = OneCompartment.observables
    dose_targets: ClassVar[tuple[DoseTarget, ...]] = OneCompartment.dose_targets

    def initial_state(self, p):
        zero = 0.0 * p["V"]
        return (zero, zero)

    def fluxes(self, t, y, p, u):
        return _mm_fluxes(y, p)

    def derivatives(self, y, p, u, flux):
        return (-flux["absorption"], flux["absorption"] - flux["elimination"])


class EnterohepaticMM(MechanisticModel):
    """`OneCompartmentMM` with enterohepatic recirculation through a gallbladder.

    A first-order biliary excretion k_bile A_central fills the gallbladder; the
    gallbladder empties into the gut lumen (the depot, from where the drug is absorbed
    again) at rate k_gb s(t) A_gb, where the emptying signal

        s(t) = sum over meals m of exp(kappa (cos(2 pi (t - t_m) / 24) - 1))

    is a smooth daily pulse of height 1 at each meal clock time t_m (`meal_times`, hours
    after midnight; t is hours since midnight of day 0) and standard deviation about
    `emptying_sd` hours (kappa = (24 / (2 pi emptying_sd))^2). The concentration then shows
    secondary peaks after meals. `eliminated` accumulates the drug eliminated, so that
    depot + central + gallbladder + eliminated equals the dose given so far. Subclass to
    change the meal times or the pulse width.

    The pulses are about two hours wide at their base. The adaptive step controller
    resolves them (checked down to rtol 1e-3 over five days with no save time in
    between: relative error 3e-4); with a fixed-step method keep the step well below an
    hour (e.g. `RK4(0.25)`).

    Dose targets: `depot` (oral, mg) and `central` (IV, mg; bolus or infusion).
    Observable: plasma `concentration` = A_central / V (mg/L). Values and spreads are
    illustrative (see the parameter sources).
    """

    time_unit: ClassVar[str] = "h"
    reference: ClassVar[str] = _EHC
    meal_times: ClassVar[tuple[float, ...]] = (7.0, 12.0, 19.0)
    emptying_sd: ClassVar[float] = 0.5
    states: ClassVar[tuple[State, ...]] = OneCompartment.states + (
        State("gallbladder", "mg", "amount stored in the gallbladder"),
        State("eliminated", "mg", "cumulative amount eliminated"),
    )
    parameters: ClassVar[tuple[Parameter, ...]] = OneCompartmentMM.parameters + (
        Parameter("k_bile", "1/h", 0.035, _EHC, 0.0, 10.0, transform="log",
                  omega=lognormal_cv(0.3),
                  description="biliary excretion rate constant (central to gallbladder)"),
        Parameter("k_gb", "1/h", 2.0, _EHC, 0.0, 100.0, transform="log",
                  omega=lognormal_cv(0.3),
                  description="gallbladder emptying rate constant at the height of a meal pulse"),
    )
    observables: ClassVar[tuple[Observable, ...]] = OneCompartment.observables
    dose_targets: ClassVar[tuple[DoseTarget, ...]] = OneCompartment.dose_targets

    @classmethod
    def emptying_signal(cls, t):
        """s(t): the gallbladder emptying pulse train (1 at each meal time), elementwise."""
        kappa = (24.0 / (2.0 * math.pi * cls.emptying_sd)) ** 2
        s = 0.0
        for t_meal in cls.meal_times:
            s = s + jnp.exp(kappa * (jnp.cos(2.0 * math.pi / 24.0 * (t - t_meal)) - 1.0))
        return s

    def initial_state(self, p):
        zero = 0.0 * p["V"]
        return (zero, zero, zero, zero)

    def fluxes(self, t, y, p, u):
        flux = _mm_fluxes(y, p)
        flux["biliary_excretion"] = p["k_bile"] * y[1]
        flux["gallbladder_emptying"] = p["k_gb"] * self.emptying_signal(t) * y[2]
        return flux

    def derivatives(self, y, p, u, flux):
        return (
            flux["gallbladder_emptying"] - flux["absorption"],
            flux["absorption"] - flux["elimination"] - flux["biliary_excretion"],
            flux["biliary_excretion"] - flux["gallbladder_emptying"],
            flux["elimination"],
        )
