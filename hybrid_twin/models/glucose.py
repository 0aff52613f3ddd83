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


# --- Hovorka type-1 diabetes model --------------------------------------------------------

_HOV04 = "Hovorka et al. (2004) Physiol Meas 25:905-920, Table 1"
_WIL10 = ("Wilinska et al. (2010) J Diabetes Sci Technol 4:132-144: interstitial time constant "
          "exp(2.372) = 10.7 min (population value as transcribed by open-source Hovorka "
          "simulators, e.g. McGillDiabetesLab/artificial-pancreas-simulator)")
_SPREAD = ("; CV {:.0%} illustrative, of the size used by Hovorka-model virtual clinics "
           "(Boiroux et al. 2017 log-normal spreads as implemented in "
           "McGillDiabetesLab/artificial-pancreas-simulator)")
MG_PER_MMOL = 18.016       # mg/dL per mmol/L of glucose (molar mass 180.16 g/mol)
MMOL_PER_G = 1000.0 / 180.16  # mmol of glucose per g of carbohydrate


class HovorkaT1D(MechanisticModel):
    """Hovorka model of glucose regulation in type 1 diabetes, with a CGM compartment.

    Time unit: minutes. Absolute amounts; `BW` is body weight (kg), and the volumes and
    glucose fluxes are per kg (Hovorka et al. 2004; interstitial glucose as in Wilinska et
    al. 2010):

        G     = Q1 / (V_G BW)                                        (mmol/L)
        dQ1/dt = -F01c - x1 Q1 + k12 Q2 - F_R + U_G + EGP0 BW max(1 - x3, 0)
        dQ2/dt = x1 Q1 - (k12 + x2) Q2
        dS1/dt = u_b + u(t) - S1 / t_maxI
        dS2/dt = (S1 - S2) / t_maxI
        dI/dt  = S2 / (t_maxI V_I BW) - k_e I                         (mU/L)
        dx1/dt = k_a1 (S_IT I - x1),  dx2/dt = k_a2 (S_ID I - x2),  dx3/dt = k_a3 (S_IE I - x3)
        dD1/dt = -D1 / t_maxG + carb_rate · 1000/180.16
        dD2/dt = (D1 - D2) / t_maxG
        dC/dt  = k_int (G - C)

    with F01c = F01 BW min(G/4.5, 1), F_R = 0.003 (G - 9) V_G BW for G > 9 (else 0) and
    U_G = A_G D2 / t_maxG. Endogenous production is published as EGP0 BW (1 - x3), which
    turns negative when x3 > 1, i.e. plasma insulin above 1/S_IE (19 mU/L at the typical
    S_IE), as after large boluses; it is clipped at 0 here, so that glucose cannot be driven
    below zero (seen in virtual cohorts with the unclipped form). Where x3 <= 1 the two
    agree; the initial steady state uses the same clipped form.

    Doses: `insulin` (U, subcutaneous, into S1 in mU; boluses as bolus doses, extra
    insulin as an infusion in U/min on the same target) and `meal` (g carbohydrate, into
    D1 as mmol glucose). Input channel `carb_rate` (g/min) feeds D1 the same way.
    Observables: `glucose` is the interstitial (CGM) glucose C in mg/dL — named "glucose"
    so that observable 0 lines up with `BergmanMinimal`'s for cross-model benchmarks —,
    `plasma_glucose` (mg/dL) and plasma `insulin` (mU/L).

    Basal insulin: the patient's pump runs a constant basal rate titrated to hold the
    fasting glucose `Gb` (`basal_rate`, U/h: the rate at which the steady state has plasma
    glucose Gb), as a continuous subcutaneous infusion inside the model (the flux
    "basal_insulin"). Doses are what comes on top: boluses, and extra insulin as
    infusions. At t = 0 the model is at that basal steady state, and stays there without
    doses or meals. (Where the glucose balance cannot be met at Gb with any insulin, i.e.
    F01c(Gb) + F_R(Gb) >= EGP0 BW, the basal rate is 0 and the steady state lies below Gb.)
    """

    time_unit: ClassVar[str] = "min"
    reference: ClassVar[str] = (
        "Hovorka et al. (2004) Physiol Meas 25:905-920; "
        "Wilinska et al. (2010) J Diabetes Sci Technol 4:132-144"
    )
    states: ClassVar[tuple[State, ...]] = (
        State("Q1", "mmol", "glucose in the accessible (plasma) compartment"),
        State("Q2", "mmol", "glucose in the non-accessible compartment"),
        State("S1", "mU", "insulin in the first subcutaneous compartment"),
        State("S2", "mU", "insulin in the second subcutaneous compartment"),
        State("I", "mU/L", "plasma insulin concentration"),
        State("x1", "1/min", "insulin action on glucose distribution/transport"),
        State("x2", "1/min", "insulin action on glucose disposal"),
        State("x3", "1", "insulin action on endogenous glucose production"),
        State("D1", "mmol", "glucose in the first gut compartment"),
        State("D2", "mmol", "glucose in the second gut compartment"),
        State("C", "mmol/L", "interstitial (CGM) glucose concentration"),
    )
    parameters: ClassVar[tuple[Parameter, ...]] = (
        Parameter("k12", "1/min", 0.066, _HOV04 + _SPREAD.format(0.4), 1e-3, 1.0,
                  omega=lognormal_cv(0.4),
                  description="transfer rate from the non-accessible to the accessible "
                              "compartment"),
        Parameter("k_a1", "1/min", 0.006, _HOV04 + _SPREAD.format(0.4), 1e-4, 1.0,
                  omega=lognormal_cv(0.4), description="deactivation rate of x1"),
        Parameter("k_a2", "1/min", 0.06, _HOV04 + _SPREAD.format(0.4), 1e-4, 1.0,
                  omega=lognormal_cv(0.4), description="deactivation rate of x2"),
        Parameter("k_a3", "1/min", 0.03, _HOV04 + _SPREAD.format(0.4), 1e-4, 1.0,
                  omega=lognormal_cv(0.4), description="deactivation rate of x3"),
        Parameter("S_IT", "1/min per mU/L", 51.2e-4, _HOV04 + _SPREAD.format(0.4), 1e-6, 0.1,
                  omega=lognormal_cv(0.4),
                  description="insulin sensitivity of glucose distribution/transport"),
        Parameter("S_ID", "1/min per mU/L", 8.2e-4, _HOV04 + _SPREAD.format(0.4), 1e-7, 0.1,
                  omega=lognormal_cv(0.4), description="insulin sensitivity of glucose disposal"),
        Parameter("S_IE", "L/mU", 520e-4, _HOV04 + _SPREAD.format(0.4), 1e-5, 1.0,
                  omega=lognormal_cv(0.4),
                  description="insulin sensitivity of endogenous glucose production"),
        Parameter("k_e", "1/min", 0.138, _HOV04 + _SPREAD.format(0.2), 1e-3, 2.0,
                  omega=lognormal_cv(0.2), description="plasma insulin elimination rate"),
        Parameter("V_I", "L/kg", 0.12, _HOV04 + _SPREAD.format(0.05), 0.01, 1.0,
                  omega=lognormal_cv(0.05), description="insulin distribution volume"),
        Parameter("V_G", "L/kg", 0.16, _HOV04 + _SPREAD.format(0.05), 0.01, 1.0,
                  omega=lognormal_cv(0.05), description="glucose distribution volume"),
        Parameter("F01", "mmol/(kg min)", 0.0097, _HOV04 + _SPREAD.format(0.1), 1e-4, 0.1,
                  omega=lognormal_cv(0.1),
                  description="non-insulin-dependent glucose flux (at G >= 4.5 mmol/L)"),
        Parameter("EGP0", "mmol/(kg min)", 0.0161, _HOV04 + _SPREAD.format(0.2), 1e-4, 0.1,
                  omega=lognormal_cv(0.2),
                  description="endogenous glucose production extrapolated to zero insulin"),
        Parameter("t_maxI", "min", 55.0, _HOV04 + _SPREAD.format(0.2), 5.0, 300.0,
                  omega=lognormal_cv(0.2),
                  description="time-to-maximum of subcutaneous insulin absorption"),
        Parameter("t_maxG", "min", 40.0, _HOV04 + _SPREAD.format(0.2), 5.0, 300.0,
                  omega=lognormal_cv(0.2),
                  description="time-to-maximum of carbohydrate absorption"),
        Parameter("A_G", "1", 0.8, _HOV04, 0.05, 1.0, transform="logit",
                  description="carbohydrate bioavailability"),
        Parameter("k_int", "1/min", 1.0 / math.exp(2.372),
                  _WIL10 + "; CV 20% illustrative", 1e-3, 2.0, omega=lognormal_cv(0.2),
                  description="plasma-to-interstitial glucose exchange rate"),
        Parameter("BW", "kg", 70.0, "reference adult body weight (illustrative)", 10.0, 250.0,
                  description="body weight"),
        Parameter("Gb", "mg/dL", 130.0,
                  "fasting glucose the basal rate is titrated to; 130 mg/dL is the upper "
                  "end of the ADA preprandial target (80-130 mg/dL), CV 20% illustrative",
                  60.0, 300.0, omega=lognormal_cv(0.2),
                  description="basal (fasting) plasma glucose held by the patient's basal "
                              "insulin"),
    )
    observables: ClassVar[tuple[Observable, ...]] = (
        Observable("glucose", "mg/dL", lambda y, p: y[10] * MG_PER_MMOL,
                   "interstitial glucose, what a CGM measures (observable 0, as in "
                   "BergmanMinimal)"),
        Observable("plasma_glucose", "mg/dL",
                   lambda y, p: y[0] / (p["V_G"] * p["BW"]) * MG_PER_MMOL, "plasma glucose"),
        Observable("insulin", "mU/L", lambda y, p: y[4], "plasma insulin"),
    )
    dose_targets: ClassVar[tuple[DoseTarget, ...]] = (
        DoseTarget("meal", "D1", "g", scale=MMOL_PER_G, description="carbohydrate eaten",
                   on_board=("D1", "D2")),
        DoseTarget("insulin", "S1", "U", scale=1000.0,
                   description="subcutaneous rapid-acting insulin (bolus, or extra insulin "
                               "as an infusion in U/min; the basal rate is the model's own)",
                   on_board=("S1", "S2")),
    )
    inputs: ClassVar[tuple[InputChannel, ...]] = (
        InputChannel("carb_rate", "g/min", "carbohydrate ingestion rate"),
    )

    def basal_insulin(self, p):
        """Plasma insulin (mU/L) at which the steady state has plasma glucose Gb.

        With G = Gb fixed, x_i = S_i I and Q2 = x1 Q1 / (k12 + x2), the glucose balance
        F + S_IT S_ID I^2 Q1 / (k12 + S_ID I) = E (1 - S_IE I), F = F01c(Gb) + F_R(Gb),
        E = EGP0 BW, Q1 = Gb V_G BW, is the quadratic a I^2 + b I + c = 0 with
        a = S_ID (S_IT Q1 + E S_IE), b = S_ID (F - E) + E S_IE k12, c = k12 (F - E). For
        F < E (c < 0) it has one positive root, -2c / (b + sqrt(b^2 - 4ac)), at which
        S_IE I < 1; otherwise no insulin is needed and the result is 0.
        """
        bw = p["BW"]
        vol = p["V_G"] * bw
        gb = p["Gb"] / MG_PER_MMOL
        f = (p["F01"] * bw * jnp.minimum(gb / 4.5, 1.0)
             + 0.003 * jnp.maximum(gb - 9.0, 0.0) * vol)
        e = p["EGP0"] * bw
        k12, s_it, s_id, s_ie = p["k12"], p["S_IT"], p["S_ID"], p["S_IE"]
        a = s_id * (s_it * gb * vol + e * s_ie)
        b = s_id * (f - e) + e * s_ie * k12
        c = k12 * jnp.minimum(f - e, 0.0)
        return -2.0 * c / (b + jnp.sqrt(b * b - 4.0 * a * c) + (c == 0.0))

    def basal_rate(self, p):
        """The basal insulin rate (U/h) that holds plasma glucose at Gb (`basal_insulin`)."""
        return self.basal_insulin(p) * p["k_e"] * p["V_I"] * p["BW"] * (60.0 / 1000.0)

    def initial_state(self, p):
        """The steady state under the basal rate (`basal_rate`), in closed form.

        Insulin: I = `basal_insulin`, S1 = S2 = u t_maxI with u = I k_e V_I BW (mU/min),
        x_i = S_i I.
        Glucose solves F01c(G) + F_R(G) + a V_G BW G = EGP0 BW (1 - x3), a = x1 x2 / (k12 +
        x2); the left side increases piecewise linearly in G (kinks at 4.5 and 9 mmol/L),
        so each piece's root is computed and the one whose interval holds it is selected.
        """
        bw, vg = p["BW"], p["V_G"]
        ins = self.basal_insulin(p)
        u = ins * p["k_e"] * p["V_I"] * bw
        s = u * p["t_maxI"]
        x1, x2, x3 = p["S_IT"] * ins, p["S_ID"] * ins, p["S_IE"] * ins
        vol = vg * bw
        f01 = p["F01"] * bw
        av = x1 * x2 / (p["k12"] + x2) * vol          # mmol/min per mmol/L
        rhs = p["EGP0"] * bw * jnp.maximum(1.0 - x3, 0.0)
        below = rhs < f01 + 4.5 * av                    # G < 4.5
        above = rhs >= f01 + 9.0 * av                   # G >= 9
        middle = ~below & ~above
        g_low = rhs / (f01 / 4.5 + av)
        g_mid = (rhs - f01) / jnp.where(middle, av, 1.0)
        renal = 0.003 * vol
        g_high = (rhs - f01 + 9.0 * renal) / (renal + av)
        g = jnp.where(below, g_low, jnp.where(above, g_high, g_mid))
        q1 = g * vol
        q2 = x1 * q1 / (p["k12"] + x2)
        zero = 0.0 * g
        return (q1, q2, s, s, ins, x1, x2, x3, zero, zero, g)

    def fluxes(self, t, y, p, u):
        q1, q2, s1, s2, ins, x1, x2, x3, d1, d2, c = y
        bw = p["BW"]
        vol = p["V_G"] * bw
        g = q1 / vol
        gut_emptying = d2 / p["t_maxG"]
        insulin_absorption = s2 / p["t_maxI"]
        return {
            "basal_insulin": self.basal_insulin(p) * p["k_e"] * p["V_I"] * bw,
            "insulin_independent_uptake": p["F01"] * bw * jnp.minimum(g / 4.5, 1.0),
            "renal_clearance": 0.003 * jnp.maximum(g - 9.0, 0.0) * vol,
            "glucose_transport": x1 * q1,
            "glucose_return": p["k12"] * q2,
            "glucose_disposal": x2 * q2,
            "endogenous_production": p["EGP0"] * bw * jnp.maximum(1.0 - x3, 0.0),
            "gut_transit": d1 / p["t_maxG"],
            "gut_emptying": gut_emptying,
            "meal_appearance": p["A_G"] * gut_emptying,
            "sc_transit": s1 / p["t_maxI"],
            "insulin_absorption": insulin_absorption,
            "insulin_appearance": insulin_absorption / (p["V_I"] * bw),
            "insulin_clearance": p["k_e"] * ins,
            "transport_action_gain": p["k_a1"] * p["S_IT"] * ins,
            "transport_action_decay": p["k_a1"] * x1,
            "disposal_action_gain": p["k_a2"] * p["S_ID"] * ins,
            "disposal_action_decay": p["k_a2"] * x2,
            "production_action_gain": p["k_a3"] * p["S_IE"] * ins,
            "production_action_decay": p["k_a3"] * x3,
            "interstitial_exchange": p["k_int"] * (g - c),
        }

    def derivatives(self, y, p, u, flux):
        transport, back = flux["glucose_transport"], flux["glucose_return"]
        return (
            -flux["insulin_independent_uptake"] - transport + back - flux["renal_clearance"]
            + flux["meal_appearance"] + flux["endogenous_production"],
            transport - back - flux["glucose_disposal"],
            flux["basal_insulin"] - flux["sc_transit"],
            flux["sc_transit"] - flux["insulin_absorption"],
            flux["insulin_appearance"] - flux["insulin_clearance"],
            flux["transport_action_gain"] - flux["transport_action_decay"],
            flux["disposal_action_gain"] - flux["disposal_action_decay"],
            flux["production_action_gain"] - flux["production_action_decay"],
            -flux["gut_transit"] + u["carb_rate"] * MMOL_PER_G,
            flux["gut_transit"] - flux["gut_emptying"],
            flux["interstitial_exchange"],
        )


_BOLLI = ("Bolli & Gerich (1984) N Engl J Med 310:746-750 (the dawn phenomenon: glucose "
          "production rises in the early morning); amplitude and timing illustrative")


class HovorkaT1DDawn(HovorkaT1D):
    """`HovorkaT1D` with a dawn phenomenon: endogenous glucose production rises in the
    early morning,

        EGP = EGP0 BW max(1 - x3, 0) (1 + a_dawn d(t)),
        d(t) = exp(kappa (cos(2 pi (t - t_dawn) / 1440) - 1)),

    a daily bump peaking at clock time `t_dawn` (min after midnight) with a width of about
    `w_dawn` (min, one standard deviation; kappa = (1440 / (2 pi w_dawn))^2). At midnight
    (t = 0) the bump is 9e-5 of its peak at the typical values (06:00, 75 min), so the model
    starts (almost) at the basal steady state of `HovorkaT1D`. Used as the truth of virtual T1D
    cohorts with an effect the model without it lacks (hybrid-model benchmarks).
    """

    reference: ClassVar[str] = HovorkaT1D.reference + "; " + _BOLLI
    parameters: ClassVar[tuple[Parameter, ...]] = HovorkaT1D.parameters + (
        Parameter("a_dawn", "1", 0.5, _BOLLI, 0.0, 2.0, transform="identity",
                  description="relative rise of endogenous glucose production at its peak"),
        Parameter("t_dawn", "min", 360.0, _BOLLI, 180.0, 600.0, transform="identity",
                  description="clock time of the peak (minutes after midnight)"),
        Parameter("w_dawn", "min", 75.0, _BOLLI, 20.0, 120.0, transform="identity",
                  description="width of the early-morning rise (one standard deviation)"),
    )

    def fluxes(self, t, y, p, u):
        flux = super().fluxes(t, y, p, u)
        kappa = (1440.0 / (2.0 * math.pi * p["w_dawn"])) ** 2
        bump = jnp.exp(kappa * (jnp.cos(2.0 * math.pi * (t - p["t_dawn"]) / 1440.0) - 1.0))
        flux["endogenous_production"] = flux["endogenous_production"] * (
            1.0 + p["a_dawn"] * bump)
        return flux
