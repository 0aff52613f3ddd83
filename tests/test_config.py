"""Experiment configs: clear errors that name the key; overrides of nested keys."""

import pytest

from hybrid_twin.config import ConfigError, load_config


def test_shipped_configs_load():
    for path in ("configs/quickstart.yaml", "configs/theophylline.yaml"):
        cfg = load_config(path)
        assert cfg.name


def test_unknown_key_suggests_the_nearest():
    with pytest.raises(ConfigError, match=r"unknown config key 'data.virtual.nn'; did you mean "
                                          r"'data.virtual.n'\?"):
        load_config("configs/quickstart.yaml", ["data.virtual.nn=5"])
    with pytest.raises(ConfigError, match=r"unknown config key 'evalution'; did you mean "
                                          r"'evaluation'\?"):
        load_config(data={"evalution": {}})


def test_wrong_type_and_range_name_the_key():
    with pytest.raises(ConfigError, match=r"data.virtual.n: expected an integer, got 'many'"):
        load_config("configs/quickstart.yaml", ["data.virtual.n=many"])
    with pytest.raises(ConfigError, match=r"data.virtual.n: must be > 0"):
        load_config("configs/quickstart.yaml", ["data.virtual.n=0"])
    with pytest.raises(ConfigError, match=r"error_model.kind: 'gaussian' is not one of"):
        load_config("configs/quickstart.yaml", ["error_model.kind=gaussian"])
    with pytest.raises(ConfigError, match=r"model.free\[1\]: 'p9' is not a parameter"):
        load_config("configs/quickstart.yaml", ["model.free=[p1, p9]"])
    with pytest.raises(ConfigError, match=r"evaluation.metrics\[0\]: 'r2' is not one of"):
        load_config("configs/quickstart.yaml", ["evaluation.metrics=[r2]"])
    with pytest.raises(ConfigError, match=r"split: train \+ val \+ test"):
        load_config("configs/quickstart.yaml", ["split.train=0.9"])


def test_missing_data_file_and_unknown_model():
    with pytest.raises(ConfigError, match=r"data.path: file not found: nope.csv"):
        load_config("configs/theophylline.yaml", ["data.path=nope.csv"])
    with pytest.raises(ConfigError, match=r"did you mean 'pkpd.OneCompartment'"):
        load_config("configs/theophylline.yaml", ["model.name=pkpd.OneCompartmnt"])
    with pytest.raises(ConfigError, match=r"config file not found: missing.yaml"):
        load_config("missing.yaml")


def test_set_overrides_nested_keys():
    cfg = load_config("configs/quickstart.yaml",
                      ["data.virtual.noise.additive_sd=2.5", "evaluation.condition_until=600",
                       "output.plots=false"])
    assert cfg.data.virtual.noise.additive_sd == 2.5
    assert cfg.evaluation.condition_until == 600.0
    assert cfg.output.plots is False


def test_learned_terms_and_truth_model_are_checked():
    cfg = load_config("configs/glucose_hybrid.yaml")
    assert cfg.model.learned[0].mode == "scale"
    assert cfg.data.virtual.model == "glucose.BergmanCircadian"
    with pytest.raises(ConfigError, match=r"model.learned\[0\].term: 'insulin_actoin_gain' is not a "
                                          r"term of glucose.BergmanMinimal; did you mean "
                                          r"'insulin_action_gain'\?"):
        load_config("configs/glucose_hybrid.yaml", ["model.learned.0.term=insulin_actoin_gain"])
    with pytest.raises(ConfigError, match=r"model.learned\[0\].mode: 'times' is not one of"):
        load_config("configs/glucose_hybrid.yaml", ["model.learned.0.mode=times"])
    with pytest.raises(ConfigError, match=r"data.virtual.model: pkpd.OneCompartment cannot "
                                          r"generate data for glucose.BergmanMinimal"):
        load_config("configs/glucose_hybrid.yaml", ["data.virtual.model=pkpd.OneCompartment"])
    with pytest.raises(ConfigError, match=r"data.virtual.model: unknown model"):
        load_config("configs/glucose_hybrid.yaml", ["data.virtual.model=glucose.Circadian"])
    node = load_config("configs/glucose_hybrid.yaml", [
        "model.learned=[{kind: neural_ode, out_scale: [1.0, 0.0001, 0.5, 2.0, 0.02]}]"])
    assert node.model.learned[0].out_scale == [1.0, 0.0001, 0.5, 2.0, 0.02]
    with pytest.raises(ConfigError, match=r"model.learned\[1\].kind: a neural_ode replaces"):
        load_config("configs/glucose_hybrid.yaml", [
            "model.learned=[{kind: state_correction, states: [G]}, {kind: neural_ode}]"])


def test_covariate_network_section():
    cfg = load_config("configs/theophylline_covariates.yaml")
    assert cfg.model.learned[0].params == ["CL", "V"]
    with pytest.raises(ConfigError, match=r"model.learned\[0\].params\[0\]: 'Cl' is not a "
                                          r"parameter"):
        load_config("configs/theophylline_covariates.yaml",
                    ["model.learned.0.params=[Cl]"])
    with pytest.raises(ConfigError, match="virtual cohorts carry no covariates"):
        load_config("configs/quickstart.yaml", [
            "model.learned=[{kind: covariate_network, params: [p1], covariates: [age]}]"])


def test_solver_section_builds_the_solver_options():
    from hybrid_twin.config import solver_options
    from hybrid_twin.solve import EXPERIMENT_DEFAULT, RK4, Kernel

    cfg = load_config("configs/quickstart.yaml",
                      ["solver.backend=kernel", "solver.method=rk4", "solver.dt0=0.5",
                       "solver.kernel.block=64", "solver.kernel.warps=2",
                       "solver.max_steps=5000", "solver.dtmax=obs"])
    opts = solver_options(cfg)
    assert opts.backend == Kernel(block=64, warps=2)
    assert opts.method == RK4(0.5)
    assert (opts.max_steps, opts.controller.dtmax) == (5000, "obs")
    # the defaults are the library's
    assert solver_options(load_config("configs/quickstart.yaml")) == EXPERIMENT_DEFAULT
    # YAML 1.1 reads 1e-6 as a string; the config takes it as the number it is
    assert solver_options(load_config("configs/quickstart.yaml",
                                      ["solver.rtol=1e-6"])).controller.rtol == 1e-6
    with pytest.raises(ConfigError, match=r"solver.kernel: Kernel.block must be a power of "
                                          r"two, got 100"):
        load_config("configs/quickstart.yaml", ["solver.kernel.block=100"])
    with pytest.raises(ConfigError, match=r"'solver.kernel_block' has moved to "
                                          r"'solver.kernel.block'"):
        load_config("configs/quickstart.yaml", ["solver.kernel_block=64"])
    with pytest.raises(ConfigError, match=r"solver: method 'rk4' needs a step size dt0"):
        load_config("configs/quickstart.yaml", ["solver.backend=kernel", "solver.method=rk4"])
    with pytest.raises(ConfigError, match=r"solver: the diffrax backend runs tsit5, dopri5, "
                                          r"kvaerno5 only, not rk4"):
        load_config("configs/quickstart.yaml", ["solver.backend=diffrax", "solver.method=rk4",
                                                "solver.dt0=1"])
    # hybrid training takes reverse-mode derivatives on every backend, rk4 included
    rk4 = load_config("configs/glucose_hybrid.yaml", ["solver.method=rk4", "solver.dt0=1",
                                                      "solver.backend=kernel"])
    assert solver_options(rk4).method == RK4(1.0)
    assert solver_options(load_config("configs/quickstart.yaml", [
        "solver.precision=float32"])).precision == "float32"
    with pytest.raises(ConfigError, match=r"solver.precision: 'half' is not one of auto, "
                                          r"float32, float64"):
        load_config("configs/quickstart.yaml", ["solver.precision=half"])
    # auto keeps the settings of the backend it picks
    auto = solver_options(load_config("configs/quickstart.yaml", [
        "solver.backend=auto", "solver.diffrax.save_chunk=8"])).resolved()
    assert auto.backend.name == "diffrax" and auto.backend.save_chunk == 8
    with pytest.raises(ConfigError, match=r"solver.backend: 'cuda' is not one of"):
        load_config("configs/quickstart.yaml", ["solver.backend=cuda"])
    with pytest.raises(ConfigError, match=r"'calibration.rtol' has moved to 'solver.rtol'"):
        load_config("configs/quickstart.yaml", ["calibration.rtol=1e-6"])
