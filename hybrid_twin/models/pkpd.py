"""Pharmacokinetic compartment models. Time unit: hours; amounts in mg; volumes in L.

`OneCompartment`: first-order absorption from a depot (oral dose) or IV dosing into the
central compartment, linear elimination:

    dA_depot/dt   = -ka A_depot
    dA_central/dt =  ka A_depot - (CL/V) A_central,      C = A_central / V

`TwoCompartment` adds a peripheral compartment exchanging with the central one at
inter-compartmental clearance Q.
"""

from __future__ import annotations

from typing import ClassVar

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
