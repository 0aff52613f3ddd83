"""The shipped theophylline data set (Boeckmann, Sheiner & Beal 1994; R datasets::Theoph,
nlmixr2data theo_sd)."""

import numpy as np

from hybrid_twin import simulate
from hybrid_twin.datasets import load_theophylline
from hybrid_twin.models import OneCompartment

# R datasets::Theoph, column Dose (mg/kg), subjects 1..12
DOSE_MG_PER_KG = [4.02, 4.40, 4.53, 4.40, 5.86, 4.00, 4.95, 4.53, 3.10, 5.50, 4.92, 5.30]


def test_theophylline_loads_for_one_compartment():
    model = OneCompartment()
    c = load_theophylline(model)
    assert c.n_patients == 12 and c.ids == tuple(str(i) for i in range(1, 13))
    assert int(np.asarray(c.data_mask).sum()) == 132
    assert c.covariate_names == ("WT",)
    wt = np.asarray(c.covariates)[:, 0]
    amt = np.asarray(c.schedule.dose_amounts)[:, 0]
    np.testing.assert_allclose(amt / wt, DOSE_MG_PER_KG, atol=0.006)
    assert np.all(np.asarray(c.schedule.dose_targets)[:, 0] == model.index("dose_target", "depot"))
    conc = np.asarray(c.obs_values)[np.asarray(c.data_mask)]
    assert conc.max() == 11.4 and conc.min() == 0.0
    assert np.asarray(c.obs_values)[0, 0] == 0.74
    sol = simulate(model, np.tile(model.typical_params(), (12, 1)), c.schedule,
                   c.obs_times, c.obs_mask)
    pred = np.asarray(sol.observables(model, np.tile(model.typical_params(), (12, 1))))[..., 0]
    assert np.all(np.asarray(sol.status) == 0)
    # typical-value predictions are in the range of the data (peak a few mg/L to ~12)
    assert 4.0 < pred[np.asarray(c.data_mask)].max() < 15.0
