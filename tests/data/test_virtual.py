"""Virtual cohorts: the sampled population matches its spec; same seed, same cohort."""

import numpy as np
import pytest

from hybrid_twin.data.virtual import (
    CovariateEffect,
    CovariateSpec,
    DoseSpec,
    NoiseModel,
    Population,
    ScheduleSpec,
    virtual_cohort,
)
from hybrid_twin.models import BergmanMinimal, OneCompartment


def test_population_moments_match_the_spec():
    model = OneCompartment()
    pop = Population(typical={"CL": 3.0}, omega={"CL": 0.3, "V": 0.2, "ka": 0.5},
                     correlation={("CL", "V"): 0.6})
    n = 20000
    theta, _ = pop.sample(model, np.random.default_rng(1), n)
    logs = np.log(theta)
    se = 4 / np.sqrt(n)
    np.testing.assert_allclose(np.mean(logs, 0), np.log(model.typical_params(CL=3.0)),
                               atol=4 * 0.5 / np.sqrt(n))
    np.testing.assert_allclose(np.std(logs, 0), [0.5, 0.3, 0.2], rtol=se)
    r = np.corrcoef(logs[:, 1], logs[:, 2])[0, 1]
    assert abs(r - 0.6) < 4 * (1 - 0.36) / np.sqrt(n)
    assert abs(np.corrcoef(logs[:, 0], logs[:, 1])[0, 1]) < 4 / np.sqrt(n)


def test_covariate_effects_shift_typical_values():
    model = OneCompartment()
    pop = Population(omega={"CL": 0.0, "V": 0.0, "ka": 0.0},
                     covariates=(CovariateSpec("WT", "uniform", 50.0, 100.0),),
                     effects=(CovariateEffect("CL", "WT", "power", 0.75, 70.0),))
    theta, cov = pop.sample(model, np.random.default_rng(0), 500)
    assert cov.shape == (500, 1) and 50 <= cov.min() and cov.max() <= 100
    np.testing.assert_allclose(theta[:, 1], 2.75 * (cov[:, 0] / 70.0) ** 0.75, rtol=1e-12)
    with pytest.raises(ValueError, match="not among the sampled covariates"):
        Population(effects=(CovariateEffect("CL", "AGE", "linear", 0.1, 40.0),)).sample(
            model, np.random.default_rng(0), 3)
    with pytest.raises(ValueError, match="positive definite"):
        Population(correlation={("CL", "V"): 0.9, ("CL", "ka"): 0.9, ("V", "ka"): -0.9}
                   ).correlation_matrix(model)


def test_virtual_cohort_is_reproducible_and_noise_has_the_right_size():
    model = OneCompartment()
    spec = ScheduleSpec(doses=(DoseSpec(0.0, 320.0, "depot", time_jitter=0.0),
                               DoseSpec(12.0, 320.0, "depot", time_jitter=0.5)),
                        obs_every=0.5, obs_start=0.5, horizon=24.0)
    noise = NoiseModel("combined", additive_sd=0.05, proportional_sd=0.1)
    a = virtual_cohort(model, 400, schedule=spec, noise=noise, seed=3)
    b = virtual_cohort(model, 400, schedule=spec, noise=noise, seed=3)
    np.testing.assert_array_equal(np.asarray(a.cohort.obs_values), np.asarray(b.cohort.obs_values))
    np.testing.assert_array_equal(a.true_params, b.true_params)
    c = virtual_cohort(model, 400, schedule=spec, noise=noise, seed=4)
    assert not np.allclose(np.asarray(c.cohort.obs_values), np.asarray(a.cohort.obs_values))
    z = (np.asarray(a.cohort.obs_values) - a.true_predictions) / noise.sd(a.true_predictions)
    assert abs(z.std() - 1.0) < 0.02 and abs(z.mean()) < 0.02
    t2 = np.asarray(a.cohort.schedule.dose_times)[:, 1]
    assert 11.5 <= t2.min() and t2.max() <= 12.5 and t2.std() > 0.2


def test_virtual_glucose_cohort_with_two_observables():
    model = BergmanMinimal()
    spec = ScheduleSpec(doses=(DoseSpec(420.0, 60.0, "meal", time_jitter=30.0),
                               DoseSpec(420.0, 1.0, "insulin")),
                        obs_every=15.0, horizon=720.0, observables=("glucose", "insulin"))
    vc = virtual_cohort(model, 16, schedule=spec, noise=NoiseModel("additive", 5.0), seed=0)
    c = vc.cohort
    assert c.obs_times.shape == (16, 2 * 49)
    assert set(np.unique(np.asarray(c.obs_index))) == {0, 1}
    g = vc.true_predictions[np.asarray(c.obs_index) == 0]
    assert g.min() > 20 and g.max() > 120


def test_a_failed_simulation_is_an_input_error_naming_the_reason():
    from hybrid_twin import SolverOptions
    from hybrid_twin.errors import InputError

    spec = ScheduleSpec(doses=(DoseSpec(0.0, 320.0, "depot"),), obs_times=(1.0, 24.0))
    with pytest.raises(InputError, match=r"the simulation failed for 3 of 3 patient\(s\), "
                                         r"e\.g\. index \[0, 1, 2\] \(solver_failure:max_steps\)"
                                         r"; check the solver options \(solver.max_steps"):
        virtual_cohort(OneCompartment(), 3, schedule=spec, seed=0,
                       options=SolverOptions(max_steps=1))


def test_a_cohort_from_another_model_family_is_expressed_in_the_fitted_models_names():
    """A virtual cohort simulated by HovorkaT1D (observables glucose, plasma_glucose,
    insulin) for BergmanMinimal (glucose, insulin): observations and dose targets are
    re-indexed by name, the values are the truth's; an observable the fitted model lacks
    is an error naming it, from the config and from Cohort.for_model."""
    from hybrid_twin.config import ConfigError, load_config
    from hybrid_twin.data.load import load_cohort
    from hybrid_twin.errors import InputError
    from hybrid_twin.models import HovorkaT1D

    over = ["data.virtual.n=3", "data.virtual.horizon=600", "data.virtual.obs_every=60",
            "data.virtual.repeat_count=1", "data.virtual.observables=[insulin, glucose]"]
    cfg = load_config("configs/t1d_bergman_hybrid.yaml", over)
    truth, fitted = HovorkaT1D(), BergmanMinimal()
    cohort, vc, _ = load_cohort(cfg.data, fitted, truth=truth)
    raw, _, _ = load_cohort(cfg.data, truth)
    assert cohort.observable_names == ("glucose", "insulin")
    assert raw.observable_names == ("glucose", "plasma_glucose", "insulin")
    names = np.array(cohort.observable_names)[np.asarray(cohort.obs_index)]
    raw_names = np.array(raw.observable_names)[np.asarray(raw.obs_index)]
    np.testing.assert_array_equal(names, raw_names)
    assert set(np.asarray(raw.obs_index).ravel()) == {0, 2}
    np.testing.assert_array_equal(np.asarray(cohort.obs_values), np.asarray(raw.obs_values))
    dose_names = np.array(fitted.dose_target_names)[np.asarray(cohort.schedule.dose_targets)]
    raw_doses = np.array(truth.dose_target_names)[np.asarray(raw.schedule.dose_targets)]
    np.testing.assert_array_equal(dose_names, raw_doses)
    with pytest.raises(ConfigError, match=r"observables plasma_glucose are not observables "
                                          r"of both"):
        load_config("configs/t1d_bergman_hybrid.yaml",
                    ["data.virtual.observables=[glucose, plasma_glucose]"])
    import dataclasses

    import jax.numpy as jnp

    k = np.asarray(raw.obs_index)   # the insulin rows relabelled as plasma glucose
    plasma = dataclasses.replace(raw, obs_index=jnp.asarray(np.where(k == 2, 1, k)))
    with pytest.raises(InputError, match=r"observable\(s\) plasma_glucose of HovorkaT1D are "
                                         r"not observables of BergmanMinimal"):
        plasma.for_model(truth, fitted, where="data.virtual.model")
