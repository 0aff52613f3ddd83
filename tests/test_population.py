"""Population training: it fits, and a run killed mid-way resumes to the same result."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np

from hybrid_twin.calibrate import ErrorModel
from hybrid_twin.data.virtual import DoseSpec, NoiseModel, ScheduleSpec, virtual_cohort
from hybrid_twin.hybrid import HybridModel, state_correction
from hybrid_twin.models import OneCompartment
from hybrid_twin.population import train_population

SETUP = textwrap.dedent("""
    import jax
    jax.config.update("jax_enable_x64", True)
    from hybrid_twin.calibrate import ErrorModel
    from hybrid_twin.data.virtual import DoseSpec, NoiseModel, ScheduleSpec, virtual_cohort
    from hybrid_twin.hybrid import HybridModel, state_correction
    from hybrid_twin.models import OneCompartment
    from hybrid_twin.population import train_population

    def problem():
        m = OneCompartment()
        spec = ScheduleSpec(doses=(DoseSpec(0.0, 320.0, "depot"),),
                            obs_times=(0.5, 1, 2, 4, 6, 8, 12, 24))
        vc = virtual_cohort(m, 24, schedule=spec,
                            noise=NoiseModel("proportional", proportional_sd=0.1), seed=0)
        parts = vc.cohort.split({"train": 0.75, "val": 0.25}, seed=0)
        corr = state_correction(m, ("central",), ("central",), key=jax.random.PRNGKey(0),
                                feature_scales={"central": (0.0, 100.0)}, width=8, depth=1)
        return HybridModel(m, (corr,)), parts

    def train(ckpt, epochs, on_epoch_end=None):
        model, parts = problem()
        return train_population(model, parts["train"], parts["val"], free=("ka", "CL", "V"),
                                error_model=ErrorModel("proportional", proportional=0.1),
                                epochs=epochs, batch_size=8, checkpoint_dir=ckpt,
                                condition_until=6.0, val_condition_until=6.0,
                                on_epoch_end=on_epoch_end)
""")


def run_python(code: str, cwd, env=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.getcwd(), **(env or {}))
    return subprocess.run([sys.executable, "-c", SETUP + textwrap.dedent(code)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


def test_killed_training_resumes_to_the_same_result(tmp_path):
    """SIGKILL after epoch 2 of 4 in a subprocess; resumed here, training (the forecast
    objective: the patients refitted every epoch) ends where an uninterrupted run ends. (The subprocess fills a persistent compilation cache that
    this process then reads, so the programs compile once.)"""
    from hybrid_twin.compile_cache import scoped_compilation_cache

    cache = tmp_path / "cache"
    killed = run_python(f"""
        import os, signal
        from hybrid_twin.compile_cache import enable_compilation_cache
        enable_compilation_cache({str(cache)!r})
        def die(epoch, record):
            if epoch == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        train({str(tmp_path / "a")!r}, 4, die)
    """, tmp_path)
    assert killed.returncode == -9, killed.stderr[-2000:]
    history = json.loads((tmp_path / "a" / "train_history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    import equinox as eqx

    ns: dict = {}
    exec(SETUP, ns)
    with scoped_compilation_cache(cache):
        _, state_a, hist_a = ns["train"](str(tmp_path / "a"), 4)
        _, state_b, hist_b = ns["train"](str(tmp_path / "b"), 4)
    la = jax.tree.leaves(eqx.filter(state_a, eqx.is_inexact_array))
    lb = jax.tree.leaves(eqx.filter(state_b, eqx.is_inexact_array))
    diff = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(la, lb))
    assert [h["epoch"] for h in hist_a] == [1, 2, 3, 4]
    assert diff < 1e-10, diff
    np.testing.assert_allclose([h["train_rmse_weighted"] for h in hist_a],
                               [h["train_rmse_weighted"] for h in hist_b], rtol=1e-10)


class Saturable(OneCompartment):
    """One compartment with Michaelis-Menten elimination: CL falls as C rises."""

    def fluxes(self, t, y, p, u):
        flux = super().fluxes(t, y, p, u)
        conc = y[1] / p["V"]
        flux["elimination"] = p["CL"] * y[1] / p["V"] / (1.0 + conc / 4.0)
        return flux


def test_training_fits_a_missing_effect_and_keeps_the_best_model():
    truth, m = Saturable(), OneCompartment()
    spec = ScheduleSpec(doses=(DoseSpec(0.0, 320.0, "depot"),),
                        obs_times=(0.5, 1, 2, 4, 6, 8, 12, 18, 24))
    vc = virtual_cohort(truth, 24, schedule=spec,
                        noise=NoiseModel("proportional", proportional_sd=0.05), seed=1)
    parts = vc.cohort.split({"train": 0.75, "val": 0.25}, seed=0)
    corr = state_correction(m, ("central",), ("central",), key=jax.random.PRNGKey(0),
                            feature_scales={"central": (100.0, 100.0)}, width=8, depth=1,
                            out_scale=10.0)
    best, state, history = train_population(
        HybridModel(m, (corr,)), parts["train"], parts["val"], free=("ka", "CL", "V"),
        error_model=ErrorModel("proportional", proportional=0.05), epochs=8, batch_size=6,
        learning_rate=2e-2, penalty_weight=1e-4, val_condition_until=4.0)
    train_rmse = [h["train_rmse_weighted"] for h in history]
    val = [h["val_rmse_weighted"] for h in history]
    assert train_rmse[-1] < 0.8 * train_rmse[0], train_rmse
    assert float(state.best_val) == min(val)
    assert np.all(np.isfinite(val))


def test_covariate_network_learns_a_weight_effect():
    """Patients whose clearance scales as (WT/70)^0.75: the covariate network trained with
    the population learns each patient's typical CL from its weight (the slope of its
    log-offset on log(WT/70) near 0.75), and a hybrid switched off ignores covariates."""
    from hybrid_twin.data.virtual import CovariateEffect, CovariateSpec, Population
    from hybrid_twin.hybrid import covariate_network

    m = OneCompartment()
    pop = Population(omega={"CL": 0.1, "V": 0.1, "ka": 0.1},
                     covariates=(CovariateSpec("WT", "lognormal", 70.0, 0.3, 35.0, 140.0),),
                     effects=(CovariateEffect("CL", "WT", "power", 0.75, 70.0),))
    spec = ScheduleSpec(doses=(DoseSpec(0.0, 320.0, "depot"),),
                        obs_times=(0.5, 1, 2, 4, 6, 8, 12, 24))
    vc = virtual_cohort(m, 40, population=pop, schedule=spec,
                        noise=NoiseModel("proportional", proportional_sd=0.05), seed=1)
    net = covariate_network(m, ("CL",), ("WT",), key=jax.random.PRNGKey(0), width=8,
                            depth=1, feature_scales={"WT": (70.0, 20.0)}, out_scale=0.5)
    model = HybridModel(m, covariate_net=net)
    trained, _, history = train_population(
        model, vc.cohort, free=("ka", "CL", "V"),
        error_model=ErrorModel("proportional", proportional=0.05, estimate=False),
        epochs=20, batch_size=10, learning_rate=0.05, penalty_weight=0.0)
    wt = np.asarray(vc.cohort.covariates)[:, 0]
    names = vc.cohort.covariate_names
    off = np.asarray(trained.covariate_offsets(vc.cohort.covariates, names))
    cl = m.index("param", "CL")
    slope = np.polyfit(np.log(wt / 70.0), off[:, cl], 1)[0]
    assert 0.5 < slope < 1.0, slope
    assert np.allclose(off[:, [i for i in range(m.n_params) if i != cl]], 0.0)
    typ = np.asarray(trained.individual_typical(m.typical_params(), vc.cohort.covariates,
                                                names))
    np.testing.assert_allclose(typ[:, cl], m.typical_params()[cl] * np.exp(off[:, cl]))
    off_model = trained.switched_off()
    np.testing.assert_array_equal(
        np.asarray(off_model.individual_typical(m.typical_params(), vc.cohort.covariates,
                                                names)),
        np.tile(m.typical_params(), (40, 1)))


def _saturable_problem(n=16, seed=1):
    truth, m = Saturable(), OneCompartment()
    spec = ScheduleSpec(doses=(DoseSpec(0.0, 320.0, "depot"),),
                        obs_times=(0.5, 1, 2, 4, 6, 8, 12, 18, 24))
    vc = virtual_cohort(truth, n, schedule=spec,
                        noise=NoiseModel("proportional", proportional_sd=0.05), seed=seed)
    parts = vc.cohort.split({"train": 0.75, "val": 0.25}, seed=0)
    corr = state_correction(m, ("central",), ("central",), key=jax.random.PRNGKey(0),
                            width=8, depth=1)
    return HybridModel(m, (corr,)), parts


def _late_changed(cohort, after, factor):
    """`cohort` with its observations after `after` multiplied by `factor`."""
    import equinox as eqx
    import jax.numpy as jnp

    late = np.asarray(cohort.obs_times) > after
    values = np.where(late, np.asarray(cohort.obs_values) * factor, cohort.obs_values)
    return eqx.tree_at(lambda c: c.obs_values, cohort, jnp.asarray(values))


def test_forecast_objective_fits_each_patient_on_its_early_window_only():
    """Under the forecast objective the training patients' parameters come from their
    data up to condition_until alone: changing the later data leaves them unchanged (to
    rounding) but changes what the network learns (two Adam steps, so that the size of
    the gradient, not only its sign, shows)."""
    model, parts = _saturable_problem()
    changed = _late_changed(parts["train"], 6.0, 1.4)
    runs = [train_population(model, train, parts["val"], free=("ka", "CL", "V"),
                             error_model=ErrorModel("proportional", proportional=0.05),
                             epochs=1, batch_size=6, learning_rate=2e-2,
                             condition_until=6.0, val_condition_until=6.0)[1]
            for train in (parts["train"], changed)]
    np.testing.assert_allclose(np.asarray(runs[0].z), np.asarray(runs[1].z), rtol=0,
                               atol=1e-9)
    w_a, w_b = (np.asarray(s_.model.corrections[0].net.mlp.layers[-1].weight) for s_ in runs)
    assert np.max(np.abs(w_a - w_b)) > 1e-4, np.max(np.abs(w_a - w_b))


def test_learning_rate_decays_on_a_plateau_and_training_stops():
    """With a learning rate too small to move anything, validation stops improving after
    the first epoch: the rate halves every lr_patience epochs without progress and
    training stops after `patience` of them, keeping the first epoch's model."""
    model, parts = _saturable_problem(n=8)
    best, state, history = train_population(
        model, parts["train"], parts["val"], free=("ka", "CL", "V"),
        error_model=ErrorModel("proportional", proportional=0.05), epochs=50, batch_size=8,
        learning_rate=1e-12, patience=5, lr_patience=2, lr_decay=0.5,
        condition_until=6.0, val_condition_until=6.0)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([h["learning_rate"] for h in history],
                               [1e-12, 1e-12, 1e-12, 5e-13, 5e-13, 2.5e-13])
    assert int(state.bad_epochs) == 5
    assert float(state.best_val) == min(h["val_rmse_weighted"] for h in history)


def test_training_refuses_windows_that_do_not_exist():
    """An empty validation set, and a forecast cut with no training data on one side, are
    errors before any compute."""
    import pytest

    from hybrid_twin.errors import InputError

    model, parts = _saturable_problem(n=8)
    kw = dict(free=("ka", "CL", "V"), epochs=1)
    with pytest.raises(InputError, match="validation set has no patients"):
        train_population(model, parts["train"], parts["val"].select([]), **kw)
    with pytest.raises(InputError, match=r"condition_until=30 leaves no training data after "
                                         r"it \(the training observations run from 0.5 to 24\)"):
        train_population(model, parts["train"], parts["val"], condition_until=30.0, **kw)
    with pytest.raises(InputError, match=r"condition_until=0.1 leaves no training data up to"):
        train_population(model, parts["train"], parts["val"], condition_until=0.1, **kw)
