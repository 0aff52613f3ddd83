"""The mechanistic model library: one module per organ or system."""

from . import glucose, pkpd
from .base import (
    DoseTarget,
    InputChannel,
    MechanisticModel,
    Observable,
    Parameter,
    State,
    lognormal_cv,
)
from .glucose import BergmanCircadian, BergmanMinimal, HovorkaT1D, HovorkaT1DDawn
from .pkpd import EnterohepaticMM, OneCompartment, OneCompartmentMM, TwoCompartment

REGISTRY: dict[str, type[MechanisticModel]] = {
    "glucose.BergmanMinimal": BergmanMinimal,
    "glucose.BergmanCircadian": BergmanCircadian,
    "glucose.HovorkaT1D": HovorkaT1D,
    "glucose.HovorkaT1DDawn": HovorkaT1DDawn,
    "pkpd.OneCompartment": OneCompartment,
    "pkpd.TwoCompartment": TwoCompartment,
    "pkpd.OneCompartmentMM": OneCompartmentMM,
    "pkpd.EnterohepaticMM": EnterohepaticMM,
}


def get_model(name: str) -> MechanisticModel:
    """Instantiate a library model by its registry name, e.g. "pkpd.OneCompartment"."""
    if name not in REGISTRY:
        import difflib

        hint = difflib.get_close_matches(name, REGISTRY, n=1)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        raise KeyError(f"unknown model {name!r}{extra} (available: {', '.join(REGISTRY)})")
    return REGISTRY[name]()


__all__ = [
    "BergmanCircadian", "BergmanMinimal", "DoseTarget", "EnterohepaticMM", "HovorkaT1D",
    "HovorkaT1DDawn", "InputChannel", "MechanisticModel", "Observable", "OneCompartment", "OneCompartmentMM",
    "Parameter", "REGISTRY", "State", "TwoCompartment", "get_model",
    "glucose", "lognormal_cv", "pkpd",
]
